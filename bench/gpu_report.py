"""GPU resource report of every fusedlayers kernel, made without a GPU: `python -m bench.gpu_report [--json FILE]`.

Triton kernels are captured as the library launches them in a training step of their benchmark configuration
(the cases of bench/cases.py): the triton_* ops run on CPU tensors with Triton's launch intercepted, nothing
executed. Each captured launch is compiled ahead of time for sm_80 and sm_90 and its PTX is assembled by
Triton's bundled ptxas -v for registers and spills. The CUDA kernels' usage is read from the built extension with
cuobjdump -res-usage. Each kernel also gets the bytes it
must move and the FLOPs it must do at its benchmark shape, and the roofline time these give on an H100 SXM.
"""
import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import fusedlayers
from fusedlayers.backends import HAS_NATIVE_CUDA

from .gpu_costs import (ACT_FLOPS, ASSUMPTIONS, FORMULAS, cross_entropy_cost,  # noqa: F401 (the report's API)
                        cross_entropy_soft_cost, roofline)

ops = torch.ops.fusedlayers  # the op names and schemas are the stable interface; Python module paths may move

ARCHS = {"sm_80": 80, "sm_90": 90}
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_report.json")
TRITON_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# The benchmark configurations of bench/cases.py whose kernels these are, each captured in a training step
# (_capture). rows: the flattened batch.
DENSE_CASES = {
    "dense_large": dict(rows=4096, n_in=1024, n_out=1024, activation="gelu", dtype=torch.float32),
    "dense_tiny": dict(rows=1, n_in=12, n_out=12, activation="cos", dtype=torch.float64),
}
MLP_CASES = {
    "seed003_field": dict(rows=100, widths=(3, 10, 10, 10, 2), activations=("selu",) * 3 + ("identity",),
                          dtype=torch.float32, bias=True, input_grad=True),
    "seed000": dict(rows=1, widths=(12,) * 7, activations=("cos",) * 6, dtype=torch.float64, bias=False,
                    input_grad=True),
    # The activation kernel runs only in the layer-by-layer backward of networks too wide to fuse: seed002's,
    # reported at its widest hidden layer (its dense kernels at the dense cases).
    "seed002": dict(rows=256, widths=(784, 300, 100, 10), activations=("relu", "relu", "identity"),
                    dtype=torch.float32, bias=True, input_grad=False),
}
# The CUDA elementwise kernels are timed by dense_large; every instantiation is rated at its output size.
CUDA_REFERENCE_ELEMENTS = 4096 * 1024
# The benchmark shape of the cross-entropy kernels (bench case `ce`): the defaults of F.cross_entropy, and every
# option at once (the most registers; with a gradient of lse, through the backward op); exp and tanh count as
# activations (a FLOPs each). The CUDA kernels take their options at run time: one binary per dtype, rated at
# the defaults.
CE_SHAPE = dict(N=4096, C=32000)
CE_CASES = {
    "ce": dict(dtype=torch.float32, weight=False, label_smoothing=0.0, z_loss=0.0, softcap=None, grad_lse=False),
    "ce_all_options": dict(dtype=torch.float32, weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                           grad_lse=True),
}
# Class-probability targets (bench case `ce_soft`): mixup's targets with label smoothing 0.1.
CE_SOFT_SHAPE = dict(N=1024, C=32000)
CE_SOFT_CASES = {"ce_soft": dict(dtype=torch.float32, weight=False, label_smoothing=0.1)}


def cuda_home() -> str | None:
    """CUDA_HOME as set, else /usr/local/cuda, else the toolkit holding the nvcc on PATH (as setup.py finds it)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def find_tool(name: str) -> str:
    """Triton's bundled copy of a CUDA binary tool (no toolkit needed), else the toolkit's, else PATH's."""
    home = cuda_home()
    for path in (os.path.join(TRITON_BIN, name), home and os.path.join(home, "bin", name), shutil.which(name)):
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name} not found in {TRITON_BIN}, CUDA_HOME/bin ({home}) or PATH")


def _act_flops(activation: str) -> int:
    return 0 if activation == "identity" else ACT_FLOPS


# ---- Triton -----------------------------------------------------------------------------------------------
# The launches are captured from the library's own code path: each case runs a training step through the Triton
# ops (torch.ops.fusedlayers.triton_*) on CPU tensors of its benchmark shapes, with JITFunction.run replaced by a
# recorder that runs nothing. The wrappers thus choose every kernel, argument, constexpr, num_warps and grid as on
# a GPU; the tensors (torch.empty: allocated, never touched) are kept for the JIT's binder. The raw ops take CPU
# tensors without TRITON_INTERPRET (only backend='triton' asks for it); under it the kernels would be interpreted
# functions, which cannot be compiled. fusedlayers.triton is imported inside the functions: the tests import this
# module with TRITON_INTERPRET=1.

def _capture(step, **cfg) -> list[dict]:
    """The Triton launches of step(**cfg), in order, each {fn, args, meta (keywords), grid}; none runs."""
    launches = []

    def record(fn, *args, grid, warmup, **meta):
        if callable(grid):
            grid = grid(dict(zip(fn.arg_names, args), **meta))
        launches.append(dict(fn=fn, args=args, meta=meta, grid=tuple(grid)))

    with mock.patch.object(JITFunction, "run", record):
        step(**cfg)
    return launches


def _dense_step(rows, n_in, n_out, activation, dtype):
    """One layer's training step: the forward saving z, then every gradient from it."""
    x, w, b = (torch.empty(*shape, dtype=dtype) for shape in ((rows, n_in), (n_out, n_in), (n_out,)))
    y, z = ops.triton_dense_forward(x, w, b, activation, True)
    ops.triton_dense_backward(torch.empty_like(y), x, w, b, z, activation, [True, True, True])


def _mlp_step(rows, widths, activations, dtype, bias, input_grad):
    """A network's training step: the forward saving every z, then the gradients from them."""
    x = torch.empty(rows, widths[0], dtype=dtype)
    ws = [torch.empty(n_out, n_in, dtype=dtype) for n_in, n_out in zip(widths, widths[1:])]
    bs = [torch.empty(n_out, dtype=dtype) for n_out in widths[1:]] if bias else []
    y, saved = ops.triton_mlp_forward(x, ws, bs, list(activations), True)
    ops.triton_mlp_backward(torch.empty_like(y), x, ws, bs, saved, list(activations), input_grad)


def _cross_entropy_step(dtype, weight, label_smoothing, z_loss, softcap, grad_lse):
    """The mean loss and its gradient at CE_SHAPE: in one call (bench case `ce`, in place), or with a gradient of
    lse through the forward and backward ops. The logits (524 MB of float32) are allocated, never touched."""
    logits = torch.empty(CE_SHAPE["N"], CE_SHAPE["C"], dtype=dtype)
    target = torch.zeros(CE_SHAPE["N"], dtype=torch.int64)  # in range: the CPU path checks the targets
    w = torch.empty(CE_SHAPE["C"], dtype=dtype) if weight else None
    options = (-100, label_smoothing, z_loss, softcap, "mean")
    if not grad_lse:
        ops.triton_cross_entropy_forward_grad(logits, target, w, *options, logits)
    else:
        loss, lse = ops.triton_cross_entropy_forward(logits, target, w, *options)
        ops.triton_cross_entropy_backward(torch.empty_like(loss), torch.empty_like(lse), logits, target, w, lse,
                                          *options)


def _cross_entropy_soft_step(dtype, weight, label_smoothing):
    """The soft loss's forward and backward at CE_SOFT_SHAPE (the tensors allocated, never touched)."""
    logits = torch.empty(CE_SOFT_SHAPE["N"], CE_SOFT_SHAPE["C"], dtype=dtype)
    target = torch.empty_like(logits)
    w = torch.empty(CE_SOFT_SHAPE["C"], dtype=dtype) if weight else None
    loss, lse = ops.triton_cross_entropy_soft_forward(logits, target, w, label_smoothing)
    ops.triton_cross_entropy_soft_backward(torch.empty_like(loss), None, logits, target, w, lse, label_smoothing)


def _import_kernels() -> None:
    """Registers the kernels of the triton_* ops, refusing interpreted ones."""
    from fusedlayers.triton import cross_entropy, dense, mlp  # noqa: F401

    if not isinstance(dense._dense_forward_kernel, JITFunction):
        raise RuntimeError("fusedlayers' Triton kernels were imported with TRITON_INTERPRET set; run "
                           "`python -m bench.gpu_report` in a process without it")


def capture_cases() -> dict[str, list[dict]]:
    """Every case's captured launches (_capture), by case."""
    _import_kernels()
    steps = [(DENSE_CASES, _dense_step), (MLP_CASES, _mlp_step), (CE_CASES, _cross_entropy_step),
             (CE_SOFT_CASES, _cross_entropy_soft_step)]
    return {case: _capture(step, **cfg) for cases, step in steps for case, cfg in cases.items()}


def _arg(launch: dict, name: str):
    """A captured launch's argument by its parameter name."""
    return dict(zip(launch["fn"].arg_names, launch["args"]), **launch["meta"])[name]


def _dense_costs(launches, rows: int, n_in: int, n_out: int, activation: str, dtype: torch.dtype):
    M, N, K, a, i = rows, n_out, n_in, _act_flops(activation), dtype.itemsize
    costs = {"_dense_forward_kernel": (2 * M * N * K + M * N + a * M * N, (M * K + N * K + N + 2 * M * N) * i),
             "_dense_backward_dx_kernel": (2 * M * N * K + (a + 1) * M * N, (2 * M * N + N * K + M * K) * i),
             "_dense_backward_dw_kernel": (2 * M * N * K + (a + 2) * M * N, (2 * M * N + M * K + N * K + N) * i)}
    return costs, dict(activations=[activation], shape={"M": M, "N": N, "K": K}), set()


def _mlp_costs(launches, rows: int, widths: tuple, activations: tuple, dtype: torch.dtype, bias: bool,
               input_grad: bool):
    """The fused kernels' costs (z saved); or, for a network the wrappers run layer by layer, the activation
    kernel's at the widest hidden layer (the dense kernels it also launches are reported at the dense cases)."""
    M, w, a, i = rows, widths, [_act_flops(act) for act in activations], dtype.itemsize
    layers = range(len(activations))
    if not any(launch["fn"].__name__ == "_fused_mlp_backward_kernel" for launch in launches):
        l = max(range(len(w) - 2), key=lambda l: w[l + 1])
        n = M * w[l + 1]
        return ({"_mlp_activation_kernel": (a[l] * n, 2 * n * i)}, dict(activations=[activations[l]], shape={"n": n}),
                {"_dense_forward_kernel", "_dense_backward_dx_kernel", "_dense_backward_dw_kernel"})
    (backward,) = [launch for launch in launches if launch["fn"].__name__ == "_fused_mlp_backward_kernel"]
    programs, compute = backward["grid"][0], _arg(backward, "dw_ptrs")[0].dtype  # the dW, db partial sums
    params = sum(w[l] * w[l + 1] + bias * w[l + 1] for l in layers)
    forward_flops = sum(2 * M * w[l] * w[l + 1] + (bias + a[l]) * M * w[l + 1] for l in layers)
    forward_bytes = (M * w[0] + params + sum(M * w[l + 1] for l in layers) + M * w[-1]) * i
    backward_flops = sum((a[l] + 1 + bias) * M * w[l + 1] + 4 * M * w[l] * w[l + 1] + (a[l - 1] * M * w[l] if l else 0)
                         for l in layers)
    backward_bytes = ((M * w[-1] + sum(M * w[l + 1] for l in layers) + sum(w[l] * w[l + 1] for l in layers)
                       + 2 * M * w[0]) * i + programs * params * compute.itemsize)
    costs = {"_fused_mlp_forward_kernel": (forward_flops, forward_bytes),
             "_fused_mlp_backward_kernel": (backward_flops, backward_bytes)}
    return costs, dict(activations=list(activations), shape={"M": M, "widths": list(widths)}), set()


def _cross_entropy_costs(launches, dtype: torch.dtype, weight: bool, label_smoothing: float, z_loss: float,
                         softcap: float | None, grad_lse: bool):
    cost = cross_entropy_cost(**CE_SHAPE, dtype=dtype, weight=weight, smoothing=label_smoothing != 0.0,
                              softcap=softcap is not None, grad_lse=grad_lse)
    return ({"_cross_entropy_forward_kernel": cost["forward"], "_cross_entropy_backward_kernel": cost["backward"]},
            dict(activations=[], shape=dict(CE_SHAPE)), set())


def _cross_entropy_soft_costs(launches, dtype: torch.dtype, weight: bool, label_smoothing: float):
    cost = cross_entropy_soft_cost(**CE_SOFT_SHAPE, dtype=dtype, weight=weight, smoothing=label_smoothing != 0.0)
    return ({"_cross_entropy_soft_forward_kernel": cost["forward"],
             "_cross_entropy_soft_backward_kernel": cost["backward"]},
            dict(activations=[], shape=dict(CE_SOFT_SHAPE)), set())


def triton_launches() -> list[dict]:
    """Every Triton kernel of the project at its benchmark configuration, each named family/kernel[case]: a
    captured launch with its case's costs. A family's cost function gives (FLOPs and bytes by kernel, the entries'
    fields, the kernels a case launches that other cases report); a case launching other kernels is an error. A
    kernel launched more than once in a case is reported at its largest grid."""
    captured = capture_cases()
    families = [("dense", DENSE_CASES, _dense_costs), ("mlp", MLP_CASES, _mlp_costs),
                ("cross_entropy", CE_CASES, _cross_entropy_costs),
                ("cross_entropy", CE_SOFT_CASES, _cross_entropy_soft_costs)]
    reported = []
    for family, cases, cost_of in families:
        for case, cfg in cases.items():
            launches = captured[case]
            costs, info, elsewhere = cost_of(launches, **cfg)
            launched = {launch["fn"].__name__ for launch in launches}
            if launched != set(costs) | elsewhere:
                raise RuntimeError(f"case {case} launches {sorted(launched)}, but bench/gpu_report.py describes "
                                   f"{sorted(set(costs) | elsewhere)}: update its cost formulas")
            for kernel, (flops, nbytes) in costs.items():
                launch = max((l for l in launches if l["fn"].__name__ == kernel), key=lambda l: math.prod(l["grid"]))
                reported.append(dict(launch, name=f"{family}/{kernel}[{case}]", case=case, family=family,
                                     dtype=cfg["dtype"], flops=flops, bytes=nbytes, **info))
    return reported


def compile_launch(launch: dict, arch: str):
    """(compiled kernel, options) of a captured launch for arch, specialized by the JIT's own binder as at a
    launch: it also specializes pointers to 16-byte alignment, integers divisible by 16 and integers equal to 1
    (a constexpr then), and the report must describe the kernel the benchmark actually runs."""
    fn, target = launch["fn"], GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch["args"], **launch["meta"])
    options, signature, constexprs, attrs = fn._pack_args(backend, launch["meta"], bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return kernel, options


def ptxas_usage(ptx: str, arch: str, enable_fp_fusion: bool = True) -> dict:
    """Registers, spill and stack bytes of a kernel's PTX from ptxas -v, run with the flags Triton assembles
    the PTX with (sm_90 as sm_90a, --regAllocOptLevel=2), so that they describe Triton's own binary. (Its
    "bytes smem" is 0: Triton's shared memory is dynamic.)"""
    gpu = arch + ("a" if arch == "sm_90" else "")
    flags = ["-lineinfo", "--regAllocOptLevel=2"] + ([] if enable_fp_fusion else ["--fmad=false"])
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([find_tool("ptxas"), "-v", *flags, f"--gpu-name={gpu}", src,
                              "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    stores, loads = number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads")
    return {"registers": number(r"Used (\d+) registers"), "spill_bytes": stores + loads, "spill_stores": stores,
            "spill_loads": loads, "stack_bytes": number(r"(\d+) bytes stack frame")}


def triton_report(launch: dict, arch: str) -> dict:
    """Compiles one launch for arch and returns its report entry."""
    kernel, options = compile_launch(launch, arch)
    # kernel.n_regs and n_spills are set only once a GPU loads the binary; ptxas gives the same registers.
    ptx = kernel.asm["ptx"]
    usage = ptxas_usage(ptx, arch, options.enable_fp_fusion)
    if launch["dtype"] != torch.float64:
        rate = "fp32"
    else:
        rate = "fp64_tensor" if re.search(r"mma\.sync\.\S*\.f64", ptx) else "fp64_vector"
    return {
        "name": launch["name"], "family": launch["family"], "backend": "triton", "arch": arch, "case": launch["case"],
        "dtype": str(launch["dtype"]).removeprefix("torch."), "activations": launch["activations"],
        "config": {**{k: v for k, v in launch["meta"].items() if k != "num_warps"}, "num_warps": options.num_warps},
        "registers": usage["registers"], "spill_bytes": usage["spill_bytes"], "spill_stores": usage["spill_stores"],
        "spill_loads": usage["spill_loads"], "stack_bytes": usage["stack_bytes"],
        # dynamic shared memory, which ptxas does not see: Triton's own allocation
        "shared_bytes": kernel.metadata.shared,
        "shape": launch["shape"], **roofline(launch["flops"], launch["bytes"], rate),
    }


# ---- CUDA -------------------------------------------------------------------------------------------------

CUDA_DTYPES = {"float": torch.float32, "double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16}


def extension_path() -> str:
    (so,) = glob.glob(os.path.join(os.path.dirname(fusedlayers.__file__), "_C*.so"))
    return so


def parse_res_usage(report: str) -> list[dict]:
    """Every function of a `cuobjdump -res-usage` report: its arch, source file, mangled name and usage."""
    functions, arch, source = [], None, None
    lines = report.splitlines()
    for line, following in zip(lines, lines[1:] + [""]):
        if m := re.match(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"identifier = (\S+)", line):
            source = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            usage = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", following)}
            functions.append({"arch": arch, "source": source, "mangled": m.group(1), "usage": usage})
    return functions


def demangle(names: list[str]) -> list[str]:
    """The names demangled by c++filt in one call, or as they are without it."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def readable(demangled: str) -> tuple[str, str | None, str | None]:
    """(kernel<Activation, dtype>, activation, dtype) or (kernel<dtype>, None, dtype) of a demangled kernel without
    namespaces, return type and parameters; the name unchanged, with no activation or dtype, if it is not such a
    template."""
    m = re.search(r"(\w+)<(.*?)>\(", demangled)
    if not m:
        return demangled, None, None
    template_args = [re.sub(r"\w+::|\(anonymous namespace\)::", "", arg).strip() for arg in m.group(2).split(",")]
    activation, dtype = [None] + template_args if len(template_args) == 1 else (template_args + [None, None])[:2]
    return f"{m.group(1)}<{', '.join(template_args)}>", activation, dtype


def cuda_reports(so: str) -> list[dict]:
    """Report entries of every CUDA kernel in the extension so (none when it was built without them)."""
    run = subprocess.run([find_tool("cuobjdump"), "-res-usage", so], capture_output=True, text=True)
    if run.returncode != 0 and "does not contain device code" not in run.stderr:
        raise RuntimeError(f"cuobjdump -res-usage {so} failed: {run.stderr.strip()}")
    functions = parse_res_usage(run.stdout)
    entries = []
    for function, demangled in zip(functions, demangle([f["mangled"] for f in functions])):
        name, activation, dtype_name = readable(demangled)
        family = os.path.splitext(os.path.basename(function["source"] or "cuda"))[0]
        dtype = CUDA_DTYPES.get(dtype_name)
        usage = function["usage"]
        entry = {
            "name": f"{family}/{name}", "family": family, "backend": "cuda", "arch": function["arch"],
            "mangled": function["mangled"], "dtype": dtype_name, "activations": [activation],
            "registers": usage.get("REG"),
            # cuobjdump does not report spills; STACK > 0 means spills, except in sin/cos, whose CUDA math keeps
            # a small array on the stack for the reduction of huge arguments.
            "spill_bytes": None, "stack_bytes": usage.get("STACK"), "shared_bytes": usage.get("SHARED"),
            "local_bytes": usage.get("LOCAL"),
        }
        # half and bfloat16 compute in float32 (at::opmath_type); float64 has no mma here
        rate = "fp64_vector" if dtype == torch.float64 else "fp32"
        if dtype is not None and name.startswith(("forward_act_kernel", "backward_act_kernel", "derivative_kernel")):
            # derivative_kernel (f, f' or f'' of z for higher-order gradients) moves and computes as the forward
            n, i, forward = CUDA_REFERENCE_ELEMENTS, dtype.itemsize, not name.startswith("backward")
            flops = (ACT_FLOPS + (0 if forward else 1)) * n
            entry.update(shape={"n": n}, **roofline(flops, (2 if forward else 3) * n * i, rate))
        elif dtype is not None and name.startswith(("cross_entropy_forward_kernel", "cross_entropy_backward_kernel")):
            cost = cross_entropy_cost(**CE_SHAPE, dtype=dtype, weight=False, smoothing=False, softcap=False,
                                      grad_lse=False)
            flops, nbytes = cost["forward" if "forward" in name else "backward"]
            entry.update(shape=dict(CE_SHAPE), **roofline(flops, nbytes, rate))
        elif dtype is not None and name.startswith("cross_entropy_soft_"):
            cost = cross_entropy_soft_cost(**CE_SOFT_SHAPE, dtype=dtype, weight=False, smoothing=False)
            flops, nbytes = cost["forward" if "forward" in name else "backward"]
            entry.update(shape=dict(CE_SOFT_SHAPE), **roofline(flops, nbytes, rate))
        entries.append(entry)
    return entries


# ---- report -----------------------------------------------------------------------------------------------

def print_table(kernels: list[dict]) -> None:
    def show(value, fmt="{}"):
        return "-" if value is None else fmt.format(value)

    width = max([len(k["name"]) for k in kernels] + [6])
    header = f"{'kernel':<{width}}  {'backend':<7} {'arch':<5} {'regs':>4} {'spills':>6} {'stack':>5} " \
             f"{'smem':>6} {'GFLOP':>9} {'MB':>9} {'roofline us':>11}  bound"
    print(header)
    print("-" * len(header))
    for k in kernels:
        gflop = None if k.get("flops") is None else k["flops"] / 1e9
        mb = None if k.get("bytes") is None else k["bytes"] / 1e6
        print(f"{k['name']:<{width}}  {k['backend']:<7} {k['arch']:<5} {show(k['registers']):>4} "
              f"{show(k['spill_bytes']):>6} {show(k['stack_bytes']):>5} {show(k['shared_bytes']):>6} "
              f"{show(gflop, '{:.4g}'):>9} {show(mb, '{:.4g}'):>9} {show(k.get('roofline_us'), '{:.3g}'):>11}  "
              f"{k.get('bound', '-')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "TRITON_INTERPRET" in os.environ:
        # The interpreter must be off before fusedlayers' kernels are imported: rerun in a process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "bench.gpu_report", *argv], env=env).returncode

    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description="Registers, spills, shared "
                                     "memory and roofline time of every fusedlayers kernel on sm_80/sm_90, "
                                     "without a GPU.")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"output file (default: {DEFAULT_JSON})")
    parser.add_argument("--only", action="append", help="only kernels whose name contains this (repeatable)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="only this arch (repeatable)")
    parser.add_argument("--so", help="the extension whose CUDA kernels to read (default: fusedlayers' own)")
    args = parser.parse_args(argv)
    archs = args.arch or sorted(ARCHS)
    wanted = lambda name: not args.only or any(part in name for part in args.only)  # noqa: E731

    start = time.perf_counter()
    kernels = [triton_report(launch, arch) for launch in triton_launches() if wanted(launch["name"])
               for arch in archs]
    so = args.so or extension_path()
    # by name, so that a kernel's two archs are adjacent, as the Triton rows
    cuda = sorted((k for k in cuda_reports(so) if wanted(k["name"]) and k["arch"] in archs),
                  key=lambda k: (k["name"], k["arch"]))
    kernels += cuda
    notes = []
    if cuda:
        notes.append("spill_bytes of CUDA kernels is null: cuobjdump does not report spills. STACK > 0 indicates "
                     "spills, except in the Sin/Cos kernels, whose CUDA math keeps a small array on the stack.")
    elif not args.only:
        notes.append(f"{so} holds no CUDA kernels (built without nvcc or with FUSEDLAYERS_CUDA=0; "
                     f"HAS_NATIVE_CUDA={HAS_NATIVE_CUDA})")
    report = {"kernels": kernels, "assumptions": ASSUMPTIONS, "formulas": FORMULAS, "extension": so,
              "triton": triton.__version__, "notes": notes}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)

    print_table(kernels)
    for note in notes:
        print(f"note: {note}")
    print(f"{len(kernels)} kernel entries in {time.perf_counter() - start:.0f} s; written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
