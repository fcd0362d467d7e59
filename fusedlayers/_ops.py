"""The Python side of the torch.library ops: fake kernels (shapes for torch.compile and meta tensors) and the
backend registry. The schemas, the autograd and the native kernels are C++ (csrc/)."""
import importlib.util
import math
import os

import torch
from torch import Tensor

from .activations import derivative_formula

BACKENDS = ("auto", "cpu", "cuda", "triton")


# ---- backends ---------------------------------------------------------------------------------------------

# Fixed at import (fusedlayers._C is loaded first): plain constants, so torch.compile traces no lookup.
HAS_NATIVE_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("fusedlayers::dense_forward", "CUDA")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """The backends this machine can run: "cpu" always; "cuda" with a GPU and the CUDA kernels built;
    "triton" with triton and a GPU, or on CPU tensors under TRITON_INTERPRET=1."""
    found = ["cpu"]
    if torch.cuda.is_available() and HAS_NATIVE_CUDA:
        found.append("cuda")
    if HAS_TRITON and (torch.cuda.is_available() or _triton_interpreted()):
        found.append("triton")
    return found


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    return backend


def backend_for(backend: str, x: Tensor) -> str:
    """resolve_backend() for x's device, the common case (a CPU tensor, "auto" or "cpu") first: a tiny
    network's call feels each attribute lookup (x.device.type alone costs a third of a microsecond)."""
    if x.is_cpu and (backend == "auto" or backend == "cpu"):
        return "native"
    return resolve_backend(backend, x.device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps a user's backend choice for tensors on `device` to the kernel family the C++ op calls:
    "native" (the C++ CPU or CUDA kernels, picked by the dispatcher from the device) or "triton"."""
    if backend == "auto" and device.type == "cuda" and not HAS_NATIVE_CUDA and HAS_TRITON:
        backend = "triton"  # a build without the CUDA kernels still runs GPU tensors through Triton
    if backend == "auto" or backend == device.type:
        if device.type == "cuda" and not HAS_NATIVE_CUDA:
            raise RuntimeError("fusedlayers was built without its CUDA kernels; use backend='triton' or rebuild "
                               "with nvcc present (FUSEDLAYERS_CUDA=1)")
        return "native"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package")
        if device.type == "cpu" and not _triton_interpreted():
            raise RuntimeError("backend='triton' runs on CPU tensors only under TRITON_INTERPRET=1 (set before "
                               "importing fusedlayers); move the tensors to a GPU otherwise")
        from .triton import cross_entropy, dense, mlp  # noqa: F401  (registers the triton_* kernels)
        return "triton"
    check_backend(backend)
    raise ValueError(f"backend={backend!r} cannot run tensors on device {device.type!r}")


# ---- argument checks and fake kernels -------------------------------------------------------------------

def check_dense_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """The checks of csrc/dense.h, with the same messages, for the fake and Triton kernels."""
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
    """Whether dense_forward returns z (else an empty tensor): identity's f' needs no z."""
    return save_preact and activation != "identity"


def _dense_forward_fake(x, weight, bias, activation, save_preact):
    check_dense_args(x, weight, bias)
    shape = (*x.shape[:-1], weight.shape[0])
    preact = x.new_empty(shape) if saves_preact(activation, save_preact) else x.new_empty(0)
    return x.new_empty(shape), preact


def _dense_backward_fake(grad_out, x, weight, bias, preact, activation, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            weight.new_empty(weight.shape[0]) if output_mask[2] and bias is not None else None)


for _prefix in ("", "triton_"):
    torch.library.register_fake(f"fusedlayers::{_prefix}dense_forward")(_dense_forward_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}dense_backward")(_dense_backward_fake)


def check_mlp_args(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[str],
                   op: str = "mlp") -> None:
    """The checks of csrc/mlp.h, with the same messages: every layer as dense's, and the chain's shapes; op names
    the caller."""
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
    """csrc/mlp.h's layout: the inputs of layers 1..L-1, then the pre-activation of each non-identity layer."""
    batch = x.shape[:-1]
    hs = [x.new_empty((*batch, w.shape[0])) for w in weights[:-1]]
    return hs + [x.new_empty((*batch, w.shape[0])) for w, a in zip(weights, activations) if a != "identity"]


def _triton_mlp_saved(x, weights, activations):
    """fusedlayers/triton/mlp.py's layout: the pre-activation of every layer."""
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _mlp_forward_fake(saved_layout):
    def fake(x, weights, biases, activations, save):
        check_mlp_args(x, weights, biases, activations)
        saved = saved_layout(x, weights, activations) if save else []
        return x.new_empty((*x.shape[:-1], weights[-1].shape[0])), saved
    return fake


def _mlp_backward_fake(grad_out, x, weights, biases, saved, activations, input_grad):
    return (x.new_empty(x.shape) if input_grad else None, [w.new_empty(w.shape) for w in weights],
            [b.new_empty(b.shape) for b in biases])


for _prefix, _layout in (("", _native_mlp_saved), ("triton_", _triton_mlp_saved)):
    torch.library.register_fake(f"fusedlayers::{_prefix}mlp_forward")(_mlp_forward_fake(_layout))
    torch.library.register_fake(f"fusedlayers::{_prefix}mlp_backward")(_mlp_backward_fake)


def check_jet_args(x: Tensor, direction: Tensor, weights: list[Tensor], biases: list[Tensor],
                   activations: list[str]) -> None:
    """The checks of csrc/mlp_jet.cpp, with the same messages."""
    check_mlp_args(x, weights, biases, activations, "mlp_jet")
    torch._check(direction.dtype == x.dtype, lambda: f"mlp_jet(): expected direction to have the dtype of x "
                                                     f"({x.dtype}), got {direction.dtype}")
    torch._check(direction.device == x.device, lambda: f"mlp_jet(): expected direction on the device of x "
                                                       f"({x.device}), got {direction.device}")
    broadcasts = direction.dim() <= x.dim() and all(d in (1, n) for d, n in zip(reversed(direction.shape),
                                                                                 reversed(x.shape)))
    torch._check(broadcasts, lambda: f"mlp_jet(): expected direction of a shape that broadcasts to the shape of x "
                                     f"{list(x.shape)}, got {list(direction.shape)}")


@torch.library.register_fake("fusedlayers::mlp_jet_forward")
def _mlp_jet_forward_fake(x, direction, weights, biases, activations):
    check_jet_args(x, direction, weights, biases, activations)
    rows = math.prod(x.shape[:-1])
    saved = [x.new_empty((3, rows, w.shape[1])) for w in weights] + [x.new_empty((3, rows, w.shape[0]))
                                                                     for w in weights]
    u = x.new_empty((*x.shape[:-1], weights[-1].shape[0]))
    return u, torch.empty_like(u), torch.empty_like(u), saved


@torch.library.register_fake("fusedlayers::mlp_jet_backward")
def _mlp_jet_backward_fake(grad_u, grad_du, grad_d2u, x, direction, weights, biases, saved, activations,
                           output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            direction.new_empty(direction.shape) if output_mask[1] else None,
            [w.new_empty(w.shape) for w in weights] if output_mask[2] else [],
            [b.new_empty(b.shape) for b in biases] if output_mask[2] else [])


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


def check_cross_entropy_args(logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float,
                             softcap: float | None) -> None:
    """The checks of csrc/cpu/cross_entropy.cpp, with the same messages, for the fake and Triton kernels."""
    torch._check(logits.dim() == 2, lambda: f"cross_entropy(): expected logits of shape (N, C), got shape "
                                            f"{list(logits.shape)}")
    torch._check(logits.dtype.is_floating_point,
                 lambda: f"cross_entropy(): expected floating-point logits, got {logits.dtype}")
    torch._check(target.dtype == torch.int64,
                 lambda: f"cross_entropy(): expected target of dtype int64 (long), got {target.dtype}")
    torch._check(target.dim() == 1 and target.shape[0] == logits.shape[0],
                 lambda: f"cross_entropy(): expected target of shape ({logits.shape[0]},) for logits of shape "
                         f"{list(logits.shape)}, got shape {list(target.shape)}")
    torch._check(target.device == logits.device,
                 lambda: f"cross_entropy(): expected target on the device of logits ({logits.device}), got "
                         f"{target.device}")
    check_per_class(weight, "cross_entropy", "weight", logits.shape[1], logits, "logits")
    torch._check_value(0.0 <= label_smoothing <= 1.0,
                       lambda: f"cross_entropy(): label_smoothing must be in [0, 1], got {label_smoothing}")
    torch._check_value(softcap is None or softcap > 0.0,
                       lambda: f"cross_entropy(): softcap must be positive, got {softcap}")


def ce_math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cross-entropy kernels compute and return loss and lse in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


CE_REDUCTIONS = ("none", "mean", "sum")


def check_ce_reduction(reduction: str) -> None:
    torch._check_value(reduction in CE_REDUCTIONS,
                       lambda: f"cross_entropy(): '{reduction}' is not a valid value for reduction; expected one of: "
                               f"{', '.join(CE_REDUCTIONS)}")


def _kept_weights(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """The class weight of each row's target, 0 for ignored rows (1 for kept rows without weights)."""
    kept = target != ignore_index
    if weight is None:
        return kept.to(dtype)
    safe = torch.where(kept, target, 0).clamp(0, weight.shape[0] - 1)  # the kernels reject kept strays
    return torch.where(kept, weight.to(dtype).gather(0, safe), 0)


def ce_reduce_rows(loss: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str) -> Tensor:
    """PyTorch's reductions of per-row losses, as torch ops (no host synchronization): "mean" divides by the summed
    class weights of the kept rows (their count without weights), nan when every row is ignored."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return ce_mean(loss.sum(), _kept_weights(target, weight, ignore_index, loss.dtype).sum())


def ce_mean(total: Tensor, denominator: Tensor) -> Tensor:
    """A "mean" reduction: nan when the kept rows' weights sum to 0, as PyTorch's (its NLL part is 0/0), even
    where label smoothing's part of the total is not 0."""
    return torch.where(denominator == 0, float("nan"), total / denominator)


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
    return logits.new_empty(logits.shape)


for _prefix in ("", "triton_"):
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_forward")(_cross_entropy_forward_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_forward_grad")(_cross_entropy_forward_grad_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}cross_entropy_backward")(_cross_entropy_backward_fake)


def check_linear_cross_entropy_args(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                                    class_weight: Tensor | None, chunk_size: int) -> None:
    """The checks of csrc/linear_cross_entropy.cpp, with the same messages."""
    torch._check(hidden.dim() == 2, lambda: f"linear_cross_entropy(): expected hidden of shape (N, H), got shape "
                                            f"{list(hidden.shape)}")
    torch._check(hidden.dtype.is_floating_point,
                 lambda: f"linear_cross_entropy(): expected floating-point hidden, got {hidden.dtype}")
    torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                 lambda: f"linear_cross_entropy(): expected weight of shape (V, {hidden.shape[1]}) for hidden of shape "
                         f"{list(hidden.shape)}, got shape {list(weight.shape)}")
    torch._check(weight.dtype == hidden.dtype,
                 lambda: f"linear_cross_entropy(): expected weight to have the dtype of hidden ({hidden.dtype}), got "
                         f"{weight.dtype}")
    torch._check(weight.device == hidden.device,
                 lambda: f"linear_cross_entropy(): expected weight on the device of hidden ({hidden.device}), got "
                         f"{weight.device}")
    for name, v in (("bias", bias), ("class_weight", class_weight)):
        check_per_class(v, "linear_cross_entropy", name, weight.shape[0], hidden, "hidden")
    torch._check(target.dim() == 1 and target.shape[0] == hidden.shape[0],
                 lambda: f"linear_cross_entropy(): expected target of shape ({hidden.shape[0]},), got shape "
                         f"{list(target.shape)}")
    torch._check_value(chunk_size >= 1, lambda: f"linear_cross_entropy(): chunk_size must be positive, got {chunk_size}")


def _linear_ce_grads_fake(hidden, weight, bias, output_mask):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (hidden.new_empty(hidden.shape) if output_mask[0] else None,
            weight.new_empty(weight.shape, dtype=acc) if output_mask[1] else None,
            weight.new_empty(weight.shape[0], dtype=acc) if output_mask[2] and bias is not None else None)


@torch.library.register_fake("fusedlayers::linear_cross_entropy_forward")
def _linear_cross_entropy_forward_fake(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                       z_loss, softcap, reduction, chunk_size, output_mask, backend):
    check_linear_cross_entropy_args(hidden, weight, bias, target, class_weight, chunk_size)
    check_cross_entropy_args(hidden.new_empty(hidden.shape[0], weight.shape[0]), target, class_weight,
                             label_smoothing, softcap)
    math = ce_math_dtype(hidden.dtype)
    n = hidden.shape[0]
    loss = hidden.new_empty(n, dtype=math) if reduction == "none" else hidden.new_empty((), dtype=math)
    return (loss, hidden.new_empty(n, dtype=math), *_linear_ce_grads_fake(hidden, weight, bias, output_mask))


@torch.library.register_fake("fusedlayers::linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(grad_loss, grad_lse, hidden, weight, bias, target, class_weight, lse,
                                        ignore_index, label_smoothing, z_loss, softcap, chunk_size, output_mask,
                                        backend):
    check_linear_cross_entropy_args(hidden, weight, bias, target, class_weight, chunk_size)
    return _linear_ce_grads_fake(hidden, weight, bias, output_mask)


# ---- higher-order gradients -----------------------------------------------------------------------------

torch.library.register_fake("fusedlayers::activation_derivative")(lambda z, activation, order: torch.empty_like(z))


@torch.library.register_vmap("fusedlayers::activation_derivative")
def _activation_derivative_vmap(info, in_dims, z, activation, order):
    # Elementwise: the batched tensor goes through as it is.
    return torch.ops.fusedlayers.activation_derivative(z, activation, order), in_dims[0]


@torch.library.register_fake("fusedlayers::activation_grad")
def _activation_grad_fake(grad, z, activation, order):
    torch._check(grad.shape == z.shape, lambda: f"activation_grad(): expected grad of the shape of z ({list(z.shape)}), "
                                                f"got {list(grad.shape)}")
    torch._check(grad.dtype == z.dtype, lambda: f"activation_grad(): expected grad of the dtype of z ({z.dtype}), got "
                                                f"{grad.dtype}")
    return torch.empty_like(z)


@torch.library.register_vmap("fusedlayers::activation_grad")
def _activation_grad_vmap(info, in_dims, grad, z, activation, order):
    # Elementwise: both with the vmapped dimension first (an unbatched one expanded).
    n = info.batch_size
    grad, z = ((t.movedim(d, 0) if d is not None else t.expand(n, *t.shape)) for t, d in zip((grad, z), in_dims))
    return torch.ops.fusedlayers.activation_grad(grad, z, activation, order), 0


_LIB = torch.library.Library("fusedlayers", "IMPL")
_LIB.impl("activation_derivative_formula", derivative_formula, "CompositeImplicitAutograd")


# ---- autocast ----------------------------------------------------------------------------------------------

# Under torch.autocast, dense and mlp run as eager's nn.Linear does: their floating inputs (not float64) are
# cast to the region's dtype, so the result comes out in that dtype, as the activation after an eager Linear
# does (it runs in its input's dtype), and the op itself runs with autocast off. Not register_autocast: it
# fixes one dtype per device at registration, while a region chooses float16 or bfloat16 when it opens.
# Where eager autocast runs the activation in float32 (softplus on CUDA), the result is returned in float32.
_FLOAT32_ACTIVATIONS_UNDER_AUTOCAST = {"cpu": (), "cuda": ("softplus",)}
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
AUTOCAST_DEVICE_TYPES = tuple(_AUTOCAST_KEYS)


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, device_type, dtype) for v in value)
    return value


def _autocast_kernel(op, device_type: str, last_activation):
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            y = op(*_autocast_cast(args, device_type, dtype))
        if y.dtype == dtype and last_activation(args) in _FLOAT32_ACTIVATIONS_UNDER_AUTOCAST[device_type]:
            y = y.float()
        return y
    return kernel


_autocast_lib = torch.library.Library("fusedlayers", "IMPL")
for _device_type, _key in _AUTOCAST_KEYS.items():
    _autocast_lib.impl("dense", _autocast_kernel(torch.ops.fusedlayers.dense.default, _device_type,
                                                 lambda args: args[3]), _key)
    _autocast_lib.impl("mlp", _autocast_kernel(torch.ops.fusedlayers.mlp.default, _device_type,
                                               lambda args: args[3][-1]), _key)
