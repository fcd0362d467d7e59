// The mlp as a chain of dense layers, each through the dense_forward / dense_backward ops, so it runs on any
// device those have kernels for. CUDA uses it always; the CPU for networks too large for its fused loops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/mlp.h"

namespace fusedlayers {
namespace {

using DenseForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&, c10::string_view, bool);
using DenseBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, c10::string_view, std::array<bool, 3>);

std::optional<at::Tensor> bias_of(at::TensorList biases, size_t l) {
  return biases.empty() ? std::nullopt : std::optional<at::Tensor>(biases[l]);
}

}  // namespace

MlpForwardResult mlp_chain_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                   std::vector<std::string> activations, bool save) {
  static auto forward =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::dense_forward", "").typed<DenseForwardFn>();
  check_mlp_args(x, weights, biases, activations.size());
  const size_t L = weights.size();
  std::vector<at::Tensor> hs, zs;
  at::Tensor h = x;
  for (size_t l = 0; l < L; ++l) {
    auto [y, z] = forward.call(h, weights[l], bias_of(biases, l), activations[l], save);
    if (save && l + 1 < L) hs.push_back(y);
    if (save && !derivative_is_constant(parse_activation(activations[l]))) zs.push_back(z);
    h = y;
  }
  hs.insert(hs.end(), zs.begin(), zs.end());
  return {h, hs};
}

MlpBackwardResult mlp_chain_backward(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                     at::TensorList biases, at::TensorList saved,
                                     std::vector<std::string> activations, bool input_grad) {
  static auto backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::dense_backward", "").typed<DenseBackwardFn>();
  check_mlp_args(x, weights, biases, activations.size());
  const size_t L = weights.size();
  size_t layout = L - 1;  // saved = [h_1..h_{L-1}, z of each non-identity layer]
  for (const auto& a : activations) layout += !derivative_is_constant(parse_activation(a));
  if (saved.empty() && layout > 0) {  // recompute: the forward again, keeping what the backward needs
    auto again = std::get<1>(mlp_chain_forward(x, weights, biases, activations, true));
    return mlp_chain_backward(grad_out, x, weights, biases, again, activations, input_grad);
  }
  TORCH_CHECK(saved.size() == layout, "mlp_backward(): saved has ", saved.size(), " tensors, the layout needs ", layout);
  std::vector<at::Tensor> inputs{x}, preacts(L);
  inputs.insert(inputs.end(), saved.begin(), saved.begin() + (L - 1));
  size_t next = L - 1;
  for (size_t l = 0; l < L; ++l) {
    if (!derivative_is_constant(parse_activation(activations[l]))) preacts[l] = saved[next++];
  }
  std::vector<at::Tensor> dweights(L), dbiases(biases.empty() ? 0 : L);
  at::Tensor g = grad_out;
  for (size_t l = L; l-- > 0;) {
    const bool want_dx = l > 0 || input_grad;
    auto [dx, dw, db] =
        backward.call(g, inputs[l], weights[l], bias_of(biases, l),
                      preacts[l].defined() ? std::optional<at::Tensor>(preacts[l]) : std::nullopt, activations[l],
                      {want_dx, true, !biases.empty()});
    dweights[l] = dw;
    if (!biases.empty()) dbiases[l] = db;
    g = dx;
  }
  return {input_grad ? g : at::Tensor(), dweights, dbiases};
}

}  // namespace fusedlayers
