"""torch.func and forward-mode AD for the fused ops.

The C++ ops carry their reverse-mode autograd, which torch.func's transforms cannot use as they are (no
setup_context, no jvp, no batching rule). Under a transform, or with a forward-mode tangent, functional.py
sends the call to an autograd.Function built here from the op's pieces instead: forward (the op below
autograd), backward (a composite gradient op, differentiable again), jvp (a composite of torch ops) and vmap
(a batching rule). Never under torch.compile: Dynamo does not support a custom jvp, and the op itself is
the compiled path.
"""
import math
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

_ops = torch.ops.fusedlayers


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


def _act(z: Tensor, activation: str, order: int) -> Tensor:
    """f^(order)(z); the identity's f is z and its f' is 1, written out (no kernel call)."""
    if activation == "identity":
        return z if order == 0 else torch.ones_like(z) if order == 1 else torch.zeros_like(z)
    return _ops.activation_derivative(z, activation, order)


def _add(*terms: Tensor | None) -> Tensor | None:
    """The sum of the defined terms (None when there are none): tangents of inputs without one are None."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _batch_first(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """t with its vmapped dimension first (expanded to `size` when t is not vmapped)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _batched_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x (B, *batch, in) @ w(B, out, in).T + b (B, out), one GEMM per batch entry (torch.matmul batches them)."""
    rows = math.prod(x.shape[1:-1])
    z = torch.matmul(x.reshape(x.shape[0], rows, x.shape[-1]), w.transpose(1, 2))
    if b is not None:
        z = z + b.unsqueeze(1)
    return z.reshape(*x.shape[:-1], w.shape[1])


# ---- dense ---------------------------------------------------------------------------------------------

def _dense_forward(x, weight, bias, activation, backend):
    return _ops.dense(x, weight, bias, activation, False, backend)


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
    dz = _add(None if tx is None else F.linear(tx, weight), None if tw is None else F.linear(x, tw), tb)
    return _act(F.linear(x, weight, bias), ctx.activation, 1) * dz


def _dense_vmap(info, in_dims, x, weight, bias, activation, backend):
    xd, wd, bd = in_dims[:3]
    if wd is None and bd is None:
        # dense takes any leading batch dims: the vmapped one becomes one more.
        return dense(x.movedim(xd, 0), weight, bias, activation, False, backend), 0
    n = info.batch_size
    z = _batched_linear(_batch_first(x, xd, n), _batch_first(weight, wd, n), _batch_first(bias, bd, n))
    return _act(z, activation, 0), 0


_dense_function = function_op("DenseFunction", _dense_forward, _dense_setup_context, _dense_backward, _dense_jvp,
                              _dense_vmap)


def dense(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, save_preact: bool, backend: str) -> Tensor:
    """The dense op, through the autograd.Function where a transform or a tangent needs it (not compiling)."""
    if needs_function(x, weight, bias):
        return _dense_function(x, weight, bias, activation, backend)
    return _ops.dense(x, weight, bias, activation, save_preact, backend)


# ---- mlp -----------------------------------------------------------------------------------------------
# autograd.Function sees only top-level tensor arguments: the layer lists are passed flat,
# (layers, activations, backend, x, *weights, *biases).

def _split(layers: int, params: tuple) -> tuple[list, list]:
    return list(params[:layers]), list(params[layers:])


def _mlp_forward(layers, activations, backend, x, *params):
    weights, biases = _split(layers, params)
    return _ops.mlp(x, weights, biases, activations, False, backend)


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
        tz = _add(None if th is None else F.linear(th, w), None if tweights[l] is None else F.linear(h, tweights[l]),
                  tbiases[l] if tbiases else None)
        h = _act(z, activation, 0)
        th = None if tz is None else _act(z, activation, 1) * tz
    return th


def _mlp_vmap(info, in_dims, layers, activations, backend, x, *params):
    xd, pds = in_dims[3], in_dims[4:]
    weights, biases = _split(layers, params)
    if all(d is None for d in pds):
        return mlp(x.movedim(xd, 0), weights, biases, activations, False, backend), 0
    n = info.batch_size
    wds, bds = _split(layers, pds)
    h = _batch_first(x, xd, n)
    for l, (w, activation) in enumerate(zip(weights, activations)):
        b = _batch_first(biases[l], bds[l], n) if biases else None
        h = _act(_batched_linear(h, _batch_first(w, wds[l], n), b), activation, 0)
    return h, 0


_mlp_function = function_op("MLPFunction", _mlp_forward, _mlp_setup_context, _mlp_backward, _mlp_jvp, _mlp_vmap)


def mlp(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[str], save: bool,
        backend: str) -> Tensor:
    """The mlp op, through the autograd.Function where a transform or a tangent needs it (not compiling)."""
    if needs_function(x, *weights, *biases):
        return _mlp_function(len(weights), activations, backend, x, *weights, *biases)
    return _ops.mlp(x, weights, biases, activations, save, backend)
