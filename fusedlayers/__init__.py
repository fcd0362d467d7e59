"""fusedlayers: fused dense, MLP and cross-entropy layers for PyTorch with hand-written gradients."""
import torch  # noqa: F401  (loads libtorch, which fusedlayers._C links against)

from . import _C  # noqa: F401  (registers the torch.library ops)
from . import ops  # noqa: F401  (the op families: fakes, torch.func, autocast)
from . import functional
from .backends import available_backends
from .activations import ACTIVATIONS, ActivationModule
from .convert import fuse
from .modules import FusedCrossEntropyLoss, FusedDense, FusedLinearCrossEntropyLoss, FusedMLP
from .ode import ODEField, odeint, odeint_adjoint

__all__ = ["ACTIVATIONS", "ActivationModule", "FusedCrossEntropyLoss", "FusedDense", "FusedLinearCrossEntropyLoss",
           "FusedMLP", "ODEField", "available_backends", "functional", "fuse", "odeint", "odeint_adjoint"]
