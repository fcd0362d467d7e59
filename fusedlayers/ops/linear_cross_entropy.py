"""The linear cross-entropy family's Python side (its schemas, autograd, kernels and C++ contract:
csrc/ops/linear_cross_entropy.cpp): the argument contract and the kernels' fakes (every backend's)."""
import torch
from torch import Tensor

from .common import KERNELS
from .cross_entropy import ce_math_dtype, check_ce_reduction, check_cross_entropy_args, check_per_class


def check_linear_cross_entropy_args(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                                    class_weight: Tensor | None, chunk_size: int) -> None:
    """The linear cross-entropy contract (C++: csrc/ops/linear_cross_entropy.cpp, the same messages)."""
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


def _linear_cross_entropy_forward_fake(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                       z_loss, softcap, reduction, chunk_size, output_mask):
    check_linear_cross_entropy_args(hidden, weight, bias, target, class_weight, chunk_size)
    check_ce_reduction(reduction, "linear_cross_entropy")
    check_cross_entropy_args(hidden.new_empty(hidden.shape[0], weight.shape[0]), target, class_weight,
                             label_smoothing, softcap)
    math = ce_math_dtype(hidden.dtype)
    n = hidden.shape[0]
    loss = hidden.new_empty(n, dtype=math) if reduction == "none" else hidden.new_empty((), dtype=math)
    return (loss, hidden.new_empty(n, dtype=math), *_linear_ce_grads_fake(hidden, weight, bias, output_mask))


def _linear_cross_entropy_backward_fake(grad_loss, grad_lse, hidden, weight, bias, target, class_weight, lse,
                                        ignore_index, label_smoothing, z_loss, softcap, chunk_size, output_mask):
    check_linear_cross_entropy_args(hidden, weight, bias, target, class_weight, chunk_size)
    return _linear_ce_grads_fake(hidden, weight, bias, output_mask)


for _prefix in KERNELS.values():
    torch.library.register_fake(f"fusedlayers::{_prefix}linear_cross_entropy_forward")(
        _linear_cross_entropy_forward_fake)
    torch.library.register_fake(f"fusedlayers::{_prefix}linear_cross_entropy_backward")(
        _linear_cross_entropy_backward_fake)
