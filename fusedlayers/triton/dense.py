"""The dense op family in Triton: y = f(x @ W.T + b) and its gradient, the kernels of the triton_dense_* ops.

Forward: one tiled GEMM with bias and activation in its epilogue. Backward: dz = g * f'(z) is never stored;
the dx GEMM (dz @ W) and the dW GEMM (dz^T @ x) each compute their dz tiles on the fly from g and z, and the
dW kernel also sums db, deterministically (no atomics). Without a saved z, the forward GEMM recomputes it.

Inputs are made contiguous; x is viewed as (rows, in). float16/bfloat16 are loaded and computed in float32
(accumulate and epilogue) and stored in their own dtype; float32 dots are IEEE (no TF32); float64 stays
float64. Importing this module registers the kernels for the CPU (TRITON_INTERPRET=1) and CUDA keys.
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.dense import check_dense_args, saves_preact
from .activations import IDENTITY, act_f, act_grad, activation_code

# Tile sizes (BLOCK_M, BLOCK_N, BLOCK_K) per kernel and compute dtype; fixed, so that the kernels can be
# compiled ahead of time. float64 tiles are smaller: twice the registers per element.
# Forward: (rows, out) tiles of y, reducing over in.
FORWARD_BLOCKS = {torch.float32: (64, 64, 8), torch.float64: (32, 32, 16)}
# dx: (rows, in) tiles of dx, reducing over out; BLOCK_N is the reduction step.
DX_BLOCKS = {torch.float32: (64, 8, 64), torch.float64: (32, 16, 32)}
# dW: (out, in) tiles of dW, reducing over rows; BLOCK_M is the reduction step.
DW_BLOCKS = {torch.float32: (8, 64, 64), torch.float64: (16, 32, 32)}
NUM_WARPS = 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _blocks(table: dict, dtype: torch.dtype) -> tuple[int, int, int]:
    return table[torch.float64 if dtype == torch.float64 else torch.float32]


@triton.jit
def _compute(v):
    """v in the compute dtype: float64 stays, the rest (float16, bfloat16, float32) becomes float32."""
    if v.dtype == tl.float64:
        return v
    else:
        return v.to(tl.float32)


@triton.jit
def _zero_acc(ptr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """A zero accumulator tile in the compute dtype of ptr's elements."""
    if ptr.dtype.element_ty == tl.float64:
        return tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float64)
    else:
        return tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)


@triton.jit
def _dense_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, M, N, K,
                          HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = f(x[M, K] @ w[N, K].T + b[N]), and z = the argument of f when STORE_Z."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: rows * K can pass 2^31
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * K  # w read as its transpose, a (K, N) tile
    acc = _zero_acc(x_ptr, BLOCK_M, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_t = tl.load(w_rows + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(_compute(x), _compute(w_t), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += _compute(tl.load(b_ptr + offs_n, mask=mask_n, other=0.0))[None, :]
    out_offsets = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        tl.store(z_ptr + out_offsets, acc.to(z_ptr.dtype.element_ty), mask=mask_out)
    tl.store(y_ptr + out_offsets, act_f(acc, ACT).to(y_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _dense_grad_preact(g_ptr, z_ptr, offsets, mask, ACT: tl.constexpr):
    """A tile of dz = g * f'(z) in the compute dtype; masked lanes are 0."""
    g = _compute(tl.load(g_ptr + offsets, mask=mask, other=0.0))
    if ACT == IDENTITY:
        return g
    else:
        return act_grad(g, _compute(tl.load(z_ptr + offsets, mask=mask, other=0.0)), ACT)


@triton.jit
def _dense_backward_dx_kernel(g_ptr, z_ptr, w_ptr, dx_ptr, M, N, K, ACT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[M, K] = (g * f'(z))[M, N] @ w[N, K]; z unused for identity."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    gz_rows = offs_m.to(tl.int64)[:, None] * N
    acc = _zero_acc(w_ptr, BLOCK_M, BLOCK_K)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        mask_n = ns < N
        dz = _dense_grad_preact(g_ptr, z_ptr, gz_rows + ns[None, :], mask_m[:, None] & mask_n[None, :], ACT)
        w = tl.load(w_ptr + ns.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dz, _compute(w), acc, input_precision="ieee")
    tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _dense_backward_dw_kernel(g_ptr, z_ptr, x_ptr, dw_ptr, db_ptr, M, N, K, ACT: tl.constexpr,
                              STORE_DW: tl.constexpr, STORE_DB: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[N, K] = (g * f'(z)).T @ x[M, K] (STORE_DW) or db[N] = the row sum of g * f'(z) (STORE_DB, a grid of one
    K block); z unused for identity.

    db: each entry is summed by one program, in a fixed order, the blocks' sums compensated (Kahan): a running
    float32 sum over thousands of rows was 30x less accurate than torch's cascade sum.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = _zero_acc(x_ptr, BLOCK_N, BLOCK_K)
    db_acc = tl.zeros((BLOCK_N,), dtype=acc.dtype)
    db_lost = tl.zeros((BLOCK_N,), dtype=acc.dtype)  # the rounding error of db_acc, taken back next block
    for m0 in range(0, M, BLOCK_M):
        ms = (m0 + offs_m).to(tl.int64)
        mask_m = ms < M
        # dz read as its transpose, an (N, M) tile
        dz_t = _dense_grad_preact(g_ptr, z_ptr, ms[None, :] * N + offs_n[:, None],
                                  mask_n[:, None] & mask_m[None, :], ACT)
        if STORE_DW:
            x = tl.load(x_ptr + ms[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(dz_t, _compute(x), acc, input_precision="ieee")
        if STORE_DB:
            term = tl.sum(dz_t, axis=1) - db_lost
            total = db_acc + term
            # no error to take back once the sum is inf or NaN (inf - inf would make every later sum NaN)
            db_lost = tl.where(tl.abs(total) < float("inf"), (total - db_acc) - term, 0.0)
            db_acc = total
    if STORE_DW:
        tl.store(dw_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_k[None, :])
    if STORE_DB:
        tl.store(db_ptr + offs_n, db_acc.to(db_ptr.dtype.element_ty), mask=mask_n)


def _check_dtype(x: Tensor) -> None:
    torch._check(x.dtype in _DTYPES,
                 lambda: f"dense(): the Triton backend supports float16, bfloat16, float32 and float64 x, "
                         f"got {x.dtype}")


def _as_rows(t: Tensor, cols: int) -> Tensor:
    """t as a contiguous (rows, cols) matrix; not reshape(-1, cols), which is ambiguous for cols == 0."""
    return t.reshape(math.prod(t.shape[:-1]), cols).contiguous()


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    # An empty grid has nothing to compute; the interpreter and the driver need not see it.
    if all(g > 0 for g in grid):
        kernel[grid](*args, **{"num_warps": NUM_WARPS, **meta})  # meta may choose its own num_warps


def _forward_2d(x2: Tensor, weight: Tensor, bias: Tensor | None, act: int,
                store_z: bool) -> tuple[Tensor, Tensor | None]:
    """y = f(x2 @ weight.T + bias) and, when store_z, z, for contiguous x2 (rows, in) and weight."""
    rows, in_features = x2.shape
    out_features = weight.shape[0]
    y = x2.new_empty((rows, out_features))
    z = torch.empty_like(y) if store_z else None
    bm, bn, bk = _blocks(FORWARD_BLOCKS, x2.dtype)
    _launch(_dense_forward_kernel, (triton.cdiv(rows, bm), triton.cdiv(out_features, bn)),
            x2, weight, bias, y, z, rows, out_features, in_features,
            HAS_BIAS=bias is not None, STORE_Z=store_z, ACT=act, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y, z


def dense_forward(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
                  save_preact: bool) -> tuple[Tensor, Tensor]:
    """The kernel of fusedlayers::triton_dense_forward: (y, preact), preact empty unless saved."""
    check_dense_args(x, weight, bias)
    _check_dtype(x)
    act = activation_code(activation)
    store_z = saves_preact(activation, save_preact)
    in_features, out_features = weight.shape[1], weight.shape[0]
    out_shape = (*x.shape[:-1], out_features)
    y, z = _forward_2d(_as_rows(x, in_features), weight.contiguous(),
                       None if bias is None else bias.contiguous(), act, store_z)
    return y.view(out_shape), z.view(out_shape) if store_z else x.new_empty(0)


def dense_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, preact: Tensor | None,
                   activation: str, output_mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The kernel of fusedlayers::triton_dense_backward: (dx, dW, db), None where not wanted."""
    check_dense_args(x, weight, bias)
    _check_dtype(x)
    act = activation_code(activation)
    in_features, out_features = weight.shape[1], weight.shape[0]
    out_shape = (*x.shape[:-1], out_features)
    torch._check(tuple(grad_out.shape) == out_shape,
                 lambda: f"dense_backward(): expected grad_out of shape {list(out_shape)}, got {list(grad_out.shape)}")
    torch._check(grad_out.dtype == x.dtype,
                 lambda: f"dense_backward(): expected grad_out of dtype {x.dtype}, got {grad_out.dtype}")
    needs_dx, needs_dw = output_mask[0], output_mask[1]
    needs_db = output_mask[2] and bias is not None
    if not (needs_dx or needs_dw or needs_db):
        return None, None, None

    x2 = _as_rows(x, in_features)
    g2 = _as_rows(grad_out, out_features)
    w = weight.contiguous()
    rows = x2.shape[0]
    z2 = None
    if act != IDENTITY.value:
        if preact is not None and preact.numel() > 0:
            torch._check(tuple(preact.shape) == out_shape,
                         lambda: f"dense_backward(): expected preact of shape {list(out_shape)}, got "
                                 f"{list(preact.shape)}")
            z2 = _as_rows(preact, out_features)
        else:
            z2, _ = _forward_2d(x2, w, None if bias is None else bias.contiguous(), IDENTITY.value, False)

    dx = dw = db = None
    if needs_dx:
        dx = torch.empty_like(x2)
        bm, bn, bk = _blocks(DX_BLOCKS, x.dtype)
        _launch(_dense_backward_dx_kernel, (triton.cdiv(rows, bm), triton.cdiv(in_features, bk)),
                g2, z2, w, dx, rows, out_features, in_features, ACT=act, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        dx = dx.view(x.shape)
    bm, bn, bk = _blocks(DW_BLOCKS, x.dtype)
    if needs_dw:
        dw = w.new_empty(w.shape)
        _launch(_dense_backward_dw_kernel, (triton.cdiv(out_features, bn), triton.cdiv(in_features, bk)),
                g2, z2, x2, dw, None, rows, out_features, in_features, ACT=act, STORE_DW=True, STORE_DB=False,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if needs_db:
        # A launch of its own (one K block, even for in_features == 0): the compensated sum beside dW's
        # accumulator tile spilled registers (24 bytes for dense_large on sm_80/90); this re-reads g and z, a few
        # percent of dW's GEMM.
        db = w.new_empty(out_features)
        _launch(_dense_backward_dw_kernel, (triton.cdiv(out_features, bn), 1),
                g2, z2, x2, None, db, rows, out_features, in_features, ACT=act, STORE_DW=False, STORE_DB=True,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return dx, dw, db


torch.library.register_kernel("fusedlayers::triton_dense_forward", ("cpu", "cuda"), dense_forward)
torch.library.register_kernel("fusedlayers::triton_dense_backward", ("cpu", "cuda"), dense_backward)
