"""fusedlayers/modules.py as drop-ins for the torch.nn modules they replace: what a user's existing code does to an
nn.Linear (pruning, weight_norm, parametrizations, torch.fx tracing, the `input=` keyword) gives the same tensors
on a FusedDense or FusedMLP, checked against the torch.nn original in float64."""
import pytest
import torch
import torch.fx
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.utils import parametrizations, prune
from torchvision.models.feature_extraction import create_feature_extractor

import fusedlayers
import fusedlayers.functional as FL
from fusedlayers import FusedCrossEntropyLoss, FusedDense, FusedLinearCrossEntropyLoss, FusedMLP

from conftest import assert_rel_close

TOL = 1e-10


def pair(activation="tanh", bias=True, seed=0):
    """A FusedDense and the equivalent nn.Linear + activation, with equal (not shared) float64 parameters."""
    torch.manual_seed(seed)
    fused = FusedDense(5, 4, bias=bias, activation=activation, dtype=torch.float64)
    linear = nn.Linear(5, 4, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(fused.weight)
        if bias:
            linear.bias.copy_(fused.bias)
    return fused, nn.Sequential(linear, nn.Tanh() if activation == "tanh" else nn.GELU())


def assert_same(fused, reference, x, params=None):
    """Outputs and the gradients w.r.t. the input and every parameter agree (in parameters() order, or in the order
    of params: (the fused module's, the reference's))."""
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [fused(xs[0]), reference(xs[1])]
    assert_rel_close(outs[0], outs[1], TOL, "output")
    params = params or (list(fused.parameters()), list(reference.parameters()))
    grads = [torch.autograd.grad(o.square().sum(), [xi, *p]) for o, xi, p in zip(outs, xs, params)]
    assert len(grads[0]) == len(grads[1])
    for i, (g, r) in enumerate(zip(*grads)):
        assert_rel_close(g, r, TOL, f"grad {i}")


def x_of(rows=3, features=5):
    return torch.randn(rows, features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_pruning_a_fused_dense_as_a_linear(name):
    fused, reference = pair()
    prune.l1_unstructured(fused, name, amount=0.5)
    prune.l1_unstructured(reference[0], name, amount=0.5)
    assert torch.equal(getattr(fused, name + "_mask"), getattr(reference[0], name + "_mask"))
    assert (getattr(fused, name) == 0).sum() > 0
    assert_same(fused, reference, x_of())
    prune.remove(fused, name)
    prune.remove(reference[0], name)
    assert_same(fused, reference, x_of())
    assert list(fused.state_dict()) == list(reference[0].state_dict())


def test_weight_norm_both_apis_as_a_linear():
    fused, reference = pair("gelu")
    parametrizations.weight_norm(fused)
    parametrizations.weight_norm(reference[0])
    assert_same(fused, reference, x_of())
    assert list(fused.state_dict()) == list(reference[0].state_dict())
    fused, reference = pair("gelu", seed=2)
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(fused)
        nn.utils.weight_norm(reference[0])
    assert_same(fused, reference, x_of())


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


class Doubled(nn.Module):
    def forward(self, b):
        return 2 * b


def test_register_parametrization_on_weight_and_bias():
    torch.manual_seed(0)
    fused = FusedDense(4, 4, activation="tanh", dtype=torch.float64)
    reference = nn.Sequential(nn.Linear(4, 4, dtype=torch.float64), nn.Tanh())
    reference[0].load_state_dict(fused.state_dict())
    for m in (fused, reference[0]):
        parametrize.register_parametrization(m, "weight", Symmetric())
        parametrize.register_parametrization(m, "bias", Doubled())
    assert torch.equal(fused.weight, fused.weight.T)
    assert_same(fused, reference, x_of(features=4))
    with parametrize.cached():
        assert_same(fused, reference, x_of(features=4))


def test_fused_mlp_parametrized_and_pruned_layers_as_the_sequential():
    torch.manual_seed(0)
    net = FusedMLP([4, 4, 3], activation="tanh", dtype=torch.float64).unflatten()  # per-layer Parameters
    reference = net.to_sequential()  # Linear, Tanh, Linear with copies of the parameters
    parametrize.register_parametrization(net, "weight0", Symmetric())
    parametrize.register_parametrization(reference[0], "weight", Symmetric())
    prune.l1_unstructured(net, "bias1", amount=0.5)
    prune.l1_unstructured(reference[2], "bias", amount=0.5)
    assert sorted(name for name, _ in net.named_parameters()) == [
        "bias0", "bias1_orig", "parametrizations.weight0.original", "weight1"]
    assert_same(net, reference, x_of(features=4), (
        [net.parametrizations.weight0.original, net.bias0, net.weight1, net.bias1_orig],
        [reference[0].parametrizations.weight.original, reference[0].bias, reference[2].weight, reference[2].bias_orig]))


def test_input_keyword_as_torch_nn():
    x = x_of()
    fused, reference = pair()
    assert_rel_close(fused(input=x), reference[1](reference[0](input=x)), TOL)
    net = FusedMLP([5, 3], activation="tanh", dtype=torch.float64)
    assert_rel_close(net(input=x), net(x), 0)


def trace_and_compare(module, *args):
    traced = torch.fx.symbolic_trace(module)
    assert any(node.op == "call_function" and "fusedlayers" in node.target.__module__ for node in traced.graph.nodes)
    want = module(*args)
    got = traced(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
    return traced


def test_symbolic_trace_of_every_module():
    torch.manual_seed(0)
    x = x_of()
    trace_and_compare(FusedDense(5, 4, activation="gelu", dtype=torch.float64), x)
    trace_and_compare(FusedMLP([5, 6, 2], activation="silu", dtype=torch.float64), x)
    target = torch.tensor([0, 3, 1])
    trace_and_compare(FusedCrossEntropyLoss(label_smoothing=0.1), torch.randn(3, 4, dtype=torch.float64), target)
    trace_and_compare(FusedLinearCrossEntropyLoss(5, 4, dtype=torch.float64), x, target)
    seq = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    traced = trace_and_compare(fusedlayers.fuse(seq), x)  # a FusedSequential's one mlp op call
    assert sum(node.target is FL.mlp_op for node in traced.graph.nodes) == 1


def test_symbolic_trace_of_the_functional_forms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))

        def forward(self, x, t):
            return FL.cross_entropy(FL.mlp(FL.dense(x, self.w, None, "tanh"), [self.w[:, :4]], None, "relu"), t)

    net = Net()
    trace_and_compare(net, x_of(), torch.tensor([0, 1, 2]))


def test_feature_extractor_of_a_model_with_fused_layers():
    torch.manual_seed(0)
    model = nn.Sequential(FusedDense(5, 6, activation="tanh"), nn.Dropout(0.0), FusedMLP([6, 6, 3])).double()
    extractor = create_feature_extractor(model, {"0": "hidden", "2": "out"})
    features = extractor(x_of())
    assert torch.equal(features["hidden"], model[0](x_of()))
    assert torch.equal(features["out"], model(x_of()))


def test_k_dimensional_class_weight_messages_name_the_weight():
    x, t = torch.randn(4, 3, 2), torch.randint(0, 3, (4, 2))
    with pytest.raises(RuntimeError, match=r"cross_entropy\(\): expected weight of shape \(3,\)"):
        FL.cross_entropy(x, t, torch.rand(3, 2))
    with pytest.raises(RuntimeError, match=r"expected class_weight of shape \(3,\) \(one per class\), got shape \[3, 2\]"):
        FL.linear_cross_entropy(torch.randn(4, 2, 5), torch.randn(3, 5), t, class_weight=torch.rand(3, 2))
