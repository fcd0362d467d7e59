// Softmax cross-entropy on CUDA: the kernels of cross_entropy_forward, cross_entropy_forward_grad and
// cross_entropy_backward, with the per-row formulas of csrc/ops/cross_entropy.cpp ("Softmax cross-entropy"); the reductions are
// ATen ops around them (ops/cross_entropy.h).
//
// One block per row. Forward: every thread runs an online max / sum of exponentials over its share of the row (one
// exp per logit: its sum is rescaled only when its max grows), with label smoothing also sum w[c] * (z[c] - max)
// kept relative to its max, so that no large terms cancel; the block then merges the threads' states with warp
// shuffles and one shared-memory step. Backward: the same merge of the row's (max, sum), then one pass writing
// scale * (softmax - smoothed onehot): exp(z - lse) from the forward's lse would carry lse's rounding, at the scale
// of the largest logit, into every probability.
//
// Rows are read (and the gradient written) as 16-byte vectors from their first aligned element on, with scalar
// heads and tails. Math in at::opmath_type (float for half, bfloat16 and float; double for double); loss and lse
// in that type, the gradient in the logits' dtype. A kept target outside [0, C) is a device-side assert, as in
// PyTorch's own nll_loss; the host never reads the targets, so nothing synchronizes.
//
// One template parameter (the logits' dtype): the options are run-time flags, uniform across a block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <limits>
#include <optional>

#include "activations.h"
#include "cuda/rows.cuh"
#include "ops/cross_entropy.h"

namespace fusedlayers::cuda {
namespace {

// The options of a launch, rounded once to the math type acc_t.
template <typename acc_t>
struct CeParams {
  int64_t C;
  int64_t ignore_index;
  acc_t keep;        // 1 - label_smoothing
  acc_t eps_over_c;  // label_smoothing / C; 0 without label smoothing
  acc_t z_loss;
  acc_t inv_softcap;  // 1 / softcap; 0 without a softcap
  acc_t softcap;
};

// z = softcap * tanh(x / softcap), or x without a softcap.
template <typename acc_t>
__device__ __forceinline__ acc_t capped(acc_t x, const CeParams<acc_t>& p) {
  return p.inv_softcap == acc_t(0) ? x : p.softcap * ::tanh(x * p.inv_softcap);
}

struct RowTarget {
  int64_t t;
  bool kept;   // t != ignore_index
  bool valid;  // kept and t in [0, C): the only case in which z[t] and w[t] are read
};

__device__ __forceinline__ RowTarget row_target(const int64_t* target, int64_t row, int64_t C, int64_t ignore_index) {
  const int64_t t = target[row];
  const bool kept = t != ignore_index;
  return {t, kept, kept && t >= 0 && t < C};
}

// Called where few registers are live: the assert is a call, and values live across it spill to the stack.
__device__ __forceinline__ void assert_in_range(const RowTarget& tg) {
  CUDA_KERNEL_ASSERT_MSG(!tg.kept || tg.valid, "cross_entropy: target out of bounds [0, C)");
}

// ---- kernels ------------------------------------------------------------------------------------------------

// The merge's max skips NaN; only a +inf max would hide one (the sum carries it otherwise): rescan that rare row.
template <typename scalar_t, typename acc_t>
__device__ void nan_under_inf_max(OnlineState<acc_t>& st, const scalar_t* x, int64_t C) {
  if (st.m != std::numeric_limits<acc_t>::infinity()) return;
  bool nan_seen = false;
  for_each_logit<scalar_t, acc_t>(x, C, [&](int64_t, acc_t v) { nan_seen |= v != v; });
  if (__syncthreads_or(nan_seen)) st.m = std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                                 const scalar_t* __restrict__ weight, at::opmath_type<scalar_t>* __restrict__ loss,
                                 at::opmath_type<scalar_t>* __restrict__ lse,
                                 const CeParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * p.C;
  const bool smoothing = p.eps_over_c != acc_t(0);
  auto st = OnlineState<acc_t>::empty();
  for_each_logit<scalar_t, acc_t>(x, p.C, [&](int64_t c, acc_t v) {
    st.add(capped(v, p), weight != nullptr && smoothing ? acc_t(weight[c]) : acc_t(1), smoothing);
  });
  st = block_merge(st);
  nan_under_inf_max(st, x, p.C);
  // An inf class weight makes W log_s - wz inf - inf where its logit is the max: that rare row sums the smoothing
  // term's parts w[c] (log_s - (z[c] - m)), each >= 0, in a second pass; -wz then holds the sum, W log_s is 0.
  const bool smoothing_rescan = smoothing && weight != nullptr && !::isfinite(st.ws);
  if (smoothing_rescan) {
    const acc_t log_s = ::log(st.s);
    OnlineState<acc_t> part{st.m, acc_t(0), acc_t(0), acc_t(0)};  // equal maxes and ws = 0: the merge adds wz
    for_each_logit<scalar_t, acc_t>(x, p.C, [&](int64_t c, acc_t v) {
      part.wz -= acc_t(weight[c]) * (log_s - (capped(v, p) - st.m));
    });
    __syncthreads();  // block_merge's shared memory, read by every thread above, is rewritten
    st.wz = block_merge(part).wz;
  }
  if (threadIdx.x != 0) return;

  const RowTarget tg = row_target(target, row, p.C, p.ignore_index);
  assert_in_range(tg);
  const acc_t log_s = ::log(st.s);
  // +inf with a +inf logit and no NaN, as torch.logsumexp (m + log_s is inf + nan there)
  const acc_t row_lse = st.m == std::numeric_limits<acc_t>::infinity() ? st.m : st.m + log_s;
  acc_t out = 0;
  if (tg.kept) {
    const acc_t w_t = weight == nullptr ? acc_t(1) : tg.valid ? acc_t(weight[tg.t]) : acc_t(0);
    const acc_t z_t = tg.valid ? capped(acc_t(x[tg.t]), p) : acc_t(0);
    const acc_t nll = log_s - (z_t - st.m);  // lse - z[t] without cancelling lse against z[t]
    if (smoothing) {
      // eps / C * sum_c w[c] * (lse - z[c]) = eps / C * (W * log_s - wz), terms of one sign
      const acc_t w_sum = weight == nullptr ? acc_t(p.C) : smoothing_rescan ? acc_t(0) : st.ws;
      out = w_t * p.keep * nll + p.eps_over_c * (w_sum * log_s - st.wz);
    } else {
      out = w_t * nll;
    }
    if (p.z_loss != acc_t(0)) out += w_t * p.z_loss * row_lse * row_lse;
  }
  loss[row] = out;
  lse[row] = row_lse;
}

// grad[row] = a * p - b * onehot(t) + e * (W p - w), times sech2(logits / softcap) with a softcap, where
// p = softmax(z) as exp(z - m - log s) from the row's (m, s), recomputed (not exp(z - lse): lse is rounded at the
// scale of m), and, with g = grad_loss[row] (0 for an ignored row) and W = w_sum[0] (C without a weight):
// a = g * w[t] * ((1 - eps) + 2 z_loss lse) + grad_lse[row], b = g w[t] (1 - eps), e = g eps / C. e (W p - w) is
// not folded into a (a 1e30 class weight's e W took the rest's digits: a gradient of 2.5e21 for 3.2).
// grad may be logits (the in-place forward): each thread reads an element before it writes it.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                  const at::opmath_type<scalar_t>* __restrict__ grad_lse,
                                  const scalar_t* logits, const int64_t* __restrict__ target,
                                  const scalar_t* __restrict__ weight,
                                  const at::opmath_type<scalar_t>* __restrict__ w_sum,
                                  const at::opmath_type<scalar_t>* __restrict__ lse, scalar_t* grad,
                                  const CeParams<at::opmath_type<scalar_t>> p, bool vectorize) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  auto st = OnlineState<acc_t>::empty();
  for_each_logit<scalar_t, acc_t>(logits + row * p.C, p.C, [&](int64_t, acc_t v) { st.add(capped(v, p), 0, false); });
  st = block_merge(st);  // every read of the row happens before the first write: grad may be logits
  const acc_t log_s = ::log(st.s);
  const RowTarget tg = row_target(target, row, p.C, p.ignore_index);
  const bool smoothing = p.eps_over_c != acc_t(0);
  const acc_t row_lse = lse[row];
  const acc_t g = tg.kept ? grad_loss[row] : acc_t(0);
  const acc_t w_t = weight == nullptr ? acc_t(1) : tg.valid ? acc_t(weight[tg.t]) : acc_t(0);
  acc_t a = w_t * p.keep;
  const acc_t W = !smoothing ? acc_t(0) : w_sum == nullptr ? acc_t(p.C) : *w_sum;
  if (p.z_loss != acc_t(0)) a += acc_t(2) * p.z_loss * w_t * row_lse;
  a = g * a + (grad_lse == nullptr ? acc_t(0) : grad_lse[row]);
  const acc_t b = tg.valid ? g * w_t * p.keep : acc_t(0);
  const acc_t e = g * p.eps_over_c;
  map_logits<scalar_t, acc_t>(logits + row * p.C, grad + row * p.C, p.C, vectorize, [&](int64_t c, acc_t v) {
    const acc_t q = ::exp((capped(v, p) - st.m) - log_s);
    acc_t d = a * q - (c == tg.t ? b : acc_t(0));
    if (smoothing) d += e * (W * q - (weight == nullptr ? acc_t(1) : acc_t(weight[c])));
    if (p.inv_softcap != acc_t(0)) d *= act::sech2(v * p.inv_softcap);  // not 1 - th^2, which rounds to 0 first
    return d;
  });
  assert_in_range(tg);
}

// Class-probability targets (cross_entropy_soft_*): q[c] = w[c] ((1 - eps) target[c] + eps / C).
// (target times v) times the weight, PyTorch's order: a zero v (lse - z of a one-class row) gives 0 at a 1e30 target
// and a 1e30 weight.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t soft_q(const scalar_t* t, const scalar_t* weight, int64_t c, const CeParams<acc_t>& p,
                                        acc_t v = acc_t(1)) {
  const acc_t q = (p.eps_over_c == acc_t(0) ? acc_t(t[c]) : p.keep * acc_t(t[c]) + p.eps_over_c) * v;
  return weight == nullptr ? q : q * acc_t(weight[c]);
}

// q = hi + lo: the weight's product with the smoothed target and that product's rounding error (an FMA: exact),
// lo 0 where the product is not finite, and in float64.
template <typename acc_t>
struct QParts { acc_t hi, lo; };

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ QParts<acc_t> soft_q_parts(const scalar_t* t, const scalar_t* weight, int64_t c,
                                                      const CeParams<acc_t>& p) {
  const acc_t a = soft_q<scalar_t, acc_t>(t, nullptr, c, p);
  // float64 keeps the rounded product, as a float64 reference does (its lo parts spilled registers on sm_80)
  if (weight == nullptr || std::is_same_v<acc_t, double>) return {weight == nullptr ? a : a * acc_t(weight[c]), acc_t(0)};
  const acc_t w = acc_t(weight[c]), hi = a * w;
  return {hi, isfinite(hi) ? ::fma(a, w, -hi) : acc_t(0)};
}

// The block's sum of every thread's v, in every thread (calls in one kernel need a __syncthreads() between them:
// they share T's shared memory).
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kMaxThreads / kWarp];
  for (int mask = kWarp / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = v;
  __syncthreads();
  v = T(0);
  for (int w = 0; w < int(blockDim.x / kWarp); ++w) v += partial[w];
  return v;
}

// loss[row] = sum_c q[c] (log s - (z[c] - m)): each term >= 0 for q >= 0, none large at any logit scale.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_soft_forward_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ target,
                                      const scalar_t* __restrict__ weight, at::opmath_type<scalar_t>* __restrict__ loss,
                                      at::opmath_type<scalar_t>* __restrict__ lse,
                                      const CeParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t *x = logits + row * p.C, *t = target + row * p.C;
  auto st = OnlineState<acc_t>::empty();
  for_each_logit<scalar_t, acc_t>(x, p.C, [&](int64_t, acc_t v) { st.add(v, 0, false); });
  st = block_merge(st);
  nan_under_inf_max(st, x, p.C);
  const acc_t log_s = ::log(st.s);
  acc_t part = 0;
  for_each_logit<scalar_t, acc_t>(x, p.C, [&](int64_t c, acc_t v) { part += soft_q(t, weight, c, p, log_s - (v - st.m)); });
  const acc_t sum = block_sum(part);
  if (threadIdx.x != 0) return;
  loss[row] = sum;
  lse[row] = st.m == std::numeric_limits<acc_t>::infinity() ? st.m : st.m + log_s;
}

// grad[row] = g (Q p - q) + grad_lse[row] p, g = grad_loss[row], Q = sum_c q[c], p recomputed as above.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_soft_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                       const at::opmath_type<scalar_t>* __restrict__ grad_lse,
                                       const scalar_t* __restrict__ logits, const scalar_t* __restrict__ target,
                                       const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad,
                                       const CeParams<at::opmath_type<scalar_t>> p, bool vectorize) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t *x = logits + row * p.C, *t = target + row * p.C;
  auto st = OnlineState<acc_t>::empty();
  for_each_logit<scalar_t, acc_t>(x, p.C, [&](int64_t, acc_t v) { st.add(v, 0, false); });
  st = block_merge(st);
  const acc_t log_s = ::log(st.s);
  // Q p - q cancels where p ~ 1 and q holds most of Q: Q (summed in double) and each q are carried as hi + lo
  // parts, and at the row's single maximum with p > 1/2 the value is (Q - q) - Q (1 - p) with Q - q the other
  // classes' q summed and 1 - p their p (as the CPU kernel, csrc/cpu/isa/cross_entropy.h)
  double part_hi = 0, part_lo = 0;
  for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
    const auto q = soft_q_parts(t, weight, c, p);
    part_hi += double(q.hi), part_lo += double(q.lo);
  }
  const double sum_hi = block_sum(part_hi);
  __syncthreads();
  const double sum_lo = block_sum(part_lo);
  const acc_t q_hi = acc_t(sum_hi), q_lo = isfinite(q_hi) ? acc_t((sum_hi - double(q_hi)) + sum_lo) : acc_t(0);
  const acc_t g = grad_loss[row], g_lse = grad_lse == nullptr ? acc_t(0) : grad_lse[row];
  const bool confident = isfinite(st.m) && isfinite(q_hi) && log_s < acc_t(0.69);
  map_logits<scalar_t, acc_t>(x, grad + row * p.C, p.C, vectorize, [&](int64_t c, acc_t v) {
    const acc_t prob = ::exp((v - st.m) - log_s);
    const auto q = soft_q_parts(t, weight, c, p);
    // g (Q p - q) with Q p - q in one rounding, not g Q p - g q: contracted, that left g q's rounding
    return g * (::fma(q_hi, prob, -q.hi) + ::fma(q_lo, prob, -q.lo)) + g_lse * prob;
  });
  if (!confident) return;
  double rest = 0, others = 0, maxima = 0, at_max = 0;  // a second read of the row, in confident rows only
  for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
    const acc_t v = acc_t(x[c]);
    if (v == st.m) {
      maxima += 1, at_max += double(c);  // at_max: the index, where there is one maximum
      continue;
    }
    const auto q = soft_q_parts(t, weight, c, p);
    rest += double(::exp((v - st.m) - log_s)), others += double(q.hi) + double(q.lo);
  }
  const auto sum = [](double v) { __syncthreads(); return block_sum(v); };  // block_sum's memory is shared
  rest = sum(rest), maxima = sum(maxima), at_max = sum(at_max), others = sum(others);
  if (threadIdx.x != 0 || maxima != 1) return;
  const int64_t m = int64_t(at_max);
  const acc_t d = acc_t(others) - (q_hi + q_lo) * acc_t(rest);
  grad[row * p.C + m] = scalar_t(g * d + g_lse * ::exp(-log_s));
}

// ---- the ops --------------------------------------------------------------------------------------------------

// The shared checks (cross_entropy.h), and the CUDA kernels' own limit.
void check_cuda_ce_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        double label_smoothing, std::optional<double> softcap) {
  check_ce_args(logits, target, weight, label_smoothing, softcap);
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), "cross_entropy(): the CUDA kernels take at "
              "most 2^31 - 1 rows, got ", logits.size(0));
}

at::ScalarType math_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename acc_t>
CeParams<acc_t> make_params(int64_t C, int64_t ignore_index, double label_smoothing, double z_loss,
                            std::optional<double> softcap) {
  return {C,
          ignore_index,
          acc_t(1.0 - label_smoothing),
          acc_t(C > 0 ? label_smoothing / double(C) : 0.0),
          acc_t(z_loss),
          acc_t(softcap.has_value() ? 1.0 / *softcap : 0.0),
          acc_t(softcap.value_or(0.0))};
}

// Threads per row: one 16-byte vector each, a power of two from a warp to kMaxThreads.
int threads_for(int64_t C, int64_t element_size) {
  const int64_t vectors = (C * element_size + 15) / 16;
  int threads = kWarp;
  while (threads < kMaxThreads && threads < vectors) threads *= 2;
  return threads;
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// t contiguous, and of `dtype` when one is given; nullopt stays nullopt.
std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t,
                                     std::optional<at::ScalarType> dtype = std::nullopt) {
  if (!t.has_value()) return std::nullopt;
  return (dtype.has_value() ? t->to(*dtype) : *t).contiguous();
}

// The forward kernel: per-row (loss, lse) of contiguous x and t.
std::tuple<at::Tensor, at::Tensor> forward_rows(const at::Tensor& x, const at::Tensor& t,
                                                const std::optional<at::Tensor>& w, int64_t ignore_index,
                                                double label_smoothing, double z_loss, std::optional<double> softcap) {
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor loss = at::empty({N}, x.options().dtype(math_type(x)));
  at::Tensor lse = at::empty({N}, x.options().dtype(math_type(x)));
  if (N == 0) return {loss, lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_forward_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for(C, sizeof(scalar_t)), 0, stream>>>(
        x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), data_or_null<scalar_t>(w),
        loss.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
        make_params<acc_t>(C, ignore_index, label_smoothing, z_loss, softcap));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

// The backward kernel into grad (contiguous, (N, C); it may be x itself), from per-row gl and lse in the math
// dtype.
void backward_into(const at::Tensor& gl, const std::optional<at::Tensor>& glse, const at::Tensor& x,
                   const at::Tensor& t, const std::optional<at::Tensor>& w, const at::Tensor& l, at::Tensor& grad,
                   int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap) {
  const int64_t N = x.size(0), C = x.size(1);
  if (grad.numel() == 0) return;
  // sum(weight) on the device: the one pass over a row needs it before it starts
  const std::optional<at::Tensor> w_sum =
      w.has_value() && label_smoothing != 0.0 ? std::optional<at::Tensor>(w->sum(math_type(x))) : std::nullopt;
  // x and grad rows share their offset from a 16-byte boundary when their bases do
  const auto address = [](const at::Tensor& v) { return reinterpret_cast<uintptr_t>(v.const_data_ptr()); };
  const bool vectorize = (address(x) - address(grad)) % 16 == 0;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_backward_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for(C, sizeof(scalar_t)), 0, stream>>>(
        gl.const_data_ptr<acc_t>(), data_or_null<acc_t>(glse), x.const_data_ptr<scalar_t>(),
        t.const_data_ptr<int64_t>(), data_or_null<scalar_t>(w), data_or_null<acc_t>(w_sum), l.const_data_ptr<acc_t>(),
        grad.mutable_data_ptr<scalar_t>(), make_params<acc_t>(C, ignore_index, label_smoothing, z_loss, softcap),
        vectorize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                         double label_smoothing, double z_loss,
                                                         std::optional<double> softcap, c10::string_view reduction) {
  check_cuda_ce_args(logits, target, weight, label_smoothing, softcap);
  const CeReduction red = parse_reduction(reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto [loss, lse] = forward_rows(logits.contiguous(), target.contiguous(), contiguous(weight), ignore_index,
                                  label_smoothing, z_loss, softcap);
  return {ce_reduce_rows(loss, target, weight, ignore_index, red, label_smoothing), lse};
}

// The forward, then the backward with grad_loss 1 written into grad (which may be the logits; a non-contiguous
// grad through a contiguous buffer, copied in): two passes over the logits.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_grad(const at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              int64_t ignore_index, double label_smoothing,
                                                              double z_loss, std::optional<double> softcap,
                                                              c10::string_view reduction, at::Tensor& grad) {
  check_cuda_ce_args(logits, target, weight, label_smoothing, softcap);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device() == logits.device(),
              "cross_entropy_forward_grad(): expected grad shaped as logits ", logits.sizes(), " of dtype ",
              logits.scalar_type(), " on ", logits.device(), ", got ", grad.sizes(), " ", grad.scalar_type(), " on ",
              grad.device());
  const CeReduction red = parse_reduction(reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.contiguous();
  const std::optional<at::Tensor> w = contiguous(weight);
  auto [loss, lse] = forward_rows(x, t, w, ignore_index, label_smoothing, z_loss, softcap);
  const auto math = math_type(logits);
  const at::Tensor one = red == CeReduction::None ? at::ones({x.size(0)}, lse.options()) : at::ones({}, lse.options());
  at::Tensor out = grad.is_contiguous() ? grad : at::empty_like(x);
  backward_into(ce_row_grad_loss(one, t, weight, ignore_index, red, math), std::nullopt, x, t, w, lse, out,
                ignore_index, label_smoothing, z_loss, softcap);
  if (!out.is_same(grad)) grad.copy_(out);
  return {ce_reduce_rows(loss, t, weight, ignore_index, red, label_smoothing), lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                  const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                  double label_smoothing, double z_loss, std::optional<double> softcap,
                                  c10::string_view reduction) {
  check_cuda_ce_args(logits, target, weight, label_smoothing, softcap);
  const CeReduction red = parse_reduction(reduction);
  check_ce_backward_rows(grad_loss, grad_lse, lse, logits, red);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const auto math = math_type(logits);
  const at::Tensor t = target.contiguous();
  backward_into(ce_row_grad_loss(grad_loss, t, weight, ignore_index, red, math), contiguous(grad_lse, math),
                logits.contiguous(), t, contiguous(weight), lse.to(math).contiguous(), grad, ignore_index,
                label_smoothing, z_loss, softcap);
  return grad;
}

void check_cuda_soft_ce_args(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, double label_smoothing) {
  check_soft_ce_args(logits, target, weight, label_smoothing);
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), "cross_entropy(): the CUDA kernels take at "
              "most 2^31 - 1 rows, got ", logits.size(0));
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_soft_forward(const at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              double label_smoothing) {
  check_cuda_soft_ce_args(logits, target, weight, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor loss = at::empty({N}, logits.options().dtype(math_type(logits)));
  at::Tensor lse = at::empty({N}, logits.options().dtype(math_type(logits)));
  if (N == 0) return {loss, lse};
  const at::Tensor x = logits.contiguous(), t = target.contiguous();
  const std::optional<at::Tensor> w = contiguous(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_soft_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_soft_forward_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for(C, sizeof(scalar_t)), 0,
                                                  at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(w),
        loss.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
        make_params<acc_t>(C, 0, label_smoothing, 0.0, std::nullopt));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

at::Tensor cross_entropy_soft_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                       double label_smoothing) {
  check_cuda_soft_ce_args(logits, target, weight, label_smoothing);
  check_soft_ce_backward_rows(grad_loss, grad_lse, lse, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (grad.numel() == 0) return grad;
  const auto math = math_type(logits);
  const at::Tensor x = logits.contiguous(), t = target.contiguous(), gl = grad_loss.to(math).contiguous();
  const std::optional<at::Tensor> w = contiguous(weight), glse = contiguous(grad_lse, math);
  const auto address = [](const at::Tensor& v) { return reinterpret_cast<uintptr_t>(v.const_data_ptr()); };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_soft_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cross_entropy_soft_backward_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for(C, sizeof(scalar_t)), 0,
                                                   at::cuda::getCurrentCUDAStream()>>>(
        gl.const_data_ptr<acc_t>(), data_or_null<acc_t>(glse), x.const_data_ptr<scalar_t>(),
        t.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(w), grad.mutable_data_ptr<scalar_t>(),
        make_params<acc_t>(C, 0, label_smoothing, 0.0, std::nullopt), (address(x) - address(grad)) % 16 == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace fusedlayers::cuda

TORCH_LIBRARY_IMPL(fusedlayers, CUDA, m) {
  m.impl("cross_entropy_forward", &fusedlayers::cuda::cross_entropy_forward);
  m.impl("cross_entropy_forward_grad", &fusedlayers::cuda::cross_entropy_forward_grad);
  m.impl("cross_entropy_backward", &fusedlayers::cuda::cross_entropy_backward);
  m.impl("cross_entropy_soft_forward", &fusedlayers::cuda::cross_entropy_soft_forward);
  m.impl("cross_entropy_soft_backward", &fusedlayers::cuda::cross_entropy_soft_backward);
}
