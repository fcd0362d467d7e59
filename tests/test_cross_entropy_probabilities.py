"""cross_entropy with class-probability targets (mixup, distillation) on every backend, against
F.cross_entropy in float64: values, the gradients w.r.t. the logits and the target, every order, torch.func,
torch.compile and the nn.CrossEntropyLoss drop-in."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedlayers import FusedCrossEntropyLoss
from fusedlayers.functional import cross_entropy

from conftest import assert_rel_close, device_of

F64 = torch.float64
RTOL = {F64: 1e-10, torch.float32: 1e-5}
LAYOUTS = {"C": (7,), "NC": (5, 7), "NCd": (3, 7, 4), "NCdd": (2, 7, 3, 2)}


def probabilities(shape, seed, class_dim):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, dtype=F64, generator=gen).softmax(class_dim)


def case(layout, seed=0, weight=False):
    shape = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=F64, generator=gen) * 3
    t = probabilities(shape, seed + 1, 0 if len(shape) == 1 else 1)
    w = torch.rand(shape[0] if len(shape) == 1 else shape[1], dtype=F64, generator=gen) + 0.5 if weight else None
    return x, t, w


def grads_of(loss, inputs, g):
    return torch.autograd.grad(loss, inputs, g)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weight", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_f_cross_entropy(backend, layout, reduction, weight, label_smoothing, dtype):
    """Loss, lse and the gradients w.r.t. logits and target, for an upstream gradient of each output."""
    dev = device_of(backend)
    x, t, w = case(layout, weight=weight)
    xr, tr = x.clone().requires_grad_(), t.clone().requires_grad_()
    ref = F.cross_entropy(xr, tr, w, reduction=reduction, label_smoothing=label_smoothing)
    class_dim = 0 if x.dim() == 1 else 1
    lse_ref = xr.logsumexp(class_dim)
    gen = torch.Generator().manual_seed(3)
    g, g_lse = torch.randn(ref.shape, dtype=F64, generator=gen), torch.randn(lse_ref.shape, dtype=F64, generator=gen)
    want = grads_of([ref, lse_ref], [xr, tr], [g, g_lse])
    xf, tf = x.to(dev, dtype).requires_grad_(), t.to(dev, dtype).requires_grad_()
    loss, lse = cross_entropy(xf, tf, None if w is None else w.to(dev, dtype), reduction=reduction,
                              label_smoothing=label_smoothing, return_lse=True, backend=backend)
    assert loss.dtype == dtype and loss.shape == ref.shape and lse.shape == lse_ref.shape
    assert_rel_close(loss.detach().cpu().double(), ref.detach(), RTOL[dtype], "loss")
    assert_rel_close(lse.detach().cpu().double(), lse_ref.detach(), RTOL[dtype], "lse")
    got = grads_of([loss, lse], [xf, tf], [g.to(dev, dtype), g_lse.to(dev, dtype)])
    for name, a, b in zip(("dlogits", "dtarget"), got, want):
        assert_rel_close(a.cpu().double(), b, RTOL[dtype], name)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_every_order(backend, label_smoothing):
    """gradcheck and gradgradcheck in logits and target together (the backward is differentiable again)."""
    dev = device_of(backend)
    x, t, w = case("NC", seed=4, weight=True)
    x, t, w = x.to(dev).requires_grad_(), t.to(dev).requires_grad_(), w.to(dev)

    def fn(x, t):
        loss, lse = cross_entropy(x, t, w, reduction="none", label_smoothing=label_smoothing, return_lse=True,
                                  backend=backend)
        return loss, lse

    assert torch.autograd.gradcheck(fn, (x, t))
    assert torch.autograd.gradgradcheck(fn, (x, t))


def test_torch_func(backend):
    """grad, jacrev/jacfwd and vmap of the loss, against the same transforms of F.cross_entropy."""
    dev = device_of(backend)
    x, t, w = case("NC", seed=5, weight=True)
    x, t, w = x.to(dev), t.to(dev), w.to(dev)
    fused = lambda x, t: cross_entropy(x, t, w, label_smoothing=0.1, backend=backend)  # noqa: E731
    plain = lambda x, t: F.cross_entropy(x, t, w, label_smoothing=0.1)  # noqa: E731
    for transform in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd):
        for argnums in (0, 1, (0, 1)):
            got = transform(fused, argnums=argnums)(x, t)
            want = transform(plain, argnums=argnums)(x, t)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert_rel_close(a.cpu(), b.cpu(), 1e-10, f"{transform.__name__} {argnums}")
    xs, ts = torch.stack([x, x.flip(0)]), torch.stack([t, t.flip(1)])
    assert_rel_close(torch.func.vmap(fused)(xs, ts).cpu(), torch.func.vmap(plain)(xs, ts).cpu(), 1e-10, "vmap")


def test_compile(backend):
    dev = device_of(backend)
    x, t, w = case("NCd", seed=6, weight=True)
    xf, tf = x.to(dev).float().requires_grad_(), t.to(dev).float()
    compiled = torch.compile(lambda x: cross_entropy(x, tf, w.to(dev).float(), label_smoothing=0.1, backend=backend),
                             backend="aot_eager", fullgraph=True)
    loss = compiled(xf)
    loss.backward()
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, w, label_smoothing=0.1)
    ref.backward()
    assert_rel_close(loss.detach().cpu().double(), ref.detach(), 1e-5, "loss")
    assert_rel_close(xf.grad.cpu().double(), xr.grad, 1e-5, "grad")


def test_module_as_nn_cross_entropy_loss_with_mixup(backend):
    """The training code of mixup: nn.CrossEntropyLoss on mixed one-hot targets works unchanged after the swap."""
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 10, dtype=F64, generator=gen)
    y1, y2 = torch.randint(0, 10, (6,), generator=gen), torch.randint(0, 10, (6,), generator=gen)
    t = 0.7 * F.one_hot(y1, 10).double() + 0.3 * F.one_hot(y2, 10).double()
    for kw in (dict(), dict(label_smoothing=0.1), dict(reduction="sum")):
        xr = x.clone().requires_grad_()
        nn.CrossEntropyLoss(**kw)(xr, t).backward()
        xf = x.to(dev, copy=True).requires_grad_()
        FusedCrossEntropyLoss(backend=backend, **kw)(xf, t.to(dev)).backward()
        assert_rel_close(xf.grad.cpu(), xr.grad, 1e-10, str(kw))


def test_large_logit_offsets_as_accurate_as_torch(backend):
    """float32 logits near 1e4: the loss and gradient errors against float64 stay within 2x PyTorch's own."""
    dev = device_of(backend)
    x, t, _ = case("NC", seed=8)
    x = x + 1e4
    ref_x = x.clone().requires_grad_()
    ref = F.cross_entropy(ref_x, t, reduction="sum")
    (ref_g,) = torch.autograd.grad(ref, ref_x)
    x32 = x.float().requires_grad_()
    torch_loss = F.cross_entropy(x32, t.float(), reduction="sum")
    (torch_g,) = torch.autograd.grad(torch_loss, x32)
    xf = x.float().to(dev).requires_grad_()
    loss = cross_entropy(xf, t.float().to(dev), reduction="sum", backend=backend)
    (g,) = torch.autograd.grad(loss, xf)
    for name, ours, theirs, want in (("loss", loss, torch_loss, ref), ("grad", g, torch_g, ref_g)):
        err = (ours.detach().cpu().double() - want.detach()).abs().max().item()
        err_torch = (theirs.detach().double() - want.detach()).abs().max().item()
        assert err <= 2 * err_torch + 4 * torch.finfo(torch.float32).eps * want.abs().max().item(), (name, err, err_torch)


def test_confident_weighted_row_as_accurate_as_float64(backend):
    """A weighted target whose mass sits on the class of p = 1: its gradient Q p - q is the other classes' small
    mass, where Q's and q's own roundings took over (6.5e-7 off at 8.3e-3, 15x PyTorch's error, found by the
    property-based suite). Now within a few float32 ulps of the float64 value."""
    dev = device_of(backend)
    x = torch.tensor([[1e30, -0.8802866936, -6.5363683701]])
    t = torch.tensor([[89.0, 0.0266924091, 0.0061677257]])
    w = torch.tensor([0.3606154919, 0.7524403334, 0.1549627185])
    ref_x = x.double().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(ref_x, t.double(), weight=w.double()) * 0.3922968209, ref_x)
    xf = x.to(dev).requires_grad_()
    (got,) = torch.autograd.grad(cross_entropy(xf, t.to(dev), weight=w.to(dev), backend=backend) * 0.3922968209, xf)
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= 4 * torch.finfo(torch.float32).eps * want.abs().max().item(), err


def test_confident_row_max_as_accurate_as_float64(backend):
    """p = 1 - 1.2e-4 at the row's maximum: Q p - q there is 9e-4, and 1 ulp of p is 6e-8 (PyTorch's float32
    error is 3e-6 relative). The fused gradient there takes 1 - p as the other classes' p summed: within a few
    float32 ulps of the float64 value, relative to itself."""
    dev = device_of(backend)
    x, t = torch.tensor([[10.0, 0.3, 0.2]]), torch.tensor([[0.999, 0.0006, 0.0004]])
    ref_x = x.double().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy(ref_x, t.double()), ref_x)
    xf = x.to(dev).requires_grad_()
    (got,) = torch.autograd.grad(cross_entropy(xf, t.to(dev), backend=backend), xf)
    err = (got[0, 0].cpu().double() - want[0, 0]).abs().item()
    assert err <= 8 * torch.finfo(torch.float32).eps * want[0, 0].abs().item(), err


def test_dtypes_promote_and_empty_inputs_as_torch(backend):
    """A float64 target with float32 logits gives a float64 loss, as F.cross_entropy's promotion, computed in
    float64 throughout (PyTorch's log_softmax runs in float32 first); a "mean" over no logits is nan and a sum 0,
    as PyTorch's."""
    dev = device_of(backend)
    x, t, _ = case("NC", seed=9)
    loss = cross_entropy(x.float().to(dev), t.to(dev), backend=backend)
    assert loss.dtype == F.cross_entropy(x.float(), t).dtype == F64
    assert_rel_close(loss.cpu(), F.cross_entropy(x.float().double(), t), 1e-10, "promoted")
    for shape in ((0, 7), (4, 0)):
        for reduction in ("mean", "sum", "none"):
            z, p = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)
            ref = F.cross_entropy(z, p, reduction=reduction)
            got = cross_entropy(z.to(dev), p.to(dev), reduction=reduction, backend=backend).cpu()
            assert got.shape == ref.shape and torch.equal(got.isnan(), ref.isnan()), (shape, reduction)
            assert torch.equal(got.nan_to_num(), ref.nan_to_num().abs()), (shape, reduction)


def test_one_class_with_a_huge_target_has_a_zero_gradient(backend):
    """One class: p = 1, so the gradient g (Q p - q) is 0 for any target; g Q p - g q, contracted into an FMA,
    left the rounding of g q (3.5e22 at a target of 1e30, found by the property-based suite)."""
    dev = device_of(backend)
    x = torch.tensor([[4.623]], device=dev, requires_grad=True)
    loss = cross_entropy(x, torch.tensor([[1e30]], device=dev), backend=backend)
    (g,) = torch.autograd.grad(loss, x, torch.tensor(1.541, device=dev))
    assert torch.equal(g.cpu(), torch.zeros(1, 1))


def test_target_gradient_of_a_zero_weight_is_zero_where_log_softmax_is_huge(backend):
    """d loss / d target = -(1 - eps) g w log_softmax: g w first, as PyTorch forms it, so a zero class weight
    gives 0 where g log_softmax overflows float32 (a logit of 3e38; found by the property-based suite)."""
    dev = device_of(backend)
    x = torch.tensor([[3e38, -0.88, -6.5]], device=dev)
    t = torch.tensor([[0.97, 0.025, 0.005]], device=dev, requires_grad=True)
    loss = cross_entropy(x, t, torch.zeros(3, device=dev), backend=backend)
    (g,) = torch.autograd.grad(loss, t, torch.tensor(1.541, device=dev))
    assert torch.equal(g.cpu(), torch.zeros(1, 3))


# ---- PyTorch's own samples ---------------------------------------------------------------------------------------

def _on(dev, values):
    """Leaf copies on dev of the tensors among values (requires_grad kept); others as they are."""
    return [v.detach().to(dev).requires_grad_(v.requires_grad) if torch.is_tensor(v) else v for v in values]


def _compare(call, fused, plain, args, what):
    """call(fused, args on the backend's device) against call(plain, args): the loss and its gradients w.r.t.
    every leaf that requires grad, or the same error type."""
    try:
        want = call(plain, args)
    except Exception as e:  # noqa: BLE001 (its type is what the fused call must raise)
        with pytest.raises(type(e)):
            call(fused, _on(DEVICE[0], args))
        return "raised"
    ours = _on(DEVICE[0], args)
    got = call(fused, ours)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert_rel_close(got.detach().cpu(), want.detach(), 1e-10, what)
    pairs = [(a, b) for a, b in zip(ours, args) if torch.is_tensor(b) and b.requires_grad]
    if pairs and want.requires_grad:
        g = torch.rand(want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(0)) + 0.5
        got_g = torch.autograd.grad(got, [a for a, _ in pairs], g.to(got.device))
        for a, b in zip(got_g, torch.autograd.grad(want, [b for _, b in pairs], g)):
            assert_rel_close(a.cpu(), b, 1e-10, f"{what}: gradient")
    return "matched"


DEVICE = ["cpu"]  # the backend's device, set by each test


def test_pytorch_module_info_samples(backend):
    """Every nn.CrossEntropyLoss sample of PyTorch's ModuleInfo database (common_modules; index and probability
    targets, weights, ignore_index, label smoothing, reductions, layouts): FusedCrossEntropyLoss built with the same
    arguments gives the same loss and gradients, or raises what nn.CrossEntropyLoss raises."""
    from torch.testing._internal.common_modules import module_db

    DEVICE[0] = device_of(backend)
    (info,) = [m for m in module_db if m.module_cls is nn.CrossEntropyLoss]
    samples = info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=True)
    outcomes = []
    for s in samples:
        c, f = s.constructor_input, s.forward_input
        weight = c.kwargs.get("weight")

        def call(cls, args, c=c, f=f, weight=weight):
            kw = dict(c.kwargs, **({} if cls is nn.CrossEntropyLoss else dict(backend=backend)))
            if weight is not None:
                kw["weight"] = weight.to(args[0].device)
            return cls(*c.args, **kw)(*args, **f.kwargs)

        outcomes.append(_compare(call, FusedCrossEntropyLoss, nn.CrossEntropyLoss, list(f.args),
                                 getattr(s, "desc", "")))
    assert len(outcomes) == 105 and outcomes.count("matched") == 105, outcomes


def test_pytorch_op_info_samples(backend):
    """Every F.cross_entropy sample of PyTorch's OpInfo database (common_methods_invocations)."""
    from torch.testing._internal.common_methods_invocations import op_db

    DEVICE[0] = device_of(backend)
    (info,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    outcomes = []
    for s in info.sample_inputs("cpu", F64, requires_grad=True):
        kw = {k: v for k, v in s.kwargs.items() if k != "weight"}

        def call(fn, args, s=s, kw=kw):
            weight = s.kwargs.get("weight")
            extra = {} if fn is F.cross_entropy else dict(backend=backend)
            if weight is not None:
                extra["weight"] = weight.to(args[0].device)
            return fn(*args, **kw, **extra)

        outcomes.append(_compare(call, cross_entropy, F.cross_entropy, [s.input, *s.args], str(s.kwargs)))
    assert outcomes and outcomes.count("matched") == len(outcomes), outcomes
