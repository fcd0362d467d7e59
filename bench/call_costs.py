"""Where a tiny network's training step goes: the per-call costs of FusedMLP's paths, each measured as the
difference of two timed calls (medians of interleaved samples, one process), for seed000's network (6 x 12x12
cos, no bias, one vector, float64). `python -m bench.call_costs` prints the list; time it on an idle machine.

Each row says whose cost it is: "ours" (fusedlayers' Python, op and kernels) or "PyTorch" (the autograd engine,
the optimizer, the loss's ops), the part fusedlayers cannot cut but can avoid (grad_and_value builds no graph).
"""
import statistics
import time

import torch
import torch.nn.functional as F

from fusedlayers import FusedMLP

_ops = torch.ops.fusedlayers


def _median_us(fns: dict, calls: int = 500, samples: int = 15) -> dict:
    """Median microseconds a call of each fn, the fns taking turns sample by sample."""
    for fn in fns.values():
        for _ in range(100):
            fn()
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def measure() -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    net = FusedMLP([12] * 7, "cos", "cos", bias=False, dtype=torch.float64)
    x, target = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    flat = net.flat_params
    g = torch.ones(12, dtype=torch.float64)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-6, foreach=True)
    net(x).sum().backward()

    def no_grad_module():
        with torch.no_grad():
            net(x)

    def no_grad_op():
        with torch.no_grad():
            _ops.mlp_flat(x, flat, net.sizes, False, net.activations, True, "native")

    def no_grad_nothing():
        with torch.no_grad():
            pass

    def autograd_step():
        net.zero_grad()
        F.mse_loss(net(x), target).backward()

    def adam_step():
        autograd_step()
        optimizer.step()

    t = _median_us({
        "forward kernel": lambda: _ops.mlp_flat_forward(x, flat, net.sizes, False, net.activations, False),
        "backward kernel": lambda: _ops.mlp_flat_backward(g, x, flat, [], net.sizes, False, net.activations, False),
        "no_grad": no_grad_nothing,
        "op, no grad": no_grad_op,
        "module, no grad": no_grad_module,
        "module, graph": lambda: net(x),
        "module + autograd.grad": lambda: torch.autograd.grad(net(x), flat, g),
        "module + backward": lambda: net(x).backward(g),
        "module + mse + backward": lambda: F.mse_loss(net(x), target).backward(),
        "autograd step": autograd_step,
        "adam step": adam_step,
        "grad_and_value, target": lambda: net.grad_and_value(x, target=target),
    })
    return [
        ("forward kernel (the CPU tile loop, its checks and allocations)", "ours", t["forward kernel"]),
        ("backward kernel (recomputes the forward)", "ours", t["backward kernel"]),
        ("op around the forward kernel (checks, dispatch)", "ours",
         t["op, no grad"] - t["no_grad"] - t["forward kernel"]),
        ("module call (nn.Module.__call__, backend choice)", "ours + PyTorch", t["module, no grad"] - t["op, no grad"]),
        ("autograd node and saved tensors", "ours", t["module, graph"] - t["module, no grad"] + t["no_grad"]),
        ("autograd.grad: the engine and its Python wrapper, the node's apply, less the backward kernel",
         "PyTorch + ours",
         t["module + autograd.grad"] - t["module, graph"] - t["backward kernel"]),
        ("backward() instead of autograd.grad (AccumulateGrad)", "PyTorch",
         t["module + backward"] - t["module + autograd.grad"]),
        ("the MSE loss's forward and backward ops", "PyTorch",
         t["module + mse + backward"] - t["module + backward"]),
        ("zero_grad()", "PyTorch", t["autograd step"] - t["module + mse + backward"]),
        ("Adam step, one tensor (foreach)", "PyTorch", t["adam step"] - t["autograd step"]),
        ("= zero_grad, module, MSE, backward (the autograd step without the optimizer)", "", t["autograd step"]),
        ("= grad_and_value(x, target=...) (the same, no graph, no zero_grad)", "", t["grad_and_value, target"]),
    ]


def main() -> None:
    rows = measure()
    width = max(len(r[0]) for r in rows)
    print(f"{'cost':{width}}  {'whose':14}  us/call")
    for what, whose, us in rows:
        print(f"{what:{width}}  {whose:14}  {us:7.1f}")


if __name__ == "__main__":
    main()
