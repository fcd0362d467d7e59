// The mlp family: a whole network of dense layers as one op with one autograd node, its kernels' schemas
// (every backend's), and its differentiable gradient for create_graph and torch.func.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "backend.h"
#include "ops/mlp.h"

namespace fusedlayers {
namespace {

using torch::autograd::variable_list;

// The same gradients as the mlp_backward kernels, as a composite of ATen ops and activation_derivative (see
// dense_grad, ops/dense.cpp): differentiable again to any order.
MlpBackwardResult mlp_grad(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                           at::TensorList biases, std::vector<std::string> activations, bool input_grad,
                           bool params_grad) {
  check_mlp_args(x, weights, biases, activations.size());
  const size_t L = weights.size();
  const int64_t rows = dense_rows(x);
  std::vector<bool> linear(L);
  for (size_t l = 0; l < L; ++l) linear[l] = derivative_is_constant(parse_activation(activations[l]));
  std::vector<at::Tensor> hs{x.reshape({rows, x.size(-1)})}, zs(L);
  for (size_t l = 0; l < L; ++l) {
    zs[l] = biases.empty() ? at::mm(hs[l], weights[l].t()) : at::addmm(biases[l], hs[l], weights[l].t());
    if (l + 1 < L) hs.push_back(linear[l] ? zs[l] : derivative(zs[l], activations[l], 0));
  }
  std::vector<at::Tensor> dweights(params_grad ? L : 0), dbiases(params_grad ? biases.size() : 0);
  at::Tensor g = grad_out.reshape({rows, weights[L - 1].size(0)});
  for (size_t l = L; l-- > 0;) {
    const at::Tensor dz = linear[l] ? g : derivative_times(g, zs[l], activations[l], 1);
    if (params_grad) dweights[l] = at::mm(dz.t(), hs[l]);
    if (params_grad && !biases.empty()) dbiases[l] = dz.sum(0);
    if (l > 0 || input_grad) g = at::mm(dz, weights[l]);
  }
  return {input_grad ? g.reshape(x.sizes()) : at::Tensor(), dweights, dbiases};
}


using MlpGradFn = MlpBackwardResult(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                    std::vector<std::string>, bool, bool);

using MlpForwardFn = MlpForwardResult(const at::Tensor&, at::TensorList, at::TensorList, std::vector<std::string>, bool);
using MlpBackwardFn = MlpBackwardResult(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                        at::TensorList, std::vector<std::string>, bool);

constinit const KernelOp<MlpForwardFn> mlp_forward_op("mlp_forward");

constinit const KernelOp<MlpBackwardFn> mlp_backward_op("mlp_backward");

using MlpFlatForwardFn = MlpForwardResult(const at::Tensor&, const at::Tensor&, at::IntArrayRef, bool,
                                          std::vector<std::string>, bool);
constinit const KernelOp<MlpFlatForwardFn> mlp_flat_forward_op("mlp_flat_forward");

using MlpFlatBackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             at::TensorList, at::IntArrayRef, bool,
                                                             std::vector<std::string>, bool);
constinit const KernelOp<MlpFlatBackwardFn> mlp_flat_backward_op("mlp_flat_backward");

// One autograd node for the whole network. Its backward is the mlp_backward kernel, or under create_graph
// the mlp_grad composite, which autograd differentiates again. A plain Node (as every node of fusedlayers) rather
// than a torch::autograd::Function: the Function's per-call bookkeeping (a context of named IValues, per-input
// metadata, output wrapping) costs more than a tiny network's arithmetic. Its outputs (next edges) are the
// gradients of x, weights..., biases....
struct MLPBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x;
  std::vector<torch::autograd::SavedVariable> weights, biases, saved;
  std::vector<std::string> activations;
  Backend backend = Backend::Native;

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as PyTorch's generated nodes: a retained graph can run twice at once
    const size_t L = weights.size();
    variable_list out(num_outputs());
    const bool input_grad = task_should_compute_output(0);
    bool params_grad = false;
    for (size_t i = 1; i < out.size(); ++i) params_grad = params_grad || task_should_compute_output(i);
    if (!grads[0].defined() || !(input_grad || params_grad)) return out;
    const at::Tensor x_ = x.unpack();
    std::vector<at::Tensor> ws, bs, ss;
    ws.reserve(L);
    for (const auto& v : weights) ws.push_back(v.unpack());
    for (const auto& v : biases) bs.push_back(v.unpack());
    for (const auto& v : saved) ss.push_back(v.unpack());
    at::Tensor dx;
    std::vector<at::Tensor> dweights, dbiases;
    if (at::GradMode::is_enabled()) {
      static auto composite = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::mlp_grad", "").typed<MlpGradFn>();
      std::tie(dx, dweights, dbiases) = composite.call(grads[0], x_, ws, bs, activations, input_grad, params_grad);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in DenseBackward::apply (ops/dense.cpp)
      std::tie(dx, dweights, dbiases) =
          mlp_backward_op(backend).call(grads[0], x_, ws, bs, ss, activations, input_grad);
    }
    out[0] = dx;
    for (size_t i = 0; i < dweights.size(); ++i) {
      if (task_should_compute_output(1 + i)) out[1 + i] = dweights[i];
    }
    for (size_t i = 0; i < dbiases.size(); ++i) {
      if (task_should_compute_output(1 + L + i)) out[1 + L + i] = dbiases[i];
    }
    return out;
  }

  std::string name() const override { return "MLPBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    for (auto* list : {&weights, &biases, &saved}) {
      for (auto& v : *list) v.reset_data();
    }
  }
};

at::Tensor mlp_no_autograd(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                           std::vector<std::string> activations, bool /*save*/, c10::string_view backend) {
  return std::get<0>(mlp_forward_op(parse_backend(backend)).call(x, weights, biases, activations, false));
}

at::Tensor mlp_autograd(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                        std::vector<std::string> activations, bool save, c10::string_view backend) {
  check_mlp_args(x, weights, biases, activations.size());  // before anything reads the shapes
  check_no_forward_grad({&x}, weights);
  check_no_forward_grad({}, biases);
  bool needs_grad = x.requires_grad();
  for (const auto& t : weights) needs_grad = needs_grad || t.requires_grad();
  for (const auto& t : biases) needs_grad = needs_grad || t.requires_grad();
  if (!(at::GradMode::is_enabled() && needs_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mlp_no_autograd(x, weights, biases, activations, save, backend);
  }
  const Backend kernels = parse_backend(backend);
  save = save && !mlp_recomputes(kernels, x, weights);
  auto node = c10::make_intrusive<MLPBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weights, biases));
  at::Tensor y;
  std::vector<at::Tensor> saved;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in dense_autograd (ops/dense.cpp)
    std::tie(y, saved) = mlp_forward_op(kernels).call(x, weights, biases, activations, save);
  }
  node->x = torch::autograd::SavedVariable(x, /*is_output=*/false);
  for (const auto& w : weights) node->weights.emplace_back(w, /*is_output=*/false);
  for (const auto& b : biases) node->biases.emplace_back(b, /*is_output=*/false);
  for (const auto& t : saved) node->saved.emplace_back(t, /*is_output=*/false);
  node->activations = std::move(activations);
  node->backend = kernels;
  torch::autograd::set_history(y, node);
  return y;
}

// ---- the flat layout: the parameters in one tensor, one autograd edge for all of them -------------------------

// MLPBackward for the flat layout: its outputs are the gradients of x and params.
struct MLPFlatBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, params;
  std::vector<torch::autograd::SavedVariable> saved;
  std::vector<int64_t> sizes;
  bool bias = true;
  std::vector<std::string> activations;
  Backend backend = Backend::Native;

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(2);
    const bool input_grad = task_should_compute_output(0), params_grad = task_should_compute_output(1);
    if (!grads[0].defined() || !(input_grad || params_grad)) return out;
    const at::Tensor x_ = x.unpack(), p = params.unpack();
    at::Tensor dx;
    std::vector<at::Tensor> dweights, dbiases;
    if (at::GradMode::is_enabled()) {
      static auto composite = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::mlp_grad", "").typed<MlpGradFn>();
      const auto [ws, bs] = flat_layers(p, sizes, bias);  // differentiable views: the gradient reaches params
      std::tie(dx, dweights, dbiases) = composite.call(grads[0], x_, ws, bs, activations, input_grad, params_grad);
      out[1] = params_grad ? join_flat(dweights, dbiases) : at::Tensor();
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<at::Tensor> ss;
      for (const auto& v : saved) ss.push_back(v.unpack());
      std::tie(dx, out[1]) =
          mlp_flat_backward_op(backend).call(grads[0], x_, p, ss, sizes, bias, activations, input_grad);
      if (!params_grad) out[1] = at::Tensor();
    }
    out[0] = dx;
    return out;
  }

  std::string name() const override { return "MLPFlatBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    params.reset_data();
    for (auto& v : saved) v.reset_data();
  }
};

// The forward kernel, nothing saved; the arguments checked.
at::Tensor flat_forward(const at::Tensor& x, const at::Tensor& params, at::IntArrayRef sizes, bool bias,
                        const std::vector<std::string>& activations, c10::string_view backend) {
  return std::get<0>(mlp_flat_forward_op(parse_backend(backend)).call(x, params, sizes, bias, activations, false));
}

at::Tensor mlp_flat_no_autograd(const at::Tensor& x, const at::Tensor& params, at::IntArrayRef sizes, bool bias,
                                std::vector<std::string> activations, bool /*save*/, c10::string_view backend) {
  check_flat_args(x, params, sizes, bias, activations.size());
  return flat_forward(x, params, sizes, bias, activations, backend);
}

at::Tensor mlp_flat_autograd(const at::Tensor& x, const at::Tensor& params, at::IntArrayRef sizes, bool bias,
                             std::vector<std::string> activations, bool save, c10::string_view backend) {
  check_flat_args(x, params, sizes, bias, activations.size());
  check_no_forward_grad({&x, &params});
  if (!(at::GradMode::is_enabled() && (x.requires_grad() || params.requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return flat_forward(x, params, sizes, bias, activations, backend);
  }
  const Backend kernels = parse_backend(backend);
  auto node = c10::make_intrusive<MLPFlatBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, params));
  at::Tensor y;
  std::vector<at::Tensor> saved;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save = save && !mlp_recomputes(kernels, x, sizes);
    std::tie(y, saved) = mlp_flat_forward_op(kernels).call(x, params, sizes, bias, activations, save);
  }
  node->x = torch::autograd::SavedVariable(x, /*is_output=*/false);
  node->params = torch::autograd::SavedVariable(params, /*is_output=*/false);
  for (const auto& t : saved) node->saved.emplace_back(t, /*is_output=*/false);
  node->sizes = sizes.vec();
  node->bias = bias;
  node->activations = std::move(activations);
  node->backend = kernels;
  torch::autograd::set_history(y, node);
  return y;
}

// The network's value and its gradients in one call, with no autograd graph: y and the gradients for an upstream
// gradient grad_out, or with a target the mean squared error and its gradients (F.mse_loss's "mean").
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_flat_grad_and_value(
    const at::Tensor& x, const at::Tensor& params, const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& target, at::IntArrayRef sizes, bool bias, std::vector<std::string> activations,
    bool input_grad, c10::string_view backend) {
  check_flat_args(x, params, sizes, bias, activations.size());
  TORCH_CHECK(grad_out.has_value() != target.has_value(),
              "mlp_flat_grad_and_value(): expected exactly one of grad_output and target, got ",
              grad_out.has_value() ? "both" : "neither");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // graph-free: the outputs are plain tensors
  const Backend kernels = parse_backend(backend);
  auto [y, saved] =
      mlp_flat_forward_op(kernels).call(x, params, sizes, bias, activations, !mlp_recomputes(kernels, x, sizes));
  const at::Tensor& other = grad_out.has_value() ? *grad_out : *target;
  TORCH_CHECK(other.sym_sizes() == y.sym_sizes(), "mlp_flat_grad_and_value(): expected ",
              grad_out.has_value() ? "grad_output" : "target", " of the output's shape ", y.sym_sizes(), ", got ",
              other.sym_sizes());
  TORCH_CHECK(other.scalar_type() == y.scalar_type() && other.device() == y.device(), "mlp_flat_grad_and_value(): ",
              "expected ", grad_out.has_value() ? "grad_output" : "target", " of the output's dtype and device (",
              py(y.scalar_type()), ", ", y.device(), "), got ", py(other.scalar_type()), ", ", other.device());
  at::Tensor value = y, g = other;
  if (target.has_value()) {  // PyTorch's own loss and gradient, F.mse_loss's
    value = at::mse_loss(y, *target, at::Reduction::Mean);
    g = at::mse_loss_backward(at::ones({}, y.options()), y, *target, at::Reduction::Mean);
  }
  auto [dx, dparams] = mlp_flat_backward_op(kernels).call(g, x, params, saved, sizes, bias, activations, input_grad);
  return {value, dx, dparams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_flat_grad_and_value_autograd(
    const at::Tensor& x, const at::Tensor& params, const std::optional<at::Tensor>& grad_out,
    const std::optional<at::Tensor>& target, at::IntArrayRef sizes, bool bias, std::vector<std::string> activations,
    bool input_grad, c10::string_view backend) {
  check_no_forward_grad({&x, &params});
  return mlp_flat_grad_and_value(x, params, grad_out, target, sizes, bias, std::move(activations), input_grad,
                                 backend);
}

// A backend's mlp_flat_forward and mlp_flat_backward unless it has its own: its mlp_forward / mlp_backward on
// views of params, the gradients joined.
template <Backend B>
MlpForwardResult mlp_flat_forward_generic(const at::Tensor& x, const at::Tensor& params, at::IntArrayRef sizes,
                                          bool bias, std::vector<std::string> activations, bool save) {
  check_flat_args(x, params, sizes, bias, activations.size());
  const auto [ws, bs] = flat_layers(params, sizes, bias);
  return mlp_forward_op(B).call(x, ws, bs, activations, save);
}

// A backend's mlp_flat_backward unless it has its own: its mlp_backward on views of params, the gradients joined.
template <Backend B>
std::tuple<at::Tensor, at::Tensor> mlp_flat_backward_generic(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& params, at::TensorList saved,
                                                             at::IntArrayRef sizes, bool bias,
                                                             std::vector<std::string> activations, bool input_grad) {
  const auto [ws, bs] = flat_layers(params, sizes, bias);
  auto [dx, dweights, dbiases] = mlp_backward_op(B).call(grad_out, x, ws, bs, saved, activations, input_grad);
  return {dx, join_flat(dweights, dbiases)};
}

// A traced x (symbolic sizes, or a Python tensor such as export's, whose sizes are symbolic behind a Python call)
// saves: reading its sizes would specialize the graph to them.
bool concrete_shape(const at::Tensor& x) {
  return !traced(x) && !x.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// Few rows, all registered at static initialization, before any call reads them.
std::vector<std::tuple<Backend, c10::DeviceType, MlpRecomputesFn>>& recomputes_table() {
  static std::vector<std::tuple<Backend, c10::DeviceType, MlpRecomputesFn>> table;
  return table;
}

}  // namespace

void check_flat_args(const at::Tensor& x, const at::Tensor& params, at::IntArrayRef sizes, bool bias,
                     size_t num_activations) {
  TORCH_CHECK(sizes.size() >= 2, "mlp_flat(): expected sizes to list at least the input and output widths, got ",
              sizes);
  for (const int64_t s : sizes) TORCH_CHECK(s >= 0, "mlp_flat(): expected non-negative sizes, got ", sizes);
  TORCH_CHECK(num_activations == sizes.size() - 1, "mlp_flat(): expected one activation per layer (",
              sizes.size() - 1, "), got ", num_activations);
  const int64_t n = flat_numel(sizes, bias);
  TORCH_CHECK(params.dim() == 1 && params.sym_numel() == n, "mlp_flat(): expected params to be 1-D with ", n,
              " elements (every layer's weight", bias ? " and bias" : "", " for sizes ", sizes, "), got shape ",
              params.sym_sizes());
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == sizes[0], "mlp_flat(): expected x of shape [..., ", sizes[0],
              "] (sizes[0]), got ", x.sym_sizes());
  TORCH_CHECK(x.is_floating_point(), "mlp_flat(): expected x to be a floating-point tensor, got ",
              py(x.scalar_type()));
  TORCH_CHECK(params.scalar_type() == x.scalar_type(), "mlp_flat(): expected params to have the dtype of x (",
              py(x.scalar_type()), "), got ", py(params.scalar_type()));
  TORCH_CHECK(params.device() == x.device(), "mlp_flat(): expected params on the device of x (", x.device(),
              "), got ", params.device());
}

int64_t flat_numel(at::IntArrayRef sizes, bool bias) {
  int64_t n = 0;
  for (size_t l = 0; l + 1 < sizes.size(); ++l) n += sizes[l + 1] * (sizes[l] + (bias ? 1 : 0));
  return n;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> flat_layers(const at::Tensor& flat, at::IntArrayRef sizes,
                                                                         bool bias) {
  std::vector<at::Tensor> weights, biases;
  int64_t offset = 0;
  for (size_t l = 0; l + 1 < sizes.size(); ++l) {
    const int64_t in = sizes[l], out = sizes[l + 1];
    weights.push_back(flat.narrow(0, offset, out * in).view({out, in}));
    offset += out * in;
    if (bias) biases.push_back(flat.narrow(0, offset, out));
    offset += bias ? out : 0;
  }
  return {weights, biases};
}

bool mlp_recomputes(Backend backend, const at::Tensor& x, at::TensorList weights) {
  if (!concrete_shape(x)) return false;
  std::vector<int64_t> sizes{x.size(-1)};
  for (const auto& w : weights) sizes.push_back(w.size(0));
  return mlp_recomputes(backend, x, sizes);
}

at::Tensor join_flat(const std::vector<at::Tensor>& dweights, const std::vector<at::Tensor>& dbiases) {
  std::vector<at::Tensor> parts;
  parts.reserve(dweights.size() + dbiases.size());
  for (size_t l = 0; l < dweights.size(); ++l) {
    parts.push_back(dweights[l].reshape({-1}));
    if (!dbiases.empty()) parts.push_back(dbiases[l]);
  }
  return at::cat(parts);
}

bool register_mlp_recomputes(Backend backend, c10::DeviceType device, MlpRecomputesFn fn) {
  recomputes_table().emplace_back(backend, device, fn);
  return true;
}

bool mlp_recomputes(Backend backend, const at::Tensor& x, at::IntArrayRef sizes) {
  if (!concrete_shape(x)) return false;
  for (const auto& [b, device, fn] : recomputes_table()) {
    if (b == backend && device == x.device().type()) return fn(x, sizes);
  }
  return false;
}

}  // namespace fusedlayers

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // A whole network of dense layers: layer l computes h_{l+1} = activations[l](h_l @ weights[l].T + biases[l]),
  // h_0 = x. biases is empty (no biases) or has one per layer.
  m.def("mlp(Tensor x, Tensor[] weights, Tensor[] biases, str[] activations, bool save, str backend) -> Tensor");
  // Returns (y, saved): with save, saved = [z_0, ..., z_{L-1}], the pre-activation of every layer (shape
  // (*batch, out_l)), from which the backward gets h_l = f(z_{l-1}); without, saved is empty and the backward
  // recomputes the forward. Backward returns (dx or undefined without input_grad, [dW_l], [db_l] or []).
  fusedlayers::def_kernels(m, {"mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, str[] activations, bool save) "
                               "-> (Tensor, Tensor[])",
                               "mlp_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor[] biases, "
                               "Tensor[] saved, str[] activations, bool input_grad) -> (Tensor, Tensor[], Tensor[])",
                               // the same for parameters in the flat layout (ops/mlp.h); the backward returns
                               // (dx or undefined, dparams)
                               "mlp_flat_forward(Tensor x, Tensor params, int[] sizes, bool bias, str[] activations, "
                               "bool save) -> (Tensor, Tensor[])",
                               "mlp_flat_backward(Tensor grad_out, Tensor x, Tensor params, Tensor[] saved, "
                               "int[] sizes, bool bias, str[] activations, bool input_grad) -> (Tensor, Tensor)"});
  // The gradient as a composite of differentiable ops (see dense_grad); the lists are empty without params_grad.
  m.def("mlp_grad(Tensor grad_out, Tensor x, Tensor[] weights, Tensor[] biases, str[] activations, "
        "bool input_grad, bool params_grad) -> (Tensor, Tensor[], Tensor[])");

  // The same network with its parameters in one tensor (the layout of flat_layers, ops/mlp.h): one autograd
  // edge for all of them, and their gradient in one tensor.
  m.def("mlp_flat(Tensor x, Tensor params, int[] sizes, bool bias, str[] activations, bool save, str backend) "
        "-> Tensor");

  // Its value and gradients with no autograd graph (FusedMLP.grad_and_value): (y, or with a target the mean
  // squared error; dx or undefined without input_grad; dparams in the flat layout).
  m.def("mlp_flat_grad_and_value(Tensor x, Tensor params, Tensor? grad_out, Tensor? target, int[] sizes, bool bias, "
        "str[] activations, bool input_grad, str backend) -> (Tensor, Tensor, Tensor)");

  fusedlayers::impl_differentiable(m, "mlp", &fusedlayers::mlp_autograd, &fusedlayers::mlp_no_autograd);
  fusedlayers::impl_differentiable(m, "mlp_flat_grad_and_value", &fusedlayers::mlp_flat_grad_and_value_autograd,
                                   &fusedlayers::mlp_flat_grad_and_value);
  fusedlayers::impl_differentiable(m, "mlp_flat", &fusedlayers::mlp_flat_autograd, &fusedlayers::mlp_flat_no_autograd);
  fusedlayers::not_differentiable(m, {"mlp_forward", "mlp_backward", "mlp_flat_forward", "mlp_flat_backward"});
  fusedlayers::impl_composite(m, "mlp_grad", &fusedlayers::mlp_grad);
}

// Every backend's mlp_flat_forward and mlp_flat_backward, unless it registers its own (the CPU's: csrc/cpu/mlp.cpp).
TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  fusedlayers::for_each_backend([&](auto b) {
    constexpr fusedlayers::Backend B = decltype(b)::value;
    m.impl(fusedlayers::kernel_name(B, "mlp_flat_forward").c_str(), &fusedlayers::mlp_flat_forward_generic<B>);
    m.impl(fusedlayers::kernel_name(B, "mlp_flat_backward").c_str(), &fusedlayers::mlp_flat_backward_generic<B>);
  });
}
