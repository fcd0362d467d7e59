"""The CPU kernels are compiled for three instruction sets and chosen at run time: run the CPU parity tests
once more under each narrower one (FUSEDLAYERS_CPU_ISA caps the choice at process start)."""
import collections
import functools
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import fusedlayers  # noqa: F401

TESTS = os.path.dirname(os.path.abspath(__file__))
ISAS = ["default", "avx2", "avx512"]  # narrowest first

# The CPU parity tests run again under each narrower ISA, each with the number of cases it has today: a
# renamed test is then an error of the run and a dropped or skipped case a failure here, never silently gone.
# Only the C++ CPU backend's cases (the Triton ones run interpreted, without these kernels).
NARROWER_ISA_CASES = {
    "test_dense.py::test_matches_linear_plus_activation": 156,
    "test_dense.py::test_gradcheck": 26,
    "test_dense.py::test_nan_propagates": 1,
    "test_dense.py::test_recompute_policy": 6,
    "test_dense.py::test_saved_tensors_as_autograd_keeps_them": 2,
    "test_mlp.py::test_matches_sequential": 192,
    "test_mlp.py::test_gradcheck": 3,
    "test_mlp.py::test_saved_tensors_as_autograd_keeps_them": 2,
    "test_cross_entropy.py::test_matches_f_cross_entropy": 48,
    "test_cross_entropy.py::test_z_loss_and_softcap": 48,
    "test_cross_entropy.py::test_inplace_backward_matches_f_cross_entropy": 24,
    "test_cross_entropy.py::test_linear_matches_f_cross_entropy_of_linear": 18,
    "test_cross_entropy.py::test_gradcheck_and_gradgradcheck": 8,
    "test_cross_entropy.py::test_linear_gradcheck_and_no_double_backward": 2,
    "test_cross_entropy.py::test_large_odd_vocabulary": 3,
    "test_cross_entropy.py::test_vocabulary_sizes": 3,
    "test_cross_entropy.py::test_mean_over_zero_kept_weight_is_nan": 2,
    "test_cross_entropy.py::test_module_matches_nn_cross_entropy_loss": 1,
    "test_higher_order.py::test_activation_derivative_float32_sweep": 12,
    "test_higher_order.py::test_dense_gradgradcheck": 26,
    "test_higher_order.py::test_dense_gradgradcheck_one_input_at_a_time": 3,
    "test_higher_order.py::test_mlp_gradgradcheck": 2,
    "test_higher_order.py::test_mlp_gradgradcheck_parameters_only": 1,
    "test_higher_order.py::test_cross_entropy_z_loss_softcap_transforms": 1,
    "test_higher_order.py::test_pinn_parameter_gradient_matches_eager": 1,
    "test_mlp_jet.py::test_jet_matches_forward_mode": 26,
    "test_mlp_jet.py::test_jet_float32_against_float64": 1,
    "test_mlp_jet.py::test_jet_float32_gradients_against_float64": 1,
    "test_mlp_jet.py::test_jet_parallel_chunks_match_forward_mode": 1,
    "test_mlp_jet.py::test_jet_gradcheck": 4,
    "test_mlp_jet.py::test_jet_gradcheck_without_bias_and_other_directions": 2,
}


@functools.cache
def widest_isa():
    """The widest of ISAS this CPU runs, as ATen finds it (without ATEN_CPU_CAPABILITY, which caps its pick);
    "default" on another architecture, where only the portable kernels are compiled."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    aten = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
    return aten if aten in ISAS else "default"


def test_widest_isa_is_used_by_default():
    cap = os.environ.get("FUSEDLAYERS_CPU_ISA", ISAS[-1])
    assert torch.ops.fusedlayers.cpu_isa() == ISAS[min(ISAS.index(widest_isa()), ISAS.index(cap))]


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_cpu_kernels_under_a_narrower_isa(isa, tmp_path):
    if ISAS.index(isa) > ISAS.index(widest_isa()):
        pytest.skip(f"this CPU has no {isa}")
    env = {**os.environ, "FUSEDLAYERS_CPU_ISA": isa}
    check = subprocess.run([sys.executable, "-c", "import torch, fusedlayers; print(torch.ops.fusedlayers.cpu_isa())"],
                           env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == isa
    report = tmp_path / "report.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--junitxml={report}",
                          *(os.path.join("tests", name) for name in NARROWER_ISA_CASES), "-k", "not triton and not cuda"],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(TESTS))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {f"{case.get('classname').rsplit('.', 1)[-1]}.py::{case.get('name')}":
                [c.tag for c in case if c.tag in ("skipped", "failure", "error")] for case in cases}
    assert {name: tags for name, tags in outcomes.items() if tags} == {}, "every case must pass, none be skipped"
    ran = collections.Counter(name.split("[")[0] for name in outcomes)
    assert {name: ran[name] for name in NARROWER_ISA_CASES if ran[name] < NARROWER_ISA_CASES[name]} == {}
