import os

# Triton kernels run on CPU tensors only under the interpreter, which must be on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedlayers  # noqa: E402

BACKENDS = fusedlayers.available_backends()


def device_of(backend: str) -> str:
    """The device a backend's tests run on: the GPU when there is one, else the CPU (Triton interpreted)."""
    devices = fusedlayers.backends.BY_NAME[backend].devices
    return next(d for d in devices if d == "cpu" or getattr(torch, d).is_available())


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def assert_rel_close(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected|: a relative error over the whole tensor, so values
    near zero do not need an absolute tolerance of their own."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-300), f"{what}: max error {err:.3e} > {rtol:.0e} * max |expected| {scale:.3e}"


def value_classes(t: torch.Tensor) -> torch.Tensor:
    """Each element's class: 0 finite, 1 NaN, 2 +inf, 3 -inf (NaN/inf placement compared against PyTorch's)."""
    return torch.where(t.isnan(), 1, torch.where(t.isposinf(), 2, torch.where(t.isneginf(), 3, 0)))


def per_layer(net, grads) -> list[torch.Tensor]:
    """The gradients of net's parameters (in parameters() order) as one tensor per layer weight and bias, in
    state_dict order: a flat FusedMLP's one gradient split as its layout stores it, anything else's as given."""
    if not getattr(net, "flat", False):
        return list(grads)
    (flat,) = grads
    weights, biases = fusedlayers.functional.flat_layers(flat, net.sizes, net.bias0 is not None)
    return [t for pair in zip(weights, biases or [None] * len(weights)) for t in pair if t is not None]
