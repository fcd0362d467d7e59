"""Functional forms of the fused layers, in the style of torch.nn.functional: they check and normalize the
arguments, choose the backend, and call the op families (fusedlayers/ops/)."""
import math

import torch
from torch import Tensor

from .activations import check_activation
from .backends import resolve_backend
from .ops.common import AUTOCAST_DEVICE_TYPES, needs_function
from .ops.cross_entropy import cross_entropy_function, cross_entropy_soft, mean_class_weight
from .ops.dense import dense_op
from .ops.mlp import flat_layers, flat_numel, mlp_flat_grad_and_value, mlp_flat_op, mlp_op

__all__ = ["cross_entropy", "dense", "linear_cross_entropy", "mlp", "mlp_jet"]


def backend_for(backend: str, x: Tensor) -> str:
    """The kernel backend (the ops' `backend` argument) that runs the user's choice for x's device, loading its
    kernels at first use. The common case (a CPU tensor, "auto" or "cpu") first: a tiny network's call feels each
    attribute lookup (x.device.type alone costs a third of a microsecond)."""
    if x.is_cpu and (backend == "auto" or backend == "cpu"):
        return "native"
    b = resolve_backend(backend, x.device)
    if b.load is not None:
        b.load()
    return b.kernels

SAVE_POLICIES = ("preact", "recompute")

def saves_preact(save: str) -> bool:
    """The save policy as the ops take it (True: keep the pre-activations); ValueError if unknown."""
    if save not in SAVE_POLICIES:
        raise ValueError(f"unknown save policy {save!r}; expected one of: {', '.join(SAVE_POLICIES)}")
    return save == "preact"


def mlp_activations(layers: int, activation: str | list[str], output_activation: str) -> list[str]:
    """One checked activation name per layer: `activation` (one name, or one per hidden layer) for the
    hidden layers, `output_activation` for the last."""
    if layers < 1:
        raise ValueError("mlp(): expected at least one layer, got an empty weights list")
    hidden = [activation] * (layers - 1) if isinstance(activation, str) else list(activation)
    if len(hidden) != layers - 1:
        raise ValueError(f"expected one activation per hidden layer ({layers - 1}), got {len(hidden)}")
    return [check_activation(a) for a in hidden] + [check_activation(output_activation)]


_cross_entropy = torch.ops.fusedlayers.cross_entropy.default
_cross_entropy_ = torch.ops.fusedlayers.cross_entropy_.default
_linear_cross_entropy = torch.ops.fusedlayers.linear_cross_entropy.default
_mlp_jet = torch.ops.fusedlayers.mlp_jet.default
_mlp_jet_composite = torch.ops.fusedlayers.mlp_jet_composite.default


def dense(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "relu", backend: str = "auto",
          save: str = "preact") -> Tensor:
    """y = activation(x @ weight.T + bias) as one op with a hand-written backward, differentiable to any
    order (create_graph) and under torch.func (vmap, grad, jacrev, jvp, jacfwd, hessian) and forward-mode AD.

    x: (..., in_features), a single vector included; weight: (out_features, in_features); bias: (out_features,).
    activation: a name from fusedlayers.ACTIVATIONS. backend: "auto" (by device), "cpu", "cuda" or "triton".
    save: "preact" keeps z = x @ weight.T + bias for the backward; "recompute" keeps nothing extra and
    recomputes z in the backward (one more GEMM, less memory).
    """
    return dense_op(x, weight, bias, check_activation(activation), saves_preact(save), backend_for(backend, x))


def mlp(x: Tensor, weights: list[Tensor], biases: list[Tensor] | None, activation: str | list[str],
        output_activation: str = "identity", backend: str = "auto", save: str = "preact") -> Tensor:
    """A whole network of dense layers as one op with one autograd node:
    h_{l+1} = act_l(h_l @ weights[l].T + biases[l]), h_0 = x, for l = 0..L-1.

    activation: one name for every hidden layer, or a list with one per hidden layer (L - 1 names);
    output_activation: the last layer's. biases: None or one per layer. backend, save: as in dense().
    """
    activations = mlp_activations(len(weights), activation, output_activation)
    return mlp_op(x, weights, [] if biases is None else biases, activations, saves_preact(save),
                  backend_for(backend, x))


def mlp_jet(x: Tensor, weights: list[Tensor], biases: list[Tensor] | None, activation: str | list[str],
            output_activation: str = "identity", direction: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The network of mlp() and its first and second derivatives w.r.t. the input along `direction`, all in
    one forward pass (second-order Taylor mode) with one autograd node: returns (u, du, d2u), each of shape
    (..., out_features), with, row by row, du = (du/dx) @ direction and d2u = direction^T (d2u/dx2) direction.

    direction: broadcastable to x's shape (one direction for every row, or one per row); None means 1, for a
    network of one input feature, whose (u, du, d2u) are then u, du/dx and d2u/dx2. A physics-informed loss
    built from them needs one backward, not two create_graph gradients and a third pass through their graphs.
    Differentiable to any order by autograd (create_graph) in x, direction and the parameters. Runs with the C++
    kernels on CPU (float32, float64), elsewhere as a composite of ATen ops and the activation kernels; under
    torch.func transforms (vmap, grad, jacrev, jacfwd, jvp) and forward-mode AD always that composite, except that
    a forward-mode transform of a differentiated jet (hessian) raises: use jacrev(jacrev(...)).
    """
    activations = mlp_activations(len(weights), activation, output_activation)
    biases = [] if biases is None else biases
    if direction is None:
        if x.dim() > 0 and x.shape[-1] != 1:  # a 0-d x gets the op's own error
            raise ValueError(f"mlp_jet(): direction is required unless x has one feature (x.shape[-1] == 1), got "
                             f"x of shape {list(x.shape)}")
        direction = x.new_ones(1)
    if not torch.compiler.is_compiling() and needs_function(x, direction, *weights, *biases):
        return _mlp_jet_composite(x, direction, weights, biases, activations)  # the op's autograd is not functorch's
    return _mlp_jet(x, direction, weights, biases, activations)


REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction; expected one of: {', '.join(REDUCTIONS)}")
    return reduction


def _rows(input: Tensor, target: Tensor, what: str) -> tuple[Tensor, Tensor, tuple | None]:
    """Class-index targets: (logits (M, C), target (M,), the shape of a per-sample result, None when it is (M,)) from PyTorch's
    layouts: (C,) with a 0-d target, (N, C) with (N,), (N, C, d1, ...) with (N, d1, ...) (the class dim is moved
    last)."""
    if input.dim() == 2 and target.dim() == 1 and target.shape[0] == input.shape[0]:
        return input, target, None  # the common layout, checked in few steps: a small loss is dominated by them
    if input.dim() == 0:
        raise ValueError(f"{what}(): expected input of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    expected = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{what}(): expected target of shape {list(expected)} for input of shape "
                         f"{list(input.shape)}, got {list(target.shape)}")
    if input.dim() == 1:
        return input.unsqueeze(0), target.reshape(1), ()
    if input.dim() == 2:
        return input, target, None
    # not reshape(-1, C): ambiguous when C is 0
    return input.movedim(1, -1).reshape(math.prod(expected), input.shape[1]), target.reshape(-1), expected


def _smoothed_over_no_classes(loss: Tensor, classes: int, label_smoothing: float) -> Tensor:
    """PyTorch's label smoothing divides by the number of classes: with none, every loss is nan, an ignored
    row's too."""
    return loss + math.nan if classes == 0 and label_smoothing > 0 else loss


def _class_indices(target: Tensor) -> Tensor:
    """uint8 class indices as int64, which the kernels take (PyTorch accepts both)."""
    return target.long() if target.dtype == torch.uint8 else target


def _autocast_runs_in_float32(t: Tensor) -> bool:
    """Whether torch.autocast is on for t's device and t is float16/bfloat16: F.cross_entropy is on autocast's
    float32 list, so the losses then run (cross_entropy) or at least return (linear_cross_entropy) in float32."""
    return t.dtype in (torch.float16, torch.bfloat16) and t.device.type in AUTOCAST_DEVICE_TYPES \
        and torch.is_autocast_enabled(t.device.type)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, return_lse: bool = False, backend: str = "auto",
                  inplace_backward: bool = False, return_argmax: bool = False):
    """F.cross_entropy as one fused op with a hand-written gradient, for class-index targets and for
    class-probability targets (a floating-point target shaped as input: its gradient too).

    input: (C,), (N, C) or (N, C, d1, ...); target: class indices, int64, of shape (), (N,) or (N, d1, ...).
    weight, ignore_index, reduction, label_smoothing: as in F.cross_entropy. Beyond it: z_loss adds
    z_loss * lse**2 per kept sample (weighted and reduced like the loss), with lse the logsumexp of the
    sample's logits; softcap (positive, finite) replaces the logits z by softcap * tanh(z / softcap) first.
    return_lse=True returns (loss, lse), lse per sample (shape of reduction="none"); return_argmax=True also
    returns each sample's predicted class, input.argmax over the classes (shape of reduction="none"), read
    before the call writes anything: (loss, argmax), or (loss, lse, argmax). A kept target outside [0, C)
    raises. z_loss, softcap and inplace_backward take class-index targets only.

    inplace_backward=True saves the memory (and time) of the gradient: when autograd records the call, the
    forward overwrites the logits with the gradient of the loss for an upstream gradient of 1 ("mean"'s
    division included), in input's dtype, and backward scales that in place by the actual upstream gradient
    and passes it on. Which memory: `input`'s own when it is (C,) or (N, C) (a (B*T, V) view of a (B, T, V)
    output included: then the base holds it too); with (N, C, d1, ...) the classes are moved last into a copy,
    and that copy is overwritten while `input` keeps its values. The mutation is declared to autograd: a use
    of the old logits that saved them for its backward, and any differentiable use of them after this call,
    raise instead of reading the gradient. Reads outside autograd (under no_grad, .detach(), printing) cannot
    be caught: they see the gradient, not the logits, so take what you need from the logits first
    (return_argmax=True for predictions or accuracy). `input` must not be a leaf that requires grad; lse gets
    no gradient, there is no create_graph, and a second backward of the graph raises. In float16 the written
    gradient must fit float16's range before the upstream gradient scales it (else it holds an inf).
    """
    check_reduction(reduction)
    if _autocast_runs_in_float32(input):
        input, weight = input.float(), None if weight is None else weight.float()
    if target.dtype.is_floating_point:
        return _cross_entropy_probabilities(input, target, weight, reduction, label_smoothing, z_loss, softcap,
                                            return_lse, backend, inplace_backward, return_argmax)
    logits, rows_target, shape = _rows(input, _class_indices(target), "cross_entropy")
    argmax = logits.detach().argmax(-1) if return_argmax else None  # before an in-place call overwrites them
    args = (rows_target, mean_class_weight(weight, reduction), ignore_index, float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap), reduction, backend_for(backend, input))
    # the op itself when compiling (as in dense()), torch.func's route where a transform or a tangent needs it
    function = not torch.compiler.is_compiling() and needs_function(input, weight)
    if inplace_backward and torch.is_grad_enabled() and input.requires_grad:
        if function:
            raise RuntimeError("cross_entropy(): inplace_backward=True is not supported under torch.func transforms "
                               "or forward-mode AD; use inplace_backward=False")
        loss, lse = _cross_entropy_(logits, *args)
    else:
        loss, lse = (cross_entropy_function if function else _cross_entropy)(logits, *args)
    loss = _smoothed_over_no_classes(loss, logits.shape[1], label_smoothing)
    if shape is not None and reduction == "none":
        loss = loss.reshape(shape)
    loss = loss if loss.dtype == input.dtype else loss.to(input.dtype)
    out = (loss,)
    if return_lse:
        out += ((lse if shape is None else lse.reshape(shape)).to(input.dtype),)
    if return_argmax:
        out += (argmax if shape is None else argmax.reshape(shape),)
    return out[0] if len(out) == 1 else out


def _cross_entropy_probabilities(input, target, weight, reduction, label_smoothing, z_loss, softcap, return_lse,
                                 backend, inplace_backward, return_argmax):
    """cross_entropy() with class-probability targets, shaped as input: F.cross_entropy's semantics (a "mean"
    over the samples, whatever the weights; ignore_index does not apply) in the dtype both promote to."""
    for name, value, off in (("z_loss", z_loss, 0.0), ("softcap", softcap, None),
                             ("inplace_backward", inplace_backward, False)):
        if value != off:
            raise ValueError(f"cross_entropy(): {name} is supported with class-index targets only, not with "
                             f"class-probability targets (a floating-point target); got {name}={value}")
    if input.dim() == 0:
        raise ValueError("cross_entropy(): expected input of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if target.shape != input.shape:
        raise ValueError(f"cross_entropy(): expected class-probability target of the shape of input "
                         f"{list(input.shape)}, got {list(target.shape)}")
    if _autocast_runs_in_float32(target):
        target = target.float()
    dtype = torch.promote_types(input.dtype, target.dtype)
    input, target = input.to(dtype), target.to(dtype)
    weight = None if weight is None else weight.to(dtype)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    def rows(v):  # the classes last, one row per sample; not reshape(-1, C): ambiguous when C is 0
        return v.reshape(1, C) if v.dim() == 1 else v.movedim(1, -1).reshape(math.prod(shape), C)

    logits = rows(input)
    argmax = logits.detach().argmax(-1).reshape(shape) if return_argmax else None
    loss, lse = cross_entropy_soft(logits, rows(target), weight, float(label_smoothing), reduction,
                                   backend_for(backend, input))
    out = (loss.reshape(shape) if reduction == "none" else loss).to(dtype),
    if return_lse:
        out += (lse.reshape(shape).to(dtype),)
    if return_argmax:
        out += (argmax,)
    return out[0] if len(out) == 1 else out


# linear_cross_entropy's default chunk: rows whose logits hold about this many elements (64 MiB in float32):
# small next to the (N, V) logits, and enough rows that the GEMMs run efficiently and the weight gradient,
# accumulated once per chunk, is not re-read too often (measured on CPU at N=4096, H=1024, V=32000: 512-row
# chunks beat 131-row ones).
CHUNK_LOGITS = 1 << 24


def default_chunk_size(num_classes: int) -> int:
    return max(1, CHUNK_LOGITS // max(num_classes, 1))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         class_weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         return_lse: bool = False, chunk_size: int | None = None, backend: str = "auto"):
    """cross_entropy(hidden @ weight.T + bias, target, ...) without ever materializing the (N, V) logits.

    hidden: (H,) or (..., H); weight: (V, H), as nn.Linear's; bias: (V,); target: class indices shaped as
    hidden without its last dim. class_weight is F.cross_entropy's `weight` (renamed: `weight` is the linear
    layer's); the other options are cross_entropy()'s. The rows go through in chunks of chunk_size rows
    (default: about 2**24 logits per chunk, default_chunk_size(V)): each chunk's logits, loss and gradients
    are computed and freed. For "mean"/"sum" the gradients are computed in the forward (the logits once, three
    GEMMs in all); for "none" (or a gradient reaching lse) the backward recomputes each chunk's logits (one more
    GEMM). Differentiable once: a double backward raises.
    """
    check_reduction(reduction)
    if hidden.dim() == 0:
        raise ValueError("linear_cross_entropy(): expected hidden of shape (H,) or (..., H), got a 0-d tensor")
    if target.dtype.is_floating_point:
        raise TypeError(f"linear_cross_entropy(): expected target of class indices (dtype int64), got "
                        f"{target.dtype}; class-probability targets are not supported")
    shape = tuple(hidden.shape[:-1])
    if tuple(target.shape) != shape:
        raise ValueError(f"linear_cross_entropy(): expected target of shape {list(shape)} for hidden of shape "
                         f"{list(hidden.shape)}, got {list(target.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0]) if weight.dim() == 2 else 1
    rows = math.prod(shape)  # not reshape(-1, H): ambiguous when H is 0
    loss, lse = _linear_cross_entropy(hidden.reshape(rows, hidden.shape[-1]), weight, bias,
                                      _class_indices(target).reshape(rows),
                                      mean_class_weight(class_weight, reduction), ignore_index,
                                      float(label_smoothing), float(z_loss),
                                      None if softcap is None else float(softcap), reduction, int(chunk_size),
                                      backend_for(backend, hidden))
    dtype = torch.float32 if _autocast_runs_in_float32(hidden) else hidden.dtype
    loss = _smoothed_over_no_classes(loss, weight.shape[0], label_smoothing)
    loss = (loss.reshape(shape) if reduction == "none" else loss).to(dtype)
    return (loss, lse.reshape(shape).to(dtype)) if return_lse else loss


# torch.fx.symbolic_trace records calls of these as graph nodes instead of tracing into them (choosing a backend
# reads the input's device, and the layout checks read shapes, which a Proxy cannot answer), so that FX-based
# tools (create_feature_extractor, FX quantization) work on models that hold fused modules.
for _name in ("backend_for", "dense_op", "mlp_op", "mlp_flat_op", "mlp_jet", "cross_entropy", "linear_cross_entropy"):
    torch.fx.wrap(_name)
