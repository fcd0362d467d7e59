"""Seed 003 in the harness: the controlled neural ODE of examples/neural_ode.py (3-10-10-10-2 selu field,
100 trajectories, 100 save points, dopri5, float32).

- seed003_field: the field as the solver calls it, field(t, y) = net([y, control]): the forward (what the
  no-grad solve of odeint_adjoint calls) and its vector-Jacobian product w.r.t. the state and the parameters.
- seed003_odeint, seed003_adjoint: the training step, solve + loss + gradients of the parameters, by
  backpropagation through odeint and by odeint_adjoint. Their records also hold the split of the step between
  the field and the rest (torchdiffeq's own work: step-size control, interpolation, the adjoint's
  bookkeeping, the loss, autograd), measured by FieldClock in separate, instrumented steps: nfe_fwd, nfe_bwd,
  field_ms, solver_ms (the rest), instrumented_step_ms (their sum) and field_share (field_ms over that sum).
"""
import functools
import statistics
import time

import torch
import torch._functorch.config
from torch import nn

import fusedlayers
from examples.neural_ode import SIZES, ControlledField, eager_net, loss_fn, make_problem, solve

from . import floors, jax_impls
from .harness import Case, Impl


class _TimedCall(torch.autograd.Function):
    """One call of the clock's field, its forward and its backward (the vector-Jacobian product) each timed.
    The field runs on a detached state inside, so its own graph is differentiated in backward() alone."""

    @staticmethod
    def forward(ctx, clock, t, y, *params):
        with torch.enable_grad():
            y_in = y.detach().requires_grad_(y.requires_grad)
            start = time.perf_counter()
            out = clock.field(t, y_in)
            clock.seconds += time.perf_counter() - start
        clock.calls += 1
        ctx.clock, ctx.out, ctx.y_in, ctx.params = clock, out, y_in, params
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        clock = ctx.clock
        wrt = [ctx.y_in, *ctx.params]
        needed = [x.requires_grad for x in wrt]
        start = time.perf_counter()
        # retain_graph: torchdiffeq's adjoint differentiates its graph with retain_graph=True too.
        grads = iter(torch.autograd.grad(ctx.out, [x for x, n in zip(wrt, needed) if n], grad_out,
                                         allow_unused=True, retain_graph=True))
        clock.seconds += time.perf_counter() - start
        clock.vjps += 1
        return (None, None, *[next(grads) if n else None for n in needed])


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
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.vjps = 0.0, 0, 0

    def forward(self, t, y):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (y.requires_grad or params):
            return _TimedCall.apply(self, t, y, *params)
        start = time.perf_counter()
        out = self.field(t, y)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@functools.cache
def _problem(device: str, backends: tuple[str, ...]):
    """The data and the networks, built once per process: the three cases share them, and torch.compile
    compiles the one eager network once (a new module would be a recompilation)."""
    data = tuple(x.to(device) for x in make_problem(dtype=torch.float32))
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
    floor = {"call-floor": floors.call_floor_net(SIZES, "selu", "identity", True, torch.float32, device)}
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
            return self.results[name]
        return fields_of


def step_impls(device, backends, adjoint: bool, quick: bool) -> list[Impl]:
    data, nets = _problem(device, backends)
    y0, control, t, target = data
    fields = {name: ControlledField(net, control) for name, net in nets.items()}
    # A step by the adjoint takes seconds here, by odeint a tenth of one.
    split = _Split(fields, data, adjoint, rounds=(1 if quick else 3) if adjoint else (5 if quick else 9))
    impls = []
    for name, field in fields.items():
        params = list(field.net.parameters())

        def forward(field=field):
            with torch.no_grad():
                return loss_fn(solve(field, y0, t, adjoint), target)

        def forward_backward(field=field, params=params):
            loss = loss_fn(solve(field, y0, t, adjoint), target)
            return loss, torch.autograd.grad(loss, params)

        impls.append(Impl(name, forward, forward_backward, extra=split.extra(name)))
    return impls


def cases(device: str, backends: list[str], quick: bool) -> list[Case]:
    """seed003_field and the two training steps (few reps: a step is a solve of a thousand field calls), with
    eager, compile and fused-<backend> for each of `backends` (timed on `device`); seed003_field also with its
    call-floor (bench/floors.py)."""
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
    ]
