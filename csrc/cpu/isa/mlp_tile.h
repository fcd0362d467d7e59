// The kernels of the fused mlp (cpu/mlp.cpp): a tile of R rows at a time through the whole network,
// feature-major, its activations through the dense kernels.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "cpu/isa/common.h"
#include "cpu/isa/dense.h"
#include "cpu/kernels.h"

namespace fusedlayers::cpu::FL_ISA {
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

}  // namespace fusedlayers::cpu::FL_ISA
