"""The backends, as data: what a user's `backend=` names, which C++ kernel backend (csrc/backend.h) it runs,
on which devices, and why it cannot run here. The C++ handles, the kernel schemas, the fakes and
available_backends() all iterate over these tables; adding a backend is one row here, one in csrc/backend.h,
and the folder that registers its kernels."""
import importlib.util
import os
from typing import Callable, NamedTuple

import torch

from .ops.common import KERNELS  # noqa: F401  (the kernel backends, kept beside the ops that define them)

# Fixed at import (fusedlayers._C is loaded first): plain constants, so torch.compile traces no lookup.
HAS_NATIVE_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("fusedlayers::dense_forward", "CUDA")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_missing(device_type: str) -> str | None:
    if not HAS_NATIVE_CUDA:
        return ("fusedlayers was built without its CUDA kernels; use backend='triton' or rebuild with nvcc present "
                "(FUSEDLAYERS_CUDA=1)")
    return None


def _triton_missing(device_type: str) -> str | None:
    if not HAS_TRITON:
        return "backend='triton' needs the triton package"
    if device_type == "cpu" and not triton_interpreted():
        return ("backend='triton' runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing "
                "fusedlayers); move the tensors to a GPU otherwise")
    return None


class Backend(NamedTuple):
    name: str  # what users pass as backend=
    kernels: str  # the key of KERNELS (fusedlayers/ops/common.py) whose kernel ops it runs
    devices: tuple[str, ...]  # the device types of the tensors it runs
    missing: Callable[[str], str | None]  # why it cannot run tensors of that device type here; None: it can
    load: Callable[[], None] | None = None  # registers its kernels (from Python), called at first use


def _load_triton() -> None:
    from . import triton  # noqa: F401  (an import statement, which torch.compile traces; importlib it does not)


# In the order "auto" tries them for a device.
BACKENDS = (
    Backend("cpu", "native", ("cpu",), lambda device_type: None),
    Backend("cuda", "native", ("cuda",), _cuda_missing),
    Backend("triton", "triton", ("cuda", "cpu"), _triton_missing, _load_triton),
)
BY_NAME = {b.name: b for b in BACKENDS}
CHOICES = ("auto", *BY_NAME)
NATIVE = BACKENDS[0]


def _device_present(device_type: str) -> bool:
    return device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available())


def available_backends() -> list[str]:
    """The backends this machine can run: "cpu" always; "cuda" with a GPU and the CUDA kernels built;
    "triton" with triton and a GPU, or on CPU tensors under TRITON_INTERPRET=1."""
    return [b.name for b in BACKENDS if any(_device_present(d) and b.missing(d) is None for d in b.devices)]


def check_backend(backend: str) -> str:
    if backend not in CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of: {', '.join(CHOICES)}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend that runs a user's choice (a name or "auto") for tensors on `device`; an error that says why
    when it cannot run here."""
    if backend == "auto":
        candidates = [b for b in BACKENDS if device.type in b.devices]
        for b in candidates:
            if b.missing(device.type) is None:
                return b
        if candidates:
            raise RuntimeError(candidates[0].missing(device.type))
        return NATIVE  # meta and other devices: the dispatcher decides (the fakes give meta tensors their shapes)
    b = BY_NAME.get(check_backend(backend))
    if device.type not in b.devices:
        raise ValueError(f"backend={backend!r} cannot run tensors on device {device.type!r}")
    reason = b.missing(device.type)
    if reason is not None:
        raise RuntimeError(reason)
    return b
