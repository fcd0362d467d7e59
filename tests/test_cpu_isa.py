"""The CPU kernels are compiled for three instruction sets and chosen at run time: run the CPU parity tests
once more under each narrower one (FUSEDLAYERS_CPU_ISA caps the choice at process start)."""
import os
import subprocess
import sys

import pytest
import torch

import fusedlayers  # noqa: F401

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_widest_isa_is_used_by_default():
    expected = torch.backends.cpu.get_cpu_capability().lower()  # what ATen itself picked on this CPU
    if "FUSEDLAYERS_CPU_ISA" not in os.environ and expected in ("avx2", "avx512"):
        assert torch.ops.fusedlayers.cpu_isa() == expected


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_cpu_kernels_under_a_narrower_isa(isa):
    env = {**os.environ, "FUSEDLAYERS_CPU_ISA": isa}
    check = subprocess.run([sys.executable, "-c", "import torch, fusedlayers; print(torch.ops.fusedlayers.cpu_isa())"],
                           env=env, capture_output=True, text=True, check=True)
    if isa == "avx2" and check.stdout.strip() != "avx2":
        pytest.skip("this CPU has no AVX2")
    assert check.stdout.strip() == isa
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          os.path.join(TESTS, "test_dense.py"), os.path.join(TESTS, "test_mlp.py"),
                          os.path.join(TESTS, "test_cross_entropy.py"), os.path.join(TESTS, "test_higher_order.py"),
                          os.path.join(TESTS, "test_mlp_jet.py"),
                          "-k", "(cpu and (matches or gradcheck or nan or recompute or threads or rows or softcap or vocab))"
                                " or float32_sweep or jet_matches or jet_float32 or jet_parallel or jet_gradcheck"],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(TESTS))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
