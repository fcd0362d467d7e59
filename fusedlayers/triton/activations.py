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
def _gelu_cdf(z):
    return 0.5 * (1.0 + tl.erf(z * _SQRT1_2))


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
