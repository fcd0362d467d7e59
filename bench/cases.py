"""The benchmark cases: each builds its implementations (what a user writes in plain PyTorch, its
torch.compile, and fusedlayers on every backend that runs at speed here) on the same inputs and parameters."""
import torch
from torch import nn

import fusedlayers
from fusedlayers.activations import REFERENCE

from .harness import Case, Impl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused_backends() -> list[str]:
    """Backends that run at speed on DEVICE: the Triton interpreter is for tests, not for timing."""
    speed = {"cpu": ["cpu"], "cuda": ["cuda", "triton"]}[DEVICE]
    return [b for b in fusedlayers.available_backends() if b in speed]


def activation_module(name: str) -> nn.Module:
    return REFERENCE[name].module()


def module_impl(name: str, model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Impl:
    """Times model(x) and the gradients of <model(x), grad_out> w.r.t. x and every parameter."""
    wrt = [x, *model.parameters()]

    def forward():
        with torch.no_grad():
            return model(x)

    def forward_backward():
        return torch.autograd.grad(model(x), wrt, grad_out)

    return Impl(name, forward, forward_backward)


def model_impls(eager: nn.Module, fused_for_backend, x: torch.Tensor, grad_out: torch.Tensor) -> list[Impl]:
    """eager, compile (torch.compile of eager) and fused-<backend> for each backend, all on one set of
    parameters: fused_for_backend(backend) builds a fused model sharing eager's parameters."""
    impls = [module_impl("eager", eager, x, grad_out), module_impl("compile", torch.compile(eager), x, grad_out)]
    impls += [module_impl(f"fused-{b}", fused_for_backend(b), x, grad_out) for b in fused_backends()]
    return impls


def _dense_case(name, description, batch, n_in, n_out, activation, dtype, reps, gemm_floor=False) -> Case:
    def make():
        torch.manual_seed(0)
        linear = nn.Linear(n_in, n_out, device=DEVICE, dtype=dtype)
        x = torch.randn(*batch, n_in, device=DEVICE, dtype=dtype, requires_grad=True)
        g = torch.randn(*batch, n_out, device=DEVICE, dtype=dtype)
        eager = nn.Sequential(linear, activation_module(activation))
        impls = model_impls(eager, lambda b: fusedlayers.FusedDense.from_linear(linear, activation, backend=b), x, g)
        if gemm_floor:
            # The three bare GEMMs a dense layer's forward and backward cannot do without.
            xd, w = x.detach(), linear.weight.detach()
            floor_fwd = lambda: xd @ w.T  # noqa: E731
            impls.append(Impl("gemm-floor", floor_fwd, lambda: (xd @ w.T, g @ w, g.T @ xd)))
        return impls

    return Case(name, description, DEVICE, dtype, make, reps)


def all_cases() -> list[Case]:
    return [
        _dense_case("dense_large", "4096 x 1024 -> 1024, gelu, float32: the GEMM-bound regime",
                    (4096,), 1024, 1024, "gelu", torch.float32, reps=12, gemm_floor=True),
        _dense_case("dense_tiny", "one vector, 12 -> 12, cos, float64: the per-call-overhead regime",
                    (), 12, 12, "cos", torch.float64, reps=40),
    ]
