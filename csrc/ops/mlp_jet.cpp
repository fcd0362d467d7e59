// mlp_jet: an mlp's value and its first and second derivatives along a direction, in one forward pass
// (second-order Taylor mode) and one backward pass, with one autograd node.
//
// A physics-informed loss holds u'' of the network. Reverse mode gets it by two create_graph gradients, whose
// graphs the training step then differentiates once more: hundreds of small ops. Here every layer carries the
// jet (h, h', h''): with z = W h + b, z' = W h', z'' = W h'',
//   f(z),   f'(z) z',   f''(z) z'^2 + f'(z) z''
// so each layer is one GEMM over the three stacked planes and one elementwise pass, and the backward is the
// transpose of that: the vector-Jacobian product of the elementwise step needs f''' (activations.h).
// This file holds the device-generic kernels (ATen ops; the CPU's fused elementwise loops are in
// csrc/cpu/mlp_jet.cpp), the composite for torch.func and the autograd.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "ops/mlp_jet.h"

namespace fusedlayers {

void check_jet_args(const at::Tensor& x, const at::Tensor& direction, at::TensorList weights, at::TensorList biases,
                    size_t num_activations) {
  check_mlp_args(x, weights, biases, num_activations, "mlp_jet");
  TORCH_CHECK(direction.scalar_type() == x.scalar_type(), "mlp_jet(): expected direction to have the dtype of x (",
              py(x.scalar_type()), "), got ", py(direction.scalar_type()));
  TORCH_CHECK(direction.device() == x.device(), "mlp_jet(): expected direction on the device of x (", x.device(),
              "), got ", direction.device());
  bool broadcasts = direction.dim() <= x.dim();
  for (int64_t i = 1; broadcasts && i <= direction.dim(); ++i) {
    broadcasts = direction.size(-i) == 1 || direction.size(-i) == x.size(-i);
  }
  TORCH_CHECK(broadcasts, "mlp_jet(): expected direction of a shape that broadcasts to the shape of x ", x.sizes(),
              ", got ", direction.sizes());
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// f'' and f''' of a piecewise-linear activation are zero: their terms are left out, not multiplied (an inf z1
// would make them NaN), as the cpu kernels (cpu/isa/jet.h) and torch's own derivatives do.
at::Tensor composite_jet_activation(const at::Tensor& z, const std::string& activation, bool z2_zero) {
  const Activation a = parse_activation(activation);
  if (a == Activation::Identity) return z;
  const at::Tensor z0 = z.select(0, 0), z1 = z.select(0, 1), z2 = z.select(0, 2);
  const at::Tensor d1 = derivative(z0, activation, 1);
  at::Tensor h2 = z2_zero ? at::zeros_like(z2) : d1 * z2;
  if (!derivative_is_zero(a, 2)) h2 = derivative(z0, activation, 2) * z1 * z1 + h2;
  return at::stack({derivative(z0, activation, 0), d1 * z1, h2});
}

at::Tensor composite_jet_activation_backward(const at::Tensor& g, const at::Tensor& z, const std::string& activation,
                                             bool z2_zero) {
  const Activation a = parse_activation(activation);
  if (a == Activation::Identity) return g;
  const at::Tensor z0 = z.select(0, 0), z1 = z.select(0, 1), z2 = z.select(0, 2);
  const at::Tensor g0 = g.select(0, 0), g1 = g.select(0, 1), g2 = g.select(0, 2);
  const at::Tensor d1 = derivative(z0, activation, 1);
  at::Tensor dz0 = derivative_times(g0, z0, activation, 1), dz1 = g1 * d1;  // relu selects on g0, as torch's
  if (!derivative_is_zero(a, 2)) {
    const at::Tensor d2 = derivative(z0, activation, 2), d3 = derivative(z0, activation, 3);
    dz0 = dz0 + g1 * z1 * d2 + (g2 * z1) * (z1 * d3);  // z1 * z1 never formed: as cpu/isa/jet.h
    if (!z2_zero) dz0 = dz0 + g2 * z2 * d2;
    dz1 = dz1 + 2 * g2 * d2 * z1;
  }
  return at::stack({dz0, dz1, g2 * d1});
}

struct JetLayers {
  std::vector<at::Tensor> inputs, preacts;  // per layer, (3, rows, in_l) and (3, rows, out_l)
  at::Tensor out;                           // (3, rows, out)
};

JetLayers jet_forward(const at::Tensor& x, const at::Tensor& direction, at::TensorList weights,
                      at::TensorList biases, const std::vector<std::string>& activations, const JetStep& step) {
  const int64_t rows = dense_rows(x), in = x.size(-1);
  JetLayers jet;
  // The d2 plane is zero by construction up to the first curved activation (not piecewise linear): the input's
  // jet is (x, direction, 0). Until then the layers carry (h, h') alone, and their pre-activations a d2 plane of
  // zeros, never W 0 or f' 0 (NaN at an inf weight or a NaN pre-activation), as torch's forward mode never forms
  // those products.
  at::Tensor h = at::stack({x.reshape({rows, in}), direction.expand(x.sizes()).reshape({rows, in})});
  for (size_t l = 0; l < weights.size(); ++l) {
    at::Tensor z = at::matmul(h, weights[l].t());
    const bool flat = h.size(0) == 2;  // the d2 plane is zero so far
    if (flat) z = at::cat({z, at::zeros_like(z.narrow(0, 0, 1))});
    if (!biases.empty() && step.bias_in_place) {
      z.select(0, 0).add_(biases[l]);
    } else if (!biases.empty()) {  // out of place: vmap cannot add a batched bias into an unbatched z in place
      z = at::cat({(z.select(0, 0) + biases[l]).unsqueeze(0), z.narrow(0, 1, 2)});
    }
    jet.inputs.push_back(h);
    jet.preacts.push_back(z);
    h = step.forward(z, activations[l], flat);
    if (flat && derivative_is_zero(parse_activation(activations[l]), 2)) h = h.narrow(0, 0, 2);
  }
  jet.out = h.size(0) == 3 ? h : at::cat({h, at::zeros_like(h.narrow(0, 0, 1))});
  return jet;
}

// grad: (3, rows, out), the gradients of the output jet. mask: x, direction, the parameters.
JetGrads jet_backward(at::Tensor grad, const at::Tensor& x, const at::Tensor& direction, at::TensorList weights,
                      bool has_bias, const JetLayers& jet, const std::vector<std::string>& activations,
                      std::array<bool, 3> mask, const JetStep& step) {
  const size_t L = weights.size();
  std::vector<at::Tensor> dweights(mask[2] ? L : 0), dbiases(mask[2] && has_bias ? L : 0);
  at::Tensor dx, ddirection;
  for (size_t l = L; l-- > 0;) {
    const int64_t planes = jet.inputs[l].size(0);
    const at::Tensor dz = step.backward(grad, jet.preacts[l], activations[l], /*z2_zero=*/planes == 2);
    if (mask[2]) {  // one GEMM per plane, then their sum, as PyTorch's graph: one GEMM over every plane's rows
                    // adds the later planes' small terms to a large running sum (8 eps against PyTorch's 1.4 at
                    // 169 rows: the long run)
      dweights[l] = at::mm(dz.select(0, 0).t(), jet.inputs[l].select(0, 0));
      for (int64_t p = 1; p < planes; ++p) dweights[l].add_(at::mm(dz.select(0, p).t(), jet.inputs[l].select(0, p)));
    }
    if (mask[2] && has_bias) dbiases[l] = dz.select(0, 0).sum(0);
    if (l > 0) {
      grad = at::matmul(dz.narrow(0, 0, planes), weights[l]);
      if (planes == 2) grad = at::cat({grad, at::zeros_like(grad.narrow(0, 0, 1))});  // below: the d2 plane is 0
    } else {  // the input's jet is (x, direction): two GEMMs of their own, so dx and ddirection do not alias
      if (mask[0]) dx = at::mm(dz.select(0, 0), weights[0]).reshape(x.sizes());
      if (mask[1]) ddirection = at::sum_to(at::mm(dz.select(0, 1), weights[0]).reshape(x.sizes()), direction.sizes());
    }
  }
  return {dx, ddirection, dweights, dbiases};
}

// The grads of (u, du, d2u), undefined ones as zeros, stacked like a jet of `rows` rows and `out` columns.
at::Tensor stack_grads(const at::Tensor& g0, const at::Tensor& g1, const at::Tensor& g2, int64_t rows, int64_t out,
                       const at::TensorOptions& options) {
  auto plane = [&](const at::Tensor& g) {
    return g.defined() ? g.reshape({rows, out}) : at::zeros({rows, out}, options);
  };
  return at::stack({plane(g0), plane(g1), plane(g2)});
}

// (u, du, d2u), copies: views of the jet would alias each other and the saved tensors.
std::vector<at::Tensor> jet_outputs(const JetLayers& jet, const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out);
  return {jet.out.select(0, 0).reshape(shape).clone(), jet.out.select(0, 1).reshape(shape).clone(),
          jet.out.select(0, 2).reshape(shape).clone()};
}

}  // namespace

// ---- the kernels: the composite step here (any device), the CPU's fused loops in csrc/cpu/mlp_jet.cpp ------

const JetStep kCompositeJetStep{&composite_jet_activation, &composite_jet_activation_backward,
                                /*bias_in_place=*/false};

JetForwardResult jet_forward_kernel(const at::Tensor& x, const at::Tensor& direction, at::TensorList weights,
                                    at::TensorList biases, const std::vector<std::string>& activations,
                                    const JetStep& step) {
  check_jet_args(x, direction, weights, biases, activations.size());
  JetLayers jet = jet_forward(x, direction, weights, biases, activations, step);
  auto u = jet_outputs(jet, x, weights.back().size(0));
  std::vector<at::Tensor> saved = std::move(jet.inputs);
  saved.insert(saved.end(), jet.preacts.begin(), jet.preacts.end());
  // After a hidden identity layer the next input is (a view of) that layer's pre-activation: outputs of an op
  // must not alias.
  for (size_t i = 0; i < saved.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (saved[i].is_alias_of(saved[j])) saved[i] = saved[i].clone();
    }
  }
  return {u[0], u[1], u[2], saved};
}

JetGrads jet_backward_kernel(const std::optional<at::Tensor>& grad_u, const std::optional<at::Tensor>& grad_du,
                             const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x,
                             const at::Tensor& direction, at::TensorList weights, at::TensorList biases,
                             at::TensorList saved, const std::vector<std::string>& activations,
                             std::array<bool, 3> mask, const JetStep& step) {
  check_jet_args(x, direction, weights, biases, activations.size());
  const size_t L = weights.size();
  TORCH_CHECK(saved.size() == 2 * L, "mlp_jet_backward(): saved has ", saved.size(), " tensors, expected ", 2 * L);
  JetLayers jet;
  jet.inputs.assign(saved.begin(), saved.begin() + L);
  jet.preacts.assign(saved.begin() + L, saved.end());
  const at::Tensor grad = stack_grads(grad_u.value_or(at::Tensor()), grad_du.value_or(at::Tensor()),
                                      grad_d2u.value_or(at::Tensor()), dense_rows(x), weights.back().size(0),
                                      x.options());
  return jet_backward(grad, x, direction, weights, !biases.empty(), jet, activations, mask, step);
}

namespace {

JetForwardResult mlp_jet_forward(const at::Tensor& x, const at::Tensor& direction, at::TensorList weights,
                                 at::TensorList biases, std::vector<std::string> activations) {
  return jet_forward_kernel(x, direction, weights, biases, activations, kCompositeJetStep);
}

JetGrads mlp_jet_backward(const std::optional<at::Tensor>& grad_u, const std::optional<at::Tensor>& grad_du,
                          const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x, const at::Tensor& direction,
                          at::TensorList weights, at::TensorList biases, at::TensorList saved,
                          std::vector<std::string> activations, std::array<bool, 3> mask) {
  return jet_backward_kernel(grad_u, grad_du, grad_d2u, x, direction, weights, biases, saved, activations, mask,
                             kCompositeJetStep);
}

// Under torch.func transforms and forward-mode AD (fusedlayers.functional routes those calls here): the jet in
// ATen ops and activation_derivative, which every transform composes through (vmap by their batching rules).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_jet_composite(const at::Tensor& x, const at::Tensor& direction,
                                                                  at::TensorList weights, at::TensorList biases,
                                                                  std::vector<std::string> activations) {
  check_jet_args(x, direction, weights, biases, activations.size());
  const JetLayers jet = jet_forward(x, direction, weights, biases, activations, kCompositeJetStep);
  auto u = jet_outputs(jet, x, weights.back().size(0));
  return {u[0], u[1], u[2]};
}

// ---- autograd -------------------------------------------------------------------------------------------

using ForwardFn = JetForwardResult(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, std::vector<std::string>);
using BackwardFn = JetGrads(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, at::TensorList,
                            at::TensorList, at::TensorList, std::vector<std::string>, std::array<bool, 3>);

// The kernels through the dispatcher, which picks the device's (csrc/cpu/mlp_jet.cpp, else the composite here).
const c10::TypedOperatorHandle<ForwardFn>& jet_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::mlp_jet_forward", "").typed<ForwardFn>();
  return op;
}

// The backward is the mlp_jet_backward kernel; under create_graph it recomputes the jet with differentiable
// ops (saved tensors carry no graph) and differentiates that, so every higher order is exact.
class MlpJetFunction : public torch::autograd::Function<MlpJetFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& direction,
                               at::TensorList weights, at::TensorList biases, std::vector<std::string> activations) {
    auto [u, du, d2u, saved] = jet_forward_op().call(x, direction, weights, biases, activations);
    std::vector<at::Tensor> keep{x, direction};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), biases.begin(), biases.end());
    keep.insert(keep.end(), saved.begin(), saved.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["biases"] = !biases.empty();
    ctx->saved_data["activations"] = c10::List<std::string>(activations);
    ctx->set_materialize_grads(false);
    return {u, du, d2u};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const size_t L = ctx->saved_data["layers"].toInt();
    const size_t B = ctx->saved_data["biases"].toBool() ? L : 0;
    std::vector<std::string> activations;
    for (const auto& a : ctx->saved_data["activations"].toListRef()) activations.push_back(a.toStringRef());
    const at::Tensor &x = saved[0], &direction = saved[1];
    const std::vector<at::Tensor> weights(saved.begin() + 2, saved.begin() + 2 + L);
    const std::vector<at::Tensor> biases(saved.begin() + 2 + L, saved.begin() + 2 + L + B);
    bool params = false;
    for (size_t i = 0; i < L + B; ++i) params = params || ctx->needs_input_grad(2 + i);
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), params};
    variable_list out(2 + L + B + 1);
    if (!(grads[0].defined() || grads[1].defined() || grads[2].defined())) return out;
    at::Tensor dx, ddirection;
    std::vector<at::Tensor> dweights, dbiases;
    if (at::GradMode::is_enabled()) {
      const JetLayers jet = jet_forward(x, direction, weights, biases, activations, kCompositeJetStep);
      const at::Tensor grad = stack_grads(grads[0], grads[1], grads[2], jet.out.size(1), jet.out.size(2),
                                          jet.out.options());
      std::tie(dx, ddirection, dweights, dbiases) =
          jet_backward(grad, x, direction, weights, B > 0, jet, activations, mask, kCompositeJetStep);
    } else {
      static auto op =
          c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::mlp_jet_backward", "").typed<BackwardFn>();
      const std::vector<at::Tensor> layers(saved.begin() + 2 + L + B, saved.end());
      std::tie(dx, ddirection, dweights, dbiases) = op.call(opt(grads[0]), opt(grads[1]), opt(grads[2]), x,
                                                            direction, weights, biases, layers, activations, mask);
    }
    out[0] = dx;
    out[1] = ddirection;
    for (size_t i = 0; i < dweights.size(); ++i) out[2 + i] = dweights[i];
    for (size_t i = 0; i < dbiases.size(); ++i) out[2 + L + i] = dbiases[i];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_jet_no_autograd(const at::Tensor& x, const at::Tensor& direction,
                                                                    at::TensorList weights, at::TensorList biases,
                                                                    std::vector<std::string> activations) {
  auto [u, du, d2u, saved] = jet_forward_op().call(x, direction, weights, biases, std::move(activations));
  return {u, du, d2u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_jet_autograd(const at::Tensor& x, const at::Tensor& direction,
                                                                 at::TensorList weights, at::TensorList biases,
                                                                 std::vector<std::string> activations) {
  bool dual = x._fw_grad(/*level=*/0).defined() || direction._fw_grad(/*level=*/0).defined();
  bool needs_grad = x.requires_grad() || direction.requires_grad();
  for (at::TensorList list : {weights, biases}) {
    for (const auto& t : list) {
      dual = dual || t._fw_grad(/*level=*/0).defined();
      needs_grad = needs_grad || t.requires_grad();
    }
  }
  TORCH_CHECK(!dual, "the raw mlp_jet op does not support forward-mode AD (torch.func.jvp, jacfwd, forward_ad): call "
              "it through fusedlayers.functional.mlp_jet or FusedMLP.jet, which do");
  if (!(at::GradMode::is_enabled() && needs_grad)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mlp_jet_no_autograd(x, direction, weights, biases, std::move(activations));
  }
  auto out = MlpJetFunction::apply(x, direction, weights, biases, std::move(activations));
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // The second-order Taylor jet of an mlp along a direction: for u = mlp(x), (u, du, d2u) with, row by row,
  // du = J u . direction and d2u = direction^T (Hessian of u) direction (one input feature and direction 1:
  // u, du/dx, d2u/dx2). direction broadcasts to x's shape. One autograd node; the kernels
  // save [jet of each layer's input, jet of each layer's pre-activation], (3, rows, width) each (an input
  // (2, rows, width) up to the first activation that is not piecewise linear: its d2 plane is 0), and the
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

  fusedlayers::impl_differentiable(m, "mlp_jet", &fusedlayers::mlp_jet_autograd, &fusedlayers::mlp_jet_no_autograd);
  // Not differentiable themselves: higher orders go through MlpJetFunction's composite.
  for (const char* kernel : {"mlp_jet_forward", "mlp_jet_backward"}) {
    m.impl(kernel, torch::dispatch(c10::DispatchKey::Autograd, torch::autograd::autogradNotImplementedFallback()));
  }
  fusedlayers::impl_composite(m, "mlp_jet_composite", &fusedlayers::mlp_jet_composite);
}

// The kernels for any device without kernels of its own (the CPU's: csrc/cpu/mlp_jet.cpp).
TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  m.impl("mlp_jet_forward", &fusedlayers::mlp_jet_forward);
  m.impl("mlp_jet_backward", &fusedlayers::mlp_jet_backward);
}
