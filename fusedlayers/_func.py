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

from ._ops import ce_reduce_rows

_ops = torch.ops.fusedlayers
# The overloads themselves: calling the packet (torch.ops.fusedlayers.mlp) resolves the overload on every call.
_dense, _mlp, _cross_entropy = _ops.dense.default, _ops.mlp.default, _ops.cross_entropy.default


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
    return _dense(x, weight, bias, activation, save_preact, backend)


# ---- mlp -----------------------------------------------------------------------------------------------
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
    return _mlp(x, weights, biases, activations, save, backend)


# ---- cross_entropy -------------------------------------------------------------------------------------
# The per-row (loss, lse) op; the formulas are the contract's ("Softmax cross-entropy" in csrc/ops.cpp), in
# torch ops that batch under vmap (the one-hot by a comparison) and differentiate again.

_CE_WEIGHT_GRAD = ("cross_entropy(): the gradient with respect to the class weight is not implemented (neither is "
                   "it in F.cross_entropy); pass weight.detach()")


def _ce_forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend):
    return _cross_entropy(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, "none", backend)


def _ce_setup_context(ctx, inputs, output):
    logits, target, weight, ctx.ignore_index, ctx.eps, ctx.z_loss, ctx.softcap, _ = inputs
    ctx.save_for_backward(logits, target, weight)
    ctx.save_for_forward(logits, target, weight)
    ctx.set_materialize_grads(False)  # a weight without a tangent gets None, not zeros (a tangent raises)


def _ce_terms(ctx):
    """(x, lse, p, kept, w (None: ones), w[t] of the kept rows, onehot(t), C) in the math dtype."""
    logits, target, weight = ctx.saved_tensors
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    z = x if ctx.softcap is None else ctx.softcap * torch.tanh(x / ctx.softcap)
    lse = z.logsumexp(-1)
    kept = target != ctx.ignore_index
    onehot = (torch.arange(x.shape[-1], device=x.device) == target.unsqueeze(-1)).to(x.dtype)
    w = None if weight is None else weight.to(x.dtype)
    wt = kept.to(x.dtype) if w is None else torch.where(kept, (onehot * w).sum(-1), 0)
    return x, lse, (z - lse.unsqueeze(-1)).exp(), kept, w, wt, onehot, x.shape[-1]


def _ce_backward(ctx, grad_loss, grad_lse):
    logits = ctx.saved_tensors[0]
    x, lse, p, kept, w, wt, onehot, C = _ce_terms(ctx)
    eps = ctx.eps
    # where: an all-ignored mean's grad_loss is inf. An output without a gradient gets None.
    gl = torch.where(kept, 0 if grad_loss is None else grad_loss.to(x.dtype), 0)
    W = C if w is None else w.sum()
    a = gl * (wt * ((1 - eps) + 2 * ctx.z_loss * lse) + eps / C * W)
    if grad_lse is not None:
        a = a + grad_lse.to(x.dtype)
    dz = a.unsqueeze(-1) * p - (gl * wt * (1 - eps)).unsqueeze(-1) * onehot
    if eps:
        dz = dz - (gl * (eps / C)).unsqueeze(-1) * (1 if w is None else w)
    if ctx.softcap is not None:
        dz = dz * (1 - torch.tanh(x / ctx.softcap).square())
    return dz.to(logits.dtype), None, None, None, None, None, None, None


def _ce_jvp(ctx, tlogits, _target, tweight, *_):
    # dlse = <p, dz>, dloss = kept * (w[t] * ((1 - eps) * (dlse - dz[t]) + 2 z_loss lse dlse)
    #                                 + eps / C * (W dlse - <w, dz>)), dz the tangent of the (capped) logits.
    if tweight is not None:
        raise RuntimeError(_CE_WEIGHT_GRAD)
    x, lse, p, kept, w, wt, onehot, C = _ce_terms(ctx)
    eps = ctx.eps
    dz = tlogits.to(x.dtype)
    if ctx.softcap is not None:
        dz = dz * (1 - torch.tanh(x / ctx.softcap).square())
    dlse = (p * dz).sum(-1)
    smooth = C * dlse - dz.sum(-1) if w is None else w.sum() * dlse - (w * dz).sum(-1)
    dloss = wt * ((1 - eps) * (dlse - (onehot * dz).sum(-1)) + 2 * ctx.z_loss * lse * dlse) + eps / C * smooth
    return torch.where(kept, dloss, 0), dlse


def _ce_vmap(info, in_dims, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend):
    ld, td, wd = in_dims[:3]
    n = info.batch_size
    args = ignore_index, label_smoothing, z_loss, softcap, "none", backend
    if wd is not None:  # a class weight per batch entry: one call each
        pick = lambda t, d, i: t if d is None else t.select(d, i)  # noqa: E731
        outs = [cross_entropy(pick(logits, ld, i), pick(target, td, i), weight.select(wd, i), *args) for i in range(n)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)
    # The op takes rows: the batch entries become more rows.
    logits, target = _batch_first(logits, ld, n), _batch_first(target, td, n)
    loss, lse = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight, *args)
    return (loss.reshape(n, logits.shape[1]), lse.reshape(n, logits.shape[1])), (0, 0)


_ce_function = function_op("CrossEntropyFunction", _ce_forward, _ce_setup_context, _ce_backward, _ce_jvp, _ce_vmap)


def cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float,
                  z_loss: float, softcap: float | None, reduction: str, backend: str) -> tuple[Tensor, Tensor]:
    """The cross_entropy op as the autograd.Function, for a torch.func transform or a tangent (not compiling):
    per-row losses, reduced by torch ops."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():  # as the op refuses it
        raise RuntimeError(_CE_WEIGHT_GRAD)
    loss, lse = _ce_function(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend)
    return ce_reduce_rows(loss, target, weight, ignore_index, reduction), lse
