"""The mlp family's Python side (its schemas, autograd and C++ contract: csrc/ops/mlp.{h,cpp}): the argument
contract, the kernels' fakes (every backend's, with each backend's saved layout), the torch.func route and the
autocast rule."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import CONSTANT_DERIVATIVE, check_activation
from .common import (AUTOCAST_DEVICE_TYPES, KERNELS, act, add, batch_first, batched_linear, function_op, needs_function,
                     register_autocast)
from .dense import dense_op

_ops = torch.ops.fusedlayers
_mlp = _ops.mlp.default
_mlp_flat = _ops.mlp_flat.default
_mlp_flat_grad_and_value = _ops.mlp_flat_grad_and_value.default


def check_mlp_args(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[str],
                   op: str = "mlp") -> None:
    """The mlp contract (C++: csrc/ops/mlp.h, the same messages): every layer as dense's, and the chain's shapes;
    op names the caller."""
    torch._check(len(weights) >= 1, lambda: f"{op}(): expected at least one layer, got an empty weights list")
    torch._check(len(biases) in (0, len(weights)),
                 lambda: f"{op}(): expected biases to be empty or one per layer ({len(weights)}), got {len(biases)}")
    torch._check(len(activations) == len(weights),
                 lambda: f"{op}(): expected one activation per layer ({len(weights)}), got {len(activations)}")
    torch._check(x.dim() >= 1, lambda: f"{op}(): expected x to have at least 1 dimension, got a 0-dimensional tensor")
    width = x.shape[-1]
    for i, w in enumerate(weights):
        torch._check(w.dim() == 2, lambda: f"{op}(): expected weights[{i}] to be 2-D, got shape {list(w.shape)}")
        torch._check(w.shape[1] == width,
                     lambda: f"{op}(): expected weights[{i}].size(1) == {width} (the width of the layer's input), "
                             f"got shape {list(w.shape)}")
        torch._check(w.dtype == x.dtype, lambda: f"{op}(): expected weights[{i}] to have the dtype of x ({x.dtype}), "
                                                 f"got {w.dtype}")
        torch._check(w.device == x.device, lambda: f"{op}(): expected weights[{i}] on the device of x ({x.device}), "
                                                   f"got {w.device}")
        if biases:
            b = biases[i]
            torch._check(b.dim() == 1 and b.shape[0] == w.shape[0],
                         lambda: f"{op}(): expected biases[{i}] of shape [{w.shape[0]}], got {list(b.shape)}")
            torch._check(b.dtype == x.dtype, lambda: f"{op}(): expected biases[{i}] to have the dtype of x ({x.dtype}), "
                                                     f"got {b.dtype}")
            torch._check(b.device == x.device, lambda: f"{op}(): expected biases[{i}] on the device of x ({x.device}), "
                                                       f"got {b.device}")
        width = w.shape[0]
    torch._check(x.dtype.is_floating_point, lambda: f"{op}(): expected x to be a floating-point tensor, got {x.dtype}")


def _native_mlp_saved(x, weights, activations):
    """csrc/ops/mlp.h's layout: the inputs of layers 1..L-1, then the pre-activation of each layer whose f' is not
    constant."""
    batch = x.shape[:-1]
    hs = [x.new_empty((*batch, w.shape[0])) for w in weights[:-1]]
    return hs + [x.new_empty((*batch, w.shape[0])) for w, a in zip(weights, activations) if a not in CONSTANT_DERIVATIVE]


def _triton_mlp_saved(x, weights, activations):
    """fusedlayers/triton/mlp.py's layout: the pre-activation of every layer."""
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _mlp_forward_fake(saved_layout):
    def fake(x, weights, biases, activations, save):
        check_mlp_args(x, weights, biases, activations)
        for a in activations:
            check_activation(a)
        saved = saved_layout(x, weights, activations) if save else []
        return x.new_empty((*x.shape[:-1], weights[-1].shape[0])), saved
    return fake


def _mlp_backward_fake(grad_out, x, weights, biases, saved, activations, input_grad):
    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [b.new_empty(b.shape) for b in biases])


# What each kernel backend's forward saves (a new backend adds its layout here).
SAVED_LAYOUT = {"native": _native_mlp_saved, "triton": _triton_mlp_saved}

for _kernels, _prefix in KERNELS.items():
    torch.library.register_fake(f"fusedlayers::{_prefix}mlp_forward")(_mlp_forward_fake(SAVED_LAYOUT[_kernels]))
    torch.library.register_fake(f"fusedlayers::{_prefix}mlp_backward")(_mlp_backward_fake)


# ---- torch.func ------------------------------------------------------------------------------------------
# autograd.Function sees only top-level tensor arguments: the layer lists are passed flat,
# (layers, activations, backend, x, *weights, *biases).

def _split(layers: int, params: tuple) -> tuple[list, list]:
    return list(params[:layers]), list(params[layers:])


def _mlp_forward(layers, activations, backend, x, *params):
    weights, biases = _split(layers, params)
    return _mlp(x, weights, biases, activations, False, backend)


def _mlp_setup_context(ctx, inputs, output):
    ctx.layers, ctx.activations = inputs[0], inputs[1]
    ctx.save_for_backward(*inputs[3:])
    ctx.save_for_forward(*inputs[3:])


def _mlp_backward(ctx, grad):
    x, *params = ctx.saved_tensors
    weights, biases = _split(ctx.layers, params)
    params_grad = any(ctx.needs_input_grad[4:])
    dx, dweights, dbiases = _ops.mlp_grad(grad, x, weights, biases, ctx.activations, ctx.needs_input_grad[3],
                                          params_grad)
    if not params_grad:
        dweights, dbiases = [None] * len(weights), [None] * len(biases)
    return None, None, None, dx, *dweights, *dbiases


def _mlp_jvp(ctx, _layers, _activations, _backend, tx, *tparams):
    # Layer by layer: dz = dh W^T + h dW^T + db, dh' = f'(z) * dz.
    x, *params = ctx.saved_tensors
    weights, biases = _split(ctx.layers, params)
    tweights, tbiases = _split(ctx.layers, tparams)
    h, th = x, tx
    for l, (w, activation) in enumerate(zip(weights, ctx.activations)):
        b = biases[l] if biases else None
        z = F.linear(h, w, b)
        tz = add(None if th is None else F.linear(th, w), None if tweights[l] is None else F.linear(h, tweights[l]),
                  tbiases[l] if tbiases else None)
        h = act(z, activation, 0)
        th = None if tz is None else act(z, activation, 1) * tz
    return th


def _mlp_vmap(info, in_dims, layers, activations, backend, x, *params):
    xd, pds = in_dims[3], in_dims[4:]
    weights, biases = _split(layers, params)
    if all(d is None for d in pds):
        return mlp_op(x.movedim(xd, 0), weights, biases, activations, False, backend), 0
    n = info.batch_size
    wds, bds = _split(layers, pds)
    h = batch_first(x, xd, n)
    for l, (w, activation) in enumerate(zip(weights, activations)):
        b = batch_first(biases[l], bds[l], n) if biases else None
        h = act(batched_linear(h, batch_first(w, wds[l], n), b), activation, 0)
    return h, 0


_mlp_function = function_op("MLPFunction", _mlp_forward, _mlp_setup_context, _mlp_backward, _mlp_jvp, _mlp_vmap)


def mlp_op(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[str], save: bool,
           backend: str) -> Tensor:
    """The mlp op with checked arguments: the op itself when compiling (as dense_op), else through the
    autograd.Function where a transform or a tangent needs it. Under torch.jit.trace, which cannot record the
    op's list of activation names, the layers as dense ops: the same function, traced."""
    if torch.jit.is_tracing():
        for l, (w, a) in enumerate(zip(weights, activations)):
            x = dense_op(x, w, biases[l] if biases else None, a, save, backend)
        return x
    if not torch.compiler.is_compiling() and needs_function(x, *weights, *biases):
        return _mlp_function(len(weights), activations, backend, x, *weights, *biases)
    return _mlp(x, weights, biases, activations, save, backend)

register_autocast("mlp", lambda args: args[3][-1])


# ---- the flat layout -----------------------------------------------------------------------------------------

def flat_numel(sizes: list[int], bias: bool) -> int:
    """The elements of a network's parameters in the flat layout (csrc/ops/mlp.h): layer after layer, its weight
    (out x in, row-major) then its bias."""
    return sum(out * (inp + bias) for inp, out in zip(sizes, sizes[1:]))


def flat_slices(sizes: list[int], bias: bool) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{"weight0": (offset, shape), "bias0": ..., "weight1": ...}: where each layer's tensors sit in the flat
    layout, in its order."""
    slices, offset = {}, 0
    for l, (inp, out) in enumerate(zip(sizes, sizes[1:])):
        slices[f"weight{l}"] = (offset, (out, inp))
        offset += out * inp
        if bias:
            slices[f"bias{l}"] = (offset, (out,))
            offset += out
    return slices


def flat_piece(flat: Tensor, offset: int, shape: tuple[int, ...]) -> Tensor:
    """The view of a 1-D flat tensor that is one layer's weight or bias (an entry of flat_slices)."""
    return flat.narrow(0, offset, math.prod(shape)).view(shape)


def flat_layers(params: Tensor, sizes: list[int], bias: bool) -> tuple[list[Tensor], list[Tensor]]:
    """The layers' weights and biases as views of params (differentiable: a gradient through them reaches
    params)."""
    weights, biases = [], []
    for name, where in flat_slices(sizes, bias).items():
        (weights if name.startswith("weight") else biases).append(flat_piece(params, *where))
    return weights, biases


def check_flat_args(x: Tensor, params: Tensor, sizes: list[int], bias: bool, activations: list[str]) -> None:
    """mlp_flat's contract, with the messages of check_flat_args in csrc/ops/mlp.cpp, for torch.func's route,
    which does not reach the C++ op."""
    op = "mlp_flat"
    torch._check(len(sizes) >= 2, lambda: f"{op}(): expected sizes to list at least the input and output widths, got "
                                          f"{list(sizes)}")
    torch._check(len(activations) == len(sizes) - 1, lambda: f"{op}(): expected one activation per layer "
                                                             f"({len(sizes) - 1}), got {len(activations)}")
    n = flat_numel(sizes, bias)
    torch._check(params.dim() == 1 and params.numel() == n,
                 lambda: f"{op}(): expected params to be 1-D with {n} elements (every layer's weight"
                         f"{' and bias' if bias else ''} for sizes {list(sizes)}), got shape {list(params.shape)}")
    torch._check(x.dim() >= 1 and x.shape[-1] == sizes[0],
                 lambda: f"{op}(): expected x of shape [..., {sizes[0]}] (sizes[0]), got {list(x.shape)}")
    torch._check(params.dtype == x.dtype, lambda: f"{op}(): expected params to have the dtype of x ({x.dtype}), "
                                                  f"got {params.dtype}")


def mlp_flat_op(x: Tensor, params: Tensor, sizes: list[int], bias: bool, activations: list[str], save: bool,
                backend: str) -> Tensor:
    """The mlp op on parameters in the flat layout: one autograd edge and one gradient tensor for all of them.
    Where mlp_op takes its autograd.Function (torch.func, forward-mode tangents) or traces layer by layer
    (torch.jit.trace), the layers as views of params through mlp_op instead: autograd carries the views'
    gradients to params."""
    tracing = torch.jit.is_tracing()
    if tracing or (not torch.compiler.is_compiling() and needs_function(x, params)):
        if not tracing:  # (a traced shape is a tensor; the traced layers check themselves)
            check_flat_args(x, params, sizes, bias, activations)
        weights, biases = flat_layers(params, sizes, bias)
        return mlp_op(x, weights, biases, activations, save, backend)
    return _mlp_flat(x, params, sizes, bias, activations, save, backend)

register_autocast("mlp_flat", lambda args: args[4][-1])


def mlp_flat_grad_and_value(x: Tensor, params: Tensor, grad_output: Tensor | None, target: Tensor | None,
                            sizes: list[int], bias: bool, activations: list[str], input_grad: bool,
                            backend: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """(value, dx, dparams) with no autograd graph (csrc/ops/mlp.cpp's mlp_flat_grad_and_value); value is the
    network's output for a grad_output, or F.mse_loss's mean against a target."""
    if not torch.compiler.is_compiling() and needs_function(x, params):
        raise RuntimeError("grad_and_value(): the graph-free call computes its gradients itself and does not run "
                           "under torch.func transforms or forward-mode AD; call the module there")
    if x.device.type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(x.device.type):
        raise RuntimeError("grad_and_value(): torch.autocast is enabled, and the graph-free call would run in "
                           f"{params.dtype}, not in the autocast dtype the module's forward takes there; call it "
                           "outside the autocast region, or call the module and backward()")
    return _mlp_flat_grad_and_value(x, params, grad_output, target, sizes, bias, activations, input_grad, backend)
