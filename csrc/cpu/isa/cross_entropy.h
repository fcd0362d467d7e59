// The kernels of softmax cross-entropy (cpu/cross_entropy.cpp), one row of logits at a time.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/isa/common.h"
#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace fusedlayers::cpu::FL_ISA {
namespace {

template <typename M>
at::vec::Vectorized<M> ce_logits(const CeRow<M>& row, int64_t c, int n) {
  using V = at::vec::Vectorized<M>;
  const V x = V::loadu(row.x + c, n);  // lanes past n are zero
  if (row.softcap == M(0)) return x;
  return V(row.softcap) * (x * V(M(1) / row.softcap)).tanh();
}

// tanh(x[c] / softcap) by the vector code's tanh, so that a logit read alone (the target's) equals its value
// in the row: a capped target logit through std::tanh could pass the row's max and make a loss negative.
template <typename M>
M ce_scalar_tanh(const CeRow<M>& row, int64_t c) {
  using V = at::vec::Vectorized<M>;
  M lanes[V::size()];
  (V::loadu(row.x + c, 1) * V(M(1) / row.softcap)).tanh().store(lanes);
  return lanes[0];
}

template <typename M>
M ce_scalar_logit(const CeRow<M>& row, int64_t c) {
  return row.softcap == M(0) ? row.x[c] : row.softcap * ce_scalar_tanh(row, c);
}

}  // namespace

// Online logsumexp per lane over blocks of four vectors: the running sum is rescaled once per block, so a
// logit costs about one exp. The running max starts at the lowest finite value, not -inf, so that lanes
// with nothing yet (or masked-off tail lanes, set to -inf) never compute -inf - -inf. A lane's sum is taken
// in two levels, kFlush blocks at a time: a lane holding the max's 1 would otherwise round every small term
// it adds to an ulp of 1 (C = 16385, one logit 12 above the rest: p off by 5e-5 in float32, as PyTorch's).
template <typename M>
CeSoftmax<M> ce_softmax_row(const CeRow<M>& row) {
  using V = at::vec::Vectorized<M>;
  using E = Math<V>;  // its exp: about 1 ulp (ATen's exp_u20: 20), and NaN in gives NaN out
  constexpr int64_t L = V::size();
  constexpr int kAllLanes = (1 << L) - 1;  // zero_mask() of a comparison true in no lane
  constexpr int kFlush = 16;
  const int64_t C = row.C;
  V vmax(std::numeric_limits<M>::lowest()), vsum(M(0)), vpart(M(0));
  int64_t c = 0;
  for (int blocks = 1; c + 4 * L <= C; c += 4 * L, ++blocks) {
    const V z0 = ce_logits(row, c, L), z1 = ce_logits(row, c + L, L), z2 = ce_logits(row, c + 2 * L, L),
            z3 = ce_logits(row, c + 3 * L, L);
    const V m = at::vec::maximum(vmax, at::vec::maximum(at::vec::maximum(z0, z1), at::vec::maximum(z2, z3)));
    // the rescale only when a lane's max moved (a NaN always): past the first blocks it rarely does
    if ((m != vmax).zero_mask() != kAllLanes) {
      const V scale = E::exp(vmax - m);
      vsum = vsum * scale;
      vpart = vpart * scale;
    }
    vpart = vpart + ((E::exp(z0 - m) + E::exp(z1 - m)) + (E::exp(z2 - m) + E::exp(z3 - m)));
    vmax = m;
    if (blocks % kFlush == 0) {
      vsum = vsum + vpart;
      vpart = V(M(0));
    }
  }
  vsum = vsum + vpart;
  for (; c < C; c += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, C - c));
    const V z = ce_logits(row, c, n);
    const V zm = n == L ? z : V::set(V(-std::numeric_limits<M>::infinity()), z, n);
    const V m = at::vec::maximum(vmax, zm);
    vsum = vsum * E::exp(vmax - m) + E::exp(zm - m);
    vmax = m;
  }
  // The lanes merged in vectors: one exp per lane written out costs more than a short row (C = 10: 16 exps)
  M lane_max[L];
  vmax.store(lane_max);
  // NaN-propagating, as at::vec::maximum is per lane: a row with +inf and NaN logits has lse NaN, not +inf
  M mx = lane_max[0];
  for (int64_t l = 1; l < L; ++l) mx = std::isnan(lane_max[l]) || lane_max[l] > mx ? lane_max[l] : mx;
  return {mx, std::log(lane_sum(vsum * E::exp(vmax - V(mx))))};
}

// The loss comes from log(sum) and z - max: with large logits (1e4 in float32) lse - z[t] would cancel to a
// thousandth.
template <typename M>
M ce_forward_row(const CeRow<M>& row, CeSoftmax<M>* softmax) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t L = V::size();
  const int64_t C = row.C;
  *softmax = ce_softmax_row(row);
  const M mx = softmax->shift, log_sum = softmax->log_norm, lse = softmax->lse();
  if (row.target < 0) return M(0);
  const M eps = row.label_smoothing;
  const M wt = row.weight ? row.weight[row.target] : M(1);
  M loss = wt * ((M(1) - eps) * (log_sum - (ce_scalar_logit(row, row.target) - mx)));
  // wt z_loss lse lse left to right, as the GPU kernels: a zero class weight gives 0 even where lse^2 overflows;
  // and only with a z_loss, as they: an inf class weight times z_loss 0 was NaN (PyTorch: inf)
  if (row.z_loss != M(0)) loss += wt * row.z_loss * lse * lse;
  if (eps != M(0)) {
    // sum_c w_c (lse - z_c) as sum_c w_c (log_sum - (z_c - max)): a second pass, once the max is known, so that
    // no term is large (an outlier logit as a reference made -FLT_MAX overflow), -inf logits give +inf, and
    // every term is >= 0 (an inf weight at the max made W log_sum - sum w_c (z_c - max) inf - inf)
    const V vmx(mx), vlog(log_sum);
    V vzw(M(0));
    for (int64_t c = 0; c < C; c += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, C - c));
      const V zr = V::set(V(M(0)), vlog - (ce_logits(row, c, n) - vmx), n);  // lanes past n add nothing
      vzw = vzw + (row.weight ? zr * V::loadu(row.weight + c, n) : zr);
    }
    loss += eps / M(C) * lane_sum(vzw);
  }
  return loss;
}

// grad = (nll + rest) p + e (W p - w) (w = 1 without weights) off the target, times dz/dx with a softcap; the
// target's entry subtracts nll, its terms kept apart (below). e (W p - w) is not folded into (nll + rest + e W) p -
// e w: a 1e30 class weight's e W took nll's digits (a gradient of 2.5e21 where PyTorch's is 3.2).
template <typename M>
void ce_backward_row(const CeRow<M>& row, CeSoftmax<M> softmax, M grad_loss, M grad_lse, M* grad) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t L = V::size();
  const int64_t C = row.C;
  const bool kept = row.target >= 0;
  const M eps = row.label_smoothing;
  const M lse = softmax.lse();
  const M gl = kept ? grad_loss : M(0);
  const M wt = !kept ? M(0) : row.weight ? row.weight[row.target] : M(1);
  const M W = row.weight ? row.weight_sum : M(C);
  // W only with smoothing: an absent class's inf weight would make eps * W = 0 * inf a NaN in every gradient (with
  // smoothing PyTorch's are NaN too, ignored rows included); z_loss only in kept rows, where an inf lse is 0 * inf.
  const bool smooth = eps != M(0);
  const M e = smooth ? gl * eps / M(C) : M(0);  // gl is inf for a "mean" over weights summing to 0
  const M nll = gl * wt * (M(1) - eps);
  const M rest = (kept && row.z_loss != M(0) ? gl * wt * M(2) * row.z_loss * lse : M(0)) + grad_lse;
  const bool cap = row.softcap != M(0);
  const V va(nll + rest), ve(e), vW(W), one(M(1)), vshift(softmax.shift), vlog(softmax.log_norm), vs(row.softcap),
      inv_s(cap ? M(1) / row.softcap : M(0));
  // read before the loop: grad may be the row's logits (the in-place forward)
  const M u_t = kept && cap ? row.x[row.target] * (M(1) / row.softcap) : M(0);
  const M z_t = kept ? ce_scalar_logit(row, row.target) : M(0);
  for (int64_t c = 0; c < C; c += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, C - c));
    const V x = V::loadu(row.x + c, n);
    V z = x;
    if (cap) z = vs * (x * inv_s).tanh();
    const V p = Math<V>::exp((z - vshift) - vlog);
    V g = va * p;
    if (smooth) g = g + ve * (vW * p - (row.weight ? V::loadu(row.weight + c, n) : one));
    // dz/dx = sech2(x / softcap), not 1 - th^2: the vector tanh rounds to +-1 where sech2 is still 1e-7, and an
    // inf gradient times that 0 was NaN (PyTorch: inf)
    if (cap) g = g * act::sech2(x * inv_s);
    g.store(grad + c, n);
  }
  if (kept) {
    // (nll p - nll) + e (W p - w_t) + rest p, the same value with its terms kept apart: a confident row's p = 1
    // keeps a small rest (an lse gradient) next to a large nll, and C = 1 with smoothing gives 0 exactly; nll p -
    // nll as PyTorch's softmax backward forms it (inf - inf = NaN for a "mean" over weights summing to 0)
    M lanes[L];
    Math<V>::exp(V((z_t - softmax.shift) - softmax.log_norm)).store(lanes);  // the loop's exp
    const M p_t = lanes[0];
    M d = (nll * p_t - nll) + rest * p_t;
    if (smooth) d += e * (W * p_t - wt);
    grad[row.target] = cap ? d * act::sech2(u_t) : d;
  }
}

// Class-probability targets, with q[c] = w[c] ((1 - eps) target[c] + eps / C) (w = 1 without weights): the loss
// sum_c q[c] (lse - z[c]) as sum_c q[c] (log_sum - (z[c] - max)), each term >= 0 for q >= 0 and none large, and
// the gradient grad_loss (Q p - q) + grad_lse p, Q = sum_c q[c]. No softcap (row.softcap is 0).
template <typename M>
at::vec::Vectorized<M> ce_soft_smoothed(const CeRow<M>& row, const M* target, int64_t c, int n) {
  using V = at::vec::Vectorized<M>;
  const V t = V::loadu(target + c, n);
  return row.label_smoothing == M(0) ? t : V(M(1) - row.label_smoothing) * t + V(row.label_smoothing / M(row.C));
}

template <typename M>
at::vec::Vectorized<M> ce_soft_weighted(const CeRow<M>& row, at::vec::Vectorized<M> v, int64_t c, int n) {
  return row.weight ? v * at::vec::Vectorized<M>::loadu(row.weight + c, n) : v;
}

template <typename M>
M ce_soft_forward_row(const CeRow<M>& row, const M* target, CeSoftmax<M>* softmax) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t L = V::size();
  *softmax = ce_softmax_row(row);
  const V vmx(softmax->shift), vlog(softmax->log_norm);
  V sum(M(0));
  for (int64_t c = 0; c < row.C; c += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, row.C - c));
    // (target (lse - z)) w, as PyTorch's order: a 1e30 target at a 1e30 weight whose class has lse - z = 0 gives 0
    const V term = ce_soft_weighted(row, ce_soft_smoothed(row, target, c, n) * (vlog - (V::loadu(row.x + c, n) - vmx)),
                                    c, n);
    sum = sum + (n == L ? term : V::set(V(M(0)), term, n));  // lanes past n add nothing
  }
  return lane_sum(sum);
}

// q as q_hi + q_lo: the weight's product with the (smoothed) target and its rounding error (exact, by an FMA),
// 0 where the product is not finite
template <typename M>
std::pair<at::vec::Vectorized<M>, at::vec::Vectorized<M>> ce_soft_q_parts(const CeRow<M>& row, const M* target,
                                                                           int64_t c, int n) {
  using V = at::vec::Vectorized<M>;
  const V s = ce_soft_smoothed(row, target, c, n);
  if (!row.weight) return {s, V(M(0))};
  const V w = V::loadu(row.weight + c, n), hi = s * w;
  return {hi, V::blendv(V(M(0)), at::vec::fmadd(s, w, -hi), (hi - hi) == V(M(0)))};
}

// A sum compensated per lane (Kahan), the lanes merged compensated in double: a plain float sum of thousands of
// equal terms drifts (9x PyTorch's error in 1 - p at C = 16385, found by review).
template <typename M>
struct LaneKahan {
  using V = at::vec::Vectorized<M>;
  V sum{M(0)}, lost{M(0)};
  void add(V v) {
    const V y = v - lost, t = sum + y;
    lost = (t - sum) - y;
    sum = t;
  }
  double total() const {
    M sums[V::size()], losts[V::size()];
    sum.store(sums);
    lost.store(losts);
    double s = 0, l = 0;
    for (int64_t i = 0; i < V::size(); ++i) add_kahan(s, l, static_cast<double>(sums[i]) - losts[i]);
    return s - l;
  }
};

template <typename M>
void ce_soft_backward_row(const CeRow<M>& row, const M* target, CeSoftmax<M> softmax, M grad_loss, M grad_lse,
                          M* grad) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t L = V::size();
  // Q p - q cancels where p ~ 1 and q holds most of Q: Q is summed compensated from each q's exact parts and
  // carried as Q_hi + Q_lo, and each q as its two parts too, so that Q_hi p - q_hi is one rounding (an FMA) and
  // Q's and q's own roundings do not enter (a plainly summed Q was 3x PyTorch's error at Q = 90.5, p = 1; a
  // rounded Q and q 15x at Q = 32.1, p = 1: the property-based suite)
  LaneKahan<M> q_sum;
  V plain(M(0)), low(M(0));
  for (int64_t c = 0; c < row.C; c += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, row.C - c));
    auto [hi, lo] = ce_soft_q_parts(row, target, c, n);
    if (n != L) hi = V::set(V(M(0)), hi, n), lo = V::set(V(M(0)), lo, n);  // lanes past n add nothing
    q_sum.add(hi);
    plain = plain + hi;
    low = low + lo;
  }
  const double plain_sum = lane_sum(plain), low_sum = lane_sum(low);
  // an inf or NaN q makes the compensation NaN (inf - inf): then the plain sum is the value
  const double Q = std::isfinite(plain_sum) ? q_sum.total() : plain_sum;
  const M Q_hi = static_cast<M>(Q);
  // what Q_hi leaves of the sum (its rounding to M, for float) and of the q's low parts (for double, which one
  // double does not hold next to their high parts); not Kahan's lost part below Q's double: a float64
  // reference's Q has none of it either (1e30 + -2.5 is 1e30 there)
  const M Q_lo = std::isfinite(Q_hi) ? static_cast<M>((Q - static_cast<double>(Q_hi)) + low_sum) : M(0);
  const V vQ_hi(Q_hi), vQ_lo(Q_lo), g(grad_loss), g_lse(grad_lse), vshift(softmax.shift), vlog(softmax.log_norm);
  // p > 1/2 at the row's maximum: there Q p - q is taken below as (Q - q) - Q (1 - p), with Q - q the other
  // classes' q summed (not Q's rounding: 1 ulp of Q = 355 in float64 is most of Q - q = 0.8) and 1 - p their p
  // summed (not 1 - p's rounding: 1 ulp of p is 6e-4 of 1 - p at p = 1 - 6e-5)
  const bool confident = std::isfinite(softmax.shift) && std::isfinite(Q_hi) && softmax.log_norm < M(0.69);
  LaneKahan<M> rest, others;
  V others_lo(M(0));
  int64_t at_max = -1, maxima = 0;
  for (int64_t c = 0; c < row.C; c += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, row.C - c));
    const V x = V::loadu(row.x + c, n), p = Math<V>::exp((x - vshift) - vlog);
    const auto [hi, lo] = ce_soft_q_parts(row, target, c, n);
    // g (Q p - q), not g Q p - g q: contracted, that left g q's rounding
    V d = g * (at::vec::fmadd(vQ_hi, p, -hi) + at::vec::fmadd(vQ_lo, p, -lo));
    if (grad_lse != M(0)) d = d + g_lse * p;
    d.store(grad + c, n);
    if (!confident) continue;
    const V top = x == vshift;
    rest.add(V::set(V(M(0)), V::blendv(p, V(M(0)), top), n));
    others.add(V::set(V(M(0)), V::blendv(hi, V(M(0)), top), n));
    others_lo = others_lo + V::set(V(M(0)), V::blendv(lo, V(M(0)), top), n);
    if (top.zero_mask() == (1 << L) - 1) continue;
    for (int l = 0; l < n; ++l)
      if (row.x[c + l] == softmax.shift) at_max = c + l, ++maxima;
  }
  if (maxima != 1) return;
  M lanes[L];
  const M d = static_cast<M>(others.total() + lane_sum(others_lo)) - (Q_hi + Q_lo) * static_cast<M>(rest.total());
  Math<V>::exp(V(-softmax.log_norm)).store(lanes);  // the loop's p
  grad[at_max] = grad_loss * d + (grad_lse != M(0) ? grad_lse * lanes[0] : M(0));
}

}  // namespace fusedlayers::cpu::FL_ISA
