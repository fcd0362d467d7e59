"""Triton kernels of fusedlayers: on a GPU, or on CPU tensors under TRITON_INTERPRET=1.

Importing this package (the Triton backend's module in fusedlayers/backends.py) registers the kernels of the
`triton_<family>_*` ops, one module per family."""
from . import cross_entropy, dense, mlp  # noqa: F401
