"""Seed 003: training a controlled neural ODE, through torchdiffeq with a fused vector field and as one fused solve.

The user's setup: a 3-10-10-10-2 selu network is the vector field of a 2-d state; each of 100 trajectories has
its own control, fed to the network as a third input next to the state; the loss compares 100 saved points
per trajectory with data. The user solved one trajectory at a time (and threads broke AD); here the 100
trajectories are one batched state of shape (100, 2), so each evaluation of the field is one call of the
network on a (100, 3) batch, and FusedMLP makes that call (and its vector-Jacobian product) one op.

The data come from a known system, a damped pendulum pushed by its control:
    angle' = velocity,  velocity' = -sin(angle) - 0.3 velocity + control(t).
--controls constant (the default) gives each trajectory a constant control; --controls knots is the seed's own
setup, random controls at the save times, linearly interpolated in t: the field's derivative jumps at each knot,
and the adaptive solver steps onto them (torchdiffeq's jump_t).

Run from the repository root:
    python examples/neural_ode.py [--steps N] [--controls constant|knots]
It trains the same initial network six ways, interleaved step by step so the timings share the machine's
conditions: {torchdiffeq with the eager nn.Sequential field, torchdiffeq with the FusedMLP field,
fusedlayers.odeint's fused solve of an ODEField} x {backprop through odeint, odeint_adjoint}, and prints the loss,
the function evaluations (NFE) and the median time of a training step (solve + loss + backward + Adam).
"""
import argparse
import copy
import statistics
import time

import torch
import torchdiffeq
from torch import nn
from torchdiffeq import odeint

import fusedlayers
from fusedlayers import FusedMLP, ODEField

SIZES = [3, 10, 10, 10, 2]
TRAJECTORIES = 100
SAVE_POINTS = 100
T_END = 10.0
# DifferentialEquations.jl's default tolerances, which the seed's Tsit5 solve ran with.
RTOL, ATOL = 1e-3, 1e-6


def interpolate(knots: torch.Tensor, times: torch.Tensor, t) -> torch.Tensor:
    """knots (N, K, k) at times (K,), linearly interpolated at t: (N, k); constant beyond the end knots."""
    t = torch.as_tensor(t, dtype=knots.dtype)
    j = min(max(int((times <= t).sum()) - 1, 0), len(times) - 2)
    w = ((t - times[j]) / (times[j + 1] - times[j])).clamp(0, 1)
    return knots[:, j] + w * (knots[:, j + 1] - knots[:, j])


class ControlledField(nn.Module):
    """dy/dt = net([y, control(t)]): each trajectory's control is one more input of the network, next to its
    state: a constant (N, 1), or with control_times knots (N, K, 1) interpolated in t. Counts its calls in `nfe`."""

    def __init__(self, net: nn.Module, control: torch.Tensor, control_times: torch.Tensor | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("control", control)
        self.register_buffer("control_times", control_times)
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        c = self.control if self.control_times is None else interpolate(self.control, self.control_times, t)
        return self.net(torch.cat([y, c], dim=-1))


def pendulum(control: torch.Tensor, control_times: torch.Tensor | None = None):
    """The ground-truth vector field: a damped pendulum driven by its control."""
    def field(t, y):
        c = control if control_times is None else interpolate(control, control_times, t)
        angle, velocity = y.unbind(-1)
        return torch.stack([velocity, -torch.sin(angle) - 0.3 * velocity + c[:, 0]], dim=-1)
    return field


def make_problem(trajectories=TRAJECTORIES, save_points=SAVE_POINTS, t_end=T_END, dtype=torch.float32, seed=0,
                 controls="constant"):
    """Initial states (N, 2), controls (N, 1), or with controls="knots" (N, T, 1) at the save times, save times
    (T,) and the ground truth at those times (T, N, 2), all deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    y0 = (torch.rand(trajectories, 2, generator=gen, dtype=torch.float64) * 2 - 1)
    shape = (trajectories, 1) if controls == "constant" else (trajectories, save_points, 1)
    control = torch.rand(*shape, generator=gen, dtype=torch.float64) - 0.5
    t = torch.linspace(0, t_end, save_points, dtype=torch.float64)
    knots = None if controls == "constant" else t
    with torch.no_grad():
        target = odeint(pendulum(control, knots), y0, t, method="dopri5", rtol=1e-9, atol=1e-11,
                        options=None if knots is None else {"jump_t": knots})
    return y0.to(dtype), control.to(dtype), t.to(dtype), target.to(dtype)


def eager_net(sizes=SIZES, activation=nn.SELU, dtype=torch.float32, seed=0) -> nn.Sequential:
    """The network a user writes: Linear layers with `activation` between them, nn.Linear's initialization."""
    torch.manual_seed(seed)
    layers = []
    for i, (m, n) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(m, n, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def field_for(net: nn.Module, control: torch.Tensor, t: torch.Tensor, fused_solve: bool = False) -> nn.Module:
    """The problem's field: a ControlledField for torchdiffeq, or (fused_solve, net a FusedMLP) an ODEField
    that fusedlayers.odeint solves in one op. Knots (control of 3 dims) sit at the save times t."""
    times = t if control.dim() == 3 else None
    return ODEField(net, control, times) if fused_solve else ControlledField(net, control, times)


def solve(field: nn.Module, y0, t, adjoint: bool, method="dopri5", rtol=RTOL, atol=ATOL, **kwargs):
    """The trajectories at the save times, (T, N, 2), by torchdiffeq, or by fusedlayers for an ODEField. With
    adjoint, the gradient comes from solving the adjoint ODE backwards (memory independent of the number of
    steps); without, the solver's steps are differentiated in reverse. kwargs go to odeint or odeint_adjoint
    (options, adjoint_rtol, ...). Knots (a field's control_times) are torchdiffeq's jump times (an ODEField's are
    its solve's own)."""
    lib = fusedlayers if isinstance(field, ODEField) else torchdiffeq
    if lib is torchdiffeq and getattr(field, "control_times", None) is not None:
        kwargs["options"] = {**(kwargs.get("options") or {}), "jump_t": field.control_times}
        if adjoint:
            kwargs["adjoint_options"] = {**(kwargs.get("adjoint_options") or {}), "jump_t": field.control_times}
    if adjoint:
        return lib.odeint_adjoint(field, y0, t, rtol=rtol, atol=atol, method=method,
                                  adjoint_params=tuple(field.net.parameters()), **kwargs)
    return lib.odeint(field, y0, t, rtol=rtol, atol=atol, method=method, **kwargs)


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).square().mean()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="Adam steps per configuration, the first untimed "
                        "(default 6)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--controls", choices=("constant", "knots"), default="constant")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")

    y0, control, t, target = make_problem(controls=args.controls)
    base = eager_net()
    runs = {}
    for kind in ("eager", "fused", "fused-solve"):
        for sens in ("odeint", "adjoint"):
            net = copy.deepcopy(base)
            if kind != "eager":
                net = FusedMLP.from_sequential(net)  # the same values, in one flat Parameter
            field = field_for(net, control, t, fused_solve=kind == "fused-solve")
            runs[(kind, sens)] = {"field": field, "opt": torch.optim.Adam(net.parameters(), lr=args.lr),
                                  "loss": [], "ms": [], "nfe_fwd": [], "nfe_bwd": []}

    print(f"seed 003: {TRAJECTORIES} trajectories x {SAVE_POINTS} save points, {args.controls} controls, field "
          f"{SIZES} selu, dopri5 rtol={RTOL} atol={ATOL}, float32, {args.steps} Adam steps per configuration "
          "(the first one untimed)")
    for step in range(args.steps):
        for (kind, sens), run in runs.items():
            field, opt = run["field"], run["opt"]
            start = time.perf_counter()
            field.nfe = 0
            loss = loss_fn(solve(field, y0, t, adjoint=sens == "adjoint"), target)
            nfe_fwd = field.nfe
            opt.zero_grad()
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - start
            run["loss"].append(loss.item())
            if step:  # the first step warms up
                run["ms"].append(elapsed * 1e3)
                if kind == "fused-solve":  # the fused solve counts its evaluations itself
                    nfe_fwd, nfe_bwd = field.last_solve["nfe_forward"], field.last_solve["nfe_backward"]
                else:
                    nfe_bwd = field.nfe - nfe_fwd
                run["nfe_fwd"].append(nfe_fwd)
                run["nfe_bwd"].append(nfe_bwd)

    print(f"\n{'field':<11} {'gradient':<8} {'loss first -> last':>22} {'NFE fwd':>8} {'NFE bwd':>8} "
          f"{'ms/step':>9} {'speedup':>8}")
    for (kind, sens), run in runs.items():
        ms = statistics.median(run["ms"])
        eager_ms = statistics.median(runs[("eager", sens)]["ms"])
        print(f"{kind:<11} {sens:<8} {run['loss'][0]:>10.5f} -> {run['loss'][-1]:<9.5f} "
              f"{statistics.mean(run['nfe_fwd']):>8.0f} {statistics.mean(run['nfe_bwd']):>8.0f} {ms:>9.1f} "
              f"{eager_ms / ms:>7.2f}x")
    print("\nNFE: field evaluations of the forward solve and of the backward pass. Backprop through odeint "
          "evaluates no field in the backward (it runs the vector-Jacobian product of each forward evaluation: "
          "the fused solve counts those); the adjoint solves an ODE backwards, each evaluation with its "
          "vector-Jacobian product. Times are medians over the steps; a step is solve + loss + backward + Adam.")


if __name__ == "__main__":
    main()
