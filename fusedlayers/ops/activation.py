"""The activation family's ops (csrc/ops/activation.cpp): fakes and batching rules of activation_derivative and
activation_grad, and the torch formulas behind activation_derivative_formula (the orders past the kernels')."""
import torch

from ..activations import derivative_formula

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
