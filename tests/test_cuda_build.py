"""The CUDA kernels are compiled by every build where nvcc is present (CI requires it: FUSEDLAYERS_CUDA=1),
though no GPU runs them here: read their resource report from the built extension."""
import glob
import os
import re
import shutil
import subprocess

import pytest

import fusedlayers
from fusedlayers.backends import HAS_NATIVE_CUDA


def _cuobjdump():
    import triton  # bundles cuobjdump: no CUDA_HOME needed

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


@pytest.mark.skipif(not HAS_NATIVE_CUDA, reason="this build has no CUDA kernels (nvcc absent or FUSEDLAYERS_CUDA=0)")
def test_cuda_kernels_built_for_both_archs_without_spills():
    (so,) = glob.glob(os.path.join(os.path.dirname(fusedlayers.__file__), "_C*.so"))
    report = subprocess.run([_cuobjdump(), "-res-usage", so], capture_output=True, text=True, check=True).stdout
    kernels = {}  # (arch, mangled name) -> (registers, stack bytes)
    arch = None
    for line, following in zip(report.splitlines(), report.splitlines()[1:] + [""]):
        if m := re.match(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            usage = dict(re.findall(r"(\w+):(\d+)", following))
            kernels[(arch, m.group(1))] = (int(usage["REG"]), int(usage["STACK"]))
    assert {a for a, _ in kernels} == {"sm_80", "sm_90"}
    assert any("forward_act_kernel" in name for _, name in kernels)
    assert any("backward_act_kernel" in name for _, name in kernels)
    # the cross-entropy kernels, for each dtype (mangled template argument) and arch
    for arch in ("sm_80", "sm_90"):
        for kernel in ("cross_entropy_forward_kernel", "cross_entropy_backward_kernel", "cross_entropy_soft_forward_kernel",
                       "cross_entropy_soft_backward_kernel"):
            for dtype in ("If", "Id", "IN3c104Half", "IN3c108BFloat16"):
                assert any(a == arch and kernel + dtype in name for a, name in kernels), (arch, kernel, dtype)
    for (arch, name), (regs, stack) in kernels.items():
        assert 0 < regs <= 255, (arch, name, regs)
        # A stack frame means spilled registers, except in sin/cos: CUDA's own argument reduction for huge
        # arguments keeps a small array on the stack.
        if "3Sin" in name or "3Cos" in name:
            assert stack <= 48, (arch, name, stack)
        else:
            assert stack == 0, (arch, name, stack)
