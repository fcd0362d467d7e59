// Softmax cross-entropy on the CPU: the kernels of `cross_entropy_forward` and `cross_entropy_backward`
// (formulas in csrc/ops/cross_entropy.cpp), parallel over rows, one vectorized pass per row
// (cpu/isa/cross_entropy.h).
//
// float32 and float64 logits are read and the gradient written directly; float16 and bfloat16 rows go
// through a float32 copy of one row at a time (the dispatch lambdas are not templates, so both branches
// compile for every dtype: hence plain `if` and casts that only run when the types are the same).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "ops/cross_entropy.h"

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
CeRow<M> make_row(int64_t C, const at::Tensor& weight, double label_smoothing, double z_loss,
                  std::optional<double> softcap) {
  const M* w = weight.defined() ? weight.const_data_ptr<M>() : nullptr;
  double weight_sum = 0;  // a plain loop: an ATen sum would cost more than a small forward
  for (int64_t c = 0; w && c < C; ++c) weight_sum += w[c];
  return CeRow<M>{nullptr, C, w, static_cast<M>(w ? weight_sum : C), -1,
                  static_cast<M>(label_smoothing), static_cast<M>(z_loss), static_cast<M>(softcap.value_or(0.0))};
}

// t in the math dtype, without a dispatch when it is already.
at::Tensor as_math(const at::Tensor& t, at::ScalarType math) {
  return (t.scalar_type() == math ? t : t.to(math)).contiguous();
}

int64_t grain(int64_t C) { return std::max<int64_t>(1, kLogitsPerTask / std::max<int64_t>(C, 1)); }

// The denominator of a "mean": the summed class weights of the kept rows (their count without weights).
// Checks every kept target, so that it can run before a kernel writes anything.
template <typename M>
M kept_weight_sum(const int64_t* t, int64_t N, const M* w, int64_t ignore_index, int64_t C) {
  double sum = 0, lost = 0;  // compensated: a plain running sum of 858 float64 weights was 4e-14 off
  for (int64_t r = 0; r < N; ++r) {
    const int64_t c = kept_target(t[r], ignore_index, C);
    if (c >= 0) add_kahan(sum, lost, w ? static_cast<double>(w[c]) : 1.0);
  }
  return static_cast<M>(sum);
}

// Row xr in the math dtype: the row itself when it already is, else converted into `in` (C elements).
template <typename M, typename scalar_t>
const M* math_row(const scalar_t* xr, std::vector<M>& in) {
  if constexpr (std::is_same_v<scalar_t, M>) {
    return xr;
  } else {
    for (size_t c = 0; c < in.size(); ++c) in[c] = static_cast<M>(xr[c]);
    return in.data();
  }
}

// The row's gradient, computed in the math dtype and stored into gr (through `out`, C elements, when the
// dtypes differ).
template <typename scalar_t, typename M>
void store_backward_row(const CeRow<M>& row, CeSoftmax<M> softmax, M g_loss, M g_lse, scalar_t* gr,
                        std::vector<M>& out) {
  if constexpr (std::is_same_v<scalar_t, M>) {
    kernels<M>().ce_backward_row(row, softmax, g_loss, g_lse, gr);
  } else {
    kernels<M>().ce_backward_row(row, softmax, g_loss, g_lse, out.data());
    for (size_t c = 0; c < out.size(); ++c) gr[c] = static_cast<scalar_t>(out[c]);
  }
}

// Each row's loss and lse (loss_rows null: not stored), and with grad (null: none) each row's gradient,
// scaled by row_scale, written there (grad may be the logits themselves: each row is read before written).
template <typename scalar_t, typename M>
void ce_rows(const scalar_t* xp, const int64_t* tp, const CeRow<M>& proto, int64_t N, int64_t ignore_index,
             M* loss_rows, M* lsep, scalar_t* grad, M row_scale) {
  const int64_t C = proto.C;
  at::parallel_for(0, N, grain(C), [&](int64_t begin, int64_t end) {
    constexpr bool same = std::is_same_v<scalar_t, M>;
    std::vector<M> in(same ? 0 : C), out(same || !grad ? 0 : C);
    CeRow<M> row = proto;
    for (int64_t r = begin; r < end; ++r) {
      row.x = math_row(xp + r * C, in);
      row.target = kept_target(tp[r], ignore_index, C);
      CeSoftmax<M> softmax;
      const M loss = kernels<M>().ce_forward_row(row, &softmax);
      lsep[r] = softmax.lse();
      if (loss_rows) loss_rows[r] = loss;
      if (grad) store_backward_row(row, softmax, row_scale, M(0), grad + r * C, out);
    }
  });
}

// The forward and, when grad is given, the gradient of the (reduced) loss written into grad: the kernel of
// cross_entropy_forward and of cross_entropy_forward_grad.
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                double label_smoothing, double z_loss, std::optional<double> softcap,
                                                CeReduction reduction, const at::Tensor& grad) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool rows = reduction == CeReduction::None;
  at::Tensor loss = at::empty(rows ? at::IntArrayRef{N} : at::IntArrayRef{}, logits.options().dtype(math));
  at::Tensor lse = at::empty({N}, logits.options().dtype(math));
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight.has_value() ? as_math(*weight, math) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_forward", [&] {
    using M = at::opmath_type<scalar_t>;
    const M* wp = w.defined() ? w.const_data_ptr<M>() : nullptr;
    const int64_t* tp = t.const_data_ptr<int64_t>();
    // "mean" needs its denominator before the gradient is written; computing it checks every target, which the
    // in-place kernel needs done before it writes anything (a raise must leave the logits as they were)
    const M kept_sum = reduction == CeReduction::Mean || grad.defined() ? kept_weight_sum<M>(tp, N, wp, ignore_index, C)
                                                                         : M(0);
    const M denom = reduction == CeReduction::Mean ? kept_sum : M(1);
    const CeRow<M> proto = make_row<M>(C, w, label_smoothing, z_loss, softcap);
    std::vector<M> reduced(rows ? 0 : N);  // the rows' losses of a reduced loss
    M* loss_rows = rows ? loss.mutable_data_ptr<M>() : reduced.data();
    scalar_t* gp = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    if (N > 0) {
      ce_rows<scalar_t, M>(x.const_data_ptr<scalar_t>(), tp, proto, N, ignore_index, loss_rows,
                           lse.mutable_data_ptr<M>(), gp, M(1) / denom);
    }
    if (!rows) {
      // in double and compensated: a plain running sum of 429 float64 rows was 3x PyTorch's cascade sum's error
      double sum = 0, lost = 0;
      for (int64_t r = 0; r < N; ++r) add_kahan(sum, lost, static_cast<double>(reduced[r]));
      // a "mean" over no kept weight: as ce_mean (ops/cross_entropy.h)
      *loss.mutable_data_ptr<M>() = denom == M(0) && label_smoothing != 0.0 ? std::numeric_limits<M>::quiet_NaN()
                                                                            : static_cast<M>(sum) / denom;
    }
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                         double label_smoothing, double z_loss,
                                                         std::optional<double> softcap, c10::string_view reduction) {
  check_ce_args(logits, target, weight, label_smoothing, softcap);
  return forward_impl(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                      parse_reduction(reduction), at::Tensor());
}

// The gradient is written into grad one row at a time, after the row is read: grad may be the logits. A
// non-contiguous grad goes through a contiguous buffer, copied in.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_grad(const at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              int64_t ignore_index, double label_smoothing,
                                                              double z_loss, std::optional<double> softcap,
                                                              c10::string_view reduction, at::Tensor& grad) {
  check_ce_args(logits, target, weight, label_smoothing, softcap);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device() == logits.device(),
              "cross_entropy_forward_grad(): expected grad shaped as logits ", logits.sizes(), " of dtype ",
              logits.scalar_type(), " on ", logits.device(), ", got ", grad.sizes(), " ", grad.scalar_type(), " on ",
              grad.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor out = grad.is_contiguous() ? grad : at::empty_like(x);
  auto result = forward_impl(x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                             parse_reduction(reduction), out);
  if (!out.is_same(grad)) grad.copy_(out);
  return result;
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                  const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                  double label_smoothing, double z_loss, std::optional<double> softcap,
                                  c10::string_view reduction) {
  check_ce_args(logits, target, weight, label_smoothing, softcap);
  const CeReduction red = parse_reduction(reduction);
  const int64_t N = logits.size(0), C = logits.size(1);
  check_ce_backward_rows(grad_loss, grad_lse, lse, logits, red);
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0 || C == 0) return grad;
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight.has_value() ? as_math(*weight, math) : at::Tensor();
  const at::Tensor gl = as_math(grad_loss, math);
  const at::Tensor glse = grad_lse.has_value() ? as_math(*grad_lse, math) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_backward", [&] {
    using M = at::opmath_type<scalar_t>;
    const M* wp = w.defined() ? w.const_data_ptr<M>() : nullptr;
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const CeRow<M> proto = make_row<M>(C, w, label_smoothing, z_loss, softcap);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // a reduced loss: one grad_loss for every row (divided by the denominator for "mean")
    const M* glp = red == CeReduction::None ? gl.const_data_ptr<M>() : nullptr;
    const M g_all = glp ? M(0)
                    : red == CeReduction::Mean ? *gl.const_data_ptr<M>() / kept_weight_sum<M>(tp, N, wp, ignore_index, C)
                                               : *gl.const_data_ptr<M>();
    const M* glsep = glse.defined() ? glse.const_data_ptr<M>() : nullptr;
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(C), [&](int64_t begin, int64_t end) {
      constexpr bool same = std::is_same_v<scalar_t, M>;
      std::vector<M> in(same ? 0 : C), out(same ? 0 : C);
      CeRow<M> row = proto;
      for (int64_t r = begin; r < end; ++r) {
        row.x = math_row(xp + r * C, in);
        row.target = kept_target(tp[r], ignore_index, C);
        // the forward's own softmax, recomputed (lse is rounded at the scale of the largest logit): the same
        // bits as the gradient a reduced loss computes in its forward
        store_backward_row(row, kernels<M>().ce_softmax_row(row), glp ? glp[r] : g_all, glsep ? glsep[r] : M(0),
                           gp + r * C, out);
      }
    });
  });
  return grad;
}

// Class-probability targets: per-row loss and lse, math dtype.
std::tuple<at::Tensor, at::Tensor> cross_entropy_soft_forward(const at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              double label_smoothing) {
  check_soft_ce_args(logits, target, weight, label_smoothing);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({N}, logits.options().dtype(math));
  at::Tensor lse = at::empty({N}, logits.options().dtype(math));
  const at::Tensor x = logits.contiguous(), t = target.contiguous();
  const at::Tensor w = weight.has_value() ? as_math(*weight, math) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_soft_forward", [&] {
    using M = at::opmath_type<scalar_t>;
    const CeRow<M> proto = make_row<M>(C, w, label_smoothing, 0.0, std::nullopt);
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *tp = t.const_data_ptr<scalar_t>();
    M *lossp = loss.mutable_data_ptr<M>(), *lsep = lse.mutable_data_ptr<M>();
    at::parallel_for(0, N, grain(C), [&](int64_t begin, int64_t end) {
      constexpr bool same = std::is_same_v<scalar_t, M>;
      std::vector<M> in(same ? 0 : C), tin(same ? 0 : C);
      CeRow<M> row = proto;
      for (int64_t r = begin; r < end; ++r) {
        row.x = math_row(xp + r * C, in);
        CeSoftmax<M> softmax;
        lossp[r] = kernels<M>().ce_soft_forward_row(row, math_row(tp + r * C, tin), &softmax);
        lsep[r] = softmax.lse();
      }
    });
  });
  return {loss, lse};
}

// The gradient w.r.t. the logits of sum_i grad_loss[i] * loss[i] + grad_lse[i] * lse[i], in the logits' dtype.
at::Tensor cross_entropy_soft_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                       double label_smoothing) {
  check_soft_ce_args(logits, target, weight, label_smoothing);
  check_soft_ce_backward_rows(grad_loss, grad_lse, lse, logits);
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0 || C == 0) return grad;
  const auto math = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = logits.contiguous(), t = target.contiguous();
  const at::Tensor w = weight.has_value() ? as_math(*weight, math) : at::Tensor();
  const at::Tensor gl = as_math(grad_loss, math);
  const at::Tensor glse = grad_lse.has_value() ? as_math(*grad_lse, math) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_soft_backward", [&] {
    using M = at::opmath_type<scalar_t>;
    const CeRow<M> proto = make_row<M>(C, w, label_smoothing, 0.0, std::nullopt);
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *tp = t.const_data_ptr<scalar_t>();
    const M* glp = gl.const_data_ptr<M>();
    const M* glsep = glse.defined() ? glse.const_data_ptr<M>() : nullptr;
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(C), [&](int64_t begin, int64_t end) {
      constexpr bool same = std::is_same_v<scalar_t, M>;
      std::vector<M> in(same ? 0 : C), tin(same ? 0 : C), out(same ? 0 : C);
      CeRow<M> row = proto;
      for (int64_t r = begin; r < end; ++r) {
        row.x = math_row(xp + r * C, in);
        // the forward's softmax recomputed, as cross_entropy_backward does
        M* gr = same ? reinterpret_cast<M*>(gp + r * C) : out.data();
        kernels<M>().ce_soft_backward_row(row, math_row(tp + r * C, tin), kernels<M>().ce_softmax_row(row), glp[r],
                                          glsep ? glsep[r] : M(0), gr);
        if constexpr (!same) {
          for (int64_t c = 0; c < C; ++c) gp[r * C + c] = static_cast<scalar_t>(out[c]);
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
  m.impl("cross_entropy_forward_grad", &fusedlayers::cpu::cross_entropy_forward_grad);
  m.impl("cross_entropy_backward", &fusedlayers::cpu::cross_entropy_backward);
  m.impl("cross_entropy_soft_forward", &fusedlayers::cpu::cross_entropy_soft_forward);
  m.impl("cross_entropy_soft_backward", &fusedlayers::cpu::cross_entropy_soft_backward);
}
