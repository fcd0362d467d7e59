"""The mlp op family in Triton: a whole network h_{l+1} = f_l(h_l @ W_l.T + b_l), the kernels of the
triton_mlp_* ops.

Narrow networks (every width <= FUSED_MAX_WIDTH) run fused: a forward program takes BLOCK_M rows through every
layer with the activations in registers; a backward program (re)computes its rows' forward, then backpropagates
them through every layer, writing their dx and adding their share of every dW and db to a partial sum of its
own (deterministic, no atomics), which the host reduces. The layers are unrolled at compile time
(tl.static_range): the weights, biases and pre-activations are passed as tuples of tensors and the widths and
activation codes as tuple constexprs, so each layer has its own tile shapes (each width padded to a power of
two >= 16 for tl.dot) and its own activation code. The backward reads the layers' pre-activations z_l in
reverse order from global memory: the saved ones, or a scratch the recompute writes (on a GPU it stays in L2).

Wider networks go layer by layer through the dense kernels of fusedlayers.triton.dense.

Dtypes as dense's: float16/bfloat16 computed in float32 and stored in their own dtype (the fused recompute
scratch and the dW/db partial sums stay float32), float32 dots IEEE, float64 throughout. Importing this module
registers the kernels for the CPU (TRITON_INTERPRET=1) and CUDA keys.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.mlp import check_mlp_args
from .activations import IDENTITY, act_f, act_grad, activation_code
from .dense import _DTYPES, NUM_WARPS, _as_rows, _compute, _forward_2d, _launch, dense_backward

# Networks whose widths (input included) are all <= FUSED_MAX_WIDTH run fused.
FUSED_MAX_WIDTH = 128
# Rows per fused program, by compute dtype and widest padded layer; fixed, so that the kernels can be compiled
# ahead of time. The live state per program is a few (BLOCK_M, width) activation tiles and a weight tile;
# fewer rows for the wider networks keep the backward within the registers (measured on sm_80 builds).
# The kernels launch with dense.NUM_WARPS warps, the smallest fused tiles with fewer (_fused_num_warps).
FUSED_BLOCK_M = {torch.float32: {16: 32, 32: 32, 64: 16, 128: 16}, torch.float64: {16: 16, 32: 16, 64: 16, 128: 16}}
# The fused backward runs at most this many programs, each looping over row tiles, which bounds the dW/db
# partial sums to BACKWARD_MAX_PROGRAMS copies of the parameters.
BACKWARD_MAX_PROGRAMS = 128
# Columns of dW per step of the fused backward's dW update: a (width, DW_CHUNK) tile, not (width, width).
DW_CHUNK = 16
# Elements per program of the activation kernel (the layer-by-layer backward's h_l = f(z_{l-1})).
ACTIVATION_BLOCK = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _padded(width: int) -> int:
    # tl.dot needs power-of-two dims of at least 16
    return max(16, triton.next_power_of_2(width))


@triton.jit
def _mlp_layer_preact(h, w_ptrs, b_ptrs, LAYER: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr,
                      PAD_IN: tl.constexpr, PAD_OUT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """z = h @ W.T + b of layer LAYER for an activation tile h (BLOCK_M, PAD_IN) whose padded columns are 0;
    padded columns of z are 0. b_ptrs is None without biases."""
    offs_in = tl.arange(0, PAD_IN)
    offs_out = tl.arange(0, PAD_OUT)
    # w read as its transpose, a (PAD_IN, PAD_OUT) tile
    w_t = tl.load(w_ptrs[LAYER] + offs_out[None, :] * IN + offs_in[:, None],
                  mask=(offs_in[:, None] < IN) & (offs_out[None, :] < OUT), other=0.0)
    z = tl.dot(h, _compute(w_t), input_precision="ieee")
    if HAS_BIAS:
        z += _compute(tl.load(b_ptrs[LAYER] + offs_out, mask=offs_out < OUT, other=0.0))[None, :]
    return z


@triton.jit
def _mlp_activate(z, ACT: tl.constexpr, OUT: tl.constexpr, PAD_OUT: tl.constexpr):
    """f(z) with the padded columns set to 0: f(0) is not 0 for every f (sigmoid, cos, softplus)."""
    cols = tl.arange(0, PAD_OUT)
    return tl.where((cols < OUT)[None, :], act_f(z, ACT), 0.0)


@triton.jit
def _mlp_load_tile(ptr, offs_m, M, WIDTH: tl.constexpr, PAD: tl.constexpr):
    """Rows offs_m of a (M, WIDTH) matrix as a (BLOCK_M, PAD) tile in the compute dtype, 0 outside."""
    cols = tl.arange(0, PAD)
    tile = tl.load(ptr + offs_m.to(tl.int64)[:, None] * WIDTH + cols[None, :],
                   mask=(offs_m < M)[:, None] & (cols < WIDTH)[None, :], other=0.0)
    return _compute(tile)


@triton.jit
def _mlp_store_tile(ptr, tile, offs_m, M, WIDTH: tl.constexpr, PAD: tl.constexpr):
    cols = tl.arange(0, PAD)
    tl.store(ptr + offs_m.to(tl.int64)[:, None] * WIDTH + cols[None, :], tile.to(ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (cols < WIDTH)[None, :])


@triton.jit
def _fused_mlp_forward_kernel(x_ptr, w_ptrs, b_ptrs, y_ptr, z_ptrs, M,
                              WIDTHS: tl.constexpr, PADS: tl.constexpr, ACTS: tl.constexpr,
                              NUM_LAYERS: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
                              BLOCK_M: tl.constexpr):
    """y = the network applied to x[M, WIDTHS[0]], and z_l into z_ptrs[l] when STORE_Z."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = _mlp_load_tile(x_ptr, offs_m, M, WIDTHS[0], PADS[0])
    for l in tl.static_range(NUM_LAYERS):
        z = _mlp_layer_preact(h, w_ptrs, b_ptrs, l, WIDTHS[l], WIDTHS[l + 1], PADS[l], PADS[l + 1], HAS_BIAS)
        if STORE_Z:
            _mlp_store_tile(z_ptrs[l], z, offs_m, M, WIDTHS[l + 1], PADS[l + 1])
        h = _mlp_activate(z, ACTS[l], WIDTHS[l + 1], PADS[l + 1])
    _mlp_store_tile(y_ptr, h, offs_m, M, WIDTHS[NUM_LAYERS], PADS[NUM_LAYERS])


@triton.jit
def _mlp_add_dw(dw_ptr, dz, src_ptr, offs_m, M, ACT: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr,
                PAD_OUT: tl.constexpr, CHUNK: tl.constexpr):
    """dw_ptr[:OUT, :IN] += dz.T @ h, h = f(src) the layer's input ((M, IN) src: x with identity, or the
    z of the layer below), in slices of CHUNK columns of h, so that no (PAD_OUT, PAD_IN) tile is live."""
    offs_out = tl.arange(0, PAD_OUT)
    dz_t = tl.trans(dz)
    for k0 in range(0, IN, CHUNK):
        cols = k0 + tl.arange(0, CHUNK)
        h = _compute(tl.load(src_ptr + offs_m.to(tl.int64)[:, None] * IN + cols[None, :],
                             mask=(offs_m < M)[:, None] & (cols < IN)[None, :], other=0.0))
        h = tl.where((cols < IN)[None, :], act_f(h, ACT), 0.0)
        offsets = offs_out[:, None] * IN + cols[None, :]
        mask = (offs_out < OUT)[:, None] & (cols < IN)[None, :]
        dw = tl.load(dw_ptr + offsets, mask=mask, other=0.0) + tl.dot(dz_t, h, input_precision="ieee")
        tl.store(dw_ptr + offsets, dw, mask=mask)


@triton.jit
def _fused_mlp_backward_kernel(g_ptr, x_ptr, w_ptrs, b_ptrs, z_ptrs, dx_ptr, dw_ptrs, db_ptrs, M,
                               WIDTHS: tl.constexpr, PADS: tl.constexpr, ACTS: tl.constexpr,
                               NUM_LAYERS: tl.constexpr, HAS_BIAS: tl.constexpr, RECOMPUTE: tl.constexpr,
                               STORE_DX: tl.constexpr, BLOCK_M: tl.constexpr, DW_CHUNK: tl.constexpr):
    """Backpropagates g[M, WIDTHS[-1]] through the network: dx into dx_ptr when STORE_DX, and this program's
    share of dW_l and db_l added to dw_ptrs[l][pid] and db_ptrs[l][pid] (zero-filled by the host).

    z_ptrs[l] holds z_l for every row, or, when RECOMPUTE, is the scratch this kernel writes it to first.
    Program pid takes the row tiles pid, pid + num_programs, ...
    """
    pid = tl.program_id(0)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        if RECOMPUTE:
            h = _mlp_load_tile(x_ptr, offs_m, M, WIDTHS[0], PADS[0])
            for l in tl.static_range(NUM_LAYERS):
                z = _mlp_layer_preact(h, w_ptrs, b_ptrs, l, WIDTHS[l], WIDTHS[l + 1], PADS[l], PADS[l + 1],
                                      HAS_BIAS)
                _mlp_store_tile(z_ptrs[l], z, offs_m, M, WIDTHS[l + 1], PADS[l + 1])
                h = _mlp_activate(z, ACTS[l], WIDTHS[l + 1], PADS[l + 1])
            # z is read back in another thread layout than it was written in
            tl.debug_barrier()

        g = _mlp_load_tile(g_ptr, offs_m, M, WIDTHS[NUM_LAYERS], PADS[NUM_LAYERS])
        z = _mlp_load_tile(z_ptrs[NUM_LAYERS - 1], offs_m, M, WIDTHS[NUM_LAYERS], PADS[NUM_LAYERS])
        for l in tl.static_range(NUM_LAYERS - 1, -1, -1):
            offs_in = tl.arange(0, PADS[l])
            offs_out = tl.arange(0, PADS[l + 1])
            in_out = offs_out < WIDTHS[l + 1]
            # rows past M and padded columns are 0 in g, but f'(z) need not be finite there
            dz = tl.where((offs_m < M)[:, None] & in_out[None, :], act_grad(g, z, ACTS[l]), 0.0)
            dw_ptr = dw_ptrs[l] + pid * (WIDTHS[l + 1] * WIDTHS[l])
            if l > 0:
                _mlp_add_dw(dw_ptr, dz, z_ptrs[l - 1], offs_m, M, ACTS[l - 1], WIDTHS[l], WIDTHS[l + 1],
                            PADS[l + 1], DW_CHUNK)
            else:
                _mlp_add_dw(dw_ptr, dz, x_ptr, offs_m, M, IDENTITY, WIDTHS[0], WIDTHS[1], PADS[1], DW_CHUNK)
            if HAS_BIAS:
                db_ptr = db_ptrs[l] + pid * WIDTHS[l + 1] + offs_out
                tl.store(db_ptr, tl.load(db_ptr, mask=in_out, other=0.0) + tl.sum(dz, axis=0), mask=in_out)
            if (l > 0) or STORE_DX:
                w = tl.load(w_ptrs[l] + offs_out[:, None] * WIDTHS[l] + offs_in[None, :],
                            mask=in_out[:, None] & (offs_in < WIDTHS[l])[None, :], other=0.0)
                g = tl.dot(dz, _compute(w), input_precision="ieee")
            if l > 0:
                z = _mlp_load_tile(z_ptrs[l - 1], offs_m, M, WIDTHS[l], PADS[l])
        if STORE_DX:
            _mlp_store_tile(dx_ptr, g, offs_m, M, WIDTHS[0], PADS[0])
        # the next tile reads this one's partial sums back, maybe in other threads
        tl.debug_barrier()


@triton.jit
def _mlp_activation_kernel(z_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """h = f(z), elementwise over n elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = _compute(tl.load(z_ptr + offs, mask=mask, other=0.0))
    tl.store(h_ptr + offs, act_f(z, ACT).to(h_ptr.dtype.element_ty), mask=mask)


def _check_dtype(x: Tensor) -> None:
    torch._check(x.dtype in _DTYPES,
                 lambda: f"mlp(): the Triton backend supports float16, bfloat16, float32 and float64 x, got {x.dtype}")


def _widths(x: Tensor, weights: list[Tensor]) -> tuple[int, ...]:
    return (x.shape[-1], *(w.shape[0] for w in weights))


def _is_fused(widths: tuple[int, ...]) -> bool:
    return max(widths) <= FUSED_MAX_WIDTH


def _fused_meta(widths: tuple[int, ...], codes: tuple[int, ...], has_bias: bool, dtype: torch.dtype) -> dict:
    pads = tuple(_padded(w) for w in widths)
    block_m = FUSED_BLOCK_M[_compute_dtype(dtype)][max(pads)]
    return dict(WIDTHS=widths, PADS=pads, ACTS=codes, NUM_LAYERS=len(codes), HAS_BIAS=has_bias, BLOCK_M=block_m,
                num_warps=_fused_num_warps(block_m, max(pads)))


def _fused_num_warps(block_m: int, pad: int) -> int:
    """2 warps for a tile of at most 16 x 16 (the seed000 float64 forward spilled 8 bytes on sm_90 with 4:
    ptxas, bench.gpu_report), dense.NUM_WARPS otherwise."""
    return 2 if block_m * pad <= 256 else NUM_WARPS


def _activate(z2: Tensor, act: int) -> Tensor:
    h = torch.empty_like(z2)
    _launch(_mlp_activation_kernel, (triton.cdiv(z2.numel(), ACTIVATION_BLOCK),), z2, h, z2.numel(),
            ACT=act, BLOCK=ACTIVATION_BLOCK)
    return h


def mlp_forward(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[str],
                save: bool) -> tuple[Tensor, list[Tensor]]:
    """The kernel of fusedlayers::triton_mlp_forward: (y, [z_0, ..., z_{L-1}] with save, else [])."""
    check_mlp_args(x, weights, biases, activations)
    _check_dtype(x)
    codes = tuple(activation_code(a) for a in activations)
    widths = _widths(x, weights)
    batch = x.shape[:-1]
    x2 = _as_rows(x, widths[0])
    rows = x2.shape[0]
    ws = [w.contiguous() for w in weights]
    bs = [b.contiguous() for b in biases]

    if _is_fused(widths):
        y = x2.new_empty((rows, widths[-1]))
        zs = [x2.new_empty((rows, width)) for width in widths[1:]] if save else []
        meta = _fused_meta(widths, codes, bool(bs), x.dtype)
        _launch(_fused_mlp_forward_kernel, (triton.cdiv(rows, meta["BLOCK_M"]),),
                x2, tuple(ws), tuple(bs) if bs else None, y, tuple(zs) if save else None, rows,
                STORE_Z=save, **meta)
    else:
        y, zs = x2, []
        for l, (w, act) in enumerate(zip(ws, codes)):
            y, z = _forward_2d(y, w, bs[l] if bs else None, act, save)
            if save:
                zs.append(z)
    return y.view(*batch, widths[-1]), [z.view(*batch, z.shape[1]) for z in zs]


def mlp_backward(grad_out: Tensor, x: Tensor, weights: list[Tensor], biases: list[Tensor], saved: list[Tensor],
                 activations: list[str], input_grad: bool) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """The kernel of fusedlayers::triton_mlp_backward: (dx or None without input_grad, [dW_l], [db_l] or [])."""
    check_mlp_args(x, weights, biases, activations)
    _check_dtype(x)
    codes = tuple(activation_code(a) for a in activations)
    widths = _widths(x, weights)
    batch = x.shape[:-1]
    out_shape = (*batch, widths[-1])
    torch._check(tuple(grad_out.shape) == out_shape,
                 lambda: f"mlp_backward(): expected grad_out of shape {list(out_shape)}, got {list(grad_out.shape)}")
    torch._check(grad_out.dtype == x.dtype,
                 lambda: f"mlp_backward(): expected grad_out of dtype {x.dtype}, got {grad_out.dtype}")
    torch._check(len(saved) in (0, len(weights)),
                 lambda: f"mlp_backward(): expected saved to be empty or one per layer ({len(weights)}), "
                         f"got {len(saved)}")
    for l, z in enumerate(saved):
        torch._check(tuple(z.shape) == (*batch, widths[l + 1]) and z.dtype == x.dtype,
                     lambda: f"mlp_backward(): expected saved[{l}] of shape {[*batch, widths[l + 1]]} and dtype "
                             f"{x.dtype}, got {list(z.shape)} and {z.dtype}")

    x2 = _as_rows(x, widths[0])
    g2 = _as_rows(grad_out, widths[-1])
    rows = x2.shape[0]
    ws = [w.contiguous() for w in weights]
    bs = [b.contiguous() for b in biases]
    zs = [_as_rows(z, width) for z, width in zip(saved, widths[1:])]

    if _is_fused(widths):
        meta = _fused_meta(widths, codes, bool(bs), x.dtype)
        compute = _compute_dtype(x.dtype)
        programs = min(triton.cdiv(rows, meta["BLOCK_M"]), BACKWARD_MAX_PROGRAMS)
        recompute = not zs
        if recompute:
            zs = [x2.new_empty((rows, width), dtype=compute) for width in widths[1:]]
        dx = torch.empty_like(x2) if input_grad else None
        dw_parts = [w.new_zeros((programs, *w.shape), dtype=compute) for w in ws]
        db_parts = [b.new_zeros((programs, *b.shape), dtype=compute) for b in bs]
        _launch(_fused_mlp_backward_kernel, (programs,),
                g2, x2, tuple(ws), tuple(bs) if bs else None, tuple(zs), dx, tuple(dw_parts),
                tuple(db_parts) if bs else None, rows, RECOMPUTE=recompute, STORE_DX=input_grad,
                DW_CHUNK=DW_CHUNK, **meta)
        dws = [part.sum(0).to(w.dtype) for part, w in zip(dw_parts, ws)]
        dbs = [part.sum(0).to(b.dtype) for part, b in zip(db_parts, bs)]
    else:
        hs = [x2]
        if zs:
            hs += [_activate(z, act) for z, act in zip(zs[:-1], codes)]
        else:
            for l, (w, act) in enumerate(zip(ws, codes)):
                h, z = _forward_2d(hs[-1], w, bs[l] if bs else None, act, True)
                hs.append(h)
                zs.append(z)
        dws, dbs = [None] * len(ws), [None] * len(bs)
        g = g2
        for l in reversed(range(len(ws))):
            g, dws[l], db = dense_backward(g, hs[l], ws[l], bs[l] if bs else None, zs[l], activations[l],
                                           [l > 0 or input_grad, True, bool(bs)])
            if bs:
                dbs[l] = db
        dx = g if input_grad else None
    return (dx.view(x.shape) if input_grad else None), dws, dbs


torch.library.register_kernel("fusedlayers::triton_mlp_forward", ("cpu", "cuda"), mlp_forward)
torch.library.register_kernel("fusedlayers::triton_mlp_backward", ("cpu", "cuda"), mlp_backward)
