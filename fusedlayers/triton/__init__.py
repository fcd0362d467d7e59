"""Triton kernels of fusedlayers: on a GPU, or on CPU tensors under TRITON_INTERPRET=1.

Importing `fusedlayers.triton.<family>` registers the kernels of the `triton_<family>_*` ops."""
