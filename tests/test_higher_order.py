"""Higher-order gradients (create_graph, to third order), torch.func transforms and forward-mode AD through
dense, mlp and cross_entropy on every runnable backend, against the same functions in plain PyTorch, float64."""
import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

from fusedlayers import FusedMLP
from fusedlayers.activations import ACTIVATIONS, REFERENCE
from fusedlayers.functional import cross_entropy, dense, mlp

from conftest import assert_rel_close, device_of, per_layer, value_classes

F64 = torch.float64


def _randn(*shape, device="cpu", seed=0, requires_grad=False):
    t = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(device)
    return t.requires_grad_(requires_grad)


def dense_ref(x, w, b, activation):
    return REFERENCE[activation].f(F.linear(x, w, b))


def mlp_ref(x, weights, biases, activations):
    h = x
    for i, (w, a) in enumerate(zip(weights, activations)):
        h = REFERENCE[a].f(F.linear(h, w, None if biases is None else biases[i]))
    return h


# ---- the activation derivatives -----------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivative_orders(activation):
    """Orders 0-3 from the C++ table equal the torch formulas (the third derivative: autograd of the formula
    for f''), in float64 and float32; orders 3 and 4 by autograd of the op equal autograd of the formula for f''."""
    z = _randn(40, seed=1) * 3
    act = REFERENCE[activation]

    def formulas(z):
        zr = z.clone().requires_grad_()
        d2f = act.d2f(zr)
        d3f = torch.autograd.grad(d2f.sum(), zr)[0] if d2f.requires_grad else torch.zeros_like(z)
        return act.f(z), act.df(z), act.d2f(z), d3f

    z32 = z.float()
    for order, (want, torch32) in enumerate(zip(formulas(z), formulas(z32))):
        assert_rel_close(torch.ops.fusedlayers.activation_derivative(z, activation, order), want, 1e-12,
                         f"order {order}")
        if order < 3:
            continue
        # The third derivative in float32: within 1e-5 of the float64 values, or no more than twice the float32
        # formula's own error.
        got32 = torch.ops.fusedlayers.activation_derivative(z32, activation, order)
        assert got32.dtype == torch.float32
        err, torch_err = ((t.double() - want).abs().max().item() for t in (got32, torch32))
        assert err <= max(2 * torch_err, 1e-5 * want.abs().max().item()), f"float32: {err} vs {torch_err}"
    zf, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = torch.ops.fusedlayers.activation_derivative(zf, activation, 2), act.d2f(zr)
    for order in (3, 4):
        if not want.requires_grad:  # f'' constant (piecewise linear activations): every higher order is 0
            assert not got.requires_grad or torch.equal(torch.autograd.grad(got.sum(), zf)[0], torch.zeros_like(z))
            break
        (got,) = torch.autograd.grad(got.sum(), zf, create_graph=True)
        (want,) = torch.autograd.grad(want.sum(), zr, create_graph=True)
        assert_rel_close(got, want, 1e-10, f"order {order}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivative_float32_sweep(activation):
    """Orders 0-2 in float32 (the vectorized kernels' own erf, exp and tanh approximations) at every point of
    a fine sweep over exp's whole range, within 2e-6 of the float64 formulas relative to max(|f|, 1); inf and
    NaN as the formulas give them."""
    z = torch.linspace(-100, 100, 1_000_001, dtype=F64)
    z = z[(z.abs() > 1e-3) & ~torch.isin(z, torch.tensor([-20.0, 20.0], dtype=F64))]  # no kinks, no softplus seam
    act = REFERENCE[activation]
    for order, ref in enumerate((act.f, act.df, act.d2f)):
        got = torch.ops.fusedlayers.activation_derivative(z.float(), activation, order).double()
        want = ref(z.float().double())
        err = ((got - want).abs() / want.abs().clamp(min=1)).max().item()
        assert err <= 2e-6, f"order {order}: max error {err:.2e} relative to max(|f|, 1)"
    special = torch.tensor([float("nan"), float("inf"), float("-inf")])
    got = torch.ops.fusedlayers.activation_derivative(special, activation, 0)
    want = act.f(special.double()).float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()]), \
        f"f({special.tolist()}) = {got.tolist()}, expected {want.tolist()}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_float32_tails_as_accurate_as_torch(activation):
    """f and f' in float32 (the vectorized kernels, as large dense layers, mlp tiles and the jet run them), relative
    to the float64 values at the same float32 points, no more than twice torch's own float32 error (f by its
    function, f' by its autograd) plus an ulp: where 1 + tanh and 1 - tanh^2 cancel, gelu_tanh(-4.36) was off by
    1.3e-2 (torch 8.5e-4) and tanh'(4.5) by 3.5e-4 (torch 1.05e-4)."""
    z32 = torch.linspace(-12, 12, 48_001, dtype=torch.float32)
    z32 = torch.cat([z32, torch.tensor([-4.36, 4.5], dtype=torch.float32)])
    act = REFERENCE[activation]
    zt = z32.clone().requires_grad_()
    f_torch = act.f(zt)
    (df_torch,) = torch.autograd.grad(f_torch.sum(), zt)
    for order, (ref, torch32) in enumerate(((act.f, f_torch.detach()), (act.df, df_torch))):
        want = ref(z32.double())
        got = torch.ops.fusedlayers.activation_derivative(z32, activation, order).double()
        tiny = want.abs() > 1e-30  # relative error where the value is a number to be relative to
        rel = lambda v: ((v.double() - want).abs() / want.abs())[tiny].max().item()  # noqa: E731
        eps = torch.finfo(torch.float32).eps
        assert rel(got) <= 2 * rel(torch32) + eps, f"order {order}: {rel(got):.2e} vs torch {rel(torch32):.2e}"


def test_gelu_float32_tail_to_a_few_eps():
    """Exact gelu in float32 (the vectorized kernels' own erfc) within 16 eps of float64 at the argument as float32
    rounds it, down to where it underflows: a written-out split of x^2 that the compiler contracted into an fma lost
    exp(-x^2)'s correction term here (33 eps on this grid, 67 at z = -11.4), while the dense path's copy of the same
    code was compiled without that contraction. (f' = Phi + z phi cancels in its tail, as PyTorch's does.)"""
    z = torch.linspace(-13.0, -0.1, 40001, dtype=torch.float32)
    want = z.double() * torch.special.erfc((z * -0.70710678118654752440).double()) / 2
    got = torch.ops.fusedlayers.activation_derivative(z, "gelu", 0).double()
    normal = want.abs() > torch.finfo(torch.float32).tiny
    rel = ((got - want).abs() / want.abs())[normal].max().item() / torch.finfo(torch.float32).eps
    assert rel <= 16, f"{rel:.1f} eps"


# Where torch's value is wrong, ours is kept (README, "Accuracy"), at these points of the test's z:
# gelu_tanh' and '' at +-inf and +-max are nan in torch (its backward forms z^3 (1 - tanh^2) = inf * 0), the
# limits are 1 (or 0) and 0; elu' and selu' at nan are 1 in torch's float32 kernel and '' 0 (nan in its float64
# one), ours nan in both.
TORCH_WRONG = {("gelu_tanh", 1): (1, 2, 6, 7), ("gelu_tanh", 2): (1, 2, 6, 7), ("elu", 1): (0,), ("selu", 1): (0,),
               ("elu", 2): (0,), ("selu", 2): (0,)}


def _torch_derivatives(activation, z):
    zt = z.clone().requires_grad_()
    f = REFERENCE[activation].f(zt)
    (df,) = torch.autograd.grad(f.sum(), zt, create_graph=True)
    d2f = torch.autograd.grad(df.sum(), zt)[0] if df.requires_grad else torch.zeros_like(z)
    return f.detach(), df.detach(), d2f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_hostile_points_as_torch(activation, dtype):
    """f, f' and f'' (create_graph) at NaN, +-inf, 0, +-1e13 and the largest finite values: NaN and inf where
    torch's autograd has them, and its value elsewhere (relu'(NaN) = 1 and elu''(0) = 0 as torch; f'' of
    gelu_tanh at 1e13 in float32 no longer 0 * inf)."""
    big = torch.finfo(dtype).max
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e13, -1e13, big, -big, 0.5, -0.5], dtype=dtype)
    f, df, d2f = _torch_derivatives(activation, z)
    wanted64 = _torch_derivatives(activation, z.double())
    for order, want in enumerate((f, df, d2f)):
        got = torch.ops.fusedlayers.activation_derivative(z, activation, order)
        for i in TORCH_WRONG.get((activation, order), ()):
            want[i] = got[i]
        # where torch in this dtype disagrees with its own float64 (float32 gelu(+inf) is NaN and gelu(max) inf on
        # AVX-512, its vector erf; inf and max in float64), ours may take float64's class
        want64 = wanted64[order].to(dtype)
        kept64 = (value_classes(want) != value_classes(want64)) & (value_classes(got) == value_classes(want64))
        want[kept64] = got[kept64]
        assert torch.equal(got.isnan(), want.isnan()), f"order {order}: {got.tolist()} vs torch {want.tolist()}"
        ok = ~want.isnan()
        assert torch.equal(got[ok].isinf(), want[ok].isinf()) and torch.equal(got[ok].sign(), want[ok].sign()), \
            f"order {order}: {got.tolist()} vs torch {want.tolist()}"
        fin = ok & want.isfinite()
        assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-30), \
            f"order {order}: {got.tolist()} vs torch {want.tolist()}"


def test_activation_derivative_opcheck():
    z = _randn(3, 4)
    for order in (0, 1, 2, 3):
        torch.library.opcheck(torch.ops.fusedlayers.activation_derivative.default, (z, "gelu", order),
                              test_utils=("test_schema", "test_faketensor"))
    # Order 4 and up are the torch formulas' (autograd of f'', twice).
    zr = z.clone().requires_grad_()
    (d3,) = torch.autograd.grad(REFERENCE["gelu"].d2f(zr).sum(), zr, create_graph=True)
    (want,) = torch.autograd.grad(d3.sum(), zr)
    assert_rel_close(torch.ops.fusedlayers.activation_derivative(z, "gelu", 4), want, 1e-12)
    with torch.no_grad():
        assert_rel_close(torch.ops.fusedlayers.activation_derivative(z, "gelu", 4), want, 1e-12, "no_grad")
    with torch.inference_mode():  # autograd records nothing here: the formula must still differentiate f''
        got = torch.ops.fusedlayers.activation_derivative_formula(z.clone(), "gelu", 4)
    assert_rel_close(got, want, 1e-12, "inference_mode")
    # The kernel itself (below the Autograd key, which routes order 4 to the formula) stops at order 3.
    with pytest.raises(ValueError, match="expected order 0 to 3, got 4"):
        with torch._C._AutoDispatchBelowAutograd():
            torch.ops.fusedlayers.activation_derivative(z, "gelu", 4)
    with pytest.raises(ValueError, match="expected order >= 0, got -1"):
        torch.ops.fusedlayers.activation_derivative(z, "gelu", -1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_grad(activation):
    """activation_grad(g, z, order) = g * f^(order)(z) for orders 0-4, and its gradients w.r.t. g and z (to
    second order, create_graph) equal autograd of that product with the torch formulas."""
    act = REFERENCE[activation]
    z, g = _randn(6, 5, seed=1) * 3, _randn(6, 5, seed=2)

    def formula(z, order):  # f^(order) by autograd of the formula for f'' past order 2
        d = (act.f, act.df, act.d2f)[min(order, 2)](z)
        for _ in range(order - 2):
            d = torch.autograd.grad(d.sum(), z, create_graph=True)[0] if d.requires_grad else torch.zeros_like(z)
        return d

    for order in range(5):
        zr, gr = z.clone().requires_grad_(), g.clone().requires_grad_()
        zf, gf = z.clone().requires_grad_(), g.clone().requires_grad_()
        want, got = gr * formula(zr, order), torch.ops.fusedlayers.activation_grad(gf, zf, activation, order)
        assert_rel_close(got, want, 1e-12, f"order {order}")
        v = _randn(6, 5, seed=3)
        want_g, want_z = torch.autograd.grad(want, (gr, zr), v, create_graph=True, allow_unused=True)
        got_g, got_z = torch.autograd.grad(got, (gf, zf), v, create_graph=True, allow_unused=True)
        assert_rel_close(got_g, want_g, 1e-12, f"order {order}: d/dgrad")
        if want_z is None or not want_z.requires_grad:  # piecewise linear past f': zero from here on
            for t in (want_z, got_z):  # None: not connected to z (the formulas' zeros past order 2)
                assert t is None or torch.equal(t, torch.zeros_like(z)), f"order {order}: d/dz"
            continue
        assert_rel_close(got_z, want_z, 1e-10, f"order {order}: d/dz")
        want2 = torch.autograd.grad((want_g * want_z).sum(), (gr, zr))
        got2 = torch.autograd.grad((got_g * got_z).sum(), (gf, zf))
        for a, b, what in zip(got2, want2, ("grad", "z")):
            assert_rel_close(a, b, 1e-10, f"order {order}: second order, d/d{what}")


def test_activation_grad_forward_ad_opcheck_and_errors():
    z, g, tz, tg = (_randn(3, 4, seed=s) for s in range(4))
    # f^(k)(z) for k = 1..5: f' and f'' from the formulas, then autograd of the formula for f''.
    zr = z.clone().requires_grad_()
    derivs = {1: REFERENCE["tanh"].df(zr), 2: REFERENCE["tanh"].d2f(zr)}
    for k in (3, 4, 5):
        derivs[k] = torch.autograd.grad(derivs[k - 1].sum(), zr, create_graph=True)[0]
    for order in (1, 3, 4):
        with fwAD.dual_level():
            out = torch.ops.fusedlayers.activation_grad(fwAD.make_dual(g, tg), fwAD.make_dual(z, tz), "tanh", order)
            got = fwAD.unpack_dual(out).tangent
        want = tg * derivs[order] + g * derivs[order + 1] * tz
        assert_rel_close(got, want.detach(), 1e-12, f"order {order}")
    torch.library.opcheck(torch.ops.fusedlayers.activation_grad.default, (g, z, "gelu", 1),
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.autograd.gradgradcheck(lambda g, z: torch.ops.fusedlayers.activation_grad(g, z, "silu", 2),
                                        (g.clone().requires_grad_(), z.clone().requires_grad_()))
    with pytest.raises(RuntimeError, match=r"activation_grad\(\): expected grad of the shape of z"):
        torch.ops.fusedlayers.activation_grad(g[:, :3], z, "tanh", 1)
    with pytest.raises(RuntimeError, match=r"activation_grad\(\): expected grad of the dtype of z"):
        torch.ops.fusedlayers.activation_grad(g.float(), z, "tanh", 1)
    with pytest.raises(ValueError, match="expected order >= 0, got -1"):
        torch.ops.fusedlayers.activation_grad(g, z, "tanh", -1)
    # vmap over either argument, or both.
    zb, gb = _randn(2, 3, 4, seed=5), _randn(2, 3, 4, seed=6)
    for in_dims, args in (((0, None), (gb, z)), ((None, 0), (g, zb)), ((0, 0), (gb, zb))):
        got = vmap(lambda g, z: torch.ops.fusedlayers.activation_grad(g, z, "tanh", 2), in_dims=in_dims)(*args)
        assert_rel_close(got, args[0] * REFERENCE["tanh"].d2f(args[1]), 1e-12, str(in_dims))


# ---- double backward and higher orders ------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_gradgradcheck(backend, activation, bias):
    device = device_of(backend)
    x, w = _randn(3, 4, device=device, requires_grad=True), _randn(5, 4, device=device, seed=1, requires_grad=True)
    b = _randn(5, device=device, seed=2, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    fn = lambda x, w, b=None: dense(x, w, b, activation, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("wrt", ["x", "weight", "bias"])
def test_dense_gradgradcheck_one_input_at_a_time(backend, wrt):
    """Only one of x, weight, bias requires grad: the others enter as constants."""
    device = device_of(backend)
    args = {"x": _randn(2, 3, 4, device=device), "weight": _randn(5, 4, device=device, seed=1),
            "bias": _randn(5, device=device, seed=2)}
    args[wrt].requires_grad_()

    def fn(t):
        a = dict(args, **{wrt: t})
        return dense(a["x"], a["weight"], a["bias"], "silu", backend=backend)

    assert torch.autograd.gradgradcheck(fn, (args[wrt],))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_gradgradcheck(backend, bias):
    device = device_of(backend)
    sizes, acts = [3, 5, 4, 2], ["tanh", "gelu", "sin"]
    x = _randn(4, 3, device=device, requires_grad=True)
    ws = [_randn(n, m, device=device, seed=i + 1, requires_grad=True) for i, (m, n) in enumerate(zip(sizes, sizes[1:]))]
    bs = [_randn(n, device=device, seed=10 + i, requires_grad=True) for i, n in enumerate(sizes[1:])] if bias else []
    fn = lambda x, *p: mlp(x, list(p[:3]), list(p[3:]) or None, acts[:-1], acts[-1], backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, *ws, *bs))


def test_mlp_gradgradcheck_parameters_only(backend):
    """x without grad: the double backward has only parameter paths."""
    device = device_of(backend)
    x = _randn(4, 3, device=device)
    ws = [_randn(4, 3, device=device, seed=1, requires_grad=True), _randn(2, 4, device=device, seed=2, requires_grad=True)]
    assert torch.autograd.gradgradcheck(lambda *w: mlp(x, list(w), None, "elu", "softplus", backend=backend), ws)


@pytest.mark.parametrize("activation", ["tanh", "gelu_tanh", "sigmoid", "cos"])
def test_third_order(backend, activation):
    """gradcheck of a function returning a second derivative w.r.t. x: third derivatives, f''' included."""
    device = device_of(backend)
    x = _randn(5, 1, device=device, requires_grad=True)
    w0, w1 = _randn(4, 1, device=device, seed=1, requires_grad=True), _randn(1, 4, device=device, seed=2, requires_grad=True)
    b0 = _randn(4, device=device, seed=3, requires_grad=True)

    def second_derivative(x, w0, w1, b0):
        u = mlp(x, [w0, w1], [b0, torch.zeros(1, dtype=F64, device=device)], activation, backend=backend)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        return d2u

    assert torch.autograd.gradcheck(second_derivative, (x, w0, w1, b0))
    dense2 = lambda x, w: torch.autograd.grad(  # noqa: E731
        torch.autograd.grad(dense(x, w, None, activation, backend=backend).sum(), x, create_graph=True)[0].sum(),
        x, create_graph=True)[0]
    assert torch.autograd.gradcheck(dense2, (x, w0))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_piecewise_linear_second_order_at_a_nan_preactivation_as_torch(backend, activation):
    """relu'' and leaky_relu'' are zero, and torch's double backward does not form their products: a nan
    pre-activation (from a nan in x) leaves the second-order gradients of the other inputs finite. Ours
    multiplied f''(z) = 0 by the nan and spread it into every entry."""
    device = device_of(backend)
    x = torch.tensor([float("nan"), -0.3, -2.2], dtype=F64, device=device).requires_grad_()
    w = torch.tensor([[float("nan"), -0.15, -1.1]], dtype=F64, device=device).requires_grad_()
    v = [torch.tensor([0.66, 0.27, 0.06], dtype=F64, device=device), torch.tensor([[0.39, -0.22, -0.32]], dtype=F64,
                                                                                   device=device)]
    g = torch.tensor([1.54], dtype=F64, device=device)

    def second(fn):
        first = torch.autograd.grad(fn(x, w), (x, w), g, create_graph=True)
        return torch.autograd.grad(sum((d * u).sum() for d, u in zip(first, v)), (x, w), allow_unused=True,
                                   materialize_grads=True)

    want = second(lambda x, w: REFERENCE[activation].f(F.linear(x, w)))
    got = second(lambda x, w: dense(x, w, None, activation, backend=backend))
    assert want[0][1:].isfinite().all()  # the case: torch's entries past the nan one are finite
    for a, e in zip(got, want):
        assert torch.equal(a.isnan(), e.isnan()), (a, e)
        assert_rel_close(torch.nan_to_num(a), torch.nan_to_num(e), 1e-12)


def _pinn_loss(net, x):
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    return (d2u + u).square().mean() + (du[0] - 1).square().sum()


def test_pinn_parameter_gradient_matches_eager(backend):
    device = device_of(backend)
    torch.manual_seed(0)
    fused = FusedMLP([1, 16, 16, 1], "tanh", dtype=F64, device=device, backend=backend)
    seq = fused.to_sequential()
    x = torch.linspace(0, 3, 33, dtype=F64, device=device).unsqueeze(1).requires_grad_()
    got = per_layer(fused, torch.autograd.grad(_pinn_loss(fused, x), list(fused.parameters())))
    want = torch.autograd.grad(_pinn_loss(seq, x), list(seq.parameters()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_rel_close(g, w, 1e-9)


# ---- torch.func ----------------------------------------------------------------------------------------------

def _dense_pair(backend, activation="gelu"):
    return (lambda x, w, b: dense(x, w, b, activation, backend=backend),
            lambda x, w, b: dense_ref(x, w, b, activation))


def _close(got, want, what):
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(g, w, 1e-10, f"{what}[{i}]")


def _dense_args(device):
    return _randn(4, 3, device=device), _randn(2, 3, device=device, seed=1), _randn(2, device=device, seed=2)


def _summed(fn):
    return lambda *a: fn(*a).sum()


def test_vmap_over_x_and_over_weights(backend):
    device = device_of(backend)
    f, r = _dense_pair(backend)
    x, w, b = _dense_args(device)
    xs, ws, bs = _randn(6, 4, 3, device=device, seed=3), _randn(6, 2, 3, device=device, seed=4), _randn(6, 2, device=device, seed=5)
    for dims, args in (((0, None, None), (xs, w, b)), ((1, None, None), (xs.transpose(0, 1), w, b)),
                       ((None, 0, None), (x, ws, b)), ((0, 0, 0), (xs, ws, bs)), ((None, None, 0), (x, w, bs))):
        _close(vmap(f, dims)(*args), vmap(r, dims)(*args), f"vmap {dims}")
    _close(vmap(vmap(f, (0, None, None)), (None, 0, None))(xs, ws, b),
           vmap(vmap(r, (0, None, None)), (None, 0, None))(xs, ws, b), "nested vmap")


@contextlib.contextmanager
def no_vmap_fallback(capfd):
    """Fails if vmap's per-sample fallback runs: it warns from C++ on stderr (not a Python warning) then."""
    capfd.readouterr()
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    err = capfd.readouterr().err
    assert "performance drop" not in err, err


_CONTROL = torch.library.Library("fusedlayers_test", "DEF")
_CONTROL.define("twice(Tensor x) -> Tensor")
_CONTROL.impl("twice", lambda x: x * 2, "CPU")


def test_the_fallback_detector_sees_the_fallback(capfd):
    """Positive control of no_vmap_fallback: an op with no batching rule takes vmap's fallback, and it fails."""
    with pytest.raises(AssertionError, match="performance drop"):
        with no_vmap_fallback(capfd):
            vmap(torch.ops.fusedlayers_test.twice)(torch.randn(3, 2))


def test_vmap_takes_the_batching_rule_not_the_fallback(backend, capfd):
    device = device_of(backend)
    f, _ = _dense_pair(backend)
    x, w, b = _dense_args(device)
    with no_vmap_fallback(capfd):
        vmap(f, (0, None, None))(_randn(5, 4, 3, device=device), w, b)
        vmap(f, (None, 0, None))(x, _randn(5, 2, 3, device=device), b)
        jacrev(f, (0, 1, 2))(x, w, b)


@pytest.mark.parametrize("activation", ["gelu", "tanh", "relu", "identity"])
def test_dense_transforms_match_eager(backend, activation):
    device = device_of(backend)
    f, r = _dense_pair(backend, activation)
    args = _dense_args(device)
    tangents = (_randn(4, 3, device=device, seed=6), _randn(2, 3, device=device, seed=7), _randn(2, device=device, seed=8))
    _close(grad(_summed(f), (0, 1, 2))(*args), grad(_summed(r), (0, 1, 2))(*args), "grad")
    _close(jacrev(f, (0, 1, 2))(*args), jacrev(r, (0, 1, 2))(*args), "jacrev")
    _close(jacfwd(f, (0, 1, 2))(*args), jacfwd(r, (0, 1, 2))(*args), "jacfwd")
    _close(jvp(f, args, tangents), jvp(r, args, tangents), "jvp")
    for i, (got, want) in enumerate(zip(hessian(_summed(f), (0, 1, 2))(*args), hessian(_summed(r), (0, 1, 2))(*args))):
        _close(got, want, f"hessian[{i}]")


def test_mlp_transforms_match_eager(backend):
    device = device_of(backend)
    acts = ["tanh", "silu", "sin"]
    x = _randn(3, 2, device=device)
    ws = [_randn(4, 2, device=device, seed=1), _randn(3, 4, device=device, seed=2), _randn(2, 3, device=device, seed=3)]
    bs = [_randn(4, device=device, seed=4), _randn(3, device=device, seed=5), _randn(2, device=device, seed=6)]
    f = lambda x, w0, w1, w2: mlp(x, [w0, w1, w2], bs, acts[:-1], acts[-1], backend=backend)  # noqa: E731
    r = lambda x, w0, w1, w2: mlp_ref(x, [w0, w1, w2], bs, acts)  # noqa: E731
    args, argnums = (x, *ws), (0, 1, 2, 3)
    tangents = tuple(_randn(*t.shape, device=device, seed=20 + i) for i, t in enumerate(args))
    _close(vmap(f, (0, None, None, None))(_randn(5, 3, 2, device=device), *ws),
           vmap(r, (0, None, None, None))(_randn(5, 3, 2, device=device), *ws), "vmap x")
    w1s = _randn(5, 3, 4, device=device, seed=9)
    _close(vmap(f, (None, None, 0, None))(x, ws[0], w1s, ws[2]), vmap(r, (None, None, 0, None))(x, ws[0], w1s, ws[2]),
           "vmap weights")
    _close(grad(_summed(f), argnums)(*args), grad(_summed(r), argnums)(*args), "grad")
    _close(jacrev(f, argnums)(*args), jacrev(r, argnums)(*args), "jacrev")
    _close(jacfwd(f, argnums)(*args), jacfwd(r, argnums)(*args), "jacfwd")
    _close(jvp(f, args, tangents), jvp(r, args, tangents), "jvp")
    _close(hessian(_summed(f))(*args), hessian(_summed(r))(*args), "hessian wrt x")
    _close(hessian(_summed(f), 2)(*args), hessian(_summed(r), 2)(*args), "hessian wrt weights[1]")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "layers"])
def test_fused_mlp_module_under_functional_call(backend, flat):
    """torch.func over a module's parameters (functional_call), the usual way to get per-sample gradients."""
    device = device_of(backend)
    torch.manual_seed(0)
    fused = FusedMLP([3, 6, 2], "tanh", dtype=F64, device=device, backend=backend, flat=flat)
    seq = fused.to_sequential()
    xs = _randn(7, 3, device=device)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        f = lambda p, x: torch.func.functional_call(model, p, (x,)).sum()  # noqa: E731
        return vmap(grad(f), (None, 0))(params, xs)

    got, want = per_sample(fused), per_sample(seq)
    want = torch.cat([g.reshape(7, -1) for g in want.values()], 1)
    assert_rel_close(torch.cat([g.reshape(7, -1) for g in got.values()], 1), want, 1e-10)


def test_forward_mode_ad(backend):
    device = device_of(backend)
    x, w, b = _dense_args(device)
    tx, tw = _randn(4, 3, device=device, seed=6), _randn(2, 3, device=device, seed=7)
    want_dense = jvp(lambda x, w: dense_ref(x, w, b, "sin"), (x, w), (tx, tw))[1]
    ws = [_randn(5, 3, device=device, seed=1), _randn(2, 5, device=device, seed=2)]
    want_mlp = jvp(lambda x: mlp_ref(x, ws, None, ["elu", "cos"]), (x,), (tx,))[1]
    with fwAD.dual_level():
        y = dense(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw), b, "sin", backend=backend)
        assert_rel_close(fwAD.unpack_dual(y).tangent, want_dense, 1e-10, "dense")
        y = mlp(fwAD.make_dual(x, tx), ws, None, "elu", "cos", backend=backend)
        assert_rel_close(fwAD.unpack_dual(y).tangent, want_mlp, 1e-10, "mlp")


def test_forward_over_reverse(backend):
    """jvp of a reverse-mode gradient: the Hessian-vector product through the C++ create_graph path."""
    device = device_of(backend)
    x, w, b = _dense_args(device)
    v = _randn(4, 3, device=device, seed=9)
    f = lambda x: torch.func.grad(lambda x: dense(x, w, b, "gelu", backend=backend).square().sum())(x)  # noqa: E731
    r = lambda x: torch.func.grad(lambda x: dense_ref(x, w, b, "gelu").square().sum())(x)  # noqa: E731
    _close(jvp(f, (x,), (v,)), jvp(r, (x,), (v,)), "hvp")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "layers"])
def test_compiled_module_keeps_the_op(flat):
    """Under torch.compile the op is traced as it is (the autograd.Function route is eager-only)."""
    torch._dynamo.reset()
    model = FusedMLP([3, 8, 2], "tanh", flat=flat)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3)
    assert_rel_close(compiled(x), model(x), 1e-6)
    graph = []
    torch.compile(model, fullgraph=True, backend=lambda gm, _: graph.append(gm) or gm)(x)
    op = torch.ops.fusedlayers.mlp_flat.default if flat else torch.ops.fusedlayers.mlp.default
    assert any(n.target == op for n in graph[0].graph.nodes)


def test_create_graph_through_sequential_of_fused_dense(backend):
    """Gradient penalty style: d/dparams of |d out / d x|^2 through a chain of FusedDense layers."""
    from fusedlayers import FusedDense

    device = device_of(backend)
    torch.manual_seed(1)
    fused = nn.Sequential(FusedDense(3, 5, activation="softplus", backend=backend),
                          FusedDense(5, 1, activation="identity", backend=backend)).to(device, F64)
    ref = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 1)).to(device, F64)
    ref.load_state_dict({k.replace("1.", "2."): v for k, v in fused.state_dict().items()})

    def penalty(model):
        x = _randn(6, 3, device=device, requires_grad=True)
        (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        # The last bias does not reach d out / d x: a zero gradient, in eager PyTorch too.
        return torch.autograd.grad(gx.square().sum(), list(model.parameters()), materialize_grads=True)

    for got, want in zip(penalty(fused), penalty(ref)):
        assert_rel_close(got, want, 1e-10)


# ---- cross_entropy under torch.func --------------------------------------------------------------------------

CE_OPTIONS = {"plain": {}, "weight": {"weight": True}, "smoothing": {"label_smoothing": 0.1},
              "weight_smoothing": {"weight": True, "label_smoothing": 0.2}}


def _ce_case(device, options, N=4, C=5, seed=0):
    """logits (N, C), target with row 1 ignored, the class weight (None without the "weight" option)."""
    x = _randn(N, C, device=device, seed=seed)
    t = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(seed)).to(device)
    t[1] = -100
    w = _randn(C, device=device, seed=seed + 1).abs() + 0.5 if options.get("weight") else None
    return x, t, w


def _looped(fn, dims, args):
    """vmap's result computed one batch entry at a time (F.cross_entropy has no batching rule for some options)."""
    n = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    return torch.stack([fn(*(a if d is None else a.select(d, i) for a, d in zip(args, dims))) for i in range(n)])


def _ce_pair(backend, reduction, options):
    ls = options.get("label_smoothing", 0.0)
    return (lambda x, t, w: cross_entropy(x, t, w, reduction=reduction, label_smoothing=ls, backend=backend),
            lambda x, t, w: F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=ls))


@pytest.mark.parametrize("options", CE_OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_transforms_match_eager(backend, reduction, options):
    device = device_of(backend)
    f, r = _ce_pair(backend, reduction, CE_OPTIONS[options])
    x, t, w = _ce_case(device, CE_OPTIONS[options])
    tx = _randn(*x.shape, device=device, seed=7)
    sq = lambda fn: lambda x: fn(x, t, w).square().sum()  # noqa: E731  a scalar with a nonzero Hessian
    _close(grad(sq(f))(x), grad(sq(r))(x), "grad")
    _close(jacrev(f)(x, t, w), jacrev(r)(x, t, w), "jacrev")
    _close(jacfwd(f)(x, t, w), jacfwd(r)(x, t, w), "jacfwd")
    _close(jvp(lambda x: f(x, t, w), (x,), (tx,)), jvp(lambda x: r(x, t, w), (x,), (tx,)), "jvp")
    _close(hessian(sq(f))(x), hessian(sq(r))(x), "hessian")
    xs, ts = _randn(3, *x.shape, device=device, seed=8), torch.stack([t, t.roll(1), t.flip(0)])
    for dims, args in (((0, None, None), (xs, t, w)), ((0, 0, None), (xs, ts, w)), ((None, 0, None), (x, ts, w)),
                       ((1, None, None), (xs.transpose(0, 1), t, w))):
        _close(vmap(f, dims)(*args), _looped(r, dims, args), f"vmap {dims}")


def test_cross_entropy_vmap_and_forward_ad_shapes(backend):
    """A vmapped class weight (one call per entry), (N, C, d) inputs under vmap, and forward-mode AD."""
    device = device_of(backend)
    f, r = _ce_pair(backend, "mean", CE_OPTIONS["weight_smoothing"])
    x, t, w = _ce_case(device, CE_OPTIONS["weight_smoothing"])
    ws = _randn(3, x.shape[1], device=device, seed=9).abs() + 0.5
    _close(vmap(f, (None, None, 0))(x, t, ws), _looped(r, (None, None, 0), (x, t, ws)), "vmap weight")
    x3, t3 = _randn(2, 2, 5, 3, device=device, seed=10), torch.tensor([[[0, 4, 2], [1, -100, 3]]] * 2, device=device)
    _close(vmap(f, (0, None, None))(x3, t3[0], w), _looped(r, (0, None, None), (x3, t3[0], w)), "vmap (N, C, d)")
    tx = _randn(*x.shape, device=device, seed=11)
    for reduction in ("mean", "none"):
        want = jvp(lambda x: F.cross_entropy(x, t, w, reduction=reduction), (x,), (tx,))[1]
        with fwAD.dual_level():
            y = cross_entropy(fwAD.make_dual(x, tx), t, w, reduction=reduction, backend=backend)
            assert_rel_close(fwAD.unpack_dual(y).tangent, want, 1e-10, f"forward_ad {reduction}")


def test_cross_entropy_vmap_takes_the_batching_rule_not_the_fallback(backend, capfd):
    device = device_of(backend)
    x, t, w = _ce_case(device, CE_OPTIONS["weight"])
    f = lambda x, t: cross_entropy(x, t, w, reduction="none", backend=backend)  # noqa: E731
    with no_vmap_fallback(capfd):
        vmap(f, (0, 0))(_randn(3, *x.shape, device=device), torch.stack([t] * 3))
        jacrev(f)(x, t)
        hessian(lambda x: f(x, t).sum())(x)


def _ce_zloss_ref(x, t, z_loss, softcap):
    """Plain PyTorch: the softcapped logits' cross-entropy plus z_loss * lse**2 per kept row, mean; and lse."""
    z = softcap * torch.tanh(x / softcap)
    lse = z.logsumexp(-1)
    kept = t != -100
    loss = F.cross_entropy(z, t, reduction="none") + torch.where(kept, z_loss * lse.square(), 0)
    return loss.sum() / kept.sum(), lse


def test_cross_entropy_z_loss_softcap_transforms(backend):
    device = device_of(backend)
    x, t, _ = _ce_case(device, {})
    x = 3 * x
    tx = _randn(*x.shape, device=device, seed=12)
    f = lambda x: cross_entropy(x, t, z_loss=0.05, softcap=4.0, return_lse=True, backend=backend)  # noqa: E731
    r = lambda x: _ce_zloss_ref(x, t, 0.05, 4.0)  # noqa: E731
    _close(grad(lambda x: f(x)[0])(x), grad(lambda x: r(x)[0])(x), "grad loss")
    _close(grad(lambda x: f(x)[1].square().sum())(x), grad(lambda x: r(x)[1].square().sum())(x), "grad lse")
    (got, dgot), (want, dwant) = jvp(f, (x,), (tx,)), jvp(r, (x,), (tx,))
    _close(got, want, "jvp primals")
    _close(dgot, dwant, "jvp tangents of (loss, lse)")
    _close(hessian(lambda x: f(x)[0])(x), hessian(lambda x: r(x)[0])(x), "hessian")


def test_cross_entropy_weight_derivative_is_refused(backend):
    """As the op (and F.cross_entropy): no gradient with respect to the class weight, never a silent zero."""
    x, t, w = _ce_case(device_of(backend), CE_OPTIONS["weight"])
    f = lambda x, w: cross_entropy(x, t, w, backend=backend)  # noqa: E731
    with pytest.raises(RuntimeError, match="class weight"):
        grad(f, 1)(x, w)
    with pytest.raises(RuntimeError, match="class weight"):
        jvp(f, (x, w), (torch.ones_like(x), torch.ones_like(w)))
