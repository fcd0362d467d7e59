"""The dense op family (functional.dense, FusedDense, the torch.library ops) on every runnable backend,
against plain PyTorch in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlayers
from fusedlayers import FusedDense
from fusedlayers.activations import ACTIVATIONS, REFERENCE
from fusedlayers.functional import dense

from conftest import BACKENDS, assert_rel_close, device_of

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (batch shape, in, out): ranks 1, 2 and 3; on the CPU the first two take the plain-loop path and the
# last ATen's GEMM (more than 16384 multiply-adds).
SHAPES = {1: ((), 13, 7), 2: ((9,), 13, 7), 3: ((2, 35), 45, 37)}


def make_inputs(batch, n_in, n_out, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n_in, dtype=torch.float64, generator=gen)
    w = torch.randn(n_out, n_in, dtype=torch.float64, generator=gen) / n_in**0.5
    b = torch.randn(n_out, dtype=torch.float64, generator=gen) if bias else None
    g = torch.randn(*batch, n_out, dtype=torch.float64, generator=gen)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return (x, w, b, g), (cast(x), cast(w), cast(b), g.to(device=device, dtype=dtype))


def reference(x, w, b, g, activation):
    """Output and gradients of nn.Linear + the activation in float64."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = REFERENCE[activation].f(F.linear(x, w, b))
    inputs = [t for t in (x, w, b) if t is not None]
    return y.detach(), torch.autograd.grad(y, inputs, g)


def check_against_reference(backend, activation, bias, rank, dtype, save="preact"):
    batch, n_in, n_out = SHAPES[rank]
    (x, w, b, g), (xf, wf, bf, gf) = make_inputs(batch, n_in, n_out, dtype, device_of(backend), bias)
    y_ref, grads_ref = reference(x, w, b, g, activation)
    y = dense(xf, wf, bf, activation, backend=backend, save=save)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_rel_close(y.cpu(), y_ref, RTOL[dtype], "y")
    grads = torch.autograd.grad(y, [t for t in (xf, wf, bf) if t is not None], gf)
    for name, got, want in zip(("dx", "dW", "db"), grads, grads_ref):
        assert_rel_close(got.cpu(), want, RTOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_linear_plus_activation(backend, activation, bias, rank, dtype):
    check_against_reference(backend, activation, bias, rank, dtype)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("activation", ["gelu", "tanh", "identity"])
def test_recompute_policy(backend, activation, rank):
    check_against_reference(backend, activation, True, rank, torch.float64, save="recompute")


@pytest.mark.parametrize("save", ["preact", "recompute"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(backend, activation, save):
    _, (x, w, b, _) = make_inputs((3,), 4, 5, torch.float64, device_of(backend))
    assert torch.autograd.gradcheck(lambda *a: dense(*a, activation=activation, backend=backend, save=save), (x, w, b))


def test_bfloat16_error_within_twice_pytorchs(backend):
    if backend == "triton" and device_of(backend) == "cpu":
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 Triton is for GPUs")
    (x, w, b, g), (xf, wf, bf, gf) = make_inputs((2, 35), 45, 37, torch.bfloat16, device_of(backend))
    y_ref, grads_ref = reference(x, w, b, g, "gelu")
    eager = [t.detach().clone().requires_grad_() for t in (xf, wf, bf)]
    y_eager = F.gelu(F.linear(*eager))
    grads_eager = torch.autograd.grad(y_eager, eager, gf)
    y = dense(xf, wf, bf, "gelu", backend=backend)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, (xf, wf, bf), gf)
    for got, ours, want in zip((y, *grads), (y_eager, *grads_eager), (y_ref, *grads_ref)):
        err = (got.double().cpu() - want).abs().max()
        eager_err = (ours.double().cpu() - want).abs().max()
        assert err <= 2 * eager_err


@pytest.mark.parametrize("activation", ["tanh", "silu"])
def test_bfloat16_cpu_large_bias_error_within_twice_pytorchs(activation):
    """Enough work for the CPU's GEMM path, and a bias as large as x @ weight.T: a bfloat16 GEMM rounds its
    result, so adding the bias after it doubled the error of eager's addmm (which adds it before rounding).
    The reference is the exact float64 function of the same bfloat16 inputs: only the op's own error counts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 24, generator=gen).bfloat16()
    w = (torch.randn(24, 24, generator=gen) / 24**0.5).bfloat16()
    b = (3 * torch.randn(24, generator=gen)).bfloat16()
    want = REFERENCE[activation].f(F.linear(x.double(), w.double(), b.double()))
    eager = REFERENCE[activation].f(F.linear(x, w, b))
    got = dense(x, w, b, activation, backend="cpu")
    assert (got.double() - want).abs().max() <= 2 * (eager.double() - want).abs().max()


def test_many_threads():
    """Enough rows that the CPU's elementwise passes split across threads and add up their bias gradients."""
    (x, w, b, g), (xf, wf, bf, gf) = make_inputs((3000,), 8, 37, torch.float64, "cpu")
    y_ref, grads_ref = reference(x, w, b, g, "gelu")
    y = dense(xf, wf, bf, "gelu")
    assert_rel_close(y, y_ref, 1e-10)
    for got, want in zip(torch.autograd.grad(y, (xf, wf, bf), gf), grads_ref):
        assert_rel_close(got, want, 1e-10)


def test_raw_op_raises_on_a_tangent_instead_of_a_zero():
    """functional.dense carries forward-mode AD (tests/test_higher_order.py); the raw op has no formula."""
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(3, 5), torch.randn(4, 5)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="raw fusedlayers ops do not support forward-mode AD"):
        torch.ops.fusedlayers.dense(x, fwAD.make_dual(w, torch.ones_like(w)), None, "tanh", True, "native")


def test_non_contiguous_inputs(backend):
    device = device_of(backend)
    x = torch.randn(13, 10, dtype=torch.float64, device=device).t()  # (10, 13), not contiguous
    w = torch.randn(13, 7, dtype=torch.float64, device=device).t()
    b = torch.randn(14, dtype=torch.float64, device=device)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    args = [t.requires_grad_() for t in (x, w, b)]
    ref = [t.detach().contiguous().requires_grad_() for t in (x, w, b)]
    y, y_ref = dense(*args, "silu", backend=backend), F.silu(F.linear(*ref))
    assert_rel_close(y, y_ref, 1e-12)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, args, g), torch.autograd.grad(y_ref, ref, g)):
        assert_rel_close(got, want, 1e-12)


@pytest.mark.parametrize("batch", [(0,), (3, 0)])
def test_empty_batch(backend, batch):
    device = device_of(backend)
    x = torch.randn(*batch, 6, device=device, requires_grad=True)
    w = torch.randn(4, 6, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    y = dense(x, w, b, "tanh", backend=backend)
    assert y.shape == (*batch, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_zero_in_features(backend):
    device = device_of(backend)
    x = torch.randn(3, 0, device=device, requires_grad=True)
    w = torch.randn(4, 0, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    y = dense(x, w, b, "sigmoid", backend=backend)
    assert_rel_close(y, torch.sigmoid(b).expand(3, 4), 1e-6)
    y.sum().backward()
    assert_rel_close(b.grad, 3 * torch.sigmoid(b) * (1 - torch.sigmoid(b)), 1e-5)


def test_nan_propagates(backend):
    device = device_of(backend)
    x = torch.tensor([[float("nan"), 1.0], [1.0, 2.0]], device=device)
    w = torch.randn(3, 2, device=device)
    for activation in ("relu", "leaky_relu", "softplus", "selu", "elu"):
        y = dense(x, w, None, activation, backend=backend)
        assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all(), activation


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_relu_masks_a_nonfinite_upstream_gradient_as_torch(backend, rank):
    """relu's backward selects (torch's threshold_backward): an inf or nan upstream gradient where z <= 0 gives 0
    there, where g * f'(z) gave nan in every gradient it reached. Both paths: the plain loops and the GEMM's."""
    batch, n_in, n_out = SHAPES[rank]
    _, (x, w, b, g) = make_inputs(batch, n_in, n_out, torch.float32, device_of(backend))
    z = F.linear(x, w, b).detach()
    g = torch.where(z <= 0, torch.tensor([float("nan"), float("inf")], device=g.device).repeat(n_out)[:n_out], g)
    assert (z <= 0).any() and (z > 0).any()
    want = torch.autograd.grad(F.relu(F.linear(x, w, b)), (x, w, b), g)
    got = torch.autograd.grad(dense(x, w, b, "relu", backend=backend), (x, w, b), g)
    for name, a, e in zip(("dx", "dW", "db"), got, want):
        assert a.isfinite().all(), name
        assert_rel_close(a.cpu().double(), e.cpu().double(), 1e-5, name)


@pytest.mark.parametrize("rows", [1, 40])
def test_softplus_derivative_keeps_subnormals_as_torch(backend, rows):
    """softplus' = e / (1 + e) as torch's softplus_backward: 1 / (1 + e^-z) was 0 for float32 z in
    [-103, -88], where e^z is subnormal and torch's f' is not 0 (an infinite upstream then gave NaN, not inf)."""
    device = device_of(backend)
    z = torch.tensor([-99.67, -95.0, -89.0, -103.0], device=device).repeat(rows).unsqueeze(1)
    w = torch.ones(1, 1, device=device)
    for g in (torch.full_like(z, 1e30), torch.full_like(z, float("inf"))):
        x = z.clone().requires_grad_()
        xr = z.clone().requires_grad_()
        (got,) = torch.autograd.grad(dense(x, w, None, "softplus", backend=backend), x, g)
        (want,) = torch.autograd.grad(F.softplus(xr), xr, g)
        assert (want != 0).all()
        assert torch.equal(got.isinf(), want.isinf()) and not got.isnan().any()
        finite = want.isfinite()
        assert_rel_close(got[finite].cpu().double(), want[finite].cpu().double(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rows", [4096, 1000], ids=["vector_path", "small_path"])
def test_gelu_keeps_its_relative_accuracy_in_the_negative_tail(backend, dtype, rows):
    """gelu(z) = z erfc(-z / sqrt 2) / 2 to a few ulp down to where it underflows: 1 + erf cancels there (Triton's
    float64 gelu(-3.3) was 3.5x torch's error, gelu(-10) all digits lost), and a fast erfc must keep exp(-x^2)'s
    x^2 exact. Against torch's float64 erfc at the argument as the dtype rounds it."""
    device = device_of(backend)
    lo = -37.0 if dtype == torch.float64 else -13.0
    z = torch.linspace(lo, -0.1, rows, dtype=dtype)
    y = dense(z.unsqueeze(1).to(device), torch.ones(1, 1, dtype=dtype, device=device), None, "gelu",
              backend=backend).squeeze(1).cpu().double()
    arg = (z * -0.70710678118654752440).double()  # rounded to the dtype, as the kernels round it
    want = z.double() * 0.5 * torch.special.erfc(arg)
    normal = want.abs() > torch.finfo(dtype).tiny
    rel = ((y - want).abs() / want.abs())[normal].max().item()
    assert rel <= 16 * torch.finfo(dtype).eps, f"max relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gelu_near_zero_as_accurate_as_torch(backend, dtype):
    """Around z = 0 (erfc's argument within +-0.5) gelu is within twice PyTorch's own error of float64 (erfc as the
    tail's series there was 2.7x in float32 on Triton: the review)."""
    device = device_of(backend)
    z = torch.linspace(-0.7, 0.7, 20001, dtype=dtype)
    z = z[z != 0]
    y = dense(z.unsqueeze(1).to(device), torch.ones(1, 1, dtype=dtype, device=device), None, "gelu",
              backend=backend).squeeze(1).cpu().double()
    zd = z.double()
    want = zd * 0.5 * torch.special.erfc(zd * -0.70710678118654752440)
    rel = lambda v: ((v.double() - want).abs() / want.abs()).max().item()  # noqa: E731
    assert rel(y) <= 2 * rel(F.gelu(z)), f"{rel(y) / torch.finfo(dtype).eps:.2f} eps vs torch's " \
                                          f"{rel(F.gelu(z)) / torch.finfo(dtype).eps:.2f}"


@pytest.mark.parametrize("shape", [(32768, 8, 8), (1000, 1, 1)], ids=["gemm_path", "small_path"])
def test_float32_parameter_gradients_over_many_rows_as_accurate_as_torch(backend, shape):
    """The weight and bias gradients sum over the rows: over 32768 rows a running float32 sum was 4-6x less
    accurate than torch's own (cascade) sum, and so over 1000 rows on the CPU's small-layer path (one element per
    row); now each is at most 2x torch's error against float64, + 4 eps."""
    rows, n_in, n_out = shape
    if device_of(backend) == "cpu" and backend != "cpu":
        rows = min(rows, 4096)  # the Triton interpreter is slow
    (x, w, b, g), (xf, wf, bf, gf) = make_inputs((rows,), n_in, n_out, torch.float32, device_of(backend), seed=1)
    g = g + 1.0  # a common offset: the running sum grows, and with it its rounding
    if n_in == 1:  # near-constant terms, whose running sums round the same way row after row
        x, g = x * 0.01, 0.1 + 0.001 * g
        xf = x.to(xf).requires_grad_()
    gf = g.to(gf)
    _, (_, dw_ref, db_ref) = reference(x, w, b, g, "tanh")
    eager = [t.detach().clone().requires_grad_() for t in (xf, wf, bf)]
    torch_grads = torch.autograd.grad(torch.tanh(F.linear(*eager)), eager[1:], gf)
    grads = torch.autograd.grad(dense(xf, wf, bf, "tanh", backend=backend), [wf, bf], gf)
    for name, got, want, ref in zip(("dW", "db"), grads, torch_grads, (dw_ref, db_ref)):
        err, torch_err = ((t.cpu().double() - ref).abs().max().item() for t in (got, want))
        bound = 2 * torch_err + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item()
        assert err <= bound, (name, err, torch_err)


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (torch.randn(3, 5), torch.randn(4, 6), None), RuntimeError, r"x.size\(-1\) == weight.size\(1\)"),
        (lambda: (torch.randn(3, 6), torch.randn(4, 6, dtype=torch.float64), None), RuntimeError,
         "weight to have the dtype of x"),
        (lambda: (torch.randn(3, 6), torch.randn(4, 6), torch.randn(5)), RuntimeError, r"bias of shape \[4\]"),
        (lambda: (torch.randn(3, 6), torch.randn(4, 6), torch.randn(4, dtype=torch.float64)), RuntimeError,
         "bias to have the dtype of x"),
        (lambda: (torch.ones(3, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.long), None), RuntimeError,
         "x to be a floating-point tensor"),
        (lambda: (torch.randn(3, 6), torch.randn(4, 6, device="meta"), None), RuntimeError,
         "weight on the device of x"),
        (lambda: (torch.randn(()), torch.randn(4, 1), None), RuntimeError, "at least 1 dimension"),
        (lambda: (torch.randn(3, 6), torch.randn(4, 6, 1), None), RuntimeError, "weight to be 2-D"),
    ],
    ids=["inner-size", "weight-dtype", "bias-shape", "bias-dtype", "integer", "device", "scalar-x", "weight-rank"],
)
def test_bad_input_names_the_argument(backend, make, error, message):
    x, w, b = make()
    if device_of(backend) == "cuda":
        x, w, b = (None if t is None else t.cuda() if t.device.type == "cpu" else t for t in (x, w, b))
    with pytest.raises(error, match=message):
        dense(x, w, b, "relu", backend=backend)


def test_unknown_names():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown activation 'swish'; expected one of: identity, relu"):
        dense(x, w, activation="swish")
    with pytest.raises(ValueError, match="unknown activation"):
        FusedDense(3, 4, activation="Relu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        dense(x, w, backend="tpu")
    with pytest.raises(ValueError, match="unknown save policy"):
        dense(x, w, save="none")
    with pytest.raises(ValueError, match="cannot run tensors on device 'cpu'"):
        dense(x, w, backend="cuda")
    # The C++ kernels check the name themselves, for callers of the raw op.
    with pytest.raises(ValueError, match="unknown activation 'swish'; expected one of: identity"):
        torch.ops.fusedlayers.dense_forward(x, w, None, "swish", True)


def test_cpp_table_knows_every_python_name():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    for name in ACTIVATIONS:
        y, _ = torch.ops.fusedlayers.dense_forward(x, w, None, name, True)
        assert_rel_close(y, REFERENCE[name].f(x @ w.T), 1e-5, name)


# ---- torch.library and torch.compile ---------------------------------------------------------------------

def _op_prefix(backend):
    return "triton_" if backend == "triton" else ""


@pytest.mark.parametrize("activation", ["gelu", "identity"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(backend, activation, bias):
    device = device_of(backend)
    prefix = _op_prefix(backend)
    ops = torch.ops.fusedlayers
    _, (x, w, b, g) = make_inputs((3, 2), 5, 4, torch.float64, device, bias)
    native = "triton" if backend == "triton" else "native"
    torch.library.opcheck(ops.dense.default, (x, w, b, activation, True, native))
    # The kernel ops are not differentiable (backpropagating through one raises): check them without grad.
    x, w = x.detach(), w.detach()
    b = None if b is None else b.detach()
    for save in (True, False):
        torch.library.opcheck(getattr(ops, prefix + "dense_forward").default, (x, w, b, activation, save))
    y, z = getattr(ops, prefix + "dense_forward")(x, w, b, activation, True)
    for preact in (z, None):
        torch.library.opcheck(getattr(ops, prefix + "dense_backward").default,
                              (g, x, w, b, preact if activation != "identity" else None, activation,
                               [True, True, bias]))


def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = device_of(backend)
    torch.manual_seed(0)
    model = nn.Sequential(FusedDense(6, 8, activation="tanh", backend=backend),
                          FusedDense(8, 3, activation="identity", backend=backend)).to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(5, 6, device=device)
    y, y_ref = compiled(x), model(x)
    assert_rel_close(y, y_ref, 1e-6)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_ref.square().sum().backward()
    for got, p in zip(grads, model.parameters()):
        assert_rel_close(got, p.grad, 1e-6)


def test_compile_inductor_cpu():
    torch._dynamo.reset()
    model = nn.Sequential(FusedDense(6, 8, activation="gelu"), FusedDense(8, 3, activation="identity"))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 6, requires_grad=True)
    y = compiled(x)
    assert_rel_close(y, model(x), 1e-6)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(model(x).sum(), x)
    assert_rel_close(gx, gx_ref, 1e-6)


# ---- the module --------------------------------------------------------------------------------------------

def test_module_is_a_drop_in_for_linear():
    torch.manual_seed(3)
    linear = nn.Linear(10, 6)
    torch.manual_seed(3)
    fused = FusedDense(10, 6, activation="gelu")
    assert torch.equal(fused.weight, linear.weight) and torch.equal(fused.bias, linear.bias)
    assert fused.state_dict().keys() == linear.state_dict().keys()
    assert FusedDense(10, 6, bias=False).state_dict().keys() == nn.Linear(10, 6, bias=False).state_dict().keys()
    x = torch.randn(4, 10)
    assert_rel_close(fused(x), F.gelu(linear(x)), 1e-6)
    linear.load_state_dict(FusedDense(10, 6).state_dict())  # and back


def test_from_linear_shares_parameters():
    linear = nn.Linear(5, 3, dtype=torch.float64)
    fused = FusedDense.from_linear(linear, activation="elu")
    assert fused.weight is linear.weight and fused.bias is linear.bias
    x = torch.randn(2, 5, dtype=torch.float64)
    assert_rel_close(fused(x), F.elu(linear(x)), 1e-12)
    assert "activation='elu'" in repr(fused)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        FusedDense.from_linear(nn.ReLU())


def test_module_dtype_device_and_no_bias():
    fused = FusedDense(4, 3, bias=False, activation="sin", dtype=torch.float64)
    assert fused.bias is None and fused.weight.dtype == torch.float64
    x = torch.randn(4, dtype=torch.float64)
    assert_rel_close(fused(x), torch.sin(fused.weight @ x), 1e-12)


def test_inference_mode_and_no_grad():
    fused = FusedDense(4, 3, activation="gelu")
    x = torch.randn(2, 4)
    expected = F.gelu(F.linear(x, fused.weight, fused.bias)).detach()
    with torch.inference_mode():
        y = fused(x)
    assert_rel_close(y, expected, 1e-6)
    with torch.no_grad():
        y = fused(x)
    assert y.grad_fn is None
    assert_rel_close(y, expected, 1e-6)


@pytest.mark.parametrize("save", ["preact", "recompute"])
def test_saved_tensors_as_autograd_keeps_them(backend, save):
    """The node's saved tensors behave as PyTorch's own: a weight modified in place after the forward makes the
    backward raise, a second backward without retain_graph raises, and one with it gives the same gradients."""
    _, (x, w, b, g) = make_inputs((4,), 6, 5, torch.float64, device_of(backend))
    y = dense(x, w, b, "tanh", backend=backend, save=save)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, [x, w, b], g)
    y = dense(x, w, b, "tanh", backend=backend, save=save)
    first = torch.autograd.grad(y, [x, w, b], g, retain_graph=True)
    second = torch.autograd.grad(y, [x, w, b], g)
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y, [x, w, b], g)
