"""The mlp op family (functional.mlp, FusedMLP, the torch.library ops) on every runnable backend, against the
equivalent nn.Sequential in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlayers
from fusedlayers import ActivationModule, FusedMLP
from fusedlayers.activations import ACTIVATIONS, REFERENCE
from fusedlayers.functional import mlp

from conftest import assert_rel_close, device_of

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (sizes, activations of every layer): the seeds' narrow nets, mixed activations, and a net wider than the
# fused CPU and Triton paths take (so it goes layer by layer).
NETS = {
    "seed003": ([3, 10, 10, 10, 2], ["selu", "selu", "selu", "identity"]),
    "seed000": ([12] * 7, ["cos"] * 6),
    "mixed": ([5, 16, 9, 7, 4], ["tanh", "sigmoid", "cos", "softplus"]),
    "wide": ([6, 150, 3], ["gelu", "identity"]),
    "linear": ([6, 4], ["identity"]),  # one layer, nothing saved: the backward must not try to recompute
    "wide_linear": ([100, 80], ["identity"]),
}
BATCHES = [(), (1,), (37,), (2, 5)]


def reference(x, weights, biases, activations):
    h = x
    for i, (w, a) in enumerate(zip(weights, activations)):
        h = REFERENCE[a].f(F.linear(h, w, None if biases is None else biases[i]))
    return h


def make(sizes, batch, dtype, device, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, sizes[0], dtype=torch.float64, generator=gen)
    ws = [torch.randn(n, m, dtype=torch.float64, generator=gen) / m**0.5 for m, n in zip(sizes, sizes[1:])]
    bs = [torch.randn(n, dtype=torch.float64, generator=gen) for n in sizes[1:]] if bias else None
    g = torch.randn(*batch, sizes[-1], dtype=torch.float64, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    fused = (cast(x), [cast(w) for w in ws], None if bs is None else [cast(b) for b in bs], g.to(device, dtype))
    return (x, ws, bs, g), fused


def grads_of(y, x, ws, bs, g):
    inputs = [x, *ws, *(bs or [])]
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("save", ["preact", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: "x".join(map(str, b)) or "vector")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("net", NETS)
def test_matches_sequential(backend, net, bias, batch, dtype, save):
    sizes, acts = NETS[net]
    ref_in, (x, ws, bs, g) = make(sizes, batch, dtype, device_of(backend), bias)
    ref_args = [t.clone().requires_grad_() for t in ref_in[0:1]], [t.clone().requires_grad_() for t in ref_in[1]], \
        None if ref_in[2] is None else [t.clone().requires_grad_() for t in ref_in[2]]
    y_ref = reference(ref_args[0][0], ref_args[1], ref_args[2], acts)
    grads_ref = grads_of(y_ref, ref_args[0][0], ref_args[1], ref_args[2], ref_in[3])
    y = mlp(x, ws, bs, acts[:-1], acts[-1], backend=backend, save=save)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_rel_close(y.cpu(), y_ref.detach(), RTOL[dtype], "y")
    for i, (got, want) in enumerate(zip(grads_of(y, x, ws, bs, g), grads_ref)):
        assert_rel_close(got.cpu(), want, RTOL[dtype], f"grad {i}")


@pytest.mark.parametrize("net", ["seed003", "mixed", "wide"])
def test_gradcheck(backend, net):
    sizes, acts = NETS[net]
    _, (x, ws, bs, _) = make(sizes, (3,), torch.float64, device_of(backend), True)
    fn = lambda x, *p: mlp(x, list(p[:len(ws)]), list(p[len(ws):]), acts[:-1], acts[-1], backend=backend)  # noqa: E731
    # The wide net has ~1500 inputs: the slow mode's two forwards per input took 6 minutes on the Triton
    # interpreter. The fast mode checks the Jacobian along random directions instead (its gradients are
    # also compared element by element with nn.Sequential's in test_matches_sequential).
    assert torch.autograd.gradcheck(fn, (x, *ws, *bs), fast_mode=net == "wide")


def test_every_activation(backend):
    for a in ACTIVATIONS:
        (x, ws, bs, g), (xf, wf, bf, gf) = make([4, 6, 3], (5,), torch.float64, device_of(backend), True)
        y = mlp(xf, wf, bf, a, a, backend=backend)
        assert_rel_close(y.cpu(), reference(x, ws, bs, [a, a]), 1e-10, a)


def test_raw_op_raises_on_a_tangent_instead_of_a_zero():
    """functional.mlp carries forward-mode AD (tests/test_higher_order.py); the raw op has no formula."""
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="raw fusedlayers ops do not support forward-mode AD"):
        torch.ops.fusedlayers.mlp(fwAD.make_dual(x, torch.ones_like(x)), [w], [], ["tanh"], True, "native")


@pytest.mark.parametrize("rows, path", [(500, "fused-tiles"), (6000, "wide"), (6000, "layer-by-layer")])
def test_many_rows(rows, path, monkeypatch):
    """Many tiles of the CPU's fused path (16, the last one partial), and a batch large enough to take the
    wide path instead, or the layer-by-layer chain when the wide path's rule is set to refuse it."""
    if path == "layer-by-layer":
        monkeypatch.setenv("FUSEDLAYERS_MLP_WIDE_MAX_MACS", "0")
    sizes, acts = NETS["seed003"]
    (x, ws, bs, g), (xf, wf, bf, gf) = make(sizes, (rows,), torch.float64, "cpu", True)
    chain = {"fusedlayers::dense_forward", "fusedlayers::dense_backward"}
    ran = _fusedlayers_ops_run(lambda: torch.autograd.grad(mlp(xf, wf, bf, acts[:-1], acts[-1]), [xf, *wf, *bf], gf))
    assert (chain <= ran) == (path == "layer-by-layer"), ran
    y = mlp(xf, wf, bf, acts[:-1], acts[-1])
    assert_rel_close(y, reference(x, ws, bs, acts), 1e-10)
    ref = [t.clone().requires_grad_() for t in (x, *ws, *bs)]
    want = grads_of(reference(ref[0], ref[1:5], ref[5:], acts), ref[0], ref[1:5], ref[5:], g)
    for got, w in zip(grads_of(y, xf, wf, bf, gf), want):
        assert_rel_close(got, w, 1e-10)


# ---- the CPU's wide path (csrc/cpu/mlp.cpp: row tiles through every layer, BLAS GEMMs, no intermediate
# materialized whole). Its rule picks networks with few multiply-adds per hidden element;
# FUSEDLAYERS_MLP_WIDE_MAX_MACS set huge sends every float network with a hidden layer there.

WIDE_NETS = {
    "mixed": ([7, 150, 40, 3], ["tanh", "relu", "identity"]),
    "act_out": ([5, 64, 33, 2], ["gelu", "sigmoid", "softplus"]),  # a non-identity last layer
    "seed004": ([1, 1000, 20, 1], ["identity"] * 3),
}


@pytest.fixture
def force_wide(monkeypatch):
    monkeypatch.setenv("FUSEDLAYERS_MLP_WIDE_MAX_MACS", str(2**40))


def _fusedlayers_ops_run(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fusedlayers::")}


@pytest.mark.parametrize("wrt_input", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [(1,), (37,), (1001,), (3, 70)], ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("net", WIDE_NETS)
def test_wide_path_matches_sequential(force_wide, net, bias, batch, dtype, wrt_input):
    """Batches of one row, of a partial tile, of many tiles split over the threads with a partial last one,
    and 2-D; with and without the input's gradient."""
    sizes, acts = WIDE_NETS[net]
    (x, ws, bs, g), (xf, wf, bf, gf) = make(sizes, batch, dtype, "cpu", bias)
    xf.requires_grad_(wrt_input)
    ref = [t.clone().requires_grad_() for t in (x, *ws, *(bs or []))]
    L = len(ws)
    y_ref = reference(ref[0], ref[1:L + 1], ref[L + 1:] or None, acts)
    y = mlp(xf, wf, bf, acts[:-1], acts[-1])
    assert_rel_close(y, y_ref.detach(), RTOL[dtype], "y")
    params, ref_params = [*wf, *(bf or [])], ref[1:]
    inputs, ref_inputs = ([xf] if wrt_input else []) + params, ([ref[0]] if wrt_input else []) + ref_params
    for i, (got, want) in enumerate(zip(grads_of(y, inputs[0], inputs[1:], None, gf),
                                        grads_of(y_ref, ref_inputs[0], ref_inputs[1:], None, g))):
        assert_rel_close(got, want, RTOL[dtype], f"grad {i}")
    assert xf.grad is None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_wide_path_gradcheck(force_wide, bias):
    sizes, acts = [4, 40, 6, 2], ["tanh", "softplus", "identity"]
    _, (x, ws, bs, _) = make(sizes, (11,), torch.float64, "cpu", bias)  # 11 rows: two tiles on two threads
    fn = lambda x, *p: mlp(x, list(p[:3]), list(p[3:]) or None, acts[:-1], acts[-1])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *ws, *(bs or [])))


def test_wide_path_non_contiguous(force_wide):
    new = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    x, ws, bs = new(5, 300).t(), [new(5, 80).t(), new(80, 3).t()], [new(160)[::2], new(6)[::2]]
    args = [t.requires_grad_() for t in (x, *ws, *bs)]
    ref = [t.detach().contiguous().requires_grad_() for t in args]
    y = mlp(args[0], args[1:3], args[3:], "gelu")
    y_ref = reference(ref[0], ref[1:3], ref[3:], ["gelu", "identity"])
    assert_rel_close(y, y_ref, 1e-12)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, args, g), torch.autograd.grad(y_ref, ref, g)):
        assert_rel_close(got, want, 1e-12)


def test_wide_path_opcheck(force_wide):
    sizes, acts = WIDE_NETS["mixed"]
    _, (x, ws, bs, g) = make(sizes, (37,), torch.float64, "cpu", True)
    ops = torch.ops.fusedlayers
    torch.library.opcheck(ops.mlp.default, (x, ws, bs, acts, True, "native"))
    x, ws, bs = x.detach(), [w.detach() for w in ws], [b.detach() for b in bs]
    torch.library.opcheck(ops.mlp_forward.default, (x, ws, bs, acts, False))
    for input_grad in (True, False):
        torch.library.opcheck(ops.mlp_backward.default, (g, x, ws, bs, [], acts, input_grad))


def test_wide_path_taken():
    """seed004's network at 2,000 rows goes through the wide path (no dense kernel runs, so no 2,000 x 1,000
    intermediate exists); a bfloat16 one, and one with many multiply-adds per hidden element, layer by layer."""
    def ops_of(sizes, rows, dtype):
        _, (x, ws, bs, g) = make(sizes, (rows,), dtype, "cpu", True)
        return _fusedlayers_ops_run(lambda: torch.autograd.grad(mlp(x, ws, bs, "identity"), [x, *ws, *bs], g))

    chain = {"fusedlayers::dense_forward", "fusedlayers::dense_backward"}
    assert not chain & ops_of([1, 1000, 20, 1], 2000, torch.float64)
    assert not chain & ops_of([1, 1000, 20, 1], 2000, torch.float32)
    assert chain <= ops_of([1, 1000, 20, 1], 2000, torch.bfloat16)
    assert chain <= ops_of([200, 40, 3], 2000, torch.float64)


def test_bfloat16_close_to_float64():
    sizes, acts = NETS["mixed"]
    (x, ws, bs, g), (xf, wf, bf, gf) = make(sizes, (37,), torch.bfloat16, "cpu", True)
    y = mlp(xf, wf, bf, acts[:-1], acts[-1])
    assert y.dtype == torch.bfloat16
    eager = reference(xf.detach().float(), [w.detach().float() for w in wf], [b.detach().float() for b in bf], acts)
    ref = reference(x, ws, bs, acts)
    # No worse than twice PyTorch's own error when computing from the same bfloat16 parameters in float32.
    assert (y.double() - ref).abs().max() <= 2 * (eager.bfloat16().double() - ref).abs().max()


def test_input_without_grad_gets_none(backend):
    _, (x, ws, bs, g) = make([3, 8, 2], (4,), torch.float64, device_of(backend), True)
    x = x.detach()
    y = mlp(x, ws, bs, "tanh", backend=backend)
    grads = torch.autograd.grad(y, [*ws, *bs], g)
    assert all(t is not None for t in grads)


@pytest.mark.parametrize("save", ["preact", "recompute"])
def test_saved_tensors_as_autograd_keeps_them(backend, save):
    """The node's saved tensors behave as PyTorch's own: a parameter modified in place after the forward makes
    the backward raise, a second backward without retain_graph raises, and one with it gives the same gradients."""
    sizes, acts = NETS["seed003"]
    (x, ws, bs, g), (xf, wf, bf, gf) = make(sizes, (5,), torch.float64, device_of(backend), True)
    y = mlp(xf, wf, bf, acts[:-1], acts[-1], backend=backend, save=save)
    with torch.no_grad():
        wf[1].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads_of(y, xf, wf, bf, gf)
    y = mlp(xf, wf, bf, acts[:-1], acts[-1], backend=backend, save=save)
    first = torch.autograd.grad(y, [xf, *wf, *bf], gf, retain_graph=True)
    second = torch.autograd.grad(y, [xf, *wf, *bf], gf)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y, [xf, *wf, *bf], gf)


@pytest.mark.parametrize("batch", [(0,), (3, 0)])
def test_empty_batch(backend, batch):
    _, (x, ws, bs, _) = make([3, 8, 2], batch, torch.float32, device_of(backend), True)
    y = mlp(x, ws, bs, "silu", backend=backend)
    assert y.shape == (*batch, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in (*ws, *bs))


def test_non_contiguous(backend):
    device = device_of(backend)
    new = lambda *shape: torch.randn(*shape, dtype=torch.float64, device=device)  # noqa: E731
    x, ws, bs = new(7, 5).t(), [new(7, 9).t(), new(9, 6).t()], [new(18)[::2], new(12)[::2]]
    assert not any(t.is_contiguous() for t in (x, *ws, *bs))
    args = [t.requires_grad_() for t in (x, *ws, *bs)]
    ref = [t.detach().contiguous().requires_grad_() for t in args]
    y = mlp(args[0], args[1:3], args[3:], "elu", backend=backend)
    y_ref = reference(ref[0], ref[1:3], ref[3:], ["elu", "identity"])
    assert_rel_close(y, y_ref, 1e-12)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, args, g), torch.autograd.grad(y_ref, ref, g)):
        assert_rel_close(got, want, 1e-12)


# ---- the module ----------------------------------------------------------------------------------------------

def _sequential(sizes, acts, bias=True):
    mods = []
    for (m, n), a in zip(zip(sizes, sizes[1:]), acts):
        mods.append(nn.Linear(m, n, bias=bias))
        if a != "identity":
            mods.append(REFERENCE[a].make_module())
    return nn.Sequential(*mods)


def test_same_init_and_state_dict_values_as_sequential():
    torch.manual_seed(5)
    seq = _sequential([4, 8, 8, 2], ["relu", "relu", "identity"])
    torch.manual_seed(5)
    fused = FusedMLP([4, 8, 8, 2], "relu")
    torch.manual_seed(5)
    per_layer = FusedMLP([4, 8, 8, 2], "relu", flat=False)
    assert [n for n, _ in per_layer.named_parameters()] == ["weight0", "bias0", "weight1", "bias1", "weight2",
                                                            "bias2"]
    assert list(fused.state_dict()) == [n for n, _ in per_layer.named_parameters()]
    for p, q, r in zip(per_layer.parameters(), seq.parameters(), fused.state_dict().values()):
        assert torch.equal(p, q) and torch.equal(r, q)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_from_and_to_sequential(activation):
    seq = _sequential([5, 7, 3], [activation, "identity"]).double()
    fused = FusedMLP.from_sequential(seq)
    assert fused.activations == [activation, "identity"]
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_rel_close(fused(x), seq(x), 1e-12)
    back = fused.to_sequential()
    assert_rel_close(back(x), seq(x), 1e-12)
    assert [type(m) for m in back] == [type(m) for m in seq]


def test_from_sequential_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="LeakyReLU.*no fused equivalent"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="ELU.*no fused equivalent"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.ELU(alpha=0.5)))
    with pytest.raises(ValueError, match="Softplus.*no fused equivalent"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.Softplus(beta=2)))
    with pytest.raises(ValueError, match="Dropout.*no fused equivalent"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.Dropout()))
    with pytest.raises(ValueError, match="module 0 .*not an nn.Linear"):
        FusedMLP.from_sequential(nn.Sequential(nn.ReLU(), nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="all have a bias or all have none"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False)))
    with pytest.raises(ValueError, match="is followed by"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))


def test_cos_module_round_trip():
    seq = nn.Sequential(nn.Linear(3, 4, bias=False), ActivationModule("cos"), nn.Linear(4, 2, bias=False),
                        ActivationModule("cos")).double()
    fused = FusedMLP.from_sequential(seq)
    assert fused.activations == ["cos", "cos"] and fused.bias0 is None
    x = torch.randn(3, dtype=torch.float64)
    assert_rel_close(fused(x), seq(x), 1e-12)


def test_bad_input():
    fused = FusedMLP([4, 8, 2], flat=False)  # the flat layout's messages: test_mlp_flat.py
    with pytest.raises(RuntimeError, match=r"expected weights\[0\].size\(1\) == 5"):
        fused(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"weights\[0\] to have the dtype of x"):
        fused(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="floating-point"):
        mlp(torch.ones(3, 4, dtype=torch.long), [torch.ones(2, 4, dtype=torch.long)], None, "relu")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        FusedMLP([4, 8, 2], activation="swish")
    with pytest.raises(ValueError, match="one activation per hidden layer"):
        FusedMLP([4, 8, 2], activation=["relu", "relu"])
    with pytest.raises(ValueError, match="at least the input and output"):
        FusedMLP([4])
    with pytest.raises(ValueError, match="expected at least one layer, got an empty weights list"):
        mlp(torch.randn(3, 4), [], None, "relu")
    with pytest.raises(RuntimeError, match=r"biases\[1\] of shape \[2\]"):
        mlp(torch.randn(3, 4), [torch.randn(8, 4), torch.randn(2, 8)], [torch.randn(8), torch.randn(3)], "relu")
    with pytest.raises(RuntimeError, match=r"weights\[1\] on the device of x"):
        mlp(torch.randn(3, 4), [torch.randn(8, 4), torch.randn(2, 8, device="meta")], None, "relu")


# ---- torch.library and torch.compile -------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(backend, bias):
    sizes, acts = NETS["mixed"]
    _, (x, ws, bs, g) = make(sizes, (3,), torch.float64, device_of(backend), bias)
    native = "triton" if backend == "triton" else "native"
    prefix = "triton_" if backend == "triton" else ""
    ops = torch.ops.fusedlayers
    torch.library.opcheck(ops.mlp.default, (x, ws, bs or [], acts, True, native))
    # The kernel ops are not differentiable (backpropagating through one raises): check them without grad.
    x, ws, bs = x.detach(), [w.detach() for w in ws], [b.detach() for b in bs or []]
    for save in (True, False):
        torch.library.opcheck(getattr(ops, prefix + "mlp_forward").default, (x, ws, bs, acts, save))
        _, saved = getattr(ops, prefix + "mlp_forward")(x, ws, bs, acts, save)
        for input_grad in (True, False):
            torch.library.opcheck(getattr(ops, prefix + "mlp_backward").default,
                                  (g, x, ws, bs, saved, acts, input_grad))


@pytest.mark.parametrize("net", ["seed003", "wide"])
def test_compile_fullgraph(backend, net):
    torch._dynamo.reset()
    device = device_of(backend)
    sizes, acts = NETS[net]
    torch.manual_seed(0)
    model = FusedMLP(sizes, acts[:-1], acts[-1], backend=backend, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(5, sizes[0], device=device, requires_grad=True)
    y, y_ref = compiled(x), model(x)
    assert_rel_close(y, y_ref, 1e-6)
    params = [x, *model.parameters()]
    for got, want in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(y_ref.square().sum(), params)):
        assert_rel_close(got, want, 1e-5)


def test_jit_trace():
    model = FusedMLP([3, 8, 2], activation="tanh")
    x = torch.randn(4, 3)
    # the op's list of activation names cannot be recorded: under the tracer the layers run as dense ops
    traced = torch.jit.trace(model, (x,))
    assert "fusedlayers::dense" in str(traced.graph)
    x2 = torch.randn(6, 3)
    assert_rel_close(traced(x2), model(x2), 1e-6)


@pytest.mark.parametrize("sizes", [[8, 8, 8], [1, 32, 32, 1]])
def test_float32_bias_gradients_over_many_rows_as_accurate_as_torch(backend, sizes):
    """Bias gradients sum over the rows: over 32768 rows whose upstream gradients share a sign, the CPU's running
    float32 sums were up to 50x less accurate than torch's cascade sum; now at most 2x torch's error against
    float64, + 4 eps."""
    gen = torch.Generator().manual_seed(1)
    rows = 32768 if device_of(backend) != "cpu" or backend == "cpu" else 2048  # the Triton interpreter is slow
    x = torch.randn(rows, sizes[0], dtype=torch.float64, generator=gen)
    params = [torch.randn(o, i, dtype=torch.float64, generator=gen) / i**0.5 for i, o in zip(sizes, sizes[1:])]
    params += [torch.randn(o, dtype=torch.float64, generator=gen) for o in sizes[1:]]
    g = torch.randn(rows, sizes[-1], dtype=torch.float64, generator=gen) + 1.0
    layers = len(sizes) - 1

    def grads(dtype, net):
        ps = [p.to(dtype).requires_grad_() for p in params]
        return torch.autograd.grad(net(x.to(dtype), ps[:layers], ps[layers:]), ps, g.to(dtype))

    def eager(x, ws, bs):
        for w, b in zip(ws, bs):
            x = torch.tanh(F.linear(x, w, b))
        return x

    device = device_of(backend)
    want, torch32 = grads(torch.float64, eager), grads(torch.float32, eager)
    got = grads(torch.float32, lambda x, ws, bs: mlp(x.to(device), [w.to(device) for w in ws],
                                                     [b.to(device) for b in bs], "tanh", "tanh", backend=backend))
    for name, a, t, r in zip([f"dW{i}" for i in range(layers)] + [f"db{i}" for i in range(layers)], got, torch32, want):
        err, torch_err = (a.cpu().double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps * r.abs().max().item(), (name, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_infinities_in_the_sums_over_rows_as_torch(backend, dtype):
    """Over rows spread across tiles (39: a full tile and a partial one), NaN and inf in the parameter gradients
    where plain PyTorch in the same dtype has them and nowhere else: an inf weight (sigmoid' of +-inf is 0, so
    dW is 0; a zero-padded row of the partial tile made it 0 * sigmoid'(inf * 0) = NaN), and an inf upstream
    gradient in one row (db is inf; the compensated sum made the next tile's inf - inf a NaN)."""
    device = device_of(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(39, 2, dtype=dtype, generator=gen) + 0.5
    w0 = torch.randn(3, 2, dtype=dtype, generator=gen)
    w0[1, 0] = float("inf")
    w1, b0, b1 = (torch.randn(*s, dtype=dtype, generator=gen) for s in ((1, 3), (3,), (1,)))
    g = torch.randn(39, 1, dtype=dtype, generator=gen)
    g_inf = g.clone()
    g_inf[0] = float("inf")
    for what, up in (("an inf weight", g), ("an inf upstream gradient", g_inf)):
        ps = [p.clone().requires_grad_() for p in (w0, w1, b0, b1)]
        want = torch.autograd.grad(torch.sigmoid(F.linear(torch.sigmoid(F.linear(x, ps[0], ps[2])), ps[1], ps[3])),
                                   ps, up)
        fs = [p.to(device).requires_grad_() for p in (w0, w1, b0, b1)]
        got = torch.autograd.grad(mlp(x.to(device), fs[:2], fs[2:], "sigmoid", "sigmoid", backend=backend), fs,
                                  up.to(device))
        for name, a, r in zip(("dW0", "dW1", "db0", "db1"), got, want):
            a = a.cpu()
            msg = f"{what}: {name} {a.tolist()} vs torch {r.tolist()}"
            assert torch.equal(a.isnan(), r.isnan()) and torch.equal(a.isinf(), r.isinf()), msg
            fin = r.isfinite()
            assert torch.allclose(a[fin], r[fin], rtol=1e-4, atol=1e-6), msg


@pytest.mark.parametrize("make", [lambda: FusedMLP([3, 8, 8, 2], activation="tanh"),
                                  lambda: fusedlayers.fuse(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8),
                                                                         nn.Tanh(), nn.Linear(8, 2)))],
                         ids=["FusedMLP", "fuse"])
def test_export_keeps_a_dynamic_batch(make):
    """torch.export with a dynamic batch dimension: the op's argument checks read x.size(-1), which on a tensor
    of symbolic shape materializes every size and so specialized the batch to the example's (an error with a
    named Dim, a silently static graph with Dim.AUTO)."""
    model = make()
    ep = torch.export.export(model, (torch.randn(5, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert "fusedlayers." in str(ep.graph)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 3)
        assert_rel_close(ep.module()(x), model(x), 1e-6)


@pytest.mark.parametrize("sizes,rows,recomputes", [([3, 10, 10, 2], 4, True), ([1, 1000, 20, 1], 3000, True),
                                                   ([64, 256, 256, 8], 300, False)],
                         ids=["fused-tiles", "wide", "chain"])
def test_cpu_paths_that_recompute_save_only_the_inputs(sizes, rows, recomputes):
    # The CPU's fused tiles and wide path recompute the forward in their backward, and csrc/cpu/mlp.cpp registers
    # that (register_mlp_recomputes): the autograd then saves x and the parameters only. The chain saves the
    # hidden layers' inputs and pre-activations.
    net = FusedMLP(sizes, activation="tanh")
    x = torch.randn(rows, sizes[0], requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        net(x)
    inputs = [x.shape] + [p.shape for p in net.parameters()]
    assert (sorted(packed) == sorted(inputs)) is recomputes, packed
