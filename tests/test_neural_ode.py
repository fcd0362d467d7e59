"""Fused vector fields (FusedMLP, a Sequential of FusedDense) inside torchdiffeq's odeint and odeint_adjoint,
against the equivalent eager nn.Sequential field: the solution and the gradients of a loss on it."""
import pytest
import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from examples.neural_ode import ControlledField, loss_fn, make_problem, solve
from fusedlayers import FusedDense, FusedMLP

from conftest import assert_rel_close, per_layer

SIZES = [3, 6, 6, 2]  # state 2 + control 1 in, state derivative out
MODULES = {"selu": nn.SELU, "tanh": nn.Tanh}
# dopri5's tolerances: tighter ones make its step-size controller flip accept/reject decisions on rounding
# differences (with selu, two eager fields that differ only in rounding then disagree by 4e-4 at rtol 1e-10;
# by 1e-12 at rtol 1e-6). The gradients' tolerance: the issue's 1e-6 through dopri5 (whose gradient runs through
# the controller's step sizes), float64's 1e-10 through rk4's fixed grid.
TOLS = {"rtol": 1e-6, "atol": 1e-8}
ADJOINT_TOLS = {"adjoint_rtol": 1e-4, "adjoint_atol": 1e-6}  # the adjoint state needs fewer steps so
STEPS = {"rk4": {"step_size": 0.1}, "dopri5": None}
GRAD_RTOL = {"dopri5": 1e-6, "rk4": 1e-10}


def eager_net(activation, dtype=torch.float64, sizes=SIZES):
    """The same parameters (drawn in float64) in every dtype."""
    torch.manual_seed(0)
    layers = []
    for i, (m, n) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(m, n, dtype=torch.float64))
        if i < len(sizes) - 2:
            layers.append(MODULES[activation]())
    return nn.Sequential(*layers).to(dtype)


def fused_net(kind, seq, backend="auto"):
    """The fused form of seq: one FusedMLP (flat: a copy of the parameters in one; layers: sharing seq's), or
    one FusedDense per Linear (sharing)."""
    if kind in ("mlp", "mlp-layers"):
        return FusedMLP.from_sequential(seq, backend=backend, flat=kind == "mlp")
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    acts = [type(m).__name__.lower() for m in seq if not isinstance(m, nn.Linear)] + ["identity"]
    return nn.Sequential(*[FusedDense.from_linear(lin, a, backend=backend) for lin, a in zip(linears, acts)])


def problem(dtype=torch.float64, trajectories=4, save_points=5, t_end=1.0):
    y0, control, t, target = make_problem(trajectories, save_points, t_end, dtype=dtype)
    return y0, control, t, target


def solution_and_grads(net, y0, control, t, target, method, adjoint, wrt_control=False):
    """The solution and the gradients of the loss w.r.t. the initial state, the parameters and (backprop through
    odeint only) the controls."""
    y0 = y0.clone().requires_grad_()
    control = control.clone().requires_grad_(wrt_control)
    field = ControlledField(net, control)
    ys = solve(field, y0, t, adjoint, method=method, options=STEPS[method], **TOLS, **(ADJOINT_TOLS if adjoint else {}))
    params = list(net.parameters())
    grads = torch.autograd.grad(loss_fn(ys, target), [y0, *params] + ([control] if wrt_control else []))
    return ys.detach(), [grads[0], *per_layer(net, grads[1:1 + len(params)]), *grads[1 + len(params):]]


@pytest.mark.parametrize("kind", ["mlp", "mlp-layers", "dense"])
@pytest.mark.parametrize("adjoint", [False, True], ids=["odeint", "adjoint"])
@pytest.mark.parametrize("activation", ["selu", "tanh"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_gradients_match_eager_field(method, activation, adjoint, kind):
    data = problem()
    seq = eager_net(activation)
    ys_ref, grads_ref = solution_and_grads(seq, *data, method, adjoint)
    ys, grads = solution_and_grads(fused_net(kind, seq), *data, method, adjoint)
    assert_rel_close(ys, ys_ref, 1e-10, "solution")
    if adjoint and kind == "mlp" and method == "dopri5":
        # odeint_adjoint's step control takes the largest RMS norm of the augmented state's tensors, one per
        # parameter: one flat Parameter is another norm, so another adaptive discretization of the adjoint. Both
        # must be as accurate: against backprop through odeint (accurate to its rtol of 1e-6), the flat field's
        # gradients within twice eager's error, or within the adjoint's own tolerance.
        _, grads_true = solution_and_grads(seq, *data, method, adjoint=False)
        for i, (got, want, true) in enumerate(zip(grads, grads_ref, grads_true)):
            err, err_eager = (got - true).abs().max(), (want - true).abs().max()
            assert err <= max(2 * err_eager, ADJOINT_TOLS["adjoint_rtol"] * true.abs().max()), f"grad {i}"
        return
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_rel_close(got, want, GRAD_RTOL[method], f"grad {i}")


@pytest.mark.parametrize("adjoint", [False, True], ids=["odeint", "adjoint"])
def test_float32_as_accurate_as_eager(adjoint):
    """In float32 the fused field's gradients are as close to the float64 ones as the eager field's (rk4: a
    fixed grid, so both solve the same steps)."""
    data64 = problem()
    seq64 = eager_net("selu")
    _, grads_ref = solution_and_grads(seq64, *data64, "rk4", adjoint)
    seq32 = eager_net("selu", torch.float32)
    data32 = problem(torch.float32)
    _, grads_eager = solution_and_grads(seq32, *data32, "rk4", adjoint)
    _, grads_fused = solution_and_grads(FusedMLP.from_sequential(seq32), *data32, "rk4", adjoint)
    for i, (fused, eager, want) in enumerate(zip(grads_fused, grads_eager, grads_ref)):
        assert fused.dtype == torch.float32
        assert_rel_close(eager, want, 1e-5, f"eager grad {i}")  # the float32 solve's own accuracy
        assert_rel_close(fused, want, 1e-5, f"fused grad {i}")


def test_controls_as_inputs():
    """The example's setup: each trajectory's control is concatenated to its state as the network's input. The
    gradient reaches the controls through the fused op's input gradient, and training steps on the fused field
    move the parameters as on the eager one."""
    data = problem(trajectories=6)
    seq = eager_net("selu")
    fused = FusedMLP.from_sequential(eager_net("selu"))
    ys_ref, grads_ref = solution_and_grads(seq, *data, "dopri5", adjoint=False, wrt_control=True)
    ys, grads = solution_and_grads(fused, *data, "dopri5", adjoint=False, wrt_control=True)
    assert_rel_close(ys, ys_ref, 1e-10, "solution")
    assert grads[-1].shape == (6, 1) and grads_ref[-1].abs().max() > 0
    initial = [p.detach().clone() for p in seq.parameters()]
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_rel_close(got, want, 1e-6, f"grad {i}")
    for net in (seq, fused):
        for _ in range(2):  # plain gradient steps: torch.optim imports torch._dynamo, seconds of a test's time
            field = ControlledField(net, data[1])
            loss = loss_fn(solve(field, data[0], data[2], adjoint=False, **TOLS), data[3])
            with torch.no_grad():
                for p, g in zip(net.parameters(), torch.autograd.grad(loss, list(net.parameters()))):
                    p -= 0.1 * g
    for i, (got, want, before) in enumerate(zip(fused.state_dict().values(), seq.parameters(), initial)):
        assert not torch.equal(want, before)
        assert_rel_close(got.detach(), want.detach(), 1e-6, f"parameter {i} after two steps")


@pytest.mark.parametrize("kind", ["mlp", "dense"])
def test_adjoint_vjp_calls(kind):
    """The calls odeint_adjoint's backward makes of the field, outside any solver: under enable_grad inside
    no_grad, on a state that is a view into a flat buffer (as the adjoint's tupled state hands it), with a time
    the field ignores, allow_unused, and the same graph differentiated twice (retain_graph)."""
    seq = eager_net("tanh", sizes=[2, 5, 2])
    fused = fused_net(kind, seq)
    flat = torch.randn(1 + 3 * 2 + 4, dtype=torch.float64)
    v = torch.randn(3, 2, dtype=torch.float64)
    results = []
    for net in (seq, fused):
        params = tuple(net.parameters())
        with torch.no_grad():
            with torch.enable_grad():
                t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
                y = flat[1:7].view(3, 2).detach().requires_grad_(True)
                out = net(y)
                first = torch.autograd.grad(out, (t, y) + params, -v, allow_unused=True, retain_graph=True)
                second = torch.autograd.grad(out, (t, y) + params, -v, allow_unused=True, retain_graph=True)
        assert first[0] is None and second[0] is None  # the time is unused
        split = lambda grads: [grads[0], *per_layer(net, grads[1:])]  # noqa: E731
        results.append((out.detach(), split(first[1:]), split(second[1:])))
    (out_ref, grads_ref, _), (out, first, second) = results
    assert_rel_close(out, out_ref, 1e-10, "field")
    for i, (a, b, want) in enumerate(zip(first, second, grads_ref)):
        assert_rel_close(a, want, 1e-10, f"vjp {i}")
        assert torch.equal(a, b), f"vjp {i} differs on the second call"


def test_tiny_odeint_on_every_backend(backend):
    """One small backprop-through-odeint on each backend (rk4, a few steps: the Triton interpreter is slow)."""
    y0, control, t, target = problem(trajectories=3, save_points=2, t_end=0.2)  # 2 steps, 8 evaluations
    seq = eager_net("selu")
    _, grads_ref = solution_and_grads(seq, y0, control, t, target, "rk4", adjoint=False)
    _, grads = solution_and_grads(FusedMLP.from_sequential(seq, backend=backend), y0, control, t, target, "rk4",
                                  adjoint=False)
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_rel_close(got, want, 1e-10, f"grad {i}")
