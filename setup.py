"""Builds fusedlayers._C: the C++ CPU kernels always, the CUDA kernels whenever nvcc and a CUDA build of
torch are present (a GPU is not needed to build them).

FUSEDLAYERS_CUDA=0 skips CUDA (a fast local build); FUSEDLAYERS_CUDA=1 makes a missing toolchain an error.
Build with `pip install --no-build-isolation -e .` so that the extension links against the installed torch.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """CUDA_HOME as set, else /usr/local/cuda, else the toolkit holding the nvcc on PATH."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# torch.utils.cpp_extension reads CUDA_HOME when imported: set it first, or it guesses a wrong home.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # with no GPU to query, the build needs a target

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    flag = os.environ.get("FUSEDLAYERS_CUDA", "")
    have = bool(_cuda_home) and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")) and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1" and not have:
        sys.exit(f"FUSEDLAYERS_CUDA=1 but no CUDA toolchain: CUDA_HOME={_cuda_home!r}, torch.version.cuda={torch.version.cuda!r}")
    return have


def _cublas_dirs():
    """Include and library folders of the nvidia-cublas wheel that a CUDA build of torch pulls in."""
    import nvidia

    for base in nvidia.__path__:
        for sub in ("cu13", "cublas"):
            inc = os.path.join(base, sub, "include")
            if os.path.exists(os.path.join(inc, "cublasLt.h")):
                return inc, os.path.join(base, sub, "lib")
    sys.exit("cublasLt.h not found in the nvidia wheels beside torch")


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/ops/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-DCPU_CAPABILITY=DEFAULT"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not _want_cuda():
        return CppExtension("fusedlayers._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    inc, lib = _cublas_dirs()
    kwargs["include_dirs"].append(inc)
    kwargs["extra_link_args"] += [f"-L{lib}", "-l:libcublasLt.so.13", f"-Wl,-rpath,{lib}"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--resource-usage"]
    return CUDAExtension(
        "fusedlayers._C",
        sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx + ["-DFUSEDLAYERS_WITH_CUDA"], "nvcc": nvcc},
        **kwargs,
    )


setup(
    name="fusedlayers",
    version="0.1.0",
    description="Fused dense, MLP and cross-entropy layers for PyTorch with hand-written gradients",
    packages=find_packages(include=["fusedlayers", "fusedlayers.*"]),
    python_requires=">=3.10",
    # The extension is built against torch's C++ ABI: it works with the minor release it was built with.
    install_requires=["torch>=2.14,<2.15"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
