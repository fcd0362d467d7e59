// The kernels declared in kernels.h, for the instruction set the including file selects (FL_ISA names the
// namespace; CPU_CAPABILITY selects ATen's Vectorized implementation, and the target pragma the compiler's
// auto-vectorization of the plain loops).
//
// Every element goes through Vectorized, the row tails by partial loads: so this file instantiates the
// activation functors only for its own ISA's vector types, never for plain float/double, whose copies
// other files compile for the baseline ISA.
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace fusedlayers::cpu::FL_ISA {
namespace {

template <typename Act, typename T>
void forward_rows(const T* bias, T* z, T* y, int64_t begin, int64_t end, int64_t cols, bool store_z) {
  using V = at::vec::Vectorized<T>;
  for (int64_t r = begin; r < end; ++r) {
    T* zr = z + r * cols;
    T* yr = y + r * cols;
    for (int64_t c = 0; c < cols; c += V::size()) {
      const int n = static_cast<int>(std::min<int64_t>(V::size(), cols - c));
      V v = V::loadu(zr + c, n);
      if (bias) v = v + V::loadu(bias + c, n);
      if (store_z) v.store(zr + c, n);
      Act::f(v).store(yr + c, n);
    }
  }
}

template <typename Act, typename T>
void backward_rows(const T* g, const T* z, T* dz, T* db, int64_t begin, int64_t end, int64_t cols) {
  using V = at::vec::Vectorized<T>;
  for (int64_t r = begin; r < end; ++r) {
    const T* gr = g + r * cols;
    const T* zr = z + r * cols;
    T* dzr = dz + r * cols;
    for (int64_t c = 0; c < cols; c += V::size()) {
      const int n = static_cast<int>(std::min<int64_t>(V::size(), cols - c));
      // Lanes past n hold zeros from the partial loads and are never stored.
      V d = V::loadu(gr + c, n) * Act::df(V::loadu(zr + c, n));
      d.store(dzr + c, n);
      if (db) (V::loadu(db + c, n) + d).store(db + c, n);
    }
  }
}

template <typename Act, int Order, typename T>
void derivative_loop(const T* z, T* out, int64_t n) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int m = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    const V v = V::loadu(z + i, m);
    if constexpr (Order == 0) Act::f(v).store(out + i, m);
    else if constexpr (Order == 1) Act::df(v).store(out + i, m);
    else Act::d2f(v).store(out + i, m);
  }
}

}  // namespace

template <typename T>
void activation_elements(Activation a, int order, const T* z, T* out, int64_t n) {
  dispatch_activation(a, [&](auto act) {
    using Act = decltype(act);
    if (order == 0) derivative_loop<Act, 0>(z, out, n);
    else if (order == 1) derivative_loop<Act, 1>(z, out, n);
    else derivative_loop<Act, 2>(z, out, n);
  });
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

// z (n x R) = W (n x in) h (in x R) + b
template <typename M>
void tile_linear(const M* w, const M* b, const M* __restrict__ h, M* __restrict__ z, int64_t in, int64_t n,
                 int64_t R) {
  for (int64_t o = 0; o < n; ++o) {
    M* __restrict__ zo = z + o * R;
    const M bias = b ? b[o] : M(0);
    for (int64_t r = 0; r < R; ++r) zo[r] = bias;
    for (int64_t k = 0; k < in; ++k) {
      const M wk = w[o * in + k];
      const M* __restrict__ hk = h + k * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) zo[r] += wk * hk[r];
    }
  }
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
    for (int64_t o = 0; o < n; ++o) {
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
    M* gin = l == 0 ? dx : g;  // g is free again: dz holds what layer l needs
    for (int64_t i = 0; i < in * R; ++i) gin[i] = M(0);
    for (int64_t o = 0; o < n; ++o) {
      const M* dzo = dz + o * R;
      for (int64_t k = 0; k < in; ++k) {
        const M wk = net.w[l][o * in + k];
        M* __restrict__ gk = gin + k * R;
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) gk[r] += wk * dzo[r];
      }
    }
  }
}

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

template void activation_elements<float>(Activation, int, const float*, float*, int64_t);
template void activation_elements<double>(Activation, int, const double*, double*, int64_t);

}  // namespace fusedlayers::cpu::FL_ISA
