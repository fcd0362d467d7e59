"""A physics-informed network through a fused MLP: u'' + u = 0 on [0, 3], u(0) = 0, u'(0) = 1 (exact u = sin).

The loss holds u'' w.r.t. the input, and training differentiates it once more. The eager nn.Sequential gets
u'' as a user writes it, by two create_graph gradients, whose graphs the parameter gradient then goes through
(third derivatives of tanh). FusedMLP.jet carries (u, u', u'') forward in one op (second-order Taylor mode)
with one hand-written backward. Both start from the same parameters; their training step is timed on the same
points.

    python examples/pinn.py [--steps 1000] [--points 256]
"""
import argparse
import time

import torch

from fusedlayers import FusedMLP


def residual_loss_eager(net, x, x0):
    """mean (u'' + u)^2 over the collocation points x, plus the initial conditions u(0) = 0 and u'(0) = 1 at x0;
    x and x0 require grad."""
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    u0 = net(x0)
    (du0,) = torch.autograd.grad(u0.sum(), x0, create_graph=True)
    return (d2u + u).square().mean() + u0.square().sum() + (du0 - 1).square().sum()


def residual_loss_fused(net, x, x0):
    """The same loss from FusedMLP.jet: (u, du/dx, d2u/dx2) in one pass."""
    u, _, d2u = net.jet(x)
    u0, du0, _ = net.jet(x0)
    return (d2u + u).square().mean() + u0.square().sum() + (du0 - 1).square().sum()


def train(net, loss_fn, x, x0, steps, lr):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x, x0).backward()
        opt.step()
        sched.step()


def step_time(net, loss_fn, x, x0, reps):
    """Median seconds per training step (loss, its parameter gradient, optimizer step)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x, x0).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--timing-rounds", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    fused = FusedMLP([1, 32, 32, 32, 1], activation="tanh")
    eager = fused.to_sequential()  # the same parameters' values, as nn.Linear + nn.Tanh
    x, x0 = torch.linspace(0, 3, args.points).unsqueeze(1), torch.zeros(1, 1)
    xg, x0g = x.clone().requires_grad_(), x0.clone().requires_grad_()  # eager differentiates w.r.t. them
    initial = {"fused": residual_loss_fused(fused, x, x0).item(), "eager": residual_loss_eager(eager, xg, x0g).item()}
    print(f"initial loss: FusedMLP.jet {initial['fused']:.6f}, eager create_graph {initial['eager']:.6f}")

    t = time.perf_counter()
    train(fused, residual_loss_fused, x, x0, args.steps, args.lr)
    print(f"trained {args.steps} steps in {time.perf_counter() - t:.1f} s")
    grid = torch.linspace(0, 3, 1001).unsqueeze(1)
    with torch.no_grad():
        err = (fused(grid) - torch.sin(grid)).abs().max().item()
    print(f"max |u - sin| on [0, 3]: {err:.2e}")

    # Interleaved, so both see the same machine load.
    fused_t, eager_t = [], []
    for _ in range(args.timing_rounds):
        fused_t.append(step_time(fused, residual_loss_fused, x, x0, reps=40))
        eager_t.append(step_time(eager, residual_loss_eager, xg, x0g, reps=40))
    f, e = sorted(fused_t)[len(fused_t) // 2], sorted(eager_t)[len(eager_t) // 2]
    print(f"training step: FusedMLP.jet {f * 1e3:.3f} ms, eager nn.Sequential {e * 1e3:.3f} ms ({e / f:.2f}x)")
    return {"initial_loss": initial, "max_error": err, "step_ms": {"fused": f * 1e3, "eager": e * 1e3}}


if __name__ == "__main__":
    main()
