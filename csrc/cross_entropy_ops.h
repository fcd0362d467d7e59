// Dispatcher handles of the cross-entropy kernels (schemas in ops.cpp), shared by the autograd of
// cross_entropy (ops.cpp) and the chunked linear cross-entropy (linear_cross_entropy.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cross_entropy.h"
#include "dense.h"

namespace fusedlayers {

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

// Looked up once; the Triton ones resolve to kernels that Python registers later.
inline c10::TypedOperatorHandle<CeForwardFn> ce_forward_op(bool triton) {
  static auto native = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::cross_entropy_forward", "").typed<CeForwardFn>();
  static auto tri = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::triton_cross_entropy_forward", "").typed<CeForwardFn>();
  return triton ? tri : native;
}

inline c10::TypedOperatorHandle<CeBackwardFn> ce_backward_op(bool triton) {
  static auto native = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::cross_entropy_backward", "").typed<CeBackwardFn>();
  static auto tri = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::triton_cross_entropy_backward", "").typed<CeBackwardFn>();
  return triton ? tri : native;
}

inline c10::TypedOperatorHandle<CeForwardGradFn> ce_forward_grad_op(bool triton) {
  static auto native = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::cross_entropy_forward_grad", "").typed<CeForwardGradFn>();
  static auto tri = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlayers::triton_cross_entropy_forward_grad", "").typed<CeForwardGradFn>();
  return triton ? tri : native;
}

// The class weight of each row's target, 0 for ignored rows (1 for kept rows without weights), in `dtype`:
// the summands of a "mean" reduction's denominator.
inline at::Tensor kept_weights(const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
                               at::ScalarType dtype) {
  const at::Tensor kept = target != ignore_index;
  if (!weight.has_value()) return kept.to(dtype);
  // Kept targets outside [0, C) are rejected by the kernels; the clamp only keeps this gather in bounds.
  const at::Tensor safe = at::where(kept, target, 0).clamp(0, weight->size(0) - 1);
  return at::where(kept, weight->to(dtype).gather(0, safe), 0);
}


// A "mean" reduction's sum over its denominator, the kept rows' summed class weights: nan when that is 0, as
// PyTorch's (its NLL part is 0/0), even where label smoothing's part of the sum is not 0.
inline at::Tensor ce_mean(const at::Tensor& sum, const at::Tensor& denominator) {
  return at::where(denominator == 0, std::numeric_limits<double>::quiet_NaN(), sum / denominator);
}

// The reductions in ATen ops, without a host synchronization, for the kernels that compute per-row losses
// (CUDA): the loss of per-row losses, and the per-row grad_loss of a reduced loss's 0-d grad_loss. "mean"
// divides by the summed class weights of the kept rows (their count without weights): nan when every row is
// ignored (its gradient's inf stays off the ignored rows, which the kernels zero).
inline at::Tensor ce_reduce_rows(const at::Tensor& loss, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, int64_t ignore_index, CeReduction reduction) {
  if (reduction == CeReduction::None) return loss;
  if (reduction == CeReduction::Sum) return loss.sum();
  return ce_mean(loss.sum(), kept_weights(target, weight, ignore_index, loss.scalar_type()).sum());
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

}  // namespace fusedlayers
