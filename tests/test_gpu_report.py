"""bench/gpu_report.py: its entries for two Triton kernels, every launch it captures from the Triton ops (each
compiled for sm_80), and the CUDA kernels of the build."""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The report runs in processes of its own: this one runs with TRITON_INTERPRET=1 (conftest), under which Triton
# kernels cannot be compiled ahead of time.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

# The kernels a training step of each case launches through the Triton ops (seed002, too wide to fuse, goes
# layer by layer: the dense kernels, and the activation kernel for the h_l = f(z_{l-1}) of its backward).
DENSE = {"_dense_forward_kernel", "_dense_backward_dx_kernel", "_dense_backward_dw_kernel"}
FUSED_MLP = {"_fused_mlp_forward_kernel", "_fused_mlp_backward_kernel"}
CROSS_ENTROPY = {"_cross_entropy_forward_kernel", "_cross_entropy_backward_kernel"}
SOFT = {"_cross_entropy_soft_forward_kernel", "_cross_entropy_soft_backward_kernel"}
CASE_KERNELS = {"dense_large": DENSE, "dense_tiny": DENSE, "seed003_field": FUSED_MLP, "seed000": FUSED_MLP,
                "seed002": DENSE | {"_mlp_activation_kernel"}, "ce": CROSS_ENTROPY, "ce_all_options": CROSS_ENTROPY,
                "ce_soft": SOFT}
# What the report describes of them: the layer-by-layer case only its activation kernel.
REPORTED = ({f"dense/{k}[{case}]" for case in ("dense_large", "dense_tiny") for k in DENSE}
            | {f"mlp/{k}[{case}]" for case in ("seed003_field", "seed000") for k in FUSED_MLP}
            | {"mlp/_mlp_activation_kernel[seed002]"}
            | {f"cross_entropy/{k}[{case}]" for case in ("ce", "ce_all_options") for k in CROSS_ENTROPY}
            | {f"cross_entropy/{k}[ce_soft]" for k in SOFT})

# Captures every case, compiles every captured launch for sm_80 (ptxas for its usage), lists the report's entries,
# and has the report describe a case with one cost formula missing (which it must refuse).
CAPTURE_SCRIPT = """
import json
from bench import gpu_report as g

def usage(launch):
    kernel, options = g.compile_launch(launch, "sm_80")
    return dict(g.ptxas_usage(kernel.asm["ptx"], "sm_80", options.enable_fp_fusion), shared=kernel.metadata.shared)

cases = {case: [dict(kernel=l["fn"].__name__, grid=l["grid"], usage=usage(l)) for l in launches]
         for case, launches in g.capture_cases().items()}
reported = [l["name"] for l in g.triton_launches()]
dense_costs = g._dense_costs
g._dense_costs = lambda *a, **cfg: ({k: v for k, v in dense_costs(*a, **cfg)[0].items()
                                     if k != "_dense_backward_dw_kernel"}, *dense_costs(*a, **cfg)[1:])
try:
    g.triton_launches()
    refused = None
except RuntimeError as e:
    refused = str(e)
print(json.dumps(dict(cases=cases, reported=reported, refused=refused)))
"""


def launched_kernels() -> set[str]:
    """The @triton.jit functions of fusedlayers/triton/ that host code names (a launch, or _launch(kernel, ...)):
    the kernels, not the jit helpers they call. Read from the source, whatever the kernels are called."""
    jit, host = set(), set()
    for path in glob.glob(os.path.join(REPO, "fusedlayers", "triton", "*.py")):
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.FunctionDef):
                    if any("jit" in ast.unparse(d) for d in node.decorator_list):
                        jit.add(node.name)
                    else:
                        host |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return jit & host


@pytest.fixture(scope="module")
def captured():
    run = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def test_captured_kernels_are_those_the_wrappers_launch(captured):
    # a kernel added, renamed or no longer launched by a case fails here, as does a kernel no case launches
    cases = {case: {launch["kernel"] for launch in launches} for case, launches in captured["cases"].items()}
    assert cases == CASE_KERNELS
    assert set().union(*cases.values()) == launched_kernels()
    assert len(launched_kernels()) == 10
    for launches in captured["cases"].values():
        assert all(len(launch["grid"]) >= 1 and min(launch["grid"]) > 0 for launch in launches)
    # seed002's backward: one activation launch per hidden layer, dx for the layers above the input only
    kernels = [launch["kernel"] for launch in captured["cases"]["seed002"]]
    assert kernels.count("_mlp_activation_kernel") == 2 and kernels.count("_dense_backward_dx_kernel") == 2
    assert sorted(captured["reported"]) == sorted(REPORTED)


def test_every_captured_launch_compiles(captured):
    for case, launches in captured["cases"].items():
        for launch in launches:
            usage = launch["usage"]
            assert 0 < usage["registers"] <= 255, (case, launch)
            assert usage["spill_bytes"] == usage["spill_stores"] + usage["spill_loads"] >= 0, (case, launch)
            assert usage["shared"] >= 0 and usage["stack_bytes"] >= 0, (case, launch)
            # no spills, but in seed002's dense kernels, which the report does not describe (bench/README: its
            # 784 -> 300 dW spills a few bytes)
            if case != "seed002" or launch["kernel"] == "_mlp_activation_kernel":
                assert usage["spill_bytes"] == 0, (case, launch)
    # tl.dot stages its operands in shared memory
    assert all(launch["usage"]["shared"] > 0 for launch in captured["cases"]["seed003_field"])


def test_report_refuses_a_case_it_does_not_describe(captured):
    assert captured["refused"] is not None
    assert "dense_large" in captured["refused"] and "_dense_backward_dw_kernel" in captured["refused"]


def test_triton_kernel_report(tmp_path):
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "bench.gpu_report", "--json", str(out), "--arch", "sm_80",
                    "--only", "_dense_forward_kernel[dense_tiny]"], cwd=REPO, env=ENV, check=True,
                   capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    assert set(report["assumptions"]["flops_per_s"]) >= {"fp32", "fp64_tensor", "fp64_vector"}
    (kernel,) = report["kernels"]
    assert kernel["name"] == "dense/_dense_forward_kernel[dense_tiny]"
    assert (kernel["backend"], kernel["arch"], kernel["dtype"]) == ("triton", "sm_80", "float64")
    assert 0 < kernel["registers"] <= 255
    assert kernel["spill_bytes"] == kernel["spill_stores"] + kernel["spill_loads"] >= 0
    assert kernel["shared_bytes"] > 0  # tl.dot stages its operands in shared memory
    # as the wrapper launched it: bias, z saved, cos, float64 tiles, 4 warps
    config = kernel["config"]
    assert (config["HAS_BIAS"], config["STORE_Z"], config["num_warps"]) == (True, True, 4)
    assert config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_K"] > 0
    # one row, 12 -> 12: 2*12*12 FLOPs of dot, 12 of bias, 10 per cos; x, W, b, y and z of float64
    assert kernel["flops"] == 2 * 12 * 12 + 12 + 10 * 12
    assert kernel["bytes"] == (12 + 144 + 12 + 2 * 12) * 8
    assert kernel["roofline_us"] == pytest.approx(kernel["bytes"] / 3.35e12 * 1e6)


def test_triton_cross_entropy_report(tmp_path):
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "bench.gpu_report", "--json", str(out), "--arch", "sm_90",
                    "--only", "cross_entropy/_cross_entropy_backward_kernel[ce]"], cwd=REPO, env=ENV, check=True,
                   capture_output=True, timeout=120)
    (kernel,) = json.loads(out.read_text())["kernels"]
    assert (kernel["backend"], kernel["arch"], kernel["dtype"]) == ("triton", "sm_90", "float32")
    assert kernel["config"]["debug"] is True  # the out-of-range target assert is compiled in
    assert kernel["config"]["HAS_GRAD_LSE"] is False  # the forward_grad op's backward pass
    assert 0 < kernel["registers"] <= 255 and kernel["spill_bytes"] == 0
    # N = 4096 rows of C = 32000 float32 logits read twice (the row's sum, then the gradient) and their gradient
    # written, the targets (int64), and grad_loss and lse (float32); 5 FLOPs and two exps (10 each) per logit
    n, c = 4096, 32000
    assert kernel["bytes"] == 3 * n * c * 4 + 8 * n + 2 * 4 * n
    assert kernel["flops"] == 25 * n * c
    assert kernel["bound"] == "memory" and kernel["roofline_us"] == pytest.approx(kernel["bytes"] / 3.35e12 * 1e6)


@pytest.mark.skipif(not gpu_report.HAS_NATIVE_CUDA,
                    reason="this build has no CUDA kernels (nvcc absent or FUSEDLAYERS_CUDA=0)")
def test_cuda_kernel_report():
    kernels = gpu_report.cuda_reports(gpu_report.extension_path())
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}
    names = {k["name"] for k in kernels}
    assert "dense/forward_act_kernel<GELU, float>" in names
    assert "dense/backward_act_kernel<Cos, double>" in names
    for dtype in ("float", "double", "Half", "BFloat16"):
        assert f"cross_entropy/cross_entropy_forward_kernel<{dtype}>" in names
        assert f"cross_entropy/cross_entropy_backward_kernel<{dtype}>" in names
        assert f"cross_entropy/cross_entropy_soft_forward_kernel<{dtype}>" in names
        assert f"cross_entropy/cross_entropy_soft_backward_kernel<{dtype}>" in names
    for k in kernels:
        assert k["backend"] == "cuda" and k["name"].startswith(("dense/", "cross_entropy/"))
        assert 0 < k["registers"] <= 255, k
        assert k["spill_bytes"] is None and k["stack_bytes"] >= 0, k
        assert k["roofline_us"] > 0 and k["bound"] == "memory", k
