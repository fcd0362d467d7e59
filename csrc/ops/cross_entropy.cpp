// The cross-entropy family: softmax cross-entropy and its reduction as one op with one autograd node (and an
// in-place form that overwrites the logits with their gradient), its kernels' schemas (every backend's), and
// the backward formula as differentiable ATen ops for create_graph.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "backend.h"
#include "ops/cross_entropy.h"

namespace fusedlayers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The backward formula of the contract (at the cross_entropy_forward schema) in differentiable ATen ops, for
// a backward that is itself differentiated (create_graph): exact at every order, in logits, grad_loss and
// grad_lse.
at::Tensor cross_entropy_backward_composite(const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                                            const at::Tensor& logits, const at::Tensor& target,
                                            const at::Tensor& weight, int64_t ignore_index, double eps, double z_loss,
                                            std::optional<double> softcap) {
  const int64_t C = logits.size(1);
  if (C == 0) return at::zeros_like(logits);  // nothing to differentiate, and no class for one_hot
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.to(math);
  const at::Tensor z = softcap ? x.div(*softcap).tanh().mul(*softcap) : x;
  const at::Tensor lse = z.logsumexp({1});
  const at::Tensor p = z.softmax(1);  // not exp(z - lse): lse is rounded at the scale of the largest logit
  const at::Tensor kept = target != ignore_index;
  const at::Tensor safe_t = at::where(kept, target, 0);
  const at::Tensor w = weight.defined() ? weight.to(math) : at::Tensor();
  const at::Tensor wt =
      kept_weights(target, w.defined() ? std::optional<at::Tensor>(w) : std::nullopt, ignore_index, math);
  // where, not a product: an all-ignored mean's grad_loss is inf on every (ignored) row.
  const at::Tensor gl = at::where(kept, grad_loss.to(math), 0);
  const at::Tensor W = w.defined() ? w.sum() : at::scalar_tensor(static_cast<double>(C), x.options());
  at::Tensor a = wt * ((1.0 - eps) + 2.0 * z_loss * lse);
  if (eps != 0.0) a = a + eps / C * W;  // only with smoothing, as the kernels: an absent class's inf weight
  a = gl * a;                           // would make 0 * inf a NaN in every gradient
  if (grad_lse.defined()) a = a + grad_lse.to(math);
  at::Tensor grad = a.unsqueeze(1) * p - (gl * wt * (1.0 - eps)).unsqueeze(1) * at::one_hot(safe_t, C).to(math);
  if (eps != 0.0) grad = grad - (gl * (eps / C)).unsqueeze(1) * (w.defined() ? w.unsqueeze(0) : at::ones({1, 1}, x.options()));
  if (softcap) grad = grad * (1 - x.div(*softcap).tanh().square());
  return grad.to(logits.scalar_type());
}

const char* reduction_name(CeReduction r) {
  return r == CeReduction::None ? "none" : r == CeReduction::Mean ? "mean" : "sum";
}

// The options a backward needs, in one saved_data entry: fewer hash-map insertions per call.
c10::IValue ce_options(int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap,
                       CeReduction reduction, Backend backend) {
  return c10::ivalue::Tuple::create({ignore_index, label_smoothing, z_loss,
                                     softcap ? c10::IValue(*softcap) : c10::IValue(),
                                     static_cast<int64_t>(reduction),
                                     static_cast<int64_t>(backend)});
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
    const Backend kernels = parse_backend(backend);
    const CeReduction red = parse_reduction(reduction);
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in dense_autograd (ops/dense.cpp)
    at::Tensor loss, lse;
    // float16 on a GPU recomputes in the backward (precomputed_may_overflow): no gradient here
    if (red != CeReduction::None && !traced(logits) && !(logits.scalar_type() == at::kHalf && !logits.is_cpu())) {
      at::Tensor grad = at::empty(logits.sizes(), logits.options());
      std::tie(loss, lse) = ce_forward_grad_op(kernels).call(logits, target, weight, ignore_index, label_smoothing,
                                                            z_loss, softcap, reduction, grad);
      ctx->saved_data["grad"] = std::move(grad);
    } else {
      std::tie(loss, lse) = ce_forward_op(kernels).call(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                                       softcap, reduction);
    }
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), lse});
    ctx->set_materialize_grads(false);  // the kernel takes grad_lse None as zero, without reading it
    ctx->saved_data["options"] = ce_options(ignore_index, label_smoothing, z_loss, softcap, red, kernels);
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const auto precomputed = ctx->saved_data.find("grad");
    if (precomputed != ctx->saved_data.end() && !grads[1].defined() && !at::GradMode::is_enabled() &&
        !precomputed_may_overflow(precomputed->second.toTensor(), grads[0])) {
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
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in dense_autograd (ops/dense.cpp)
      out[0] = ce_backward_op(static_cast<Backend>(o[5].toInt())).call(grad_loss, opt(grads[1]), logits, target, opt(weight), lse,
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
  return ce_forward_op(parse_backend(backend)).call(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
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
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in dense_autograd (ops/dense.cpp)
    auto [loss, lse] = ce_forward_grad_op(parse_backend(backend))
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
    // handed on by the first backward: a second one (retain_graph or not) would pass it on again, or a tensor
    // that autograd has since accumulated into
    const auto saved = ctx->saved_data.find("grad");
    TORCH_CHECK(saved != ctx->saved_data.end(), "cross_entropy(): a second backward through a "
                "cross_entropy(..., inplace_backward=True) call is not supported: the first backward handed on the "
                "gradient it wrote over the logits; use inplace_backward=False to backward more than once");
    at::Tensor grad = saved->second.toTensor();
    ctx->saved_data.erase(saved);
    TORCH_CHECK(grad._version() == ctx->saved_data["version"].toInt(), "cross_entropy(): the gradient that "
                "inplace_backward=True wrote over the logits, needed for gradient computation, has been modified by "
                "an inplace operation (a write to the logits after the call)");
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
  return ce_forward_grad_op(parse_backend(backend))
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
  // One next edge, the logits' own: for a view, autograd rebases the base's history onto a CopySlices of this
  // node, which must have the view's one output.
  auto overwritten = c10::make_intrusive<torch::autograd::Error>(
      "cross_entropy(): the logits were overwritten with their gradient by cross_entropy(..., "
      "inplace_backward=True) and cannot be differentiated through after that call",
      torch::autograd::edge_list{torch::autograd::impl::gradient_edge(logits)});
  overwritten->add_input_metadata(logits);
  torch::autograd::impl::rebase_history(logits, torch::autograd::Edge(overwritten, 0));
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
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
  // times 1 - tanh(logits / softcap)^2 with a softcap. grad_lse None means zero. p is the softmax to the last bit
  // at any logit scale, not exp(z - lse): lse is rounded at the scale of the row's largest logit (1e-3 at 1e4 in
  // float32), so the kernels recompute the row's max and sum (CPU, CUDA) or renormalize exp(z - lse) (Triton).
  // reduction ("none", "mean" or "sum") reduces the loss as F.cross_entropy does: "mean" divides the sum by the
  // summed class weights of the kept rows (their count without weights; nan when none is kept). The forward
  // returns (loss, lse), loss (N,) or 0-d; the backward takes grad_loss of that shape. cross_entropy_forward_grad
  // also writes the gradient of the loss (grad_loss 1, grad_lse 0) into grad, which may be the logits themselves
  // (each row is read before it is written).
  fusedlayers::def_kernels(
      m, {"cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
          "float label_smoothing, float z_loss, float? softcap, str reduction) -> (Tensor, Tensor)",
          "cross_entropy_forward_grad(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
          "float label_smoothing, float z_loss, float? softcap, str reduction, Tensor(a!) grad) -> (Tensor, Tensor)",
          "cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
          "Tensor lse, int ignore_index, float label_smoothing, float z_loss, float? softcap, str reduction) "
          "-> Tensor"});
  // Class-probability targets, as F.cross_entropy takes them: target (N, C) of the logits' dtype, with
  // q[c] = w[c] * ((1 - eps) * target[i, c] + eps / C),
  //   loss[i] = sum_c q[c] * (lse[i] - logits[i, c]),  lse[i] = logsumexp(logits[i]),
  // (N,) each in the math dtype, unreduced; the backward takes grad_loss (N,) and returns the gradient w.r.t. the
  // logits, grad_loss[i] * (sum_c q[c] * p - q) + grad_lse[i] * p with p = softmax(logits[i]) (to the
  // last bit, as above). Its autograd (the target's gradient and every order) is fusedlayers/ops/cross_entropy.py's.
  fusedlayers::def_kernels(
      m, {"cross_entropy_soft_forward(Tensor logits, Tensor target, Tensor? weight, float label_smoothing) "
          "-> (Tensor, Tensor)",
          "cross_entropy_soft_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, "
          "Tensor? weight, Tensor lse, float label_smoothing) -> Tensor"});
  // The differentiable ops, one autograd node each: (loss, lse) of the kernels below, the reduction included.
  // cross_entropy_ overwrites the logits with their gradient (declared: they are marked dirty to autograd);
  // its backward scales them by the upstream gradient, and lse has no gradient.
  m.def("cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
        "float z_loss, float? softcap, str reduction, str backend) -> (Tensor, Tensor)");
  m.def("cross_entropy_(Tensor(a!) logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, float z_loss, float? softcap, str reduction, str backend) -> (Tensor, Tensor)");

  fusedlayers::impl_differentiable(m, "cross_entropy", &fusedlayers::cross_entropy_autograd,
                                   &fusedlayers::cross_entropy_no_autograd);
  fusedlayers::impl_differentiable(m, "cross_entropy_", &fusedlayers::cross_entropy_inplace_autograd,
                                   &fusedlayers::cross_entropy_inplace_no_autograd);
  fusedlayers::not_differentiable(m, {"cross_entropy_forward", "cross_entropy_forward_grad", "cross_entropy_backward",
                                      "cross_entropy_soft_forward", "cross_entropy_soft_backward"});
}
