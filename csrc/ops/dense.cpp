// The dense family: dense(x, weight, bias) = activation(x @ weight.T + bias) as one op with one autograd node,
// its kernels' schemas (every backend's), and its differentiable gradient for create_graph and torch.func.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "backend.h"
#include "ops/dense.h"

namespace fusedlayers {
namespace {

using torch::autograd::variable_list;

using DenseForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&, c10::string_view, bool);
using DenseBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, c10::string_view, std::array<bool, 3>);


// The differentiable gradient, what a backward under create_graph (and torch.func) computes: the same gradients
// as the dense_backward kernels, as a composite of ATen ops and
// activation_derivative, so that autograd and torch.func differentiate them again to any order. The
// pre-activations are recomputed: saved ones were made without a graph and would cut the higher derivatives.

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation, std::array<bool, 3> output_mask) {
  check_dense_args(x, weight, bias);
  const int64_t rows = dense_rows(x), in = weight.size(1), out = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor x2 = x.reshape({rows, in});
  at::Tensor dz = grad_out.reshape({rows, out});
  if (!derivative_is_constant(parse_activation(activation))) {
    const at::Tensor z = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    dz = derivative_times(dz, z, activation, 1);
  }
  at::Tensor dx, dw, db;
  if (output_mask[0]) dx = at::mm(dz, weight).reshape(x.sizes());
  if (output_mask[1]) dw = at::mm(dz.t(), x2);
  if (output_mask[2] && has_bias) db = dz.sum(0);
  return {dx, dw, db};
}

using DenseGradFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
    std::array<bool, 3>);

constinit const KernelOp<DenseForwardFn> dense_forward_op("dense_forward");

constinit const KernelOp<DenseBackwardFn> dense_backward_op("dense_backward");

// One autograd node per dense layer (a plain Node, as MLPBackward in ops/mlp.cpp explains). It saves x, weight, bias
// and (unless recomputing) the pre-activation. The backward is the dense_backward kernel; under create_graph
// (grad mode on in the backward) it is the dense_grad composite instead, which autograd differentiates again.
// Its outputs (next edges) are the gradients of x, weight and bias (when given).
struct DenseBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, bias, preact;
  std::string activation;
  Backend backend = Backend::Native;

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as PyTorch's generated nodes: a retained graph can run twice at once
    variable_list out(num_outputs());
    const std::array<bool, 3> mask = {task_should_compute_output(0), task_should_compute_output(1),
                                      out.size() > 2 && task_should_compute_output(2)};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return out;
    const at::Tensor x_ = x.unpack(), w_ = weight.unpack(), b_ = bias.unpack(), z_ = preact.unpack();
    const auto b_opt = b_.defined() ? std::optional<at::Tensor>(b_) : std::nullopt;
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      static auto composite = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::dense_grad", "").typed<DenseGradFn>();
      std::tie(dx, dw, db) = composite.call(grads[0], x_, w_, b_opt, activation, mask);
    } else {
      // Without create_graph nothing records the kernel's outputs: skip its Autograd key (see dense_autograd).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(dx, dw, db) = dense_backward_op(backend).call(
          grads[0], x_, w_, b_opt, z_.defined() ? std::optional<at::Tensor>(z_) : std::nullopt, activation, mask);
    }
    out[0] = dx;
    out[1] = dw;
    if (out.size() > 2) out[2] = db;
    return out;
  }

  std::string name() const override { return "DenseBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* v : {&x, &weight, &bias, &preact}) v->reset_data();
  }
};

// Without autograd (inference mode, no grad needed, or below Autograd in a compiled graph) nothing is saved.
at::Tensor dense_no_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             c10::string_view activation, bool /*save_preact*/, c10::string_view backend) {
  return std::get<0>(dense_forward_op(parse_backend(backend)).call(x, weight, bias, activation, false));
}

at::Tensor dense_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          c10::string_view activation, bool save_preact, c10::string_view backend) {
  const at::Tensor no_bias;
  check_no_forward_grad({&x, &weight, bias.has_value() ? &*bias : &no_bias});
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return dense_no_autograd(x, weight, bias, activation, save_preact, backend);
  }
  const Backend kernels = parse_backend(backend);
  const bool has_bias = bias.has_value() && bias->defined();
  auto node = c10::make_intrusive<DenseBackward>();
  node->set_next_edges(has_bias ? torch::autograd::collect_next_edges(x, weight, *bias)
                                : torch::autograd::collect_next_edges(x, weight));
  at::Tensor y, preact;
  {
    // Straight to the backend kernel: through the kernel op's Autograd key (the boxed not-implemented
    // fallback) the call would cost more than a small layer's arithmetic.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(y, preact) = dense_forward_op(kernels).call(x, weight, bias, activation, save_preact);
  }
  node->x = torch::autograd::SavedVariable(x, /*is_output=*/false);
  node->weight = torch::autograd::SavedVariable(weight, /*is_output=*/false);
  if (has_bias) node->bias = torch::autograd::SavedVariable(*bias, /*is_output=*/false);
  if (save_preact && !derivative_is_constant(parse_activation(activation))) {
    node->preact = torch::autograd::SavedVariable(preact, /*is_output=*/false);
  }
  node->activation = std::string(activation);
  node->backend = kernels;
  torch::autograd::set_history(y, node);
  return y;
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  m.def("dense(Tensor x, Tensor weight, Tensor? bias, str activation, bool save_preact, str backend) -> Tensor");
  // Returns (y, preact); preact is z = x @ weight.T + bias when save_preact and f' is not constant, else an
  // empty tensor.
  // In the backward, preact None means: recompute it from x, weight and bias where f' needs it.
  fusedlayers::def_kernels(m, {"dense_forward(Tensor x, Tensor weight, Tensor? bias, str activation, bool save_preact) "
                               "-> (Tensor, Tensor)",
                               "dense_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? preact, "
                               "str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"});

  // The gradient of dense as a composite of differentiable ops: the backward under create_graph and torch.func.
  // Unwanted outputs are undefined (None).
  m.def("dense_grad(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, str activation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");

  fusedlayers::impl_differentiable(m, "dense", &fusedlayers::dense_autograd, &fusedlayers::dense_no_autograd);
  fusedlayers::not_differentiable(m, {"dense_forward", "dense_backward"});
  fusedlayers::impl_composite(m, "dense_grad", &fusedlayers::dense_grad);
}
