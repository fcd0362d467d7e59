"""One argument contract per op family: a table of bad inputs, run through every backend's kernel op and
through the fake kernel (FakeTensorMode, what torch.compile runs), must give the same error type and message
everywhere. The C++ kernels mirror the Python contracts of fusedlayers/ops/ (which the fakes and the Triton
kernels call); this is the test that holds them together."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fusedlayers import backends

from conftest import BACKENDS

F64 = torch.float64


def _t(*shape, dtype=F64):
    return torch.zeros(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)


def _dense(x=None, w=None, b=None, act="tanh", save=True):
    x = _t(4, 3) if x is None else x
    return (x, _t(5, 3) if w is None else w, b, act, save)


def _mlp(x=None, ws=None, bs=None, acts=None):
    ws = [_t(4, 3), _t(2, 4)] if ws is None else ws
    return (_t(6, 3) if x is None else x, ws, [] if bs is None else bs, ["tanh", "identity"] if acts is None else acts,
            True)


def _ce(logits=None, target=None, weight=None, ls=0.0, cap=None, reduction="mean"):
    return (_t(4, 7) if logits is None else logits, torch.zeros(4, dtype=torch.long) if target is None else target,
            weight, -100, ls, 0.0, cap, reduction)


def _ce_backward(grad_loss=None, grad_lse=None, lse=None, reduction="none", logits=None):
    logits = _t(4, 7) if logits is None else logits
    grad_loss = _t(4) if grad_loss is None else grad_loss
    return (grad_loss, grad_lse, logits, torch.zeros(4, dtype=torch.long), None, _t(4) if lse is None else lse,
            -100, 0.0, 0.0, None, reduction)


def _soft(logits=None, target=None, weight=None, ls=0.0):
    return (_t(4, 7) if logits is None else logits, _t(4, 7) if target is None else target, weight, ls)


def _soft_backward(grad_loss=None, grad_lse=None, lse=None):
    return (_t(4) if grad_loss is None else grad_loss, grad_lse, _t(4, 7), _t(4, 7), None, _t(4) if lse is None else lse,
            0.0)


def _lce(h=None, w=None, b=None, t=None, cw=None, reduction="mean", chunk=2, ls=0.0):
    return (_t(4, 3) if h is None else h, _t(7, 3) if w is None else w, b,
            torch.zeros(4, dtype=torch.long) if t is None else t, cw, -100, ls, 0.0, None, reduction, chunk,
            [False] * 3)


# (kernel, arguments, the error's type and a part of its message that names the argument)
CASES = [
    ("dense_forward", _dense(x=torch.tensor(1.0, dtype=F64)), RuntimeError, "expected x to have at least 1 dimension"),
    ("dense_forward", _dense(w=_t(5)), RuntimeError, "expected weight to be 2-D"),
    ("dense_forward", _dense(w=_t(5, 2)), RuntimeError, "expected x.size(-1) == weight.size(1)"),
    ("dense_forward", _dense(x=_t(4, 3, dtype=torch.long), w=_t(5, 3, dtype=torch.long)), RuntimeError,
     "expected x to be a floating-point tensor"),
    ("dense_forward", _dense(w=_t(5, 3, dtype=torch.float32)), RuntimeError, "expected weight to have the dtype of x"),
    ("dense_forward", _dense(b=_t(4)), RuntimeError, "expected bias of shape [5]"),
    ("dense_forward", _dense(b=_t(5, dtype=torch.float32)), RuntimeError, "expected bias to have the dtype of x"),
    ("dense_forward", _dense(act="swish"), ValueError, "unknown activation 'swish'"),
    ("mlp_forward", _mlp(ws=[]), RuntimeError, "expected at least one layer"),
    ("mlp_forward", _mlp(bs=[_t(4)]), RuntimeError, "expected biases to be empty or one per layer"),
    ("mlp_forward", _mlp(acts=["tanh"]), RuntimeError, "expected one activation per layer"),
    ("mlp_forward", _mlp(ws=[_t(4, 3), _t(2, 5)]), RuntimeError, "expected weights[1].size(1) == 4"),
    ("mlp_forward", _mlp(ws=[_t(4, 3), _t(2, 4, dtype=torch.float32)]), RuntimeError,
     "expected weights[1] to have the dtype of x"),
    ("mlp_forward", _mlp(bs=[_t(4), _t(3)]), RuntimeError, "expected biases[1] of shape [2]"),
    ("mlp_forward", _mlp(acts=["tanh", "swish"]), ValueError, "unknown activation 'swish'"),
    ("cross_entropy_forward", _ce(logits=_t(7)), RuntimeError, "expected logits of shape (N, C)"),
    ("cross_entropy_forward", _ce(logits=_t(4, 7, dtype=torch.long)), RuntimeError, "expected floating-point logits"),
    ("cross_entropy_forward", _ce(target=torch.zeros(4, dtype=torch.int32)), RuntimeError,
     "expected target of dtype int64"),
    ("cross_entropy_forward", _ce(target=torch.zeros(3, dtype=torch.long)), RuntimeError, "expected target of shape (4,)"),
    ("cross_entropy_forward", _ce(weight=_t(6)), RuntimeError, "expected weight of shape (7,)"),
    ("cross_entropy_forward", _ce(weight=_t(7, dtype=torch.float32)), RuntimeError,
     "expected weight to have the dtype of logits"),
    ("cross_entropy_forward", _ce(ls=1.5), ValueError, "label_smoothing must be in [0, 1]"),
    ("cross_entropy_forward", _ce(cap=0.0), ValueError,
     "softcap must be positive and finite (None for no cap), got 0.0"),
    ("cross_entropy_forward", _ce(cap=float("inf")), ValueError,
     "softcap must be positive and finite (None for no cap), got inf"),
    ("cross_entropy_forward", _ce(reduction="avg"), ValueError, "'avg' is not a valid value for reduction"),
    ("cross_entropy_backward", _ce_backward(lse=_t(3)), RuntimeError, "expected lse of shape (4,)"),
    ("cross_entropy_backward", _ce_backward(grad_loss=_t(3)), RuntimeError,
     "expected grad_loss of shape (4,) for reduction 'none'"),
    ("cross_entropy_backward", _ce_backward(grad_loss=_t(4), reduction="mean"), RuntimeError,
     "expected a 0-d grad_loss for a reduced loss"),
    ("cross_entropy_backward", _ce_backward(grad_lse=_t(5)), RuntimeError, "expected grad_lse of shape (4,)"),
    ("linear_cross_entropy_forward", _lce(h=_t(3)), RuntimeError, "expected hidden of shape (N, H)"),
    ("linear_cross_entropy_forward", _lce(w=_t(7, 2)), RuntimeError, "expected weight of shape (V, 3)"),
    ("linear_cross_entropy_forward", _lce(w=_t(7, 3, dtype=torch.float32)), RuntimeError,
     "expected weight to have the dtype of hidden"),
    ("linear_cross_entropy_forward", _lce(b=_t(6)), RuntimeError, "expected bias of shape (7,)"),
    ("linear_cross_entropy_forward", _lce(cw=_t(6)), RuntimeError, "expected class_weight of shape (7,)"),
    ("linear_cross_entropy_forward", _lce(t=torch.zeros(3, dtype=torch.long)), RuntimeError,
     "expected target of shape (4,)"),
    ("cross_entropy_soft_forward", _soft(logits=_t(4)), RuntimeError, "expected logits of shape (N, C)"),
    ("cross_entropy_soft_forward", _soft(target=_t(4, 6)), RuntimeError,
     "expected class-probability target of the shape of logits"),
    ("cross_entropy_soft_forward", _soft(target=_t(4, 7, dtype=torch.float32)), RuntimeError,
     "expected class-probability target of the dtype of logits"),
    ("cross_entropy_soft_forward", _soft(weight=_t(6)), RuntimeError, "expected weight of shape (7,)"),
    ("cross_entropy_soft_forward", _soft(ls=-0.5), ValueError, "label_smoothing must be in [0, 1]"),
    ("cross_entropy_soft_backward", _soft_backward(lse=_t(3)), RuntimeError,
     "expected grad_loss, grad_lse and lse of shape (4,)"),
    ("cross_entropy_soft_backward", _soft_backward(grad_lse=_t(5)), RuntimeError,
     "expected grad_loss, grad_lse and lse of shape (4,)"),
    ("linear_cross_entropy_forward", _lce(chunk=0), ValueError, "chunk_size must be positive"),
    ("linear_cross_entropy_forward", _lce(reduction="avg"), ValueError,
     "linear_cross_entropy(): 'avg' is not a valid value for reduction"),
]


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (the type is what is compared)
        return type(e), str(e).split("\n")[0]
    return None


def _kernel(kernels: str, name: str):
    return getattr(torch.ops.fusedlayers, backends.KERNELS[kernels] + name)


def _runs():
    """(label, kernel backend) of every available backend that runs CPU tensors here (the cases are CPU
    tensors: a GPU-only backend's kernels run where there is a GPU)."""
    runs = []
    for name in BACKENDS:
        b = backends.BY_NAME[name]
        if "cpu" in b.devices and b.missing("cpu") is None:
            if b.load is not None:
                b.load()
            runs.append((name, b.kernels))
    return runs


@pytest.mark.parametrize("kernel,args,error,message", CASES, ids=[f"{c[0]}-{c[3][:40]}" for c in CASES])
def test_every_backend_and_the_fake_raise_the_same_error(kernel, args, error, message):
    errors = {}
    for label, kernels in _runs():
        errors[label] = _error(lambda: _kernel(kernels, kernel)(*args))
    for kernels in backends.KERNELS:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                    [mode.from_tensor(t) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                    else a for a in args]
            errors[f"fake {kernels}"] = _error(lambda: _kernel(kernels, kernel)(*fake))
    for label, got in errors.items():
        assert got is not None, f"{label}: no error"
        assert got[0] is error and message in got[1], f"{label}: {got}"
    assert len({m for _, m in errors.values()}) == 1, errors
