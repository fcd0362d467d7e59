// The one activation table of fusedlayers: f(z), f'(z), f''(z) and f'''(z) for every activation, written once
// for host and device code and for scalar and SIMD types. f''' is there for the third derivatives of a
// physics-informed loss (u'' in the loss, its parameter gradient): a kernel, not autograd of the f'' formula.
//
// Each functor's methods are templates over T, the math type: float or double on the host and in CUDA
// kernels, at::vec::Vectorized<float|double> in the CPU kernels. They use only arithmetic, T(constant) and the
// helpers of Math<T>, which cpu/vec_math.h specializes for Vectorized.
//
// The list below is the C++ side of the one activation table; fusedlayers/activations.py is the Python side, in
// the same order, and a test compares the two through the activation_table op. Adding an activation is one row
// here and its functor below.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

// X(functor in namespace act, name, f' is constant: the backward needs no saved pre-activation,
//   piecewise linear: f'' and every higher order are zero, so their products are never formed)
#define FL_ACTIVATIONS(X)                    \
  X(Identity, "identity", true, true)     \
  X(ReLU, "relu", false, true)            \
  X(LeakyReLU, "leaky_relu", false, true) \
  X(GELU, "gelu", false, false)           \
  X(GELUTanh, "gelu_tanh", false, false)  \
  X(SiLU, "silu", false, false)           \
  X(Sigmoid, "sigmoid", false, false)     \
  X(Tanh, "tanh", false, false)           \
  X(Softplus, "softplus", false, false)   \
  X(SELU, "selu", false, false)           \
  X(ELU, "elu", false, false)             \
  X(Cos, "cos", false, false)             \
  X(Sin, "sin", false, false)

namespace fusedlayers {

#define FL_ENUMERATOR(E, name, constant_df, piecewise_linear) E,
enum class Activation : int32_t { FL_ACTIVATIONS(FL_ENUMERATOR) };
#undef FL_ENUMERATOR

#define FL_COUNT(E, name, constant_df, piecewise_linear) +1
constexpr int kNumActivations = 0 FL_ACTIVATIONS(FL_COUNT);
#undef FL_COUNT

#define FL_NAME(E, name, constant_df, piecewise_linear) name,
constexpr const char* kActivationNames[kNumActivations] = {FL_ACTIVATIONS(FL_NAME)};
#undef FL_NAME

#define FL_CONSTANT_DF(E, name, constant_df, piecewise_linear) constant_df,
constexpr bool kConstantDerivative[kNumActivations] = {FL_ACTIVATIONS(FL_CONSTANT_DF)};
#undef FL_CONSTANT_DF

#define FL_PIECEWISE_LINEAR(E, name, constant_df, piecewise_linear) piecewise_linear,
constexpr bool kPiecewiseLinear[kNumActivations] = {FL_ACTIVATIONS(FL_PIECEWISE_LINEAR)};
#undef FL_PIECEWISE_LINEAR

// f' of the activation is constant: the backward needs no saved pre-activation.
constexpr bool derivative_is_constant(Activation a) { return kConstantDerivative[static_cast<int>(a)]; }

// f^(order) is identically zero, as torch's own derivatives of relu and leaky_relu treat it: the product that
// would multiply by it (and turn an inf or NaN factor into NaN) is not formed.
constexpr bool derivative_is_zero(Activation a, int64_t order) {
  return order >= 2 && kPiecewiseLinear[static_cast<int>(a)];
}

// Host code takes std:: overloads (float stays float); device code the CUDA math library's.
#if defined(__CUDA_ARCH__)
#define FL_MATH(fn) ::fn
#else
#define FL_MATH(fn) std::fn
#endif

// Scalar math. `where_pos(z, a, b)` is `z > 0 ? a : b`, `where_nonpos` is `z <= 0 ? a : b` and `where_nonneg`
// `z >= 0 ? a : b` (a NaN takes b in all three); with where_gt, the only branches the table needs.
template <typename T>
struct Math {
  static FL_HOST_DEVICE T exp(T x) { return FL_MATH(exp)(x); }
  static FL_HOST_DEVICE T expm1(T x) { return FL_MATH(expm1)(x); }
  static FL_HOST_DEVICE T log1p(T x) { return FL_MATH(log1p)(x); }
  static FL_HOST_DEVICE T tanh(T x) { return FL_MATH(tanh)(x); }
  static FL_HOST_DEVICE T erf(T x) { return FL_MATH(erf)(x); }
  static FL_HOST_DEVICE T erfc(T x) { return FL_MATH(erfc)(x); }
  static FL_HOST_DEVICE T cos(T x) { return FL_MATH(cos)(x); }
  static FL_HOST_DEVICE T sin(T x) { return FL_MATH(sin)(x); }
  static FL_HOST_DEVICE T abs(T x) { return FL_MATH(fabs)(x); }
  // NaN in a propagates, as in torch.relu and at::vec::maximum.
  static FL_HOST_DEVICE T max(T a, T b) { return (a != a || a > b) ? a : b; }
  static FL_HOST_DEVICE T min(T a, T b) { return (a != a || a < b) ? a : b; }
  static FL_HOST_DEVICE T where_pos(T z, T a, T b) { return z > T(0) ? a : b; }
  static FL_HOST_DEVICE T where_nonpos(T z, T a, T b) { return z <= T(0) ? a : b; }
  static FL_HOST_DEVICE T where_nonneg(T z, T a, T b) { return z >= T(0) ? a : b; }
  static FL_HOST_DEVICE T where_gt(T z, T threshold, T a, T b) { return z > threshold ? a : b; }
};

namespace act {

struct Identity {
  template <typename T> static FL_HOST_DEVICE T f(T z) { return z; }
  template <typename T> static FL_HOST_DEVICE T df(T) { return T(1); }
  template <typename T> static FL_HOST_DEVICE T d2f(T) { return T(0); }
  template <typename T> static FL_HOST_DEVICE T d3f(T) { return T(0); }
};

// f'(0) = 0 and f'(NaN) = 1, as torch.relu's backward (which tests its output <= 0).
struct ReLU {
  template <typename T> static FL_HOST_DEVICE T f(T z) { return Math<T>::max(z, T(0)); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { return Math<T>::where_nonpos(z, T(0), T(1)); }
  template <typename T> static FL_HOST_DEVICE T d2f(T) { return T(0); }
  template <typename T> static FL_HOST_DEVICE T d3f(T) { return T(0); }
};

struct LeakyReLU {  // negative slope 0.01, f'(0) = 0.01 as torch's
  template <typename T> static FL_HOST_DEVICE T f(T z) { return Math<T>::where_pos(z, z, z * T(0.01)); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { return Math<T>::where_pos(z, T(1), T(0.01)); }
  template <typename T> static FL_HOST_DEVICE T d2f(T) { return T(0); }
  template <typename T> static FL_HOST_DEVICE T d3f(T) { return T(0); }
};

// Exact GELU: z * Phi(z); Phi' = phi = exp(-z^2/2) / sqrt(2 pi).
struct GELU {
  // erfc, not 1 + erf, which cancels below 0: gelu(-10) in float32 was several times its value
  template <typename T> static FL_HOST_DEVICE T Phi(T z) {
    return T(0.5) * Math<T>::erfc(z * T(-0.70710678118654752440));
  }
  template <typename T> static FL_HOST_DEVICE T phi(T z) {
    return Math<T>::exp(T(-0.5) * z * z) * T(0.39894228040143267794);
  }
  template <typename T> static FL_HOST_DEVICE T f(T z) { return z * Phi(z); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { return Phi(z) + z * phi(z); }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) { return phi(z) * (T(2) - z * z); }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) { return phi(z) * z * (z * z - T(4)); }
};

struct Sigmoid {
  template <typename T> static FL_HOST_DEVICE T s(T z) { return T(1) / (T(1) + Math<T>::exp(T(0) - z)); }
  template <typename T> static FL_HOST_DEVICE T f(T z) { return s(z); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { T v = s(z); return v * (T(1) - v); }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) { T v = s(z); return v * (T(1) - v) * (T(1) - T(2) * v); }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) {
    T v = s(z);
    return v * (T(1) - v) * (T(1) - T(6) * v * (T(1) - v));
  }
};

// sech^2 z = 1 - tanh^2 z as 4 e / (1 + e)^2, e = exp(-2|z|): 1 - t^2 cancels in the tails (tanh'(4.5) lost
// a third of its digits in float32).
template <typename T>
FL_HOST_DEVICE T sech2(T z) {
  T e = Math<T>::exp(T(-2) * Math<T>::abs(z));
  T d = T(1) + e;
  return T(4) * e / (d * d);
}

// GELU, tanh approximation: 0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3). 1 + tanh(u) is 2 sigmoid(2u)
// and 1 - tanh(u)^2 is sech2(u): both cancel in the negative tail when taken from tanh (gelu_tanh(-4.36) was off
// by 1e-2 in float32). The derivatives read z clamped to +-1e4, where every term has saturated: z^3 and u'^3
// overflow float32 beyond (0 * inf made f''(1e13) NaN).
struct GELUTanh {
  static constexpr double kAlpha = 0.79788456080286535588;  // sqrt(2/pi)
  static constexpr double kBeta = 0.044715;
  template <typename T> static FL_HOST_DEVICE T u(T z) { return T(kAlpha) * (z + T(kBeta) * z * z * z); }
  template <typename T> static FL_HOST_DEVICE T du(T z) { return T(kAlpha) * (T(1) + T(3 * kBeta) * z * z); }
  template <typename T> static FL_HOST_DEVICE T clamp(T z) { return Math<T>::min(Math<T>::max(z, T(-1e4)), T(1e4)); }
  template <typename T> static FL_HOST_DEVICE T f(T z) { return z * Sigmoid::s(T(2) * u(z)); }
  template <typename T> static FL_HOST_DEVICE T df(T z) {
    z = clamp(z);
    return Sigmoid::s(T(2) * u(z)) + T(0.5) * z * sech2(u(z)) * du(z);
  }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) {
    z = clamp(z);
    T t = Math<T>::tanh(u(z)), d1 = du(z);
    T d2u = T(6 * kAlpha * kBeta) * z;
    return sech2(u(z)) * (d1 + T(0.5) * z * (d2u - T(2) * t * d1 * d1));
  }
  // With d = 1 - t^2: t''' = d (6 t^2 - 2), so d^3/dz^3 tanh(u) = d ((6 t^2 - 2) u'^3 - 6 t u' u'' + u''').
  template <typename T> static FL_HOST_DEVICE T d3f(T z) {
    z = clamp(z);
    T t = Math<T>::tanh(u(z)), d1 = du(z);
    T d2u = T(6 * kAlpha * kBeta) * z;
    T d = sech2(u(z));
    T t2 = d * (d2u - T(2) * t * d1 * d1);
    T t3 = d * ((T(6) * t * t - T(2)) * d1 * d1 * d1 - T(6) * t * d1 * d2u + T(6 * kAlpha * kBeta));
    return T(1.5) * t2 + T(0.5) * z * t3;
  }
};

struct SiLU {
  template <typename T> static FL_HOST_DEVICE T f(T z) { return z * Sigmoid::s(z); }
  template <typename T> static FL_HOST_DEVICE T df(T z) {
    T v = Sigmoid::s(z);
    return v * (T(1) + z * (T(1) - v));
  }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) {
    T v = Sigmoid::s(z);
    return v * (T(1) - v) * (T(2) + z * (T(1) - T(2) * v));
  }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) {  // 3 s'' + z s'''
    T v = Sigmoid::s(z);
    return v * (T(1) - v) * (T(3) * (T(1) - T(2) * v) + z * (T(1) - T(6) * v * (T(1) - v)));
  }
};

struct Tanh {
  template <typename T> static FL_HOST_DEVICE T f(T z) { return Math<T>::tanh(z); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { return sech2(z); }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) { return T(-2) * Math<T>::tanh(z) * sech2(z); }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) {
    T t = Math<T>::tanh(z);
    return sech2(z) * (T(6) * t * t - T(2));
  }
};

// beta 1, threshold 20 as torch.nn.functional.softplus: linear above the threshold.
struct Softplus {
  template <typename T> static FL_HOST_DEVICE T f(T z) {
    // min() keeps exp() finite in the branch that where_gt discards.
    return Math<T>::where_gt(z, T(20), z, Math<T>::log1p(Math<T>::exp(Math<T>::min(z, T(20)))));
  }
  // e / (1 + e), as torch's softplus_backward: sigmoid's 1 / (1 + e^-z) is 0 where e^z is still a subnormal
  // (z in [-103, -88] in float32), which an infinite direction of the jet turns into NaN
  template <typename T> static FL_HOST_DEVICE T df(T z) {
    T e = Math<T>::exp(Math<T>::min(z, T(20)));
    return Math<T>::where_gt(z, T(20), T(1), e / (T(1) + e));
  }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) { return Math<T>::where_gt(z, T(20), T(0), Sigmoid::df(z)); }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) { return Math<T>::where_gt(z, T(20), T(0), Sigmoid::d2f(z)); }
};

// f' at 0 is the negative side's and f'' at 0 is 0, as torch's elu_backward and its derivative; f'(NaN) and
// f''(NaN) are NaN (torch's are NaN in float64, and 1 and 0 in float32).
struct SELU {
  static constexpr double kAlpha = 1.6732632423543772848170429916717;
  static constexpr double kScale = 1.0507009873554804934193349852946;
  template <typename T> static FL_HOST_DEVICE T f(T z) {
    return Math<T>::where_pos(z, T(kScale) * z, T(kScale * kAlpha) * Math<T>::expm1(Math<T>::min(z, T(0))));
  }
  template <typename T> static FL_HOST_DEVICE T df(T z) {
    return Math<T>::where_pos(z, T(kScale), T(kScale * kAlpha) * Math<T>::exp(Math<T>::min(z, T(0))));
  }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) {
    return Math<T>::where_nonneg(z, T(0), T(kScale * kAlpha) * Math<T>::exp(Math<T>::min(z, T(0))));
  }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) { return d2f(z); }
};

struct ELU {  // alpha 1
  template <typename T> static FL_HOST_DEVICE T f(T z) { return Math<T>::where_pos(z, z, Math<T>::expm1(Math<T>::min(z, T(0)))); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { return Math<T>::where_pos(z, T(1), Math<T>::exp(Math<T>::min(z, T(0)))); }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) { return Math<T>::where_nonneg(z, T(0), Math<T>::exp(Math<T>::min(z, T(0)))); }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) { return d2f(z); }
};

struct Cos {
  template <typename T> static FL_HOST_DEVICE T f(T z) { return Math<T>::cos(z); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { return T(0) - Math<T>::sin(z); }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) { return T(0) - Math<T>::cos(z); }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) { return Math<T>::sin(z); }
};

struct Sin {
  template <typename T> static FL_HOST_DEVICE T f(T z) { return Math<T>::sin(z); }
  template <typename T> static FL_HOST_DEVICE T df(T z) { return Math<T>::cos(z); }
  template <typename T> static FL_HOST_DEVICE T d2f(T z) { return T(0) - Math<T>::sin(z); }
  template <typename T> static FL_HOST_DEVICE T d3f(T z) { return T(0) - Math<T>::cos(z); }
};

}  // namespace act

// The table's enumerator of an activation functor, and its piecewise-linear column, for kernels templated on it.
template <typename Act>
struct ActivationOf;
#define FL_OF(E, name, constant_df, piecewise_linear)  \
  template <>                                          \
  struct ActivationOf<act::E> {                        \
    static constexpr Activation value = Activation::E; \
  };
FL_ACTIVATIONS(FL_OF)
#undef FL_OF
template <typename Act>
constexpr bool is_piecewise_linear = derivative_is_zero(ActivationOf<Act>::value, 2);

// g * f'(z), the backward through an activation. relu selects, as torch's threshold_backward does, so that an inf
// or NaN upstream gradient where z <= 0 gives 0, not NaN.
template <typename Act, typename T>
FL_HOST_DEVICE T times_df(T g, T z) {
  if constexpr (std::is_same_v<Act, act::ReLU>) {
    return Math<T>::where_nonpos(z, T(0), g);
  } else {
    return g * Act::df(z);
  }
}

// Calls fn(ActFunctor{}) for the activation `a`: kernels are instantiated once per activation, so the
// per-element code has no branch on the activation.
template <typename Fn>
inline decltype(auto) dispatch_activation(Activation a, Fn&& fn) {
  switch (a) {
#define FL_CASE(E, name, constant_df, piecewise_linear) \
  case Activation::E:                                 \
    return fn(act::E{});
    FL_ACTIVATIONS(FL_CASE)
#undef FL_CASE
  }
  __builtin_unreachable();
}

}  // namespace fusedlayers
