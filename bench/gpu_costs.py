"""The cost model of bench/gpu_report.py: the peak rates it assumes, the FLOPs and bytes each kernel must do and move
(FORMULAS, and the functions the Triton and CUDA reports share), and the roofline time they give."""
import torch

# H100 SXM peak rates. The float32 dots of the Triton kernels are IEEE (no TF32), so float32 work runs on the
# FP32 pipes; Triton's float64 tl.dot becomes DMMA (mma.sync ... f64) and is rated at the FP64 tensor-core rate,
# other float64 work (no mma in the PTX) at the vector rate. The reduced-precision tensor-core rates are listed
# for reference only: no kernel here runs on them.
ASSUMPTIONS = {
    "gpu": "H100 SXM",
    "hbm_bytes_per_s": 3.35e12,
    "flops_per_s": {"fp32": 67e12, "fp64_tensor": 67e12, "fp64_vector": 34e12},
    "unused_tensor_core_flops_per_s": {"tf32": 495e12, "fp16": 989e12, "bf16": 989e12},
    # f(z) or f'(z) counts as this many FLOPs per element whatever the activation (identity: 0); exp, erf and
    # sin are SFU or polynomial sequences, not single FLOPs. Every kernel here is far from being bound by it.
    "activation_flops_per_element": 10,
    "roofline_us": "max(bytes / hbm_bytes_per_s, flops / flops_per_s[compute_rate]) * 1e6: a lower bound that "
                   "ignores launch latency (a few us), which dominates the tiny cases",
    "flops": "useful work: the padding of narrow mlp layers to 16 columns for tl.dot and the dense dW "
             "kernel's recomputation of g * f'(z) for every column block are not counted",
}
ACT_FLOPS = ASSUMPTIONS["activation_flops_per_element"]

FORMULAS = {
    "dense forward (M rows, N out, K in)": "FLOPs = 2MNK + MN (bias) + a MN; bytes = (MK + NK + N + MN (y) + MN "
                                           "(z, saved for the backward)) * itemsize",
    "dense backward dx": "FLOPs = 2MNK + (a + 1) MN (dz = g f'(z)); bytes = (MN (g) + MN (z) + NK + MK) * itemsize",
    "dense backward dW, db": "FLOPs = 2MNK + (a + 1) MN + MN (db); bytes = (MN (g) + MN (z) + MK + NK + N) * itemsize",
    "mlp fused forward (M rows, widths w_0..w_L)": "FLOPs = sum_l 2M w_l w_l+1 + M w_l+1 (bias) + a_l M w_l+1; "
                                                   "bytes = (M w_0 + sum_l (w_l w_l+1 + w_l+1 (bias) + M w_l+1 (z)) + "
                                                   "M w_L) * itemsize",
    "mlp fused backward (saved z, P programs)": "FLOPs = sum_l (a_l + 1) M w_l+1 (dz) + 2M w_l w_l+1 (dW) + "
                                                "M w_l+1 (db) + 2M w_l w_l+1 (dx or dh) + a_l-1 M w_l (f(z_l-1) "
                                                "for dW, l > 0); bytes = (M w_L (g) + sum_l M w_l+1 (z) + "
                                                "sum_l w_l w_l+1 (W) + 2 M w_0 (x, dx)) * itemsize + P * "
                                                "sum_l (w_l w_l+1 + w_l+1) * compute itemsize (partial dW, db)",
    "elementwise f(z), or f^(order)(z) (n elements)": "FLOPs = a n; bytes = 2 n itemsize",
    "elementwise g f'(z)": "FLOPs = (a + 1) n; bytes = 3 n itemsize",
    "cross_entropy forward (N rows, C classes)": "FLOPs = (3 + a) NC (max, subtract, exp, add) + with label "
                                                 "smoothing 3 NC + with a softcap (2 + a) NC; bytes = NC itemsize "
                                                 "(logits) + 8N (target) + 2N math itemsize (loss, lse) + C itemsize "
                                                 "(weight, with one)",
    "cross_entropy backward": "FLOPs = (2 + a) NC (the row's sum of exp(z - lse), read first) + (3 + a) NC "
                              "(subtract, exp, scale, onehot) + with label smoothing 2 NC + with a softcap (7 + 2a) "
                              "NC; bytes = 3 NC itemsize (logits twice, gradient) + 8N (target) + "
                              "2N math itemsize (grad_loss, lse) + N math itemsize (grad_lse, with one) + C itemsize "
                              "(weight, with one)",
    "cross_entropy_soft forward (class probabilities)": "FLOPs = (3 + a) NC (the row's max and sum) + (3 + 2 s + "
                                                        "w) NC (q (log s - (z - max)), s: with label smoothing, w: "
                                                        "with a weight); bytes = 2 NC itemsize (logits, two passes) "
                                                        "+ NC itemsize (target) + 2N math itemsize + C itemsize",
    "cross_entropy_soft backward": "FLOPs = (3 + a) NC (max and sum) + (1 + 2 s + w) NC (Q) + (5 + a + 2 s + w) NC "
                                   "(p, g (Q p - q)); bytes = 3 NC itemsize (logits twice, gradient) + 2 NC itemsize "
                                   "(target twice) + 2N math itemsize + C itemsize",
}


def roofline(flops: float, nbytes: float, rate: str) -> dict:
    memory_s = nbytes / ASSUMPTIONS["hbm_bytes_per_s"]
    compute_s = flops / ASSUMPTIONS["flops_per_s"][rate]
    return {"flops": flops, "bytes": nbytes, "compute_rate": rate, "roofline_us": max(memory_s, compute_s) * 1e6,
            "bound": "memory" if memory_s >= compute_s else "compute"}


def cross_entropy_cost(N: int, C: int, dtype: torch.dtype, weight: bool, smoothing: bool, softcap: bool,
                       grad_lse: bool) -> dict:
    """FLOPs and bytes of the forward and backward cross-entropy kernels (FORMULAS), shared by Triton and CUDA."""
    i, mi = dtype.itemsize, (8 if dtype == torch.float64 else 4)
    w_bytes = C * i if weight else 0
    forward_flops = (3 + ACT_FLOPS + 3 * smoothing + (2 + ACT_FLOPS) * softcap) * N * C
    backward_flops = (5 + 2 * ACT_FLOPS + 2 * smoothing + (7 + 2 * ACT_FLOPS) * softcap) * N * C
    return {"forward": (forward_flops, N * C * i + 8 * N + 2 * N * mi + w_bytes),
            "backward": (backward_flops, 3 * N * C * i + 8 * N + (2 + grad_lse) * N * mi + w_bytes)}


def cross_entropy_soft_cost(N: int, C: int, dtype: torch.dtype, weight: bool, smoothing: bool) -> dict:
    """FLOPs and bytes of the class-probability kernels (FORMULAS), shared by Triton and CUDA."""
    i, mi = dtype.itemsize, (8 if dtype == torch.float64 else 4)
    extra, w_bytes = 2 * smoothing + weight, C * i if weight else 0
    return {"forward": ((6 + ACT_FLOPS + extra) * N * C, 3 * N * C * i + 2 * N * mi + w_bytes),
            "backward": ((9 + 2 * ACT_FLOPS + 2 * extra) * N * C, 5 * N * C * i + 2 * N * mi + w_bytes)}
