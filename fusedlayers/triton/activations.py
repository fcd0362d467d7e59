"""The activation table of fusedlayers in Triton: f and f' of every activation, for kernels to fuse.

ACT is the index of the activation's name in fusedlayers.activations.ACTIVATIONS (see activation_code), a
constexpr, so each kernel is compiled for one activation and its per-element code has no branch on it.
The formulas are those of csrc/activations.h; a row of the table with no formula here fails to compile. They
use only core tl ops (exp, log, erf, cos, sin), not libdevice, so that they also run under the interpreter; tanh, sigmoid, expm1 and log1p are built from exp
and log in forms accurate to a few ulp. z may be float32 or float64; the results have z's dtype.
"""
import triton
import triton.language as tl

from ..activations import ACTIVATIONS, check_activation


def activation_code(name: str) -> int:
    """The ACT constexpr of the activation `name` (ValueError if unknown)."""
    return ACTIVATIONS.index(check_activation(name))


# ACT codes by name, from the table: IDENTITY, RELU, ..., one per row of ACTIVATIONS.
for _code, _name in enumerate(ACTIVATIONS):
    globals()[_name.upper()] = tl.constexpr(_code)

_LEAKY_SLOPE = tl.constexpr(0.01)
_SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)
_SQRT1_2 = tl.constexpr(0.70710678118654752440)
_INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)
_GELU_TANH_ALPHA = tl.constexpr(0.79788456080286535588)  # sqrt(2/pi)
_GELU_TANH_BETA = tl.constexpr(0.044715)
_GELU_TANH_3BETA = tl.constexpr(3 * 0.044715)
_SELU_SCALE_ALPHA = tl.constexpr(1.0507009873554804934193349852946 * 1.6732632423543772848170429916717)
_SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def _const(z, value: tl.constexpr):
    """`value`, exact in float32, broadcast to z's shape and dtype. Inexact constants (0.01) are spelled
    tl.full(z.shape, c, z.dtype) in place: passed to a jit function they would be rounded to float32."""
    return tl.full(z.shape, value, z.dtype)


@triton.jit
def _min(z, bound):
    # NaN propagates, as in the C++ table: tl.minimum(NaN, c) would return c, and f(NaN) a number.
    return tl.minimum(z, bound, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max(z, bound):
    return tl.maximum(z, bound, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _expm1(x):
    # Kahan's trick: (e^x - 1) * x / log(e^x) cancels the rounding error of e^x, unlike e^x - 1.
    u = tl.exp(x)
    um1 = u - 1.0
    exact = (um1 != 0.0) & (um1 != -1.0) & (u != float("inf"))
    ratio = um1 * x / tl.log(tl.where(exact, u, 2.0))  # the 2.0 only keeps the discarded lanes finite
    return tl.where(um1 == 0.0, x, tl.where(exact, ratio, um1))


@triton.jit
def _log1p(x):
    # Goldberg's trick: log(1 + x) * x / ((1 + x) - 1) cancels the rounding error of 1 + x.
    u = 1.0 + x
    is_one = u == 1.0
    return tl.where(is_one, x, tl.log(u) * x / tl.where(is_one, 1.0, u - 1.0))


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))  # in (0, 1]: no overflow on either side
    s = 1.0 / (1.0 + e)
    return tl.where(z >= 0.0, s, e * s)


@triton.jit
def _tanh(z):
    m = _expm1(-2.0 * tl.abs(z))  # expm1, not exp, keeps tanh's relative accuracy near 0
    t = -m / (2.0 + m)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def _sech2(z):
    # 1 - tanh(z)^2 without its cancellation in the tails
    e = tl.exp(-2.0 * tl.abs(z))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _gelu_tanh_u(z):
    return (z + z * z * z * _GELU_TANH_BETA) * _GELU_TANH_ALPHA


@triton.jit
def _gelu_tanh_du(z):
    return (1.0 + z * z * _GELU_TANH_3BETA) * _GELU_TANH_ALPHA


@triton.jit
def _erfc(x):
    # exp(-x^2) erfcx(x) for x > 0.5 and 2 - erfc(-x) below -0.5 (no cancellation either side: 1 - erf(x) lost every
    # digit of gelu's tail, as PyTorch's 1 + erf does below z = -2). erfcx(x) (x + 2) is a Chebyshev series in
    # t = 1 / (x + 2) over x in [0, 27], fitted here, summed by Clenshaw's recurrence (x clamped to 28: erfc is 0 in
    # float64 from 27.3), and exp(-x^2) = exp(-hi^2) exp(-lo (hi + x)) with hi = x's top bits, so that hi^2 is
    # exact: 6 ulp in float64, 4 in float32.
    a = _min(tl.abs(x), 28.0)
    t = 1.0 / (a + 2.0)
    u2 = (4.0 * t - 1.0689655172413792) / 0.46551724137931033  # 2u, u: t from [1 / 29, 1 / 2] to [-1, 1]
    # Clenshaw's b_13 and b_14: from the terms above c13 in float64, c13 alone in float32 (truncation 4e-11)
    if x.dtype == tl.float64:  # truncation 3e-20
        b1 = tl.zeros_like(a) + 3.8108367336109306e-19
        b2 = tl.zeros_like(a)
        b1, b2 = u2 * b1 - b2 + -2.1091852403896963e-18, b1
        b1, b2 = u2 * b1 - b2 + 3.3444220739603991e-18, b1
        b1, b2 = u2 * b1 - b2 + 1.7176276092218804e-17, b1
        b1, b2 = u2 * b1 - b2 + -1.2155426103116909e-16, b1
        b1, b2 = u2 * b1 - b2 + 2.3686060748707442e-16, b1
        b1, b2 = u2 * b1 - b2 + 9.3418763909194303e-16, b1
        b1, b2 = u2 * b1 - b2 + -7.5441580255817139e-15, b1
        b1, b2 = u2 * b1 - b2 + 1.4814329867698014e-14, b1
        b1, b2 = u2 * b1 - b2 + 6.769682514594943e-14, b1
        b1, b2 = u2 * b1 - b2 + -5.152310637425003e-13, b1
        b1, b2 = u2 * b1 - b2 + 7.6853193700310909e-13, b1
        b1, b2 = u2 * b1 - b2 + 6.4468747953468256e-12, b1
        b1, b2 = u2 * b1 - b2 + -3.7720179426559487e-11, b1
        b1, b2 = u2 * b1 - b2 + 9.084763943561447e-12, b1
        b1, b2 = u2 * b1 - b2 + 7.2080882130147328e-10, b1
    else:
        b1 = tl.zeros_like(a) + 7.2080882130147328e-10
        b2 = tl.zeros_like(a)
    b1, b2 = u2 * b1 - b2 + -2.544509644823149e-9, b1
    b1, b2 = u2 * b1 - b2 + -7.6855230774101145e-9, b1
    b1, b2 = u2 * b1 - b2 + 7.9970253079050359e-8, b1
    b1, b2 = u2 * b1 - b2 + -2.9272138403854398e-8, b1
    b1, b2 = u2 * b1 - b2 + -1.9576841119754325e-6, b1
    b1, b2 = u2 * b1 - b2 + 4.6673808489611519e-6, b1
    b1, b2 = u2 * b1 - b2 + 5.0586615731163393e-5, b1
    b1, b2 = u2 * b1 - b2 + -1.9152616422928212e-4, b1
    b1, b2 = u2 * b1 - b2 + -1.8617426523822792e-3, b1
    b1, b2 = u2 * b1 - b2 + 5.0740557933380923e-3, b1
    b1, b2 = u2 * b1 - b2 + 1.1618409552867201e-1, b1
    b1, b2 = u2 * b1 - b2 + 6.9232952340268249e-1, b1
    series = 0.5 * u2 * b1 - b2 + 1.1884122566124192
    if x.dtype == tl.float64:
        hi = (a.to(tl.int64, bitcast=True) & -134217728).to(tl.float64, bitcast=True)  # 26 bits
    else:
        hi = (a.to(tl.int32, bitcast=True) & -4096).to(tl.float32, bitcast=True)  # 12 bits
    tail = tl.exp(-(hi * hi)) * tl.exp(-((a - hi) * (hi + a))) * (series * t)
    # |x| <= 0.5: 1 - erf(x), whose rounding is half an ulp of a value near 1 (the series' is 3 eps there)
    return tl.where(a <= 0.5, 1.0 - tl.erf(x), tl.where(x < 0.0, 2.0 - tail, tail))


@triton.jit
def _gelu_cdf(z):
    return 0.5 * _erfc(z * -_SQRT1_2)


@triton.jit
def _gelu_pdf(z):
    return tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit
def act_f(z, ACT: tl.constexpr):
    """f(z)."""
    if ACT == IDENTITY:
        return z
    elif ACT == RELU:
        # NaN propagates, as in torch.relu
        return tl.where(z < 0.0, _const(z, 0.0), z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0.0, z, z * _LEAKY_SLOPE)
    elif ACT == GELU:
        return z * _gelu_cdf(z)
    elif ACT == GELU_TANH:
        return z * _sigmoid(2.0 * _gelu_tanh_u(z))  # 0.5 (1 + tanh u) without its cancellation below 0
    elif ACT == SILU:
        return z * _sigmoid(z)
    elif ACT == SIGMOID:
        return _sigmoid(z)
    elif ACT == TANH:
        return _tanh(z)
    elif ACT == SOFTPLUS:
        # min() keeps exp() finite in the lanes that the where() discards
        return tl.where(z > _SOFTPLUS_THRESHOLD, z, _log1p(tl.exp(_min(z, _SOFTPLUS_THRESHOLD))))
    elif ACT == SELU:
        return tl.where(z > 0.0, z * _SELU_SCALE, _expm1(_min(z, 0.0)) * _SELU_SCALE_ALPHA)
    elif ACT == ELU:
        return tl.where(z > 0.0, z, _expm1(_min(z, 0.0)))
    elif ACT == COS:
        return tl.cos(z)
    elif ACT == SIN:
        return tl.sin(z)
    else:
        tl.static_assert(False, "an activation of the table has no Triton formula (act_f)")


@triton.jit
def act_grad(g, z, ACT: tl.constexpr):
    """g * f'(z), the backward through the activation; relu selects, as torch's: an inf or NaN g where z <= 0
    gives 0."""
    if ACT == RELU:
        return tl.where(z <= 0.0, _const(g, 0.0), g)
    else:
        return g * act_df(z, ACT)


@triton.jit
def act_df(z, ACT: tl.constexpr):
    """f'(z)."""
    if ACT == IDENTITY:
        return _const(z, 1.0)
    elif ACT == RELU:
        return tl.where(z <= 0.0, _const(z, 0.0), _const(z, 1.0))  # f'(0) = 0, f'(NaN) = 1, as torch
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0.0, _const(z, 1.0), tl.full(z.shape, _LEAKY_SLOPE, z.dtype))
    elif ACT == GELU:
        return _gelu_cdf(z) + z * _gelu_pdf(z)
    elif ACT == GELU_TANH:
        z = _min(_max(z, -1e4), 1e4)  # saturated beyond; z^3 would overflow float32
        u = _gelu_tanh_u(z)
        return _sigmoid(2.0 * u) + 0.5 * z * _sech2(u) * _gelu_tanh_du(z)
    elif ACT == SILU:
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == SIGMOID:
        s = _sigmoid(z)
        return s * (1.0 - s)
    elif ACT == TANH:
        return _sech2(z)
    elif ACT == SOFTPLUS:
        return tl.where(z > _SOFTPLUS_THRESHOLD, _const(z, 1.0), _sigmoid(z))
    elif ACT == SELU:
        return tl.where(z > 0.0, tl.full(z.shape, _SELU_SCALE, z.dtype), tl.exp(_min(z, 0.0)) * _SELU_SCALE_ALPHA)
    elif ACT == ELU:
        return tl.where(z > 0.0, _const(z, 1.0), tl.exp(_min(z, 0.0)))
    elif ACT == COS:
        return -tl.sin(z)
    elif ACT == SIN:
        return tl.cos(z)
    else:
        tl.static_assert(False, "an activation of the table has no Triton formula (act_df)")
