"""What the op families of fusedlayers/ops/ share: the route to torch.func (an autograd.Function made of an
op's pieces, taken under a transform or with a forward-mode tangent) and the autocast rule of the layers.

The C++ ops carry their reverse-mode autograd, which torch.func's transforms cannot use as they are (no
setup_context, no jvp, no batching rule). Under a transform, or with a forward-mode tangent, a family sends
the call to an autograd.Function built from the op's pieces instead: forward (the op below autograd),
backward (a composite gradient op, differentiable again), jvp (a composite of torch ops) and vmap (a batching
rule). Never under torch.compile: Dynamo does not support a custom jvp, and the op itself is the compiled path.
"""
import math
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

_ops = torch.ops.fusedlayers

# The kernel backends (csrc/backend.h's kBackends; fusedlayers/backends.py maps users' choices to them) and the
# prefix of their kernel ops: the differentiable ops' `backend` argument is one of these names. Each family
# defines its kernels' fakes for every one; a test compares this table with the extension's.
KERNELS = {"native": "", "triton": "triton_"}


def needs_function(*tensors: Tensor | None) -> bool:
    """Whether a call must take the autograd.Function: a torch.func transform is active, or a forward-mode
    tangent is on one of the inputs."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return fwAD._current_level >= 0 and any(t is not None and fwAD.unpack_dual(t).tangent is not None
                                            for t in tensors)


def function_op(name: str, forward: Callable, setup_context: Callable, backward: Callable, jvp: Callable,
                vmap: Callable) -> Callable:
    """The `apply` of an autograd.Function called `name` made of these staticmethods (their signatures are
    torch.autograd.Function's). One helper for every op family."""
    pieces = {"forward": forward, "setup_context": setup_context, "backward": backward, "jvp": jvp, "vmap": vmap}
    cls = type(name, (torch.autograd.Function,), {k: staticmethod(v) for k, v in pieces.items()})
    return cls.apply


def act(z: Tensor, activation: str, order: int) -> Tensor:
    """f^(order)(z); the identity's f is z and its f' is 1, written out (no kernel call)."""
    if activation == "identity":
        return z if order == 0 else torch.ones_like(z) if order == 1 else torch.zeros_like(z)
    return _ops.activation_derivative(z, activation, order)


def add(*terms: Tensor | None) -> Tensor | None:
    """The sum of the defined terms (None when there are none): tangents of inputs without one are None."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def batch_first(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """t with its vmapped dimension first (expanded to `size` when t is not vmapped)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def batched_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x (B, *batch, in) @ w(B, out, in).T + b (B, out), one GEMM per batch entry (torch.matmul batches them)."""
    rows = math.prod(x.shape[1:-1])
    z = torch.matmul(x.reshape(x.shape[0], rows, x.shape[-1]), w.transpose(1, 2))
    if b is not None:
        z = z + b.unsqueeze(1)
    return z.reshape(*x.shape[:-1], w.shape[1])


# ---- autocast ----------------------------------------------------------------------------------------------

# Under torch.autocast, dense and mlp run as eager's nn.Linear does: their floating inputs (not float64) are
# cast to the region's dtype, so the result comes out in that dtype, as the activation after an eager Linear
# does (it runs in its input's dtype), and the op itself runs with autocast off. Not register_autocast: it
# fixes one dtype per device at registration, while a region chooses float16 or bfloat16 when it opens.
# Where eager autocast runs the activation in float32 (softplus on CUDA), the result is returned in float32.
FLOAT32_ACTIVATIONS_UNDER_AUTOCAST = {"cpu": (), "cuda": ("softplus",)}
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
AUTOCAST_DEVICE_TYPES = tuple(_AUTOCAST_KEYS)


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, device_type, dtype) for v in value)
    return value


def autocast_kernel(op, device_type: str, last_activation):
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            y = op(*_autocast_cast(args, device_type, dtype))
        if y.dtype == dtype and last_activation(args) in FLOAT32_ACTIVATIONS_UNDER_AUTOCAST[device_type]:
            y = y.float()
        return y
    return kernel


_autocast_lib = torch.library.Library("fusedlayers", "IMPL")


def register_autocast(op_name: str, last_activation: Callable) -> None:
    """Registers the autocast rule above for a layer op; last_activation(args) names its last activation."""
    op = getattr(_ops, op_name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        _autocast_lib.impl(op_name, autocast_kernel(op, device_type, last_activation), key)
