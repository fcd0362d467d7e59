// Every op schema of fusedlayers, and the autograd of the differentiable ops.
//
// Each op family has a differentiable op (`dense`) whose Autograd kernel lives here, and a pair of
// schema'd kernels per backend (`<prefix>dense_forward`, `<prefix>dense_backward`) that do the work:
// prefix "" is the native backend (C++ on CPU, CUDA on GPU, chosen by the dispatcher from the device),
// prefix "triton_" the Triton backend (registered from Python). The backward kernel is itself an op, so
// torch.compile sees it and it can get an autograd formula of its own.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "backend.h"
#include "cross_entropy_ops.h"
#include "dense.h"
#include "mlp.h"

// The extension is a Python module only so that `import fusedlayers._C` loads the op registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fusedlayers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using DenseForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const std::optional<at::Tensor>&, c10::string_view, bool);
using DenseBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, c10::string_view, std::array<bool, 3>);

// Forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) reaches dense and mlp through
// fusedlayers.functional, which routes tangents to an autograd.Function with a jvp formula
// (fusedlayers/_func.py). The raw ops have none: called directly with a tangent, they raise rather than give
// a zero tangent.
void check_no_forward_grad(std::initializer_list<const at::Tensor*> tensors, at::TensorList lists = {}) {
  bool dual = false;
  for (const auto* t : tensors) dual = dual || (t->defined() && t->_fw_grad(/*level=*/0).defined());
  for (const auto& t : lists) dual = dual || t._fw_grad(/*level=*/0).defined();
  TORCH_CHECK(!dual, "the raw fusedlayers ops do not support forward-mode AD (torch.func.jvp, jacfwd, "
              "torch.autograd.forward_ad): call them through fusedlayers.functional or the modules, which do");
}

// ---- activation derivatives: the differentiable pieces of every higher-order gradient -------------------

using DerivativeFn = at::Tensor(const at::Tensor&, c10::string_view, int64_t);

// Orders 0-3 are the activation table's kernels; higher orders the torch formulas (registered from Python).
c10::TypedOperatorHandle<DerivativeFn> derivative_op(int64_t order) {
  static auto table = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::activation_derivative", "").typed<DerivativeFn>();
  static auto formula = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::activation_derivative_formula", "").typed<DerivativeFn>();
  return order <= kMaxTableOrder ? table : formula;
}

}  // namespace

// Declared in dense.h.
at::Tensor derivative(const at::Tensor& z, c10::string_view activation, int64_t order) {
  return derivative_op(order).call(z, activation, order);
}

namespace {

using GradTimesFn = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);

c10::TypedOperatorHandle<GradTimesFn> activation_grad_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::activation_grad", "").typed<GradTimesFn>();
  return op;
}

// grad * f^(order)(z) through the dispatcher: differentiable to any order, in reverse and forward mode.
at::Tensor derivative_times(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation, int64_t order) {
  return activation_grad_op().call(grad, z, activation, order);
}

// d/dz f^(n)(z) = f^(n+1)(z): one node whose backward is the next order, itself differentiable. A plain
// autograd Node, as PyTorch's own ops have, rather than a torch::autograd::Function: functorch's transforms
// (grad, vjp, jacrev, hessian) refuse the latter, and the gradients of dense and mlp under them go through
// this op.
struct DerivativeBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable z;
  std::string activation;
  int64_t order = 0;

  variable_list apply(variable_list&& grads) override {
    variable_list out(1);
    if (grads[0].defined() && task_should_compute_output(0)) {
      out[0] = derivative_times(grads[0], z.unpack(), activation, order + 1);
    }
    return out;
  }
  std::string name() const override { return "ActivationDerivativeBackward"; }
  void release_variables() override { z.reset_data(); }
};

at::Tensor derivative_autograd(const at::Tensor& z, c10::string_view activation, int64_t order) {
  TORCH_CHECK_VALUE(order >= 0, "activation_derivative(): expected order >= 0, got ", order);
  // The formula differentiates f'' with autograd itself: it must run above the Autograd key, never below it
  // (where its graph would not be recorded).
  // Forward mode does not see through that autograd (it gave no tangent): the tangent is set here as below.
  if (order > kMaxTableOrder) {
    const at::Tensor tangent = z._fw_grad(/*level=*/0);
    if (!tangent.defined()) return derivative(z, activation, order);
    const at::Tensor primal = z._fw_primal(/*level=*/0);
    at::Tensor out = derivative(primal, activation, order);
    out._set_fw_grad(derivative_times(tangent, primal, activation, order + 1), /*level=*/0, false);
    return out;
  }
  // The tangent t of z (forward mode) gets t * f^(order+1)(z), as PyTorch's generated kernels set theirs.
  const at::Tensor tangent = z._fw_grad(/*level=*/0);
  const at::Tensor primal = tangent.defined() ? z._fw_primal(/*level=*/0) : z;
  c10::intrusive_ptr<DerivativeBackward> node;
  if (torch::autograd::compute_requires_grad(primal)) {
    node = c10::make_intrusive<DerivativeBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(primal));
    node->z = torch::autograd::SavedVariable(primal, /*is_output=*/false);
    node->activation = std::string(activation);
    node->order = order;
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = derivative_op(order).call(primal, activation, order);
  }
  if (node) torch::autograd::set_history(out, node);
  if (tangent.defined()) out._set_fw_grad(derivative_times(tangent, primal, activation, order + 1), /*level=*/0, false);
  return out;
}

// ---- activation_grad: grad * f^(order)(z), the g * f'(z) of every layer of a differentiable gradient --------

// One node (and one kernel pass) where grad * activation_derivative(z) takes two: d/dgrad is the same op,
// d/dz the next order, so the gradients it records under create_graph are again these nodes: a tanh layer
// evaluates tanh once per order, not twice.
struct ActivationGradBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable grad, z;
  std::string activation;
  int64_t order = 0;

  variable_list apply(variable_list&& grads) override {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const at::Tensor zv = z.unpack();
    if (task_should_compute_output(0)) out[0] = derivative_times(grads[0], zv, activation, order);
    if (task_should_compute_output(1)) out[1] = derivative_times(grads[0] * grad.unpack(), zv, activation, order + 1);
    return out;
  }
  std::string name() const override { return "ActivationGradBackward"; }
  void release_variables() override {
    grad.reset_data();
    z.reset_data();
  }
};

at::Tensor activation_grad_autograd(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation,
                                    int64_t order) {
  TORCH_CHECK_VALUE(order >= 0, "activation_grad(): expected order >= 0, got ", order);
  const at::Tensor tg = grad._fw_grad(/*level=*/0), tz = z._fw_grad(/*level=*/0);
  const at::Tensor g = tg.defined() ? grad._fw_primal(/*level=*/0) : grad;
  const at::Tensor zp = tz.defined() ? z._fw_primal(/*level=*/0) : z;
  at::Tensor out;
  if (order > kMaxTableOrder) {
    out = g * derivative(zp, activation, order);  // past the table: the product of two differentiable ops
  } else {
    c10::intrusive_ptr<ActivationGradBackward> node;
    if (torch::autograd::compute_requires_grad(g, zp)) {
      node = c10::make_intrusive<ActivationGradBackward>();
      node->set_next_edges(torch::autograd::collect_next_edges(g, zp));
      node->grad = torch::autograd::SavedVariable(g, /*is_output=*/false);
      node->z = torch::autograd::SavedVariable(zp, /*is_output=*/false);
      node->activation = std::string(activation);
      node->order = order;
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = activation_grad_op().call(g, zp, activation, order);
    }
    if (node) torch::autograd::set_history(out, node);
  }
  // The tangent: tg * f^(order)(z) + grad * f^(order+1)(z) * tz.
  at::Tensor tangent;
  if (tg.defined()) tangent = derivative_times(tg, zp, activation, order);
  if (tz.defined()) {
    const at::Tensor t = derivative_times(g * tz, zp, activation, order + 1);
    tangent = tangent.defined() ? tangent + t : t;
  }
  if (tangent.defined()) out._set_fw_grad(tangent, /*level=*/0, false);
  return out;
}

// ---- the differentiable gradients: what a backward under create_graph (and torch.func) computes ---------
//
// The same gradients as the dense_backward / mlp_backward kernels, as a composite of ATen ops and
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

using DenseGradFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
    std::array<bool, 3>);
using MlpGradFn = MlpBackwardResult(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                    std::vector<std::string>, bool, bool);

// Handles are looked up once; the Triton ones resolve to kernels that Python registers later.
c10::TypedOperatorHandle<DenseForwardFn> dense_forward_op(bool triton) {
  static auto native = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::dense_forward", "").typed<DenseForwardFn>();
  static auto tri = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::triton_dense_forward", "").typed<DenseForwardFn>();
  return triton ? tri : native;
}

c10::TypedOperatorHandle<DenseBackwardFn> dense_backward_op(bool triton) {
  static auto native = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::dense_backward", "").typed<DenseBackwardFn>();
  static auto tri = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::triton_dense_backward", "").typed<DenseBackwardFn>();
  return triton ? tri : native;
}

// One autograd node per dense layer (a plain Node, as MLPBackward below explains). It saves x, weight, bias
// and (unless recomputing) the pre-activation. The backward is the dense_backward kernel; under create_graph
// (grad mode on in the backward) it is the dense_grad composite instead, which autograd differentiates again.
// Its outputs (next edges) are the gradients of x, weight and bias (when given).
struct DenseBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, bias, preact;
  std::string activation;
  bool triton = false;

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
      std::tie(dx, dw, db) = dense_backward_op(triton).call(
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
  return std::get<0>(dense_forward_op(is_triton(backend)).call(x, weight, bias, activation, false));
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
  const bool triton = is_triton(backend);
  const bool has_bias = bias.has_value() && bias->defined();
  auto node = c10::make_intrusive<DenseBackward>();
  node->set_next_edges(has_bias ? torch::autograd::collect_next_edges(x, weight, *bias)
                                : torch::autograd::collect_next_edges(x, weight));
  at::Tensor y, preact;
  {
    // Straight to the backend kernel: through the kernel op's Autograd key (the boxed not-implemented
    // fallback) the call would cost more than a small layer's arithmetic.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(y, preact) = dense_forward_op(triton).call(x, weight, bias, activation, save_preact);
  }
  node->x = torch::autograd::SavedVariable(x, /*is_output=*/false);
  node->weight = torch::autograd::SavedVariable(weight, /*is_output=*/false);
  if (has_bias) node->bias = torch::autograd::SavedVariable(*bias, /*is_output=*/false);
  if (save_preact && !derivative_is_constant(parse_activation(activation))) {
    node->preact = torch::autograd::SavedVariable(preact, /*is_output=*/false);
  }
  node->activation = std::string(activation);
  node->triton = triton;
  torch::autograd::set_history(y, node);
  return y;
}

// ---- mlp ------------------------------------------------------------------------------------------------

using MlpForwardFn = MlpForwardResult(const at::Tensor&, at::TensorList, at::TensorList, std::vector<std::string>, bool);
using MlpBackwardFn = MlpBackwardResult(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                        at::TensorList, std::vector<std::string>, bool);

c10::TypedOperatorHandle<MlpForwardFn> mlp_forward_op(bool triton) {
  static auto native = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::mlp_forward", "").typed<MlpForwardFn>();
  static auto tri = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::triton_mlp_forward", "").typed<MlpForwardFn>();
  return triton ? tri : native;
}

c10::TypedOperatorHandle<MlpBackwardFn> mlp_backward_op(bool triton) {
  static auto native = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::mlp_backward", "").typed<MlpBackwardFn>();
  static auto tri = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::triton_mlp_backward", "").typed<MlpBackwardFn>();
  return triton ? tri : native;
}

// One autograd node for the whole network. Its backward is the mlp_backward kernel, or under create_graph
// the mlp_grad composite, which autograd differentiates again. A plain Node (as DerivativeBackward) rather
// than a torch::autograd::Function: the Function's per-call bookkeeping (a context of named IValues, per-input
// metadata, output wrapping) costs more than a tiny network's arithmetic. Its outputs (next edges) are the
// gradients of x, weights..., biases....
struct MLPBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x;
  std::vector<torch::autograd::SavedVariable> weights, biases, saved;
  std::vector<std::string> activations;
  bool triton = false;

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
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in DenseBackward::apply
      std::tie(dx, dweights, dbiases) =
          mlp_backward_op(triton).call(grads[0], x_, ws, bs, ss, activations, input_grad);
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
  return std::get<0>(mlp_forward_op(is_triton(backend)).call(x, weights, biases, activations, false));
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
  const bool triton = is_triton(backend);
  save = save && !(!triton && cpu::mlp_cpu_recomputes(x, weights));
  auto node = c10::make_intrusive<MLPBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weights, biases));
  at::Tensor y;
  std::vector<at::Tensor> saved;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in dense_autograd
    std::tie(y, saved) = mlp_forward_op(triton).call(x, weights, biases, activations, save);
  }
  node->x = torch::autograd::SavedVariable(x, /*is_output=*/false);
  for (const auto& w : weights) node->weights.emplace_back(w, /*is_output=*/false);
  for (const auto& b : biases) node->biases.emplace_back(b, /*is_output=*/false);
  for (const auto& t : saved) node->saved.emplace_back(t, /*is_output=*/false);
  node->activations = std::move(activations);
  node->triton = triton;
  torch::autograd::set_history(y, node);
  return y;
}

// ---- cross_entropy --------------------------------------------------------------------------------------

// The backward formula of the contract (at the cross_entropy_forward schema) in differentiable ATen ops, for
// a backward that is itself differentiated (create_graph): exact at every order, in logits, grad_loss and
// grad_lse.
at::Tensor cross_entropy_backward_composite(const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                                            const at::Tensor& logits, const at::Tensor& target,
                                            const at::Tensor& weight, int64_t ignore_index, double eps, double z_loss,
                                            std::optional<double> softcap) {
  const int64_t C = logits.size(1);
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.to(math);
  const at::Tensor z = softcap ? x.div(*softcap).tanh().mul(*softcap) : x;
  const at::Tensor lse = z.logsumexp({1});
  const at::Tensor p = (z - lse.unsqueeze(1)).exp();
  const at::Tensor kept = target != ignore_index;
  const at::Tensor safe_t = at::where(kept, target, 0);
  const at::Tensor w = weight.defined() ? weight.to(math) : at::Tensor();
  const at::Tensor wt = w.defined() ? at::where(kept, w.gather(0, safe_t), 0) : kept.to(math);
  // where, not a product: an all-ignored mean's grad_loss is inf on every (ignored) row.
  const at::Tensor gl = at::where(kept, grad_loss.to(math), 0);
  const at::Tensor W = w.defined() ? w.sum() : at::scalar_tensor(static_cast<double>(C), x.options());
  at::Tensor a = gl * (wt * ((1.0 - eps) + 2.0 * z_loss * lse) + eps / C * W);
  if (grad_lse.defined()) a = a + grad_lse.to(math);
  at::Tensor grad = a.unsqueeze(1) * p - (gl * wt * (1.0 - eps)).unsqueeze(1) * at::one_hot(safe_t, C).to(math);
  if (eps != 0.0) grad = grad - (gl * (eps / C)).unsqueeze(1) * (w.defined() ? w.unsqueeze(0) : at::ones({1, 1}, x.options()));
  if (softcap) grad = grad * (1 - x.div(*softcap).tanh().square());
  return grad.to(logits.scalar_type());
}

void check_weight_not_differentiable(const std::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(!(weight.has_value() && weight->requires_grad() && at::GradMode::is_enabled()), op,
              "(): the gradient with respect to the class weight is not implemented (neither is it in "
              "F.cross_entropy); pass weight.detach()");
}

const char* reduction_name(CeReduction r) {
  return r == CeReduction::None ? "none" : r == CeReduction::Mean ? "mean" : "sum";
}

// The options a backward needs, in one saved_data entry: fewer hash-map insertions per call.
c10::IValue ce_options(int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap,
                       CeReduction reduction, bool triton) {
  return c10::ivalue::Tuple::create({ignore_index, label_smoothing, z_loss,
                                     softcap ? c10::IValue(*softcap) : c10::IValue(),
                                     static_cast<int64_t>(reduction), triton});
}

// Whether t is being traced (torch.compile's fake and functional tensors): it has no values to read.
bool traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// Whether an upstream gradient is exactly 1 (loss.backward()), where that costs no device synchronization: read
// from a real CPU scalar only.
bool is_one(const at::Tensor& g) {
  if (!g.is_cpu() || g.dim() != 0 || traced(g)) return false;
  // read in place: item() is a dispatched op, a microsecond of a small loss's backward
  if (g.scalar_type() == at::kFloat) return *g.const_data_ptr<float>() == 1.0f;
  if (g.scalar_type() == at::kDouble) return *g.const_data_ptr<double>() == 1.0;
  return g.item<double>() == 1.0;
}

// One autograd node for the loss and its reduction: saves logits, target, weight and lse. A reduced loss (not
// traced) also gets its gradient in the forward, from the rows it reads anyway (cross_entropy_forward_grad):
// the backward then only scales it, instead of reading the logits again. Otherwise, and for a second
// backward, a gradient of lse or a differentiated backward, the backward is the cross_entropy_backward kernel
// or the composite formula.
class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                               double z_loss, std::optional<double> softcap, c10::string_view reduction,
                               c10::string_view backend) {
    const bool triton = is_triton(backend);
    const CeReduction red = parse_reduction(reduction);
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in DenseFunction::forward
    at::Tensor loss, lse;
    if (red != CeReduction::None && !traced(logits)) {
      at::Tensor grad = at::empty(logits.sizes(), logits.options());
      std::tie(loss, lse) = ce_forward_grad_op(triton).call(logits, target, weight, ignore_index, label_smoothing,
                                                            z_loss, softcap, reduction, grad);
      ctx->saved_data["grad"] = std::move(grad);
    } else {
      std::tie(loss, lse) = ce_forward_op(triton).call(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                                       softcap, reduction);
    }
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), lse});
    ctx->set_materialize_grads(false);  // the kernel takes grad_lse None as zero, without reading it
    ctx->saved_data["options"] = ce_options(ignore_index, label_smoothing, z_loss, softcap, red, triton);
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const auto precomputed = ctx->saved_data.find("grad");
    if (precomputed != ctx->saved_data.end() && !grads[1].defined() && !at::GradMode::is_enabled()) {
      out[0] = precomputed->second.toTensor();
      // its only reference leaves with it: AccumulateGrad can keep it without a copy, and a second backward
      // takes the kernel
      ctx->saved_data.erase(precomputed);
      if (!is_one(grads[0])) out[0].mul_(grads[0]);
      return out;
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &weight = saved[2], &lse = saved[3];
    const auto options = ctx->saved_data["options"].toTuple();
    const auto& o = options->elements();
    const int64_t ignore_index = o[0].toInt();
    const double eps = o[1].toDouble(), z_loss = o[2].toDouble();
    const std::optional<double> softcap = o[3].isNone() ? std::nullopt : std::optional<double>(o[3].toDouble());
    const auto red = static_cast<CeReduction>(o[4].toInt());
    const at::Tensor grad_loss = grads[0].defined() ? grads[0]
                                 : red == CeReduction::None ? at::zeros_like(lse)
                                                            : at::zeros({}, lse.options());
    if (at::GradMode::is_enabled()) {
      const at::Tensor rows = ce_row_grad_loss(grad_loss, target, opt(weight), ignore_index, red, lse.scalar_type());
      out[0] = cross_entropy_backward_composite(rows, grads[1], logits, target, weight, ignore_index, eps, z_loss,
                                                softcap);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in DenseFunction::forward
      out[0] = ce_backward_op(o[5].toBool()).call(grad_loss, opt(grads[1]), logits, target, opt(weight), lse,
                                                   ignore_index, eps, z_loss, softcap, reduction_name(red));
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_no_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t ignore_index, double label_smoothing,
                                                             double z_loss, std::optional<double> softcap,
                                                             c10::string_view reduction, c10::string_view backend) {
  return ce_forward_op(is_triton(backend)).call(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                                reduction);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          int64_t ignore_index, double label_smoothing, double z_loss,
                                                          std::optional<double> softcap, c10::string_view reduction,
                                                          c10::string_view backend) {
  check_no_forward_grad({&logits});
  check_weight_not_differentiable(weight, "cross_entropy");
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return cross_entropy_no_autograd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                     reduction, backend);
  }
  auto out = CrossEntropyFunction::apply(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                         reduction, backend);
  return {out[0], out[1]};
}

// The in-place form: the forward overwrites the logits with the gradient of the loss, and tells autograd so:
// their version counter bumps, so a node that saved the old logits raises instead of reading a gradient, and
// their history is rebased onto a node that raises, so that a later use cannot backpropagate into their
// producer as if they were still logits (cross_entropy_inplace_autograd). Not ctx->mark_dirty: autograd
// refuses it for a view (a (B, T, V) output reshaped to (N, V)) in a Function of two outputs. The backward
// scales the written gradient by the upstream one, in place.
class CrossEntropyInplaceFunction : public torch::autograd::Function<CrossEntropyInplaceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                               double z_loss, std::optional<double> softcap, c10::string_view reduction,
                               c10::string_view backend) {
    at::Tensor written = logits;
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in DenseFunction::forward
    auto [loss, lse] = ce_forward_grad_op(is_triton(backend))
                           .call(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction,
                                 written);
    torch::autograd::impl::bump_version(logits);
    ctx->saved_data["grad"] = written;
    ctx->saved_data["version"] = static_cast<int64_t>(written._version());
    ctx->saved_data["rows"] = parse_reduction(reduction) == CeReduction::None;
    ctx->set_materialize_grads(false);
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!grads[1].defined(), "cross_entropy(): with inplace_backward=True, lse has no gradient (the logits "
                "it needs were overwritten); use inplace_backward=False to differentiate lse");
    TORCH_CHECK(!at::GradMode::is_enabled(), "cross_entropy(): inplace_backward=True does not support a "
                "differentiable backward (create_graph=True); use inplace_backward=False");
    variable_list out(9);
    if (!grads[0].defined()) return out;
    at::Tensor grad = ctx->saved_data["grad"].toTensor();
    TORCH_CHECK(grad._version() == ctx->saved_data["version"].toInt(), "cross_entropy(): the gradient that "
                "inplace_backward=True wrote over the logits, needed for gradient computation, has been modified by "
                "an inplace operation (a second backward of the graph, or a write to the logits)");
    const at::Tensor& g = grads[0];
    if (ctx->saved_data["rows"].toBool()) {
      grad.mul_(g.unsqueeze(1));
    } else if (!is_one(g)) {
      grad.mul_(g);
    }
    out[0] = grad;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_inplace_no_autograd(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    c10::string_view backend) {
  return ce_forward_grad_op(is_triton(backend))
      .call(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, logits);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_inplace_autograd(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    c10::string_view backend) {
  check_no_forward_grad({&logits});
  check_weight_not_differentiable(weight, "cross_entropy");
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    std::tuple<at::Tensor, at::Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = cross_entropy_inplace_no_autograd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                              reduction, backend);
    }
    torch::autograd::impl::bump_version(logits);  // as ATen's in-place ops do, with or without autograd
    return out;
  }
  TORCH_CHECK(!logits.is_leaf(), "cross_entropy(): inplace_backward=True overwrites the logits with their "
              "gradient, and a leaf tensor that requires grad cannot be modified in place; pass logits computed "
              "from it (e.g. a layer's output) or use inplace_backward=False");
  auto out = CrossEntropyInplaceFunction::apply(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                                softcap, reduction, backend);
  auto overwritten = c10::make_intrusive<torch::autograd::Error>(
      "cross_entropy(): the logits were overwritten with their gradient by cross_entropy(..., "
      "inplace_backward=True) and cannot be differentiated through after that call",
      torch::autograd::edge_list{});
  overwritten->add_input_metadata(logits);
  torch::autograd::impl::rebase_history(logits, torch::autograd::Edge(overwritten, 0));
  return {out[0], out[1]};
}

// ---- linear_cross_entropy -------------------------------------------------------------------------------

using LinearCeForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, int64_t, double, double, std::optional<double>, c10::string_view, int64_t,
    std::array<bool, 3>, c10::string_view);
using LinearCeBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
    double, double, std::optional<double>, int64_t, std::array<bool, 3>, c10::string_view);

c10::TypedOperatorHandle<LinearCeForwardFn> linear_ce_forward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::linear_cross_entropy_forward", "").typed<LinearCeForwardFn>();
  return op;
}

c10::TypedOperatorHandle<LinearCeBackwardFn> linear_ce_backward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::linear_cross_entropy_backward", "").typed<LinearCeBackwardFn>();
  return op;
}

// One autograd node. For "mean"/"sum" the forward also computes the gradients of the loss (the logits are
// computed once) and the backward scales them by the upstream scalar; per-row upstream gradients ("none",
// or one reaching lse) go through the backward op, which recomputes each chunk's logits.
class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                               double label_smoothing, double z_loss, std::optional<double> softcap,
                               c10::string_view reduction, int64_t chunk_size, c10::string_view backend) {
    const bool precompute = reduction != "none";
    const std::array<bool, 3> mask = {precompute && hidden.requires_grad(), precompute && weight.requires_grad(),
                                      precompute && bias.has_value() && bias->requires_grad()};
    auto [loss, lse, dh, dw, db] = linear_ce_forward_op().call(hidden, weight, bias, target, class_weight,
                                                               ignore_index, label_smoothing, z_loss, softcap,
                                                               reduction, chunk_size, mask, backend);
    ctx->save_for_backward({hidden, weight, bias.value_or(at::Tensor()), target, class_weight.value_or(at::Tensor()),
                            lse, dh, dw, db});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["softcap"] = softcap ? c10::IValue(*softcap) : c10::IValue();
    ctx->saved_data["precompute"] = precompute;
    ctx->set_materialize_grads(false);  // an output with no gradient must not cost a recompute pass
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->saved_data["backend"] = std::string(backend);
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "linear_cross_entropy(): double backward (create_graph=True) is not "
                "supported; compute the loss as cross_entropy(hidden @ weight.T + bias, target) for higher-order "
                "gradients");
    variable_list out(12);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &bias = saved[2], &target = saved[3];
    const at::Tensor &class_weight = saved[4], &lse = saved[5];
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      bias.defined() && ctx->needs_input_grad(2)};
    const bool precompute = ctx->saved_data["precompute"].toBool();
    at::Tensor dh, dw, db;
    if (precompute && grads[0].defined()) {
      if (mask[0]) dh = saved[6] * grads[0];
      if (mask[1]) dw = saved[7] * grads[0];
      if (mask[2]) db = saved[8] * grads[0];
    }
    if (grads[1].defined() || (!precompute && grads[0].defined())) {
      const auto& cap = ctx->saved_data["softcap"];
      auto [rh, rw, rb] = linear_ce_backward_op().call(
          precompute ? std::nullopt : opt(grads[0]), opt(grads[1]), hidden, weight, opt(bias), target,
          opt(class_weight), lse, ctx->saved_data["ignore_index"].toInt(),
          ctx->saved_data["label_smoothing"].toDouble(), ctx->saved_data["z_loss"].toDouble(),
          cap.isNone() ? std::nullopt : std::optional<double>(cap.toDouble()), ctx->saved_data["chunk_size"].toInt(),
          mask, ctx->saved_data["backend"].toStringRef());
      dh = dh.defined() ? dh + rh : rh;
      dw = dw.defined() ? dw + rw : rw;
      db = db.defined() ? db + rb : rb;
    }
    out[0] = dh.defined() ? dh.to(hidden.scalar_type()) : dh;
    out[1] = dw.defined() ? dw.to(weight.scalar_type()) : dw;
    out[2] = db.defined() ? db.to(bias.scalar_type()) : db;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_no_autograd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    int64_t chunk_size, c10::string_view backend) {
  auto out = linear_ce_forward_op().call(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                         z_loss, softcap, reduction, chunk_size, {false, false, false}, backend);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_autograd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    int64_t chunk_size, c10::string_view backend) {
  const at::Tensor no_bias;
  check_no_forward_grad({&hidden, &weight, bias.has_value() ? &*bias : &no_bias});
  check_weight_not_differentiable(class_weight, "linear_cross_entropy");
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_cross_entropy_no_autograd(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                            z_loss, softcap, reduction, chunk_size, backend);
  }
  auto out = LinearCrossEntropyFunction::apply(hidden, weight, bias, target, class_weight, ignore_index,
                                               label_smoothing, z_loss, softcap, reduction, chunk_size, backend);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY(fusedlayers, m) {
  m.def("dense(Tensor x, Tensor weight, Tensor? bias, str activation, bool save_preact, str backend) -> Tensor");
  // Returns (y, preact); preact is z = x @ weight.T + bias when save_preact and f' is not constant, else an
  // empty tensor.
  // In the backward, preact None means: recompute it from x, weight and bias where f' needs it.
#define FL_DEF_DENSE_KERNELS(prefix)                                                                          \
  m.def(prefix "dense_forward(Tensor x, Tensor weight, Tensor? bias, str activation, bool save_preact) "        \
               "-> (Tensor, Tensor)");                                                                        \
  m.def(prefix "dense_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? preact, "         \
               "str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  FL_DEF_DENSE_KERNELS("")
  FL_DEF_DENSE_KERNELS("triton_")
#undef FL_DEF_DENSE_KERNELS

  // A whole network of dense layers: layer l computes h_{l+1} = activations[l](h_l @ weights[l].T + biases[l]),
  // h_0 = x. biases is empty (no biases) or has one per layer.
  m.def("mlp(Tensor x, Tensor[] weights, Tensor[] biases, str[] activations, bool save, str backend) -> Tensor");
  // Returns (y, saved): with save, saved = [z_0, ..., z_{L-1}], the pre-activation of every layer (shape
  // (*batch, out_l)), from which the backward gets h_l = f(z_{l-1}); without, saved is empty and the backward
  // recomputes the forward. Backward returns (dx or undefined without input_grad, [dW_l], [db_l] or []).
#define FL_DEF_MLP_KERNELS(prefix)                                                                              \
  m.def(prefix "mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, str[] activations, bool save) "         \
               "-> (Tensor, Tensor[])");                                                                      \
  m.def(prefix "mlp_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] saved, "     \
               "str[] activations, bool input_grad) -> (Tensor, Tensor[], Tensor[])");
  FL_DEF_MLP_KERNELS("")
  FL_DEF_MLP_KERNELS("triton_")
#undef FL_DEF_MLP_KERNELS

  // The second-order Taylor jet of an mlp along a direction: for u = mlp(x), (u, du, d2u) with, row by row,
  // du = J u . direction and d2u = direction^T (Hessian of u) direction (one input feature and direction 1:
  // u, du/dx, d2u/dx2). direction broadcasts to x's shape. One autograd node (csrc/mlp_jet.cpp); the kernels
  // save [jet of each layer's input, jet of each layer's pre-activation], (3, rows, width) each, and the
  // backward returns (dx, ddirection, [dW_l], [db_l]), undefined or empty where output_mask (x, direction,
  // parameters) is false.
  m.def("mlp_jet(Tensor x, Tensor direction, Tensor[] weights, Tensor[] biases, str[] activations) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mlp_jet_forward(Tensor x, Tensor direction, Tensor[] weights, Tensor[] biases, str[] activations) "
        "-> (Tensor, Tensor, Tensor, Tensor[])");
  m.def("mlp_jet_backward(Tensor? grad_u, Tensor? grad_du, Tensor? grad_d2u, Tensor x, Tensor direction, "
        "Tensor[] weights, Tensor[] biases, Tensor[] saved, str[] activations, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor[], Tensor[])");
  // The same jet as a composite of ATen ops and activation_derivative: what torch.func and forward-mode AD run.
  m.def("mlp_jet_composite(Tensor x, Tensor direction, Tensor[] weights, Tensor[] biases, str[] activations) "
        "-> (Tensor, Tensor, Tensor)");

  // Higher-order gradients. activation_derivative(z, activation, order) is f^(order)(z) elementwise (order 0
  // is f): orders 0 to 3 from the activation table's kernels, 4 and up (its Autograd kernel routes them)
  // from activation_derivative_formula, the torch formulas of fusedlayers/activations.py differentiated by
  // autograd (a Python CompositeImplicitAutograd kernel). Its autograd gives order + 1: every order is exact.
  m.def("activation_derivative(Tensor z, str activation, int order) -> Tensor");
  m.def("activation_derivative_formula(Tensor z, str activation, int order) -> Tensor");
  // grad * activation_derivative(z, activation, order), z and grad of one shape: one node and one pass.
  m.def("activation_grad(Tensor grad, Tensor z, str activation, int order) -> Tensor");
  // The gradients of dense and mlp as a composite of differentiable ops: the backward under create_graph
  // and torch.func. Unwanted outputs are undefined (None); mlp_grad's lists are empty without params_grad.
  m.def("dense_grad(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, str activation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mlp_grad(Tensor grad_out, Tensor x, Tensor[] weights, Tensor[] biases, str[] activations, "
        "bool input_grad, bool params_grad) -> (Tensor, Tensor[], Tensor[])");

  // Softmax cross-entropy, one row per sample: logits (N, C) contiguous, target (N,) int64, weight (C,) or
  // None, one device. Math in float32 (float64 for float64 logits). With z = softcap * tanh(logits / softcap)
  // (z = logits when softcap is None), w = weight (ones when None), W = sum(w), eps = label_smoothing,
  // t = target[i], kept = t != ignore_index (a kept t outside [0, C) is an error: raised on CPU, a
  // device-side assert on CUDA, never a host synchronization):
  //   lse[i]  = logsumexp(z[i])
  //   loss[i] = kept * (w[t] * ((1 - eps) * (lse[i] - z[i, t]) + z_loss * lse[i]^2)
  //                     + eps / C * sum_c w[c] * (lse[i] - z[i, c]))
  // loss and lse are (N,) in the math dtype. The backward returns d(sum_i grad_loss[i] * loss[i] +
  // grad_lse[i] * lse[i]) / d logits, (N, C) in the logits' dtype, with p = softmax(z[i]):
  //   kept * grad_loss[i] * (w[t] * ((1 - eps) * (p - onehot(t)) + 2 * z_loss * lse[i] * p)
  //                          + eps / C * (W * p - w)) + grad_lse[i] * p,
  // times 1 - tanh(logits / softcap)^2 with a softcap. grad_lse None means zero.
  // reduction ("none", "mean" or "sum") reduces the loss as F.cross_entropy does: "mean" divides the sum by the
  // summed class weights of the kept rows (their count without weights; nan when none is kept). The forward
  // returns (loss, lse), loss (N,) or 0-d; the backward takes grad_loss of that shape. cross_entropy_forward_grad
  // also writes the gradient of the loss (grad_loss 1, grad_lse 0) into grad, which may be the logits themselves
  // (each row is read before it is written).
#define FL_DEF_CE_KERNELS(prefix)                                                                               \
  m.def(prefix "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "          \
               "float label_smoothing, float z_loss, float? softcap, str reduction) -> (Tensor, Tensor)");      \
  m.def(prefix "cross_entropy_forward_grad(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "      \
               "float label_smoothing, float z_loss, float? softcap, str reduction, Tensor(a!) grad) "          \
               "-> (Tensor, Tensor)");                                                                           \
  m.def(prefix "cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, "       \
               "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "             \
               "float? softcap, str reduction) -> Tensor");
  // The differentiable ops, one autograd node each: (loss, lse) of the kernels below, the reduction included.
  // cross_entropy_ overwrites the logits with their gradient (declared: they are marked dirty to autograd);
  // its backward scales them by the upstream gradient, and lse has no gradient.
  m.def("cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
        "float z_loss, float? softcap, str reduction, str backend) -> (Tensor, Tensor)");
  m.def("cross_entropy_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, float z_loss, float? softcap, str reduction, str backend) -> (Tensor, Tensor)");
  FL_DEF_CE_KERNELS("")
  FL_DEF_CE_KERNELS("triton_")
#undef FL_DEF_CE_KERNELS

  // Cross-entropy of logits = hidden @ weight.T + bias (hidden (N, H), weight (V, H), bias (V,)) over chunks of
  // chunk_size rows, never the whole (N, V) logits; class_weight, ignore_index, ... as above. Returns (loss, lse):
  // loss (N,) for reduction "none", else the reduced 0-d loss ("mean": divided by the summed class weights of
  // the kept rows); lse (N,). Loss and lse in the math dtype.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
        "int ignore_index, float label_smoothing, float z_loss, float? softcap, str reduction, int chunk_size, "
        "str backend) -> (Tensor, Tensor)");
  // Device-generic (ATen GEMMs + the backend's cross_entropy kernels). The forward returns (loss, lse, dh, dw,
  // db): with output_mask (only for "mean"/"sum") the gradients of the loss w.r.t. hidden, weight and bias,
  // else undefined; the backward returns (dh, dw, db) of sum(grad_loss * loss + grad_lse * lse) over the rows
  // (grad_loss None: zero), recomputing each chunk's logits. dw and db are in the math dtype.
  m.def("linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
        "Tensor? class_weight, int ignore_index, float label_smoothing, float z_loss, float? softcap, str reduction, "
        "int chunk_size, bool[3] output_mask, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_backward(Tensor? grad_loss, Tensor? grad_lse, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor target, Tensor? class_weight, Tensor lse, int ignore_index, float label_smoothing, "
        "float z_loss, float? softcap, int chunk_size, bool[3] output_mask, str backend) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, Autograd, m) {
  m.impl("dense", &fusedlayers::dense_autograd);
  m.impl("mlp", &fusedlayers::mlp_autograd);
  m.impl("cross_entropy", &fusedlayers::cross_entropy_autograd);
  m.impl("cross_entropy_", &fusedlayers::cross_entropy_inplace_autograd);
  m.impl("linear_cross_entropy", &fusedlayers::linear_cross_entropy_autograd);
  m.impl("activation_derivative", &fusedlayers::derivative_autograd);
  m.impl("activation_grad", &fusedlayers::activation_grad_autograd);
  // The kernels are not differentiable (dense_grad and mlp_grad are what a higher-order gradient goes
  // through): backpropagating through one raises, never a silent zero.
  for (const char* op : {"dense_forward", "dense_backward", "triton_dense_forward", "triton_dense_backward",
                         "mlp_forward", "mlp_backward", "triton_mlp_forward", "triton_mlp_backward",
                         "cross_entropy_forward", "cross_entropy_forward_grad", "cross_entropy_backward",
                         "triton_cross_entropy_forward", "triton_cross_entropy_forward_grad",
                         "triton_cross_entropy_backward", "linear_cross_entropy_forward",
                         "linear_cross_entropy_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(fusedlayers, CompositeImplicitAutograd, m) {
  m.impl("dense_grad", &fusedlayers::dense_grad);
  m.impl("mlp_grad", &fusedlayers::mlp_grad);
}

// Under vmap the composites decompose too (as functorch does for ATen's), so their ops batch with their own
// rules instead of a per-sample loop.
TORCH_LIBRARY_IMPL(fusedlayers, FuncTorchBatchedDecomposition, m) {
  m.impl("dense_grad", &fusedlayers::dense_grad);
  m.impl("mlp_grad", &fusedlayers::mlp_grad);
}

TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  m.impl("dense", &fusedlayers::dense_no_autograd);
  m.impl("mlp", &fusedlayers::mlp_no_autograd);
  m.impl("cross_entropy", &fusedlayers::cross_entropy_no_autograd);
  m.impl("cross_entropy_", &fusedlayers::cross_entropy_inplace_no_autograd);
  m.impl("linear_cross_entropy", &fusedlayers::linear_cross_entropy_no_autograd);
}
