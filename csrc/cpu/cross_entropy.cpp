// Softmax cross-entropy on the CPU: the kernels of `cross_entropy_forward` and `cross_entropy_backward`
// (formulas in csrc/ops.cpp), parallel over rows, one vectorized pass per row (cpu/kernels_impl.h).
//
// float32 and float64 logits are read and the gradient written in place; float16 and bfloat16 rows go
// through a float32 copy of one row at a time (the dispatch lambdas are not templates, so both branches
// compile for every dtype: hence plain `if` and casts that only run when the types are the same).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/kernels.h"
#include "cross_entropy.h"

namespace fusedlayers::cpu {
namespace {

// Rows per parallel task: about this many logits.
constexpr int64_t kLogitsPerTask = 32768;

// The row's class, or -1 when the row is ignored; a kept class outside [0, C) is an IndexError.
int64_t kept_target(int64_t t, int64_t ignore_index, int64_t C) {
  if (t == ignore_index) return -1;
  TORCH_CHECK_INDEX(t >= 0 && t < C, "cross_entropy(): target ", t, " is out of bounds: expected a class in [0, ",
                    C, ") or ignore_index (", ignore_index, ")");
  return t;
}

template <typename M>
CeRow<M> make_row(int64_t C, const at::Tensor& weight, M weight_sum, double label_smoothing, double z_loss,
                  std::optional<double> softcap) {
  return CeRow<M>{nullptr, C, weight.defined() ? weight.const_data_ptr<M>() : nullptr, weight_sum, -1,
                  static_cast<M>(label_smoothing), static_cast<M>(z_loss), static_cast<M>(softcap.value_or(0.0))};
}

int64_t grain(int64_t C) { return std::max<int64_t>(1, kLogitsPerTask / std::max<int64_t>(C, 1)); }

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                         double label_smoothing, double z_loss,
                                                         std::optional<double> softcap) {
  check_ce_args(logits, target, weight, label_smoothing, softcap);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({N}, logits.options().dtype(math));
  at::Tensor lse = at::empty({N}, logits.options().dtype(math));
  if (N == 0) return {loss, lse};
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(math).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_forward", [&] {
    using M = at::opmath_type<scalar_t>;
    const M wsum = w.defined() ? w.sum().item<M>() : M(C);
    const CeRow<M> proto = make_row<M>(C, w, wsum, label_smoothing, z_loss, softcap);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    M* lossp = loss.mutable_data_ptr<M>();
    M* lsep = lse.mutable_data_ptr<M>();
    at::parallel_for(0, N, grain(C), [&](int64_t begin, int64_t end) {
      std::vector<M> buf(std::is_same_v<scalar_t, M> ? 0 : C);
      CeRow<M> row = proto;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * C;
        if (std::is_same_v<scalar_t, M>) {
          row.x = reinterpret_cast<const M*>(xr);
        } else {
          for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<M>(xr[c]);
          row.x = buf.data();
        }
        row.target = kept_target(tp[r], ignore_index, C);
        lossp[r] = ce_forward_row(row, &lsep[r]);
      }
    });
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                  const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                  double label_smoothing, double z_loss, std::optional<double> softcap) {
  check_ce_args(logits, target, weight, label_smoothing, softcap);
  const int64_t N = logits.size(0), C = logits.size(1);
  check_ce_backward_rows(grad_loss, grad_lse, lse, logits);
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0 || C == 0) return grad;
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(math).contiguous() : at::Tensor();
  const at::Tensor gl = grad_loss.to(math).contiguous();
  const at::Tensor glse = grad_lse.has_value() ? grad_lse->to(math).contiguous() : at::Tensor();
  const at::Tensor l = lse.to(math).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_backward", [&] {
    using M = at::opmath_type<scalar_t>;
    const M wsum = w.defined() ? w.sum().item<M>() : M(C);
    const CeRow<M> proto = make_row<M>(C, w, wsum, label_smoothing, z_loss, softcap);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const M* glp = gl.const_data_ptr<M>();
    const M* glsep = glse.defined() ? glse.const_data_ptr<M>() : nullptr;
    const M* lsep = l.const_data_ptr<M>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(C), [&](int64_t begin, int64_t end) {
      constexpr bool same = std::is_same_v<scalar_t, M>;
      std::vector<M> in(same ? 0 : C), out(same ? 0 : C);
      CeRow<M> row = proto;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * C;
        scalar_t* gr = gp + r * C;
        if (same) {
          row.x = reinterpret_cast<const M*>(xr);
        } else {
          for (int64_t c = 0; c < C; ++c) in[c] = static_cast<M>(xr[c]);
          row.x = in.data();
        }
        row.target = kept_target(tp[r], ignore_index, C);
        const M g_lse = glsep ? glsep[r] : M(0);
        if (same) {
          ce_backward_row(row, lsep[r], glp[r], g_lse, reinterpret_cast<M*>(gr));
        } else {
          ce_backward_row(row, lsep[r], glp[r], g_lse, out.data());
          for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<scalar_t>(out[c]);
        }
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace fusedlayers::cpu

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("cross_entropy_forward", &fusedlayers::cpu::cross_entropy_forward);
  m.impl("cross_entropy_backward", &fusedlayers::cpu::cross_entropy_backward);
}
