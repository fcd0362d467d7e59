"""The odeint family's ops (schemas in csrc/ops/odeint.cpp, CPU kernels in csrc/cpu/odeint.cpp): torchdiffeq's
options turned into the ops' arguments, the fakes, and the two autograd routes, backpropagation through the
accepted steps (odeint) and the continuous adjoint (odeint_adjoint), as autograd.Functions around the ops."""
import math

import torch
from torch import Tensor

_ops = torch.ops.fusedlayers

ADAPTIVE = ("dopri5", "bosh3", "tsit5")
FIXED = ("euler", "midpoint", "rk4")
METHODS = ADAPTIVE + FIXED
# torchdiffeq's options and defaults, per kind of method; "norm" is torchdiffeq's too, taken only as the
# adjoint's "seminorm" (a callable norm runs in torchdiffeq: fusedlayers.ode.fused_solve_refusal).
_ADAPTIVE_OPTIONS = {"first_step": None, "step_t": None, "jump_t": None, "safety": 0.9, "ifactor": 10.0,
                     "dfactor": 0.2, "min_step": 0.0, "max_step": math.inf, "max_num_steps": 2 ** 31 - 1}
_FIXED_OPTIONS = {"step_size": None, "perturb": False, "interp": "linear"}


def solve_args(method: str, rtol: float, atol: float, options: dict, name: str = "options"
               ) -> tuple[tuple, Tensor | None, Tensor | None]:
    """The ops' solver arguments (ODE_SOLVE_SCHEMA of csrc/ops/odeint.h) from torchdiffeq's method and options:
    (the scalars, step_t, jump_t); ValueError for an option the method does not take."""
    known = _ADAPTIVE_OPTIONS if method in ADAPTIVE else _FIXED_OPTIONS
    for key in options:
        if key not in known and key != "norm":
            raise ValueError(f"odeint(): unknown {name} key {key!r} for method {method!r}; it takes "
                             f"{sorted(known)}")
    o = {**_ADAPTIVE_OPTIONS, **_FIXED_OPTIONS, **{k: v for k, v in options.items() if k != "norm"}}
    if o["interp"] != "linear":
        raise ValueError(f"odeint(): the fused solve interpolates linearly between grid points; {name}"
                         f"['interp'] = {o['interp']!r} is not supported")
    for key in ("step_size", "first_step"):  # torchdiffeq's error would be "underflow in dt"
        if o[key] is not None and not o[key] > 0:
            raise ValueError(f"odeint(): {name}[{key!r}] must be positive, got {o[key]}")
    step_t, jump_t = (None if o[k] is None else torch.as_tensor(o[k], dtype=torch.float64).reshape(-1)
                      for k in ("step_t", "jump_t"))
    scalars = (method, float(rtol), float(atol), _opt_float(o["first_step"]), _opt_float(o["step_size"]),
               float(o["safety"]), float(o["ifactor"]), float(o["dfactor"]), float(o["min_step"]),
               float(o["max_step"]), int(o["max_num_steps"]), bool(o["perturb"]))
    return scalars, step_t, jump_t


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def op_args(field: tuple, tensors: tuple, solve: tuple, step_t, jump_t) -> tuple:
    """The arguments of the three ops after their leading ones: ODE_PROBLEM_SCHEMA then ODE_SOLVE_SCHEMA, from
    field = (sizes, bias, activations, time_input), tensors = (y0, params, control, control_times, t) and
    solve_args()'s three parts."""
    (method, rtol, atol, first_step, step_size, *rest) = solve
    return (*tensors, *field, method, rtol, atol, first_step, step_size, step_t, jump_t, *rest)


@torch.library.register_fake("fusedlayers::odeint")
def _odeint_fake(y0, params, control, control_times, t, *args):
    return y0.new_empty((t.shape[0], *y0.shape)), torch.empty(2, dtype=torch.long, device="cpu")


def _grads_fake(y0, params, control, stats):
    dcontrol = control.new_empty(control.shape) if control is not None else y0.new_empty(0)
    return y0.new_empty(y0.shape), params.new_empty(params.shape), dcontrol, torch.empty(stats, dtype=torch.long)


@torch.library.register_fake("fusedlayers::odeint_backward")
def _odeint_backward_fake(grad, y0, params, control, *args):
    return _grads_fake(y0, params, control, 3)


@torch.library.register_fake("fusedlayers::odeint_adjoint_backward")
def _odeint_adjoint_backward_fake(grad, ys, y0, params, control, *args):
    return _grads_fake(y0, params, control, 1)


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("odeint(): the fused solve's gradient is not differentiable again (create_graph=True); "
                           "solve with torchdiffeq and the same ODEField for higher-order gradients")


class Backprop(torch.autograd.Function):
    """The solve, differentiated by backpropagation through its accepted steps."""

    @staticmethod
    def forward(ctx, stats_to, field, solve, y0, params, control, control_times, t, step_t, jump_t):
        tensors = (y0, params, control, control_times, t)
        ys, stats = _ops.odeint(*op_args(field, tensors, solve, step_t, jump_t))
        ctx.save_for_backward(*tensors, step_t, jump_t)
        ctx.field, ctx.solve, ctx.stats_to = field, solve, stats_to
        stats_to(forward=stats)
        return ys

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward()
        *tensors, step_t, jump_t = ctx.saved_tensors
        dy0, dparams, dcontrol, stats = _ops.odeint_backward(
            grad.contiguous(), *op_args(ctx.field, tensors, ctx.solve, step_t, jump_t))
        ctx.stats_to(backward=stats)
        return None, None, None, dy0, dparams, dcontrol if tensors[2] is not None else None, None, None, None, None


class Adjoint(torch.autograd.Function):
    """The solve, differentiated by the continuous adjoint (torchdiffeq's OdeintAdjointMethod). adjoint =
    (the adjoint's solve_args() scalars, param_norm, control_grad, seminorm)."""

    @staticmethod
    def forward(ctx, stats_to, field, solve, adjoint, y0, params, control, control_times, t, step_t, jump_t,
                adjoint_step_t, adjoint_jump_t):
        tensors = (y0, params, control, control_times, t)
        ys, stats = _ops.odeint(*op_args(field, tensors, solve, step_t, jump_t))
        ctx.save_for_backward(ys, *tensors, adjoint_step_t, adjoint_jump_t)
        ctx.field, ctx.adjoint, ctx.stats_to = field, adjoint, stats_to
        stats_to(forward=stats)
        return ys

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward()
        ys, *tensors, step_t, jump_t = ctx.saved_tensors
        solve, param_norm, control_grad, seminorm = ctx.adjoint
        dy0, dparams, dcontrol, stats = _ops.odeint_adjoint_backward(
            grad.contiguous(), ys, *op_args(ctx.field, tensors, solve, step_t, jump_t), param_norm, control_grad,
            seminorm)
        ctx.stats_to(backward=stats)
        return (None, None, None, None, dy0, dparams, dcontrol if control_grad else None, *[None] * 6)
