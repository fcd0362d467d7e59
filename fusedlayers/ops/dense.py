"""The dense family's Python side (its schemas, autograd and C++ contract: csrc/ops/dense.{h,cpp}): the argument
contract, the kernels' fakes (every backend's), the torch.func route and the autocast rule."""
import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import CONSTANT_DERIVATIVE, check_activation
from .common import (KERNELS, act, add, batch_first, batched_linear, function_op, needs_function,
                     register_autocast)

_ops = torch.ops.fusedlayers
_dense = _ops.dense.default  # the overload itself: the packet resolves it on every call


def check_dense_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """The dense contract: the checks of every dense kernel, the fakes' and the Triton kernels' here, the C++
    kernels' in csrc/ops/dense.h with the same messages (tests/test_contracts.py holds them to it)."""
    torch._check(x.dim() >= 1, lambda: "dense(): expected x to have at least 1 dimension, got a 0-dimensional tensor")
    torch._check(weight.dim() == 2,
                 lambda: f"dense(): expected weight to be 2-D (out_features, in_features), got shape {list(weight.shape)}")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"dense(): expected x.size(-1) == weight.size(1) (in_features), got x of shape "
                         f"{list(x.shape)} and weight of shape {list(weight.shape)}")
    torch._check(x.dtype.is_floating_point, lambda: f"dense(): expected x to be a floating-point tensor, got {x.dtype}")
    torch._check(weight.dtype == x.dtype,
                 lambda: f"dense(): expected weight to have the dtype of x ({x.dtype}), got {weight.dtype}")
    torch._check(weight.device == x.device,
                 lambda: f"dense(): expected weight on the device of x ({x.device}), got {weight.device}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"dense(): expected bias of shape [{weight.shape[0]}] (out_features), got shape "
                             f"{list(bias.shape)}")
        torch._check(bias.dtype == x.dtype,
                     lambda: f"dense(): expected bias to have the dtype of x ({x.dtype}), got {bias.dtype}")
        torch._check(bias.device == x.device,
                     lambda: f"dense(): expected bias on the device of x ({x.device}), got {bias.device}")


def saves_preact(activation: str, save_preact: bool) -> bool:
    """Whether dense_forward returns z (else an empty tensor): a constant f' needs no z."""
    return save_preact and activation not in CONSTANT_DERIVATIVE


def _dense_forward_fake(x, weight, bias, activation, save_preact):
    check_dense_args(x, weight, bias)
    check_activation(activation)
    shape = (*x.shape[:-1], weight.shape[0])
    preact = x.new_empty(shape) if saves_preact(activation, save_preact) else x.new_empty(0)
    return x.new_empty(shape), preact


def _dense_backward_fake(grad_out, x, weight, bias, preact, activation, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            weight.new_empty(weight.shape[0]) if output_mask[2] and bias is not None else None)


for _prefix in KERNELS.values():
    torch.library.register_fake(f"fusedlayers::{_prefix}dense_forward")(_dense_forward_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}dense_backward")(_dense_backward_fake)


# ---- torch.func ------------------------------------------------------------------------------------------

def _dense_forward(x, weight, bias, activation, backend):
    return _dense(x, weight, bias, activation, False, backend)


def _dense_setup_context(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, weight, bias)
    ctx.save_for_forward(x, weight, bias)


def _dense_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    dx, dw, db = _ops.dense_grad(grad, x, weight, bias, ctx.activation, mask)
    return dx, dw, db, None, None


def _dense_jvp(ctx, tx, tw, tb, *_):
    # d act(x W^T + b) = f'(z) * (dx W^T + x dW^T + db)
    x, weight, bias = ctx.saved_tensors
    dz = add(None if tx is None else F.linear(tx, weight), None if tw is None else F.linear(x, tw), tb)
    return act(F.linear(x, weight, bias), ctx.activation, 1) * dz


def _dense_vmap(info, in_dims, x, weight, bias, activation, backend):
    xd, wd, bd = in_dims[:3]
    if wd is None and bd is None:
        # dense takes any leading batch dims: the vmapped one becomes one more.
        return dense_op(x.movedim(xd, 0), weight, bias, activation, False, backend), 0
    n = info.batch_size
    z = batched_linear(batch_first(x, xd, n), batch_first(weight, wd, n), batch_first(bias, bd, n))
    return act(z, activation, 0), 0


_dense_function = function_op("DenseFunction", _dense_forward, _dense_setup_context, _dense_backward, _dense_jvp,
                              _dense_vmap)


def dense_op(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, save_preact: bool, backend: str) -> Tensor:
    """The dense op with checked arguments: the op itself when compiling (Dynamo cannot trace a custom jvp), else
    through the autograd.Function where a transform or a tangent needs it."""
    if not torch.compiler.is_compiling() and needs_function(x, weight, bias):
        return _dense_function(x, weight, bias, activation, backend)
    return _dense(x, weight, bias, activation, save_preact, backend)

register_autocast("dense", lambda args: args[3])
