"""The Python side of the op families, one module each, named after the family: its argument contract, the
fakes of its kernels (shapes for torch.compile and meta tensors), its torch.func route and autocast rule.
The schemas, the autograd and the C++ kernels are in csrc/ops/<family>.cpp (and csrc/cpu/, csrc/cuda/);
the Triton kernels in fusedlayers/triton/<family>.py. Importing this package registers them all."""
from . import activation, cross_entropy, dense, linear_cross_entropy, mlp, mlp_jet, odeint  # noqa: F401
