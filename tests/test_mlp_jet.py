"""mlp_jet (csrc/ops/mlp_jet.cpp, csrc/cpu/mlp_jet.cpp): the mlp's value and first and second directional derivatives in one pass,
against the same network in plain PyTorch, float64: derivatives by nested torch.func.jvp, parameter gradients
by reverse mode through create_graph gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

import fusedlayers
from fusedlayers import FusedMLP
from fusedlayers.activations import ACTIVATIONS, REFERENCE
from fusedlayers.functional import mlp_jet

from conftest import assert_rel_close, per_layer

F64 = torch.float64


def _randn(*shape, seed=0, dtype=F64, requires_grad=False):
    t = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return t.requires_grad_(requires_grad)


def _net(sizes, bias=True, seed=1, dtype=F64, requires_grad=False):
    weights = [_randn(n, m, seed=seed + i, dtype=dtype, requires_grad=requires_grad) / m ** 0.5
               for i, (m, n) in enumerate(zip(sizes, sizes[1:]))]
    weights = [w.detach().requires_grad_(requires_grad) for w in weights]
    biases = [_randn(n, seed=seed + 100 + i, dtype=dtype, requires_grad=requires_grad)
              for i, n in enumerate(sizes[1:])] if bias else None
    return weights, biases


def mlp_ref(x, weights, biases, activations):
    h = x
    for i, (w, a) in enumerate(zip(weights, activations)):
        h = REFERENCE[a].f(F.linear(h, w, None if biases is None else biases[i]))
    return h


def jet_ref(x, direction, weights, biases, activations):
    """(u, du, d2u) by forward over forward mode through plain PyTorch."""
    def f(x):
        return mlp_ref(x, weights, biases, activations)

    def df(x):
        return jvp(f, (x,), (direction.expand_as(x),))[1]

    return f(x), df(x), jvp(df, (x,), (direction.expand_as(x),))[1]


def _check_jet(got, want, rtol):
    for g, w, name in zip(got, want, ("u", "du", "d2u")):
        assert_rel_close(g, w, rtol, name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_jet_matches_forward_mode(activation, bias):
    weights, biases = _net([3, 7, 5, 2], bias=bias)
    acts = [activation, activation, activation]
    x, direction = _randn(9, 3, seed=2), _randn(3, seed=3)
    _check_jet(mlp_jet(x, weights, biases, acts[:-1], acts[-1], direction),
               jet_ref(x, direction, weights, biases, acts), 1e-10)


@pytest.mark.parametrize("x_shape,direction_shape", [((3,), (3,)), ((4, 3), (3,)), ((2, 4, 3), (3,)),
                                                     ((2, 4, 3), (2, 4, 3)), ((2, 4, 3), (4, 1)), ((0, 3), (3,)),
                                                     ((2, 0, 3), (3,))],
                         ids=["vector", "rank2", "rank3", "per_row", "broadcast", "empty", "empty_rank3"])
def test_jet_shapes(x_shape, direction_shape):
    weights, biases = _net([3, 6, 2])
    x, direction = _randn(*x_shape, seed=2), _randn(*direction_shape, seed=3)
    got = mlp_jet(x, weights, biases, "tanh", "sigmoid", direction)
    for g in got:
        assert g.shape == (*x_shape[:-1], 2)
    _check_jet(got, jet_ref(x, direction, weights, biases, ["tanh", "sigmoid"]), 1e-10)


def test_jet_one_feature_defaults_to_d_dx_and_takes_non_contiguous_x():
    weights, biases = _net([1, 8, 8, 1])
    x = _randn(12, 2, seed=2)[:, 1:]  # (12, 1), every other element
    assert not x.is_contiguous()
    _check_jet(mlp_jet(x, weights, biases, "gelu"), jet_ref(x, torch.ones(1, dtype=F64), weights, biases,
                                                            ["gelu", "gelu", "identity"]), 1e-10)


def test_jet_float32_against_float64():
    weights, biases = _net([2, 16, 16, 3])
    x, direction = _randn(33, 2, seed=2), _randn(2, seed=3)
    want = jet_ref(x, direction, weights, biases, ["silu", "silu", "identity"])
    got = mlp_jet(x.float(), [w.float() for w in weights], [b.float() for b in biases], "silu",
                  direction=direction.float())
    for g in got:
        assert g.dtype == torch.float32
    _check_jet(got, want, 1e-5)


@pytest.mark.parametrize("dtype,fused", [(F64, True), (torch.float32, True), (torch.bfloat16, False)])
def test_cpu_kernels_fuse_the_elementwise_step(dtype, fused):
    # The CPU kernels (csrc/cpu/mlp_jet.cpp) run each layer's elementwise step as one pass for float and
    # double; the composite, which calls activation_derivative for f, f' and f'', runs every other dtype.
    weights, biases = _net([2, 4, 1], dtype=dtype)
    x, direction = _randn(3, 2, dtype=dtype), _randn(2, seed=3, dtype=dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mlp_jet(x, weights, biases, "tanh", direction=direction)
    called = {e.name for e in prof.events()}
    assert "fusedlayers::mlp_jet_forward" in called
    assert ("fusedlayers::activation_derivative" in called) is not fused, sorted(called)


def test_jet_bfloat16_takes_the_composite():
    # No CPU kernel for bfloat16: the forward and backward are the composite of ATen ops.
    weights, biases = _net([2, 8, 3], requires_grad=False)
    x, direction = _randn(5, 2, seed=2), _randn(2, seed=3)
    want = jet_ref(x, direction, weights, biases, ["tanh", "identity"])
    bf = [t.bfloat16().requires_grad_() for t in weights + biases]
    got = mlp_jet(x.bfloat16(), bf[:2], bf[2:], "tanh", direction=direction.bfloat16())
    for g in got:
        assert g.dtype == torch.bfloat16
    _check_jet(got, want, 3e-2)
    sum(g.float().sum() for g in got).backward()
    ref = [t.detach().requires_grad_() for t in weights + biases]
    sum(r.sum() for r in jet_ref(x, direction, ref[:2], ref[2:], ["tanh", "identity"])).backward()
    for b, r in zip(bf, ref):
        assert_rel_close(b.grad, r.grad, 3e-2)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_jet_parallel_chunks_match_forward_mode(two_threads):
    # Enough elements that the elementwise passes split over the threads (csrc/cpu/mlp_jet.cpp, kJetGrain).
    weights, biases = _net([1, 96, 1], requires_grad=True)
    x = torch.linspace(-2, 2, 700, dtype=F64).unsqueeze(1)
    got = mlp_jet(x, weights, biases, "tanh")
    want = jet_ref(x, torch.ones(1, dtype=F64), weights, biases, ["tanh", "identity"])
    _check_jet(got, want, 1e-10)
    g = [torch.randn(700, 1, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for a, b in zip(torch.autograd.grad(got, weights + biases, g), torch.autograd.grad(want, weights + biases, g)):
        assert_rel_close(a, b, 1e-10)


# ---- gradients -------------------------------------------------------------------------------------------------

def _pinn_loss_eager(net, x):
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    return (d2u + u).square().mean() + (du[0] - 1).square().sum()


def _pinn_loss_jet(net, x):
    u, du, d2u = net.jet(x)
    return (d2u + u).square().mean() + (du[0] - 1).square().sum()


@pytest.mark.parametrize("activation", ["tanh", "sin", "gelu_tanh", "softplus"])
def test_pinn_parameter_gradient_matches_eager(activation):
    torch.manual_seed(0)
    fused = FusedMLP([1, 16, 16, 1], activation, dtype=F64)
    seq = fused.to_sequential()
    x = torch.linspace(0, 3, 33, dtype=F64).unsqueeze(1)
    got = per_layer(fused, torch.autograd.grad(_pinn_loss_jet(fused, x), list(fused.parameters())))
    want = torch.autograd.grad(_pinn_loss_eager(seq, x.clone().requires_grad_()), list(seq.parameters()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_rel_close(g, w, 1e-9)


def _jet_fn(activations, bias=True):
    def fn(x, direction, *params):
        n = len(activations)
        weights, biases = list(params[:n]), list(params[n:]) if bias else None
        return mlp_jet(x, weights, biases, activations[:-1], activations[-1], direction)
    return fn


@pytest.mark.parametrize("activation", ["tanh", "gelu", "elu", "cos"])
def test_jet_gradcheck(activation):
    weights, biases = _net([2, 4, 3], requires_grad=True)
    x, direction = _randn(3, 2, seed=2, requires_grad=True), _randn(2, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(_jet_fn([activation, activation]), (x, direction, *weights, *biases))


@pytest.mark.parametrize("x_shape,direction_shape", [((3, 2), (3, 2)), ((2, 4, 2), (4, 1))],
                         ids=["per_row", "broadcast"])
def test_jet_gradcheck_without_bias_and_other_directions(x_shape, direction_shape):
    weights, _ = _net([2, 4, 3], bias=False, requires_grad=True)
    x, direction = _randn(*x_shape, seed=2, requires_grad=True), _randn(*direction_shape, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(_jet_fn(["sigmoid", "identity"], bias=False), (x, direction, *weights))


@pytest.mark.parametrize("activation", ["tanh", "silu"])
def test_jet_gradgradcheck(activation):
    # Past the kernels: the backward under create_graph is the composite, whose gradient needs f''''.
    weights, biases = _net([2, 3, 2], requires_grad=True)
    x, direction = _randn(2, 2, seed=2, requires_grad=True), _randn(2, seed=3, requires_grad=True)
    assert torch.autograd.gradgradcheck(_jet_fn([activation, "identity"]), (x, direction, *weights, *biases))


def test_jet_float32_gradients_against_float64():
    weights, biases = _net([2, 16, 16, 1], requires_grad=True)
    x, direction = _randn(40, 2, seed=2, requires_grad=True), _randn(2, seed=3, requires_grad=True)
    inputs = [x, direction] + weights + biases
    g = [torch.randn(40, 1, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    want = torch.autograd.grad(jet_ref(x, direction, weights, biases, ["tanh", "tanh", "identity"]), inputs, g)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out = mlp_jet(inputs32[0], inputs32[2:5], inputs32[5:], "tanh", direction=inputs32[1])
    got = torch.autograd.grad(out, inputs32, [t.float() for t in g])
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert_rel_close(a, b, 1e-5)


@pytest.mark.parametrize("x_shape", [(2,), (0, 2), (3, 0, 2)], ids=["vector", "empty", "empty_rank3"])
def test_jet_gradients_of_a_vector_and_of_an_empty_batch(x_shape):
    weights, biases = _net([2, 4, 3], requires_grad=True)
    x, direction = _randn(*x_shape, seed=2, requires_grad=True), _randn(2, seed=3, requires_grad=True)
    inputs = [x, direction] + weights + biases
    got = torch.autograd.grad([o.sum() for o in mlp_jet(x, weights[:2], biases, "gelu", direction=direction)],
                              inputs)
    ref = jet_ref(x, direction, weights, biases, ["gelu", "identity"])
    want = torch.autograd.grad([o.sum() for o in ref], inputs, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-10)


def test_jet_only_some_outputs_get_gradients():
    weights, biases = _net([1, 5, 1], requires_grad=True)
    x = _randn(4, 1, seed=2)
    _, _, d2u = mlp_jet(x, weights, biases, "tanh")
    got = torch.autograd.grad(d2u.sum(), weights + biases)
    ref = jet_ref(x, torch.ones(1, dtype=F64), weights, biases, ["tanh", "identity"])[2]
    want = torch.autograd.grad(ref.sum(), weights + biases, allow_unused=True)
    assert want[-1] is None  # d2u does not depend on the last bias: its gradient is zero
    assert torch.equal(got[-1], torch.zeros_like(biases[-1]))
    for g, w in zip(got[:-1], want[:-1]):
        assert_rel_close(g, w, 1e-10)


@pytest.mark.parametrize("bf16", [False, True], ids=["kernels", "composite"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_piecewise_linear_d2u_is_zero_past_an_inf(activation, dtype, bf16):
    """A piecewise-linear network's d2u is exactly 0, as torch's second derivative of it: no term multiplies f''
    (zero) by an overflowed du plane, and the first layer's d2 plane is zeros, not W0 times the input's zero
    plane (NaN under an inf weight). Both were NaN; bfloat16 runs the composite step."""
    weights, biases = _net([2, 5, 3], dtype=dtype)
    x, direction = _randn(4, 2, seed=2, dtype=dtype), _randn(2, seed=3, dtype=dtype)
    inf_weight = [weights[0].clone(), weights[1]]
    inf_weight[0][1, 0] = float("inf")
    big = torch.finfo(dtype).max
    overflowing = [weights[0].abs() * 10, weights[1]]  # with the direction below, every z1 of layer 0 is +inf
    cases = {"an inf weight": (inf_weight, direction), "an overflowed du": (overflowing, torch.full_like(direction, big))}
    if bf16:
        cases = {k: ([w.bfloat16() for w in ws], d.bfloat16()) for k, (ws, d) in cases.items()}
        x, biases = x.bfloat16(), [b.bfloat16() for b in biases]
    for what, (ws, d) in cases.items():
        u, du, d2u = mlp_jet(x, ws, biases, activation, activation, direction=d)
        assert not du.isfinite().all(), what  # the case overflows (or is inf) where it should
        assert torch.equal(d2u, torch.zeros_like(d2u)), f"{what}: {d2u}"


@pytest.mark.parametrize("bf16", [False, True], ids=["kernels", "composite"])
def test_relu_jet_backward_masks_a_nonfinite_upstream_gradient_as_torch(bf16):
    """relu's backward selects, as torch's threshold_backward: an inf gradient of u where z <= 0 gives 0 in dx,
    not inf * 0 = NaN. Reference: plain PyTorch's (u, du, d2u) of the same layer, by autograd."""
    dt = torch.bfloat16 if bf16 else F64
    w, b = _randn(4, 2, seed=5, dtype=dt), _randn(4, seed=6, dtype=dt)
    x, direction = _randn(6, 2, seed=7, dtype=dt), _randn(2, seed=8, dtype=dt)
    z = F.linear(x, w, b)
    assert (z <= 0).any() and (z > 0).any()
    g0 = torch.where(z <= 0, float("inf"), 1.0).to(dt)
    g1, g2 = torch.ones_like(z), torch.ones_like(z)
    xr = x.clone().requires_grad_()
    zr = F.linear(xr, w, b)
    dz = F.linear(direction.expand_as(xr), w)
    u = torch.relu(zr)
    (d1,) = torch.autograd.grad(u.sum(), zr, create_graph=True)
    want = torch.autograd.grad([u, d1 * dz], xr, [g0, g1])[0]  # d2u = d1 * 0 does not depend on x
    xf = x.clone().requires_grad_()
    got = torch.autograd.grad(mlp_jet(xf, [w], [b], "relu", "relu", direction=direction), xf, [g0, g1, g2])[0]
    assert want.isfinite().all()
    assert_rel_close(got.double(), want.double(), 1e-2 if bf16 else 1e-12)


@pytest.mark.parametrize("bf16", [False, True], ids=["kernels", "composite"])
def test_zero_upstream_at_an_overflowing_du_squared_gives_zero(bf16):
    """A gelu layer whose du plane is finite but du**2 overflows, then a relu that is off for some rows: those
    rows' upstream gradients are 0, and torch's chain rule forms 0 * du first (0 in dx); the third derivative
    times du * du times the upstream was 0 * inf = NaN. Reference: the same layers by autograd in the same dtype
    (found by the long property-based run)."""
    dt = torch.bfloat16 if bf16 else torch.float32
    w0, w1 = torch.tensor([[0.77]], dtype=dt), torch.tensor([[0.77]], dtype=dt)
    x, direction = torch.tensor([[1.54], [-0.29], [-2.18]], dtype=dt), torch.tensor([1e30], dtype=dt)
    g = [torch.tensor([[1.5], [-0.3], [-2.2]], dtype=dt), torch.tensor([[0.7], [0.3], [0.1]], dtype=dt),
         torch.tensor([[0.4], [-0.2], [-0.3]], dtype=dt)]
    xr = x.clone().requires_grad_()
    z0 = F.linear(xr, w0)
    (d1,) = torch.autograd.grad(F.gelu(z0).sum(), z0, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z0, create_graph=True)
    dz0 = F.linear(direction.expand_as(xr), w0)
    assert (dz0 * dz0).isinf().all() and dz0.isfinite().all()
    h, dh, d2h = F.gelu(z0), d1 * dz0, d2 * dz0 * dz0
    z1 = F.linear(h, w1)
    u = torch.relu(z1)
    off = z1 <= 0
    assert off.any() and not off.all()
    (r1,) = torch.autograd.grad(u.sum(), z1, create_graph=True)
    want = torch.autograd.grad([u, r1 * F.linear(dh, w1), r1 * F.linear(d2h, w1)], xr, g)[0]
    assert want[off].eq(0).all()
    xf = x.clone().requires_grad_()
    got = torch.autograd.grad(mlp_jet(xf, [w0, w1], None, "gelu", "relu", direction=direction), xf, g)[0]
    assert torch.equal(got[off], want[off]), f"{got} != {want}"


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_zero_third_derivative_at_an_overflowing_du_squared_gives_zero(bf16):
    """gelu_tanh beyond |z| = 10 after a 1e30 weight: its third derivative is 0 there and du * du overflows; that
    term times the upstream is 0, not 0 * inf = NaN (NaN in dx where the float64 value is finite: the long
    property-based run). Reference: the layers by autograd in float64, whose du * du does not overflow, with
    gelu_tanh as relu beyond 10 (its value and derivatives there to within 1e-36)."""
    dt = torch.bfloat16 if bf16 else torch.float32
    x = torch.tensor([1.5390625, -0.29296875, -2.171875], dtype=dt)
    w0, w1 = torch.tensor([[0.76953125, -0.146484375, -1.0859375]], dtype=dt), torch.tensor([[1e30]], dtype=dt)
    g = [torch.tensor([1.5390625], dtype=dt), torch.tensor([0.66015625], dtype=dt),
         torch.tensor([0.392578125], dtype=dt)]
    xr = x.double().requires_grad_()
    z0, dz0 = F.linear(xr, w0.double()), F.linear(x.double(), w0.double())
    th = torch.tanh(z0)
    h, dh, d2h = th, (1 - th ** 2) * dz0, -2 * th * (1 - th ** 2) * dz0 ** 2
    z1, dz1, d2z1 = F.linear(h, w1.double()), F.linear(dh, w1.double()), F.linear(d2h, w1.double())
    assert z1.abs().item() > 10 and (dz1.to(dt) ** 2).isinf().all()
    on = (z1 > 0).double()
    want = torch.autograd.grad([torch.relu(z1), on * dz1, on * d2z1], xr, [t.double() for t in g])[0]
    xf = x.clone().requires_grad_()
    got = torch.autograd.grad(mlp_jet(xf, [w0, w1], None, "tanh", "gelu_tanh", direction=x), xf, g)[0]
    assert got.isfinite().all(), got
    torch.testing.assert_close(got.double(), want, rtol=2e-2 if bf16 else 1e-4, atol=0)


@pytest.mark.parametrize("bf16", [False, True], ids=["kernels", "composite"])
@pytest.mark.parametrize("hidden", [[], ["relu"]], ids=["first_layer", "after_relu"])
def test_infinite_upstream_of_the_first_curved_layer_as_torch(bf16, hidden):
    """Below the first curved activation the d2 plane is zero by construction (the input's jet is (x, d, 0)), so
    the gradient of f'(z) z2 has no term there, as torch's graph has none: an infinite upstream of d2u times that
    zero z2 made the bias gradient NaN where torch's is -inf (found by the long property-based run). Reference:
    the same layers by autograd in the same dtype."""
    dt = torch.bfloat16 if bf16 else torch.float32
    x, direction = torch.tensor([[89.0]], dtype=dt), torch.tensor([float("inf")], dtype=dt)
    ws = [torch.tensor([[1.0]], dtype=dt) for _ in hidden] + [torch.tensor([[0.33]], dtype=dt),
                                                               torch.tensor([[float("inf")]], dtype=dt)]
    bs = [torch.tensor([0.0], dtype=dt) for _ in hidden] + [torch.tensor([1.5], dtype=dt), torch.tensor([0.0], dtype=dt)]
    g = [torch.tensor([[-1.3]], dtype=dt), torch.tensor([[0.45]], dtype=dt), torch.tensor([[0.043]], dtype=dt)]
    br = [b.clone().requires_grad_() for b in bs]
    h, dh = x, direction.expand_as(x)
    for w, b in zip(ws[:-2], br):  # relu at x > 0 passes (h, dh) through, with no d2 term
        h, dh = torch.relu(F.linear(h, w, b)), F.linear(dh, w)
    z, dz = F.linear(h, ws[-2], br[-2]), F.linear(dh, ws[-2])
    dh, d2h = -torch.sin(z) * dz, -torch.cos(z) * dz * dz
    outs = [F.linear(torch.cos(z), ws[-1], br[-1]), F.linear(dh, ws[-1]), F.linear(d2h, ws[-1])]
    want = torch.autograd.grad(outs, br[-2], g)[0]
    assert want.isinf().all()
    bf = [b.clone().requires_grad_() for b in bs]
    got = torch.autograd.grad(mlp_jet(x, ws, bf, ["relu"] * len(hidden) + ["cos"], "identity", direction=direction),
                              bf[-2], g)[0]
    assert torch.equal(got, want), f"{got} != {want}"


@pytest.mark.parametrize("activations", [["tanh", "identity"], ["identity", "tanh"]],
                         ids=["tanh", "identity_hidden"])
def test_jet_opcheck(activations):
    # A hidden identity layer: its pre-activation is the next layer's input, saved once (no aliased outputs).
    weights, biases = _net([2, 4, 3], requires_grad=True)
    x, direction = _randn(3, 2, seed=2, requires_grad=True), _randn(2, seed=3, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedlayers.mlp_jet.default, (x, direction, weights, biases, activations))
    # The kernels are not differentiable (higher orders go through the composite): checked without grad.
    x, direction, weights, biases = x.detach(), direction.detach(), [w.detach() for w in weights], \
        [b.detach() for b in biases]
    saved = torch.ops.fusedlayers.mlp_jet_forward(x, direction, weights, biases, activations)[3]
    grads = [_randn(3, 3, seed=4 + i) for i in range(3)]
    torch.library.opcheck(torch.ops.fusedlayers.mlp_jet_backward.default,
                          (*grads, x, direction, weights, biases, saved, activations, [True, True, True]))


def test_compiled_pinn_step_matches_eager():
    torch.manual_seed(0)
    fused = FusedMLP([1, 8, 8, 1], "tanh", dtype=F64)
    x = torch.linspace(0, 3, 17, dtype=F64).unsqueeze(1)
    params = list(fused.parameters())

    torch._dynamo.reset()
    loss = torch.compile(lambda x: _pinn_loss_jet(fused, x), fullgraph=True)(x)
    got = per_layer(fused, torch.autograd.grad(loss, params))  # through the compiled backward
    seq = fused.to_sequential()
    want = torch.autograd.grad(_pinn_loss_eager(seq, x.clone().requires_grad_()), list(seq.parameters()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_rel_close(g, w, 1e-9)


# ---- errors ------------------------------------------------------------------------------------------------------

def test_jet_errors_name_the_argument():
    weights, biases = _net([2, 4, 1])
    x = _randn(5, 2)
    with pytest.raises(ValueError, match="direction is required"):
        mlp_jet(x, weights, biases, "tanh")
    with pytest.raises(RuntimeError, match="direction of a shape that broadcasts"):
        mlp_jet(x, weights, biases, "tanh", direction=_randn(3))
    with pytest.raises(RuntimeError, match="direction to have the dtype of x"):
        mlp_jet(x, weights, biases, "tanh", direction=_randn(2, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"mlp_jet\(\): expected weights\[1\].size\(1\) == 4"):
        mlp_jet(x, [weights[0], _randn(1, 3)], biases, "tanh", direction=_randn(2))
    with pytest.raises(RuntimeError, match=r"mlp_jet\(\): expected biases\[0\] of shape \[4\]"):
        mlp_jet(x, weights, [_randn(5), biases[1]], "tanh", direction=_randn(2))
    with pytest.raises(RuntimeError, match=r"mlp_jet\(\): expected x to have at least 1 dimension"):
        mlp_jet(_randn(()), [_randn(4, 1), _randn(1, 4)], None, "tanh")
    with pytest.raises(RuntimeError, match="expected x to be a floating-point tensor"):
        mlp_jet(torch.ones(5, 2, dtype=torch.int64), [w.long() for w in weights], None, "tanh",
                direction=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown activation"):
        mlp_jet(x, weights, biases, "tanhh", direction=_randn(2))


# ---- torch.func and forward-mode AD: the composite route -------------------------------------------------------

def _jet_sum(x, direction, weights, biases):
    """A scalar of all three jet outputs, for grad and hessian."""
    u, du, d2u = mlp_jet(x, weights, biases, "tanh", direction=direction)
    return u.sum() + (du * u).sum() + d2u.square().sum()


def _jet_sum_ref(x, direction, weights, biases):
    u, du, d2u = jet_ref(x, direction, weights, biases, ["tanh", "identity"])
    return u.sum() + (du * u).sum() + d2u.square().sum()


def test_jet_vmap_over_rows_and_over_parameters():
    weights, biases = _net([2, 5, 3])
    x, direction = _randn(4, 6, 2, seed=2), _randn(2, seed=3)
    got = torch.func.vmap(lambda x: mlp_jet(x, weights, biases, "tanh", direction=direction))(x)
    _check_jet(got, jet_ref(x, direction, weights, biases, ["tanh", "identity"]), 1e-10)
    stacked = [torch.stack([w, 2 * w]) for w in weights]  # two networks, one vmapped call
    got = torch.func.vmap(lambda w0, w1: mlp_jet(x[0], [w0, w1], biases, "tanh", direction=direction))(*stacked)
    for k in range(2):
        want = jet_ref(x[0], direction, [w[k] for w in stacked], biases, ["tanh", "identity"])
        _check_jet([g[k] for g in got], want, 1e-10)


def test_jet_grad_jacrev_jacfwd_jvp_match_the_reference():
    weights, biases = _net([2, 3, 1])
    x, direction = _randn(3, 2, seed=2), _randn(2, seed=3)
    args = (x, direction, weights, biases)
    for transform in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd):
        for argnums in (0, 1, 2):
            got = transform(_jet_sum, argnums=argnums)(*args)
            want = transform(_jet_sum_ref, argnums=argnums)(*args)
            for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                assert_rel_close(g, w, 1e-10, f"{transform.__name__} {argnums}")
    # Second derivatives by reverse over reverse, to the fourth of the activation (d2u's f'' twice more).
    for argnums in (0, 2):
        got = torch.func.jacrev(torch.func.jacrev(_jet_sum, argnums=argnums), argnums=argnums)(*args)
        want = torch.func.hessian(_jet_sum_ref, argnums=argnums)(*args)
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert_rel_close(g, w, 1e-10, f"jacrev(jacrev) {argnums}")
    # Forward mode over that needs f'''' from autograd of the torch formulas, which functorch refuses there:
    # an error that says what works instead, never a wrong number.
    with pytest.raises(RuntimeError, match=r"jacrev\(jacrev\(\.\.\.\)\) works"):
        torch.func.hessian(_jet_sum, argnums=0)(*args)
    tangents = (_randn(3, 2, seed=5), _randn(2, seed=6), [_randn(3, 2, seed=7), _randn(1, 3, seed=8)],
                [_randn(3, seed=9), _randn(1, seed=10)])
    got = torch.func.jvp(_jet_sum, args, tangents)
    want = torch.func.jvp(_jet_sum_ref, args, tangents)
    for g, w in zip(got, want):
        assert_rel_close(g, w, 1e-10, "jvp")


def test_jet_forward_mode_ad_through_the_functional():
    import torch.autograd.forward_ad as fwAD
    weights, biases = _net([1, 4, 1])
    x, tangent = _randn(3, 1), _randn(4, 1, seed=5)
    want = torch.func.jvp(lambda w: jet_ref(x, torch.ones(1, dtype=F64), [w, weights[1]], biases,
                                            ["tanh", "identity"]), (weights[0],), (tangent,))[1]
    with fwAD.dual_level():
        out = mlp_jet(x, [fwAD.make_dual(weights[0], tangent), weights[1]], biases, "tanh")
        got = [fwAD.unpack_dual(o).tangent for o in out]
    _check_jet(got, want, 1e-10)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="raw mlp_jet op does not support forward-mode AD"):
        torch.ops.fusedlayers.mlp_jet(x, torch.ones(1, dtype=F64), [fwAD.make_dual(weights[0], tangent),
                                                                    weights[1]], biases, ["tanh", "identity"])


def test_module_jet_is_the_functional():
    torch.manual_seed(0)
    net = FusedMLP([2, 5, 3], ["cos"], output_activation="sin", dtype=F64)
    x, direction = _randn(4, 2, seed=2), _randn(2, seed=3)
    _check_jet(net.jet(x, direction), jet_ref(x, direction, net.weights(), net.biases(), ["cos", "sin"]), 1e-12)
    assert fusedlayers.functional.mlp_jet is mlp_jet


def test_float32_weight_gradient_sums_each_plane_apart():
    """The weight gradient is a GEMM per plane (value, direction, ...) and then their sum, as PyTorch's graph
    forms it: one GEMM over all planes' rows added the direction plane's small terms to a running sum of the value
    plane's (8 eps of the gradient off at 169 rows where PyTorch was 1.4: the long property run's case)."""
    def normal(shape, seed, scale=1.0):
        return (torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale).float()

    x, direction, w = normal((13, 13, 1), 0), normal((1,), 0), normal((1, 1), 0, 0.5)
    grads = [normal((13, 13, 1), seed) for seed in range(3)]
    ww = w.clone().requires_grad_()
    (got,) = torch.autograd.grad(mlp_jet(x, [ww], None, "identity", "leaky_relu", direction), ww, grads)
    w64 = w.double().requires_grad_()
    z = F.linear(x.double(), w64)
    u, du = F.leaky_relu(z), torch.where(z > 0, 1.0, 0.01) * F.linear(direction.double().expand_as(z), w64)
    (want,) = torch.autograd.grad([u, du], w64, [g.double() for g in grads[:2]])
    assert (got.double() - want).abs().item() <= 4 * torch.finfo(torch.float32).eps * want.abs().item()
