"""Functional forms of the fused layers, in the style of torch.nn.functional."""
import torch
from torch import Tensor

from ._ops import resolve_backend
from .activations import check_activation

SAVE_POLICIES = ("preact", "recompute")

_dense = torch.ops.fusedlayers.dense.default


def dense(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "relu", backend: str = "auto",
          save: str = "preact") -> Tensor:
    """y = activation(x @ weight.T + bias) as one op with a hand-written backward.

    x: (..., in_features), a single vector included; weight: (out_features, in_features); bias: (out_features,).
    activation: a name from fusedlayers.ACTIVATIONS. backend: "auto" (by device), "cpu", "cuda" or "triton".
    save: "preact" keeps z = x @ weight.T + bias for the backward; "recompute" keeps nothing extra and
    recomputes z in the backward (one more GEMM, less memory).
    """
    check_activation(activation)
    if save not in SAVE_POLICIES:
        raise ValueError(f"unknown save policy {save!r}; expected one of: {', '.join(SAVE_POLICIES)}")
    return _dense(x, weight, bias, activation, save == "preact", resolve_backend(backend, x.device))
