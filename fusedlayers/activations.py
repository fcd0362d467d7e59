"""The activations of fusedlayers and their plain-PyTorch formulas.

Each activation has f, f' and f'' written with differentiable torch ops: they are the oracle the tests
compare every backend against, and the exact composite that higher-order gradients can fall back on.
The table (_TABLE) is the Python side of the one activation table; csrc/activations.h is the C++ side.
"""
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_ALPHA = math.sqrt(2.0 / math.pi)
_GELU_TANH_BETA = 0.044715


class Activation(NamedTuple):
    """A row of the table: the formulas, the module that computes f, and the properties the ops key on."""
    name: str
    f: Callable[[Tensor], Tensor]
    df: Callable[[Tensor], Tensor]
    d2f: Callable[[Tensor], Tensor]
    module: type  # the module class that computes f (torch.nn's, or ActivationModule) ...
    params: dict  # ... with these attribute values (its constructor's keyword arguments)
    constant_derivative: bool = False  # f' is constant: a backward needs no saved pre-activation
    piecewise_linear: bool = False  # f'' is zero wherever it is defined, and so is every higher derivative

    def make_module(self) -> nn.Module:
        return self.module(**self.params)

    def is_module(self, m: nn.Module) -> bool:
        """Whether m computes exactly f: its class, with these parameters (a LeakyReLU of another slope is not)."""
        return type(m) is self.module and all(getattr(m, k) == v for k, v in self.params.items())


class ActivationModule(nn.Module):
    """An activation of the table as a module, for those torch.nn has none of (cos, sin): it lets a plain
    nn.Sequential hold them, and FusedMLP.from_sequential and to_sequential convert them."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = check_activation(name)

    def forward(self, z: Tensor) -> Tensor:
        return REFERENCE[self.name].f(z)

    def extra_repr(self) -> str:
        return repr(self.name)


def _pos(z: Tensor, a: float, b: float) -> Tensor:
    """a where z > 0 else b, in z's dtype (torch.where of two Python floats would give float32)."""
    return torch.where(z > 0, torch.full_like(z, a), torch.full_like(z, b))


def _gelu_df(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def _gelu_d2f(z):
    return _INV_SQRT_2PI * torch.exp(-0.5 * z * z) * (2 - z * z)


def _sech2(z):
    """1 - tanh(z)^2 without its cancellation in the tails."""
    e = torch.exp(-2 * z.abs())
    return 4 * e / (1 + e).square()


# As the C++ table: 1 + tanh(u) as 2 sigmoid(2u), 1 - tanh(u)^2 as sech2(u), z clamped where all has saturated.
def _gelu_tanh_parts(z):
    """(z clamped, u, u') of gelu_tanh = 0.5 z (1 + tanh(u))."""
    z = z.clamp(-1e4, 1e4)
    return z, _GELU_TANH_ALPHA * (z + _GELU_TANH_BETA * z**3), _GELU_TANH_ALPHA * (1 + 3 * _GELU_TANH_BETA * z * z)


def _gelu_tanh_df(z):
    z, u, du = _gelu_tanh_parts(z)
    return torch.sigmoid(2 * u) + 0.5 * z * _sech2(u) * du


def _gelu_tanh_d2f(z):
    z, u, du = _gelu_tanh_parts(z)
    d2u = 6 * _GELU_TANH_ALPHA * _GELU_TANH_BETA * z
    return _sech2(u) * (du + 0.5 * z * (d2u - 2 * torch.tanh(u) * du * du))


def _sigmoid_df(z):
    s = torch.sigmoid(z)
    return s * (1 - s)


def _sigmoid_d2f(z):
    s = torch.sigmoid(z)
    return s * (1 - s) * (1 - 2 * s)


def _silu_df(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_d2f(z):
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _tanh_df(z):
    return _sech2(z)


def _tanh_d2f(z):
    return -2 * torch.tanh(z) * _sech2(z)


# Softplus with beta 1 and torch's threshold 20: linear above it, so f' = 1 and f'' = 0 there. f' as torch's
# softplus_backward, e / (1 + e): torch.sigmoid is 0 where e^z is still a float32 subnormal.
def _softplus_df(z):
    e = torch.exp(torch.clamp(z, max=20))
    return torch.where(z > 20, torch.ones_like(z), e / (1 + e))


def _softplus_d2f(z):
    return torch.where(z > 20, torch.zeros_like(z), _sigmoid_df(z))


# f' at 0 is the negative side's and f'' at 0 is 0, as torch's elu_backward and its derivative (selu: its alpha,
# and its scale on both). relu'(NaN) is 1, as torch's (which tests relu's output <= 0).
def _relu_df(z):
    return torch.where(z <= 0, torch.zeros_like(z), torch.ones_like(z))


def _elu_df(z, alpha=1.0):
    return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(z))


def _elu_d2f(z, alpha=1.0):
    return torch.where(z >= 0, torch.zeros_like(z), alpha * torch.exp(z))


def _zeros(z):
    return torch.zeros_like(z)


def _ones(z):
    return torch.ones_like(z)


# The Python side of the one activation table, in the order of the C++ side (FL_ACTIVATIONS in
# csrc/activations.h; tests/test_activations.py compares them); fusedlayers/triton/activations.py has the
# Triton formulas of each row. Adding an activation is one row here, one there, and one in activations.h.
_TABLE = (
    Activation("identity", lambda z: z, _ones, _zeros, nn.Identity, {}, constant_derivative=True,
               piecewise_linear=True),
    Activation("relu", F.relu, _relu_df, _zeros, nn.ReLU, {}, piecewise_linear=True),
    Activation("leaky_relu", F.leaky_relu, lambda z: _pos(z, 1.0, 0.01), _zeros, nn.LeakyReLU,
               {"negative_slope": 0.01}, piecewise_linear=True),
    Activation("gelu", F.gelu, _gelu_df, _gelu_d2f, nn.GELU, {"approximate": "none"}),
    Activation("gelu_tanh", lambda z: F.gelu(z, approximate="tanh"), _gelu_tanh_df, _gelu_tanh_d2f, nn.GELU,
               {"approximate": "tanh"}),
    Activation("silu", F.silu, _silu_df, _silu_d2f, nn.SiLU, {}),
    Activation("sigmoid", torch.sigmoid, _sigmoid_df, _sigmoid_d2f, nn.Sigmoid, {}),
    Activation("tanh", torch.tanh, _tanh_df, _tanh_d2f, nn.Tanh, {}),
    Activation("softplus", F.softplus, _softplus_df, _softplus_d2f, nn.Softplus, {"beta": 1.0, "threshold": 20.0}),
    Activation("selu", F.selu, lambda z: _SELU_SCALE * _elu_df(z, _SELU_ALPHA),
               lambda z: _SELU_SCALE * _elu_d2f(z, _SELU_ALPHA), nn.SELU, {}),
    Activation("elu", F.elu, _elu_df, _elu_d2f, nn.ELU, {"alpha": 1.0}),
    Activation("cos", torch.cos, lambda z: -torch.sin(z), lambda z: -torch.cos(z), ActivationModule, {"name": "cos"}),
    Activation("sin", torch.sin, torch.cos, lambda z: -torch.sin(z), ActivationModule, {"name": "sin"}),
)
ACTIVATIONS = tuple(a.name for a in _TABLE)
REFERENCE = {a.name: a for a in _TABLE}
CONSTANT_DERIVATIVE = frozenset(a.name for a in _TABLE if a.constant_derivative)
PIECEWISE_LINEAR = frozenset(a.name for a in _TABLE if a.piecewise_linear)


def derivative_formula(z: Tensor, name: str, order: int) -> Tensor:
    """f^(order)(z) from the formulas above: f, f' and f'' as written, higher orders by differentiating f''
    with autograd (elementwise, so the vector-Jacobian product with ones is the derivative). Differentiable
    again when z requires grad, to any order; the kernel of the activation_derivative_formula op, which the
    C++ autograd of f''' (the last order of the kernels' table) calls."""
    if order < 0:
        raise ValueError(f"expected a derivative order >= 0, got {order}")
    act = REFERENCE[check_activation(name)]
    if order > 2 and name in PIECEWISE_LINEAR:
        return torch.zeros_like(z)
    fn = (act.f, act.df, act.d2f)[min(order, 2)]
    for _ in range(order - 2):
        fn = _derivative_of(fn)
    return fn(z)


def _derivative_of(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def derivative(z: Tensor) -> Tensor:
        # autograd rather than torch.func.jvp: a jvp costs ~10x more per call at PINN sizes.
        differentiable = z.requires_grad and torch.is_grad_enabled()
        # inference_mode(False): autograd records nothing under inference mode, and an inference tensor is
        # cloned into a normal one.
        with torch.inference_mode(False), torch.enable_grad():
            try:
                zz = z if differentiable else (z.clone() if z.is_inference() else z.detach()).requires_grad_()
            except RuntimeError as e:  # functorch refuses requires_grad_() below a forward-mode level
                raise RuntimeError(
                    "fusedlayers: activation derivatives past the third are autograd of torch formulas, which "
                    "torch.func refuses under a forward-mode transform of a differentiated function (hessian = "
                    "jacfwd(jacrev(...)), jacfwd(jacfwd(...))); jacrev(jacrev(...)) works to any order") from e
            out = fn(zz)
            return torch.autograd.grad(out, zz, torch.ones_like(out), create_graph=differentiable)[0]
    return derivative


def check_activation(name: str) -> str:
    """Returns name if it is a known activation, else raises ValueError listing the known ones."""
    if name not in REFERENCE:
        raise ValueError(f"unknown activation {name!r}; expected one of: {', '.join(ACTIVATIONS)}")
    return name


def name_of_module(module: nn.Module) -> str:
    """The table's name for an activation module that computes exactly that function, else ValueError: a module
    with other parameters (a LeakyReLU slope other than 0.01, say) is never silently replaced."""
    for a in _TABLE:
        if a.is_module(module):
            return a.name
    raise ValueError(f"{module!r} has no fused equivalent: the fused activations are "
                     f"{', '.join(ACTIVATIONS)} with torch's default parameters")
