"""The mlp family's flat layout (the mlp_flat op, FusedMLP(flat=True): every parameter in one Parameter) on every
runnable backend, against the equivalent nn.Sequential in float64; and what the layout must keep of nn.Module's
behaviour (state_dict keys, loading both ways, optimizers, torch.func, torch.compile, clear errors)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from fusedlayers import FusedMLP
from fusedlayers.functional import flat_layers, flat_numel, mlp_flat_op

from conftest import assert_rel_close, device_of

F64 = torch.float64
NETS = {  # sizes, hidden activation, output activation
    "seed000": ([12] * 7, "cos", "identity"),
    "seed003": ([3, 10, 10, 10, 2], "selu", "identity"),
    "wide": ([6, 150, 3], "gelu", "tanh"),  # the layer-by-layer path: its gradients are joined, not adjacent
    "one_layer": ([6, 4], "relu", "sigmoid"),
}


def pair(net, bias, dtype=F64, device="cpu", backend="auto"):
    """A flat FusedMLP and the nn.Sequential it copies."""
    sizes, act, out_act = NETS[net]
    torch.manual_seed(0)
    fused = FusedMLP(sizes, act, out_act, bias=bias, dtype=dtype, device=device, backend=backend)
    seq = fused.to_sequential()
    return fused, seq


def reference(fused, seq, batch, seed):
    """(x, g, y, grads, generator): an input and an upstream gradient drawn from seed, the Sequential's output
    and its gradients w.r.t. x then its parameters, in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, fused.sizes[0], dtype=F64, generator=gen)
    g = torch.randn(*batch, fused.sizes[-1], dtype=F64, generator=gen)
    xr = x.clone().requires_grad_()
    y = seq(xr)
    return x, g, y, torch.autograd.grad(y, [xr, *seq.parameters()], g), gen


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch", [(), (1,), (37,), (2, 5)], ids=lambda b: "x".join(map(str, b)) or "vector")
@pytest.mark.parametrize("net", NETS)
def test_matches_sequential(backend, net, bias, batch):
    fused, seq = pair(net, bias, device=device_of(backend), backend=backend)
    assert [n for n, _ in fused.named_parameters()] == ["flat_params"]
    x, g, y_ref, grads_ref, _ = reference(fused, seq, batch, 1)
    xf = x.to(device_of(backend)).requires_grad_()
    y = fused(xf)
    dx, dflat = torch.autograd.grad(y, [xf, fused.flat_params], g.to(y.device))
    assert_rel_close(y, y_ref, 1e-10, "y")
    assert_rel_close(dx, grads_ref[0], 1e-10, "dx")
    assert dflat.shape == (flat_numel(fused.sizes, bias),)
    assert_rel_close(dflat, torch.cat([t.reshape(-1) for t in grads_ref[1:]]), 1e-10, "dflat")


def test_backward_fills_views_of_the_gradient(backend):
    """The user's loop: zero_grad, backward; weight{l}.grad reads flat_params.grad."""
    fused, seq = pair("seed003", True, device=device_of(backend), backend=backend)
    x = torch.randn(9, 3, dtype=F64)
    fused.zero_grad()
    fused(x.to(device_of(backend))).square().sum().backward()
    seq(x).square().sum().backward()
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        assert_rel_close(getattr(fused, f"weight{i}").grad, lin.weight.grad, 1e-10, f"weight{i}.grad")
        assert_rel_close(getattr(fused, f"bias{i}").grad, lin.bias.grad, 1e-10, f"bias{i}.grad")
    grad = fused.flat_params.grad
    fused.weight0.grad.zero_()  # a view: it writes the flat gradient
    assert grad[:30].abs().sum() == 0 and grad[30:].abs().sum() > 0


def test_double_backward_and_gradcheck(backend):
    fused, seq = pair("seed003", True, device=device_of(backend), backend=backend)
    x = torch.randn(4, 3, dtype=F64, device=device_of(backend), requires_grad=True)
    torch.autograd.gradcheck(lambda x, p: mlp_flat_op(x, p, fused.sizes, True, fused.activations, True, "native"
                                                      if backend == "cpu" else backend), (x, fused.flat_params))
    torch.autograd.gradgradcheck(lambda x, p: mlp_flat_op(x, p, fused.sizes, True, fused.activations, True,
                                                          "native" if backend == "cpu" else backend),
                                 (x, fused.flat_params))
    # the input-gradient penalty of a PINN-style loss: second order through the flat layout
    xr = x.detach().cpu().requires_grad_()
    (gx_ref,) = torch.autograd.grad(seq(xr).sum(), xr, create_graph=True)
    ref = torch.autograd.grad(gx_ref.square().sum(), list(seq.parameters()), materialize_grads=True)
    (gx,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    (dflat,) = torch.autograd.grad(gx.square().sum(), fused.flat_params)
    assert_rel_close(dflat, torch.cat([t.reshape(-1) for t in ref]), 1e-10, "d/dparams |dy/dx|^2")


def test_adam_step_equals_unflattened():
    """An optimizer step on the flat Parameter equals the same step on the per-layer Parameters."""
    flat, _ = pair("seed000", True)
    per_layer = FusedMLP(flat.sizes, "cos", dtype=F64, flat=False)
    per_layer.load_state_dict(flat.state_dict())
    x = torch.randn(5, 12, dtype=F64)
    for net in (flat, per_layer):
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, foreach=True)
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for name, value in per_layer.state_dict().items():
        torch.testing.assert_close(flat.state_dict()[name], value, rtol=1e-13, atol=0, msg=name)


def test_state_dict_keeps_per_layer_keys_and_loads_both_ways():
    flat, seq = pair("seed003", True)
    sd = flat.state_dict()
    assert list(sd) == ["weight0", "bias0", "weight1", "bias1", "weight2", "bias2", "weight3", "bias3"]
    assert sd["weight1"].shape == (10, 10) and not sd["weight1"].requires_grad
    per_layer = FusedMLP([3, 10, 10, 10, 2], "selu", flat=False, dtype=F64)
    per_layer.load_state_dict(sd, strict=True)  # flat -> per-layer
    again = FusedMLP([3, 10, 10, 10, 2], "selu", dtype=F64)
    again.load_state_dict(per_layer.state_dict(), strict=True)  # per-layer -> flat
    torch.testing.assert_close(again.flat_params, flat.flat_params, rtol=0, atol=0)
    # into the equivalent nn.Sequential through the documented conversion
    seq2 = again.to_sequential()
    for (name, value), (_, want) in zip(seq2.state_dict().items(), sd.items()):
        torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)
    # nn.Module's errors, with the per-layer keys
    bad = dict(sd, weight1=torch.zeros(10, 9, dtype=F64))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight1: copying a param with shape"):
        again.load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "bias2"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias2"'):
        again.load_state_dict(missing)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight7"'):
        again.load_state_dict(dict(sd, weight7=torch.zeros(1)))
    extra = dict(missing, weight7=torch.zeros(1))
    assert again.load_state_dict(extra, strict=False) == per_layer.load_state_dict(extra, strict=False)
    # a model holding one: prefixed keys
    model = nn.Sequential(nn.Identity(), flat)
    assert "1.weight0" in model.state_dict() and "1.flat_params" not in model.state_dict()
    model.load_state_dict(model.state_dict())


def test_distributed_checkpoint_state_dict_round_trip():
    """torch.distributed.checkpoint's get/set_model_state_dict (one process), full_state_dict too: its load adds
    the module's own flat_params next to the checkpoint's per-layer keys (it was an unexpected key)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    flat, _ = pair("seed003", True)
    model = nn.Sequential(flat, nn.Linear(2, 2, dtype=F64))
    for options in (StateDictOptions(), StateDictOptions(full_state_dict=True)):
        sd = get_model_state_dict(model, options=options)
        assert list(sd)[:2] == ["0.weight0", "0.bias0"] and "0.flat_params" not in sd
        target = nn.Sequential(FusedMLP([3, 10, 10, 10, 2], "selu", dtype=F64), nn.Linear(2, 2, dtype=F64))
        set_model_state_dict(target, sd, options=options)
        torch.testing.assert_close(target[0].flat_params, flat.flat_params, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "0.flat_params"'):
        target.load_state_dict(dict(model.state_dict(), **{"0.flat_params": flat.flat_params.detach().clone()}))


def test_load_state_dict_assign_from_meta():
    flat, _ = pair("seed003", True)
    with torch.device("meta"):
        empty = FusedMLP([3, 10, 10, 10, 2], "selu", dtype=F64)
    empty.load_state_dict(flat.state_dict(), assign=True)
    assert not empty.flat_params.is_meta and empty.flat_params.requires_grad
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(empty(x), flat(x), rtol=0, atol=0)


def test_from_sequential_copies_into_one_parameter():
    seq = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    fused = FusedMLP.from_sequential(seq)
    assert fused.flat and [n for n, _ in fused.named_parameters()] == ["flat_params"]
    x = torch.randn(6, 3, dtype=F64)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-14, atol=0)
    with torch.no_grad():
        seq[0].weight.zero_()
    assert fused.weight0.abs().sum() > 0  # a copy
    shared = FusedMLP.from_sequential(seq, flat=False)
    assert shared.weight0 is seq[0].weight  # shares
    seq[2].float()
    with pytest.raises(ValueError, match="share one dtype, device and requires_grad"):
        FusedMLP.from_sequential(seq)


def test_per_layer_tools_need_unflatten():
    """What needs per-layer Parameters raises on the flat layout, naming unflatten(); after it, it works."""
    net, _ = pair("seed003", True)
    with pytest.raises(AttributeError, match=r"cannot assign 'weight0'.*unflatten\(\)"):
        net.weight0 = nn.Parameter(torch.zeros(10, 3, dtype=F64))
    with pytest.raises(AttributeError, match=r"cannot delete 'bias1'.*unflatten\(\)"):
        del net.bias1
    with pytest.raises(AttributeError, match=r"unflatten\(\)"):
        prune.l1_unstructured(net, "weight0", amount=0.5)
    with pytest.raises(ValueError, match="does not have a parameter"):
        parametrize.register_parametrization(net, "weight1", nn.Identity())
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        torch.optim.SGD([{"params": [net.weight0]}], lr=0.1)
    x = torch.randn(5, 3, dtype=F64)
    y = net(x)
    net.unflatten()
    assert [n for n, _ in net.named_parameters()][:2] == ["weight0", "bias0"] and not net.flat
    torch.testing.assert_close(net(x), y, rtol=0, atol=0)
    prune.l1_unstructured(net, "weight0", amount=0.5)
    assert (net.weight0 == 0).sum() == 15
    net(x).sum().backward()
    assert net.weight0_orig.grad is not None


def test_writes_through_views_reach_the_network():
    net, seq = pair("one_layer", True)
    x = torch.randn(3, 6, dtype=F64)
    with torch.no_grad():
        net.weight0.mul_(2)
        net.bias0.zero_()
        seq[0].weight.mul_(2)
        seq[0].bias.zero_()
    assert_rel_close(net(x), seq(x), 1e-14, "after writes")
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        net.weight0.mul_(2)  # as on a Parameter outside no_grad
    nobias = FusedMLP([4, 3], bias=False)
    assert nobias.bias0 is None and nobias.flat_params.shape == (12,)


def test_torch_func_and_compile():
    net, seq = pair("seed003", True)
    x = torch.randn(7, 3, dtype=F64)
    params = dict(net.named_parameters())
    fn = lambda p, x: torch.func.functional_call(net, p, (x,)).square().sum()  # noqa: E731
    grads = torch.func.grad(fn)(params, x)
    seq_grads = torch.autograd.grad(seq(x).square().sum(), list(seq.parameters()))
    assert_rel_close(grads["flat_params"], torch.cat([t.reshape(-1) for t in seq_grads]), 1e-10, "func.grad")
    per_sample = torch.func.vmap(torch.func.jacrev(lambda x: net(x)))(x)
    seq_jac = torch.func.vmap(torch.func.jacrev(lambda x: seq(x)))(x)
    assert_rel_close(per_sample, seq_jac, 1e-10, "vmap(jacrev)")
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    xr = x.clone().requires_grad_()
    y = compiled(xr)
    (dflat,) = torch.autograd.grad(y.square().sum(), net.flat_params)
    assert_rel_close(dflat, torch.cat([t.reshape(-1) for t in seq_grads]), 1e-10, "compiled")


def test_bad_arguments_name_themselves():
    p = torch.zeros(flat_numel([3, 4, 2], True), dtype=F64)
    x = torch.zeros(5, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"expected params to be 1-D with 26 elements"):
        mlp_flat_op(x, p[:-1], [3, 4, 2], True, ["relu", "identity"], True, "native")
    with pytest.raises(RuntimeError, match=r"expected x of shape \[..., 3\]"):
        mlp_flat_op(x[:, :2], p, [3, 4, 2], True, ["relu", "identity"], True, "native")
    with pytest.raises(RuntimeError, match=r"expected params to have the dtype of x \(torch.float64\)"):
        mlp_flat_op(x, p.float(), [3, 4, 2], True, ["relu", "identity"], True, "native")
    with pytest.raises(RuntimeError, match=r"expected one activation per layer \(2\), got 1"):
        mlp_flat_op(x, p, [3, 4, 2], True, ["relu"], True, "native")
    y = mlp_flat_op(torch.zeros(0, 3, dtype=F64), p, [3, 4, 2], True, ["relu", "identity"], True, "native")
    assert y.shape == (0, 2)


# ---- distributed: DDP and FSDP2 over gloo, two processes (the helpers of test_convert.py) --------------------

def flat_ddp_and_fsdp2_worker(rank, port):
    import os
    import sys

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from test_convert import init_two_processes

    init_two_processes(rank, port)
    try:
        mesh = init_device_mesh("cpu", (2,))
        wraps = {"ddp": (DistributedDataParallel, lambda g: g),
                 "fsdp2": (lambda m: fully_shard(m, mesh=mesh), lambda g: g.full_tensor())}
        for name, (wrap, full) in wraps.items():
            torch.manual_seed(0)  # the same network and data on both ranks
            net = FusedMLP([3, 10, 10, 2], "tanh", dtype=F64)
            seq = net.to_sequential()
            x, target = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
            wrapped = wrap(net)
            F.mse_loss(wrapped(x.chunk(2)[rank]), target.chunk(2)[rank]).backward()
            F.mse_loss(seq(x), target).backward()  # the whole batch: the mean of the halves' gradients
            want = torch.cat([p.grad.reshape(-1) for p in seq.parameters()])
            assert_rel_close(full(net.flat_params.grad), want, 1e-10, f"{name}, rank {rank}")
            assert list(net.state_dict()) == [f"{k}{i}" for i in range(3) for k in ("weight", "bias")], name
            # loading another network's state_dict reaches the (sharded) parameters
            torch.manual_seed(1)
            other = wrap(FusedMLP([3, 10, 10, 2], "tanh", dtype=F64))
            wrapped.load_state_dict(other.state_dict())
            assert_rel_close(wrapped(x), other(x), 1e-14, f"{name}, loaded, rank {rank}")
        # FSDP2's initialization: meta, fully_shard, to_empty, reset_parameters
        with torch.device("meta"):
            lazy = FusedMLP([3, 10, 10, 2], "tanh", dtype=F64)
        fully_shard(lazy, mesh=mesh)
        lazy.to_empty(device="cpu")
        torch.manual_seed(2)
        lazy.reset_parameters()
        torch.manual_seed(2)
        eager_init = FusedMLP([3, 10, 10, 2], "tanh", dtype=F64)
        torch.testing.assert_close(lazy.flat_params.full_tensor(), eager_init.flat_params, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as test_convert's worker: gloo's thread may still free FSDP2's last all-gather


def test_ddp_and_fsdp2_gloo_two_processes():
    from test_convert import spawn_two
    spawn_two(flat_ddp_and_fsdp2_worker)


# ---- the graph-free call: FusedMLP.grad_and_value -------------------------------------------------------------

@pytest.mark.parametrize("batch", [(), (37,), (2, 5)], ids=lambda b: "x".join(map(str, b)) or "vector")
@pytest.mark.parametrize("net", NETS)
def test_grad_and_value_equals_autograd(backend, net, batch):
    fused, seq = pair(net, True, device=device_of(backend), backend=backend)
    x, g, y_ref, ref, gen = reference(fused, seq, batch, 3)
    dev = device_of(backend)
    (dx, dflat), y = fused.grad_and_value(x.to(dev), g.to(dev), input_grad=True)
    assert not (y.requires_grad or dx.requires_grad or dflat.requires_grad)
    assert_rel_close(y, y_ref, 1e-10, "value")
    assert_rel_close(dx, ref[0], 1e-10, "dx")
    assert_rel_close(dflat, torch.cat([t.reshape(-1) for t in ref[1:]]), 1e-10, "dflat")
    # with the built-in loss, accumulating into .grad as loss.backward() does
    target = torch.randn(*batch, fused.sizes[-1], dtype=F64, generator=gen)
    loss_ref = F.mse_loss(seq(x), target)
    ref = torch.autograd.grad(loss_ref, list(seq.parameters()))
    fused.zero_grad()
    for _ in range(2):
        (dx, dflat), loss = fused.grad_and_value(x.to(dev), target=target.to(dev), accumulate_grad=True)
    assert dx is None
    assert_rel_close(loss, loss_ref, 1e-10, "loss")
    assert_rel_close(fused.flat_params.grad, 2 * torch.cat([t.reshape(-1) for t in ref]), 1e-10, "accumulated")


def test_grad_and_value_edge_cases_and_errors():
    net, seq = pair("seed003", True)
    empty = torch.zeros(0, 3, dtype=F64)
    (_, dflat), loss = net.grad_and_value(empty, target=torch.zeros(0, 2, dtype=F64))
    assert loss.isnan() and F.mse_loss(seq(empty), torch.zeros(0, 2, dtype=F64)).isnan()
    assert torch.equal(dflat, torch.zeros_like(dflat))
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="exactly one of grad_output and target, got neither"):
        net.grad_and_value(x)
    with pytest.raises(RuntimeError, match="exactly one of grad_output and target, got both"):
        net.grad_and_value(x, torch.ones(4, 2, dtype=F64), target=torch.ones(4, 2, dtype=F64))
    with pytest.raises(RuntimeError, match=r"expected target of the output's shape \[4, 2\], got \[4, 3\]"):
        net.grad_and_value(x, target=torch.ones(4, 3, dtype=F64))
    with pytest.raises(RuntimeError, match=r"expected grad_output of the output's dtype and device"):
        net.grad_and_value(x, torch.ones(4, 2))
    with pytest.raises(RuntimeError, match="does not run under torch.func transforms"):
        torch.func.vmap(lambda x: net.grad_and_value(x, torch.ones(2, dtype=F64))[1])(x)
    with pytest.raises(RuntimeError, match="needs the flat layout"):
        FusedMLP([3, 2], flat=False).grad_and_value(torch.ones(3), torch.ones(2))
    # where the module's forward would compute otherwise, or the .grad could not be updated afterwards
    net32 = FusedMLP([3, 4, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast is enabled"):
        net32.grad_and_value(torch.ones(4, 3), torch.ones(4, 2))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="under torch.inference_mode"):
        net.grad_and_value(x, target=torch.ones(4, 2, dtype=F64), accumulate_grad=True)


def test_grad_and_value_under_compile():
    net, seq = pair("seed003", True)
    x, target = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    step = torch.compile(lambda x, t: net.grad_and_value(x, target=t, input_grad=True), fullgraph=True,
                         backend="aot_eager")
    (dx, dflat), loss = step(x, target)
    xr = x.clone().requires_grad_()
    loss_ref = F.mse_loss(seq(xr), target)
    dx_ref, *ref = torch.autograd.grad(loss_ref, [xr, *seq.parameters()])
    assert_rel_close(loss, loss_ref, 1e-10, "loss")
    assert_rel_close(dx, dx_ref, 1e-10, "dx")
    assert_rel_close(dflat, torch.cat([t.reshape(-1) for t in ref]), 1e-10, "dflat")


def test_deepcopy_pickle_and_conversions_keep_the_layout():
    import copy
    import io

    net, _ = pair("seed003", True)
    x = torch.randn(3, 3, dtype=F64)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(net), torch.load(buffer, weights_only=False)):
        assert other.flat and [n for n, _ in other.named_parameters()] == ["flat_params"]
        torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)
        with torch.no_grad():
            other.weight0.zero_()  # its own storage
    assert net.weight0.abs().sum() > 0
    single = copy.deepcopy(net).float()
    assert single.flat_params.dtype == torch.float32 and single.weight0.dtype == torch.float32
    assert_rel_close(single(x.float()), net(x), 1e-5, "float32 copy")


def test_review_findings_stay_fixed():
    """Each was a silent wrong answer once (session 13's review)."""
    net, seq = pair("seed003", True)
    x, target = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    # the returned gradient is not .grad itself: accumulating again leaves it as it was
    net.zero_grad()
    (_, g1), _ = net.grad_and_value(x, target=target, accumulate_grad=True)
    first = g1.clone()
    net.grad_and_value(x, target=target, accumulate_grad=True)
    assert torch.equal(g1, first) and torch.allclose(net.flat_params.grad, 2 * first)
    # nothing accumulates into a frozen network
    net.requires_grad_(False)
    with pytest.raises(RuntimeError, match="not a leaf that requires grad"):
        net.grad_and_value(x, target=target, accumulate_grad=True)
    net.requires_grad_(True)
    # a checkpoint with biases does not load into a network without them
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bias0"'):
        FusedMLP([3, 5, 2], bias=False).load_state_dict(FusedMLP([3, 5, 2]).state_dict())
    # a subclass's buffer and extra state load with the layers; nested unexpected keys are reported
    class Scaled(FusedMLP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("scale", torch.ones(2, dtype=F64))
            self.note = "a"

        def get_extra_state(self):
            return self.note

        def set_extra_state(self, state):
            self.note = state

    a, b = Scaled([3, 4, 2], "tanh", dtype=F64), Scaled([3, 4, 2], "tanh", dtype=F64)
    a.scale.fill_(3.0)
    a.note = "b"
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.scale, a.scale) and b.note == "b" and torch.equal(b.flat_params, a.flat_params)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "foo.bar"'):
        b.load_state_dict(dict(a.state_dict(), **{"foo.bar": torch.zeros(1)}))
    # assign=True with some keys missing, into a real module: the rest in place, the missing ones reported
    partial = {k: v for k, v in net.state_dict().items() if k != "bias3"}
    other = FusedMLP([3, 10, 10, 10, 2], "selu", dtype=F64)
    assert other.load_state_dict(partial, strict=False, assign=True).missing_keys == ["bias3"]
    torch.testing.assert_close(other.weight3, net.weight3, rtol=0, atol=0)
    # assign=True with the flat layout's own checkpoint takes its storage, no copy
    with torch.device("meta"):
        lazy = FusedMLP([3, 10, 10, 10, 2], "selu", dtype=F64)
    lazy.load_state_dict(net.state_dict(), assign=True)
    assert lazy.flat_params.data_ptr() == net.flat_params.data_ptr() and lazy.flat_params.requires_grad
    # an in-place update through the attribute lands whole
    before = net.weight0.clone()
    with torch.no_grad():
        net.weight0 -= 1.0
    torch.testing.assert_close(net.weight0, before - 1.0, rtol=0, atol=0)
    # torch.func's route checks params as the op does
    bad = {"flat_params": torch.zeros(flat_numel(net.sizes, True) + 7, dtype=F64)}
    with pytest.raises(RuntimeError, match="expected params to be 1-D with"):
        torch.func.grad(lambda p: torch.func.functional_call(net, p, (x,)).sum())(bad)
    # symbolic shapes through the built-in loss
    from torch.fx.experimental.proxy_tensor import make_fx
    call = torch.ops.fusedlayers.mlp_flat_grad_and_value
    loss = lambda x, t, p: call(x, p, None, t, net.sizes, True, net.activations, False, "native")[0]  # noqa: E731
    traced = make_fx(loss, tracing_mode="symbolic")(x, target, net.flat_params.detach())
    assert_rel_close(traced(x, target, net.flat_params.detach()), F.mse_loss(net(x), target), 1e-10, "traced")
    # a module pickled before _has_bias existed
    layers = FusedMLP([3, 4, 2], flat=False)
    state = dict(layers.__dict__)
    del state["_has_bias"]
    old = FusedMLP.__new__(FusedMLP)
    old.__setstate__(state)
    assert old(torch.ones(3)).shape == (2,) and old.biases() is not None


@pytest.mark.parametrize("path", ["fused", "wide", "chain"])
def test_opcheck(path, monkeypatch):
    """torch.library's checks (schema, fake kernel, autograd registration) of the flat layout's ops and kernels,
    on each CPU path: the tile loop, the wide path (forced) and the layer-by-layer chain."""
    sizes, act, out_act = {"fused": NETS["seed003"], "wide": ([7, 150, 40, 3], "tanh", "identity"),
                           "chain": NETS["wide"]}[path]
    if path == "wide":
        monkeypatch.setenv("FUSEDLAYERS_MLP_WIDE_MAX_MACS", str(2**40))
    acts = [act] * (len(sizes) - 2) + [out_act]
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(flat_numel(sizes, True), dtype=F64, generator=gen) * 0.3
    x = torch.randn(37, sizes[0], dtype=F64, generator=gen)
    g = torch.randn(37, sizes[-1], dtype=F64, generator=gen)
    ops = torch.ops.fusedlayers
    torch.library.opcheck(ops.mlp_flat.default, (x.requires_grad_(), p.requires_grad_(), sizes, True, acts, True,
                                                 "native"))
    x, p = x.detach(), p.detach()
    for save in (True, False):
        torch.library.opcheck(ops.mlp_flat_forward.default, (x, p, sizes, True, acts, save))
    for input_grad in (True, False):
        torch.library.opcheck(ops.mlp_flat_backward.default, (g, x, p, [], sizes, True, acts, input_grad))
    torch.library.opcheck(ops.mlp_flat_grad_and_value.default, (x, p, g, None, sizes, True, acts, True, "native"))
    torch.library.opcheck(ops.mlp_flat_grad_and_value.default, (x, p, None, g, sizes, True, acts, False, "native"))
    # the CPU kernels read and write in the flat layout what mlp_forward / mlp_backward take and give per layer
    ws, bs = flat_layers(p, sizes, True)
    for save in (True, False):
        (y_flat, saved_flat), (y, saved) = (ops.mlp_flat_forward(x, p, sizes, True, acts, save),
                                            ops.mlp_forward(x, ws, bs, acts, save))
        torch.testing.assert_close(y_flat, y, rtol=0, atol=0)
        torch.testing.assert_close(saved_flat, saved, rtol=0, atol=0)
    dx, dws, dbs = ops.mlp_backward(g, x, ws, bs, [], acts, True)
    dx_flat, dflat = ops.mlp_flat_backward(g, x, p, [], sizes, True, acts, True)
    torch.testing.assert_close(dx_flat, dx, rtol=0, atol=0)
    torch.testing.assert_close(dflat, torch.cat([t.reshape(-1) for pair in zip(dws, dbs) for t in pair]), rtol=0,
                               atol=0)


def test_second_review_findings_stay_fixed():
    net = FusedMLP([4, 4, 4], "tanh", dtype=F64)
    # only the very view is taken back; anything else assigned to weight{l} raises as before
    for value in (nn.Parameter(net.weight0.detach(), requires_grad=False), net.weight0.t(),
                  net.weight0.detach().as_strided((4, 4), (1, 4))):
        with pytest.raises(AttributeError, match="cannot assign 'weight0'"):
            net.weight0 = value
    # a meta module cannot be partly loaded with assign=True; without assign, PyTorch's warning
    ckpt = {k: v for k, v in net.state_dict().items() if k != "bias1"}
    with torch.device("meta"):
        lazy = FusedMLP([4, 4, 4], "tanh", dtype=F64)
    with pytest.raises(RuntimeError, match=r"cannot be partly loaded; missing: \['bias1'\]"):
        lazy.load_state_dict(ckpt, strict=False, assign=True)
    with pytest.warns(UserWarning, match="to a meta parameter in the current model, which is a no-op"):
        lazy.load_state_dict(ckpt, strict=False)
    # flat_params is not a state_dict key: unexpected, as with per-layer Parameters
    result = FusedMLP([4, 4, 4], "tanh", dtype=F64).load_state_dict(
        dict(net.state_dict(), flat_params=net.flat_params.detach()), strict=False)
    assert result.unexpected_keys == ["flat_params"] and result.missing_keys == []
