"""JAX next to fusedlayers, when JAX is installed (it is not a dependency): the same network and inputs as a
case's eager nn.Sequential, its value and its VJP by jax.jit'd functions, with synchronous dispatch (each call
waits for its results, as a PyTorch CPU call does). The harness times it interleaved with the other
implementations, in the same process."""
import numpy as np
import torch
from torch import nn

from fusedlayers.activations import name_of_module

from .harness import Impl

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    jax = None


def _activation(name: str):
    table = {"identity": lambda z: z, "cos": jnp.cos, "tanh": jnp.tanh, "selu": jax.nn.selu, "relu": jax.nn.relu,
             "silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid, "gelu": lambda z: jax.nn.gelu(z, approximate=False)}
    if name not in table:
        raise ValueError(f"jax_impls: no JAX form for activation {name!r}")
    return table[name]


def _layers(seq: nn.Sequential):
    """[(weight, bias or None, activation)] of a Sequential of Linear layers, each optionally followed by one
    activation module, as JAX arrays and functions."""
    layers = []
    for m in seq:
        if isinstance(m, nn.Linear):
            to_jax = lambda t: jnp.asarray(t.detach().cpu().numpy())  # noqa: E731
            layers.append([to_jax(m.weight), None if m.bias is None else to_jax(m.bias), _activation("identity")])
        else:
            layers[-1][2] = _activation(name_of_module(m))
    return layers


def mlp_impl(seq: nn.Sequential, x: torch.Tensor, grad_out: torch.Tensor, prefix: torch.Tensor | None = None,
             name: str = "jax-jit") -> Impl | None:
    """seq's value and its VJP with grad_out w.r.t. x and every parameter, in JAX; the network's input is
    cat([x, prefix], -1) when prefix is given (the ODE field's control), the gradient then x's part only. None
    without JAX."""
    if jax is None:
        return None
    if x.dtype == torch.float64:
        jax.config.update("jax_enable_x64", True)
    layers = _layers(seq)
    acts = [a for _, _, a in layers]
    params = [(w, b) for w, b, _ in layers]
    xj, gj = jnp.asarray(x.detach().cpu().numpy()), jnp.asarray(grad_out.detach().cpu().numpy())
    extra = None if prefix is None else jnp.asarray(prefix.detach().cpu().numpy())

    def net(params, x):
        h = x if extra is None else jnp.concatenate([x, extra], -1)
        for (w, b), act in zip(params, acts):
            h = act(h @ w.T + (0 if b is None else b))
        return h

    forward = jax.jit(net)

    @jax.jit
    def value_and_vjp(params, x, g):
        y, pullback = jax.vjp(net, params, x)
        return y, pullback(g)

    def fwd():
        return forward(params, xj).block_until_ready()

    def fwd_bwd():
        return jax.block_until_ready(value_and_vjp(params, xj, gj))

    fwd_bwd()
    got = np.asarray(fwd())
    want = seq(x if prefix is None else torch.cat([x, prefix], -1)).detach().cpu().numpy()
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5):  # the same network, or the timing means nothing
        raise AssertionError(f"jax_impls: JAX's value differs from the Sequential's by {np.abs(got - want).max()}")
    return Impl(name, fwd, fwd_bwd)
