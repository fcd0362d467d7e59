"""nn.Module forms of the fused layers: drop-in replacements for the torch.nn modules they fuse."""
import torch
from torch import Tensor, nn

from . import functional as FL
from ._ops import BACKENDS
from .activations import check_activation


class FusedDense(nn.Module):
    """nn.Linear followed by an activation, as one op: y = activation(x @ weight.T + bias).

    Parameters, shapes, initialization and state_dict keys are nn.Linear's, so checkpoints load either way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 device=None, dtype=None, backend: str = "auto", save: str = "preact") -> None:
        super().__init__()
        self.activation = check_activation(activation)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
        if save not in FL.SAVE_POLICIES:
            raise ValueError(f"unknown save policy {save!r}; expected one of: {', '.join(FL.SAVE_POLICIES)}")
        self.backend = backend
        self.save = save
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)  # the same initialization, drawing the same random numbers

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "relu", backend: str = "auto",
                    save: str = "preact") -> "FusedDense":
        """A FusedDense computing activation(linear(x)), sharing linear's Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear() expected an nn.Linear, got {type(linear).__name__}")
        fused = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
                    device="meta", backend=backend, save=save)
        fused.weight = linear.weight
        fused.bias = linear.bias
        return fused

    def forward(self, x: Tensor) -> Tensor:
        return FL.dense(x, self.weight, self.bias, self.activation, self.backend, self.save)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}")
