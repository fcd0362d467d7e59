// Math<Vectorized<T>>: the helpers of the activation table (csrc/activations.h) for ATen's SIMD vectors, so
// the CPU kernels evaluate the same functors eight (float) or four (double) lanes at a time on AVX2.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>

#include "activations.h"

namespace fusedlayers {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  // float: exp(x) = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in two parts, the
  // first exact times any n), e^r = 1 + r P(r), P of degree 5 fitted here (2e-9 relative; 1.1e-7 in float32), 2^n
  // from its exponent bits. Inline, in place of Sleef's out-of-line call: exact gelu's f' from 0.95 to 0.70 ns an
  // element (in cache, AVX-512). A vector with a lane outside [-87.3, 88.3] (overflow, subnormal results) or a
  // NaN takes Sleef's. double: Sleef's.
  static V exp(V x) {
    if constexpr (sizeof(T) == 4) {
      using I = at::vec::Vectorized<int32_t>;
      if (((x >= V(T(-87.3))) & (x <= V(T(88.3)))).zero_mask() != 0) return x.exp();
      const V n = (x * V(T(1.4426950408889634))).round();
      V r = at::vec::fmadd(n, V(T(-0.693145751953125)), x);
      r = at::vec::fmadd(n, V(T(-1.4286068203094172e-06)), r);
      V p = V(T(0.0013843589130286022));
      p = at::vec::fmadd(p, r, V(T(0.00837414008884882)));
      p = at::vec::fmadd(p, r, V(T(0.041668002192666496)));
      p = at::vec::fmadd(p, r, V(T(0.16666431443101182)));
      p = at::vec::fmadd(p, r, V(T(0.4999999421226679)));
      p = at::vec::fmadd(p, r, V(T(1.0000000321272036)));
      p = at::vec::fmadd(p, r, V(T(1)));
      const I biased = (at::vec::convert_to_int_of_same_size(n) + I(127)) << I(23);
      return p * at::vec::cast<T>(biased);
    }
    return x.exp();
  }
  // Sleef's expm1 and tanh cost several times its exp (expm1 about ten times, measured here with perf on the
  // selu mlp): both are built from exp instead, with a Taylor polynomial near 0 where exp(x) - 1 would cancel.
  static V expm1(V x) {
    const V poly = expm1_taylor(x);
    return V::blendv(poly, exp(x) - V(T(1)), x.abs() >= V(T(0.5)));
  }
  // tanh|x| = -e / (2 + e) with e = expm1(-2|x|) in (-1, 0]: no cancellation and no overflow, about 2 ulp in
  // float32 (a rational fit of about a third of the cost was 6.5 ulp, three times torch's error).
  static V tanh(V x) {
    const V a = x.abs();
    const V e = expm1(V(T(-2)) * a);
    const V t = V(T(0)) - e / (V(T(2)) + e);
    return V::blendv(t, V(T(0)) - t, x < V(T(0)));
  }
  static V log1p(V x) { return x.log1p(); }
  // float: x P(x^2) / Q(x^2) on x clamped to [-3.92, 3.92] (beyond, erf rounds to +-1), result clamped to [-1, 1]
  // and exactly +-1 past the clamp; P of degree 6 and Q of degree 4 fitted here like tanh's: 5.2e-8 relative in
  // exact arithmetic, at most 3.9e-7 (6.5 ulp) in float32. In place of ATen's float erf (a 1.5e-7 absolute fit
  // around an exp; 1e-3 relative near 0): exact gelu's f from 0.62 to 0.40 ns an element (in cache, AVX-512).
  // double: Sleef's.
  static V erf(V x) {
    if constexpr (sizeof(T) == 4) {
      const V c = at::vec::clamp(x, V(T(-3.92)), V(T(3.92)));  // two instructions, NaN kept
      const V s = c * c;
      V p = V(T(1.9926550888950797e-08));
      p = at::vec::fmadd(p, s, V(T(-1.9578835292320995e-06)));
      p = at::vec::fmadd(p, s, V(T(0.00014183589906589344)));
      p = at::vec::fmadd(p, s, V(T(0.003700823665389466)));
      p = at::vec::fmadd(p, s, V(T(0.05057073413410091)));
      p = at::vec::fmadd(p, s, V(T(0.1999048757706455)));
      p = at::vec::fmadd(p, s, V(T(1.1283791089862414)));
      V q = V(T(0.000955862823941004));
      q = at::vec::fmadd(q, s, V(T(0.014351555880209328)));
      q = at::vec::fmadd(q, s, V(T(0.11499030527570497)));
      q = at::vec::fmadd(q, s, V(T(0.5104927393367901)));
      q = at::vec::fmadd(q, s, V(T(1)));
      // Past the clamp the fit may round one ulp short of +-1 (then gelu(-20) = -1.2e-6, not -0).
      const V e = at::vec::clamp(c * p / q, V(T(-1)), V(T(1)));
      return V::blendv(V::blendv(e, V(T(1)), x >= V(T(3.92))), V(T(-1)), x <= V(T(-3.92)));
    }
    return x.erf();
  }
  // float: 1 - erf(x) up to x = 0.5 (erf < 0.53 there: no cancellation); beyond, exp(-x^2) P(1 / (x + 1.5)),
  // P of degree 9 fitted here (6e-9 relative on [0.5, 10.1], past which erfc rounds to 0), x^2 = s + e exactly
  // and exp(-x^2) = exp(-s) (1 - e): 4.3 ulp in float32. In place of Sleef's erfc, with which exact gelu's f
  // cost 3.5 ns an element against PyTorch's 0.6 (from 1 + erf); now 1.05 (AVX-512, one thread, out of cache).
  // double: Sleef's (8.2 ns against PyTorch's 3.2).
  static V erfc(V x) {
    if constexpr (sizeof(T) == 4) {
      const V big = x > V(T(0.5));
      if (big.zero_mask() == (1 << V::size()) - 1) return V(T(1)) - erf(x);  // no lane above 0.5
      const V a = at::vec::clamp(x, V(T(0.5)), V(T(10.1)));
      const V t = V(T(1)) / (a + V(T(1.5)));
      V p = V(T(3.6911595175825416));
      p = at::vec::fmadd(p, t, V(T(-13.770962047395791)));
      p = at::vec::fmadd(p, t, V(T(20.167057721899674)));
      p = at::vec::fmadd(p, t, V(T(-13.56019903822017)));
      p = at::vec::fmadd(p, t, V(T(2.992040601113814)));
      p = at::vec::fmadd(p, t, V(T(-0.05153328279348973)));
      p = at::vec::fmadd(p, t, V(T(1.0735647325052469)));
      p = at::vec::fmadd(p, t, V(T(0.8395279201540985)));
      p = at::vec::fmadd(p, t, V(T(0.5644890888677849)));
      p = at::vec::fmadd(p, t, V(T(-5.719718607785913e-06)));
      // a^2 = s + e exactly. With FMA by one fmsub: written out as products, the compiler contracted
      // hi * hi - a * a into one fma and e came out 0 (erfc(8) 2e-6 off). The default ISA has no FMA, so no
      // contraction: there hi keeps a's top 12 bits, and hi^2 is exact.
      const V s = a * a;
#ifndef FL_TARGET_DEFAULT
      const V e = at::vec::fmsub(a, a, s);
#else
      const V hi = a & V(T(c10::bit_cast<float>(0xfffff000u))), lo = a - hi;
      const V e = (hi * hi - s) + lo * (hi + a);
#endif
      const V tail = exp(V(T(0)) - s) * (V(T(1)) - e) * p;
      if (big.zero_mask() == 0) return tail;  // every lane above 0.5
      return V::blendv(V(T(1)) - erf(x), tail, big);
    }
    return x.erfc();
  }
  static V cos(V x) { return x.cos(); }
  static V sin(V x) { return x.sin(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V abs(V x) { return x.abs(); }
  static V where_pos(V z, V a, V b) { return V::blendv(b, a, z > V(T(0))); }
  static V where_nonpos(V z, V a, V b) { return V::blendv(b, a, z <= V(T(0))); }
  static V where_nonneg(V z, V a, V b) { return V::blendv(b, a, z >= V(T(0))); }
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
