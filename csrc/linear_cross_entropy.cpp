// The linear cross-entropy kernels: the loss of logits = hidden @ weight.T + bias without ever holding more
// than one chunk of rows of the (N, V) logits. Device-generic: the GEMMs are ATen's, the per-chunk softmax
// cross-entropy is the cross_entropy kernel family of the chosen backend.
//
// The forward can also compute the gradients (for a "mean"/"sum" reduction, whose upstream gradient is one
// scalar: the backward then only scales them), so the logits are computed once; the backward op recomputes
// each chunk's logits, for per-row upstream gradients ("none", or a gradient reaching lse).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "backend.h"
#include "cross_entropy_ops.h"

namespace fusedlayers {
namespace {

void check_linear_ce_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                          int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 2, "linear_cross_entropy(): expected hidden of shape (N, H), got shape ", hidden.sizes());
  TORCH_CHECK(hidden.is_floating_point(), "linear_cross_entropy(): expected floating-point hidden, got ",
              hidden.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "linear_cross_entropy(): expected weight of "
              "shape (V, ", hidden.size(1), ") for hidden of shape ", hidden.sizes(), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "linear_cross_entropy(): expected weight to have the "
              "dtype of hidden (", hidden.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), "linear_cross_entropy(): expected weight on the device of hidden (",
              hidden.device(), "), got ", weight.device());
  check_per_class(bias, "linear_cross_entropy", "bias", weight.size(0), hidden, "hidden");
  // checked here, not by the chunks' cross_entropy kernels, whose messages call it "weight"
  check_per_class(class_weight, "linear_cross_entropy", "class_weight", weight.size(0), hidden, "hidden");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), "linear_cross_entropy(): expected target of "
              "shape (", hidden.size(0), ",), got shape ", target.sizes());
  TORCH_CHECK_VALUE(chunk_size >= 1, "linear_cross_entropy(): chunk_size must be positive, got ", chunk_size);
}

struct LinearCe {
  const at::Tensor& hidden;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const at::Tensor& target;
  const std::optional<at::Tensor>& class_weight;
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  std::optional<double> softcap;
  int64_t chunk_size;
  bool triton;
};

// Gradient accumulators: dh in hidden's dtype, dw and db in the math dtype (float32 for low precision).
struct Grads {
  at::Tensor dh, dw, db;
};

Grads make_grads(const LinearCe& a, std::array<bool, 3> mask) {
  const auto acc = at::toOpMathType(a.hidden.scalar_type());
  Grads g;
  if (mask[0]) g.dh = at::empty_like(a.hidden, at::MemoryFormat::Contiguous);
  if (mask[1]) g.dw = at::zeros(a.weight.sizes(), a.weight.options().dtype(acc));
  if (mask[2] && a.bias.has_value()) g.db = at::zeros({a.weight.size(0)}, a.weight.options().dtype(acc));
  return g;
}

// One pass over the chunks of rows: each chunk's logits, then the forward kernel when `loss` is defined
// (writing loss and lse), and the backward kernel with the rows' grad_loss (or one scalar for all rows) and
// grad_lse when `grads` wants any gradient; lse is read from `lse` when the forward is not run.
void run_chunks(const LinearCe& a, const at::Tensor& loss, const at::Tensor& lse, const at::Tensor& grad_loss,
                const at::Tensor& grad_lse, Grads& grads) {
  const int64_t N = a.hidden.size(0), V = a.weight.size(0);
  const bool backward = grads.dh.defined() || grads.dw.defined() || grads.db.defined();
  const auto acc = at::toOpMathType(a.hidden.scalar_type());
  const at::Tensor wt = a.weight.t();
  at::Tensor buffer = at::empty({std::min(a.chunk_size, N), V}, a.hidden.options());  // reused by every chunk
  for (int64_t s = 0; s < N; s += a.chunk_size) {
    const int64_t n = std::min(a.chunk_size, N - s);
    const at::Tensor h = a.hidden.narrow(0, s, n);
    const at::Tensor t = a.target.narrow(0, s, n);
    at::Tensor logits = buffer.narrow(0, 0, n);
    if (a.bias.has_value()) {
      at::addmm_out(logits, *a.bias, h, wt);
    } else {
      at::mm_out(logits, h, wt);
    }
    at::Tensor lse_c;
    if (loss.defined()) {
      auto [l, row_lse] = ce_forward_op(a.triton).call(logits, t, a.class_weight, a.ignore_index, a.label_smoothing,
                                                       a.z_loss, a.softcap, "none");
      loss.narrow(0, s, n).copy_(l);
      lse.narrow(0, s, n).copy_(row_lse);
      lse_c = row_lse;
    } else {
      lse_c = lse.narrow(0, s, n);
    }
    if (!backward) continue;
    const at::Tensor gl = grad_loss.dim() == 0 ? grad_loss.expand({n}) : grad_loss.narrow(0, s, n);
    const at::Tensor g = ce_backward_op(a.triton).call(gl, grad_lse.defined() ? opt(grad_lse.narrow(0, s, n))
                                                                               : std::nullopt,
                                                       logits, t, a.class_weight, lse_c, a.ignore_index,
                                                       a.label_smoothing, a.z_loss, a.softcap, "none");
    if (grads.dh.defined()) {
      at::Tensor dh = grads.dh.narrow(0, s, n);
      at::mm_out(dh, g, a.weight);
    }
    if (grads.dw.defined() || grads.db.defined()) {
      const at::Tensor g_acc = g.to(acc);
      if (grads.dw.defined()) grads.dw.addmm_(g_acc.t(), h.to(acc));
      if (grads.db.defined()) grads.db.add_(g_acc.sum(0));
    }
  }
}

// Returns (loss, lse, dh, dw, db): loss (N,) for reduction "none", else 0-d; lse (N,). With output_mask
// (only for "mean"/"sum"), also the gradients of the reduced loss w.r.t. hidden, weight and bias (undefined
// where not asked), dw and db in the math dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    int64_t chunk_size, std::array<bool, 3> output_mask, c10::string_view backend) {
  check_linear_ce_args(hidden, weight, bias, target, class_weight, chunk_size);
  TORCH_CHECK_VALUE(reduction == "none" || reduction == "mean" || reduction == "sum",
                    "linear_cross_entropy(): reduction must be 'none', 'mean' or 'sum', got '", reduction, "'");
  const bool with_grads = output_mask[0] || output_mask[1] || output_mask[2];
  TORCH_CHECK(!(with_grads && reduction == "none"), "linear_cross_entropy_forward(): gradients are computed in the "
              "forward only for a 'mean' or 'sum' reduction");
  const LinearCe a{hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                   chunk_size, is_triton(backend)};
  const auto math = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = hidden.size(0);
  at::Tensor loss = at::empty({N}, hidden.options().dtype(math));
  at::Tensor lse = at::empty({N}, hidden.options().dtype(math));
  // A "mean" divides by the summed class weights of the kept rows (nan when there are none, as PyTorch).
  const at::Tensor denominator = reduction == "mean"
                                     ? kept_weights(target, class_weight, ignore_index, math).sum()
                                     : at::ones({}, hidden.options().dtype(math));
  Grads grads = make_grads(a, output_mask);
  run_chunks(a, loss, lse, with_grads ? denominator.reciprocal() : at::Tensor(), at::Tensor(), grads);
  if (reduction != "none") loss = ce_mean(loss.sum(), denominator);
  return {loss, lse, grads.dh, grads.dw, grads.db};
}

// Returns (dh, dw, db) of sum(grad_loss * loss + grad_lse * lse) over the rows (undefined where not asked; dw
// and db in the math dtype), recomputing each chunk's logits. grad_loss None means zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const std::optional<at::Tensor>& class_weight, const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
    double z_loss, std::optional<double> softcap, int64_t chunk_size, std::array<bool, 3> output_mask,
    c10::string_view backend) {
  check_linear_ce_args(hidden, weight, bias, target, class_weight, chunk_size);
  const LinearCe a{hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                   chunk_size, is_triton(backend)};
  Grads grads = make_grads(a, output_mask);
  run_chunks(a, at::Tensor(), lse, grad_loss.has_value() ? *grad_loss : at::zeros_like(lse),
             grad_lse.value_or(at::Tensor()), grads);
  return {grads.dh, grads.dw, grads.db};
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy_forward", &fusedlayers::linear_cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &fusedlayers::linear_cross_entropy_backward);
}
