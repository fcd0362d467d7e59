"""The cross-entropy kernel ops (cross_entropy_forward / _backward and their triton_ twins) on every runnable
backend, against a plain-PyTorch float64 implementation of the per-row formulas of csrc/ops/cross_entropy.cpp."""
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close, device_of

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
IGNORE = -100


def kernel_ops(backend):
    """(forward, forward_grad, backward) kernel ops of a backend: the triton_ ones for "triton", else the
    native ones."""
    prefix = ""
    if backend == "triton":
        from fusedlayers.triton import cross_entropy  # noqa: F401  (registers the triton_ kernels)
        prefix = "triton_"
    return tuple(getattr(torch.ops.fusedlayers, f"{prefix}cross_entropy_{name}")
                 for name in ("forward", "forward_grad", "backward"))


def ops(backend):
    """(forward, backward) kernel ops of a backend for per-row losses (reduction "none")."""
    forward, _, backward = kernel_ops(backend)
    return functools.partial(forward, reduction="none"), functools.partial(backward, reduction="none")


def reference(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_loss, grad_lse):
    """(loss, lse, grad) of the contract's formulas in float64, the gradient by autograd."""
    x = logits.double().requires_grad_()
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    n, c = z.shape
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    kept = target != ignore_index
    t = torch.where(kept, target, 0)
    lse = torch.logsumexp(z, dim=1)
    z_t = z.gather(1, t[:, None])[:, 0]
    loss = (w[t] * ((1 - label_smoothing) * (lse - z_t) + z_loss * lse**2)
            + label_smoothing / c * (w * (lse[:, None] - z)).sum(1))
    loss = torch.where(kept, loss, 0.0)
    objective = (grad_loss.double() * loss).sum()
    if grad_lse is not None:
        objective = objective + (grad_lse.double() * lse).sum()
    (grad,) = torch.autograd.grad(objective, x) if n * c else (torch.zeros_like(x),)
    return loss.detach(), lse.detach(), grad


def make_inputs(n, c, dtype, device, weight=False, ignored=(), seed=0, scale=3.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (offset + scale * torch.randn(n, c, dtype=torch.float64, generator=gen)).to(dtype)
    target = torch.randint(0, c, (n,), generator=gen) if c else torch.full((n,), IGNORE)
    for row in ignored:
        target[row] = IGNORE
    w = (0.2 + torch.rand(c, dtype=torch.float64, generator=gen)).to(dtype) if weight else None
    grad_loss = torch.randn(n, dtype=torch.float64, generator=gen)
    grad_lse = torch.randn(n, dtype=torch.float64, generator=gen)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return on(logits), on(target), on(w), on(grad_loss), on(grad_lse)


def check(backend, n, c, dtype, weight=False, label_smoothing=0.0, z_loss=0.0, softcap=None, ignored=(),
          grad_lse=(False, True), rtol=None, grad_rtol=None, **kw):
    """Forward and backward (with grad_lse None and given) of the kernel ops against the reference, which is
    computed from the same (rounded) inputs."""
    forward, backward = ops(backend)
    logits, target, w, g_loss, g_lse = make_inputs(n, c, dtype, device_of(backend), weight, ignored, **kw)
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = rtol or RTOL[math_dtype]
    loss, lse = forward(logits, target, w, IGNORE, label_smoothing, z_loss, softcap)
    assert loss.dtype == lse.dtype == math_dtype and loss.shape == lse.shape == (n,)
    for with_lse in grad_lse:
        gl, gz = g_loss.to(math_dtype), g_lse.to(math_dtype) if with_lse else None
        ref_loss, ref_lse, ref_grad = reference(logits.cpu(), target.cpu(), None if w is None else w.cpu(), IGNORE,
                                                label_smoothing, z_loss, softcap, gl.cpu(),
                                                None if gz is None else gz.cpu())
        assert_rel_close(loss.cpu(), ref_loss, rtol, "loss")
        assert_rel_close(lse.cpu(), ref_lse, rtol, "lse")
        grad = backward(gl, gz, logits, target, w, lse, IGNORE, label_smoothing, z_loss, softcap)
        assert grad.dtype == dtype and grad.shape == (n, c)
        assert_rel_close(grad.cpu(), ref_grad, grad_rtol or rtol, f"grad (grad_lse given: {with_lse})")
    return loss, lse


# every combination of the options, rows 1 and 4 ignored
OPTIONS = list(itertools.product([False, True], [0.0, 0.1], [0.0, 0.02], [None, 4.0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("weight,label_smoothing,z_loss,softcap", OPTIONS,
                         ids=[f"w{int(w)}-ls{ls}-z{z}-cap{cap}" for w, ls, z, cap in OPTIONS])
def test_every_option_combination(backend, weight, label_smoothing, z_loss, softcap, dtype):
    check(backend, 6, 37, dtype, weight, label_smoothing, z_loss, softcap, ignored=(1, 4))


@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "weight"])
def test_matches_torch_cross_entropy(backend, weight):
    # The contract's formulas are PyTorch's for reduction="none" (z_loss 0, no softcap), ignored rows included.
    logits, target, w, _, _ = make_inputs(7, 23, torch.float64, device_of(backend), weight, ignored=(2,))
    for label_smoothing in (0.0, 0.3):
        loss, _ = ops(backend)[0](logits, target, w, IGNORE, label_smoothing, 0.0, None)
        expected = F.cross_entropy(logits.cpu(), target.cpu(), None if w is None else w.cpu(), ignore_index=IGNORE,
                                   reduction="none", label_smoothing=label_smoothing)
        assert_rel_close(loss.cpu(), expected, 1e-12, f"loss, label_smoothing={label_smoothing}")


@pytest.fixture
def small_block(backend, monkeypatch):
    """Triton's largest block made 256 classes, so that C = 1000 takes four chunks, the last one partial."""
    if backend == "triton":
        from fusedlayers.triton import cross_entropy as triton_ce

        monkeypatch.setitem(triton_ce.MAX_BLOCK, torch.float32, 256)
        monkeypatch.setitem(triton_ce.MAX_BLOCK, torch.float64, 256)
        assert triton_ce.launch_config(1000, torch.float32)[0] == 256


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "weight"])
def test_several_chunks(backend, small_block, weight, dtype):
    check(backend, 3, 1000, dtype, weight, label_smoothing=0.1, z_loss=0.01, softcap=6.0, ignored=(1,))
    check(backend, 3, 1000, dtype, weight)


# C = 4099: two chunks of Triton's largest block, and a scalar tail after the vectors of the CUDA kernels'
# threads, each taking two of them.
@pytest.mark.parametrize("n,c", [(1, 7), (5, 1), (4, 7), (1, 1000), (2, 4099)],
                         ids=["N1", "C1", "C7", "N1-C1000", "N2-C4099"])
def test_odd_sizes(backend, n, c):
    check(backend, n, c, torch.float64, weight=True, label_smoothing=0.2, z_loss=0.01, softcap=5.0)
    check(backend, n, c, torch.float32)


def test_empty_batch(backend):
    loss, lse = check(backend, 0, 7, torch.float32, weight=True, label_smoothing=0.1)
    assert loss.numel() == lse.numel() == 0


def test_all_rows_ignored(backend):
    # loss 0 per row; lse still the row's logsumexp, and grad_lse's part of the gradient still flows
    loss, _ = check(backend, 3, 9, torch.float64, weight=True, label_smoothing=0.1, z_loss=0.01, ignored=(0, 1, 2))
    assert (loss == 0).all()


@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "weight"])
def test_large_logits(backend, small_block, weight):
    # Logits near 1e4 in float32, over several chunks: lse - z[t] and sum_c w[c] * (lse - z[c]) computed from
    # lse itself would cancel about 4 digits; the kernels sum relative to the running max instead. (The
    # backward recomputes softmax from the stored lse, whose rounding moves exp(z - lse) by |lse| * 2^-24
    # relative: that is tested at the moderate logits of the other tests.)
    forward = ops(backend)[0]
    logits, target, w, _, _ = make_inputs(4, 1000, torch.float32, device_of(backend), weight, offset=1e4)
    loss, lse = forward(logits, target, w, IGNORE, 0.5, 0.0, None)
    ref_loss, ref_lse, _ = reference(logits.cpu(), target.cpu(), None if w is None else w.cpu(), IGNORE, 0.5, 0.0,
                                     None, torch.zeros(4), None)
    assert_rel_close(loss.cpu(), ref_loss, 1e-5, "loss")
    assert_rel_close(lse.cpu(), ref_lse, 1e-5, "lse")


def test_masked_logits(backend):
    # -inf logits (a masked vocabulary) are fine without label smoothing: they get probability and gradient 0.
    forward, backward = ops(backend)
    logits, target, _, grad_loss, _ = make_inputs(4, 11, torch.float64, device_of(backend))
    logits[:, 5:] = float("-inf")
    target = target % 5
    loss, lse = forward(logits, target, None, IGNORE, 0.0, 0.0, None)
    grad = backward(grad_loss, None, logits, target, None, lse, IGNORE, 0.0, 0.0, None)
    x = logits.cpu().clone().requires_grad_()
    expected = F.cross_entropy(x, target.cpu(), reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, x, grad_loss.cpu())
    assert_rel_close(loss.cpu(), expected.detach(), 1e-12, "loss")
    assert_rel_close(grad.cpu(), expected_grad, 1e-12, "grad")
    assert (grad[:, 5:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_logits(backend, dtype):
    # Loaded and computed in float32 (loss and lse float32, to 1e-5 of the float64 math on the rounded
    # inputs); the gradient is stored in the logits' dtype: one rounding of it, 2^-8 for bfloat16.
    grad_rtol = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    check(backend, 5, 40, dtype, weight=True, label_smoothing=0.1, z_loss=0.01, softcap=4.0, ignored=(2,),
          grad_rtol=grad_rtol)


def test_non_contiguous_and_offset_inputs(backend):
    forward, backward = ops(backend)
    logits, target, w, grad_loss, _ = make_inputs(5, 9, torch.float64, device_of(backend), weight=True)
    wide = torch.zeros(9, 10, dtype=torch.float64, device=logits.device)
    wide[:, ::2] = logits.T
    strided = wide[:, ::2].T  # logits with strides (2, 20)
    assert not strided.is_contiguous()
    # contiguous, but 8 bytes past a 16-byte boundary: the rows' vector loads start one element later
    offset = torch.cat([logits.new_zeros(1), logits.flatten()])[1:].view(5, 9)
    assert offset.is_contiguous() and offset.data_ptr() % 16 == 8
    expected_loss, expected_lse = forward(logits, target, w, IGNORE, 0.1, 0.01, 3.0)
    expected = backward(grad_loss, None, logits, target, w, expected_lse, IGNORE, 0.1, 0.01, 3.0)
    for x in (strided, offset):
        loss, lse = forward(x, target, w, IGNORE, 0.1, 0.01, 3.0)
        assert torch.equal(loss, expected_loss) and torch.equal(lse, expected_lse)
        assert torch.equal(backward(grad_loss, None, x, target, w, lse, IGNORE, 0.1, 0.01, 3.0), expected)


@pytest.mark.parametrize("bad,ignore_index", [(7, IGNORE), (-1, IGNORE), (IGNORE, -1), (1000, 3)],
                         ids=["C", "minus1", "ignore_differs", "far"])
def test_out_of_range_target_raises(backend, bad, ignore_index):
    if device_of(backend) == "cuda":
        pytest.skip("on a GPU this is a device-side assert, which ends the CUDA context: not testable in-process")
    forward, backward = ops(backend)
    logits, target, _, grad_loss, _ = make_inputs(4, 7, torch.float32, "cpu")
    target[2] = bad
    with pytest.raises(IndexError, match=rf"target {bad} is out of bounds.*\[0, 7\)"):
        forward(logits, target, None, ignore_index, 0.0, 0.0, None)
    lse = torch.logsumexp(logits, 1)
    with pytest.raises(IndexError, match=rf"target {bad} is out of bounds.*\[0, 7\)"):
        backward(grad_loss.float(), None, logits, target, None, lse, ignore_index, 0.0, 0.0, None)


def test_bad_arguments(backend):
    forward, backward = ops(backend)
    logits, target, w, _, _ = make_inputs(4, 7, torch.float32, device_of(backend), weight=True)
    cases = [
        ((logits[0], target, None), r"logits of shape \(N, C\)"),
        ((logits, target.int(), None), r"target of dtype int64 \(long\)"),
        ((logits, target[:3], None), r"target of shape \(4,\)"),
        ((logits, target, w[:6]), r"weight of shape \(7,\)"),
        ((logits, target, w.double()), "weight to have the dtype of logits"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            forward(*args, IGNORE, 0.0, 0.0, None)
    with pytest.raises(ValueError, match="softcap must be positive"):
        forward(logits, target, None, IGNORE, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        forward(logits, target, None, IGNORE, 1.5, 0.0, None)
    loss, lse = forward(logits, target, None, IGNORE, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"grad_loss .*shape \(4,\)"):
        backward(loss[:2], None, logits, target, None, lse, IGNORE, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"lse .*shape \(4,\)"):
        backward(loss, None, logits, target, None, lse[:3], IGNORE, 0.0, 0.0, None)


# ---- reductions and the in-place forward ----------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_reductions(backend, reduction, dtype):
    # the reduced loss is the reference's per-row losses summed (divided by the kept rows' summed class weights
    # for "mean"); the backward takes its 0-d gradient
    forward, _, backward = kernel_ops(backend)
    logits, target, w, _, _ = make_inputs(6, 13, dtype, device_of(backend), weight=True, ignored=(1, 4))
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref_rows, _, _ = reference(logits.cpu(), target.cpu(), w.cpu(), IGNORE, 0.1, 0.02, 3.0, torch.zeros(6), None)
    kept = target.cpu() != IGNORE
    denom = w.cpu().double()[torch.where(kept, target.cpu(), 0)][kept].sum() if reduction == "mean" else 1.0
    g = torch.tensor(0.7, dtype=math_dtype, device=logits.device)
    _, _, ref_grad = reference(logits.cpu(), target.cpu(), w.cpu(), IGNORE, 0.1, 0.02, 3.0,
                               torch.full((6,), 0.7, dtype=torch.float64) / denom, None)
    loss, lse = forward(logits, target, w, IGNORE, 0.1, 0.02, 3.0, reduction)
    assert loss.shape == () and loss.dtype == math_dtype
    assert_rel_close(loss.cpu(), ref_rows.sum() / denom, RTOL[math_dtype], "loss")
    grad = backward(g, None, logits, target, w, lse, IGNORE, 0.1, 0.02, 3.0, reduction)
    assert_rel_close(grad.cpu(), ref_grad, RTOL[math_dtype], "grad")
    with pytest.raises(RuntimeError, match="0-d grad_loss"):
        backward(g.expand(6), None, logits, target, w, lse, IGNORE, 0.1, 0.02, 3.0, reduction)


def test_mean_of_all_ignored_rows_is_nan(backend):
    forward, _, backward = kernel_ops(backend)
    logits, target, _, _, _ = make_inputs(3, 5, torch.float64, device_of(backend), ignored=(0, 1, 2))
    loss, lse = forward(logits, target, None, IGNORE, 0.0, 0.0, None, "mean")
    assert loss.isnan()  # as F.cross_entropy's 0 / 0
    grad = backward(torch.ones_like(loss), None, logits, target, None, lse, IGNORE, 0.0, 0.0, None, "mean")
    assert (grad == 0).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_forward_grad_writes_the_gradient(backend, small_block, reduction, dtype):
    # forward_grad returns the forward's (loss, lse) and writes the backward's gradient for grad_loss 1 into
    # grad: a separate tensor, or the logits themselves; C = 1000 spans several Triton chunks
    forward, forward_grad, backward = kernel_ops(backend)
    opts = (IGNORE, 0.1, 0.02, 4.0, reduction)
    logits, target, w, _, _ = make_inputs(4, 1000, dtype, device_of(backend), weight=True, ignored=(2,))
    loss, lse = forward(logits, target, w, *opts)
    one = torch.ones(loss.shape, dtype=loss.dtype, device=loss.device)
    expected = backward(one, None, logits, target, w, lse, *opts)
    grad = torch.full_like(logits, float("nan"))
    loss_, lse_ = forward_grad(logits, target, w, *opts, grad)
    assert torch.equal(loss_, loss) and torch.equal(lse_, lse)
    assert torch.equal(grad, expected)
    x = logits.clone()
    loss_, lse_ = forward_grad(x, target, w, *opts, x)
    assert torch.equal(loss_, loss) and torch.equal(lse_, lse)
    assert torch.equal(x, expected)


def test_forward_grad_non_contiguous(backend):
    forward_grad, backward = kernel_ops(backend)[1:]
    logits, target, _, _, _ = make_inputs(5, 9, torch.float64, device_of(backend))
    wide = torch.zeros(9, 10, dtype=torch.float64, device=logits.device)
    wide[:, ::2] = logits.T
    strided = wide[:, ::2].T
    assert not strided.is_contiguous()
    loss, lse = forward_grad(strided, target, None, IGNORE, 0.0, 0.0, None, "sum", strided)
    expected = backward(torch.ones_like(loss), None, logits, target, None, lse, IGNORE, 0.0, 0.0, None, "sum")
    assert torch.equal(strided, expected)  # written back through the strides
    assert (wide[:, 1::2] == 0).all()  # and nowhere else


def test_forward_grad_checks_targets_before_writing(backend):
    if device_of(backend) == "cuda":
        pytest.skip("on a GPU this is a device-side assert, which ends the CUDA context: not testable in-process")
    forward_grad = kernel_ops(backend)[1]
    logits, target, _, _, _ = make_inputs(4, 7, torch.float32, "cpu")
    target[3] = 7
    x = logits.clone()
    for reduction in ("none", "mean", "sum"):
        with pytest.raises(IndexError, match=r"target 7 is out of bounds"):
            forward_grad(x, target, None, IGNORE, 0.0, 0.0, None, reduction, x)
        assert torch.equal(x, logits)


def test_bad_reduction_and_grad(backend):
    forward, forward_grad, _ = kernel_ops(backend)
    logits, target, _, _, _ = make_inputs(4, 7, torch.float32, device_of(backend))
    with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
        forward(logits, target, None, IGNORE, 0.0, 0.0, None, "avg")
    with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
        forward_grad(logits, target, None, IGNORE, 0.0, 0.0, None, "avg", logits.clone())
    for grad in (logits[:3].clone(), logits.double()):
        with pytest.raises(RuntimeError, match="expected grad shaped as logits"):
            forward_grad(logits, target, None, IGNORE, 0.0, 0.0, None, "mean", grad)
