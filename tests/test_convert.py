"""fusedlayers.fuse(): the converted model computes what the original did (float64), keeps its state_dict keys,
and works with torch.compile, .to(), torch.save/load, autocast and distributed data parallelism."""
import copy
import datetime
import io
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import fusedlayers
from fusedlayers import ActivationModule, FusedDense
from fusedlayers.convert import FoldedActivation, FusedSequential, mlp_is_faster
from fusedlayers.activations import ACTIVATIONS, REFERENCE

from conftest import assert_rel_close

IN, OUT = 5, 3


class Layers(nn.Sequential):
    """A subclass that keeps nn.Sequential.forward: fuse() swaps its pairs, and runs them as FusedDense
    modules, one by one (a FusedSequential is an nn.Sequential, not this class)."""


# How the fused model computes its runs of layers: as one mlp op through the op's fused CPU path (widths
# <= 32, csrc/cpu/mlp.cpp's kMaxFusedWidth), as one mlp op layer by layer inside (wider), or as one FusedDense
# module per layer.
CONFIGS = {"narrow": (8, nn.Sequential), "wide": (40, nn.Sequential), "per_layer": (40, Layers)}


# The table's activations that fuse() folds into a Linear (an nn.Identity after a Linear is left as it is), then
# the ones whose modules take an inplace flag, with it.
FOLDED = [n for n in ACTIVATIONS if n != "identity"] + ["relu", "leaky_relu", "elu"]


def supported():
    """One module of every activation the fused table has, inplace flags included (in FOLDED's order)."""
    return [REFERENCE[n].make_module() for n in ACTIVATIONS if n != "identity"] + [
        nn.ReLU(inplace=True), nn.LeakyReLU(0.01, inplace=True), nn.ELU(1.0, inplace=True)]


def unsupported():
    """Activations whose parameters differ from the table's, and ones it lacks: fuse() must leave them."""
    return [nn.LeakyReLU(0.02), nn.ELU(alpha=2.0), nn.Softplus(beta=2.0), nn.Softplus(threshold=10.0),
            nn.Hardtanh(), nn.PReLU()]


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Net(nn.Module):
    """Sequentials inside custom modules and inside each other, residual blocks around them, every supported
    activation module (two per block, so runs of several layers form), unsupported ones, and a loss module."""

    def __init__(self, width: int, seq: type, loss: nn.Module) -> None:
        super().__init__()
        acts = supported()
        self.stem = seq(nn.Linear(IN, width), acts[0])
        self.blocks = nn.ModuleList(
            Residual(seq(nn.Linear(width, width), a, nn.Linear(width, width), b, nn.Linear(width, width)))
            for a, b in zip(acts[1::2], acts[2::2]))
        self.odd = seq(*[m for a in unsupported() for m in (nn.Linear(width, width), a)])
        self.head = seq(seq(nn.Linear(width, width, bias=False), nn.Tanh(),
                            nn.Linear(width, width, bias=False), nn.Sigmoid()),
                        Residual(seq(nn.Linear(width, width), nn.SiLU())),
                        nn.Linear(width, OUT))
        self.loss = loss

    def forward(self, x, target):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        y = self.head(self.odd(h))
        return y, self.loss(y, target)


def make_net(config, loss=None, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Net(*CONFIGS[config], nn.MSELoss() if loss is None else loss).to(dtype)


def data(dtype=torch.float64, batch=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, IN, dtype=dtype, generator=gen), torch.randn(batch, OUT, dtype=dtype, generator=gen)


def run(model, x, target):
    """Output, loss, and the gradients of the loss (summed if unreduced) w.r.t. the input and every parameter,
    in parameter order."""
    x = x.clone().requires_grad_()
    y, loss = model(x, target)
    return y, loss, torch.autograd.grad(loss.sum(), [x, *model.parameters()])


def assert_same_function(fused, model, x, target, rtol=1e-10):
    y, loss, grads = run(fused, x, target)
    y_ref, loss_ref, grads_ref = run(model, x, target)
    assert y.dtype == y_ref.dtype
    assert_rel_close(y, y_ref, rtol, "output")
    assert_rel_close(loss, loss_ref, rtol, "loss")
    assert len(grads) == len(grads_ref)
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_rel_close(got, want, rtol, f"grad {i}")


# ---- what fuse() swaps, and the function it computes ----------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_same_outputs_and_gradients(config):
    model = make_net(config)
    fused = fusedlayers.fuse(model)
    assert_same_function(fused, model, *data())


@pytest.mark.parametrize("config", CONFIGS)
def test_what_is_swapped(config):
    model = make_net(config)
    fused = fusedlayers.fuse(model)
    n_supported = len(supported()) + 3  # the table's modules in stem and blocks, then Tanh, Sigmoid, SiLU
    dense = [m for m in fused.modules() if type(m) is FusedDense]
    folded = [m for m in fused.modules() if type(m) is FoldedActivation]
    assert len(dense) == len(folded) == n_supported
    assert [m.activation for m in dense][:len(supported())] == FOLDED
    # Unsupported activations stay, as do the Linear layers before them, and bare Linear layers.
    for got, want in zip(fused.odd, model.odd):
        assert type(got) is type(want) and repr(got) == repr(want)
    assert type(fused.head[2]) is nn.Linear and type(fused.blocks[0].body[4]) is nn.Linear
    assert type(fused.loss) is nn.MSELoss
    # Runs of layers in an nn.Sequential become one mlp op call; in a subclass, FusedDense modules.
    runs = [m for m in fused.modules() if type(m) is FusedSequential]
    assert (len(runs) > 0) == (config != "per_layer")
    assert not any(type(m) is FusedSequential for m in model.modules())  # the original untouched


def test_mlp_run_boundaries():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.ReLU(),  # bias differs: split
                        nn.Linear(8, 6, bias=False), nn.GELU(), nn.Linear(6, 2, bias=False),  # ends with a Linear
                        nn.Hardtanh(), nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 8), nn.SiLU()).double()
    fused = fusedlayers.fuse(seq)
    assert type(fused) is FusedSequential
    # (0, 1) alone is one layer: not a run. 2..6 is a run ending with the bare Linear; 8..11 another.
    assert fused._mlp_runs == [(2, 6, ["relu", "gelu", "identity"]), (8, 11, ["silu", "silu"])]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert_rel_close(fused(x), seq(x), 1e-10)
    for got, want in zip(torch.autograd.grad(fused(x).sum(), [x, *fused.parameters()]),
                         torch.autograd.grad(seq(x).sum(), [x, *seq.parameters()])):
        assert_rel_close(got, want, 1e-10)


def test_torch_func_through_a_fused_run():
    # A run of fused layers goes through the same torch.func route as FusedMLP: jvp and vmap are exact.
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    fused = fusedlayers.fuse(seq)
    assert isinstance(fused, FusedSequential) and fused._mlp_runs
    x, v = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for got, want in zip(torch.func.jvp(fused, (x,), (v,)), torch.func.jvp(seq, (x,), (v,))):
        assert_rel_close(got, want, 1e-10, "jvp")
    xs = torch.randn(3, 6, 3, dtype=torch.float64)
    assert_rel_close(torch.func.vmap(torch.func.jacrev(fused))(xs), torch.func.vmap(torch.func.jacrev(seq))(xs),
                     1e-10, "vmap(jacrev)")


def test_mlp_is_faster_rule():
    assert mlp_is_faster([3, 10, 10, 10, 2]) and mlp_is_faster([16, 16, 16]) and mlp_is_faster([64, 300, 100, 10])
    assert not mlp_is_faster([4, 4])  # a single layer: FusedDense already is one op


def test_edited_fused_sequential_runs_its_children():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    fused = fusedlayers.fuse(seq)
    x = torch.randn(3, 4, dtype=torch.float64)
    fused[2] = FusedDense.from_linear(seq[2], "sigmoid")  # a child replaced after fuse(): no stale run
    assert_rel_close(fused(x), seq[4](torch.sigmoid(seq[2](torch.tanh(seq[0](x))))), 1e-10)
    fused.append(nn.Tanh())  # a child added
    assert_rel_close(fused(x), torch.tanh(seq[4](torch.sigmoid(seq[2](torch.tanh(seq[0](x)))))), 1e-10)
    assert_rel_close(fused[:2](x), torch.tanh(seq[0](x)), 1e-10)  # a slice is a FusedSequential fuse() did not make


def test_custom_containers_and_subclasses_are_left_alone():
    class Shuffled(nn.Sequential):  # its own forward: the pairs are not applied in order
        def forward(self, x):
            return self[1](x) + self[0](x)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, args, out: out * 3)
    model = nn.Sequential(Shuffled(nn.Linear(4, 4), nn.ReLU()), Scaled(4, 4), nn.Tanh(), hooked, nn.Tanh(),
                          nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])).double()
    with pytest.warns(UserWarning, match="the model has 3 nn.Linear layers and none was converted"):
        fused = fusedlayers.fuse(model)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]


def test_unsupported_activation_is_never_changed():
    for act in unsupported():
        seq = nn.Sequential(nn.Linear(3, 3), act)
        with pytest.warns(UserWarning, match="none was converted"):
            fused = fusedlayers.fuse(seq)
        assert type(fused[0]) is nn.Linear and type(fused[1]) is type(act) and repr(fused[1]) == repr(act)


def test_copy_and_inplace():
    model = make_net("narrow")
    before = copy.deepcopy(model)
    fused = fusedlayers.fuse(model)
    assert fused is not model
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]  # the original untouched
    for p, q in zip(fused.parameters(), model.parameters()):
        assert p is not q and p.data_ptr() != q.data_ptr() and torch.equal(p, q)
    params = list(model.parameters())
    same = fusedlayers.fuse(model, inplace=True)
    assert same is model and type(model.stem[0]) is FusedDense
    assert all(p is q for p, q in zip(model.parameters(), params))


def test_keeps_requires_grad_training_mode_dtype_and_device():
    model = make_net("wide").eval()
    model.stem[0].weight.requires_grad_(False)
    fused = fusedlayers.fuse(model)
    assert not fused.stem[0].weight.requires_grad and fused.stem[0].bias.requires_grad
    assert not any(m.training for m in fused.modules())
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in fused.parameters())


def test_idempotent():
    model = make_net("narrow")
    once = fusedlayers.fuse(model)
    twice = fusedlayers.fuse(once)
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    assert_same_function(twice, model, *data())


def test_verbose_prints_one_line_per_replacement(capsys):
    seq = nn.Sequential(nn.Linear(3, 40), nn.ReLU(), nn.Linear(40, 40), nn.LeakyReLU(0.2), nn.Linear(40, 40),
                        nn.GELU(), nn.Linear(40, 2))
    fusedlayers.fuse(seq, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5  # two pairs, one pair left with its reason; two runs ending with a bare Linear
    assert lines[0].startswith("fuse: 0 Linear(in_features=3, out_features=40") and "+ 1 ReLU()" in lines[0]
    assert lines[1] == ("fuse: left 2 Linear(in_features=40, out_features=40, bias=True) + 3: "
                        "LeakyReLU(negative_slope=0.2) is none of the fused activations (convert.KNOWN_ACTIVATIONS "
                        "names other libraries')")
    assert "5 GELU" in lines[2] and "FusedDense" in lines[2]
    assert lines[3:] == ["fuse: 0 to 2 -> one mlp op, sizes [3, 40, 40]", "fuse: 4 to 6 -> one mlp op, sizes [40, 40, 2]"]
    fusedlayers.fuse(seq)
    assert capsys.readouterr().out == ""


# ---- state_dict, save and load ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_round_trip_both_ways(config):
    model = make_net(config, seed=0)
    fused = fusedlayers.fuse(make_net(config, seed=1))
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(model.state_dict(), strict=True)
    assert_same_function(fused, model, *data())
    other = make_net(config, seed=2)
    fused_other = fusedlayers.fuse(make_net(config, seed=3))
    other.load_state_dict(fused_other.state_dict(), strict=True)
    assert_same_function(fused_other, other, *data())


@pytest.mark.parametrize("config", CONFIGS)
def test_torch_save_and_load(config):
    model = make_net(config)
    fused = fusedlayers.fuse(model)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # a whole module: pickled classes
    assert_same_function(loaded, model, *data())
    buf.seek(0)
    with pytest.raises(Exception, match="FusedSequential|Net"):
        torch.load(buf)  # weights_only=True, the default, refuses classes it was not told to trust
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)  # plain tensors: loads with the default weights_only=True
    fresh = fusedlayers.fuse(make_net(config, seed=5))
    fresh.load_state_dict(state, strict=True)
    assert_same_function(fresh, model, *data())


def test_whole_module_loads_with_weights_only_and_safe_globals():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    fused = fusedlayers.fuse(seq)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([FusedSequential, FusedDense, FoldedActivation, nn.Linear]):
        loaded = torch.load(buf, weights_only=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert type(loaded) is FusedSequential and loaded._fused_children[0] is loaded[0]
    assert_rel_close(loaded(x), seq(x), 1e-10)


# ---- .to(), torch.compile --------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_to_dtype_and_device(config):
    model = make_net(config)
    fused = fusedlayers.fuse(model).to(torch.float32)
    assert all(p.dtype == torch.float32 for p in fused.parameters())
    assert_same_function(fused, model.to(torch.float32), *data(torch.float32), rtol=1e-5)
    on_meta = fused.to("meta")
    x, target = data(torch.float32)
    y, loss = on_meta(x.to("meta"), target.to("meta"))
    assert y.device.type == "meta" and y.shape == (len(x), OUT) and y.dtype == torch.float32


@pytest.mark.parametrize("config", CONFIGS)
def test_compile_fullgraph(config):
    torch._dynamo.reset()
    model = make_net(config)
    fused = fusedlayers.fuse(model)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert_same_function(compiled, model, *data())


# ---- nn.CrossEntropyLoss -> FusedCrossEntropyLoss ----------------------------------------------------------

CROSS_ENTROPY_OPTIONS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"ignore_index": 1},
                         {"label_smoothing": 0.1}, {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)},
                         {"weight": torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), "ignore_index": 0,
                          "label_smoothing": 0.2, "reduction": "sum"}]


def class_targets(batch=7, seed=2):
    return torch.randint(0, OUT, (batch,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", CROSS_ENTROPY_OPTIONS)
def test_cross_entropy_loss_swapped_with_same_options(options):
    loss = nn.CrossEntropyLoss(**options)
    model = make_net("narrow", loss=loss)
    fused = fusedlayers.fuse(model)
    assert type(fused.loss) is fusedlayers.FusedCrossEntropyLoss
    assert (fused.loss.ignore_index, fused.loss.reduction, fused.loss.label_smoothing) == (
        loss.ignore_index, loss.reduction, loss.label_smoothing)
    assert (fused.loss.weight is None) == (loss.weight is None)
    if loss.weight is not None:
        assert torch.equal(fused.loss.weight, loss.weight) and fused.loss.weight is not loss.weight
    assert list(fused.state_dict()) == list(model.state_dict())
    x, _ = data()
    target = class_targets()
    y, value, grads = run(fused, x, target)
    y_ref, value_ref, grads_ref = run(model, x, target)
    assert_rel_close(value, value_ref, 1e-10, "loss")
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_rel_close(got, want, 1e-10, f"grad {i}")


def test_cross_entropy_loss_as_the_model_and_inplace(capsys):
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    fused = fusedlayers.fuse(loss, inplace=True, verbose=True)
    assert type(fused) is fusedlayers.FusedCrossEntropyLoss and fused.label_smoothing == 0.1
    assert "CrossEntropyLoss" in capsys.readouterr().out
    logits = torch.randn(7, OUT, dtype=torch.float64)
    assert_rel_close(fused(logits, class_targets()), loss(logits, class_targets()), 1e-10)


# ---- autocast ----------------------------------------------------------------------------------------------

def max_error(got, want):
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("activations", [("gelu", "tanh", "silu"), ("relu", "sigmoid", "elu"),
                                         ("softplus", "selu", "leaky_relu"), ("cos", "gelu_tanh", "sin")])
def test_autocast_cpu_bfloat16_matches_eager(config, activations):
    """Under the same autocast the fused model gives eager's dtypes, and its error against a float32 run is
    at most twice eager bfloat16's own, outputs and every gradient. Eager's error counts as at least the
    rounding of a bfloat16 result (2^-8 of the largest value): no bfloat16 result can do better than that."""
    width, seq = CONFIGS[config]
    torch.manual_seed(0)
    layers = [nn.Linear(IN, width)]
    for a in activations:
        layers += [fusedlayers.activations.REFERENCE[a].make_module(), nn.Linear(width, width)]
    layers[-1] = nn.Linear(width, OUT)
    model = seq(*layers)
    fused = fusedlayers.fuse(model)
    assert (type(fused) is FusedSequential) == (seq is nn.Sequential)
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(256, IN, generator=gen), torch.randn(256, OUT, generator=gen)

    def output_and_grads(m):
        x_ = x.clone().requires_grad_()
        y = m(x_)
        return [y, *torch.autograd.grad(y, [x_, *m.parameters()], g)]

    reference = output_and_grads(model)  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, got = output_and_grads(model), output_and_grads(fused)
    assert got[0].dtype == eager[0].dtype == torch.bfloat16
    for i, (a, e, want) in enumerate(zip(got, eager, reference)):
        assert a.dtype == e.dtype, f"tensor {i}"
        eager_error = max(max_error(e, want), 2**-8 * want.abs().max().item())
        assert max_error(a, want) <= 2 * eager_error, f"tensor {i}"


@pytest.mark.parametrize("config", CONFIGS)
def test_autocast_cpu_bfloat16_dtypes_of_a_nested_model(config):
    model = make_net(config, dtype=torch.float32)
    fused = fusedlayers.fuse(model)
    x, target = data(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, got = run(model, x, target), run(fused, x, target)
    assert got[0].dtype == eager[0].dtype == torch.bfloat16 and got[1].dtype == eager[1].dtype
    assert [t.dtype for t in got[2]] == [t.dtype for t in eager[2]]


@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus"])
def test_autocast_ops_cast_like_linear(activation):
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    ws, bs = [torch.randn(4, 5), torch.randn(3, 4)], [torch.randn(4), torch.randn(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fusedlayers.functional.dense(x, w, b, activation)
        y_mlp = fusedlayers.functional.mlp(x, ws, bs, activation, activation)
        y64 = fusedlayers.functional.dense(x.double(), w.double(), b.double(), activation)
        assert F.linear(x.double(), w.double(), b.double()).dtype == torch.float64  # eager leaves float64 alone
    assert y.dtype == y_mlp.dtype == torch.bfloat16 and y64.dtype == torch.float64
    expected = fusedlayers.functional.dense(x.bfloat16(), w.bfloat16(), b.bfloat16(), activation)
    assert torch.equal(y, expected)
    assert_rel_close(y64, REFERENCE_DENSE(x, w, b, activation), 1e-10)


def REFERENCE_DENSE(x, w, b, activation):
    return fusedlayers.activations.REFERENCE[activation].f(F.linear(x.double(), w.double(), b.double()))


def test_autocast_float32_activation_rule(monkeypatch):
    """Where eager autocast runs the activation in float32 (softplus on CUDA), the op returns float32. No GPU
    here: the rule is checked on the CPU table."""
    monkeypatch.setitem(fusedlayers.ops.common.FLOAT32_ACTIVATIONS_UNDER_AUTOCAST, "cpu", ("softplus",))
    x, w = torch.randn(6, 5), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusedlayers.functional.dense(x, w, None, "softplus").dtype == torch.float32
        assert fusedlayers.functional.dense(x, w, None, "relu").dtype == torch.bfloat16
        assert fusedlayers.functional.mlp(x, [w, w[:, :4]], None, "softplus", "softplus").dtype == torch.float32
        assert fusedlayers.functional.mlp(x, [w, w[:, :4]], None, "softplus", "tanh").dtype == torch.bfloat16


def test_autocast_cpu_float16_is_a_clear_error():
    # Eager runs float16 on the CPU; the CPU kernels have no float16 (a GPU has): say so, never a wrong number.
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="float32, float64 and bfloat16"):
        fusedlayers.functional.dense(torch.randn(2, 3), torch.randn(4, 3))


def test_autocast_compiled():
    torch._dynamo.reset()
    model = make_net("narrow", dtype=torch.float32)
    fused = fusedlayers.fuse(model)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x, target = data(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = compiled(x, target)
        y_eager, _ = fused(x, target)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_eager)


# ---- distributed: DDP and FSDP2 over gloo, two processes on this machine ----------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, timeout=120.0):
    """Runs worker(rank, port) in two processes; a worker's exception fails the test, and so does a hang."""
    context = mp.spawn(worker, (free_port(),), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the distributed workers did not finish within {timeout} s")


def init_two_processes(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))


def check_distributed_grads(rank, wrap, grad_of):
    """Each rank runs the wrapped fused model on its half of the batch; after backward, its gradients must
    equal those of the unfused model on the whole batch (the loss is a mean, so DDP's average of the halves'
    gradients is the whole batch's)."""
    for config in ("narrow", "per_layer"):  # one mlp op per run, and FusedDense modules
        model = make_net(config)
        fused = wrap(fusedlayers.fuse(model))
        x, target = data(batch=8)
        _, loss = fused(x.chunk(2)[rank], target.chunk(2)[rank])
        loss.backward()
        _, _, grads_ref = run(model, x, target)
        params = list(fused.parameters())
        assert len(params) == len(grads_ref) - 1
        for i, (p, want) in enumerate(zip(params, grads_ref[1:])):
            assert_rel_close(grad_of(p), want, 1e-10, f"rank {rank}, {config}, parameter {i}")


def ddp_and_fsdp2_worker(rank, port):
    init_two_processes(rank, port)
    try:
        check_distributed_grads(rank, DistributedDataParallel, lambda p: p.grad)
        mesh = init_device_mesh("cpu", (2,))

        def shard(model):
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            return fully_shard(model, mesh=mesh)
        check_distributed_grads(rank, shard, lambda p: p.grad.full_tensor())
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's finalization. Gloo's worker thread may still be freeing FSDP2's last
    # all-gather (its tensors' Python objects need the GIL), and during finalization that aborts the process
    # (std::terminate from the thread's forced exit: PyTorch's, seen in 1 run of 10 here, with a core's backtrace).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_and_fsdp2_gloo_two_processes():
    """One pair of processes for both (starting them is most of the time): DDP, then FSDP2's fully_shard."""
    spawn_two(ddp_and_fsdp2_worker)


# ---- hooks: honoured when the layers run, as in the original model -----------------------------------------

def hooked_run(model, x, register):
    """The model's output and gradients with hooks that record every tensor they see (and scale the output of
    the first hooked module, so a hook's effect on the result is checked too); `register(model, hook)` places
    them and returns the handles."""
    seen = []

    def hook(module, args, out):
        seen.append((args[0].detach().clone(), out.detach().clone()))
        return out * 1.5 if len(seen) == 1 else out

    handles = register(model, hook)
    x = x.clone().requires_grad_()
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    for h in handles:
        h.remove()
    return y, grads, seen


def assert_same_hooked_run(fused, model, x, register):
    y, grads, seen = hooked_run(fused, x, register)
    y_ref, grads_ref, seen_ref = hooked_run(model, x, register)
    assert_rel_close(y, y_ref, 1e-10, "output")
    for got, want in zip(grads, grads_ref, strict=True):
        assert_rel_close(got, want, 1e-10, "grad")
    assert len(seen) == len(seen_ref) > 0
    for (a, o), (a_ref, o_ref) in zip(seen, seen_ref):
        assert_rel_close(a, a_ref, 1e-10, "hook input")
        assert_rel_close(o, o_ref, 1e-10, "hook output")


def chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2)).double()


@pytest.mark.parametrize("where", [0, 1, 2, 3])
def test_hook_registered_after_fuse_sees_what_the_original_gave(where):
    # A forward hook on the FusedDense in the Linear's place sees the Linear's output (before the activation); on
    # the FoldedActivation, the pre-activation in and the activation out; inside a run of one mlp op too.
    model = chain()
    fused = fusedlayers.fuse(model)
    assert type(fused) is FusedSequential and fused._mlp_runs
    x = data(batch=5)[0][:, :4]
    assert_same_hooked_run(fused, model, x, lambda m, hook: [m[where].register_forward_hook(hook)])
    # the hook removed: one mlp op again, the same function
    with torch.profiler.profile() as prof:
        assert_rel_close(fused(x), model(x), 1e-10)
    assert sum(e.name == "fusedlayers::mlp" for e in prof.events()) == 1


def test_pre_hook_and_backward_hook_after_fuse():
    model, x = chain(), data(batch=5)[0][:, :4]
    fused = fusedlayers.fuse(model)
    for m in (model, fused):
        m[2].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    grads_out = {}
    for name, m in (("model", model), ("fused", fused)):
        m[2].register_full_backward_hook(lambda module, gin, gout, name=name: grads_out.update({name: gout[0]}))
    y = fused(x)
    y.sum().backward()
    y_ref = model(x)
    y_ref.sum().backward()
    assert_rel_close(y, y_ref, 1e-10)
    assert_rel_close(grads_out["fused"], grads_out["model"], 1e-10, "grad_output at the Linear")
    for p, q in zip(fused.parameters(), model.parameters()):
        assert_rel_close(p.grad, q.grad, 1e-10)


def test_global_module_hook_sees_every_module_as_the_original():
    model, x = chain(), data(batch=5)[0][:, :4]
    fused = fusedlayers.fuse(model)

    def register(m, hook):
        return [nn.modules.module.register_module_forward_hook(lambda mod, args, out: hook(mod, args, out)
                                                               if mod is not m else out)]

    assert_same_hooked_run(fused, model, x, register)


def test_hook_on_a_pair_in_a_block():
    torch.manual_seed(0)
    block = TwoStep(5, 7).double()
    fused = fusedlayers.fuse(block)
    assert type(fused.fc1) is FusedDense and type(fused.act) is FoldedActivation
    x = data()[0]
    for where in ("fc1", "act"):
        assert_same_hooked_run(fused, block, x, lambda m, hook: [getattr(m, where).register_forward_hook(hook)])


# ---- modules with a forward of their own ------------------------------------------------------------------

class TwoStep(nn.Module):
    """The two-statement form: h = self.fc1(x); h = self.act(h)."""

    def __init__(self, width, hidden, act=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), act or nn.SiLU(), nn.Linear(hidden, width)

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h)
        return self.fc2(h)


class Nested(nn.Module):
    """The nested form, with an activation function stored on the instance."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(5, 6), nn.Linear(5, 6), nn.Linear(6, 5)
        self.act = F.gelu

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Branchy(nn.Module):
    """Forms fuse() must leave: the Linear's output read again, used in a branch, an activation used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(5, 5) for _ in range(4))
        self.relu, self.tanh = nn.ReLU(), nn.Tanh()

    def forward(self, x, flag=False):
        h = self.a(x)
        y = self.relu(h) + h  # h read again
        g = self.b(x)
        if flag:
            return g
        g = self.tanh(g)  # b's output returned raw in a branch: its next use is the `if`
        return self.tanh(self.c(y + g)) + self.d(x)  # tanh applied twice in the class


def test_block_forms_converted_and_left():
    torch.manual_seed(0)
    nested = Nested().double()
    fused = fusedlayers.fuse(nested)
    assert type(fused.gate) is FusedDense and fused.gate.activation == "gelu" and type(fused.act) is FoldedActivation
    assert type(fused.up) is nn.Linear and type(fused.down) is nn.Linear
    x = data()[0]
    xg = x.clone().requires_grad_()
    for got, want in zip(torch.autograd.grad(fused(xg).sum(), [xg, *fused.parameters()]),
                         torch.autograd.grad(nested(xg).sum(), [xg, *nested.parameters()]), strict=True):
        assert_rel_close(got, want, 1e-10)
    assert list(fused.state_dict()) == list(nested.state_dict())
    branchy = Branchy().double()
    with pytest.warns(UserWarning, match="none was converted"):
        left = fusedlayers.fuse(branchy)
    assert [type(m) for m in left.modules()] == [type(m) for m in branchy.modules()]
    for flag in (False, True):
        assert_rel_close(left(x, flag), branchy(x, flag), 1e-10)


def test_a_block_class_without_source_is_left(capsys):
    Hidden = type("Hidden", (TwoStep,), {"forward": eval("lambda self, x: self.act(self.fc1(x))")})
    block = Hidden(5, 7)
    with pytest.warns(UserWarning, match="none was converted"):
        fusedlayers.fuse(block, verbose=True)
    assert "cannot be read" in capsys.readouterr().out


# ---- real model code: torchvision, timm, transformers, torch.nn (small configs, random weights) -------------

def vit_torchvision():
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
                             num_classes=3), torch.randn(2, 3, 16, 16)


def vit_timm():
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2, num_classes=3), torch.randn(2, 3, 16, 16)


def mixer_timm():
    import timm
    from timm.models.mlp_mixer import MlpMixer
    return MlpMixer(num_classes=3, img_size=16, patch_size=8, num_blocks=2, embed_dim=16), torch.randn(2, 3, 16, 16)


def token_ids():
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))


def bert():
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        hidden_act="gelu_new")
    return BertModel(config), token_ids()


def llama():
    from transformers import LlamaConfig, LlamaModel
    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=24)
    return LlamaModel(config), token_ids()


def gpt2():
    from transformers import GPT2Config, GPT2Model
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=8, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2Model(config), token_ids()


def encoder_layer(activation):
    def make():
        return (nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, activation=activation, batch_first=True),
                torch.randn(2, 5, 16))
    return make


# name: (builder, pairs fuse() must convert: every Linear -> activation of the model)
MODELS = {
    "torchvision_vit": (vit_torchvision, 2),
    "timm_vit": (vit_timm, 2),
    "timm_mixer": (mixer_timm, 4),
    "bert": (bert, 3),  # two intermediate layers (NewGELUActivation) and the pooler's Tanh
    "llama": (llama, 2),  # act_fn(gate_proj(x)) in each LlamaMLP
    "gpt2": (gpt2, 2),  # its Conv1D (a transposed Linear) and NewGELUActivation, as a FusedConv1D
    "encoder_layer_relu": (encoder_layer("relu"), 1),
    "encoder_layer_module": (encoder_layer(nn.GELU(approximate="tanh")), 1),
}


def model_output(model, x):
    """The model's output as one tensor (BERT's pooler output included, so its Linear -> Tanh gets a gradient)."""
    y = model(x)
    if isinstance(y, torch.Tensor):
        return y
    pooled = getattr(y, "pooler_output", None)
    return y[0] if pooled is None else torch.cat([y[0].flatten(), pooled.flatten()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", MODELS)
def test_real_models_convert_every_pair_and_compute_the_same(name, dtype):
    torch.manual_seed(0)
    model, x = MODELS[name][0]()
    model = model.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    fused = fusedlayers.fuse(model)
    assert sum(isinstance(m, FusedDense) for m in fused.modules()) == MODELS[name][1]
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for grad_mode in (True, False):  # training, and under no_grad alike: the fused op runs
        with torch.set_grad_enabled(grad_mode), torch.profiler.profile() as prof:
            y = model_output(fused, x)
        assert sum(e.name == "fusedlayers::dense" for e in prof.events()) == MODELS[name][1]
    y, y_ref = model_output(fused, x), model_output(model, x)
    assert_rel_close(y, y_ref, rtol, "output")
    weight = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    # All gradients as one vector: some are zero but for rounding (a bias before a LayerNorm), so their scale is
    # the model's largest gradient, not their own.
    grads = torch.autograd.grad((y * weight).sum(), list(fused.parameters()))
    grads_ref = torch.autograd.grad((y_ref * weight).sum(), list(model.parameters()))
    assert [g.shape for g in grads] == [g.shape for g in grads_ref]
    assert_rel_close(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads_ref]), rtol,
                     "parameter gradients")
    state = fused.state_dict()
    assert list(state) == list(model.state_dict())
    fresh, _ = MODELS[name][0]()
    fresh.to(dtype).load_state_dict(state, strict=True)
    assert_rel_close(model_output(fresh, x), y_ref, rtol, "the original class from the fused checkpoint")


@pytest.mark.parametrize("name", MODELS)
def test_real_models_compile(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = MODELS[name][0]()
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    fused = torch.compile(fusedlayers.fuse(model), backend="aot_eager")
    y, y_ref = model_output(fused, x), model_output(model, x)
    assert_rel_close(y, y_ref, 1e-10)
    grads = torch.autograd.grad(y.square().sum(), list(fused.parameters()))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(model.parameters()))
    assert_rel_close(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads_ref]), 1e-10)


# ---- forms a review found: fuse() must leave them (or compute exactly what they compute) --------------------

class RawL(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.L, self.act, self.out = nn.Linear(4, 5), act or nn.ReLU(), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.L(x))  # L's output raw


class CallsBase(RawL):
    def forward(self, x):  # the fusable form, plus the base's forward, which uses L raw
        h = self.L(x)
        y = self.act(h)
        return self.out(y) + super().forward(x)


class Patched(RawL):
    def forward(self, x):
        return self.out(self.act(self.L(x)))


Patched.forward = lambda self, x: self.out(self.act(self.L(x))) + self.out(self.L(x))  # replaced after its def


class Closure(RawL):
    def forward(self, x):
        get = lambda: h  # noqa: E731  (reads h after the activation)
        h = self.L(x)
        y = self.act(h)
        return self.out(y) + self.out(get())


class Keeps(RawL):
    def __init__(self):
        super().__init__()
        self.owner = [self]  # reaches L without naming it in forward

    def forward(self, x):
        return self.out(self.act(self.L(x))) + self.out(self.owner[0].L(x))


class Quick(nn.Module):
    """An activation of no known class (QuickGELU's form): never folded, whatever it computes."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MyLinear(nn.Module):
    """A weight + bias layer of the (out, in) layout whose weight is square and zero: not a transposed Linear."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(n, n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Adapter(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act = MyLinear(4), nn.GELU()

    def forward(self, x):
        return x + self.act(self.up(x))


class Parent(nn.Module):
    """Reaches into a fusable block: self.blk.L(x) would see the FusedDense."""

    def __init__(self):
        super().__init__()
        self.blk = Nested2()

    def forward(self, x):
        return self.blk(x) + self.blk.out(self.blk.L(x))


class Nested2(RawL):
    def forward(self, x):
        return self.out(self.act(self.L(x)))


class Counter(nn.Module):
    """A stateful module after a Linear: fuse() must not run it."""

    def __init__(self):
        super().__init__()
        self.step = 0

    def forward(self, x):
        self.step += 1
        return x * self.step


LEFT = {"calls_base": CallsBase, "patched": Patched, "closure": Closure, "keeps": Keeps,
        "unknown_activation": lambda: RawLAct(Quick()), "parent": Parent,
        "counter": lambda: nn.Sequential(nn.Linear(4, 4), Counter())}


class RawLAct(RawL):
    def forward(self, x):
        return self.out(self.act(self.L(x)))


@pytest.mark.parametrize("name", LEFT)
def test_forms_fuse_must_leave(name):
    torch.manual_seed(0)
    model = LEFT[name]().double()
    x = data()[0][:, :4]
    with pytest.warns(UserWarning, match="none was converted"):
        fused = fusedlayers.fuse(model)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    assert_rel_close(fused(x), model(x), 1e-10)
    if name == "counter":
        assert fused[1].step == 1 and model[1].step == 1


def test_square_weight_layer_is_not_taken_for_a_transposed_linear():
    torch.manual_seed(0)
    model = Adapter().double()
    fused = fusedlayers.fuse(model)  # no nn.Linear: nothing to warn about
    assert type(fused.up) is MyLinear and type(fused.act) is nn.GELU
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}  # a checkpoint loaded afterwards
    model.load_state_dict(state)
    fused.load_state_dict(state)
    x = data()[0][:, :4]
    assert_rel_close(fused(x), model(x), 1e-10)


@pytest.mark.parametrize("where", ["dense", "folded"])
def test_a_hook_that_removes_itself_mid_call(where):
    # The pair's decision is taken once per call: the FoldedActivation follows its FusedDense even after the
    # hook that made them run apart is gone.
    torch.manual_seed(0)
    model = chain()
    fused = fusedlayers.fuse(model)
    x = data(batch=5)[0][:, :4]
    handles = {}

    def hook(module, args, out=None):
        handles[id(module)].remove()

    for m in (model, fused):
        target = m[0] if where == "dense" else m[1]
        handles[id(target)] = target.register_forward_hook(hook)
    assert_rel_close(fused(x), model(x), 1e-10)
    assert_rel_close(fused(x), model(x), 1e-10)  # the hook gone: fused again


def test_a_block_whose_linear_has_a_hook_is_left(capsys):
    torch.manual_seed(0)
    block = TwoStep(5, 7).double()
    block.fc1.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(UserWarning, match="none was converted"):
        fused = fusedlayers.fuse(block, verbose=True)
    assert "left fc1" in capsys.readouterr().out and type(fused.fc1) is nn.Linear
    assert_rel_close(fused(data()[0]), block(data()[0]), 1e-10)
