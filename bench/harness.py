"""Timing, records and reports of the benchmark harness.

Every implementation of a case is timed in the same loop, interleaved repetition by repetition, so the
ratios between them hold on a noisy machine. A sample is the mean of enough back-to-back calls to last about
a millisecond (one call of a tiny layer is tens of microseconds, below perf_counter's useful resolution);
reported times are the median, min and max of the samples.
"""
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety
    tqdm = None


@dataclass
class Impl:
    name: str
    forward: Callable[[], object]           # the primal: the function's value, no graph
    forward_backward: Callable[[], object]  # the value and the gradients of every input and parameter
    extra: Callable[[dict], dict] | None = None  # more fields for the record, given it once timed (seed003)


@dataclass
class Case:
    name: str
    description: str
    device: str
    dtype: torch.dtype
    make_impls: Callable[[], list[Impl]]
    reps: int = 20  # repetitions of the full suite; --quick uses a quarter
    warmup: int | None = None  # calls before timing; None: the suite's (fewer for cases of seconds a call)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _calls_per_sample(fn: Callable, device: str, target_s: float = 1e-3) -> int:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - t
    return max(1, min(1000, int(target_s / max(once, 1e-7))))


def _sample(fn: Callable, calls: int, device: str) -> float:
    """Mean seconds per call over `calls` back-to-back calls."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / calls


def _spread(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def run_case(case: Case, impl_filter: list[str] | None, reps: int, warmup: int, progress=None) -> list[dict]:
    impls = [i for i in case.make_impls() if not impl_filter or any(i.name.startswith(f) for f in impl_filter)]
    fns = [(impl, kind, getattr(impl, attr)) for impl in impls
           for kind, attr in (("fwd", "forward"), ("fwd_bwd", "forward_backward"))]
    for _, _, fn in fns:
        for _ in range(warmup):
            fn()
    calls = {(impl.name, kind): _calls_per_sample(fn, case.device) for impl, kind, fn in fns}
    samples = {key: [] for key in calls}
    for rep in range(reps):
        # Rotate the order so no implementation always runs right after the same one.
        for impl, kind, fn in fns[rep % len(fns):] + fns[:rep % len(fns)]:
            samples[(impl.name, kind)].append(_sample(fn, calls[(impl.name, kind)], case.device))
        if progress is not None:
            progress.update(1)
    records = []
    for impl in impls:
        fwd, fwd_bwd = _spread(samples[(impl.name, "fwd")]), _spread(samples[(impl.name, "fwd_bwd")])
        records.append({
            "case": case.name, "impl": impl.name, "device": case.device, "dtype": str(case.dtype).removeprefix("torch."),
            "fwd_ms": fwd["median"], "fwd_bwd_ms": fwd_bwd["median"],
            "grad_ratio": fwd_bwd["median"] / fwd["median"],
            "fwd_ms_spread": fwd, "fwd_bwd_ms_spread": fwd_bwd, "reps": reps,
            "peak_mem_bytes": None, "cold_ms": None,
        })
    for impl, r in zip(impls, records):
        if impl.extra is not None:
            r.update(impl.extra(r))
    eager = next((r for r in records if r["impl"] == "eager"), None)
    for r in records:
        r["fwd_bwd_speedup_vs_eager"] = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"] if eager else None
    return records


def measure_cold(case: str, impl: str, warm_cache: bool, quick: bool = False) -> dict:
    """cold_ms and peak_mem_bytes of one implementation, from a fresh process (bench/cold.py). Unless
    warm_cache, torch.compile starts from an empty inductor cache."""
    env = dict(os.environ)
    cache = None if warm_cache else tempfile.mkdtemp(prefix="inductor-cache-")
    if cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        out = subprocess.run([sys.executable, "-m", "bench.cold", case, impl] + (["--quick"] if quick else []), env=env, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def machine_info() -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_suite(cases: list[Case], impl_filter, quick: bool, out_dir: str, warm_cache: bool = False) -> list[dict]:
    reps = {c.name: max(3, c.reps // 4) if quick else c.reps for c in cases}
    progress = tqdm(total=sum(reps.values()), desc="bench", unit="rep") if tqdm else None
    records = []
    for case in cases:
        if progress is not None:
            progress.set_postfix_str(case.name)
        warmup = case.warmup if case.warmup is not None else 2 if quick else 5
        records += run_case(case, impl_filter, reps[case.name], warmup, progress=progress)
    # Cold start and peak memory, one fresh process per record; --quick measures each implementation once,
    # on the first case that has it.
    first_of_impl = {}
    for r in records:
        first_of_impl.setdefault(r["impl"], r)
    cold = list(first_of_impl.values()) if quick else records
    if progress is not None:
        progress.reset(total=len(cold))
        progress.set_description("cold start")
    for r in cold:
        if progress is not None:
            progress.set_postfix_str(f"{r['case']} {r['impl']}")
        if not r["impl"].endswith("-floor"):  # a floor is a yardstick, not something a user runs
            r.update(measure_cold(r["case"], r["impl"], warm_cache, quick))
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "quick": quick, "results": records}, f, indent=1)
    print(format_table(records))
    plots = plot_speedups([r for r in records if not r["case"].startswith("sweep_")], out_dir)
    plots += plot_sweeps(records, out_dir)
    print(f"\nwrote {path}" + "".join(f", {p}" for p in plots))
    return records


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_sweeps(records: list[dict], out_dir: str) -> list[str]:
    """sweep_batch.png, sweep_width.png: forward+backward time of each implementation along a sweep
    (log-log), where the curves cross is where fusion stops winning."""
    plt = _pyplot()
    paths = []
    for sweep, label in (("batch", "batch size"), ("width", "layer width")):
        points = [r for r in records if r["case"].startswith(f"sweep_{sweep}_")]
        if plt is None or not points:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for impl in dict.fromkeys(r["impl"] for r in points):
            mine = sorted((int(r["case"].rsplit("_", 1)[1]), r["fwd_bwd_ms"]) for r in points if r["impl"] == impl)
            ax.plot([x for x, _ in mine], [t for _, t in mine], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("forward+backward ms")
        ax.set_title(points[0]["dtype"] + ", " + ("[16]*4 tanh" if sweep == "batch" else "[w]*4 tanh, batch 256"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"sweep_{sweep}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_speedups(records: list[dict], out_dir: str) -> list[str]:
    """speedup.png: forward+backward speedup over eager, per case and implementation (log scale)."""
    plt = _pyplot()
    if plt is None or not records:
        return []
    cases = list(dict.fromkeys(r["case"] for r in records))
    impls = [i for i in dict.fromkeys(r["impl"] for r in records) if i != "eager"]
    fig, ax = plt.subplots(figsize=(1.6 * len(cases) + 2, 4))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for c, case in enumerate(cases):
            r = next((r for r in records if r["case"] == case and r["impl"] == impl), None)
            if r and r["fwd_bwd_speedup_vs_eager"]:
                xs.append(c + k * width)
                ys.append(r["fwd_bwd_speedup_vs_eager"])
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([c + width * (len(impls) - 1) / 2 for c in range(len(cases))], cases, rotation=20)
    ax.set_ylabel("forward+backward speedup over eager")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "speedup.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def format_table(records: list[dict]) -> str:
    head = (f"{'case':<14} {'impl':<12} {'dtype':<8} {'fwd ms':>10} {'fwd+bwd ms':>11} {'grad/primal':>11} "
            f"{'vs eager':>9} {'cold ms':>9} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        speedup = r["fwd_bwd_speedup_vs_eager"]
        cold = "" if r["cold_ms"] is None else f"{r['cold_ms']:.0f}"
        peak = "" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        lines.append(f"{r['case']:<14} {r['impl']:<12} {r['dtype']:<8} {r['fwd_ms']:>10.4f} {r['fwd_bwd_ms']:>11.4f} "
                     f"{r['grad_ratio']:>11.2f} {'' if speedup is None else f'{speedup:.2f}x':>9} {cold:>9} {peak:>8}")
    split = [r for r in records if "field_ms" in r]
    if split:
        head = (f"{'case':<16} {'impl':<12} {'NFE fwd':>8} {'NFE bwd':>8} {'step ms':>9} {'field ms':>9} "
                f"{'solver ms':>10} {'field share':>12}")
        lines += ["", "Training step split (instrumented steps): the vector field's calls and VJPs vs the rest "
                  "(solver, loss, autograd)", head, "-" * len(head)]
        lines += [f"{r['case']:<16} {r['impl']:<12} {r['nfe_fwd']:>8} {r['nfe_bwd']:>8} "
                  f"{r['instrumented_step_ms']:>9.1f} {r['field_ms']:>9.1f} {r['solver_ms']:>10.1f} "
                  f"{r['field_share']:>11.0%}" for r in split]
    per_eval = [r for r in records if "us_per_eval" in r]
    if per_eval:
        head = (f"{'case':<22} {'impl':<12} {'NFE fwd':>8} {'NFE bwd':>8} {'step ms':>9} {'us/eval':>8} "
                f"{'kernel ms':>10} {'step/kernel':>12}")
        lines += ["", "Per evaluation: the timed step over its field evaluations (calls and VJPs); the fused solve's "
                  "evaluations also priced at the network kernels' per-call time", head, "-" * len(head)]
        lines += [f"{r['case']:<22} {r['impl']:<12} {r['nfe_fwd']:>8} {r['nfe_bwd']:>8} {r['fwd_bwd_ms']:>9.1f} "
                  f"{r['us_per_eval']:>8.1f} " + (f"{r['kernel_ms']:>10.2f} {r['step_over_kernel']:>11.2f}x"
                                                   if "kernel_ms" in r else "") for r in per_eval]
    return "\n".join(lines)
