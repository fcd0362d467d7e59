"""The mlp_jet family's Python side (its schemas, autograd, composite and C++ contract: csrc/ops/mlp_jet.cpp): the
argument contract and the kernels' fakes."""
import math

import torch
from torch import Tensor

from ..activations import PIECEWISE_LINEAR
from .mlp import check_mlp_args


def check_jet_args(x: Tensor, direction: Tensor, weights: list[Tensor], biases: list[Tensor],
                   activations: list[str]) -> None:
    """The mlp_jet contract (C++: check_jet_args in csrc/ops/mlp_jet.cpp, the same messages)."""
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
    # a layer's input jet has two planes up to the first activation that is not piecewise linear (its d2 is 0)
    planes = [2 if all(a in PIECEWISE_LINEAR for a in activations[:i]) else 3 for i in range(len(weights))]
    saved = [x.new_empty((p, rows, w.shape[1])) for p, w in zip(planes, weights)] + \
        [x.new_empty((3, rows, w.shape[0])) for w in weights]
    u = x.new_empty((*x.shape[:-1], weights[-1].shape[0]))
    return u, torch.empty_like(u), torch.empty_like(u), saved


@torch.library.register_fake("fusedlayers::mlp_jet_backward")
def _mlp_jet_backward_fake(grad_u, grad_du, grad_d2u, x, direction, weights, biases, saved, activations,
                           output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            direction.new_empty(direction.shape) if output_mask[1] else None,
            [w.new_empty(w.shape) for w in weights] if output_mask[2] else [],
            [b.new_empty(b.shape) for b in biases] if output_mask[2] else [])
