// The activation family's ops: f^(order)(z) and grad * f^(order)(z), the differentiable pieces of every
// higher-order gradient, and the activation table as the extension sees it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "ops/activation.h"

namespace fusedlayers {
namespace {

using torch::autograd::variable_list;

using DerivativeFn = at::Tensor(const at::Tensor&, c10::string_view, int64_t);

// Orders 0-3 are the activation table's kernels; higher orders the torch formulas (registered from Python).
c10::TypedOperatorHandle<DerivativeFn> derivative_op(int64_t order) {
  static auto table = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::activation_derivative", "").typed<DerivativeFn>();
  static auto formula = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::activation_derivative_formula", "").typed<DerivativeFn>();
  return order <= kMaxTableOrder ? table : formula;
}

using GradTimesFn = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, int64_t);

c10::TypedOperatorHandle<GradTimesFn> activation_grad_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::activation_grad", "").typed<GradTimesFn>();
  return op;
}

}  // namespace

at::Tensor derivative(const at::Tensor& z, c10::string_view activation, int64_t order) {
  return derivative_op(order).call(z, activation, order);
}

at::Tensor derivative_times(const at::Tensor& grad, const at::Tensor& z, c10::string_view activation, int64_t order) {
  if (derivative_is_zero(parse_activation(activation), order)) return at::zeros_like(grad);
  return activation_grad_op().call(grad, z, activation, order);
}

namespace {

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

// The C++ activation table (activations.h), for the test that compares it with fusedlayers/activations.py.
std::tuple<std::vector<std::string>, c10::List<bool>, c10::List<bool>> activation_table() {
  std::vector<std::string> names(kActivationNames, kActivationNames + kNumActivations);
  c10::List<bool> constant, piecewise_linear;
  for (bool c : kConstantDerivative) constant.push_back(c);
  for (bool p : kPiecewiseLinear) piecewise_linear.push_back(p);
  return {names, constant, piecewise_linear};
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // Higher-order gradients. activation_derivative(z, activation, order) is f^(order)(z) elementwise (order 0
  // is f): orders 0 to 3 from the activation table's kernels, 4 and up (its Autograd kernel routes them)
  // from activation_derivative_formula, the torch formulas of fusedlayers/activations.py differentiated by
  // autograd (a Python CompositeImplicitAutograd kernel). Its autograd gives order + 1: every order is exact.
  m.def("activation_derivative(Tensor z, str activation, int order) -> Tensor");
  m.def("activation_derivative_formula(Tensor z, str activation, int order) -> Tensor");
  // grad * activation_derivative(z, activation, order), z and grad of one shape: one node and one pass.
  m.def("activation_grad(Tensor grad, Tensor z, str activation, int order) -> Tensor");
  // (names, f' is constant, piecewise linear) of every activation, in the table's order.
  m.def("activation_table() -> (str[], bool[], bool[])", &fusedlayers::activation_table);
}

TORCH_LIBRARY_IMPL(fusedlayers, Autograd, m) {
  m.impl("activation_derivative", &fusedlayers::derivative_autograd);
  m.impl("activation_grad", &fusedlayers::activation_grad_autograd);
}
