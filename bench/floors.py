"""Floors: yardsticks timed next to a case's implementations. A floor's `vs eager` bounds what an implementation
built on the same calls can reach; the harness gives floors no cold start (it skips names ending in -floor)."""
import torch

import fusedlayers

from .harness import Impl


def gemm_floor(sizes, batch, dtype, wrt_input, device) -> Impl:
    """The bare GEMMs of an MLP of these widths, on stand-in activations and gradients: forward h_l @ W_l.T,
    backward g_l.T @ h_l and, where a gradient flows below layer l, g_l @ W_l. An implementation that computes
    these products with the same BLAS does at least this much; eager's time over this one bounds its speedup."""
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    rows = int(torch.Size(batch).numel())
    hs = [rand(rows, n) for n in sizes[:-1]]  # each layer's input
    gs = [rand(rows, n) for n in sizes[1:]]   # the gradient of each layer's pre-activation
    ws = [rand(n, m) for m, n in zip(sizes, sizes[1:])]

    def forward():
        return [h @ w.T for h, w in zip(hs, ws)]

    def forward_backward():
        out = forward() + [g.T @ h for g, h in zip(gs, hs)]
        return out + [g @ w for i, (g, w) in enumerate(zip(gs, ws)) if i > 0 or wrt_input]

    return Impl("gemm-floor", forward, forward_backward)


def call_floor_net(sizes, activation, output_activation, bias, dtype, device) -> fusedlayers.FusedMLP:
    """The network of a case's "call-floor": FusedMLP with the case's input and output widths and every hidden
    width 1: the same op, as many parameters, the same input and output, next to no arithmetic. What a fused
    call costs before its kernels do any work (Python, the dispatcher, the autograd graph and engine): eager's
    time over this one bounds what faster kernels can buy."""
    widths = [sizes[0]] + [1] * (len(sizes) - 2) + [sizes[-1]]
    return fusedlayers.FusedMLP(widths, activation, output_activation, bias=bias, device=device, dtype=dtype)


def builtin_floor_net(sizes, dtype, device) -> torch.nn.Linear:
    """The network of a case's "builtin-floor": one nn.Linear without bias from the case's input to its output
    width: one module call, one builtin op and one parameter tensor, PyTorch's least cost for a network under
    autograd (the engine, its Python wrapper, the loss's ops, zero_grad and the optimizer, each per call). Eager's
    time over this one bounds what any implementation that builds an autograd graph can reach, fused or not;
    the graph-free call (FusedMLP.grad_and_value) is not bound by it."""
    return torch.nn.Linear(sizes[0], sizes[-1], bias=False, device=device, dtype=dtype)
