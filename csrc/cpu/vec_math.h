// Math<Vectorized<T>>: the helpers of the activation table (csrc/activations.h) for ATen's SIMD vectors, so
// the CPU kernels evaluate the same functors eight (float) or four (double) lanes at a time on AVX2.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "activations.h"

namespace fusedlayers {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(V x) { return x.exp(); }
  static V expm1(V x) { return x.expm1(); }
  static V log1p(V x) { return x.log1p(); }
  static V tanh(V x) { return x.tanh(); }
  static V erf(V x) { return x.erf(); }
  static V cos(V x) { return x.cos(); }
  static V sin(V x) { return x.sin(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V where_pos(V z, V a, V b) { return V::blendv(b, a, z > V(T(0))); }
  static V where_gt(V z, V threshold, V a, V b) { return V::blendv(b, a, z > threshold); }
};

}  // namespace fusedlayers
