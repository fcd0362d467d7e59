"""The softmax cross-entropy op family in Triton: the kernels of the triton_cross_entropy_* ops, with the per-row
formulas of csrc/ops/cross_entropy.cpp ("Softmax cross-entropy"); the reductions are torch ops around them
(fusedlayers/ops/cross_entropy.py).

One program per row, looping over the classes in BLOCK-sized chunks. Forward: one pass with an online max and
sum of exponentials (one exp per logit); with label smoothing the same pass also sums w[c] * (z[c] - max), kept
relative to the running max so that no large terms cancel. Backward: a pass summing
exp(z - lse), whose log is lse's rounding error (at the scale of the largest logit), then one writing
scale * (softmax - smoothed onehot) with softmax = exp(z - lse - that log).

Math in float32 for float16/bfloat16/float32 logits (loaded and converted) and float64 for float64; loss and lse
in that math dtype, the gradient in the logits' dtype. The float options arrive as float64 kernel arguments and
are rounded once to the math dtype, so float64 runs see them exactly.

A kept target outside [0, C) is an error without a host synchronization: on a GPU the kernels are compiled with
debug=True so that their tl.device_assert is live (a device-side assert, as PyTorch's own CUDA losses), and the
out-of-range logit is never read; under the interpreter (CPU tensors, no device to wait for) tl.device_assert
does nothing, so the host checks the targets first. Importing this module registers the kernels for the CPU
(TRITON_INTERPRET=1) and CUDA keys.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.cross_entropy import (ce_math_dtype, ce_reduce_rows, ce_row_grad_loss, check_ce_backward_rows,
                                 check_ce_reduction, check_cross_entropy_args, check_soft_ce_backward_rows,
                                 check_soft_cross_entropy_args)
from .activations import _sech2, _tanh

# Classes per chunk, by math dtype: the largest block a program loops with (smaller C use the next power of two
# >= C); fixed, so that the kernels can be compiled ahead of time.
MAX_BLOCK = {torch.float32: 4096, torch.float64: 2048}
# Elements of a chunk per thread (float64 takes two registers each): num_warps = BLOCK / (32 * this), 1 to 8.
# 8 warps at the largest blocks keep both kernels within ~80 registers (float32) and ~130 (float64) on sm_80/90.
ELEMENTS_PER_THREAD = {torch.float32: 16, torch.float64: 8}

# Compile options of every launch: on a GPU, debug=True compiles the target's tl.device_assert in and
# sanitize_overflow=False keeps debug from also asserting on every int32 operation; the interpreter ignores both.
COMPILE_OPTIONS = dict(debug=True, sanitize_overflow=False)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def launch_config(num_classes: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) of both kernels for C = num_classes and logits of `dtype`."""
    math_dtype = ce_math_dtype(dtype)
    block = min(MAX_BLOCK[math_dtype], max(16, triton.next_power_of_2(num_classes)))
    return block, min(8, max(1, block // (32 * ELEMENTS_PER_THREAD[math_dtype])))


@triton.jit
def _row_target(target_ptr, weight_ptr, row, C, ignore_index, HAS_WEIGHT: tl.constexpr, MATH: tl.constexpr):
    """(t, kept, valid, w[t]) of a row, w[t] in the dtype MATH (1 without a weight, 0 if not valid);
    valid = kept and t in [0, C), asserted on a GPU for every kept t."""
    t = tl.load(target_ptr + row)
    kept = t != ignore_index
    in_range = (t >= 0) & (t < C)
    tl.device_assert(in_range | (t == ignore_index), "cross_entropy: a target is out of bounds [0, C)")
    valid = kept & in_range
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t, mask=valid, other=0.0).to(MATH)
    else:
        w_t = tl.full((), 1.0, MATH)
    return t, kept, valid, w_t


@triton.jit
def _logits(row_ptr, cs, mask, cap, MATH: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The (capped) logits z of one chunk of a row, in MATH; masked lanes hold a finite placeholder."""
    z = tl.load(row_ptr + cs, mask=mask, other=0.0).to(MATH)
    if HAS_SOFTCAP:
        z = cap * _tanh(z / cap)
    return z


@triton.jit
def _cross_entropy_forward_kernel(logits_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, C,
                                  ignore_index: tl.int64, label_smoothing: tl.float64, z_loss: tl.float64,
                                  softcap: tl.float64, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                                  HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """loss[row] and lse[row] of one row of logits (N, C); loss and lse have the math dtype."""
    MATH: tl.constexpr = lse_ptr.dtype.element_ty  # float32, or float64 for float64 logits
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * C  # int64: N * C can pass 2^31
    cols = tl.arange(0, BLOCK)
    cap = tl.full((), softcap, MATH)
    m = tl.full((), float("-inf"), MATH)  # the running max
    # ref: the running max, or 0 while that is -inf (no -inf - -inf); s = sum exp(z - ref); with smoothing
    # wz = sum w * (z - ref) and w_sum = sum w, over the chunks so far
    ref = tl.full((), 0.0, MATH)
    s = tl.full((), 0.0, MATH)
    wz = tl.full((), 0.0, MATH)
    w_sum = tl.full((), 0.0, MATH)
    for c0 in range(0, C, BLOCK):
        cs = c0 + cols
        mask = cs < C
        z = tl.where(mask, _logits(row_ptr, cs, mask, cap, MATH, HAS_SOFTCAP), float("-inf"))
        m = tl.maximum(m, tl.max(z, axis=0))
        new_ref = tl.where(m == float("-inf"), 0.0, m)
        # s == 0 until a finite logit: its rescale from ref = 0 to a max below -88 (-709) would be 0 * inf
        s = tl.where(s == 0.0, 0.0, s * tl.exp(ref - new_ref)) + tl.sum(tl.exp(z - new_ref), axis=0)
        if HAS_SMOOTHING:
            shifted = tl.where(mask, z - new_ref, 0.0)  # masked lanes: 0, not -inf
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cs, mask=mask, other=0.0).to(MATH)
                wz += (ref - new_ref) * w_sum + tl.sum(w * shifted, axis=0)
                w_sum += tl.sum(w, axis=0)
            else:
                wz += (ref - new_ref) * c0 + tl.sum(shifted, axis=0)
        ref = new_ref
    # The max skips NaN on the GPU: only a +inf max hides one (the sum carries it otherwise), so that rare row
    # is read again; +inf without a NaN, as torch.logsumexp
    if ref == float("inf"):
        for c0 in range(0, C, BLOCK):
            cs = c0 + cols
            z = _logits(row_ptr, cs, cs < C, cap, MATH, HAS_SOFTCAP)
            ref = tl.where(tl.sum((z != z).to(tl.int32), axis=0) > 0, float("nan"), ref)
    log_s = tl.log(s)
    lse = tl.where(ref == float("inf"), ref, ref + log_s)

    t, kept, valid, w_t = _row_target(target_ptr, weight_ptr, row, C, ignore_index, HAS_WEIGHT, MATH)
    z_t = tl.load(row_ptr + t, mask=valid, other=0.0).to(MATH)
    if HAS_SOFTCAP:
        z_t = cap * _tanh(z_t / cap)
    # lse - z[c] as log_s - (z[c] - ref): no cancellation of lse against z[c] when the logits are large
    nll = log_s - (z_t - ref)
    if HAS_SMOOTHING:
        eps = tl.full((), label_smoothing, MATH)
        if not HAS_WEIGHT:
            w_sum = tl.full((), C, MATH)
        # eps / C * sum_c w[c] * (lse - z[c]) = eps / C * (W * log_s - wz), terms of one sign
        smooth = w_sum * log_s - wz
        if HAS_WEIGHT:
            # an inf class weight makes that inf - inf where its logit is the max: that rare row sums the parts
            # w[c] (log_s - (z[c] - ref)), each >= 0, in a second pass
            if (w_sum != w_sum) | (w_sum == float("inf")) | (w_sum == float("-inf")):
                smooth = tl.full((), 0.0, MATH)
                for c0 in range(0, C, BLOCK):
                    cs = c0 + cols
                    mask = cs < C
                    w = tl.load(weight_ptr + cs, mask=mask, other=0.0).to(MATH)
                    part = log_s - (_logits(row_ptr, cs, mask, cap, MATH, HAS_SOFTCAP) - ref)
                    smooth += tl.sum(tl.where(mask, w * part, 0.0), axis=0)
        loss = w_t * (1.0 - eps) * nll + eps / C * smooth
    else:
        loss = w_t * nll
    if HAS_Z_LOSS:
        loss += w_t * tl.full((), z_loss, MATH) * lse * lse
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_backward_kernel(grad_loss_ptr, grad_lse_ptr, logits_ptr, target_ptr, weight_ptr, w_sum_ptr,
                                   lse_ptr, grad_ptr, C, ignore_index: tl.int64, label_smoothing: tl.float64,
                                   z_loss: tl.float64, softcap: tl.float64, HAS_GRAD_LSE: tl.constexpr,
                                   HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
                                   HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """grad[row] = (b + r) p - b onehot(t) + e (W p - w), times sech2(logits / softcap) with a softcap, where
    p = exp((z - lse) - log sum exp(z - lse)) and, with g = grad_loss[row] (0 for an ignored row) and W = w_sum[0]
    (C without a weight): b = g w[t] (1 - eps), r = g w[t] 2 z_loss lse + grad_lse[row], e = g eps / C. Its terms
    kept apart: at the target (b p - b) + r p + e (W p - w[t]), a confident row's p = 1 keeps a small r (an lse
    gradient) next to a large b, and C = 1 with smoothing gives 0 exactly; elsewhere e (W p - w) is not folded into
    (b + r + e W) p - e w, where a 1e30 class weight's e W took b's digits (a gradient of 2.5e21 for 3.2).
    """
    MATH: tl.constexpr = lse_ptr.dtype.element_ty  # float32, or float64 for float64 logits
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    cap = tl.full((), softcap, MATH)
    t, kept, valid, w_t = _row_target(target_ptr, weight_ptr, row, C, ignore_index, HAS_WEIGHT, MATH)
    g = tl.where(kept, tl.load(grad_loss_ptr + row).to(MATH), 0.0)
    # W only with smoothing: an absent class's inf weight would make eps * W = 0 * inf a NaN in every gradient (with
    # smoothing PyTorch's are NaN too, ignored rows included); z_loss only in kept rows, where an inf lse is 0 * inf
    r = tl.full((), 0.0, MATH)
    if HAS_Z_LOSS:
        r = tl.where(kept, g * (w_t * 2.0 * tl.full((), z_loss, MATH) * lse), 0.0)
    if HAS_GRAD_LSE:
        r += tl.load(grad_lse_ptr + row).to(MATH)
    if HAS_SMOOTHING:
        eps = tl.full((), label_smoothing, MATH)
        b = g * (w_t * (1.0 - eps))
        if HAS_WEIGHT:
            W = tl.load(w_sum_ptr).to(MATH)
        else:
            W = tl.full((), C, MATH)
        e = g * (eps / C)
    else:
        b = g * w_t
    row_ptr = logits_ptr + row * C  # int64: N * C can pass 2^31
    grad_row = grad_ptr + row * C
    # log sum exp(z - lse): lse's rounding at the scale of the largest logit, which exp(z - lse) alone would carry
    # into every probability; z <= lse, so no term overflows
    s = tl.full((), 0.0, MATH)
    for c0 in range(0, C, BLOCK):
        cs = c0 + cols
        mask = cs < C
        s += tl.sum(tl.where(mask, tl.exp(_logits(row_ptr, cs, mask, cap, MATH, HAS_SOFTCAP) - lse), 0.0), axis=0)
    log_norm = tl.log(s)
    for c0 in range(0, C, BLOCK):
        cs = c0 + cols
        mask = cs < C
        z = tl.load(row_ptr + cs, mask=mask, other=0.0).to(MATH)
        if HAS_SOFTCAP:
            x = z / cap
            z = cap * _tanh(x)
        p = tl.exp((z - lse) - log_norm)
        at_t = (cs == t) & kept
        grad = tl.where(at_t, (b * p - b) + r * p, (b + r) * p)  # b p - b as PyTorch's (NaN: a mean over 0 weights)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cs, mask=mask, other=0.0).to(MATH)
            else:
                w = 1.0
            grad += e * (W * p - w)
        if HAS_SOFTCAP:
            grad *= _sech2(x)  # 1 - tanh^2 lost digits where the cap saturates (4x PyTorch's error at 3 caps)
        tl.store(grad_row + cs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _soft_q(target_row, weight_ptr, cs, mask, C, label_smoothing, v, HAS_WEIGHT: tl.constexpr,
            HAS_SMOOTHING: tl.constexpr, MATH: tl.constexpr):
    """((1 - eps) * target + eps / C) * v * w of one chunk of a row (0 in masked lanes): the weight last, as
    PyTorch's order (a zero v at a 1e30 target and a 1e30 weight gives 0)."""
    q = tl.load(target_row + cs, mask=mask, other=0.0).to(MATH)
    if HAS_SMOOTHING:
        eps = tl.full((), label_smoothing, MATH)
        q = (1.0 - eps) * q + eps / C
    q = q * v
    if HAS_WEIGHT:
        q = q * tl.load(weight_ptr + cs, mask=mask, other=0.0).to(MATH)
    return tl.where(mask, q, 0.0)


@triton.jit
def _cross_entropy_soft_forward_kernel(logits_ptr, target_ptr, weight_ptr, loss_ptr, lse_ptr, C,
                                       label_smoothing: tl.float64, HAS_WEIGHT: tl.constexpr,
                                       HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr):
    """Class-probability targets: loss[row] = sum_c q[c] (lse - z[c]) as sum_c q[c] (log s - (z[c] - max)), each term
    >= 0 for q >= 0 and none large at any logit scale; lse[row]."""
    MATH: tl.constexpr = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    row_ptr, t_row = logits_ptr + row * C, target_ptr + row * C
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), MATH)
    ref = tl.full((), 0.0, MATH)  # as in the forward above
    s = tl.full((), 0.0, MATH)
    for c0 in range(0, C, BLOCK):
        cs = c0 + cols
        z = tl.load(row_ptr + cs, mask=cs < C, other=float("-inf")).to(MATH)
        m = tl.maximum(m, tl.max(z, axis=0))
        new_ref = tl.where(m == float("-inf"), 0.0, m)
        s = tl.where(s == 0.0, 0.0, s * tl.exp(ref - new_ref)) + tl.sum(tl.exp(z - new_ref), axis=0)
        ref = new_ref
    if ref == float("inf"):  # a NaN hidden by a +inf max, as above
        for c0 in range(0, C, BLOCK):
            cs = c0 + cols
            z = tl.load(row_ptr + cs, mask=cs < C, other=0.0)
            ref = tl.where(tl.sum((z != z).to(tl.int32), axis=0) > 0, float("nan"), ref)
    log_s = tl.log(s)
    loss = tl.full((), 0.0, MATH)
    for c0 in range(0, C, BLOCK):
        cs = c0 + cols
        mask = cs < C
        z = tl.load(row_ptr + cs, mask=mask, other=0.0).to(MATH)
        loss += tl.sum(_soft_q(t_row, weight_ptr, cs, mask, C, label_smoothing, log_s - (z - ref), HAS_WEIGHT,
                               HAS_SMOOTHING, MATH), axis=0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, tl.where(ref == float("inf"), ref, ref + log_s))


@triton.jit
def _soft_q_parts(target_row, weight_ptr, cs, mask, C, label_smoothing, HAS_WEIGHT: tl.constexpr,
                  HAS_SMOOTHING: tl.constexpr, MATH: tl.constexpr):
    """q = hi + lo of one chunk: the weight's product with the smoothed target and that product's rounding error
    (exact: in float64 for float32 math, by an FMA for float64)."""
    hi = _soft_q(target_row, weight_ptr, cs, mask, C, label_smoothing, 1.0, False, HAS_SMOOTHING, MATH)
    lo = tl.zeros_like(hi)
    if HAS_WEIGHT:  # (no early return: the compiler reads what follows one)
        w = tl.load(weight_ptr + cs, mask=mask, other=0.0).to(MATH)
        if MATH == tl.float32:
            exact = hi.to(tl.float64) * w.to(tl.float64)
            hi = exact.to(tl.float32)
            lo = (exact - hi.to(tl.float64)).to(tl.float32)
        else:
            hi, lo = hi * w, tl.fma(hi, w, -(hi * w))
        lo = tl.where((hi - hi) == 0.0, lo, 0.0)  # 0 where the product is not finite
    return hi, lo


@triton.jit
def _cross_entropy_soft_backward_kernel(grad_loss_ptr, grad_lse_ptr, logits_ptr, target_ptr, weight_ptr, lse_ptr,
                                        grad_ptr, C, label_smoothing: tl.float64, HAS_GRAD_LSE: tl.constexpr,
                                        HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr):
    """grad[row] = g (Q p - q) + grad_lse[row] p, g = grad_loss[row], Q = sum_c q[c], p renormalized as in the
    backward above. Q p - q cancels where p ~ 1 and q holds most of Q: Q (summed in float64) and each q are
    carried as hi + lo parts, and at the row's single maximum with p > 1/2 the value is (Q - q) - Q (1 - p) with
    Q - q the other classes' q summed and 1 - p their p (as the CPU kernel)."""
    MATH: tl.constexpr = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    row_ptr, t_row, grad_row = logits_ptr + row * C, target_ptr + row * C, grad_ptr + row * C
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_loss_ptr + row).to(MATH)
    s = tl.full((), 0.0, MATH)
    top = tl.full((), float("-inf"), MATH)
    sum_hi, sum_lo = tl.full((), 0.0, tl.float64), tl.full((), 0.0, tl.float64)
    for c0 in range(0, C, BLOCK):
        cs = c0 + cols
        mask = cs < C
        z = tl.load(row_ptr + cs, mask=mask, other=0.0).to(MATH)
        s += tl.sum(tl.where(mask, tl.exp(z - lse), 0.0), axis=0)
        top = tl.maximum(top, tl.max(tl.where(mask, z, float("-inf")), axis=0))
        hi, lo = _soft_q_parts(t_row, weight_ptr, cs, mask, C, label_smoothing, HAS_WEIGHT, HAS_SMOOTHING, MATH)
        sum_hi += tl.sum(hi.to(tl.float64), axis=0)
        sum_lo += tl.sum(lo.to(tl.float64), axis=0)
    q_hi = sum_hi.to(MATH)
    q_lo = tl.where((q_hi - q_hi) == 0.0, ((sum_hi - q_hi.to(tl.float64)) + sum_lo).to(MATH), 0.0)
    log_norm = tl.log(s)
    g_lse = tl.load(grad_lse_ptr + row).to(MATH) if HAS_GRAD_LSE else tl.full((), 0.0, MATH)
    rest = tl.full((), 0.0, tl.float64)  # float64: a float32 sum over thousands of classes drifts
    maxima, at_max = tl.full((), 0, tl.int32), tl.full((), 0, tl.int64)
    others_hi, others_lo = tl.full((), 0.0, tl.float64), tl.full((), 0.0, tl.float64)
    p_m = tl.full((), 0.0, MATH)
    for c0 in range(0, C, BLOCK):
        cs = c0 + cols
        mask = cs < C
        z = tl.load(row_ptr + cs, mask=mask, other=0.0).to(MATH)
        hi, lo = _soft_q_parts(t_row, weight_ptr, cs, mask, C, label_smoothing, HAS_WEIGHT, HAS_SMOOTHING, MATH)
        p = tl.exp((z - lse) - log_norm)
        # Q p - q rounded once, not g Q p - g q: an FMA of that left g q's rounding
        grad = g * (tl.fma(q_hi, p, -hi) + tl.fma(q_lo, p, -lo))
        if HAS_GRAD_LSE:
            grad += g_lse * p
        tl.store(grad_row + cs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        is_top = mask & (z == top)
        rest += tl.sum(tl.where(mask & (z != top), p, 0.0).to(tl.float64), axis=0)
        maxima += tl.sum(is_top.to(tl.int32), axis=0)
        at_max = tl.maximum(at_max, tl.max(tl.where(is_top, cs, 0).to(tl.int64), axis=0))
        others_hi += tl.sum(tl.where(mask & (z != top), hi, 0.0).to(tl.float64), axis=0)
        others_lo += tl.sum(tl.where(mask & (z != top), lo, 0.0).to(tl.float64), axis=0)
        p_m += tl.sum(tl.where(is_top, p, 0.0), axis=0)
    fix = (maxima == 1) & (rest < 0.5) & ((top - top) == 0.0) & ((q_hi - q_hi) == 0.0)
    d = (others_hi + others_lo).to(MATH) - (q_hi + q_lo) * rest.to(MATH)
    tl.store(grad_row + at_max, (g * d + g_lse * p_m).to(grad_ptr.dtype.element_ty), mask=fix)


def _check_args(logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float,
                softcap: float | None) -> None:
    """The checks of every cross-entropy kernel, and the dtypes Triton supports."""
    check_cross_entropy_args(logits, target, weight, label_smoothing, softcap)
    _check_dtype(logits)


def _check_dtype(logits: Tensor) -> None:
    torch._check(logits.dtype in _DTYPES,
                 lambda: f"cross_entropy(): the Triton backend supports float16, bfloat16, float32 and float64 "
                         f"logits, got {logits.dtype}")


def _check_targets_in_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Host check of the kept targets, for CPU tensors only (the interpreter ignores tl.device_assert); on a GPU
    the kernels assert on the device, since reading the targets here would synchronize."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        t = int(target[bad][0])
        raise IndexError(f"cross_entropy(): target {t} is out of bounds: expected a class in [0, {num_classes}) or "
                         f"ignore_index ({ignore_index})")


def _launch(kernel, logits: Tensor, *args, **meta) -> None:
    rows, num_classes = logits.shape
    block, num_warps = launch_config(num_classes, logits.dtype)
    kernel[(rows,)](*args, BLOCK=block, num_warps=num_warps, **COMPILE_OPTIONS, **meta)


def _forward_rows(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                  label_smoothing: float, z_loss: float, softcap: float | None) -> tuple[Tensor, Tensor]:
    """Per-row (loss, lse) of contiguous logits and target, in the math dtype."""
    rows, num_classes = logits.shape
    if not logits.is_cuda:
        _check_targets_in_range(target, num_classes, ignore_index)
    math_dtype = ce_math_dtype(logits.dtype)
    loss = logits.new_empty(rows, dtype=math_dtype)
    lse = logits.new_empty(rows, dtype=math_dtype)
    if rows > 0:
        _launch(_cross_entropy_forward_kernel, logits, logits, target, None if weight is None else weight.contiguous(),
                loss, lse, num_classes, ignore_index, label_smoothing, z_loss, 1.0 if softcap is None else softcap,
                HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0, HAS_Z_LOSS=z_loss != 0.0,
                HAS_SOFTCAP=softcap is not None)
    return loss, lse


def _backward_into(grad: Tensor, grad_loss: Tensor, grad_lse: Tensor | None, logits: Tensor, target: Tensor,
                   weight: Tensor | None, lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                   softcap: float | None) -> None:
    """The backward kernel into grad (contiguous; it may be logits itself: each element is read before it is
    written), from per-row grad_loss and lse."""
    if grad.numel() == 0:
        return
    num_classes = logits.shape[1]
    smoothing = label_smoothing != 0.0
    # sum(weight) on the device: the backward needs it before its one pass over the row
    w_sum = weight.sum(dtype=lse.dtype).reshape(1) if weight is not None and smoothing else None
    _launch(_cross_entropy_backward_kernel, logits, grad_loss, None if grad_lse is None else grad_lse.contiguous(),
            logits, target, None if weight is None else weight.contiguous(), w_sum, lse.contiguous(), grad,
            num_classes, ignore_index, label_smoothing, z_loss, 1.0 if softcap is None else softcap,
            HAS_GRAD_LSE=grad_lse is not None, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=smoothing,
            HAS_Z_LOSS=z_loss != 0.0, HAS_SOFTCAP=softcap is not None)


def cross_entropy_forward(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                          label_smoothing: float, z_loss: float, softcap: float | None,
                          reduction: str) -> tuple[Tensor, Tensor]:
    """The kernel of fusedlayers::triton_cross_entropy_forward: (loss, lse) in the math dtype, loss reduced."""
    _check_args(logits, target, weight, label_smoothing, softcap)
    check_ce_reduction(reduction)
    loss, lse = _forward_rows(logits.contiguous(), target.contiguous(), weight, ignore_index, label_smoothing, z_loss,
                              softcap)
    return ce_reduce_rows(loss, target, weight, ignore_index, reduction, label_smoothing), lse


def cross_entropy_forward_grad(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                               label_smoothing: float, z_loss: float, softcap: float | None, reduction: str,
                               grad: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel of fusedlayers::triton_cross_entropy_forward_grad: the forward, then the gradient of the loss
    written into grad, which may be the logits themselves (two passes over them)."""
    _check_args(logits, target, weight, label_smoothing, softcap)
    check_ce_reduction(reduction)
    torch._check(grad.shape == logits.shape and grad.dtype == logits.dtype and grad.device == logits.device,
                 lambda: f"cross_entropy_forward_grad(): expected grad shaped as logits {list(logits.shape)} of dtype "
                         f"{logits.dtype} on {logits.device}, got {list(grad.shape)} {grad.dtype} on {grad.device}")
    x, t = logits.contiguous(), target.contiguous()
    loss, lse = _forward_rows(x, t, weight, ignore_index, label_smoothing, z_loss, softcap)
    one = torch.ones((x.shape[0],) if reduction == "none" else (), dtype=lse.dtype, device=lse.device)
    out = grad if grad.is_contiguous() else torch.empty_like(x)
    _backward_into(out, ce_row_grad_loss(one, t, weight, ignore_index, reduction, lse.dtype), None, x, t, weight, lse,
                   ignore_index, label_smoothing, z_loss, softcap)
    if out is not grad:
        grad.copy_(out)
    return ce_reduce_rows(loss, t, weight, ignore_index, reduction, label_smoothing), lse


def cross_entropy_backward(grad_loss: Tensor, grad_lse: Tensor | None, logits: Tensor, target: Tensor,
                           weight: Tensor | None, lse: Tensor, ignore_index: int, label_smoothing: float,
                           z_loss: float, softcap: float | None, reduction: str) -> Tensor:
    """The kernel of fusedlayers::triton_cross_entropy_backward: the gradient (N, C) in the logits' dtype."""
    _check_args(logits, target, weight, label_smoothing, softcap)
    check_ce_reduction(reduction)
    check_ce_backward_rows(grad_loss, grad_lse, lse, logits, reduction)
    for name, t in (("grad_loss", grad_loss), ("grad_lse", grad_lse)):
        torch._check(t is None or t.dtype.is_floating_point,
                     lambda: f"cross_entropy_backward(): expected {name} to be floating-point, got {t.dtype}")
    math_dtype = ce_math_dtype(logits.dtype)
    torch._check(lse.dtype == math_dtype,
                 lambda: f"cross_entropy_backward(): expected lse of dtype {math_dtype}, got {lse.dtype}")
    rows, num_classes = logits.shape
    t = target.contiguous()
    if not logits.is_cuda:
        _check_targets_in_range(t, num_classes, ignore_index)
    grad = torch.empty(rows, num_classes, dtype=logits.dtype, device=logits.device)
    _backward_into(grad, ce_row_grad_loss(grad_loss, t, weight, ignore_index, reduction, math_dtype), grad_lse,
                   logits.contiguous(), t, weight, lse, ignore_index, label_smoothing, z_loss, softcap)
    return grad


def cross_entropy_soft_forward(logits: Tensor, target: Tensor, weight: Tensor | None,
                               label_smoothing: float) -> tuple[Tensor, Tensor]:
    """The kernel of fusedlayers::triton_cross_entropy_soft_forward: per-row (loss, lse) in the math dtype."""
    check_soft_cross_entropy_args(logits, target, weight, label_smoothing)
    _check_dtype(logits)
    rows, num_classes = logits.shape
    math_dtype = ce_math_dtype(logits.dtype)
    loss = logits.new_empty(rows, dtype=math_dtype)
    lse = logits.new_empty(rows, dtype=math_dtype)
    if rows > 0:
        _launch(_cross_entropy_soft_forward_kernel, logits, logits.contiguous(), target.contiguous(),
                None if weight is None else weight.contiguous(), loss, lse, num_classes, label_smoothing,
                HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0)
    return loss, lse


def cross_entropy_soft_backward(grad_loss: Tensor, grad_lse: Tensor | None, logits: Tensor, target: Tensor,
                                weight: Tensor | None, lse: Tensor, label_smoothing: float) -> Tensor:
    """The kernel of fusedlayers::triton_cross_entropy_soft_backward: the gradient (N, C) in the logits' dtype."""
    check_soft_cross_entropy_args(logits, target, weight, label_smoothing)
    check_soft_ce_backward_rows(grad_loss, grad_lse, lse, logits)
    _check_dtype(logits)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if grad.numel() == 0:
        return grad
    math_dtype = ce_math_dtype(logits.dtype)
    _launch(_cross_entropy_soft_backward_kernel, logits, grad_loss.to(math_dtype).contiguous(),
            None if grad_lse is None else grad_lse.to(math_dtype).contiguous(), logits.contiguous(),
            target.contiguous(), None if weight is None else weight.contiguous(), lse.to(math_dtype).contiguous(),
            grad, logits.shape[1], label_smoothing, HAS_GRAD_LSE=grad_lse is not None, HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=label_smoothing != 0.0)
    return grad


torch.library.register_kernel("fusedlayers::triton_cross_entropy_forward", ("cpu", "cuda"), cross_entropy_forward)
torch.library.register_kernel("fusedlayers::triton_cross_entropy_forward_grad", ("cpu", "cuda"),
                              cross_entropy_forward_grad)
torch.library.register_kernel("fusedlayers::triton_cross_entropy_backward", ("cpu", "cuda"), cross_entropy_backward)
torch.library.register_kernel("fusedlayers::triton_cross_entropy_soft_forward", ("cpu", "cuda"),
                              cross_entropy_soft_forward)
torch.library.register_kernel("fusedlayers::triton_cross_entropy_soft_backward", ("cpu", "cuda"),
                              cross_entropy_soft_backward)
