"""Neural ODEs: ODEField, a FusedMLP as an ODE's vector field, and odeint / odeint_adjoint, torchdiffeq's functions
(signatures, defaults, options, return shape) that solve an ODEField on the CPU as one fused op
(fusedlayers/ops/odeint.py) and hand anything else to torchdiffeq unchanged."""
import importlib

import torch
from torch import Tensor, nn

from .modules import FusedMLP
from .ops import odeint as ops

# torchdiffeq's adaptive methods: with them the knots of a piecewise-linear control are jump times.
_TORCHDIFFEQ_ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")


class ODEField(nn.Module):
    """dy/dt = net(cat([y, t if time_input, c(t) if control], -1)), with net a FusedMLP.

    control is a per-trajectory constant (B, k), or with control_times (K,) knots (B, K, k) interpolated
    linearly in t (constant beyond the end knots). The field keeps the very control tensor passed, as a buffer,
    so gradients reach it (torch.autograd.grad(..., control); odeint_adjoint(..., adjoint_params=(..., control))).
    forward(t, y) makes it a torchdiffeq field too; fusedlayers.odeint solves it in one fused op."""

    def __init__(self, net: FusedMLP, control: Tensor | None = None, control_times: Tensor | None = None,
                 time_input: bool = False) -> None:
        super().__init__()
        if not isinstance(net, FusedMLP):
            raise TypeError(f"ODEField(): net must be a fusedlayers.FusedMLP, got {type(net).__name__}")
        if control is None and control_times is not None:
            raise ValueError("ODEField(): control_times needs control, the knots (B, K, k)")
        if control is not None:
            want = 3 if control_times is not None else 2
            if control.dim() != want:
                shape = "knots (B, K, k) with control_times" if want == 3 else "(B, k) without control_times"
                raise ValueError(f"ODEField(): expected control of shape {shape}, got {tuple(control.shape)}")
        if control_times is not None:
            if control_times.dim() != 1 or control_times.shape[0] != control.shape[1] or control.shape[1] < 1:
                raise ValueError(f"ODEField(): expected control_times of shape ({control.shape[1]},) (one per knot "
                                 f"of control {tuple(control.shape)}), got {tuple(control_times.shape)}")
            if control_times.shape[0] > 1 and not bool((control_times[1:] > control_times[:-1]).all()):
                raise ValueError("ODEField(): control_times must be strictly increasing")
        self.net, self.time_input = net, bool(time_input)
        self.register_buffer("control", control)
        self.register_buffer("control_times", control_times)
        self.last_solve: dict = {}  # the fused solve's counts: nfe_forward, steps, nfe_backward

    @property
    def extra(self) -> int:
        """The inputs of net beyond the state: 1 for the time, k for the control."""
        return int(self.time_input) + (0 if self.control is None else self.control.shape[-1])

    def control_at(self, t: Tensor) -> Tensor | None:
        c, times = self.control, self.control_times
        if c is None or times is None:
            return c
        times = times.to(c.dtype)
        if times.shape[0] == 1:
            return c[:, 0]
        t = t.to(c.dtype).reshape(1)
        j = (torch.searchsorted(times, t, right=True) - 1).clamp(0, times.shape[0] - 2)
        lo, hi = c.index_select(1, j).squeeze(1), c.index_select(1, j + 1).squeeze(1)
        w = ((t - times[j]) / (times[j + 1] - times[j])).clamp(0, 1)
        return lo + w * (hi - lo)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        parts = [y]
        if self.time_input:
            parts.append(t.reshape(1).expand(*y.shape[:-1], 1))
        if self.control is not None:
            parts.append(self.control_at(t))
        return self.net(torch.cat(parts, dim=-1) if len(parts) > 1 else y)


def _torchdiffeq():
    try:
        return importlib.import_module("torchdiffeq")
    except ImportError as e:
        raise ImportError("odeint(): this solve runs in torchdiffeq (pip install torchdiffeq), which is not "
                          "installed") from e


def _torchdiffeq_methods():
    _torchdiffeq()
    return importlib.import_module("torchdiffeq._impl.odeint").SOLVERS


def fused_solve_refusal(func, y0, t, options, event_fn) -> str | None:
    """Why torchdiffeq, not the fused solve, runs this problem; None when the fused solve does."""
    if not isinstance(func, ODEField):
        return "func is not a fusedlayers.ODEField"
    if event_fn is not None:
        return "event_fn is given"
    if not isinstance(y0, Tensor) or y0.device.type != "cpu" or y0.dtype not in (torch.float32, torch.float64):
        return "the fused solve runs float32 and float64 CPU tensors"
    net = func.net
    if net.backend not in ("auto", "cpu"):
        return f"the net asks for backend {net.backend!r}"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is enabled"
    hooked = [m for m in (func, net) if m._forward_hooks or m._forward_pre_hooks or
              getattr(m, "parametrizations", None)]
    if hooked or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "forward hooks or parametrizations must run"
    for key in ("norm", "grid_constructor"):
        if callable((options or {}).get(key)):
            return f"options[{key!r}] is a callable"
    if not torch.compiler.is_compiling() and any(
            torch._C._functorch.is_functorch_wrapped_tensor(x) for x in (y0, t, *net.parameters())):
        return "a torch.func transform is active"
    return None


def _check(func: ODEField, y0: Tensor, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] < 1 or not t.is_floating_point():
        raise ValueError("odeint(): expected t to be a 1-D floating-point tensor of length >= 1, got "
                         f"{t.shape if isinstance(t, Tensor) else type(t).__name__}")
    compiling = torch.compiler.is_compiling()  # the value checks below would read data while tracing
    if t.shape[0] > 1 and not compiling:
        d = t[1:] - t[:-1]
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("odeint(): t must be strictly increasing or decreasing")
    if t.requires_grad:
        raise ValueError("odeint(): the fused solve differentiates w.r.t. y0, the net's parameters and the "
                         "control, not t (t requires grad); solve with torchdiffeq for gradients w.r.t. t")
    net, c = func.net, func.control
    if not isinstance(y0, Tensor) or y0.dim() not in (1, 2) or (y0.dim() == 1 and c is not None):
        raise ValueError("odeint(): expected y0 of shape (B, d), or (d,) for a field without control, got "
                         f"{tuple(y0.shape) if isinstance(y0, Tensor) else type(y0).__name__}")
    if y0.shape[-1] != net.sizes[0] - func.extra:
        raise ValueError(f"odeint(): expected y0 of width {net.sizes[0] - func.extra} (the net's {net.sizes[0]} "
                         f"inputs minus {func.extra} for time and control), got {tuple(y0.shape)}")
    if net.sizes[-1] != y0.shape[-1]:
        raise ValueError(f"odeint(): the net's {net.sizes[-1]} outputs must match the state's width "
                         f"{y0.shape[-1]}")
    tensors = {"t": t, "control": c, "control_times": func.control_times, "the net's parameters":
               next(net.parameters(), None)}
    for name, x in tensors.items():
        if x is not None and x.device != y0.device:
            raise ValueError(f"odeint(): expected {name} on y0's device ({y0.device}), got {x.device}")
    for name in ("control", "the net's parameters"):
        x = tensors[name]
        if x is not None and x.dtype != y0.dtype:
            raise ValueError(f"odeint(): expected {name} of y0's dtype ({y0.dtype}), got {x.dtype}")
    if c is not None and c.shape[0] != y0.shape[0]:
        raise ValueError(f"odeint(): control has {c.shape[0]} trajectories, y0 {y0.shape[0]}")
    times = func.control_times
    if times is not None and not compiling and (bool(times[0] > t.min()) or bool(times[-1] < t.max())):
        raise ValueError(f"odeint(): control_times [{times[0].item()}, {times[-1].item()}] must cover t "
                         f"[{t.min().item()}, {t.max().item()}]")


def _with_knots(func, method: str, options: dict | None) -> dict | None:
    """options with the control's knots added to jump_t, for adaptive methods (the field's derivative jumps)."""
    if not isinstance(func, ODEField) or func.control_times is None or method not in \
            (*_TORCHDIFFEQ_ADAPTIVE, "tsit5"):
        return options
    options = dict(options or {})
    knots = func.control_times.detach().to(torch.float64)
    if options.get("jump_t") is not None:
        knots = torch.cat([torch.as_tensor(options["jump_t"], dtype=torch.float64).reshape(-1), knots])
    options["jump_t"] = knots.unique()
    return options


def _net_params(net: FusedMLP, keep=lambda p: True) -> tuple[Tensor, list[tuple[int, int]]]:
    """The net's parameters in the flat layout (flat_params itself, or the layers joined) and, for each tensor
    keep() selects, its (offset, length) there; the others are detached."""
    if net.flat:
        p = net.flat_params
        return (p, [(0, p.numel())]) if keep(p) else (p.detach(), [])
    parts, spans, offset = [], [], 0
    for w, b in zip(net.weights(), net.biases() or [None] * net.num_layers):
        for x in (w, b):
            if x is None:
                continue
            parts.append(x.reshape(-1) if keep(x) else x.detach().reshape(-1))
            if keep(x):
                spans.append((offset, x.numel()))
            offset += x.numel()
    return torch.cat(parts), spans


def _field(func: ODEField) -> tuple:
    return (func.net.sizes, func.net._has_bias, func.net.activations, func.time_input)


def _control_times(func: ODEField) -> Tensor | None:
    times = func.control_times
    return None if times is None else times.to(func.control.dtype)


def _stats_to(func: ODEField):
    if torch.compiler.is_compiling():
        return lambda **kw: None

    def record(forward=None, backward=None):
        if forward is not None:
            func.last_solve = {"nfe_forward": int(forward[0]), "steps": int(forward[1])}
        if backward is not None:
            func.last_solve["nfe_backward"] = int(backward[1] if backward.numel() == 3 else backward[0])
    return record


def _method(method: str | None) -> str:
    method = "dopri5" if method is None else method
    if method not in ops.METHODS and method not in _torchdiffeq_methods():
        raise ValueError(f'odeint(): invalid method "{method}"; the fused solve has {list(ops.METHODS)}, '
                         f"torchdiffeq {sorted(_torchdiffeq_methods())}")
    return method


def _refused(method: str, why: str) -> None:
    if method == "tsit5":
        raise ValueError(f"odeint(): method 'tsit5' runs only in the fused solve (torchdiffeq has none), and here "
                         f"torchdiffeq would run: {why}")


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """torchdiffeq.odeint; an ODEField on the CPU is solved in one fused op, differentiated by backpropagation
    through the accepted steps (w.r.t. y0, the net's parameters and the control)."""
    method = _method(method)
    if isinstance(func, ODEField):
        _check(func, y0, t)
    why = fused_solve_refusal(func, y0, t, options, event_fn)
    if why is not None or method not in ops.METHODS:
        _refused(method, why)
        kw = {} if event_fn is None else {"event_fn": event_fn}
        return _torchdiffeq().odeint(func, y0, t, rtol=rtol, atol=atol, method=method,
                                     options=_with_knots(func, method, options), **kw)
    params, _ = _net_params(func.net)
    solve, step_t, jump_t = ops.solve_args(method, rtol, atol, dict(options or {}))
    return ops.Backprop.apply(_stats_to(func), _field(func), solve, y0, params, func.control, _control_times(func),
                              t, step_t, jump_t)


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """torchdiffeq.odeint_adjoint; an ODEField on the CPU is solved, and its adjoint system solved backwards, in
    fused ops, with torchdiffeq's defaults for the adjoint's tolerances, method and options (and its norm:
    adjoint_options=dict(norm="seminorm") leaves the parameters' adjoint out of the error)."""
    method = _method(method)
    adjoint_method = method if adjoint_method is None else _method(adjoint_method)
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError("If `adjoint_method != method` then we cannot infer `adjoint_options` from `options`. So "
                         "as `options` has been passed then `adjoint_options` must be passed as well.")
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    kw = dict(rtol=rtol, atol=atol, method=method, adjoint_method=adjoint_method,
              adjoint_rtol=rtol if adjoint_rtol is None else adjoint_rtol,
              adjoint_atol=atol if adjoint_atol is None else adjoint_atol)
    if isinstance(func, ODEField):
        _check(func, y0, t)
    params_given = adjoint_params
    adjoint_params = tuple(func.parameters() if adjoint_params is None else adjoint_params)
    adjoint_params = tuple(p for p in adjoint_params if p.requires_grad)
    why = fused_solve_refusal(func, y0, t, options, event_fn)
    if why is None and callable(adjoint_options.get("norm")):
        why = "adjoint_options['norm'] is a callable"
    net_params = [] if why is not None else list(func.net.parameters())
    if why is None and any(not any(a is p for p in (*net_params, func.control)) for a in adjoint_params):
        why = "adjoint_params holds tensors other than the net's parameters and the control"
    if why is not None or method not in ops.METHODS or adjoint_method not in ops.METHODS:
        _refused(method, why)
        _refused(adjoint_method, why)
        extra = {} if event_fn is None else {"event_fn": event_fn}
        return _torchdiffeq().odeint_adjoint(func, y0, t, options=_with_knots(func, method, options),
                                             adjoint_options=_with_knots(func, adjoint_method, adjoint_options),
                                             adjoint_params=params_given, **kw, **extra)
    chosen = lambda x: any(x is a for a in adjoint_params)  # noqa: E731
    params, spans = _net_params(func.net, chosen)
    control = func.control
    control_grad = control is not None and chosen(control)
    if control is not None and not control_grad:
        control = control.detach()
    solve, step_t, jump_t = ops.solve_args(method, rtol, atol, dict(options or {}))
    seminorm = adjoint_options.get("norm") == "seminorm"
    adjoint_solve, adjoint_step_t, adjoint_jump_t = ops.solve_args(
        adjoint_method, kw["adjoint_rtol"], kw["adjoint_atol"], dict(adjoint_options), "adjoint_options")
    adjoint = (adjoint_solve, [v for span in spans for v in span], control_grad, seminorm)
    return ops.Adjoint.apply(_stats_to(func), _field(func), solve, adjoint, y0, params, control,
                             _control_times(func), t, step_t, jump_t, adjoint_step_t, adjoint_jump_t)
