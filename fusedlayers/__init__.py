"""fusedlayers: fused dense, MLP and cross-entropy layers for PyTorch with hand-written gradients."""
import torch  # noqa: F401  (loads libtorch, which fusedlayers._C links against)

from . import _C  # noqa: F401  (registers the torch.library ops)
from . import _ops  # noqa: F401  (fake kernels and backend registry)
from . import functional
from ._ops import available_backends
from .activations import ACTIVATIONS, ActivationModule
from .convert import fuse
from .modules import FusedCrossEntropyLoss, FusedDense, FusedLinearCrossEntropyLoss, FusedMLP

__all__ = ["ACTIVATIONS", "ActivationModule", "FusedCrossEntropyLoss", "FusedDense", "FusedLinearCrossEntropyLoss",
           "FusedMLP", "available_backends", "functional", "fuse"]
