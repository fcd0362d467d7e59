// The cross-entropy family's argument contract (the checks of every native kernel, with the messages of
// fusedlayers/ops/cross_entropy.py), its kernels' handles, and the reductions in ATen ops (csrc/ops/cross_entropy.cpp
// has the schemas and the formulas; fusedlayers/ops/linear_cross_entropy.py and csrc/ops/linear_cross_entropy.cpp
// use them too).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "backend.h"
#include "ops/common.h"

namespace fusedlayers {

// A per-class vector argument (cross_entropy's weight; linear_cross_entropy's bias and class_weight): shape
// (classes,), the dtype and device of the argument `like`.
inline void check_per_class(const std::optional<at::Tensor>& v, const char* op, const char* name, int64_t classes,
                            const at::Tensor& like, const char* like_name) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == classes, op, "(): expected ", name, " of shape (", classes,
              ",) (one per class), got shape ", v->sizes());
  TORCH_CHECK(v->scalar_type() == like.scalar_type(), op, "(): expected ", name, " to have the dtype of ", like_name,
              " (", py(like.scalar_type()), "), got ", py(v->scalar_type()));
  TORCH_CHECK(v->device() == like.device(), op, "(): expected ", name, " on the device of ", like_name, " (",
              like.device(), "), got ", v->device());
}

inline void check_ce_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy(): expected logits of shape (N, C), got shape ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "cross_entropy(): expected floating-point logits, got ",
              py(logits.scalar_type()));
}

// What both kinds of target check after their own: the target's device, the weight, label_smoothing.
inline void check_ce_shared(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, double label_smoothing) {
  TORCH_CHECK(target.device() == logits.device(), "cross_entropy(): expected target on the device of logits (",
              logits.device(), "), got ", target.device());
  check_per_class(weight, "cross_entropy", "weight", logits.size(1), logits, "logits");
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "cross_entropy(): label_smoothing must be in [0, 1], got ", py(label_smoothing));
}

inline void check_ce_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                   double label_smoothing, std::optional<double> softcap) {
  check_ce_logits(logits);
  TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy(): expected target of dtype int64 (long), got ",
              py(target.scalar_type()));
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "cross_entropy(): expected target of shape (",
              logits.size(0), ",) for logits of shape ", logits.sizes(), ", got shape ", target.sizes());
  check_ce_shared(logits, target, weight, label_smoothing);
  TORCH_CHECK_VALUE(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)),
                    "cross_entropy(): softcap must be positive and finite (None for no cap), got ",
                    py(softcap.value_or(0.0)));
}

// Class-probability targets (cross_entropy_soft_*): target shaped, typed and placed as the logits.
inline void check_soft_ce_args(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double label_smoothing) {
  check_ce_logits(logits);
  TORCH_CHECK(target.sizes() == logits.sizes(), "cross_entropy(): expected class-probability target of the shape "
              "of logits ", logits.sizes(), ", got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == logits.scalar_type(), "cross_entropy(): expected class-probability target "
              "of the dtype of logits (", py(logits.scalar_type()), "), got ", py(target.scalar_type()));
  check_ce_shared(logits, target, weight, label_smoothing);
}

// The per-row inputs of a soft backward kernel: grad_loss, lse and grad_lse (N,) each, on the logits' device.
inline void check_soft_ce_backward_rows(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                        const at::Tensor& lse, const at::Tensor& logits) {
  const int64_t N = logits.size(0);
  for (const at::Tensor* v : {&grad_loss, &lse, grad_lse.has_value() ? &*grad_lse : nullptr}) {
    if (v == nullptr) continue;
    TORCH_CHECK(v->dim() == 1 && v->size(0) == N, "cross_entropy_soft_backward(): expected grad_loss, grad_lse "
                "and lse of shape (", N, ",), got shape ", v->sizes());
    TORCH_CHECK(v->device() == logits.device(), "cross_entropy_soft_backward(): expected grad_loss, grad_lse and "
                "lse on the device of logits (", logits.device(), "), got ", v->device());
  }
}

enum class CeReduction { None, Mean, Sum };

inline CeReduction parse_reduction(c10::string_view reduction, const char* op = "cross_entropy") {
  if (reduction == "none") return CeReduction::None;
  if (reduction == "mean") return CeReduction::Mean;
  TORCH_CHECK_VALUE(reduction == "sum", op, "(): '", std::string(reduction), "' is not a valid value for "
                    "reduction; expected one of: none, mean, sum");
  return CeReduction::Sum;
}

// The per-row inputs of every native backward kernel: (N,) each (grad_loss 0-d for "mean" and "sum"), on the
// logits' device.
inline void check_ce_backward_rows(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                   const at::Tensor& lse, const at::Tensor& logits, CeReduction reduction) {
  const int64_t N = logits.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N, "cross_entropy_backward(): expected lse of shape (", N,
              ",), got shape ", lse.sizes());
  if (reduction == CeReduction::None) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N, "cross_entropy_backward(): expected grad_loss of "
                "shape (", N, ",) for reduction 'none', got shape ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, "cross_entropy_backward(): expected a 0-d grad_loss for a reduced loss, got "
                "shape ", grad_loss.sizes());
  }
  TORCH_CHECK(!grad_lse.has_value() || (grad_lse->dim() == 1 && grad_lse->size(0) == N),
              "cross_entropy_backward(): expected grad_lse of shape (", N, ",), got shape ", grad_lse->sizes());
  for (const at::Tensor* v : {&grad_loss, &lse, grad_lse.has_value() ? &*grad_lse : nullptr}) {
    if (v == nullptr) continue;
    TORCH_CHECK(v->device() == logits.device(), "cross_entropy_backward(): expected grad_loss, grad_lse and lse on "
                "the device of logits (", logits.device(), "), got ", v->device());
  }
}

using CeForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const std::optional<at::Tensor>&, int64_t, double, double,
                                                       std::optional<double>, c10::string_view);
using CeBackwardFn = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double,
                                double, std::optional<double>, c10::string_view);
// The forward that also writes the gradient of the loss into its last argument (which may be the logits).
using CeForwardGradFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const std::optional<at::Tensor>&, int64_t, double, double,
                                                           std::optional<double>, c10::string_view, at::Tensor&);

inline constinit const KernelOp<CeForwardFn> ce_forward_op("cross_entropy_forward");

inline constinit const KernelOp<CeBackwardFn> ce_backward_op("cross_entropy_backward");

inline constinit const KernelOp<CeForwardGradFn> ce_forward_grad_op("cross_entropy_forward_grad");

// The class weight of each row's target, 0 for ignored rows (1 for kept rows without weights), in `dtype`:
// the summands of a "mean" reduction's denominator.
inline at::Tensor kept_weights(const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
                               at::ScalarType dtype) {
  const at::Tensor kept = target != ignore_index;
  // No classes: no kept row can be valid (the kernels reject it), and there is nothing to gather from.
  if (!weight.has_value() || weight->size(0) == 0) return kept.to(dtype);
  // Kept targets outside [0, C) are rejected by the kernels; the clamp only keeps this gather in bounds.
  const at::Tensor safe = at::where(kept, target, 0).clamp(0, weight->size(0) - 1);
  return at::where(kept, weight->to(dtype).gather(0, safe), 0);
}


// A "mean" reduction's sum over its denominator, the kept rows' summed class weights: when that is 0, +-inf (nan
// for a 0 sum) as PyTorch's, and with label smoothing nan as PyTorch's (its smoothing part is a separate mean, 0/0
// where no row is kept) even where a nonzero sum would give inf.
inline at::Tensor ce_mean(const at::Tensor& sum, const at::Tensor& denominator, double label_smoothing) {
  if (label_smoothing == 0.0) return sum / denominator;
  return at::where(denominator == 0, std::numeric_limits<double>::quiet_NaN(), sum / denominator);
}

// The reductions in ATen ops, without a host synchronization, for the kernels that compute per-row losses
// (CUDA): the loss of per-row losses, and the per-row grad_loss of a reduced loss's 0-d grad_loss. "mean"
// divides by the summed class weights of the kept rows (their count without weights): nan when every row is
// ignored (its gradient's inf stays off the ignored rows, which the kernels zero).
inline at::Tensor ce_reduce_rows(const at::Tensor& loss, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, int64_t ignore_index, CeReduction reduction,
                                 double label_smoothing) {
  if (reduction == CeReduction::None) return loss;
  if (reduction == CeReduction::Sum) return loss.sum();
  return ce_mean(loss.sum(), kept_weights(target, weight, ignore_index, loss.scalar_type()).sum(), label_smoothing);
}

inline at::Tensor ce_row_grad_loss(const at::Tensor& grad_loss, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                   CeReduction reduction, at::ScalarType math) {
  const at::Tensor g = grad_loss.to(math);
  if (reduction == CeReduction::None) return g.contiguous();
  const int64_t N = target.size(0);
  if (reduction == CeReduction::Sum) return g.expand({N}).contiguous();
  return (g / kept_weights(target, weight, ignore_index, math).sum()).expand({N}).contiguous();
}

// The class weights are constants to autograd, as in F.cross_entropy.
inline void check_weight_not_differentiable(const std::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(!(weight.has_value() && weight->requires_grad() && at::GradMode::is_enabled()), op,
              "(): the gradient with respect to the class weight is not implemented (neither is it in "
              "F.cross_entropy); pass weight.detach()");
}

}  // namespace fusedlayers
