"""bench/gpu_report.py on a subset: one Triton kernel compiled for sm_80, and the CUDA kernels of the build."""
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_report
from fusedlayers.backends import HAS_NATIVE_CUDA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_kernel_report(tmp_path):
    # A process of its own: this one runs with TRITON_INTERPRET=1 (conftest), under which Triton kernels
    # cannot be compiled ahead of time.
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "bench.gpu_report", "--json", str(out), "--arch", "sm_80",
                    "--only", "_dense_forward_kernel[dense_tiny]"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    assert set(report["assumptions"]["flops_per_s"]) >= {"fp32", "fp64_tensor", "fp64_vector"}
    (kernel,) = report["kernels"]
    assert kernel["name"] == "dense/_dense_forward_kernel[dense_tiny]"
    assert (kernel["backend"], kernel["arch"], kernel["dtype"]) == ("triton", "sm_80", "float64")
    assert 0 < kernel["registers"] <= 255
    assert kernel["spill_bytes"] == kernel["spill_stores"] + kernel["spill_loads"] >= 0
    assert kernel["shared_bytes"] > 0  # tl.dot stages its operands in shared memory
    # one row, 12 -> 12: 2*12*12 FLOPs of dot, 12 of bias, 10 per cos; x, W, b, y and z of float64
    assert kernel["flops"] == 2 * 12 * 12 + 12 + 10 * 12
    assert kernel["bytes"] == (12 + 144 + 12 + 2 * 12) * 8
    assert kernel["roofline_us"] == pytest.approx(kernel["bytes"] / 3.35e12 * 1e6)


def test_triton_cross_entropy_report(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "bench.gpu_report", "--json", str(out), "--arch", "sm_90",
                    "--only", "cross_entropy/_cross_entropy_backward_kernel[ce]"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    (kernel,) = json.loads(out.read_text())["kernels"]
    assert (kernel["backend"], kernel["arch"], kernel["dtype"]) == ("triton", "sm_90", "float32")
    assert kernel["config"]["debug"] is True  # the out-of-range target assert is compiled in
    assert 0 < kernel["registers"] <= 255 and kernel["spill_bytes"] == 0
    # N = 4096 rows of C = 32000 float32 logits read and their gradient written, the targets (int64), and
    # grad_loss and lse (float32); 3 FLOPs and an exp (10) per logit
    n, c = 4096, 32000
    assert kernel["bytes"] == 2 * n * c * 4 + 8 * n + 2 * 4 * n
    assert kernel["flops"] == 13 * n * c
    assert kernel["bound"] == "memory" and kernel["roofline_us"] == pytest.approx(kernel["bytes"] / 3.35e12 * 1e6)


@pytest.mark.skipif(not HAS_NATIVE_CUDA, reason="this build has no CUDA kernels (nvcc absent or FUSEDLAYERS_CUDA=0)")
def test_cuda_kernel_report():
    kernels = gpu_report.cuda_reports(gpu_report.extension_path())
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}
    names = {k["name"] for k in kernels}
    assert "dense/forward_act_kernel<GELU, float>" in names
    assert "dense/backward_act_kernel<Cos, double>" in names
    for dtype in ("float", "double", "Half", "BFloat16"):
        assert f"cross_entropy/cross_entropy_forward_kernel<{dtype}>" in names
        assert f"cross_entropy/cross_entropy_backward_kernel<{dtype}>" in names
    for k in kernels:
        assert k["backend"] == "cuda" and k["name"].startswith(("dense/", "cross_entropy/"))
        assert 0 < k["registers"] <= 255, k
        assert k["spill_bytes"] is None and k["stack_bytes"] >= 0
        assert k["roofline_us"] > 0 and k["bound"] == "memory", k
