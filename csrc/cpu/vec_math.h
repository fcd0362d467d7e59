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
  // Sleef's expm1 and tanh cost several times its exp (expm1 about ten times, measured here with perf on the
  // selu mlp): both are built from exp instead, with a Taylor polynomial near 0 where exp(x) - 1 would cancel.
  static V expm1(V x) {
    const V poly = expm1_taylor(x);
    return V::blendv(poly, x.exp() - V(T(1)), x.abs() >= V(T(0.5)));
  }
  // tanh|x| = -e / (2 + e) with e = expm1(-2|x|) in (-1, 0]: no cancellation and no overflow.
  static V tanh(V x) {
    const V a = x.abs();
    const V e = expm1(V(T(-2)) * a);
    const V t = V(T(0)) - e / (V(T(2)) + e);
    return V::blendv(t, V(T(0)) - t, x < V(T(0)));
  }
  static V log1p(V x) { return x.log1p(); }
  static V erf(V x) { return x.erf(); }
  static V cos(V x) { return x.cos(); }
  static V sin(V x) { return x.sin(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V where_pos(V z, V a, V b) { return V::blendv(b, a, z > V(T(0))); }
  static V where_gt(V z, V threshold, V a, V b) { return V::blendv(b, a, z > threshold); }

 private:
  // sum_{n=1..K} x^n / n!, accurate to the type's precision for |x| <= 0.5: the first term left out,
  // 0.5^(K+1) / (K+1)!, is below 2^-24 relative for K = 9 and below 2^-53 for K = 15.
  static V expm1_taylor(V x) {
    constexpr int K = sizeof(T) == 4 ? 9 : 15;
    double inv_fact[K + 1] = {1.0};
    for (int n = 1; n <= K; ++n) inv_fact[n] = inv_fact[n - 1] / n;
    V p = V(T(inv_fact[K]));
    for (int n = K - 1; n >= 1; --n) p = at::vec::fmadd(p, x, V(T(inv_fact[n])));
    return p * x;
  }
};

}  // namespace fusedlayers
