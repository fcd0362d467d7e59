"""A physics-informed network through a fused MLP: u'' + u = 0 on [0, 3], u(0) = 0, u'(0) = 1 (exact u = sin).

The loss holds u'' (two create_graph gradients w.r.t. the input) and training differentiates it once more:
third derivatives of tanh, through FusedMLP's higher-order gradients. The same network as an eager
nn.Sequential (same initialization, same seed) is timed on the same training step.

    python examples/pinn.py [--steps 1000] [--points 256]
"""
import argparse
import time

import torch

from fusedlayers import FusedMLP


def residual_loss(net, x, x0):
    """mean (u'' + u)^2 over the collocation points, plus the initial conditions u(0) = 0 and u'(0) = 1."""
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    u0 = net(x0)
    (du0,) = torch.autograd.grad(u0.sum(), x0, create_graph=True)
    return (d2u + u).square().mean() + u0.square().sum() + (du0 - 1).square().sum()


def train(net, x, x0, steps, lr):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        residual_loss(net, x, x0).backward()
        opt.step()
        sched.step()


def step_time(net, x, x0, reps=200):
    """Median seconds per training step (loss, its parameter gradient, optimizer step)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        residual_loss(net, x, x0).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    torch.manual_seed(0)
    fused = FusedMLP([1, 32, 32, 32, 1], activation="tanh")
    eager = fused.to_sequential()  # the same parameters' values, as nn.Linear + nn.Tanh
    x = torch.linspace(0, 3, args.points).unsqueeze(1).requires_grad_()
    x0 = torch.zeros(1, 1, requires_grad=True)

    t = time.perf_counter()
    train(fused, x, x0, args.steps, args.lr)
    print(f"trained {args.steps} steps in {time.perf_counter() - t:.1f} s")
    grid = torch.linspace(0, 3, 1001).unsqueeze(1)
    with torch.no_grad():
        err = (fused(grid) - torch.sin(grid)).abs().max().item()
    print(f"max |u - sin| on [0, 3]: {err:.2e}")

    # Interleaved, so both see the same machine load.
    fused_t, eager_t = [], []
    for _ in range(5):
        fused_t.append(step_time(fused, x, x0, reps=40))
        eager_t.append(step_time(eager, x, x0, reps=40))
    f, e = sorted(fused_t)[2], sorted(eager_t)[2]
    print(f"training step: FusedMLP {f * 1e3:.3f} ms, eager nn.Sequential {e * 1e3:.3f} ms ({e / f:.2f}x)")


if __name__ == "__main__":
    main()
