"""Seed 003 in the harness: the controlled neural ODE of examples/neural_ode.py (3-10-10-10-2 selu field,
100 trajectories, 100 save points, dopri5, float32).

- seed003_field: the field as the solver calls it, field(t, y) = net([y, control]): the forward (what the
  no-grad solve of odeint_adjoint calls) and its vector-Jacobian product w.r.t. the state and the parameters.
- seed003_odeint, seed003_adjoint: the training step, solve + loss + gradients of the parameters, by
  backpropagation through odeint and by odeint_adjoint; seed003_knots_odeint, seed003_knots_adjoint the same
  with the seed's piecewise-linear controls (knots at the save times, jump times of the solve). torchdiffeq
  solves with each field (eager, compile, fused-<backend>); `fused-solve` is fusedlayers.odeint's one-op solve of
  an ODEField (CPU). The torchdiffeq records also hold the split of the step between the field and the rest
  (torchdiffeq's own work: step-size control, interpolation, the adjoint's bookkeeping, the loss, autograd),
  measured by FieldClock in separate, instrumented steps: nfe_fwd, nfe_bwd, field_ms, solver_ms (the rest),
  instrumented_step_ms (their sum) and field_share (field_ms over that sum). Every training record has
  us_per_eval, the timed step over its evaluations (nfe_fwd + nfe_bwd: field calls and VJPs); fused-solve's also
  kernel_ms, its evaluations priced at the network kernels' own per-call time (mlp_forward, mlp_backward on the
  (100, 3) batch, timed here), the arithmetic the solve cannot go below.
"""
import functools
import statistics
import time

import torch
import torch._functorch.config
from torch import nn

import fusedlayers
from examples.neural_ode import SIZES, ControlledField, eager_net, field_for, loss_fn, make_problem, solve

from . import floors, jax_impls
from .harness import Case, Impl


class _TimedCall(torch.autograd.Function):
    """One call of the clock's field, its forward and its backward (the vector-Jacobian product) each timed.
    The field runs on a detached state inside, so its own graph is differentiated in backward() alone."""

    @staticmethod
    def forward(ctx, clock, t, y, *params):
        with torch.enable_grad():
            # t too: torchdiffeq's adjoint differentiates its field w.r.t. t (a knot control depends on it)
            t_in = t.detach().requires_grad_(t.requires_grad)
            y_in = y.detach().requires_grad_(y.requires_grad)
            start = time.perf_counter()
            out = clock.field(t_in, y_in)
            clock.seconds += time.perf_counter() - start
        clock.calls += 1
        ctx.clock, ctx.out, ctx.t_in, ctx.y_in, ctx.params = clock, out, t_in, y_in, params
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        clock = ctx.clock
        wrt = [ctx.t_in, ctx.y_in, *ctx.params]
        needed = [x.requires_grad for x in wrt]
        start = time.perf_counter()
        # retain_graph: torchdiffeq's adjoint differentiates its graph with retain_graph=True too.
        grads = iter(torch.autograd.grad(ctx.out, [x for x, n in zip(wrt, needed) if n], grad_out,
                                         allow_unused=True, retain_graph=True))
        clock.seconds += time.perf_counter() - start
        clock.vjps += 1
        return (None, *[next(grads) if n else None for n in needed])


class FieldClock(nn.Module):
    """Wraps a ControlledField for a solver, adding up the time spent in its calls and in their vector-Jacobian
    products (which autograd, or the adjoint's torch.autograd.grad, runs). The instrumentation costs tens of
    microseconds a call (measured here: 5-15% of a seed-003 step): the autograd.Function around each call,
    outside the clock, and the VJP's own torch.autograd.grad call, inside it (an engine call that backprop
    through odeint does not make per field call, so there the field's share is overstated a little)."""

    def __init__(self, field: ControlledField) -> None:
        super().__init__()
        self.field = field
        self.net = field.net  # solve() passes net's parameters to odeint_adjoint
        self.control_times = field.control_times  # and the knots as jump times
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.vjps = 0.0, 0, 0

    def forward(self, t, y):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (y.requires_grad or params or (torch.is_tensor(t) and t.requires_grad)):
            return _TimedCall.apply(self, t, y, *params)
        start = time.perf_counter()
        out = self.field(t, y)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@functools.cache
def _problem(device: str, backends: tuple[str, ...], controls: str = "constant"):
    """The data and the networks, built once per process: the cases share them, and torch.compile compiles the
    one eager network once (a new module would be a recompilation)."""
    data = tuple(x.to(device) for x in make_problem(dtype=torch.float32, controls=controls))
    eager = eager_net(SIZES, dtype=torch.float32).to(device)
    # odeint_adjoint differentiates the field with retain_graph=True, which a backward compiled with donated
    # buffers (the default) refuses with a RuntimeError; the setting is read when a graph compiles, lazily at
    # its first call, so it has to stay off (for the later cases' compiles too: it only saves memory).
    torch._functorch.config.donated_buffer = False
    nets = {"eager": eager, "compile": torch.compile(eager)}
    nets.update({f"fused-{b}": fusedlayers.FusedMLP.from_sequential(eager, backend=b) for b in backends})
    return data, nets


def field_impls(device, backends) -> list[Impl]:
    (y0, control, t, _), nets = _problem(device, backends)
    y = y0.clone().requires_grad_()
    v = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1), dtype=y0.dtype).to(device)
    t0 = t[1]
    impls = []
    floor = {"call-floor": floors.call_floor_net(SIZES, "selu", "identity", True, torch.float32, device),
             "builtin-floor": floors.builtin_floor_net(SIZES, torch.float32, device)}
    for name, net in {**nets, **floor}.items():
        field = ControlledField(net, control)
        wrt = [y, *net.parameters()]

        def forward(field=field):
            with torch.no_grad():
                return field(t0, y)

        def forward_backward(field=field, wrt=wrt):
            return torch.autograd.grad(field(t0, y), wrt, v)

        impls.append(Impl(name, forward, forward_backward))
    for name, net in nets.items():
        if isinstance(net, fusedlayers.FusedMLP):  # the field's VJP as one graph-free call
            def graph_free(net=net):
                (dz, dparams), value = net.grad_and_value(torch.cat([y.detach(), control], -1), v, input_grad=True)
                return value, dz[..., :y.shape[-1]], dparams

            impls.append(Impl(f"{name}-graph-free", impls[list(nets).index(name)].forward, graph_free))
    jax_impl = jax_impls.mlp_impl(nets["eager"], y, v, prefix=control)
    return impls + ([jax_impl] if jax_impl is not None else [])


class _Split:
    """The records' extra fields for a training-step case: the step split into the field's calls and VJPs and
    the rest, from instrumented steps (medians) run after the timed ones, the implementations taking turns
    round by round as in the timing. Field and rest come from the same steps, so that the machine's load,
    which changes between the timed and the instrumented runs, cancels out of the share."""

    def __init__(self, fields: dict[str, ControlledField], data, adjoint: bool, rounds: int) -> None:
        self.fields, self.data, self.adjoint, self.rounds = fields, data, adjoint, rounds
        self.results = None

    def _measure(self) -> dict[str, dict]:
        y0, _, t, target = self.data
        samples = {name: [] for name in self.fields}
        for _ in range(self.rounds):
            for name, field in self.fields.items():
                clock = FieldClock(field)
                params = list(field.net.parameters())
                start = time.perf_counter()
                loss = loss_fn(solve(clock, y0, t, self.adjoint), target)
                nfe_fwd = clock.calls
                torch.autograd.grad(loss, params)
                step = time.perf_counter() - start
                # Backprop through odeint calls no field in the backward: autograd runs each call's VJP once.
                nfe_bwd = clock.calls - nfe_fwd if self.adjoint else clock.vjps
                samples[name].append((nfe_fwd, nfe_bwd, clock.seconds * 1e3, step * 1e3))
        results = {}
        for name, runs in samples.items():
            field_ms = statistics.median(r[2] for r in runs)
            step_ms = statistics.median(r[3] for r in runs)
            results[name] = {"nfe_fwd": runs[-1][0], "nfe_bwd": runs[-1][1], "field_ms": field_ms,
                             "solver_ms": step_ms - field_ms, "instrumented_step_ms": step_ms,
                             "field_share": field_ms / step_ms}
        return results

    def extra(self, name: str):
        def fields_of(record: dict) -> dict:
            if self.results is None:
                self.results = self._measure()
            r = self.results[name]
            return {**r, "us_per_eval": record["fwd_bwd_ms"] * 1e3 / (r["nfe_fwd"] + r["nfe_bwd"])}
        return fields_of


def _kernel_us(net: fusedlayers.FusedMLP, x: torch.Tensor, copies: int = 5, reps: int = 1000
               ) -> tuple[float, float]:
    """Microseconds of the CPU mlp_forward and mlp_backward kernels' arithmetic on x: their time on `copies`
    copies of x stacked (still the fused path), over copies, so that the call's fixed cost (Python, the
    dispatcher) is mostly divided away: the fused solve's evaluations priced at the network's own cost."""
    weights, biases = net.weights(), net.biases() or []
    x = x.repeat(copies, 1)
    g = torch.ones(*x.shape[:-1], net.sizes[-1], dtype=x.dtype)
    fwd = lambda: torch.ops.fusedlayers.mlp_forward(x, weights, biases, net.activations, False)  # noqa: E731
    bwd = lambda: torch.ops.fusedlayers.mlp_backward(g, x, weights, biases, [], net.activations, True)  # noqa: E731
    out = []
    for fn in (fwd, bwd):
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps // 5):
                fn()
            samples.append((time.perf_counter() - start) / (reps // 5) / copies * 1e6)
        out.append(statistics.median(samples))
    return out[0], out[1]


def _fused_solve_extra(field: fusedlayers.ODEField, data, adjoint: bool):
    y0, _, t, target = data

    def fields_of(record: dict) -> dict:
        torch.autograd.grad(loss_fn(solve(field, y0, t, adjoint), target), list(field.net.parameters()))
        nfe_fwd, nfe_bwd = field.last_solve["nfe_forward"], field.last_solve["nfe_backward"]
        with torch.no_grad():
            x = torch.cat([y0, field.control_at(torch.zeros(()))], -1)
        fwd_us, bwd_us = _kernel_us(field.net, x)
        # backprop: a forward per evaluation, a VJP per stage in the backward (the solve recomputed: forward
        # again); the adjoint: each backward evaluation is a forward and a VJP
        kernel_us = nfe_fwd * fwd_us + nfe_bwd * (bwd_us + fwd_us if adjoint else bwd_us) + \
            (0 if adjoint else nfe_fwd * fwd_us)
        return {"nfe_fwd": nfe_fwd, "nfe_bwd": nfe_bwd,
                "us_per_eval": record["fwd_bwd_ms"] * 1e3 / (nfe_fwd + nfe_bwd),
                "kernel_fwd_us": fwd_us, "kernel_bwd_us": bwd_us, "kernel_ms": kernel_us / 1e3,
                "step_over_kernel": record["fwd_bwd_ms"] / (kernel_us / 1e3)}
    return fields_of


def step_impls(device, backends, adjoint: bool, quick: bool, controls: str = "constant") -> list[Impl]:
    data, nets = _problem(device, backends, controls)
    y0, control, t, target = data
    fields = {name: field_for(net, control, t) for name, net in nets.items()}
    # A step by the adjoint takes seconds here, by odeint a tenth of one.
    split = _Split(dict(fields), data, adjoint, rounds=(1 if quick else 3) if adjoint else (5 if quick else 9))
    extras = {name: split.extra(name) for name in fields}
    if device == "cpu" and "fused-cpu" in nets:
        fields["fused-solve"] = field_for(nets["fused-cpu"], control, t, fused_solve=True)
        extras["fused-solve"] = _fused_solve_extra(fields["fused-solve"], data, adjoint)
    impls = []
    for name, field in fields.items():
        params = list(field.net.parameters())

        def forward(field=field):
            with torch.no_grad():
                return loss_fn(solve(field, y0, t, adjoint), target)

        def forward_backward(field=field, params=params):
            loss = loss_fn(solve(field, y0, t, adjoint), target)
            return loss, torch.autograd.grad(loss, params)

        impls.append(Impl(name, forward, forward_backward, extra=extras[name]))
    return impls


def cases(device: str, backends: list[str], quick: bool) -> list[Case]:
    """seed003_field and the two training steps (few reps: a step is a solve of a thousand field calls), with
    eager, compile and fused-<backend> for each of `backends` (timed on `device`); seed003_field also with its
    call-floor and builtin-floor (bench/floors.py)."""
    desc = "controlled neural ODE, 3-10-10-10-2 selu field, 100 trajectories x 100 save points, dopri5, float32"
    backends = tuple(backends)
    return [
        Case("seed003_field", f"{desc}: the field as the solver calls it, field(t, y) = net([y, control]), and "
             "its VJP w.r.t. state and parameters (seed 003)", device, torch.float32,
             lambda: field_impls(device, backends), reps=40),
        Case("seed003_odeint", f"{desc}: training step (solve + loss + parameter gradients) by backpropagation "
             "through odeint (seed 003)", device, torch.float32,
             lambda: step_impls(device, backends, False, quick), reps=8),
        Case("seed003_adjoint", f"{desc}: training step by odeint_adjoint (seed 003)", device, torch.float32,
             lambda: step_impls(device, backends, True, quick), reps=4),
        Case("seed003_knots_odeint", f"{desc}, piecewise-linear controls (knots at the save times): training step "
             "by backpropagation through odeint (seed 003's own controls)", device, torch.float32,
             lambda: step_impls(device, backends, False, quick, "knots"), reps=8),
        Case("seed003_knots_adjoint", f"{desc}, piecewise-linear controls: training step by odeint_adjoint",
             device, torch.float32, lambda: step_impls(device, backends, True, quick, "knots"), reps=4),
    ]
