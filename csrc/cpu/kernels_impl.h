// The kernels declared in kernels.h, for the instruction set the including file selects (FL_ISA names the
// namespace; CPU_CAPABILITY selects ATen's Vectorized implementation, and the target pragma the compiler's
// auto-vectorization of the plain loops).
//
// Every element goes through Vectorized, the row tails by partial loads: so this file instantiates the
// activation functors only for its own ISA's vector types, never for plain float/double, whose copies
// other files compile for the baseline ISA.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace fusedlayers::cpu::FL_ISA {
namespace {

// A row of a narrow matrix (cols not a multiple of the vector width) ends in a partial vector, and the
// per-row loop costs more than the arithmetic (12 columns: the bias pass of a 4096-row layer took as long as
// its GEMM). Rows are taken instead k at a time, k * cols = lcm(cols, vector width) elements that are whole
// vectors, against the bias repeated k times. Periods longer than kMaxPeriod elements (cols wide enough that
// the partial vector hardly matters) keep the row loop.
constexpr int64_t kMaxPeriod = 2048;

template <typename T>
int64_t period_rows(int64_t cols) {
  const int64_t lanes = at::vec::Vectorized<T>::size();
  return lanes / std::gcd(cols, lanes);
}

// f over the elements [b, b + n) of a matrix whose bias (null: none) for element i is bias[i % period]
// (period a multiple of the vector width unless n is one row).
template <typename Act, typename T>
void forward_span(const T* bias, T* z, T* y, int64_t n, bool store_z) {
  using V = at::vec::Vectorized<T>;
  for (int64_t c = 0; c < n; c += V::size()) {
    const int cnt = static_cast<int>(std::min<int64_t>(V::size(), n - c));
    V v = V::loadu(z + c, cnt);
    if (bias) v = v + V::loadu(bias + c, cnt);
    if (store_z) v.store(z + c, cnt);
    Act::f(v).store(y + c, cnt);
  }
}

template <typename Act, typename T>
void backward_span(const T* g, const T* z, T* dz, T* db, int64_t n) {
  using V = at::vec::Vectorized<T>;
  for (int64_t c = 0; c < n; c += V::size()) {
    const int cnt = static_cast<int>(std::min<int64_t>(V::size(), n - c));
    // Lanes past cnt hold zeros from the partial loads and are never stored.
    V d = V::loadu(g + c, cnt) * Act::df(V::loadu(z + c, cnt));
    d.store(dz + c, cnt);
    if (db) (V::loadu(db + c, cnt) + d).store(db + c, cnt);
  }
}

template <typename Act, int Order, typename T>
void derivative_loop(const T* g, const T* z, T* out, int64_t n) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int m = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    const V v = V::loadu(z + i, m);
    V d;
    if constexpr (Order == 0) d = Act::f(v);
    else if constexpr (Order == 1) d = Act::df(v);
    else if constexpr (Order == 2) d = Act::d2f(v);
    else d = Act::d3f(v);
    if (g) d = d * V::loadu(g + i, m);
    d.store(out + i, m);
  }
}

template <typename Act, typename T>
void forward_rows(const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols, bool store_z) {
  z += begin * cols;
  y += begin * cols;
  int64_t rows = end - begin;
  if (!bias) return forward_span<Act>(bias, z, y, rows * cols, store_z);
  const int64_t k = period_rows<T>(cols);
  if (k > 1 && k * cols <= kMaxPeriod && rows >= k) {
    T rep[kMaxPeriod];
    for (int64_t j = 0; j < k; ++j) std::copy(bias, bias + cols, rep + j * cols);
    const int64_t blocks = rows / k;
    for (int64_t i = 0; i < blocks; ++i) forward_span<Act>(rep, z + i * k * cols, y + i * k * cols, k * cols, store_z);
    z += blocks * k * cols;
    y += blocks * k * cols;
    rows -= blocks * k;
  }
  for (int64_t r = 0; r < rows; ++r) forward_span<Act>(bias, z + r * cols, y + r * cols, cols, store_z);
}

template <typename Act, typename T>
void backward_rows(const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end, int64_t cols) {
  g += begin * cols;
  z += begin * cols;
  dz += begin * cols;
  int64_t rows = end - begin;
  if (!db) return backward_span<Act>(g, z, dz, db, rows * cols);
  const int64_t k = period_rows<T>(cols);
  if (k > 1 && k * cols <= kMaxPeriod && rows >= k) {
    T rep[kMaxPeriod] = {};  // k rows of partial bias-gradient sums, folded into db at the end
    const int64_t blocks = rows / k, step = k * cols;
    for (int64_t i = 0; i < blocks; ++i) backward_span<Act>(g + i * step, z + i * step, dz + i * step, rep, step);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < cols; ++c) db[c] += rep[j * cols + c];
    g += blocks * step;
    z += blocks * step;
    dz += blocks * step;
    rows -= blocks * k;
  }
  for (int64_t r = 0; r < rows; ++r) backward_span<Act>(g + r * cols, z + r * cols, dz + r * cols, db, cols);
}

// The planes of z, h, g and dz are `plane` elements apart: 0 the value, 1 the first derivative, 2 the second.
template <typename Act, typename T>
void jet_forward_loop(const T* z, T* h, int64_t n, int64_t plane) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int m = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    const V z0 = V::loadu(z + i, m), z1 = V::loadu(z + plane + i, m), z2 = V::loadu(z + 2 * plane + i, m);
    const V d1 = Act::df(z0), d2 = Act::d2f(z0);
    Act::f(z0).store(h + i, m);
    (d1 * z1).store(h + plane + i, m);
    (d2 * z1 * z1 + d1 * z2).store(h + 2 * plane + i, m);
  }
}

template <typename Act, typename T>
void jet_backward_loop(const T* g, const T* z, T* dz, int64_t n, int64_t plane) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int m = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    const V z0 = V::loadu(z + i, m), z1 = V::loadu(z + plane + i, m), z2 = V::loadu(z + 2 * plane + i, m);
    const V g0 = V::loadu(g + i, m), g1 = V::loadu(g + plane + i, m), g2 = V::loadu(g + 2 * plane + i, m);
    const V d1 = Act::df(z0), d2 = Act::d2f(z0), d3 = Act::d3f(z0);
    (g0 * d1 + g1 * d2 * z1 + g2 * (d3 * z1 * z1 + d2 * z2)).store(dz + i, m);
    (g1 * d1 + V(T(2)) * g2 * d2 * z1).store(dz + plane + i, m);
    (g2 * d1).store(dz + 2 * plane + i, m);
  }
}

}  // namespace

template <typename T>
void activation_elements(Activation a, int order, const T* g, const T* z, T* out, int64_t n) {
  dispatch_activation(a, [&](auto act) {
    using Act = decltype(act);
    if (order == 0) derivative_loop<Act, 0>(g, z, out, n);
    else if (order == 1) derivative_loop<Act, 1>(g, z, out, n);
    else if (order == 2) derivative_loop<Act, 2>(g, z, out, n);
    else derivative_loop<Act, 3>(g, z, out, n);
  });
}

template <typename T>
void jet_forward_elements(Activation a, const T* z, T* h, int64_t n, int64_t plane) {
  dispatch_activation(a, [&](auto act) { jet_forward_loop<decltype(act)>(z, h, n, plane); });
}

template <typename T>
void jet_backward_elements(Activation a, const T* g, const T* z, T* dz, int64_t n, int64_t plane) {
  dispatch_activation(a, [&](auto act) { jet_backward_loop<decltype(act)>(g, z, dz, n, plane); });
}

template <typename T>
void dense_forward_rows(Activation a, const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols,
                        bool store_z) {
  dispatch_activation(a, [&](auto act) {
    forward_rows<decltype(act)>(bias, z, y, begin, end, cols, store_z);
  });
}

template <typename T>
void dense_backward_rows(Activation a, const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end,
                         int64_t cols) {
  dispatch_activation(a, [&](auto act) { backward_rows<decltype(act)>(g, z, dz, db, begin, end, cols); });
}

// ---- the fused mlp, a tile of R rows at a time, feature-major --------------------------------------------

namespace {

// out (rows x R) = A (rows x inner) @ h (inner x R) + bias, with A[i, j] = a[i * sa_i + j * sa_j], so that one
// loop serves W (the forward) and W^T (the gradient of a layer's input). A full tile keeps its rows of out
// in vector registers across the whole reduction.
template <typename M>
void tile_matmul(const M* a, int64_t sa_i, int64_t sa_j, const M* bias, const M* __restrict__ h,
                 M* __restrict__ out, int64_t rows, int64_t inner, int64_t R) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t kVectors = kMlpTileRows / V::size();
  static_assert(kMlpTileRows % V::size() == 0, "a full tile is a whole number of vectors");
  if (R == kMlpTileRows) {
    for (int64_t i = 0; i < rows; ++i) {
      V acc[kVectors];
      for (auto& v : acc) v = V(bias ? bias[i] : M(0));
      for (int64_t j = 0; j < inner; ++j) {
        const V aij(a[i * sa_i + j * sa_j]);
        const M* hj = h + j * R;
        for (int64_t v = 0; v < kVectors; ++v) acc[v] = at::vec::fmadd(aij, V::loadu(hj + v * V::size()), acc[v]);
      }
      for (int64_t v = 0; v < kVectors; ++v) acc[v].store(out + i * R + v * V::size());
    }
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    M* __restrict__ oi = out + i * R;
    const M b = bias ? bias[i] : M(0);
    for (int64_t r = 0; r < R; ++r) oi[r] = b;
    for (int64_t j = 0; j < inner; ++j) {
      const M aij = a[i * sa_i + j * sa_j];
      const M* __restrict__ hj = h + j * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) oi[r] += aij * hj[r];
    }
  }
}

// The sum of a vector's lanes: ATen's shuffles for float; double (no such specialization) through memory.
template <typename M>
M lane_sum(const at::vec::Vectorized<M>& v) {
  using V = at::vec::Vectorized<M>;
  if constexpr (std::is_same_v<M, float>) {
    return at::vec::vec_reduce_all<M>([](const V& a, const V& b) { return a + b; }, v);
  } else {
    M lanes[V::size()];
    v.store(lanes);
    for (int64_t w = V::size() / 2; w > 0; w /= 2)
      for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
    return lanes[0];
  }
}

// z (n x R) = W (n x in) h (in x R) + b
template <typename M>
void tile_linear(const M* w, const M* b, const M* __restrict__ h, M* __restrict__ z, int64_t in, int64_t n,
                 int64_t R) {
  if (R == 1) {  // one row (a single vector): dot products, vectorized over the inputs instead
    for (int64_t o = 0; o < n; ++o) {
      const M* __restrict__ wo = w + o * in;
      M s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < in; ++k) s += wo[k] * h[k];
      z[o] = s + (b ? b[o] : M(0));
    }
    return;
  }
  tile_matmul(w, in, 1, b, h, z, n, in, R);
}

// The tile's forward keeping every layer's input h_l (in hs) and pre-activation z_l (in zs); returns h_L.
template <typename M>
const M* tile_forward_keep(const MlpNet<M>& net, M* hs, M* zs, const M* x, int64_t R) {
  const M* h = x;
  for (int64_t l = 0; l < net.layers; ++l) {
    const int64_t in = net.widths[l], n = net.widths[l + 1];
    M* z = zs;
    M* out = hs;
    tile_linear(net.w[l], net.b ? net.b[l] : nullptr, h, z, in, n, R);
    dense_forward_rows<M>(net.acts[l], nullptr, z, out, 0, 1, n * R, false);
    h = out;
    hs += n * R;
    zs += n * R;
  }
  return h;
}

}  // namespace

template <typename M>
void mlp_tile_forward(const MlpNet<M>& net, int64_t R, M* workspace, const M* x, M* y) {
  const M* h = tile_forward_keep(net, workspace, workspace + net.sizes.outputs * R, x, R);
  std::copy(h, h + net.widths[net.layers] * R, y);
}

template <typename M>
void mlp_tile_backward(const MlpNet<M>& net, int64_t R, M* workspace, const M* x, const M* g_out, M* dx, M* dw,
                       M* db) {
  const int64_t L = net.layers, sum = net.sizes.outputs;
  M* hs = workspace;                   // h_1..h_L, each (n_l x R)
  M* zs = hs + sum * R;                // z_0..z_{L-1}
  M* g = zs + sum * R;                 // the gradient flowing back, (max_width x R)
  M* dz = g + net.sizes.max_width * R;
  tile_forward_keep(net, hs, zs, x, R);
  std::copy(g_out, g_out + net.widths[L] * R, g);
  // Offsets of layer l's h input, z, dW and db.
  int64_t act_off = sum * R, w_off = 0, b_off = 0;
  for (int64_t l = 0; l < L; ++l) {
    w_off += net.widths[l] * net.widths[l + 1];
    b_off += net.widths[l + 1];
  }
  for (int64_t l = L; l-- > 0;) {
    const int64_t in = net.widths[l], n = net.widths[l + 1];
    act_off -= n * R;
    w_off -= in * n;
    b_off -= n;
    const M* z = zs + act_off;
    const M* h = l == 0 ? x : hs + act_off - in * R;
    dense_backward_rows<M>(net.acts[l], g, z, dz, nullptr, 0, 1, n * R);
    M* dwl = dw + w_off;
    if (R == 1) {  // one row (a single vector): outer products, vectorized over the inputs instead
      for (int64_t o = 0; o < n; ++o) {
        if (db) db[b_off + o] += dz[o];
        M* __restrict__ dwo = dwl + o * in;
#pragma omp simd
        for (int64_t k = 0; k < in; ++k) dwo[k] += dz[o] * h[k];
      }
      if (l == 0 && !dx) break;
      M* __restrict__ gin = l == 0 ? dx : g;
      for (int64_t k = 0; k < in; ++k) gin[k] = M(0);
      for (int64_t o = 0; o < n; ++o) {
        const M* __restrict__ wo = net.w[l] + o * in;
#pragma omp simd
        for (int64_t k = 0; k < in; ++k) gin[k] += wo[k] * dz[o];
      }
      continue;
    }
    if (R == kMlpTileRows) {  // full tiles: the products summed in vector registers, one reduction per weight
      using V = at::vec::Vectorized<M>;
      constexpr int64_t kVectors = kMlpTileRows / V::size();
      for (int64_t o = 0; o < n; ++o) {
        V d[kVectors];
        for (int64_t v = 0; v < kVectors; ++v) d[v] = V::loadu(dz + o * R + v * V::size());
        if (db) {
          V s = d[0];
          for (int64_t v = 1; v < kVectors; ++v) s = s + d[v];
          db[b_off + o] += lane_sum(s);
        }
        for (int64_t k = 0; k < in; ++k) {
          const M* hk = h + k * R;
          V p = d[0] * V::loadu(hk);
          for (int64_t v = 1; v < kVectors; ++v) p = at::vec::fmadd(d[v], V::loadu(hk + v * V::size()), p);
          dwl[o * in + k] += lane_sum(p);
        }
      }
    }
    for (int64_t o = 0; o < n && R != kMlpTileRows; ++o) {
      const M* dzo = dz + o * R;
      if (db) {
        M s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t r = 0; r < R; ++r) s += dzo[r];
        db[b_off + o] += s;
      }
      for (int64_t k = 0; k < in; ++k) {
        const M* hk = h + k * R;
        M s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t r = 0; r < R; ++r) s += dzo[r] * hk[r];
        dwl[o * in + k] += s;
      }
    }
    if (l == 0 && !dx) break;
    // g is free again (dz holds what layer l needs): g (in x R) = W^T dz
    tile_matmul(net.w[l], 1, in, static_cast<const M*>(nullptr), dz, l == 0 ? dx : g, in, n, R);
  }
}

// ---- softmax cross-entropy, one row at a time ------------------------------------------------------------

namespace {

template <typename M>
at::vec::Vectorized<M> ce_logits(const CeRow<M>& row, int64_t c, int n) {
  using V = at::vec::Vectorized<M>;
  const V x = V::loadu(row.x + c, n);  // lanes past n are zero
  if (row.softcap == M(0)) return x;
  return V(row.softcap) * (x * V(M(1) / row.softcap)).tanh();
}

template <typename M>
M ce_scalar_logit(const CeRow<M>& row, int64_t c) {
  return row.softcap == M(0) ? row.x[c] : row.softcap * std::tanh(row.x[c] / row.softcap);
}

}  // namespace

// Online logsumexp per lane over blocks of four vectors: the running sum is rescaled once per block, so a
// logit costs about one exp. The running max starts at the lowest finite value, not -inf, so that lanes
// with nothing yet (or masked-off tail lanes, set to -inf) never compute -inf - -inf.
template <typename M>
M ce_forward_row(const CeRow<M>& row, M* lse_out) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t L = V::size();
  const int64_t C = row.C;
  const bool smooth = row.label_smoothing != M(0);
  // The smoothing sum is taken relative to a logit of the row (ref), and the loss from log(sum) and z - max:
  // with large logits (1e4 in float32) lse - z[t] would cancel to a thousandth.
  const M ref = C > 0 ? ce_scalar_logit(row, 0) : M(0);
  const V vref(ref);
  V vmax(std::numeric_limits<M>::lowest()), vsum(M(0)), vzw(M(0));
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L) {
    const V z0 = ce_logits(row, c, L), z1 = ce_logits(row, c + L, L), z2 = ce_logits(row, c + 2 * L, L),
            z3 = ce_logits(row, c + 3 * L, L);
    const V m = at::vec::maximum(vmax, at::vec::maximum(at::vec::maximum(z0, z1), at::vec::maximum(z2, z3)));
    vsum = vsum * (vmax - m).exp_u20() + (z0 - m).exp_u20() + (z1 - m).exp_u20() + (z2 - m).exp_u20() +
           (z3 - m).exp_u20();
    vmax = m;
    if (smooth && row.weight) {
      const M* w = row.weight + c;
      vzw = vzw + (z0 - vref) * V::loadu(w) + (z1 - vref) * V::loadu(w + L) + (z2 - vref) * V::loadu(w + 2 * L) +
            (z3 - vref) * V::loadu(w + 3 * L);
    } else if (smooth) {
      vzw = vzw + (((z0 - vref) + (z1 - vref)) + ((z2 - vref) + (z3 - vref)));
    }
  }
  for (; c < C; c += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, C - c));
    const V z = ce_logits(row, c, n);
    if (smooth) {
      const V zr = V::set(V(M(0)), z - vref, n);  // lanes past n add nothing
      vzw = vzw + (row.weight ? zr * V::loadu(row.weight + c, n) : zr);
    }
    const V zm = n == L ? z : V::set(V(-std::numeric_limits<M>::infinity()), z, n);
    const V m = at::vec::maximum(vmax, zm);
    vsum = vsum * (vmax - m).exp_u20() + (zm - m).exp_u20();
    vmax = m;
  }
  // The lanes merged in vectors: one exp per lane written out costs more than a short row (C = 10: 16 exps)
  M lane_max[L];
  vmax.store(lane_max);
  M mx = lane_max[0];
  for (int64_t l = 1; l < L; ++l) mx = std::max(mx, lane_max[l]);
  const M sum = lane_sum(vsum * (vmax - V(mx)).exp());
  const M zw = smooth ? lane_sum(vzw) : M(0);
  const M log_sum = std::log(sum), lse = mx + log_sum;
  *lse_out = lse;
  if (row.target < 0) return M(0);
  const M eps = row.label_smoothing;
  const M wt = row.weight ? row.weight[row.target] : M(1);
  const M W = row.weight ? row.weight_sum : M(C);
  M loss = wt * ((M(1) - eps) * (log_sum - (ce_scalar_logit(row, row.target) - mx)) + row.z_loss * lse * lse);
  if (smooth) loss += eps / M(C) * (W * (log_sum + (mx - ref)) - zw);  // sum_c w_c (lse - z_c)
  return loss;
}

// grad = a * p - b * w (w = 1 without weights), minus bt at the target, times dz/dx with a softcap.
template <typename M>
void ce_backward_row(const CeRow<M>& row, M lse, M grad_loss, M grad_lse, M* grad) {
  using V = at::vec::Vectorized<M>;
  constexpr int64_t L = V::size();
  const int64_t C = row.C;
  const bool kept = row.target >= 0;
  const M eps = row.label_smoothing;
  const M gl = kept ? grad_loss : M(0);
  const M wt = !kept ? M(0) : row.weight ? row.weight[row.target] : M(1);
  const M W = row.weight ? row.weight_sum : M(C);
  const M a = gl * (wt * ((M(1) - eps) + M(2) * row.z_loss * lse) + eps / M(C) * W) + grad_lse;
  const M b = gl * eps / M(C);
  const bool cap = row.softcap != M(0);
  const V va(a), vb(b), vlse(lse), one(M(1)), vs(row.softcap), inv_s(cap ? M(1) / row.softcap : M(0));
  // read before the loop: grad may be the row's logits (the in-place forward)
  const M x_t = kept ? row.x[row.target] : M(0);
  for (int64_t c = 0; c < C; c += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, C - c));
    const V x = V::loadu(row.x + c, n);
    V th, z = x;
    if (cap) {
      th = (x * inv_s).tanh();
      z = vs * th;
    }
    V g = va * (z - vlse).exp_u20();
    if (b != M(0)) g = g - (row.weight ? vb * V::loadu(row.weight + c, n) : vb);
    if (cap) g = g * (one - th * th);
    g.store(grad + c, n);
  }
  if (kept) {
    const M dz = cap ? M(1) - std::tanh(x_t / row.softcap) * std::tanh(x_t / row.softcap) : M(1);
    grad[row.target] -= gl * wt * (M(1) - eps) * dz;
  }
}

template float ce_forward_row<float>(const CeRow<float>&, float*);
template double ce_forward_row<double>(const CeRow<double>&, double*);
template void ce_backward_row<float>(const CeRow<float>&, float, float, float, float*);
template void ce_backward_row<double>(const CeRow<double>&, double, double, double, double*);


template void mlp_tile_forward<float>(const MlpNet<float>&, int64_t, float*, const float*, float*);
template void mlp_tile_forward<double>(const MlpNet<double>&, int64_t, double*, const double*, double*);
template void mlp_tile_backward<float>(const MlpNet<float>&, int64_t, float*, const float*, const float*, float*,
                                       float*, float*);
template void mlp_tile_backward<double>(const MlpNet<double>&, int64_t, double*, const double*, const double*,
                                        double*, double*, double*);

template void dense_forward_rows<float>(Activation, const float*, float*, float*, int64_t, int64_t, int64_t, bool);
template void dense_forward_rows<double>(Activation, const double*, double*, double*, int64_t, int64_t, int64_t, bool);
template void dense_backward_rows<float>(Activation, const float*, const float*, float*, float*, int64_t, int64_t,
                                         int64_t);
template void dense_backward_rows<double>(Activation, const double*, const double*, double*, double*, int64_t,
                                          int64_t, int64_t);

template void jet_forward_elements<float>(Activation, const float*, float*, int64_t, int64_t);
template void jet_forward_elements<double>(Activation, const double*, double*, int64_t, int64_t);
template void jet_backward_elements<float>(Activation, const float*, const float*, float*, int64_t, int64_t);
template void jet_backward_elements<double>(Activation, const double*, const double*, double*, int64_t, int64_t);

template void activation_elements<float>(Activation, int, const float*, const float*, float*, int64_t);
template void activation_elements<double>(Activation, int, const double*, const double*, double*, int64_t);

}  // namespace fusedlayers::cpu::FL_ISA
