"""First-call latency and peak memory of one implementation, in a fresh process: `python -m bench.cold CASE
IMPL [--quick]` (the case as --quick sizes it) prints {"cold_ms": ..., "peak_mem_bytes": ...} as JSON.

cold_ms is the first forward+backward call after the case is built (inputs and parameters exist), compilation
included. peak_mem_bytes is how far that call and a few more raised the process's peak memory over what it
held just before: on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs; what the
allocator keeps counts too), on a GPU torch.cuda.max_memory_allocated.
"""
import json
import re
import sys
import time

import torch

from .cases import all_cases


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def measure(case_name: str, impl_name: str, quick: bool = False) -> dict:
    case = next(c for c in all_cases(quick) if c.name == case_name)
    impl = next(i for i in case.make_impls() if i.name == impl_name)
    cuda = case.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
    start = time.perf_counter()
    impl.forward_backward()
    if cuda:
        torch.cuda.synchronize()
    cold_ms = (time.perf_counter() - start) * 1e3
    for _ in range(3):
        impl.forward_backward()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    return {"cold_ms": cold_ms, "peak_mem_bytes": max(int(peak), 0)}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], quick="--quick" in sys.argv[3:])))
