"""The cross-entropy family's Python side (its schemas, autograd, formulas and C++ contract:
csrc/ops/cross_entropy.{h,cpp}): the argument contract, the reductions as torch ops (no host synchronization),
the kernels' fakes (every backend's) and the torch.func route."""
import math

import torch
from torch import Tensor

from .common import KERNELS, batch_first, function_op

_ops = torch.ops.fusedlayers
_cross_entropy = _ops.cross_entropy.default


def check_per_class(v: Tensor | None, op: str, name: str, classes: int, like: Tensor, like_name: str) -> None:
    """A per-class vector argument (cross_entropy's weight; linear_cross_entropy's bias and class_weight): shape
    (classes,), the dtype and device of the argument `like`."""
    if v is None:
        return
    torch._check(v.dim() == 1 and v.shape[0] == classes,
                 lambda: f"{op}(): expected {name} of shape ({classes},) (one per class), got shape {list(v.shape)}")
    torch._check(v.dtype == like.dtype,
                 lambda: f"{op}(): expected {name} to have the dtype of {like_name} ({like.dtype}), got {v.dtype}")
    torch._check(v.device == like.device,
                 lambda: f"{op}(): expected {name} on the device of {like_name} ({like.device}), got {v.device}")


def _check_logits(logits: Tensor) -> None:
    torch._check(logits.dim() == 2, lambda: f"cross_entropy(): expected logits of shape (N, C), got shape "
                                            f"{list(logits.shape)}")
    torch._check(logits.dtype.is_floating_point,
                 lambda: f"cross_entropy(): expected floating-point logits, got {logits.dtype}")


def _check_shared(logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float) -> None:
    """What both kinds of target check after their own: the target's device, the weight, label_smoothing."""
    torch._check(target.device == logits.device,
                 lambda: f"cross_entropy(): expected target on the device of logits ({logits.device}), got "
                         f"{target.device}")
    check_per_class(weight, "cross_entropy", "weight", logits.shape[1], logits, "logits")
    torch._check_value(0.0 <= label_smoothing <= 1.0,
                       lambda: f"cross_entropy(): label_smoothing must be in [0, 1], got {label_smoothing}")


def check_cross_entropy_args(logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float,
                             softcap: float | None) -> None:
    """The cross-entropy contract: the checks of every cross-entropy kernel, the fakes' and the Triton
    kernels' here, the C++ kernels' in csrc/ops/cross_entropy.h with the same messages."""
    _check_logits(logits)
    torch._check(target.dtype == torch.int64,
                 lambda: f"cross_entropy(): expected target of dtype int64 (long), got {target.dtype}")
    torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0],
                 lambda: f"cross_entropy(): expected target of shape ({logits.shape[0]},) for logits of shape "
                         f"{list(logits.shape)}, got shape {list(target.shape)}")
    _check_shared(logits, target, weight, label_smoothing)
    torch._check_value(softcap is None or 0.0 < softcap < math.inf,
                       lambda: f"cross_entropy(): softcap must be positive and finite (None for no cap), got {softcap}")


def check_soft_cross_entropy_args(logits: Tensor, target: Tensor, weight: Tensor | None,
                                  label_smoothing: float) -> None:
    """The contract of class-probability targets (cross_entropy_soft_*): csrc/ops/cross_entropy.h's
    check_soft_ce_args, with its messages."""
    _check_logits(logits)
    torch._check(target.shape == logits.shape,
                 lambda: f"cross_entropy(): expected class-probability target of the shape of logits "
                         f"{list(logits.shape)}, got shape {list(target.shape)}")
    torch._check(target.dtype == logits.dtype,
                 lambda: f"cross_entropy(): expected class-probability target of the dtype of logits "
                         f"({logits.dtype}), got {target.dtype}")
    _check_shared(logits, target, weight, label_smoothing)


def check_soft_ce_backward_rows(grad_loss: Tensor, grad_lse: Tensor | None, lse: Tensor, logits: Tensor) -> None:
    for v in (grad_loss, lse, grad_lse):
        torch._check(v is None or (v.dim() == 1 and v.shape[0] == logits.shape[0]),
                     lambda: f"cross_entropy_soft_backward(): expected grad_loss, grad_lse and lse of shape "
                             f"({logits.shape[0]},), got shape {list(v.shape)}")
        torch._check(v is None or v.device == logits.device,
                     lambda: f"cross_entropy_soft_backward(): expected grad_loss, grad_lse and lse on the device of "
                             f"logits ({logits.device}), got {v.device}")


def ce_math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cross-entropy kernels compute and return loss and lse in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


CE_REDUCTIONS = ("none", "mean", "sum")


def check_ce_reduction(reduction: str, op: str = "cross_entropy") -> None:
    torch._check_value(reduction in CE_REDUCTIONS,
                       lambda: f"{op}(): '{reduction}' is not a valid value for reduction; expected one of: "
                               f"{', '.join(CE_REDUCTIONS)}")


def check_ce_backward_rows(grad_loss: Tensor, grad_lse: Tensor | None, lse: Tensor, logits: Tensor,
                           reduction: str) -> None:
    """The per-row inputs of every backward kernel: (N,) each (grad_loss 0-d for "mean" and "sum"), on the
    logits' device."""
    n = logits.shape[0]
    torch._check(lse.dim() == 1 and lse.shape[0] == n,
                 lambda: f"cross_entropy_backward(): expected lse of shape ({n},), got shape {list(lse.shape)}")
    if reduction == "none":
        torch._check(grad_loss.dim() == 1 and grad_loss.shape[0] == n,
                     lambda: f"cross_entropy_backward(): expected grad_loss of shape ({n},) for reduction 'none', got "
                             f"shape {list(grad_loss.shape)}")
    else:
        torch._check(grad_loss.dim() == 0, lambda: f"cross_entropy_backward(): expected a 0-d grad_loss for a reduced "
                                                   f"loss, got shape {list(grad_loss.shape)}")
    torch._check(grad_lse is None or (grad_lse.dim() == 1 and grad_lse.shape[0] == n),
                 lambda: f"cross_entropy_backward(): expected grad_lse of shape ({n},), got shape "
                         f"{list(grad_lse.shape)}")
    for v in (grad_loss, lse, grad_lse):
        torch._check(v is None or v.device == logits.device,
                     lambda: f"cross_entropy_backward(): expected grad_loss, grad_lse and lse on the device of logits "
                             f"({logits.device}), got {v.device}")


def _kept_weights(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """The class weight of each row's target, 0 for ignored rows (1 for kept rows without weights)."""
    kept = target != ignore_index
    if weight is None or weight.shape[0] == 0:  # no classes: no valid kept row, nothing to gather from
        return kept.to(dtype)
    safe = torch.where(kept, target, 0).clamp(0, weight.shape[0] - 1)  # the kernels reject kept strays
    return torch.where(kept, weight.to(dtype).gather(0, safe), 0)


def ce_reduce_rows(loss: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
                   label_smoothing: float) -> Tensor:
    """PyTorch's reductions of per-row losses, as torch ops (no host synchronization): "mean" divides by the summed
    class weights of the kept rows (their count without weights), as ce_mean."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return ce_mean(loss.sum(), _kept_weights(target, weight, ignore_index, loss.dtype).sum(), label_smoothing)


def ce_mean(total: Tensor, denominator: Tensor, label_smoothing: float) -> Tensor:
    """A "mean" reduction, total / denominator: when the kept rows' weights sum to 0, +-inf (or nan for a 0 total)
    as PyTorch's, and with label smoothing nan, as PyTorch's (its smoothing part is a separate mean, 0/0 where no
    row is kept) even where a nonzero total would give inf."""
    if label_smoothing:
        return torch.where(denominator == 0, float("nan"), total / denominator)
    return total / denominator


def mean_class_weight(weight: Tensor | None, reduction: str) -> Tensor | None:
    """The class weights a "mean" computes with: a mean is the same for any positive scale of the weights, so
    tiny ones (whose kept sum may be a denormal, its reciprocal inf, its products short of bits) are scaled by a
    power of two, exactly, to a largest magnitude in [1, 2); others (and other reductions) are left as given."""
    if reduction != "mean" or weight is None or not weight.is_floating_point() or weight.numel() == 0:
        return weight
    top = weight.detach().abs().amax()
    up = torch.where((top > 0) & (top < 1), 1 - torch.frexp(top).exponent, 0)  # 0 for NaN
    half = torch.ldexp(torch.ones_like(top), up // 2)  # in two factors: 2**up alone overflows for denormals
    return weight * half * torch.ldexp(torch.ones_like(top), up - up // 2)


def ce_row_grad_loss(grad_loss: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
                     dtype: torch.dtype) -> Tensor:
    """The per-row grad_loss of a backward: grad_loss itself for "none"; for a reduced loss its 0-d grad_loss
    (divided by ce_reduce_rows' denominator for "mean") expanded to (N,)."""
    g = grad_loss.to(dtype)
    if reduction == "none":
        return g.contiguous()
    if reduction == "mean":
        g = g / _kept_weights(target, weight, ignore_index, dtype).sum()
    return g.expand(target.shape[0]).contiguous()


def _cross_entropy_forward_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction):
    check_cross_entropy_args(logits, target, weight, label_smoothing, softcap)
    check_ce_reduction(reduction)
    math = ce_math_dtype(logits.dtype)
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    return logits.new_empty(loss_shape, dtype=math), logits.new_empty(logits.shape[0], dtype=math)


def _cross_entropy_forward_grad_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                     reduction, grad):
    torch._check(grad.shape == logits.shape and grad.dtype == logits.dtype,
                 lambda: f"cross_entropy_forward_grad(): expected grad shaped as logits {list(logits.shape)} of dtype "
                         f"{logits.dtype}, got {list(grad.shape)} {grad.dtype}")
    return _cross_entropy_forward_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                       reduction)


def _cross_entropy_backward_fake(grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction):
    check_cross_entropy_args(logits, target, weight, label_smoothing, softcap)
    check_ce_reduction(reduction)
    check_ce_backward_rows(grad_loss, grad_lse, lse, logits, reduction)
    return logits.new_empty(logits.shape)


def _soft_forward_fake(logits, target, weight, label_smoothing):
    check_soft_cross_entropy_args(logits, target, weight, label_smoothing)
    math = ce_math_dtype(logits.dtype)
    return logits.new_empty(logits.shape[0], dtype=math), logits.new_empty(logits.shape[0], dtype=math)


def _soft_backward_fake(grad_loss, grad_lse, logits, target, weight, lse, label_smoothing):
    check_soft_cross_entropy_args(logits, target, weight, label_smoothing)
    check_soft_ce_backward_rows(grad_loss, grad_lse, lse, logits)
    return logits.new_empty(logits.shape)


for _prefix in KERNELS.values():
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_soft_forward")(_soft_forward_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_soft_backward")(_soft_backward_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_forward")(_cross_entropy_forward_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_forward_grad")(_cross_entropy_forward_grad_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_backward")(_cross_entropy_backward_fake)


# ---- torch.func ------------------------------------------------------------------------------------------
# The per-row (loss, lse) op; the formulas are the contract's ("Softmax cross-entropy" in csrc/ops/cross_entropy.cpp), in
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
    # softmax, not exp(z - lse): lse is rounded at the scale of the largest logit
    return x, lse, z.softmax(-1), kept, w, wt, onehot, x.shape[-1]


def _ce_backward(ctx, grad_loss, grad_lse):
    logits = ctx.saved_tensors[0]
    x, lse, p, kept, w, wt, onehot, C = _ce_terms(ctx)
    eps = ctx.eps
    # where: an all-ignored mean's grad_loss is inf. An output without a gradient gets None.
    gl = torch.where(kept, 0 if grad_loss is None else grad_loss.to(x.dtype), 0)
    a = wt * ((1 - eps) + 2 * ctx.z_loss * lse)
    if eps:  # only with smoothing: an absent class's inf weight would make 0 * inf a NaN in every gradient
        a = a + eps / C * (C if w is None else w.sum())
    a = gl * a
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
    dloss = wt * ((1 - eps) * (dlse - (onehot * dz).sum(-1)) + 2 * ctx.z_loss * lse * dlse)
    if eps:
        dloss = dloss + eps / C * (C * dlse - dz.sum(-1) if w is None else w.sum() * dlse - (w * dz).sum(-1))
    return torch.where(kept, dloss, 0), dlse


def _ce_vmap(info, in_dims, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend):
    ld, td, wd = in_dims[:3]
    n = info.batch_size
    args = ignore_index, label_smoothing, z_loss, softcap, "none", backend
    if wd is not None:  # a class weight per batch entry: one call each
        pick = lambda t, d, i: t if d is None else t.select(d, i)  # noqa: E731
        outs = [cross_entropy_function(pick(logits, ld, i), pick(target, td, i), weight.select(wd, i), *args) for i in range(n)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)
    # The op takes rows: the batch entries become more rows.
    logits, target = batch_first(logits, ld, n), batch_first(target, td, n)
    loss, lse = cross_entropy_function(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight, *args)
    return (loss.reshape(n, logits.shape[1]), lse.reshape(n, logits.shape[1])), (0, 0)


_ce_function = function_op("CrossEntropyFunction", _ce_forward, _ce_setup_context, _ce_backward, _ce_jvp, _ce_vmap)


def cross_entropy_function(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                           label_smoothing: float, z_loss: float, softcap: float | None, reduction: str,
                           backend: str) -> tuple[Tensor, Tensor]:
    """The cross_entropy op as the autograd.Function, for a torch.func transform or a tangent (not compiling):
    per-row losses, reduced by torch ops."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():  # as the op refuses it
        raise RuntimeError(_CE_WEIGHT_GRAD)
    loss, lse = _ce_function(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend)
    return ce_reduce_rows(loss, target, weight, ignore_index, reduction, label_smoothing), lse


# ---- class-probability targets ---------------------------------------------------------------------------
# One autograd.Function over the cross_entropy_soft_* kernels (csrc/ops/cross_entropy.cpp has their formulas):
# per-row (loss, lse), reduced by torch ops. Its backward is the kernel, or under create_graph the same formula
# in torch ops (differentiable again); the target gets its gradient too, as in F.cross_entropy. Under
# torch.compile a twin without jvp and vmap, which Dynamo does not trace.

def _soft_kernel(name: str, backend: str):
    return getattr(_ops, KERNELS[backend] + name).default


def _soft_forward(logits, target, weight, label_smoothing, backend):
    return _soft_kernel("cross_entropy_soft_forward", backend)(logits, target, weight, label_smoothing)


def _soft_setup_context(ctx, inputs, output):
    logits, target, weight, ctx.eps, ctx.backend = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.save_for_forward(logits, target, weight, output[1])
    ctx.set_materialize_grads(False)


def _soft_terms(ctx):
    """(math dtype, log_softmax, softmax, q, w) of the saved inputs; w None without a weight."""
    logits, target, weight, _ = ctx.saved_tensors
    math = ce_math_dtype(logits.dtype)
    x = logits.to(math)
    w = None if weight is None else weight.to(math)
    q = target.to(math)
    if ctx.eps:
        q = (1 - ctx.eps) * q + ctx.eps / x.shape[-1]
    return math, x.log_softmax(-1), x.softmax(-1), q if w is None else q * w, w


def _soft_backward(ctx, grad_loss, grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError(_CE_WEIGHT_GRAD)
    gl = torch.zeros_like(lse) if grad_loss is None else grad_loss
    terms = _soft_terms(ctx) if torch.is_grad_enabled() else None  # create_graph: the formula in torch ops
    dlogits = dtarget = None
    if ctx.needs_input_grad[0]:
        if terms is None:
            dlogits = _soft_kernel("cross_entropy_soft_backward", ctx.backend)(gl, grad_lse, logits, target, weight,
                                                                              lse, ctx.eps)
        else:
            math, _, p, q, _ = terms
            dlogits = gl.to(math).unsqueeze(-1) * (q.sum(-1, keepdim=True) * p - q)
            if grad_lse is not None:
                dlogits = dlogits + grad_lse.to(math).unsqueeze(-1) * p
            dlogits = dlogits.to(logits.dtype)
    if ctx.needs_input_grad[1] and grad_loss is not None:
        math = ce_math_dtype(logits.dtype)
        logp = logits.to(math).log_softmax(-1) if terms is None else terms[1]
        g = -gl.to(math).unsqueeze(-1)
        # d loss / d target[c] = -(1 - eps) w[c] log_softmax(z)[c] in PyTorch's order, ((-g w) log_softmax) (1 - eps):
        # a zero weight gives 0 where g log_softmax overflows, label smoothing 1 NaN there, as PyTorch's
        dtarget = ((g if weight is None else g * weight.to(math)) * logp * (1 - ctx.eps)).to(target.dtype)
    return dlogits, dtarget, None, None, None


def _soft_jvp(ctx, tlogits, ttarget, tweight, *_):
    # dlse = <p, dz>, dloss = Q dlse - <q, dz> - (1 - eps) <w dt, log_softmax(z)>
    if tweight is not None:
        raise RuntimeError(_CE_WEIGHT_GRAD)
    math, logp, p, q, w = _soft_terms(ctx)
    dlse = torch.zeros_like(logp[..., 0])
    dloss = dlse
    if tlogits is not None:
        dz = tlogits.to(math)
        dlse = (p * dz).sum(-1)
        dloss = q.sum(-1) * dlse - (q * dz).sum(-1)
    if ttarget is not None:
        dq = (1 - ctx.eps) * ttarget.to(math)
        dloss = dloss - ((dq if w is None else dq * w) * logp).sum(-1)
    return dloss, dlse


def _soft_vmap(info, in_dims, logits, target, weight, label_smoothing, backend):
    ld, td, wd = in_dims[:3]
    n = info.batch_size
    if wd is not None:  # a class weight per batch entry: one call each
        pick = lambda t, d, i: t if d is None else t.select(d, i)  # noqa: E731
        outs = [_soft_function(pick(logits, ld, i), pick(target, td, i), weight.select(wd, i), label_smoothing,
                               backend) for i in range(n)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)
    logits, target = batch_first(logits, ld, n), batch_first(target, td, n)
    C = logits.shape[-1]
    loss, lse = _soft_function(logits.reshape(-1, C), target.reshape(-1, C), weight, label_smoothing, backend)
    return (loss.reshape(n, logits.shape[1]), lse.reshape(n, logits.shape[1])), (0, 0)


_soft_function = function_op("CrossEntropySoftFunction", _soft_forward, _soft_setup_context, _soft_backward,
                             _soft_jvp, _soft_vmap)
_soft_compiled = type("CrossEntropySoftCompiled", (torch.autograd.Function,), {
    "forward": staticmethod(_soft_forward), "setup_context": staticmethod(_soft_setup_context),
    "backward": staticmethod(_soft_backward)}).apply


def cross_entropy_soft(logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float,
                       reduction: str, backend: str) -> tuple[Tensor, Tensor]:
    """Class-probability targets (N, C): (loss reduced as F.cross_entropy reduces them, a "mean" over the N rows
    whatever the weights; lse (N,))."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():  # as the index path refuses it
        raise RuntimeError(_CE_WEIGHT_GRAD)
    apply = _soft_compiled if torch.compiler.is_compiling() else _soft_function
    loss, lse = apply(logits, target, weight, label_smoothing, backend)
    if reduction == "none":
        return loss, lse
    if reduction == "sum":
        return loss.sum(), lse
    # PyTorch's: the sum over numel / C rows, nan when there are no logits at all
    return (loss.sum() / logits.shape[0] if logits.numel() else loss.sum() + math.nan), lse