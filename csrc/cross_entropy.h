// The argument checks every native cross-entropy kernel shares (the CPU and CUDA ones), with the messages of
// check_cross_entropy_args in fusedlayers/_ops.py. The schemas are in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace fusedlayers {

// A per-class vector argument (cross_entropy's weight; linear_cross_entropy's bias and class_weight): shape
// (classes,), the dtype and device of the argument `like`.
inline void check_per_class(const std::optional<at::Tensor>& v, const char* op, const char* name, int64_t classes,
                            const at::Tensor& like, const char* like_name) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == classes, op, "(): expected ", name, " of shape (", classes,
              ",) (one per class), got shape ", v->sizes());
  TORCH_CHECK(v->scalar_type() == like.scalar_type(), op, "(): expected ", name, " to have the dtype of ", like_name,
              " (", like.scalar_type(), "), got ", v->scalar_type());
  TORCH_CHECK(v->device() == like.device(), op, "(): expected ", name, " on the device of ", like_name, " (",
              like.device(), "), got ", v->device());
}

inline void check_ce_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                   double label_smoothing, std::optional<double> softcap) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy(): expected logits of shape (N, C), got shape ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "cross_entropy(): expected floating-point logits, got ",
              logits.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy(): expected target of dtype int64 (long), got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "cross_entropy(): expected target of shape (",
              logits.size(0), ",) for logits of shape ", logits.sizes(), ", got shape ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), "cross_entropy(): expected target on the device of logits (",
              logits.device(), "), got ", target.device());
  check_per_class(weight, "cross_entropy", "weight", logits.size(1), logits, "logits");
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "cross_entropy(): label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(!softcap.has_value() || *softcap > 0.0, "cross_entropy(): softcap must be positive, got ",
                    softcap.value_or(0.0));
}

enum class CeReduction { None, Mean, Sum };

inline CeReduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return CeReduction::None;
  if (reduction == "mean") return CeReduction::Mean;
  TORCH_CHECK_VALUE(reduction == "sum", "cross_entropy(): '", std::string(reduction), "' is not a valid value for "
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

}  // namespace fusedlayers
