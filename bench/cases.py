"""The benchmark cases: each builds its implementations (what a user writes in plain PyTorch, its
torch.compile, and fusedlayers on every backend that runs at speed here) on the same inputs and parameters."""
import copy
import functools
import torch
import torch.nn.functional as F
from torch import nn

import fusedlayers
from fusedlayers.activations import REFERENCE

from . import floors, jax_impls, neural_ode
from .harness import Case, Impl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused_backends() -> list[str]:
    """Backends that run at speed on DEVICE: the Triton interpreter is for tests, not for timing."""
    speed = {"cpu": ["cpu"], "cuda": ["cuda", "triton"]}[DEVICE]
    return [b for b in fusedlayers.available_backends() if b in speed]


def sequential(sizes, activation, output_activation="identity", bias=True, dtype=torch.float32) -> nn.Sequential:
    """The nn.Sequential a user writes: Linear layers, each but the last followed by `activation`."""
    mods = []
    for i, (m, n) in enumerate(zip(sizes, sizes[1:])):
        mods.append(nn.Linear(m, n, bias=bias, device=DEVICE, dtype=dtype))
        act = activation if i < len(sizes) - 2 else output_activation
        if act != "identity":
            mods.append(REFERENCE[act].make_module())
    return nn.Sequential(*mods)


def model_impl(name, model, x, grad_out=None, loss=None, wrt_input=True) -> Impl:
    """Times model(x) (the primal, no graph) and the gradients of <model(x), grad_out>, or of loss(model(x)),
    w.r.t. every parameter, and x too when wrt_input."""
    wrt = ([x] if wrt_input else []) + list(model.parameters())

    def forward():
        with torch.no_grad():
            y = model(x)
            return y if loss is None else loss(y)

    def forward_backward():
        y = model(x)
        return torch.autograd.grad(y if loss is None else loss(y), wrt, grad_out)

    return Impl(name, forward, forward_backward)


def model_impls(eager, fused_for_backend, x, fused_loss=None, **kw) -> list[Impl]:
    """eager, compile (torch.compile of eager) and fused-<backend> for each backend, all with the same parameter
    values: fused_for_backend(backend) builds a fused model from eager (FusedDense shares its Parameters, FusedMLP
    copies them into its flat one); fused_loss(backend),
    if given, is the fused implementations' loss in place of kw["loss"]."""
    impls = [model_impl("eager", eager, x, **kw), model_impl("compile", torch.compile(eager), x, **kw)]
    for b in fused_backends():
        fkw = dict(kw, loss=fused_loss(b)) if fused_loss else kw
        impls.append(model_impl(f"fused-{b}", fused_for_backend(b), x, **fkw))
    return impls


def _dense_case(name, description, batch, n_in, n_out, activation, dtype, reps, floor=False) -> Case:
    """floor: add the gemm-floor (the three bare GEMMs x @ W.T, g.T @ x, g @ W)."""
    def make():
        torch.manual_seed(0)
        eager = sequential([n_in, n_out], None, activation, dtype=dtype)
        linear = eager[0]
        x = torch.randn(*batch, n_in, device=DEVICE, dtype=dtype, requires_grad=True)
        g = torch.randn(*batch, n_out, device=DEVICE, dtype=dtype)
        impls = model_impls(eager, lambda b: fusedlayers.FusedDense.from_linear(linear, activation, backend=b), x,
                            grad_out=g)
        if floor:
            impls.append(floors.gemm_floor([n_in, n_out], batch, dtype, True, DEVICE))
        return impls

    return Case(name, description, DEVICE, dtype, make, reps)


def _graph_free_impl(net, x, grad_out, name) -> Impl:
    """FusedMLP.grad_and_value: the value and the gradients w.r.t. x (when it requires grad) and the parameters
    in one call without an autograd graph."""
    def forward():
        with torch.no_grad():
            return net(x)

    return Impl(name, forward, lambda: net.grad_and_value(x, grad_out, input_grad=x.requires_grad))


def _mlp_case(name, description, sizes, activation, output_activation, batch, dtype, reps, bias=True,
              loss=None, target=None, wrt_input=True, fused_loss=None, floor=None, graph_free=False) -> Case:
    """floor: None, "gemm" (floors.gemm_floor) or "call" (floors.call_floor_net and floors.builtin_floor_net; for a
    case without a loss).
    graph_free: add fused-<backend>-graph-free (FusedMLP.grad_and_value; for a case without a loss), and jax-jit
    when JAX is installed (bench/jax_impls.py)."""
    if floor == "call" and loss is not None:
        raise ValueError(f"{name}: a call-floor times the network alone, for a case without a loss")

    def make():
        torch.manual_seed(0)
        eager = sequential(sizes, activation, output_activation, bias=bias, dtype=dtype)
        x = torch.randn(*batch, sizes[0], device=DEVICE, dtype=dtype, requires_grad=wrt_input)
        kw = {"wrt_input": wrt_input}
        if loss is None:
            kw["grad_out"] = torch.randn(*batch, sizes[-1], device=DEVICE, dtype=dtype)
        else:
            y = target(batch, sizes[-1]) if target else None
            kw["loss"] = lambda out: loss(out, y)
            if fused_loss:
                kw["fused_loss"] = lambda b: lambda out: fused_loss(out, y, backend=b)
        impls = model_impls(eager, lambda b: fusedlayers.FusedMLP.from_sequential(eager, backend=b), x, **kw)
        if graph_free:
            impls += [_graph_free_impl(fusedlayers.FusedMLP.from_sequential(eager, backend=b), x, kw["grad_out"],
                                       f"fused-{b}-graph-free") for b in fused_backends()]
            impls += [i for i in [jax_impls.mlp_impl(eager, x, kw["grad_out"])] if i is not None]
        if floor == "gemm":
            impls.append(floors.gemm_floor(sizes, batch, dtype, wrt_input, DEVICE))
        elif floor == "call":
            net = floors.call_floor_net(sizes, activation, output_activation, bias, dtype, DEVICE)
            impls.append(model_impl("call-floor", net, x, **kw))
            impls.append(model_impl("builtin-floor", floors.builtin_floor_net(sizes, dtype, DEVICE), x, **kw))
        return impls

    return Case(name, description, DEVICE, dtype, make, reps)


def _training_case(name, description, sizes, activation, batch, dtype, reps, bias=True, adam=False) -> Case:
    """The gradient as a user's training loop takes it: forward_backward is zero_grad(), the loss (mean squared
    error to a fixed target) and loss.backward(), and with adam also torch.optim.Adam's step (foreach, as by
    default); forward is the network's value without a graph. eager is the nn.Sequential; fused-<backend> the
    FusedMLP (one flat Parameter), fused-<backend>-layers the FusedMLP with per-layer Parameters (flat=False),
    fused-<backend>-graph-free the flat FusedMLP's grad_and_value(x, target=..., accumulate_grad=True) in place
    of the loss and backward, call-floor the flat FusedMLP with hidden widths 1, builtin-floor one nn.Linear
    (floors.builtin_floor_net), each with its own optimizer, same hyperparameters. With adam, eager and
    graph-free also with Adam(fused=True) (-fused-adam)."""
    def make():
        torch.manual_seed(0)
        eager = sequential(sizes, activation, bias=bias, dtype=dtype)
        x = torch.randn(*batch, sizes[0], device=DEVICE, dtype=dtype)
        target = torch.randn(*batch, sizes[-1], device=DEVICE, dtype=dtype)
        flat = lambda b: fusedlayers.FusedMLP.from_sequential(eager, backend=b)  # noqa: E731
        # name -> (network, graph-free, Adam's implementation flag)
        runs = {"eager": (eager, False, "foreach"), "compile": (torch.compile(eager), False, "foreach")}
        for b in fused_backends():
            runs[f"fused-{b}"] = (flat(b), False, "foreach")
            runs[f"fused-{b}-layers"] = (fusedlayers.FusedMLP.from_sequential(copy.deepcopy(eager), backend=b,
                                                                            flat=False), False, "foreach")
            runs[f"fused-{b}-graph-free"] = (flat(b), True, "foreach")
            if adam:
                runs[f"fused-{b}-graph-free-fused-adam"] = (flat(b), True, "fused")
        if adam:
            runs["eager-fused-adam"] = (copy.deepcopy(eager), False, "fused")
        runs["call-floor"] = (floors.call_floor_net(sizes, activation, "identity", bias, dtype, DEVICE), False,
                              "foreach")
        runs["builtin-floor"] = (floors.builtin_floor_net(sizes, dtype, DEVICE), False, "foreach")
        impls = []
        for impl_name, (net, graph_free, flag) in runs.items():
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-5, **{flag: True}) if adam else None

            def forward(net=net):
                with torch.no_grad():
                    return net(x)

            def forward_backward(net=net, optimizer=optimizer, graph_free=graph_free):
                (optimizer or net).zero_grad()  # set_to_none, by default
                if graph_free:
                    loss = net.grad_and_value(x, target=target, accumulate_grad=True)[1]
                else:
                    loss = F.mse_loss(net(x), target)
                    loss.backward()
                if optimizer is not None:
                    optimizer.step()
                return loss

            impls.append(Impl(impl_name, forward, forward_backward))
        return impls

    kind = "zero_grad + MSE loss + backward + Adam step" if adam else "zero_grad + MSE loss + loss.backward()"
    return Case(name, f"{description}: {kind}", DEVICE, dtype, make, reps)


def _tanh_taylor2(seq: nn.Sequential, x):
    """(u, du/dx, d2u/dx2) of an nn.Sequential of Linear and Tanh layers by second-order Taylor mode in plain
    PyTorch ops: mlp_jet's algorithm without its fusion, to tell what each buys."""
    h, dh, d2h = x, torch.ones_like(x), torch.zeros_like(x)
    for m in seq:
        if isinstance(m, nn.Linear):
            h, dh, d2h = m(h), dh @ m.weight.T, d2h @ m.weight.T
        else:
            t = torch.tanh(h)
            d1 = 1 - t * t
            h, dh, d2h = t, d1 * dh, -2 * t * d1 * dh * dh + d1 * d2h
    return h, dh, d2h


def _pinn_case() -> Case:
    """A physics-informed training step: the parameter gradient of mean (u'' + u)^2, u'' w.r.t. the input.
    eager is what a user writes: u'' by two create_graph gradients, then a third pass through their graphs
    (third derivatives of tanh); aot_autograd cannot compile that double backward. eager-taylor and its
    torch.compile carry (u, u', u'') forward in plain PyTorch ops instead; fused-<backend> is FusedMLP.jet
    (mlp_jet: the same, as one op with one backward), fused-<backend>-create-graph FusedMLP under eager's
    create_graph recipe."""
    def make():
        torch.manual_seed(0)
        eager = sequential([1, 32, 32, 32, 1], "tanh")
        x = torch.linspace(0, 3, 256, device=DEVICE).unsqueeze(1)
        xg = x.clone().requires_grad_()

        def residual(u, d2u):
            return (d2u + u).square().mean()

        def create_graph_loss(net):
            u = net(xg)
            (du,) = torch.autograd.grad(u.sum(), xg, create_graph=True)
            (d2u,) = torch.autograd.grad(du.sum(), xg, create_graph=True)
            return residual(u, d2u)

        def taylor_loss(net):
            u, _, d2u = _tanh_taylor2(net, x)
            return residual(u, d2u)

        def jet_loss(net):
            u, _, d2u = net.jet(x)
            return residual(u, d2u)

        def impl(name, net, loss):
            params = list(net.parameters())

            def forward():
                with torch.no_grad():
                    return net(x)

            return Impl(name, forward, lambda: torch.autograd.grad(loss(net), params))

        impls = [impl("eager", eager, create_graph_loss), impl("eager-taylor", eager, taylor_loss),
                 impl("compile-taylor", eager, torch.compile(taylor_loss))]
        for b in fused_backends():
            fused = fusedlayers.FusedMLP.from_sequential(eager, backend=b)
            impls += [impl(f"fused-{b}", fused, jet_loss), impl(f"fused-{b}-create-graph", fused, create_graph_loss)]
        return impls

    return Case("pinn", "PINN step u'' + u = 0: 1-32-32-32-1 tanh, 256 points, float32: forward = u, "
                "forward_backward = the parameter gradient of the residual loss (u'' w.r.t. the input)",
                DEVICE, torch.float32, make, reps=20)


def _classes(batch, n):
    return torch.randint(0, n, batch, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))


SWEEP_BATCHES = (1, 10, 100, 1_000, 10_000)
SWEEP_WIDTHS = (8, 16, 32, 64, 128, 256)


def sweep_cases(quick: bool) -> list[Case]:
    """Where fusion wins and where it stops: a 3-layer tanh MLP over batch sizes (width 16) and over widths
    (batch 256), float32, gradients w.r.t. input and parameters. Named sweep_batch_<n> and sweep_width_<n>."""
    batches = SWEEP_BATCHES[::2] if quick else SWEEP_BATCHES
    widths = SWEEP_WIDTHS[::2] if quick else SWEEP_WIDTHS
    cases = [_mlp_case(f"sweep_batch_{b}", f"[16]*4 tanh, batch {b}", [16] * 4, "tanh", "identity", (b,),
                       torch.float32, reps=10) for b in batches]
    # widths 64 up also time their GEMMs alone (gemm-floor): where those are most of eager's time, no
    # implementation on the same BLAS gets far past eager
    cases += [_mlp_case(f"sweep_width_{w}", f"[{w}]*4 tanh, batch 256", [w] * 4, "tanh", "identity", (256,),
                        torch.float32, reps=10, floor="gemm" if w >= 64 else None) for w in widths]
    # issue 21's network: 0.98x eager on an Intel Xeon with the default path choice
    cases += [_mlp_case(f"sweep_silu64_batch_{b}", f"[64]*5 silu, batch {b}", [64] * 5, "silu", "identity", (b,),
                        torch.float32, reps=10, floor="gemm") for b in (256, 4096)]
    return cases


class _SharedStorage(torch.autograd.Function):
    """A layer that costs nothing: its output shares the input's storage without being a view of it (autograd
    refuses an in-place write to a view of a leaf), and passes the gradient through."""

    @staticmethod
    def forward(ctx, x):
        return x.new_empty(0).set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())

    @staticmethod
    def backward(ctx, grad):
        return grad


def _ce_case(quick: bool) -> Case:
    """Softmax cross-entropy of (N, C) float32 logits, mean over the rows: loss and gradient w.r.t. the logits.
    --quick shrinks N (the full case is 2 x 524 MB per eager call)."""
    N, C = (1024 if quick else 4096), 32000

    def make():
        gen = torch.Generator(DEVICE).manual_seed(0)
        x = torch.randn(N, C, device=DEVICE, generator=gen, requires_grad=True)
        y = torch.randint(0, C, (N,), device=DEVICE, generator=gen)

        def impl(name, loss):
            def forward():
                with torch.no_grad():
                    return loss(x, y)
            return Impl(name, forward, lambda: torch.autograd.grad(loss(x, y), x))

        impls = [impl("eager", F.cross_entropy), impl("compile", torch.compile(F.cross_entropy))]
        impls += [impl(f"fused-{b}", lambda x, y, b=b: fusedlayers.functional.cross_entropy(x, y, backend=b))
                  for b in fused_backends()]
        # inplace_backward=True overwrites its logits, which must come out of a layer: here one that costs nothing
        # (_SharedStorage) on a copy of x, which the first call turns into a gradient (the kernels' time does not
        # depend on the values), so that only the loss is timed, as for the others.
        base = x.detach().clone().requires_grad_()
        for b in fused_backends():
            def inplace(b=b):
                return fusedlayers.functional.cross_entropy(_SharedStorage.apply(base), y, backend=b,
                                                            inplace_backward=True)

            def forward(b=b):
                with torch.no_grad():  # nothing to differentiate: nothing is overwritten
                    return fusedlayers.functional.cross_entropy(base, y, backend=b, inplace_backward=True)

            impls.append(Impl(f"fused-{b}-inplace", forward, lambda f=inplace: torch.autograd.grad(f(), base)))
        return impls

    return Case("ce", f"softmax cross-entropy, N={N}, C={C}, float32, mean: gradient w.r.t. the logits", DEVICE,
                torch.float32, make, reps=5, warmup=1)


def _ce_soft_case(quick: bool) -> Case:
    """Softmax cross-entropy against class probabilities (mixup's mixed one-hots, with label smoothing 0.1 as
    timm's mixup training passes them), (N, C) float32, mean: loss and gradient w.r.t. the logits."""
    N, C = (256 if quick else 1024), 32000

    def make():
        gen = torch.Generator(DEVICE).manual_seed(0)
        x = torch.randn(N, C, device=DEVICE, generator=gen, requires_grad=True)
        y1, y2 = (torch.randint(0, C, (N,), device=DEVICE, generator=gen) for _ in range(2))
        t = 0.7 * F.one_hot(y1, C).float() + 0.3 * F.one_hot(y2, C).float()

        def impl(name, loss):
            def forward():
                with torch.no_grad():
                    return loss(x, t)
            return Impl(name, forward, lambda: torch.autograd.grad(loss(x, t), x))

        eager = functools.partial(F.cross_entropy, label_smoothing=0.1)
        return [impl("eager", eager), impl("compile", torch.compile(eager))] + [
            impl(f"fused-{b}", lambda x, t, b=b: fusedlayers.functional.cross_entropy(x, t, label_smoothing=0.1,
                                                                                     backend=b))
            for b in fused_backends()]

    return Case("ce_soft", f"softmax cross-entropy against class probabilities, N={N}, C={C}, float32, label "
                "smoothing 0.1, mean: gradient w.r.t. the logits", DEVICE, torch.float32, make, reps=5, warmup=1)


def _linear_ce_case(quick: bool) -> Case:
    """The output layer and loss of a language model: cross-entropy of hidden @ W.T, gradients w.r.t. hidden
    and W. Also PyTorch's own F.linear_cross_entropy, on its reference path (options=None) and chunked
    (LinearCrossEntropyOptions() defaults). --quick shrinks N and H (the full case is ~0.8 TFLOP a call)."""
    N, H, V = (512, 256, 32000) if quick else (4096, 1024, 32000)

    def make():
        gen = torch.Generator(DEVICE).manual_seed(0)
        h = torch.randn(N, H, device=DEVICE, generator=gen, requires_grad=True)
        w = (torch.randn(V, H, device=DEVICE, generator=gen) / H**0.5).requires_grad_()
        y = torch.randint(0, V, (N,), device=DEVICE, generator=gen)

        def impl(name, loss):
            def forward():
                with torch.no_grad():
                    return loss(h, w, y)
            return Impl(name, forward, lambda: torch.autograd.grad(loss(h, w, y), (h, w)))

        def eager(h, w, y):
            return F.cross_entropy(h @ w.T, y)

        chunked = nn.LinearCrossEntropyOptions()
        impls = [impl("eager", eager), impl("compile", torch.compile(eager))]
        impls += [impl(f"fused-{b}", lambda h, w, y, b=b: fusedlayers.functional.linear_cross_entropy(h, w, y, backend=b))
                  for b in fused_backends()]
        impls += [impl("torch-lce", lambda h, w, y: F.linear_cross_entropy(h, w, y)),
                  impl("torch-lce-chunked", lambda h, w, y: F.linear_cross_entropy(h, w, y, options=chunked))]
        return impls

    return Case("linear_ce", f"linear + cross-entropy, N={N}, H={H}, V={V}, float32, mean: gradients w.r.t. hidden "
                "and weight", DEVICE, torch.float32, make, reps=3, warmup=1)


def all_cases(quick: bool = False) -> list[Case]:
    from . import models  # it builds on model_impl above
    return (_seed_and_layer_cases(quick) + [_ce_case(quick), _ce_soft_case(quick), _linear_ce_case(quick)] + sweep_cases(quick)
            + models.cases(DEVICE, fused_backends()))


def _seed_and_layer_cases(quick: bool) -> list[Case]:
    return [
        _mlp_case("seed000", "6 x 12x12 cos chain, no bias, one vector, float64: gradient w.r.t. input and "
                  "parameters (seed 000)", [12] * 7, "cos", "cos", (), torch.float64, reps=40, bias=False,
                  floor="call", graph_free=True),
        _training_case("seed000_backward", "seed000's network (6 x 12x12 cos, no bias, one vector, float64)",
                       [12] * 7, "cos", (), torch.float64, reps=40, bias=False),
        _training_case("seed000_adam", "seed000's network (6 x 12x12 cos, no bias, one vector, float64)",
                       [12] * 7, "cos", (), torch.float64, reps=40, bias=False, adam=True),
        _training_case("seed003_field_adam", "seed003's field network (3-10-10-10-2 selu, batch 100, float32)",
                       [3, 10, 10, 10, 2], "selu", (100,), torch.float32, reps=40, adam=True),
        _mlp_case("seed002", "784-300-100-10 relu + cross-entropy, batch 256, float32: parameter gradients "
                  "(seed 002; eager and compile: F.cross_entropy, fused: fusedlayers' cross_entropy)",
                  [784, 300, 100, 10], "relu", "identity", (256,), torch.float32, reps=20,
                  loss=F.cross_entropy, target=_classes, wrt_input=False,
                  fused_loss=fusedlayers.functional.cross_entropy, floor="gemm"),
        *neural_ode.cases(DEVICE, fused_backends(), quick),
        _mlp_case("seed004", "1-1000-20-1 identity, batch 10,000, float64, loss sum of squares: parameter "
                  "gradients (seed 004)", [1, 1000, 20, 1], "identity", "identity", (10_000,), torch.float64,
                  reps=12, loss=lambda out, _: out.square().sum(), wrt_input=False),
        _dense_case("dense_large", "4096 x 1024 -> 1024, gelu, float32: the GEMM-bound regime",
                    (4096,), 1024, 1024, "gelu", torch.float32, reps=12, floor=True),
        _dense_case("dense_tiny", "one vector, 12 -> 12, cos, float64: the per-call-overhead regime",
                    (), 12, 12, "cos", torch.float64, reps=40),
        _pinn_case(),
    ]
