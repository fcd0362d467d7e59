// The kernels of mlp_jet (csrc/cpu/mlp_jet.cpp): an activation's second-order jet and its vector-Jacobian product,
// every element through Vectorized as in dense.h.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace fusedlayers::cpu::FL_ISA {
namespace {

// The planes of z, h, g and dz are `plane` elements apart: 0 the value, 1 the first derivative, 2 the second.
// A piecewise-linear activation's f'' and f''' terms are zero and left out, never multiplied (inf z1 * 0 = NaN),
// and so are z2's where it is zero by construction (z2_zero: see JetStep in ops/mlp_jet.h).
template <typename Act, typename T>
void jet_forward_loop(const T* z, T* h, int64_t n, int64_t plane, bool z2_zero) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int m = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    const V z0 = V::loadu(z + i, m), z1 = V::loadu(z + plane + i, m), z2 = V::loadu(z + 2 * plane + i, m);
    const V d1 = Act::df(z0);
    Act::f(z0).store(h + i, m);
    (d1 * z1).store(h + plane + i, m);
    if constexpr (is_piecewise_linear<Act>) {
      (z2_zero ? V(T(0)) : d1 * z2).store(h + 2 * plane + i, m);
    } else {
      const V h2 = Act::d2f(z0) * z1 * z1;
      (z2_zero ? h2 : h2 + d1 * z2).store(h + 2 * plane + i, m);
    }
  }
}

template <typename Act, typename T>
void jet_backward_loop(const T* g, const T* z, T* dz, int64_t n, int64_t plane, bool z2_zero) {
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int m = static_cast<int>(std::min<int64_t>(V::size(), n - i));
    const V z0 = V::loadu(z + i, m), z1 = V::loadu(z + plane + i, m), z2 = V::loadu(z + 2 * plane + i, m);
    const V g0 = V::loadu(g + i, m), g1 = V::loadu(g + plane + i, m), g2 = V::loadu(g + 2 * plane + i, m);
    const V d1 = Act::df(z0);
    if constexpr (is_piecewise_linear<Act>) {
      times_df<Act>(g0, z0).store(dz + i, m);  // relu selects, as torch's threshold_backward
      (g1 * d1).store(dz + plane + i, m);
    } else {
      const V d2 = Act::d2f(z0), d3 = Act::d3f(z0);
      // z1 * z1 never formed, (g2 z1) (z1 d3) instead: a zero upstream, or a third derivative of 0 (gelu_tanh
      // beyond 10), at an overflowing z1 * z1 then gives 0, not 0 * inf
      const V d = g0 * d1 + g1 * z1 * d2 + (g2 * z1) * (z1 * d3);
      (z2_zero ? d : d + g2 * z2 * d2).store(dz + i, m);
      (g1 * d1 + V(T(2)) * g2 * d2 * z1).store(dz + plane + i, m);
    }
    (g2 * d1).store(dz + 2 * plane + i, m);
  }
}

}  // namespace

template <typename T>
void jet_forward_elements(Activation a, const T* z, T* h, int64_t n, int64_t plane, bool z2_zero) {
  dispatch_activation(a, [&](auto act) { jet_forward_loop<decltype(act)>(z, h, n, plane, z2_zero); });
}

template <typename T>
void jet_backward_elements(Activation a, const T* g, const T* z, T* dz, int64_t n, int64_t plane, bool z2_zero) {
  dispatch_activation(a, [&](auto act) { jet_backward_loop<decltype(act)>(g, z, dz, n, plane, z2_zero); });
}

}  // namespace fusedlayers::cpu::FL_ISA
