"""The backend registry (fusedlayers/backends.py): the same table as the extension's, what this machine can
run, and how a choice resolves or is refused."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fusedlayers
from fusedlayers import backends


def test_python_table_is_the_cpp_table():
    names, prefixes = torch.ops.fusedlayers.backend_table()
    assert dict(zip(names, prefixes)) == backends.KERNELS
    assert {b.kernels for b in backends.BACKENDS} == set(backends.KERNELS)


def test_every_kernel_backend_has_its_kernel_schemas():
    for prefix in backends.KERNELS.values():
        for kernel in ("dense_forward", "dense_backward", "mlp_forward", "mlp_backward", "cross_entropy_forward",
                       "cross_entropy_forward_grad", "cross_entropy_backward", "linear_cross_entropy_forward",
                       "linear_cross_entropy_backward"):
            assert hasattr(torch.ops.fusedlayers, prefix + kernel), prefix + kernel


def test_available_backends():
    """cpu always; cuda with a GPU and this build's CUDA kernels; triton with the package and a GPU or the
    interpreter. Not keyed on the host alone: a CPU-only build on a GPU host has no "cuda"."""
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("fusedlayers::dense_forward", "CUDA")
    has_triton = importlib.util.find_spec("triton") is not None
    expected = ["cpu"]
    if torch.cuda.is_available() and has_cuda_kernels:
        expected.append("cuda")
    if has_triton and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        expected.append("triton")
    assert fusedlayers.available_backends() == expected


def test_resolution():
    cpu = torch.device("cpu")
    assert backends.resolve_backend("auto", cpu).kernels == "native"
    assert backends.resolve_backend("cpu", cpu).kernels == "native"
    assert backends.resolve_backend("auto", torch.device("meta")).kernels == "native"  # the fakes run meta
    with pytest.raises(ValueError, match="unknown backend 'tpu'; expected one of: auto, cpu, cuda, triton"):
        backends.resolve_backend("tpu", cpu)
    with pytest.raises(ValueError, match="backend='cuda' cannot run tensors on device 'cpu'"):
        backends.resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fusedlayers.FusedDense(2, 2, backend="gpu")


def test_triton_on_cpu_without_the_interpreter_is_refused():
    """In a process of its own: this one runs with TRITON_INTERPRET=1 (conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, fusedlayers\nfrom fusedlayers.functional import dense\n"
            "try:\n    dense(torch.randn(2, 3), torch.randn(4, 3), backend='triton')\n"
            "except RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if importlib.util.find_spec("triton") is None:
        assert "needs the triton package" in out
    else:
        assert "runs on CPU tensors only under TRITON_INTERPRET=1" in out
