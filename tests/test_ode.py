"""fusedlayers.odeint / odeint_adjoint of an ODEField (the fused solve, csrc/cpu/odeint.cpp) against torchdiffeq
solving the same field written in plain PyTorch, float64: the solution, the number of evaluations and accepted
steps, and the gradients w.r.t. y0, the net's parameters (by state_dict name) and the control."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchdiffeq
from torch import nn
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _ButcherTableau

import fusedlayers
from fusedlayers import FusedMLP, ODEField

from conftest import assert_rel_close, per_layer

ACT = {"tanh": torch.tanh, "gelu": F.gelu, "selu": F.selu, "relu": F.relu, "identity": lambda x: x}
D, K, CONTROL = 2, 4, 2  # state width, knots, control width
KINDS = ("autonomous", "time", "constant", "knots")
STEPS = {"rk4": 0.1, "midpoint": 0.1, "euler": 0.05}
TOLS = dict(rtol=1e-8, atol=1e-10)


TSIT5_B = [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774,
           0.0]
TSIT5_ERROR = [-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995, -0.1447110071732629,
               0.5823571654525552, -0.45808210592918697, 1 / 66]


def tsit5_dense(h: float) -> list[float]:
    """Tsitouras' continuous extension: the weights b_i(theta) of y0 + dt sum_i b_i(theta) k_i."""
    return [-1.0530884977290216 * h * (h - 1.3299890189751412) * (h * h - 1.4364028541716351 * h + 0.7139816917074209),
            0.1017 * h * h * (h * h - 2.1966568338249754 * h + 1.2949852507374631),
            2.490627285651252793 * h * h * (h * h - 2.38535645472061657 * h + 1.57803468208092486),
            -16.54810288924490272 * (h - 1.21712927295533244) * (h - 0.61620406037800089) * h * h,
            47.37952196281928122 * (h - 1.203071208372362603) * (h - 0.658047292653547382) * h * h,
            -34.87065786149660974 * (h - 1.2) * (h - 0.666666666666666667) * h * h,
            2.5 * (h - 1) * (h - 0.6) * h * h]


def _tsit5_reference():
    """Tsitouras' 5(4) pair (2011) as a torchdiffeq solver: the plain-PyTorch reference of method "tsit5", with the
    pair's continuous extension at theta = 1/2 as the midpoint of torchdiffeq's interpolation."""
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

    class Tsit5(RKAdaptiveStepsizeODESolver):
        order = 5
        tableau = _ButcherTableau(
            alpha=f64([0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0]),
            beta=[f64([0.161]), f64([-0.008480655492356989, 0.335480655492357]),
                  f64([2.897153057105493, -6.359448489975075, 4.3622954328695815]),
                  f64([5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525]),
                  f64([5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
                       -0.028269050394068383]), f64(TSIT5_B[:-1])],
            c_sol=f64(TSIT5_B), c_error=f64(TSIT5_ERROR))
        mid = f64(tsit5_dense(0.5))
    return Tsit5


SOLVERS.setdefault("tsit5", _tsit5_reference())


def test_tsit5_reference_tableau_is_consistent():
    """The reference's transcription checked against the order conditions it must meet: rows summing to the
    nodes, the quadrature conditions of order 5 (the solution) and 4 (the embedded one, b minus the error
    weights), and the continuous extension's of order 4 at any theta, equal to b at theta = 1."""
    tab = SOLVERS["tsit5"].tableau
    c = [0.0, *tab.alpha.tolist()]
    for i, row in enumerate(tab.beta):
        assert abs(row.sum().item() - c[i + 1]) < 1e-12, i
    embedded = [b - e for b, e in zip(TSIT5_B, TSIT5_ERROR)]
    for q in range(1, 6):
        assert abs(sum(b * ci ** (q - 1) for b, ci in zip(TSIT5_B, c)) - 1 / q) < 1e-12, q
        if q < 5:
            assert abs(sum(b * ci ** (q - 1) for b, ci in zip(embedded, c)) - 1 / q) < 1e-12, q
    for theta in (0.3, 0.5, 1.0):
        for q in range(1, 5):
            assert abs(sum(b * ci ** (q - 1) for b, ci in zip(tsit5_dense(theta), c)) - theta ** q / q) < 1e-12
    assert max(abs(a - b) for a, b in zip(tsit5_dense(1.0), TSIT5_B)) < 1e-12


class Reference(nn.Module):
    """The field of an ODEField in plain PyTorch: F.linear layers with the FusedMLP's parameters (a copy, in the
    same tensors: one flat tensor for a flat FusedMLP, whose views are the layers, else one per layer, so that
    torchdiffeq's adjoint norm sees the same parameters), the control (a clone: its own leaf) interpolated
    between knots written out here. Counts its evaluations and torchdiffeq's accepted steps."""

    def __init__(self, field: ODEField) -> None:
        super().__init__()
        net = field.net
        self.params = nn.ParameterList([p.detach().clone() for p in net.parameters()])
        self.flat, self.sizes, self.bias = net.flat, net.sizes, net._has_bias
        self.acts, self.time_input = net.activations, field.time_input
        self.control = None if field.control is None else field.control.detach().clone().requires_grad_()
        self.times = field.control_times
        self.nfe = self.steps = 0

    def layers(self):
        if not self.flat:
            ps = list(self.params)
            return (ps[::2], ps[1::2]) if self.bias else (ps, None)
        return fusedlayers.functional.flat_layers(self.params[0], self.sizes, self.bias)

    def callback_accept_step(self, t0, y0, dt):
        self.steps += 1

    def control_at(self, t):
        c, times = self.control, self.times
        if times is None:
            return c
        j = min(max(int((times <= t).sum()) - 1, 0), len(times) - 2)
        w = ((t - times[j]) / (times[j + 1] - times[j])).clamp(0, 1)
        return c[:, j] + w * (c[:, j + 1] - c[:, j])

    def forward(self, t, y):
        self.nfe += 1
        t = t.to(y.dtype)
        parts = [y]
        if self.time_input:
            parts.append(t.reshape(1).expand(*y.shape[:-1], 1))
        if self.control is not None:
            parts.append(self.control_at(t))
        h = torch.cat(parts, -1)
        weights, biases = self.layers()
        for w, b, act in zip(weights, biases or [None] * len(weights), self.acts):
            h = ACT[act](F.linear(h, w, b))
        return h


def make(kind, activation="tanh", bias=True, batch=3, dtype=torch.float64, seed=0):
    """An ODEField of `kind` and its y0 (batch None: a single vector (D,))."""
    gen = torch.Generator().manual_seed(seed)
    extra = {"autonomous": 0, "time": 1, "constant": CONTROL, "knots": CONTROL}[kind]
    torch.manual_seed(seed)
    net = FusedMLP([D + extra, 6, 6, D], activation=activation, bias=bias, dtype=dtype)
    control = times = None
    if kind == "constant":
        control = torch.randn(batch, CONTROL, generator=gen, dtype=dtype).requires_grad_()
    if kind == "knots":
        control = torch.randn(batch, K, CONTROL, generator=gen, dtype=dtype).requires_grad_()
        times = torch.linspace(0, 1.2, K, dtype=dtype)
    field = ODEField(net, control, times, time_input=kind == "time")
    y0 = torch.randn(*([] if batch is None else [batch]), D, generator=gen, dtype=dtype)
    return field, y0


def reference_options(ref, method):
    """torchdiffeq's options for the problem: the fixed grids' step, the knots as jump times."""
    if method in STEPS:
        return {"step_size": STEPS[method]}
    return {} if ref.times is None else {"jump_t": ref.times}


def solve_both(field, y0, t, method, adjoint, options=None, adjoint_options=None):
    """(fused solution, fused gradients, reference solution, reference gradients, the reference field)."""
    ref = Reference(field)
    opts = reference_options(ref, method) if options is None else options
    fused_opts = {k: v for k, v in opts.items() if k != "jump_t"}  # the field's knots are jump times already
    jumps = opts.get("jump_t")
    if jumps is not None and ref.times is not None and not torch.isin(jumps, ref.times).all():
        fused_opts["jump_t"] = jumps[~torch.isin(jumps, ref.times)]
    g = torch.cos(torch.arange(len(t) * y0.numel(), dtype=y0.dtype)).reshape(len(t), *y0.shape)
    out = []
    for lib, f in ((fusedlayers, field), (torchdiffeq, ref)):
        x0 = y0.clone().requires_grad_()
        control = [] if f.control is None else [f.control]
        params = list(f.net.parameters()) if f is field else list(f.params)
        if adjoint:
            adjoint_opts = None if adjoint_options is None else {
                **(opts if f is ref else fused_opts), **adjoint_options}
            ys = lib.odeint_adjoint(f, x0, t, method=method, options=opts if f is ref else fused_opts,
                                    adjoint_options=adjoint_opts, adjoint_params=tuple(params + control), **TOLS)
        else:
            ys = lib.odeint(f, x0, t, method=method, options=opts if f is ref else fused_opts, **TOLS)
        grads = torch.autograd.grad(ys, [x0, *params, *control], g)
        grads = [grads[0], *per_layer(field.net, grads[1:1 + len(params)]), *grads[1 + len(params):]]
        out += [ys.detach(), grads]
    return (*out, ref)


CASES = [(kind, act, bias, batch) for kind in KINDS for act, bias in (("tanh", True), ("gelu", False))
         for batch in ([None, 3] if kind in ("autonomous", "time") else [1, 3])]


@pytest.mark.parametrize("kind,activation,bias,batch", CASES,
                         ids=[f"{k}-{a}-{'bias' if b else 'nobias'}-{n or 'vector'}" for k, a, b, n in CASES])
@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5", "rk4", "midpoint", "euler"])
def test_matches_torchdiffeq(method, adjoint, kind, activation, bias, batch):
    field, y0 = make(kind, activation, bias, batch)
    t = torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=torch.float64)
    ys, grads, ys_ref, grads_ref, ref = solve_both(field, y0, t, method, adjoint)
    assert_rel_close(ys, ys_ref, 1e-10, "solution")
    assert field.last_solve["nfe_forward"] + field.last_solve["nfe_backward"] * adjoint == ref.nfe
    grid = int(torch.ceil((t[-1] - t[0]) / STEPS[method] + 1).item()) if method in STEPS else None
    assert field.last_solve["steps"] == (ref.steps if method not in STEPS else grid - 1)
    for name, a, b in zip(["y0", *[f"param{i}" for i in range(len(grads) - 2)], "control"], grads, grads_ref):
        assert_rel_close(a, b, 1e-5 if adjoint else 1e-7, name)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("first", ["given", "clamped"])
def test_backprop_first_step(method, first):
    """torchdiffeq differentiates the first step size it chooses, and holds a given one (and every later one)
    constant; a first step cut short by a jump time is constant too. Without that term (all steps constant) bosh3's
    gradients differ from torchdiffeq's by up to 2e-6 here, dopri5's by 1e-7."""
    field, y0 = make("knots", "tanh")
    t = torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=torch.float64)
    options = {"jump_t": Reference(field).times}
    if first == "given":
        options["first_step"] = 0.05
    else:  # the first jump time after t0 = 0 inside the first step
        options["jump_t"] = torch.cat([torch.tensor([1e-4], dtype=torch.float64), options["jump_t"]])
    ys, grads, ys_ref, grads_ref, ref = solve_both(field, y0, t, method, False, options)
    assert field.last_solve["nfe_forward"] == ref.nfe
    assert field.last_solve["steps"] == ref.steps
    for a, b in zip(grads, grads_ref):
        assert_rel_close(a, b, 1e-7)


def test_backprop_first_step_at_a_bound():
    """min_step equal to the first step chosen: torch.clamp passes half its gradient there, as the fused solve."""
    from torchdiffeq._impl.misc import _rms_norm, _select_initial_step
    field, y0 = make("time", "tanh", True, 3)
    t = torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=torch.float64)
    with torch.no_grad():
        h = _select_initial_step(Reference(field), t[0], y0, SOLVERS["bosh3"].order - 1,
                                 torch.tensor(TOLS["rtol"], dtype=torch.float64),
                                 torch.tensor(TOLS["atol"], dtype=torch.float64), _rms_norm).item()
    ys, grads, ys_ref, grads_ref, ref = solve_both(field, y0, t, "bosh3", False, {"min_step": h})
    assert field.last_solve["nfe_forward"] == ref.nfe
    for a, b in zip(grads, grads_ref):
        assert_rel_close(a, b, 1e-10)


@pytest.mark.parametrize("case,adjoint", [("layers", False), ("layers", True), ("no-bias-layers", True),
                                          ("seminorm", True), ("reversed", False), ("reversed", True)])
def test_layouts_norms_and_directions(case, adjoint):
    """A FusedMLP with per-layer Parameters (the adjoint's norm then takes each separately, as torchdiffeq's),
    the adjoint's seminorm, and t decreasing."""
    torch.manual_seed(0)
    net = FusedMLP([D + CONTROL, 6, D], activation="tanh", bias=case != "no-bias-layers", dtype=torch.float64,
                   flat=case not in ("layers", "no-bias-layers"))
    field = ODEField(net, torch.randn(3, CONTROL, dtype=torch.float64, requires_grad=True))
    y0 = torch.randn(3, D, dtype=torch.float64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    t = t.flip(0) if case == "reversed" else t
    options = reference_options(Reference(field), "dopri5")
    ys, grads, ys_ref, grads_ref, ref = solve_both(field, y0, t, "dopri5", adjoint, options,
                                                   {"norm": "seminorm"} if case == "seminorm" else None)
    assert_rel_close(ys, ys_ref, 1e-10)
    assert field.last_solve["nfe_forward"] + field.last_solve["nfe_backward"] * adjoint == ref.nfe
    for a, b in zip(grads, grads_ref):
        assert_rel_close(a, b, 1e-5 if adjoint else 1e-7)


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_float32_within_1e4(adjoint):
    """float32 against torchdiffeq's float64 solve of the same field."""
    field64, y0 = make("knots", "tanh")
    net32 = FusedMLP(field64.net.sizes, activation="tanh", dtype=torch.float32)
    net32.load_state_dict(field64.net.state_dict())
    field32 = ODEField(net32, field64.control.detach().float().requires_grad_(), field64.control_times.float())
    t = torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=torch.float64)
    _, _, ys_ref, grads_ref, _ = solve_both(field64, y0, t, "dopri5", adjoint)
    x0 = y0.float().requires_grad_()
    control = field32.control
    kw = {"adjoint_params": (net32.flat_params, control)} if adjoint else {}
    solve = fusedlayers.odeint_adjoint if adjoint else fusedlayers.odeint
    ys = solve(field32, x0, t.float(), method="dopri5", rtol=1e-7, atol=1e-9, **kw)
    g = torch.cos(torch.arange(ys.numel(), dtype=ys.dtype)).reshape(ys.shape)
    grads = torch.autograd.grad(ys, [x0, field32.net.flat_params, control], g)
    assert_rel_close(ys, ys_ref, 1e-4)
    for a, b in zip([grads[0], *per_layer(field32.net, grads[1:2]), grads[2]], grads_ref):
        assert_rel_close(a, b, 1e-4)


@pytest.mark.parametrize("activation", ["selu", "relu"])
def test_kinked_field_by_tolerance(activation):
    """A field with a kink: the adaptive steps follow rounding (two torchdiffeq solves of equal selu nets that
    differ in the last bit differ by 1e-6 in the solution), so the solve is compared by its accuracy only: within
    the tolerance's reach of torchdiffeq's solution, and the gradients within 1e-3."""
    field, y0 = make("constant", activation)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    ys, grads, ys_ref, grads_ref, _ = solve_both(field, y0, t, "dopri5", False, {})
    assert_rel_close(ys, ys_ref, 1e-6)
    for a, b in zip(grads, grads_ref):
        assert_rel_close(a, b, 1e-3)


@pytest.mark.parametrize("kind", ["constant", "knots", "time"])
def test_gradcheck_fixed_grid(kind):
    """The backprop gradient is the exact derivative of the discrete solve: gradcheck on rk4's fixed grid."""
    field, y0 = make(kind, "tanh", batch=2)
    net = field.net
    t = torch.tensor([0.0, 0.25, 0.6], dtype=torch.float64)

    def solve(x0, flat, control):
        f = ODEField(net, control, field.control_times, time_input=field.time_input)
        with torch.nn.utils.stateless._reparametrize_module(net, {"flat_params": flat}):
            return fusedlayers.odeint(f, x0, t, method="rk4", options={"step_size": 0.1})
    inputs = (y0.clone().requires_grad_(), net.flat_params.detach().clone().requires_grad_(),
              None if field.control is None else field.control.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(solve, inputs)


def test_opcheck():
    """torch.library.opcheck of the three ops (schemas, fakes, no aliasing, static and dynamic AOT dispatch), on a tiny knot-control problem."""
    field, y0 = make("knots", "tanh", batch=2)
    net, ops = field.net, fusedlayers.ops.odeint
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    solve, step_t, jump_t = ops.solve_args("dopri5", 1e-6, 1e-8, {})
    tensors = (y0, net.flat_params.detach(), field.control.detach(), field.control_times, t)
    fieldargs = (net.sizes, net._has_bias, net.activations, False)
    args = ops.op_args(fieldargs, tensors, solve, step_t, jump_t)
    grad = torch.ones(3, *y0.shape, dtype=y0.dtype)
    ys, _ = torch.ops.fusedlayers.odeint(*args)
    for op, full in ((torch.ops.fusedlayers.odeint, args), (torch.ops.fusedlayers.odeint_backward, (grad, *args)),
                     (torch.ops.fusedlayers.odeint_adjoint_backward, (grad, ys, *args, [0, 10], True, False))):
        torch.library.opcheck(op, full)


def test_compile_fullgraph_training_step():
    """The solve and the loss under torch.compile(fullgraph=True), backward() through the compiled graph (the
    backward op in AOTAutograd's backward graph): eager's gradients."""
    field, y0 = make("knots", "tanh")
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    params = [field.net.flat_params, field.control]

    def loss(x0):
        return fusedlayers.odeint(field, x0, t, method="dopri5", rtol=1e-6, atol=1e-8).square().mean()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        x0 = y0.clone().requires_grad_()
        for p in params:
            p.grad = None
        fn(x0).backward()
        grads.append([x0.grad, *[p.grad.clone() for p in params]])
    for a, b in zip(*grads):
        assert_rel_close(a, b, 1e-12)


def _bad(**change):
    """A valid problem (a knot-control field) with one thing changed, solved."""
    field, y0 = make("knots", "tanh")
    args = {"func": field, "y0": y0, "t": torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), "method": None,
            "options": None, **change}
    return fusedlayers.odeint(args.pop("func"), args.pop("y0"), args.pop("t"), **args)


@pytest.mark.parametrize("change,error,match", [
    ({"t": torch.tensor([0.0, 0.5, 0.5])}, ValueError, "strictly increasing or decreasing"),
    ({"t": torch.tensor([0.0, 0.5, 0.2])}, ValueError, "strictly increasing or decreasing"),
    ({"t": torch.zeros(0)}, ValueError, "length >= 1"),
    ({"t": torch.zeros(2, 2)}, ValueError, "1-D"),
    ({"t": torch.tensor([0.0, 0.5], requires_grad=True)}, ValueError, "not t"),
    ({"t": torch.tensor([0.0, 2.0], dtype=torch.float64)}, ValueError, "control_times .* must cover t"),
    ({"y0": torch.zeros(3, 5, dtype=torch.float64)}, ValueError, "y0 of width 2"),
    ({"y0": torch.zeros(2, dtype=torch.float64)}, ValueError, r"y0 of shape \(B, d\)"),
    ({"y0": torch.zeros(4, 2, dtype=torch.float64)}, ValueError, "control has 3 trajectories"),
    ({"y0": torch.zeros(3, 2, dtype=torch.float32)}, ValueError, "dtype"),
    ({"method": "dopri6"}, ValueError, "invalid method"),
    ({"method": "rk4", "options": {"first_step": 0.1}}, ValueError, "unknown options key 'first_step'"),
    ({"options": {"step_size": 0.1}}, ValueError, "unknown options key 'step_size'"),
    ({"options": {"first_step": -0.1}}, ValueError, r"options\['first_step'\] must be positive"),
    ({"method": "rk4", "options": {"step_size": 0.0}}, ValueError, r"options\['step_size'\] must be positive"),
    ({"options": {"step_t": [0.4]}}, RuntimeError, "must not have any repeated"),
    ({"options": {"step_t": [0.4]}, "method": "bosh3"}, RuntimeError, "must not have any repeated"),
    ({"method": "rk4", "options": {"interp": "cubic"}}, ValueError, "interpolates linearly"),
    ({"options": {"max_num_steps": 2}}, RuntimeError, "max_num_steps exceeded"),
])
def test_bad_input(change, error, match):
    if "step_t" in change.get("options", {}):  # a knot is a jump time: as step time too is torchdiffeq's error
        change["options"]["step_t"] = make("knots")[0].control_times[1:2]
    with pytest.raises(error, match=match):
        _bad(**change)


@pytest.mark.parametrize("what", ["shape", "times", "order"])
def test_bad_control(what):
    net = FusedMLP([D + CONTROL, 4, D], dtype=torch.float64)
    c, times = torch.zeros(3, K, CONTROL, dtype=torch.float64), torch.linspace(0, 1, K, dtype=torch.float64)
    with pytest.raises(ValueError, match={"shape": "control of shape", "times": "control_times of shape",
                                          "order": "strictly increasing"}[what]):
        ODEField(net, c[:, 0] if what == "shape" else c,
                 times[:-1] if what == "times" else times.flip(0) if what == "order" else times)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_nonfinite_state_raises(value):
    field, y0 = make("constant", "tanh")
    y0[0, 0] = value
    with pytest.raises(RuntimeError, match="non-finite values in state"):
        fusedlayers.odeint(field, y0, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_underflow_raises():
    field, y0 = make("constant", "tanh")
    with pytest.raises(RuntimeError, match="underflow in dt"):
        fusedlayers.odeint(field, y0, torch.tensor([1.0, 2.0], dtype=torch.float64), options={"first_step": 1e-20})


def test_double_backward_and_raw_ops_refuse():
    field, y0 = make("constant", "tanh")
    x0 = y0.clone().requires_grad_()
    ys = fusedlayers.odeint(field, x0, torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="not differentiable again"):
        torch.autograd.grad(ys.sum(), x0, create_graph=True)
    ops = fusedlayers.ops.odeint
    solve, step_t, jump_t = ops.solve_args("dopri5", 1e-6, 1e-8, {})
    net = field.net
    args = ops.op_args((net.sizes, True, net.activations, False),
                       (x0, net.flat_params, field.control, None, torch.tensor([0.0, 1.0], dtype=torch.float64)),
                       solve, step_t, jump_t)
    with pytest.raises(RuntimeError, match="derivative .* not implemented|autograd"):
        torch.ops.fusedlayers.odeint(*args)[0].sum().backward()


def test_other_functions_and_hooks_go_to_torchdiffeq():
    """A plain function, an ODEField whose net has a forward hook (it must run) and a torch.func transform are
    solved by torchdiffeq unchanged; method tsit5, which torchdiffeq lacks, then raises."""
    field, y0 = make("constant", "tanh")
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    f = lambda s, y: -y  # noqa: E731
    assert_rel_close(fusedlayers.odeint(f, y0, t), torchdiffeq.odeint(f, y0, t), 0)
    calls = []
    handle = field.net.register_forward_hook(lambda *a: calls.append(1))
    fused = fusedlayers.odeint(field, y0, t)
    assert calls and field.last_solve == {}
    with pytest.raises(ValueError, match="tsit5' runs only in the fused solve"):
        fusedlayers.odeint(field, y0, t, method="tsit5")
    handle.remove()
    assert_rel_close(fused, fusedlayers.odeint(field, y0, t), 1e-12)
    assert field.last_solve["nfe_forward"] > 0


@pytest.mark.parametrize("layout", ["transposed", "expanded", "sliced-knots", "strided-times"])
@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_noncontiguous_control(layout, adjoint):
    """A control (or its times) that is not contiguous in memory, a view of a leaf: the same solution and
    gradients (w.r.t. the leaf) as its contiguous copy."""
    torch.manual_seed(0)
    net = FusedMLP([D + CONTROL, 6, D], activation="tanh", dtype=torch.float64)
    shapes = {"transposed": (CONTROL, 3), "expanded": (1, CONTROL), "sliced-knots": (3, 5, CONTROL),
              "strided-times": (3, 3, CONTROL)}
    base = torch.randn(*shapes[layout], dtype=torch.float64)
    view = {"transposed": lambda b: b.t(), "expanded": lambda b: b.expand(3, CONTROL),
            "sliced-knots": lambda b: b[:, :3], "strided-times": lambda b: b}[layout]
    times = {"sliced-knots": torch.tensor([-0.1, 0.4, 1.1], dtype=torch.float64),
             "strided-times": torch.tensor([-0.1, 9, 0.4, 9, 1.1], dtype=torch.float64)[::2]}.get(layout)
    y0 = torch.randn(3, D, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    solve = fusedlayers.odeint_adjoint if adjoint else fusedlayers.odeint
    results = []
    for contiguous in (False, True):
        leaf, x0 = base.clone().requires_grad_(), y0.clone().requires_grad_()
        c = view(leaf).contiguous() if contiguous else view(leaf)
        ct = None if times is None else times.contiguous() if contiguous else times
        assert contiguous or not (c.is_contiguous() and (ct is None or ct.is_contiguous()))
        kw = {"adjoint_params": (net.flat_params, c)} if adjoint else {}
        ys = solve(ODEField(net, c, ct), x0, t, **kw, **TOLS)
        results.append([ys, *torch.autograd.grad(ys.square().sum(), [x0, net.flat_params, leaf])])
    for a, b in zip(*results):
        assert_rel_close(a, b, 1e-12)
