"""Property-based (hypothesis) tests: every public op of fusedlayers.functional against plain PyTorch, values and
gradients, on every backend this machine runs, over random shapes, dtypes, options and hostile values.

Inputs. Shapes with 0-size dims, single elements and odd sizes (1, 3, 7, 13, 33), batch ranks 0-3; float32 and
float64, bfloat16/float16 where the op takes them on that backend (not dense/mlp on the Triton interpreter, which
computes bf16 wrongly: tests/test_dense.py); every activation, every option of the losses and their layouts
((C,), (N, C), (N, C, d1[, d2])). Normal tensors get hostile values mixed in at a few positions: in the `*_finite`
tests large finite values (+-1e30; +-3e38 / +-max where no GEMM sums them), exp-overflow points (~89 for float32,
~710 for float64), denormals, signed zeros, activation tail points, large common logit offsets (+-1e4, +1e6);
in the `*_nonfinite` tests also NaN and +-inf. Out-of-range targets and 0-d inputs check the errors.

Oracle. For each fused call in dtype D the same computation runs in plain PyTorch in float64 on the same
(D-rounded) inputs upcast, `ref64` (with exact derivatives in the activation tails where PyTorch's cancel:
EXACT_TAILS), and in D itself, `torch_D`; gradients of every differentiable input
(x / hidden, weights, biases, direction; logits) come from torch.autograd.grad with one random upstream gradient,
the same for all; for dense also second order (create_graph): the gradient of <first-order gradients, v>.

THE ACCURACY CONTRACT, one rule for values and gradients alike, output tensor by output tensor:
  1. NaN/inf placement: at every position the fused result is of torch_D's class (finite, NaN, +inf or -inf),
     except where torch_D is not finite but ref64 is (PyTorch's own overflow), where torch_D's class differs from
     ref64's and the fused result has ref64's (float32 gelu(+inf) is NaN on AVX-512), and where ref64 is finite
     but beyond D's range (no value of D is right; PyTorch's own is then 0 or an inf of either sign), and where
     PyTorch's class changes under the perturbations of rule 2 (cos of 1e29: a rounding decides whether an
     overflow happens): nothing is required there. Where an equivalent PyTorch computation in D (a test's
     variants: the activations' derivatives by PyTorch's plain autograd, and their exact tails in D) has another
     class, that class is accepted too.
  2. accuracy, over the positions where ref64 and torch_D are both finite:
         max|fused - ref64| <= 2 * err_torch + 4 * eps(D) * max(1, max|ref64|)
     where err_torch, PyTorch's error, is the larger of
       - max|torch_D - ref64|; for D = float64, where ref64 is torch_D itself and nothing wider measures it,
         instead the larger of 16 * eps * max|ref64| and PyTorch's float32 error on the inputs rounded to float32
         times eps(float64) / eps(float32);
       - PyTorch's sensitivity: max|torch_D(perturbed inputs) - torch_D(inputs)| over 8 perturbations that move
         every nonzero finite input element (upstream gradients included) one ulp up or down at random: a
         difference no larger than what rounding the inputs does to PyTorch's own result is noise, not an error;
       - max|variant - torch_D| for each of the test's variants (rule 1) and its noise computations (mlp_jet's
         per-output backward, the soft-target loss with the classes in reverse order), whose classes are not
         accepted.
     Positions where the fused result is not finite (a class rule 1 accepted) are not compared.
     eps(D) = torch.finfo(D).eps.
  3. sign: a loss (>= 0 by construction: class weights here are >= 0) is never negative where PyTorch's is not.
Not compared: an mlp or mlp_jet example with a sin or cos pre-activation whose ulp in D exceeds pi (rejected by
hypothesis.assume: the value is rounding alone, PyTorch's float64 one too).
Errors: when torch_D raises, the fused call raises an exception of the same class (the one documented
exception: a 0-d cross_entropy input, which PyTorch rejects with a RuntimeError and fusedlayers' documented
contract with a ValueError); when it does not, the fused call must not raise either.

Settings: one profile (FUZZ): derandomize=True, database=None, deadline=None, no explain phase; max_examples from
the environment variable FUSEDLAYERS_FUZZ_EXAMPLES (default 80, sized for ~2-3 minutes on a 2-core CI machine),
a tenth of that (at least 4) for the Triton backend, interpreted on CPU. On a failure the falsifying case is
printed with its tensors. With FUSEDLAYERS_FUZZ_REPORT=FILE each compared output's (error, PyTorch's error, scale) is
appended to FILE, one JSON line each, which `python scripts/fuzz_report.py FILE` tabulates per test and dtype.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st

from fusedlayers.activations import ACTIVATIONS, REFERENCE
from fusedlayers.functional import cross_entropy, dense, linear_cross_entropy, mlp, mlp_jet

from conftest import BACKENDS, device_of, value_classes

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

EXAMPLES = int(os.environ.get("FUSEDLAYERS_FUZZ_EXAMPLES", "80"))
REPORT = os.environ.get("FUSEDLAYERS_FUZZ_REPORT")  # a file each compared output's errors are appended to (JSON lines)
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES, print_blob=False,
                phases=(Phase.explicit, Phase.generate, Phase.shrink),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def examples(backend: str) -> int:
    """The Triton interpreter runs each kernel as numpy code, about a hundred times slower than the C++ kernels."""
    return max(4, EXAMPLES // 10) if backend == "triton" else EXAMPLES


def fuzz(backend, test):
    """Runs the hypothesis test `test` (a @given function) under FUZZ with the backend's example count."""
    settings(FUZZ, max_examples=examples(backend))(test)()


# ---- the contract ------------------------------------------------------------------------------------------------

def _nan_at_nan(z):
    """0 with derivatives of every order 0, except where z is nan: there nan, with nan derivatives."""
    d = torch.where(z.isnan(), z, 0.0)
    d = d - d.detach()
    return d + d ** 3


def _sigmoid_tails(z):
    """sigmoid, whose derivatives by autograd do not form 1 - s (0 in float64 past z ~ 37, where s' ~ e^-z), and
    whose value and derivatives keep e^z down to the denormals (torch.sigmoid(-720) is 0: 1 / (1 + e^720))."""
    def negative(v):  # sigmoid(v) for v <= 0
        e = torch.exp(v)
        return e / (1 + e)
    positive = z > 0
    return torch.where(positive, 1 - negative(torch.where(positive, -z, 0.0)), negative(torch.where(positive, 0.0, z)))


# Carriers of exact float64 tail derivatives: (where, a form whose derivatives of every order by autograd do not
# cancel there). PyTorch's own float64 derivatives cancel in these tails (tanh' as 1 - tanh^2 is 0 past |z| ~ 19,
# where it is ~4 e^-2|z|; gelu' as 0.5 (1 + erf) + ... loses its leading term below z ~ -8), and fusedlayers'
# kernels do not (README, "Accuracy"): a float64 reference with PyTorch's would fail the exact result once a
# large direction or upstream gradient scales those derivatives up. Not sigmoid and silu: their kernels take
# s (1 - s) as PyTorch does, with PyTorch's error in the positive tail.
_GELU_TANH_K = math.sqrt(2 / math.pi)
EXACT_TAILS = {
    "tanh": (lambda z: z.abs() > 1, lambda z: 2 * _sigmoid_tails(2 * z) - 1),
    "gelu": (lambda z: z < -1, lambda z: z * 0.5 * torch.special.erfc(-z / math.sqrt(2))),
    # in float64 up to 1e30, not only to 10 (torch_activation's relu beyond 10 is for PyTorch's NaN from z**3
    # overflowing): f'' at z = -10.3 is 1e-37, which a direction of 1e30 makes a d2u of 1e21; in the other dtypes
    # (VARIANT_EXACT) up to 10, beyond which the kernels take relu's
    "gelu_tanh": (lambda z: (z.abs() > 1) & (z.abs() < (1e30 if z.dtype == F64 else 10)),
                  lambda z: z * _sigmoid_tails(2 * _GELU_TANH_K * (z + 0.044715 * z ** 3))),
}


# VARIANT_EXACT: a test's PyTorch computation in its own dtype with these carriers (exact=True) is one of its
# variants. It is what a cancellation-free float32 network computes: float32 gelu_tanh'(-5.5) is 0 in PyTorch and
# -4.6e-8 in the kernels, times a 1e30 weight an overflow, which then meets a 0 derivative as NaN (the long run).


def _exact_tails(name, z, y, exact=False):
    """y (the activation of z by PyTorch) with the value and the derivatives of every order of EXACT_TAILS[name] in
    its tails (PyTorch's float64 gelu(-9.1) is 0 from 1 + erf cancelling, where it is -4.6e-19: times a weight of
    1e30 the difference is an output): in float64, and in any dtype if exact (the forms the kernels take)."""
    if name not in EXACT_TAILS or not (exact or z.dtype == F64):
        return y
    where, carrier = EXACT_TAILS[name]
    tail = where(z) & z.isfinite()
    c = carrier(torch.where(tail, z, torch.ones_like(z)))
    return torch.where(tail, c, y)


def torch_activation(name: str, z: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """The activation in plain PyTorch, corrected where PyTorch's own derivatives are wrong and fusedlayers keeps
    the right value (README, "Accuracy"; the points are tests/test_higher_order.py's TORCH_WRONG): gelu_tanh
    beyond |z| = 10, where torch's derivatives are nan from z**3 overflowing (at +-inf, and in float32 from
    |z| ~ 1e13) and the function is relu's to within 1e-36; elu and selu at a nan pre-activation, where torch's
    float32 kernels give finite derivatives; in float64 (the reference), the tails of EXACT_TAILS."""
    return _exact_tails(name, z, _torch_activation(name, z), exact)


def _torch_activation(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        big = z.abs() >= 10
        # beyond 10: relu's values and f' (0 or 1), and second and third derivatives that are zeros multiplying
        # as the kernels' do (0 * nan is nan), not relu's zeros that are never formed
        zb = torch.where(big, z, torch.zeros_like(z))
        y = torch.where(big, zb * (zb > 0) + 0 * torch.tanh(zb),
                        F.gelu(torch.where(big, torch.zeros_like(z), z), approximate="tanh"))
        # the value at -inf stays torch's (and ours): nan
        return y + torch.where(z == -math.inf, torch.full_like(z, math.nan), torch.zeros_like(z))
    if name in ("elu", "selu"):
        return REFERENCE[name].f(z) + _nan_at_nan(z)
    return REFERENCE[name].f(z)


class _Derivative(torch.autograd.Function):
    """f^(k)(z) of torch_activation(name), whose backward is grad * f^(k+1)(z): one product per order. PyTorch's
    double backward of a curved activation (gelu, silu, ...) is a sum of terms, which an infinite upstream (an
    infinite direction) turns into inf - inf = NaN where the derivative it sums to is finite, the jet's terms all
    infs of one sign (README, "Accuracy": ours is that inf)."""

    @staticmethod
    def forward(z, name, k, exact):
        with torch.enable_grad():
            zz = z.detach().requires_grad_()
            y = torch_activation(name, zz, exact)
            for _ in range(k):
                (y,) = torch.autograd.grad(y.sum(), zz, create_graph=True)
        return y.detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.name, ctx.k, ctx.exact = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * _Derivative.apply(z, ctx.name, ctx.k + 1, ctx.exact), None, None, None


PIECEWISE_LINEAR = ("identity", "relu", "leaky_relu")


def reference_activation(name, z, plain=False, exact=False):
    """torch_activation(name, z, exact) with each derivative one product (_Derivative), or as PyTorch's autograd
    forms it (plain; and for the piecewise-linear activations, whose backward selects rather than multiplies)."""
    if plain or name in PIECEWISE_LINEAR:
        return torch_activation(name, z, exact)
    return _Derivative.apply(z, name, 0, exact)


def assume_phase_resolved(x, weights, biases, acts, dtype):
    """Rejects the example (hypothesis.assume) when a sin or cos layer of the network gets a pre-activation whose
    ulp in dtype exceeds pi: its value is then set by rounding alone, any value in [-1, 1] for every implementation
    (PyTorch's in float64 too), and a later overflow's place with it (the long run: float32 cos after a 1e30
    weight, the fused hidden activations an ulp from PyTorch's)."""
    if x.dim() == 0:
        return  # F.linear raises: the test compares the errors
    h = x.detach().double()
    limit = math.pi / torch.finfo(dtype).eps
    for i, (w, a) in enumerate(zip(weights, acts)):
        z = F.linear(h, w.detach().double(), None if biases is None else biases[i].detach().double())
        if a in ("sin", "cos"):
            assume(not (z.isfinite() & (z.abs() > limit)).any())
        h = REFERENCE[a].f(z)


def _where(mask, *tensors, limit=4):
    idx = mask.nonzero()[:limit]
    return "; ".join(f"at {tuple(i.tolist())}: " + ", ".join(f"{n}={t[tuple(i)].item():.9g}" for n, t in tensors)
                     for i in idx)


F64_ULPS = 16  # PyTorch's float64 error, which nothing wider measures, is taken as at least this many ulps


def max_abs(r: torch.Tensor) -> float:
    r = r.detach().double()
    return r[r.isfinite()].abs().max().item() if r.isfinite().any() else 0.0


def max_error(a: torch.Tensor, r: torch.Tensor) -> float:
    """max |a - r| over the positions where both are finite (0 if none)."""
    a, r = a.detach().cpu().double(), r.detach().double()
    both = a.isfinite() & r.isfinite()
    return (a - r)[both].abs().max().item() if both.any() else 0.0


def assert_contract(name: str, fused: torch.Tensor, torch_d: torch.Tensor, ref64: torch.Tensor, dtype,
                    err_torch: float | None = None, unstable: torch.Tensor | None = None,
                    alternatives: tuple = ()) -> tuple[float, float, float]:
    """Rules 1 and 2 of the module docstring for one output tensor; err_torch as there (None: max|torch_D - ref64|
    alone); unstable: the positions whose class PyTorch's perturbed runs changed, not compared; alternatives: the
    same output by equivalent PyTorch computations in the dtype, whose classes are accepted too. Returns (fused
    error, PyTorch's error, max|ref64|) over the compared positions (zeros if none)."""
    assert fused.shape == torch_d.shape, f"{name}: shape {tuple(fused.shape)} != PyTorch's {tuple(torch_d.shape)}"
    assert fused.dtype == torch_d.dtype, f"{name}: dtype {fused.dtype} != PyTorch's {torch_d.dtype}"
    f, d, r = fused.detach().cpu().double(), torch_d.detach().double(), ref64.detach().double()
    named = (("fused", f), ("torch", d), ("ref64", r))
    # 1. placement: PyTorch's class, except where PyTorch failed (not finite, ref64 finite) and where ref64 lies
    # beyond the dtype's range (no value of the dtype is right there; PyTorch's own is an overflow's artifact,
    # 0 or an inf of either sign): not compared there
    beyond = (r.abs() > torch.finfo(dtype).max) & r.isfinite()
    if unstable is not None:
        beyond = beyond | unstable
    # Where PyTorch's class in the dtype differs from its float64 one (an overflow: ref64 finite; a NaN where the
    # value is an inf: float32 gelu(+inf) on AVX-512), the fused result may take either; ref64 finite: any class.
    torch_failed = (value_classes(d) != value_classes(r)) & (r.isfinite() | (value_classes(f) == value_classes(r)))
    bad = (value_classes(f) != value_classes(d)) & ~torch_failed & ~beyond
    for alternative in alternatives:
        bad = bad & (value_classes(f) != value_classes(alternative.detach().double()))
    assert not bad.any(), f"{name}: NaN/inf placement differs from PyTorch's ({int(bad.sum())} of {bad.numel()}) " \
                          f"{_where(bad, *named)}"
    # 2. accuracy, where both references are finite and ref64 within the dtype's range (and so, by 1., the fused
    # result)
    # (and the fused result: a NaN whose class a variant gave is accepted by 1., and would make the maximum NaN)
    both = r.isfinite() & d.isfinite() & ~beyond & f.isfinite()
    if not both.any():
        return 0.0, 0.0, 0.0
    err_fused = (f - r)[both].abs().max().item()
    if err_torch is None:
        err_torch = (d - r)[both].abs().max().item()
    scale = r[both].abs().max().item()
    info = torch.finfo(dtype)
    floor = 4 * info.eps * max(1.0, scale)
    if err_fused > 2 * err_torch + floor:
        diff = torch.where(both, (f - r).abs(), 0)
        worst = torch.zeros(f.shape, dtype=torch.bool)
        worst[torch.unravel_index(diff.flatten().argmax(), f.shape)] = True
        raise AssertionError(f"{name}: max error {err_fused:.3e} > 2 * PyTorch's {err_torch:.3e} + floor "
                             f"{floor:.3e} (max|ref64| {scale:.3e}); worst {_where(worst, *named)}")
    return err_fused, err_torch, scale


# Accepted substitutions of PyTorch's exception class: (op, what) -> the class fusedlayers raises instead.
DOCUMENTED_ERRORS = {("cross_entropy", "0-d input"): ValueError}


def check_against_torch(names, torch_side, fused_side, dtype, op="", what="", describe=None, nonnegative=(),
                        variants=(), noise=()):
    """torch_side(math_dtype, via=None) and fused_side() each return a list of output tensors (values, then
    gradients); via: a dtype the inputs are rounded to first. describe(): the inputs, noted on a failure.
    nonnegative: the names of outputs that are >= 0 by construction (losses). variants: functions
    (math_dtype) -> the same outputs by an equivalent PyTorch computation; where one and PyTorch's are both
    finite, their difference counts as PyTorch's error (as the perturbed runs' do), and its NaN/inf class is
    accepted as PyTorch's. noise: functions as variants whose difference counts as PyTorch's error alone (their
    class is not accepted: a sum of separately overflowing terms can be NaN where the value is finite)."""
    try:
        _check_against_torch(names, torch_side, fused_side, dtype, op, what, nonnegative, variants, noise)
    except BaseException:
        if describe is not None:
            with torch._tensor_str.printoptions(precision=10, threshold=200):
                note("\n".join(f"{k} = {v!r}" for k, v in describe().items()))
        raise


def _check_against_torch(names, torch_side, fused_side, dtype, op, what, nonnegative, variants=(), noise=()):
    try:
        want = torch_side(dtype)
    except Exception as e:  # noqa: BLE001 (its class is what the fused call must match)
        expected = DOCUMENTED_ERRORS.get((op, what), type(e))
        note(f"PyTorch raised {type(e).__name__}: {e}")
        with pytest.raises(expected):
            fused_side()
        return
    exact = torch_side(F64)
    if dtype == F64:
        # ref64 is PyTorch's own result: its error is taken as at least F64_ULPS ulps of the reference's magnitude,
        # and at least its float32 error on the inputs rounded to float32 (against float64 on those) times
        # eps(float64) / eps(float32)
        ratio = torch.finfo(F64).eps / torch.finfo(F32).eps
        err_torch = [F64_ULPS * torch.finfo(F64).eps * max_abs(r) for r in exact]
        try:
            err_torch = [max(e, ratio * max_error(a, r))
                         for e, a, r in zip(err_torch, torch_side(F32, via=F32), torch_side(F64, via=F32))]
        except Exception:  # noqa: BLE001 (float32 rounding made PyTorch raise: no estimate)
            pass
    else:
        err_torch = [max_error(a, r) for a, r in zip(want, exact)]
    alternatives = [variant(dtype) for variant in variants]
    for alternative in [*alternatives, *(other(dtype) for other in noise)]:
        err_torch = [max(e, max_error(a, b)) for e, a, b in zip(err_torch, alternative, want)]
    unstable = [torch.zeros(w.shape, dtype=torch.bool) for w in want]
    for seed in range(WIGGLES):
        _WIGGLE.append(torch.Generator().manual_seed(seed))
        try:
            wiggled = torch_side(dtype)
        finally:
            _WIGGLE.pop()
        err_torch = [max(e, max_error(a, b)) for e, a, b in zip(err_torch, wiggled, want)]
        unstable = [u | (value_classes(a.detach()) != value_classes(b.detach()))
                    for u, a, b in zip(unstable, wiggled, want)]
    got = fused_side()
    assert len(got) == len(want) == len(exact) == len(names)
    for i, (name, a, d, r, e, u) in enumerate(zip(names, got, want, exact, err_torch, unstable)):
        errors = assert_contract(name, a, d, r, dtype, e, u, [alt[i] for alt in alternatives])
        if REPORT:
            with open(REPORT, "a") as f:
                test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
                f.write(json.dumps(dict(test=test, output=name, dtype=str(dtype).removeprefix("torch."),
                                        err=errors[0], err_torch=errors[1], scale=errors[2])) + "\n")
        if name in nonnegative:
            a, d = a.detach().cpu(), d.detach()
            negative = (a < 0) & (d >= 0)
            assert not negative.any(), f"{name}: negative where PyTorch's is not: " \
                                       f"{_where(negative, ('fused', a.double()), ('torch', d.double()))}"


def grads(outputs, inputs, upstream, each=False):
    """Gradients of every input (zeros for an unused one), as PyTorch would give them to a leaf. each: as the sum
    of each output's own backward (the same value, other roundings: see check_jet)."""
    # an output that does not require grad (zero by construction) contributes nothing
    kept = [(o, u) for o, u in zip(outputs, upstream) if o.requires_grad]
    outputs, upstream = [o for o, _ in kept], [u for _, u in kept]
    if not inputs or not outputs:
        return [torch.zeros_like(t) for t in inputs]
    if each:
        parts = [torch.autograd.grad(o, inputs, u, retain_graph=True, allow_unused=True, materialize_grads=True)
                 for o, u in zip(outputs, upstream)]
        return [sum(p[i] for p in parts) for i in range(len(inputs))]
    return list(torch.autograd.grad(outputs, inputs, upstream, allow_unused=True, materialize_grads=True))


_WIGGLE: list = []  # while it holds a generator, every floating input is perturbed as below
WIGGLES = 8  # perturbed runs of PyTorch that measure its sensitivity (fewer miss it for sin/cos of huge z)


def _wiggled(t):
    """t with each nonzero finite element moved by one ulp, up or down at random: a perturbation of the
    inputs of the size of their rounding, whose effect on PyTorch's result is its sensitivity (module docstring)."""
    if not _WIGGLE or t is None or not t.is_floating_point():
        return t
    up = torch.randint(0, 2, t.shape, generator=_WIGGLE[-1]) > 0
    moved = torch.nextafter(t, torch.where(up, math.inf, -math.inf).to(t.dtype))
    return torch.where(t.isfinite() & (t != 0), moved, t)


def leaves(tensors, dtype, device="cpu", via=None):
    """Leaf copies of the inputs in dtype (rounded to `via` first, if given) that require grad."""
    return [None if t is None else _wiggled(t.detach().to(via or t.dtype)).to(device=device, dtype=dtype).clone()
            .requires_grad_() for t in tensors]


def cast(t, dtype, via=None):
    return None if t is None else _wiggled(t.to(via or t.dtype)).to(dtype)


# ---- inputs ------------------------------------------------------------------------------------------------------

NONFINITE = ("nan", "inf", "-inf")
# Finite hostile values a GEMM may sum: magnitude-bounded so no dot product overflows in an order-dependent way.
GEMM_FINITE = ("big", "-big", "exp_over", "-exp_over", "exp_edge", "exp_under", "denormal", "-denormal", "zero",
               "-zero")
# Values for pre-activations (biases) and logits: activation tails and kinks, beyond softplus's threshold, the
# float32 vectorized paths' tails (gelu_tanh near -4.4, tanh' near 4.5), gelu_tanh'' overflow (|z| >= 1e13).
TAIL_POINTS = ("-4.4", "4.5", "-4.5", "-5.5", "9.0", "-9.0", "17.0", "-17.0", "20.0", "20.5", "-20.5", "30.0",
               "-30.0", "1e13", "-1e13", "1e-3")
BIAS_FINITE = GEMM_FINITE + ("huge", "-huge") + TAIL_POINTS
LOGIT_FINITE = BIAS_FINITE + ("max", "-max")

_NAMED = {
    # kind: {dtype: value}; float16 has its own range, bfloat16 float32's
    "big": {F64: 1e30, F32: 1e30, BF16: 1e30, F16: 6e4},
    "huge": {F64: 1e300, F32: 3e38, BF16: 3e38, F16: 6.5e4},
    "max": {d: torch.finfo(d).max for d in (F64, F32, BF16, F16)},
    "exp_over": {F64: 710.0, F32: 89.0, BF16: 89.0, F16: 11.1},
    "exp_edge": {F64: 709.782712893384, F32: 88.72284, BF16: 88.5, F16: 11.089},
    "exp_under": {F64: -745.2, F32: -103.9, BF16: -103.9, F16: -17.4},
    "denormal": {F64: 1e-310, F32: 1e-40, BF16: 1e-40, F16: 1e-7},
    "nan": {d: math.nan for d in (F64, F32, BF16, F16)},
    "inf": {d: math.inf for d in (F64, F32, BF16, F16)},
    "zero": {d: 0.0 for d in (F64, F32, BF16, F16)},
}


def hostile_value(kind: str, dtype) -> float:
    sign = -1.0 if kind.startswith("-") else 1.0
    base = kind.lstrip("-")
    if base in _NAMED:
        return sign * _NAMED[base][dtype]
    return float(kind)


def build(shape, spec, dtype, device="cpu"):
    """A tensor from a spec: seeded normal values * scale + offset (in float64), rounded to dtype, then the
    hostile values at their positions (modulo the size)."""
    seed, scale, offset, hostile = spec
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, dtype=F64, generator=gen) * scale + offset).to(dtype)
    if t.numel():
        flat = t.view(-1)
        for pos, kind in hostile:
            flat[pos % t.numel()] = hostile_value(kind, dtype)
    return t.to(device)


def tensor_spec(kinds, scales=(1.0,), offsets=(0.0,), nonfinite=False, max_hostile=4):
    """(seed, scale, offset, ((position, kind), ...)): a nonfinite spec has at least one NaN or inf among its
    hostile values; a finite one none, and is plain (no hostile values) about half the time."""
    pos = st.integers(0, 10_000)
    if nonfinite:
        hostile = st.tuples(st.tuples(pos, st.sampled_from(NONFINITE)),
                            st.lists(st.tuples(pos, st.sampled_from(NONFINITE + kinds)), max_size=max_hostile - 1)
                            ).map(lambda p: (p[0], *p[1]))
    else:
        hostile = st.one_of(st.just(()), st.lists(st.tuples(pos, st.sampled_from(kinds)), min_size=1,
                                                  max_size=max_hostile).map(tuple))
    return st.tuples(st.integers(0, 2**16), st.sampled_from(scales), st.sampled_from(offsets), hostile)


def no_hostile():
    """A plain normal tensor's spec (upstream gradients)."""
    return st.tuples(st.integers(0, 2**16), st.just(1.0), st.just(0.0), st.just(()))


def sizes(backend, zero=True, big=True):
    if backend == "triton":
        return st.sampled_from((1, 3, 2, 5) + ((0,) if zero else ()))
    return st.sampled_from((1, 3, 7, 13, 2) + ((33,) if big else ()) + ((0,) if zero else ()))


def batch_shape(backend, max_rank=3, big=False):
    """Batch dims of x: rank 0 (a single vector) to max_rank, 0-size dims included; big: up to 33**3 rows (the
    CPU kernels' threaded reductions)."""
    dim = st.sampled_from((3, 1, 7, 2, 0, 13) + ((33,) if big else ()) if backend != "triton" else (3, 1, 2, 0))
    rank = max_rank if backend != "triton" else min(max_rank, 2)
    return st.lists(dim, min_size=0, max_size=rank).map(tuple)


# ---- dense -------------------------------------------------------------------------------------------------------

DENSE_DTYPES = {"cpu": (F32, F64, BF16), "triton": (F32, F64)}


@st.composite
def dense_case(draw, backend, nonfinite, big=True):
    n_in = draw(sizes(backend))
    return dict(
        dtype=draw(st.sampled_from(DENSE_DTYPES.get(backend, (F32, F64)))),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        batch=draw(st.one_of(batch_shape(backend, big=big), st.just(None))),  # None: a 0-d x (an error)
        n_in=n_in, n_out=draw(sizes(backend)),
        bias=draw(st.booleans()), save=draw(st.sampled_from(("preact", "recompute"))),
        x=draw(tensor_spec(GEMM_FINITE, scales=(1.0, 0.0, 3.0, 1e-3, 10.0), nonfinite=nonfinite)),
        w=draw(tensor_spec(GEMM_FINITE, scales=(0.5, 1.0, 0.1), nonfinite=nonfinite, max_hostile=2)),
        b=draw(tensor_spec(BIAS_FINITE, scales=(1.0, 3.0, 10.0, 0.0), nonfinite=nonfinite)),
        g=draw(no_hostile()),
    )


def dense_inputs(case):
    dt, batch = case["dtype"], case["batch"]
    x_shape = () if batch is None else (*batch, case["n_in"])
    x = build(x_shape, case["x"], dt)
    w = build((case["n_out"], case["n_in"] if batch is not None else 1), case["w"], dt)
    b = build((case["n_out"],), case["b"], dt) if case["bias"] else None
    g = build((*(batch or ()), case["n_out"]), case["g"], dt)
    return x, w, b, g


def check_dense(case, backend, order=1):
    x, w, b, g = dense_inputs(case)
    act, dt, dev = case["activation"], case["dtype"], device_of(backend)
    # second order: the gradient of <first-order gradients, v> (Hessian-vector products, f'' of the activation)
    vs = [build(t.shape, (case["g"][0] + 1 + i, 1.0, 0.0, ()), dt) for i, t in enumerate((x, w, b)) if t is not None]

    def run(fn, xs, up, v):
        inputs = [t for t in xs if t is not None]
        y = fn(*xs)
        first = torch.autograd.grad(y, inputs, up, allow_unused=True, materialize_grads=True,
                                    create_graph=order > 1)
        if order == 1:
            return [y, *first]
        s = sum((a * c).sum() for a, c in zip(first, v))
        return [y, *first, *grads([s], inputs, [torch.ones_like(s)])]

    def torch_side(math_dtype, via=None):
        xs = leaves((x, w, b), math_dtype, via=via)
        return run(lambda x, w, b: torch_activation(act, F.linear(x, w, b)), xs, cast(g, math_dtype, via),
                   [cast(v, math_dtype, via) for v in vs])

    def fused_side():
        xs = leaves((x, w, b), dt, dev)
        return run(lambda x, w, b: dense(x, w, b, act, backend=backend, save=case["save"]), xs, g.to(dev),
                   [v.to(dev) for v in vs])

    names = ["y"] + [n for n, t in zip(("dx", "dW", "db"), (x, w, b)) if t is not None]
    if order > 1:
        names += ["d(dx.v)/d" + n[1:] for n in names[1:]]
    check_against_torch(names, torch_side, fused_side, dt, describe=lambda: dict(x=x, w=w, b=b, upstream=g, v=vs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_finite(backend):
    fuzz(backend, given(dense_case(backend, nonfinite=False))(lambda case: check_dense(case, backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_nonfinite(backend):
    fuzz(backend, given(dense_case(backend, nonfinite=True))(lambda case: check_dense(case, backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_second_order_finite(backend):
    fuzz(backend, given(dense_case(backend, False, big=False))(lambda case: check_dense(case, backend, order=2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_second_order_nonfinite(backend):
    fuzz(backend, given(dense_case(backend, True, big=False))(lambda case: check_dense(case, backend, order=2)))


# ---- mlp ---------------------------------------------------------------------------------------------------------

@st.composite
def mlp_case(draw, backend, nonfinite):
    widths = draw(st.lists(sizes(backend, zero=False), min_size=2, max_size=4))
    if draw(st.booleans()):
        widths[draw(st.integers(0, len(widths) - 1))] = 0  # a 0-size layer (or input)
    layers = len(widths) - 1
    per_layer = draw(st.booleans())
    hidden = draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=layers - 1, max_size=layers - 1)) if per_layer \
        else draw(st.sampled_from(ACTIVATIONS))
    return dict(
        dtype=draw(st.sampled_from(DENSE_DTYPES.get(backend, (F32, F64)))),
        widths=widths, activation=hidden, output_activation=draw(st.sampled_from(ACTIVATIONS)),
        batch=draw(st.one_of(batch_shape(backend), st.just(None))),
        bias=draw(st.booleans()), save=draw(st.sampled_from(("preact", "recompute"))),
        x=draw(tensor_spec(GEMM_FINITE, scales=(1.0, 0.0, 3.0, 10.0), nonfinite=nonfinite)),
        w=[draw(tensor_spec(GEMM_FINITE, scales=(0.5, 1.0), nonfinite=nonfinite, max_hostile=1))
           for _ in range(layers)],
        b=[draw(tensor_spec(BIAS_FINITE, scales=(1.0, 3.0, 0.0), nonfinite=nonfinite, max_hostile=2))
           for _ in range(layers)],
        g=draw(no_hostile()),
    )


def check_mlp(case, backend):
    dt, dev, widths, batch = case["dtype"], device_of(backend), case["widths"], case["batch"]
    x = build(() if batch is None else (*batch, widths[0]), case["x"], dt)
    ws = [build((n, m), spec, dt) for m, n, spec in zip(widths, widths[1:], case["w"])]
    bs = [build((n,), spec, dt) for n, spec in zip(widths[1:], case["b"])] if case["bias"] else None
    g = build((*(batch or ()), widths[-1]), case["g"], dt)
    layers = len(ws)
    hidden = [case["activation"]] * (layers - 1) if isinstance(case["activation"], str) else case["activation"]
    acts = [*hidden, case["output_activation"]]
    nb = 0 if bs is None else layers
    assume_phase_resolved(x, ws, bs, acts, dt)

    def split(ts):
        return ts[0], ts[1:1 + layers], (ts[1 + layers:] if bs is not None else None)

    def torch_side(math_dtype, via=None, plain=False, exact=False):
        ts = leaves([x, *ws, *(bs or [])], math_dtype, via=via)
        h, wl, bl = split(ts)
        for i, (w, a) in enumerate(zip(wl, acts)):
            h = reference_activation(a, F.linear(h, w, None if bl is None else bl[i]), plain, exact)
        return [h, *grads([h], ts, [cast(g, math_dtype, via)])]

    def fused_side():
        ts = leaves([x, *ws, *(bs or [])], dt, dev)
        h, wl, bl = split(ts)
        y = mlp(h, wl, bl, case["activation"], case["output_activation"], backend=backend, save=case["save"])
        return [y, *grads([y], ts, [g.to(dev)])]

    names = ["y", "dx", *(f"dW{i}" for i in range(layers)), *(f"db{i}" for i in range(nb))]
    # Variants: PyTorch's plain autograd (an infinite upstream times gelu_tanh's 0 * tanh(z) carrier beyond 10 is
    # NaN where f' = 1 gives inf: the long run); the activations' exact tails in the dtype (VARIANT_EXACT)
    variants = [lambda math_dtype: torch_side(math_dtype, plain=True),
                lambda math_dtype: torch_side(math_dtype, exact=True)]
    check_against_torch(names, torch_side, fused_side, dt, variants=variants,
                        describe=lambda: dict(x=x, weights=ws, biases=bs, activations=acts, upstream=g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_finite(backend):
    fuzz(backend, given(mlp_case(backend, nonfinite=False))(lambda case: check_mlp(case, backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_nonfinite(backend):
    fuzz(backend, given(mlp_case(backend, nonfinite=True))(lambda case: check_mlp(case, backend)))


# ---- mlp_jet (C++ kernels on CPU for float32/float64; bfloat16 runs the composite) -----------------------------------

@st.composite
def jet_case(draw, nonfinite):
    widths = draw(st.lists(st.sampled_from((1, 3, 7, 2, 13)), min_size=2, max_size=4))
    if draw(st.booleans()):
        widths[0] = 1  # one input feature: direction may be None (d/dx)
    layers = len(widths) - 1
    batch = draw(st.one_of(batch_shape("cpu", max_rank=2), st.just(None)))
    direction = draw(st.sampled_from(("vector", "per_row", "none", "broadcast")))
    return dict(
        dtype=draw(st.sampled_from((F32, F64, BF16))),
        widths=widths, activation=draw(st.sampled_from(ACTIVATIONS)),
        output_activation=draw(st.sampled_from(ACTIVATIONS)), batch=batch, direction=direction,
        bias=draw(st.booleans()),
        x=draw(tensor_spec(GEMM_FINITE, scales=(1.0, 0.0, 3.0), nonfinite=nonfinite)),
        d=draw(tensor_spec(GEMM_FINITE, scales=(1.0,), nonfinite=nonfinite, max_hostile=1)),
        w=[draw(tensor_spec(GEMM_FINITE, scales=(0.5, 1.0), nonfinite=nonfinite, max_hostile=1))
           for _ in range(layers)],
        b=[draw(tensor_spec(BIAS_FINITE, scales=(1.0, 3.0, 0.0), nonfinite=nonfinite, max_hostile=2))
           for _ in range(layers)],
        g=draw(no_hostile()),
    )


def jet_reference(x, direction, weights, biases, acts, plain=False, exact=False):
    """(u, du, d2u) layer by layer in plain PyTorch: z = W h + b, dz = W dh, d2z = W d2h; u = f(z),
    du = f'(z) dz, d2u = f''(z) dz^2 + f'(z) d2z, with f' and f'' by autograd of _Derivative (plain: of the
    activation itself; exact: EXACT_TAILS in any dtype). Terms that are zero by construction are left out rather
    than multiplied: d2z of the first layer, and f'' of a piecewise-linear activation (torch.func.jvp's zero
    tangents gave 0 * inf = nan there)."""
    h, dh, d2h = x, direction.expand_as(x), None
    for i, (w, a) in enumerate(zip(weights, acts)):
        z = F.linear(h, w, None if biases is None else biases[i])
        dz = F.linear(dh, w)
        d2z = None if d2h is None else F.linear(d2h, w)
        if not z.requires_grad:
            z.requires_grad_()
        u = reference_activation(a, z, plain, exact)
        (d1,) = torch.autograd.grad(u.sum(), z, create_graph=True)
        d2u = None if d2z is None else d1 * d2z
        if a not in PIECEWISE_LINEAR:
            (d2,) = torch.autograd.grad(d1.sum(), z, create_graph=True)
            d2u = d2 * dz * dz if d2u is None else d2 * dz * dz + d2u
        h, dh, d2h = u, d1 * dz, d2u
    return h, dh, torch.zeros_like(h) if d2h is None else d2h


def check_jet(case):
    dt, widths, batch = case["dtype"], case["widths"], case["batch"]
    kind = case["direction"] if case["direction"] != "none" or widths[0] == 1 else "vector"
    x_shape = () if batch is None else (*batch, widths[0])
    x = build(x_shape, case["x"], dt)
    d_shape = {"vector": (widths[0],), "per_row": x_shape, "none": (1,),
               "broadcast": (*((1,) * max(0, len(x_shape) - 1)), widths[0])}[kind]
    direction = build(d_shape, case["d"], dt)
    ws = [build((n, m), spec, dt) for m, n, spec in zip(widths, widths[1:], case["w"])]
    bs = [build((n,), spec, dt) for n, spec in zip(widths[1:], case["b"])] if case["bias"] else None
    out_shape = (*(batch or ()), widths[-1])
    gs = [build(out_shape, (case["g"][0] + i, 1.0, 0.0, ()), dt) for i in range(3)]
    layers = len(ws)
    acts = [case["activation"]] * (layers - 1) + [case["output_activation"]]
    with_d = kind != "none"
    assume_phase_resolved(x, ws, bs, acts, dt)

    def split(ts):
        return ts[0], ts[1], ts[2:2 + layers], (ts[2 + layers:] if bs is not None else None)

    def torch_side(math_dtype, via=None, each=False, plain=False, exact=False):
        ts = leaves([x, direction if with_d else torch.ones(1, dtype=dt), *ws, *(bs or [])], math_dtype, via=via)
        xx, dd, wl, bl = split(ts)
        outs = jet_reference(xx, dd, wl, bl, acts, plain, exact)
        return [*outs, *grads(outs, ts if with_d else [xx, *ts[2:]], [cast(g, math_dtype, via) for g in gs],
                              each=each)]

    def fused_side():
        ts = leaves([x, direction, *ws, *(bs or [])], dt)
        xx, dd, wl, bl = split(ts)
        outs = mlp_jet(xx, wl, bl, case["activation"], case["output_activation"], dd if with_d else None)
        return [*outs, *grads(outs, ts if with_d else [xx, *ts[2:]], gs)]

    names = ["u", "du", "d2u", "dx", *(["ddirection"] if with_d else []), *(f"dW{i}" for i in range(layers)),
             *(f"db{i}" for i in range(layers if bs is not None else 0))]
    # PyTorch's error includes the difference to each output's backward apart: one backward of all three through
    # silu's double backward lost the du term (5e59 of dx) to the d2u path's rounding at du = 1.5e30, where each
    # alone is exact (the long run). The reference takes each activation derivative as one product (_Derivative:
    # an infinite direction makes the sums of PyTorch's own double backward inf - inf); PyTorch's plain class is
    # accepted too, and that of the activations' exact tails in the dtype (VARIANT_EXACT)
    check_against_torch(names, torch_side, fused_side, dt, describe=lambda: dict(
        x=x, direction=direction if with_d else None, weights=ws, biases=bs, activations=acts, upstreams=gs),
        noise=[lambda math_dtype: torch_side(math_dtype, each=True)],
        variants=[lambda math_dtype: torch_side(math_dtype, plain=True),
                  lambda math_dtype: torch_side(math_dtype, exact=True)])


def test_mlp_jet_finite():
    fuzz("cpu", given(jet_case(nonfinite=False))(check_jet))


def test_mlp_jet_nonfinite():
    fuzz("cpu", given(jet_case(nonfinite=True))(check_jet))


# ---- cross_entropy -----------------------------------------------------------------------------------------------

CE_DTYPES = (F32, F64, BF16, F16)
OFFSETS = {F64: (0.0, 1e4, -1e4, 1e6, 30.0), F32: (0.0, 1e4, -1e4, 1e6, 30.0),
           BF16: (0.0, 1e4, -1e4, 1e6, 30.0), F16: (0.0, 1e3, -1e3, 1e4, 30.0)}
SMOOTHING = (0.0, 0.1, 1.0, 0.5, 0.03)
Z_LOSS = (0.0, 1e-4, 0.05, 1.0)
SOFTCAP = (None, 4.0, 1.0, 30.0)


def ce_options(draw, C):
    """The loss options both ops take; the class weights may be all zero, have zeros, or (nonfinite) an inf."""
    ignore_index = draw(st.sampled_from(("default", "class", "other")))
    ignore_index = {"default": -100, "class": draw(st.integers(0, max(C - 1, 0))), "other": -1}[ignore_index]
    return dict(
        ignore_index=ignore_index, reduction=draw(st.sampled_from(("mean", "none", "sum"))),
        label_smoothing=draw(st.sampled_from(SMOOTHING)), z_loss=draw(st.sampled_from(Z_LOSS)),
        softcap=draw(st.sampled_from(SOFTCAP)), return_lse=draw(st.booleans()),
    )


@st.composite
def targets_spec(draw):
    """(seed, ignored positions, all ignored, stray: a kept target outside [0, C): an error)"""
    return (draw(st.integers(0, 2**16)), tuple(draw(st.lists(st.integers(0, 1000), max_size=3))),
            draw(st.sampled_from((False, False, False, True))),
            draw(st.sampled_from((None,) * 8 + ("C", "-2", "big"))))


def build_targets(shape, C, spec, ignore_index):
    seed, ignored, all_ignored, stray = spec
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, max(C, 1), shape, generator=gen) if C else torch.full(shape, ignore_index)
    if t.numel():
        flat = t.view(-1)
        for p in ignored:
            flat[p % t.numel()] = ignore_index
        if all_ignored:
            flat[:] = ignore_index
        if stray is not None:
            flat[seed % t.numel()] = {"C": C, "-2": -2, "big": C + 1000}[stray]
    return t


def weight_spec(nonfinite):
    kinds = ("zero", "big", "denormal") + (("inf",) if nonfinite else ())
    return st.one_of(st.none(), st.just("zeros"),
                     st.tuples(st.integers(0, 2**16), st.just(1.0), st.just(0.0),
                               st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(kinds)),
                                        max_size=2).map(tuple)))


def build_weight(C, spec, dtype):
    if spec is None:
        return None
    if spec == "zeros":
        return torch.zeros(C, dtype=dtype)
    seed, _, _, hostile = spec
    w = (torch.rand(C, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 2 + 0.05).to(dtype)
    for pos, kind in hostile:
        if C:
            w[pos % C] = hostile_value(kind, dtype)
    return w


def _logsumexp(z, dim):
    """torch.logsumexp by its own formula (the same value), differentiated as exp(z - max) / sum: torch's backward,
    exp(z - lse), carries lse's rounding at the scale of the max (2e-12 relative at logits near 1e4 in float64),
    where fusedlayers' gradients are exact (README, "Accuracy")."""
    if z.shape[dim] == 0:
        return torch.logsumexp(z, dim)
    m = z.detach().amax(dim, keepdim=True)
    m = m.masked_fill(m.isinf(), 0)
    return (torch.log(torch.exp(z - m).sum(dim, keepdim=True)) + m).squeeze(dim)


def ce_reference(z, t, w, ignore_index, reduction, label_smoothing, z_loss, softcap, class_dim, plain=False,
                 exact=False):
    """F.cross_entropy of the (capped) logits plus z_loss * lse**2 per kept sample, weighted and reduced like the
    loss (README: cross_entropy); and lse, the logsumexp of each sample's (capped) logits. The cap's tanh as
    reference_activation(plain, exact) takes it."""
    if z.dim() == 3 and z.shape[1] == 0:  # torch's (N, 0, d) path raises a spurious size mismatch; (N, 0, d, 1) not
        loss, lse = ce_reference(z.unsqueeze(-1), t.unsqueeze(-1), w, ignore_index, reduction, label_smoothing, z_loss,
                                 softcap, class_dim, plain, exact)
        return (loss.squeeze(-1) if reduction == "none" else loss), lse.squeeze(-1)
    if softcap is not None:  # tanh with exact float64 tails: 1 - tanh^2 cancels where the logits pass ~8 caps
        z = softcap * reference_activation("tanh", z / softcap, plain, exact)
    if reduction == "mean" and w is not None and w.dtype == F64 and w.numel() and 0 < w.abs().max() < 1:
        # the same mean without denormal products and sums (torch's float64 lost 1e-14 relative on weights of 1e-310)
        w = w / w.abs().max()
    loss = F.cross_entropy(z, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    lse = _logsumexp(z, class_dim)
    if z_loss:
        kept = t != ignore_index
        C = z.shape[class_dim]
        if w is None or C == 0:
            wt = kept.to(z.dtype)
        else:
            wt = torch.where(kept, w[torch.where(kept, t, 0).clamp(0, C - 1)], 0)
        # z_loss * lse * lse, not lse**2: its gradient 2 z_loss lse stays finite where lse**2 alone overflows
        per = torch.where(kept, z_loss * wt * lse * lse, 0)
        loss = loss + {"none": per, "sum": per.sum(), "mean": per.sum() / wt.sum()}[reduction]
    return loss, lse


def ce_variants(torch_side, softcap):
    """The losses' variants (rule 1): the softcap's tanh by PyTorch's plain autograd, and with its exact tails."""
    if softcap is None:
        return []
    return [lambda math_dtype: torch_side(math_dtype, plain=True),
            lambda math_dtype: torch_side(math_dtype, exact=True)]


@st.composite
def ce_case(draw, backend, nonfinite):
    dtype = draw(st.sampled_from(CE_DTYPES))
    layout = draw(st.sampled_from(("NC", "C", "NCd", "NCdd", "0d")))
    C = draw(sizes(backend, zero=True))
    N = draw(sizes(backend, zero=True))
    extra = {"NC": (), "C": (), "NCd": (draw(sizes(backend)),), "NCdd": (draw(sizes(backend, big=False)), 2),
             "0d": ()}[layout]
    shape = {"C": (C,), "0d": ()}.get(layout, (N, C, *extra))
    return dict(dtype=dtype, layout=layout, shape=shape, C=C if layout != "0d" else 1,
                logits=draw(tensor_spec(LOGIT_FINITE, scales=(3.0, 1.0, 0.0, 10.0, 30.0), offsets=OFFSETS[dtype],
                                        nonfinite=nonfinite)),
                target=draw(targets_spec()), weight=draw(weight_spec(nonfinite)), upstream=draw(no_hostile()),
                **ce_options(draw, C))


def ce_upstreams(loss_shape, lse_shape, seed, return_lse, dtype):
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(loss_shape, dtype=F64, generator=gen).to(dtype)]
    if return_lse:
        g.append(torch.randn(lse_shape, dtype=F64, generator=gen).to(dtype))
    return g


def check_ce(case, backend):
    dt, dev, C, shape = case["dtype"], device_of(backend), case["C"], case["shape"]
    x = build(shape, case["logits"], dt)
    t_shape = () if len(shape) <= 1 else (shape[0], *shape[2:])
    t = build_targets(t_shape, C, case["target"], case["ignore_index"])
    w = build_weight(C, case["weight"], dt)
    opts = {k: case[k] for k in ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap")}
    per_sample = t_shape
    loss_shape = per_sample if case["reduction"] == "none" else ()
    gs = ce_upstreams(loss_shape, per_sample, case["upstream"][0], case["return_lse"], dt)

    def torch_side(math_dtype, via=None, plain=False, exact=False):
        (xx,) = leaves([x], math_dtype, via=via)
        loss, lse = ce_reference(xx, t, cast(w, math_dtype, via), class_dim=0 if x.dim() == 1 else 1, plain=plain,
                                 exact=exact, **opts)
        outs = [loss, lse] if case["return_lse"] else [loss]
        return [*outs, *grads(outs, [xx], [cast(g, math_dtype, via) for g in gs])]

    def fused_side():
        (xx,) = leaves([x], dt, dev)
        out = cross_entropy(xx, t.to(dev), None if w is None else w.to(dev), return_lse=case["return_lse"],
                            backend=backend, **opts)
        outs = list(out) if case["return_lse"] else [out]
        return [*outs, *grads(outs, [xx], [g.to(dev) for g in gs])]

    names = ["loss", "lse"] if case["return_lse"] else ["loss"]
    # the cap's derivative one product (an infinite upstream times PyTorch's 1 - tanh^2 = 0 is NaN where the
    # exact derivative gives inf: the long run), PyTorch's plain autograd and the exact tails in the dtype accepted
    check_against_torch(names + ["dlogits"], torch_side, fused_side, dt, "cross_entropy",
                        "0-d input" if x.dim() == 0 else "", nonnegative=("loss",),
                        variants=ce_variants(torch_side, case["softcap"]),
                        describe=lambda: dict(logits=x, target=t, weight=w, options=opts, upstreams=gs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_finite(backend):
    fuzz(backend, given(ce_case(backend, nonfinite=False))(lambda case: check_ce(case, backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_nonfinite(backend):
    fuzz(backend, given(ce_case(backend, nonfinite=True))(lambda case: check_ce(case, backend)))


@st.composite
def soft_ce_case(draw, backend, nonfinite):
    """Class-probability targets: a softmax of random values, a mix of two one-hots (mixup), or raw values (any
    sign, hostile ones too), differentiated too when target_grad."""
    dtype = draw(st.sampled_from(CE_DTYPES))
    layout = draw(st.sampled_from(("NC", "C", "NCd", "NCdd")))
    C, N = draw(sizes(backend, zero=True)), draw(sizes(backend, zero=True))
    extra = {"NC": (), "C": (), "NCd": (draw(sizes(backend)),), "NCdd": (draw(sizes(backend, big=False)), 2)}[layout]
    return dict(dtype=dtype, shape=(C,) if layout == "C" else (N, C, *extra), C=C,
                logits=draw(tensor_spec(LOGIT_FINITE, scales=(3.0, 1.0, 0.0, 10.0, 30.0), offsets=OFFSETS[dtype],
                                        nonfinite=nonfinite)),
                kind=draw(st.sampled_from(("softmax", "mixup", "raw"))),
                target=draw(tensor_spec(GEMM_FINITE, scales=(1.0, 0.1, 0.0), nonfinite=nonfinite, max_hostile=2)),
                weight=draw(weight_spec(nonfinite)), upstream=draw(no_hostile()),
                reduction=draw(st.sampled_from(("mean", "none", "sum"))),
                label_smoothing=draw(st.sampled_from(SMOOTHING)), return_lse=draw(st.booleans()),
                target_grad=draw(st.booleans()))


def build_probabilities(shape, kind, spec, dtype):
    class_dim = 0 if len(shape) == 1 else 1
    if kind == "raw" or 0 in shape:
        return build(shape, spec, dtype)
    gen = torch.Generator().manual_seed(spec[0])
    if kind == "softmax":
        return (torch.randn(shape, dtype=F64, generator=gen) * 2).softmax(class_dim).to(dtype)
    C = shape[class_dim]
    picks = [F.one_hot(torch.randint(0, C, shape[:class_dim] + shape[class_dim + 1:], generator=gen), C)
             .movedim(-1, class_dim).to(F64) for _ in range(2)]
    lam = torch.rand((), dtype=F64, generator=gen)
    return (lam * picks[0] + (1 - lam) * picks[1]).to(dtype)


def exact_complement(dlogits, x, t, w, class_dim, upstream, lse_upstream, reduction, label_smoothing):
    """dlogits (PyTorch's float64 gradient of the soft-target loss) with its value at each row's single maximum
    made exact: there Q p - q cancels. float64's p carries 1 ulp of 1 (p = 1 - 1.5e-22 is 1, so a weight of 1e30
    left Q (1 - p) = 3e5 out of a gradient whose classes no longer summed to 0), and Q 1 ulp of itself (at Q = 355,
    most of Q - q = 0.8). There the value is taken as g ((Q - q) - Q r) + g_lse p, with Q - q the other classes'
    q summed and r their p summed: no term cancels."""
    x, t = x.detach(), t.detach()
    C = x.shape[class_dim]
    q = (1 - label_smoothing) * t + label_smoothing / C
    if w is not None:
        q = q * w.detach().reshape([C if d == class_dim else 1 for d in range(x.dim())])
    Q = q.sum(class_dim, keepdim=True)
    p = x.softmax(class_dim)
    top = x == x.amax(class_dim, keepdim=True)
    r = torch.where(top, 0.0, p).sum(class_dim, keepdim=True)
    others = torch.where(top, 0.0, q).sum(class_dim, keepdim=True)

    def per_row(g):
        return g.detach().to(F64).unsqueeze(class_dim) if g.dim() else g.detach().to(F64)

    g = per_row(upstream)
    if reduction != "none":
        g = g / (x.numel() // max(C, 1) if reduction == "mean" else 1)
    value = g * (others - Q * r)
    if lse_upstream is not None:
        value = value + per_row(lse_upstream) * p
    # -inf logits are p = 0 terms of r (PyTorch's float64 lost a 1e30-weighted row's other q, 0.04, to Q's
    # rounding next to a -inf logit: the long run); NaN, +inf, or -inf everywhere make the whole row NaN
    fix = top & (top.sum(class_dim, keepdim=True) == 1) & ~(x.isnan() | x.isposinf()).any(class_dim, keepdim=True) \
        & x.amax(class_dim, keepdim=True).isfinite() & Q.isfinite() & q.isfinite().all(class_dim, keepdim=True)
    return torch.where(fix, value, dlogits)


def check_soft_ce(case, backend):
    dt, dev, C, shape = case["dtype"], device_of(backend), case["C"], case["shape"]
    x = build(shape, case["logits"], dt)
    t = build_probabilities(shape, case["kind"], case["target"], dt)
    w = build_weight(C, case["weight"], dt)
    opts = dict(reduction=case["reduction"], label_smoothing=case["label_smoothing"])
    per_sample = () if len(shape) == 1 else (shape[0], *shape[2:])
    gs = ce_upstreams(per_sample if case["reduction"] == "none" else (), per_sample, case["upstream"][0],
                      case["return_lse"], dt)
    wrt = 2 if case["target_grad"] else 1

    class_dim = 0 if len(shape) == 1 else 1

    def torch_side(math_dtype, via=None, flip=False):
        xx, tt = leaves([x, t], math_dtype, via=via)
        ww = cast(w, math_dtype, via)
        turn = (lambda v: v.flip(class_dim)) if flip else (lambda v: v)  # noqa: E731
        outs = [F.cross_entropy(turn(xx), turn(tt), None if ww is None else ww.flip(0) if flip else ww, **opts)]
        if case["return_lse"]:
            outs.append(_logsumexp(xx, class_dim))
        ups = [cast(g, math_dtype, via) for g in gs]
        dx, *rest = grads(outs, [xx, tt][:wrt], ups)
        if math_dtype == F64 and 0 not in shape:
            dx = exact_complement(dx, xx, tt, ww, class_dim, ups[0], ups[1] if case["return_lse"] else None,
                                  case["reduction"], case["label_smoothing"])
        return [*outs, dx, *rest]

    def fused_side():
        xx, tt = leaves([x, t], dt, dev)
        out = cross_entropy(xx, tt, None if w is None else w.to(dev), return_lse=case["return_lse"], backend=backend,
                            **opts)
        outs = list(out) if case["return_lse"] else [out]
        return [*outs, *grads(outs, [xx, tt][:wrt], [g.to(dev) for g in gs])]

    names = (["loss", "lse"] if case["return_lse"] else ["loss"]) + ["dlogits", "dtarget"][:wrt]
    # PyTorch's error includes its own with the classes in reverse order (the same loss, other sums): Q p - q
    # cancels where p ~ 1, and PyTorch's rounding of Q there is luck of the order (found by the long run)
    check_against_torch(names, torch_side, fused_side, dt, "cross_entropy", "probabilities",
                        describe=lambda: dict(logits=x, target=t, weight=w, options=opts, upstreams=gs),
                        noise=[lambda math_dtype: torch_side(math_dtype, flip=True)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_probabilities_finite(backend):
    fuzz(backend, given(soft_ce_case(backend, nonfinite=False))(lambda case: check_soft_ce(case, backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_probabilities_nonfinite(backend):
    fuzz(backend, given(soft_ce_case(backend, nonfinite=True))(lambda case: check_soft_ce(case, backend)))


# ---- linear_cross_entropy ----------------------------------------------------------------------------------------

@st.composite
def lce_case(draw, backend, nonfinite):
    dtype = draw(st.sampled_from(CE_DTYPES))
    V = draw(sizes(backend, zero=True))
    return dict(dtype=dtype, batch=draw(batch_shape(backend)), H=draw(sizes(backend, zero=True)), V=V,
                bias=draw(st.booleans()), chunk_size=draw(st.sampled_from((None, 1, 2, 3, 7))),
                hidden=draw(tensor_spec(GEMM_FINITE, scales=(1.0, 3.0, 0.0), nonfinite=nonfinite)),
                weight=draw(tensor_spec(GEMM_FINITE, scales=(1.0, 0.3, 3.0), nonfinite=nonfinite, max_hostile=2)),
                b=draw(tensor_spec(LOGIT_FINITE, scales=(1.0, 3.0, 0.0), offsets=OFFSETS[dtype],
                                   nonfinite=nonfinite, max_hostile=2)),
                target=draw(targets_spec()), class_weight=draw(weight_spec(nonfinite)), upstream=draw(no_hostile()),
                **ce_options(draw, V))


def check_lce(case, backend):
    dt, dev, V, H, batch = case["dtype"], device_of(backend), case["V"], case["H"], case["batch"]
    h = build((*batch, H), case["hidden"], dt)
    w = build((V, H), case["weight"], dt)
    b = build((V,), case["b"], dt) if case["bias"] else None
    t = build_targets(batch, V, case["target"], case["ignore_index"])
    cw = build_weight(V, case["class_weight"], dt)
    opts = {k: case[k] for k in ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap")}
    loss_shape = batch if case["reduction"] == "none" else ()
    gs = ce_upstreams(loss_shape, batch, case["upstream"][0], case["return_lse"], dt)
    inputs = (h, w, b)

    def torch_side(math_dtype, via=None, plain=False, exact=False):
        ts = leaves(inputs, math_dtype, via=via)
        logits = F.linear(*ts).reshape(math.prod(batch), V)
        loss, lse = ce_reference(logits, t.reshape(-1), cast(cw, math_dtype, via), class_dim=1, plain=plain,
                                 exact=exact, **opts)
        loss = loss.reshape(batch) if case["reduction"] == "none" else loss
        outs = [loss, lse.reshape(batch)] if case["return_lse"] else [loss]
        return [*outs, *grads(outs, [v for v in ts if v is not None], [cast(g, math_dtype, via) for g in gs])]

    def fused_side():
        ts = leaves(inputs, dt, dev)
        out = linear_cross_entropy(ts[0], ts[1], t.to(dev), ts[2], None if cw is None else cw.to(dev),
                                   return_lse=case["return_lse"], chunk_size=case["chunk_size"], backend=backend,
                                   **opts)
        outs = list(out) if case["return_lse"] else [out]
        return [*outs, *grads(outs, [v for v in ts if v is not None], [g.to(dev) for g in gs])]

    names = (["loss", "lse"] if case["return_lse"] else ["loss"]) + ["dhidden", "dweight"] + (["dbias"] if case["bias"]
                                                                                            else [])
    check_against_torch(names, torch_side, fused_side, dt, "linear_cross_entropy", nonnegative=("loss",),
                        variants=ce_variants(torch_side, case["softcap"]),
                        describe=lambda: dict(hidden=h, weight=w, bias=b, target=t, class_weight=cw, options=opts,
                                              chunk_size=case["chunk_size"], upstreams=gs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_finite(backend):
    fuzz(backend, given(lce_case(backend, nonfinite=False))(lambda case: check_lce(case, backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_nonfinite(backend):
    fuzz(backend, given(lce_case(backend, nonfinite=True))(lambda case: check_lce(case, backend)))
