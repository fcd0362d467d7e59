"""fuse(model): an existing model's layers swapped for their fused equivalents in one call.

Inside every sequential container (an nn.Sequential, or a subclass that keeps nn.Sequential.forward), each
nn.Linear directly followed by an activation module of the fused table becomes a FusedDense in the Linear's
place and a FoldedActivation, a parameter-free identity, in the activation's place: indices, Parameters and
state_dict keys stay as they were, so a checkpoint of the original loads into the fused model and back.
Where one mlp op call is faster than layer by layer (mlp_is_faster), an nn.Sequential becomes a
FusedSequential: the same children, and so the same keys, with each such run of layers computed by one mlp
op call. Every nn.CrossEntropyLoss becomes a FusedCrossEntropyLoss with the same options.
"""
import copy

from torch import Tensor, nn

from . import functional as FL
from .activations import name_of_module
from .modules import FusedCrossEntropyLoss, FusedDense


def mlp_is_faster(sizes: list[int]) -> bool:
    """Whether one mlp op call beats a FusedDense module per layer, forward and backward, for a run of layers
    with these widths ([in, h1, ..., out]). Measured on the CPU (one thread, float32, batch 1 to 1024, widths
    2 to 784; ratio of the 10th percentiles, interleaved): the op was 1.03x to 3.6x faster for every run of
    two or more layers. Narrow ones (widths <= 32, few multiply-adds) take the op's fused path; wider ones go
    through the same dense kernels as FusedDense, but with one autograd node and one call for the whole run."""
    return len(sizes) >= 3


class FoldedActivation(nn.Module):
    """The place of an activation module whose function the FusedDense before it now applies: the identity,
    with no parameters, so the container's indices and state_dict keys stay those of the original."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return input

    def extra_repr(self) -> str:
        return f"{self.activation!r}, applied by the FusedDense before it"


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose runs of FusedDense layers (with the FoldedActivation after each, and maybe a
    final bare nn.Linear) run as one mlp op call each: one autograd node per run instead of one per layer.
    The children are unchanged, each one alone still computes what it did, and so are the state_dict keys.
    fuse() makes these; a container edited afterwards (a child replaced, added or removed) runs its children
    one by one, as an nn.Sequential."""

    # Set by fuse(): the children when it ran, and the runs as (first, last, activations): children first to
    # last (inclusive) are FusedDense, FoldedActivation pairs, maybe then a plain nn.Linear, so the layers are
    # children[first:last + 1:2]. Plain values, so that torch.load(weights_only=True) needs no extra class.
    # A FusedSequential fuse() did not make (a slice, say) has none: it runs its children one by one.
    _fused_children: tuple[nn.Module, ...] = ()
    _mlp_runs: list[tuple[int, int, list[str]]] = []

    def forward(self, input: Tensor) -> Tensor:
        children = tuple(self._modules.values())
        if children != self._fused_children:
            return super().forward(input)
        i = 0
        for first, last, activations in self._mlp_runs:
            for module in children[i:first]:
                input = module(input)
            layers = children[first:last + 1:2]
            head = layers[0]
            weights = [m._parameters["weight"] for m in layers]
            biases = [m._parameters["bias"] for m in layers] if head.bias is not None else []
            input = FL.mlp_op(input, weights, biases, activations, FL.saves_preact(head.save),
                              FL.backend_for(head.backend, input))
            i = last + 1
        for module in children[i:]:
            input = module(input)
        return input


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not _has_hooks(module)


def _activation_name(module: nn.Module) -> str | None:
    """The table's name for an activation module fuse() may fold, else None (unknown, other parameters,
    nn.Identity, or hooks that would no longer run)."""
    if _has_hooks(module):
        return None
    try:
        name = name_of_module(module)
    except ValueError:
        return None
    return None if name == "identity" else name


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fuse_pairs(seq: nn.Sequential, prefix: str, verbose: bool) -> None:
    names, children = list(seq._modules), list(seq._modules.values())
    i = 0
    while i + 1 < len(children):
        linear, activation = children[i], children[i + 1]
        name = _activation_name(activation) if _plain_linear(linear) else None
        if name is None:
            i += 1
            continue
        fused = FusedDense.from_linear(linear, name).train(linear.training)
        seq._modules[names[i]] = fused
        seq._modules[names[i + 1]] = FoldedActivation(name).train(activation.training)
        if verbose:
            print(f"fuse: {prefix}{names[i]} {linear!r} + {prefix}{names[i + 1]} {activation!r} -> {fused!r}")
        i += 2


def _mlp_runs(seq: nn.Sequential) -> list[tuple[int, int, list[str]]]:
    """The runs of fused layers in seq that mlp_is_faster picks: FusedDense, FoldedActivation pairs, each
    layer's output the next one's input, all with a bias or all without, and maybe a final plain nn.Linear."""
    children = list(seq._modules.values())
    runs, i = [], 0
    while i < len(children):
        j, layers = i, []
        while (j + 1 < len(children) and type(children[j]) is FusedDense and not _has_hooks(children[j])
               and type(children[j + 1]) is FoldedActivation and not _has_hooks(children[j + 1])
               and (not layers or _chains(layers[-1], children[j]))):
            layers.append(children[j])
            j += 2
        if layers and j < len(children) and _plain_linear(children[j]) and _chains(layers[-1], children[j]):
            layers.append(children[j])
            j += 1
        sizes = [layers[0].in_features] + [m.out_features for m in layers] if layers else []
        if layers and mlp_is_faster(sizes):
            runs.append((i, j - 1, [m.activation if type(m) is FusedDense else "identity" for m in layers]))
            i = j
        else:
            i = max(j, i + 1)
    return runs


def _chains(a: nn.Module, b: nn.Module) -> bool:
    return a.out_features == b.in_features and (a.bias is None) == (b.bias is None)


def _fused_cross_entropy(loss: nn.CrossEntropyLoss) -> nn.Module:
    fused = FusedCrossEntropyLoss(weight=loss.weight, ignore_index=loss.ignore_index, reduction=loss.reduction,
                                  label_smoothing=loss.label_smoothing)
    return fused.train(loss.training)


def fuse(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """The model with its layers swapped for fused ones, computing the same function with the same state_dict
    keys (see the module docstring for what is swapped). A copy (deep) unless inplace; use the returned module
    either way (a model that is itself an nn.CrossEntropyLoss is replaced). verbose prints one line per
    replacement. Activation modules with other parameters than the fused table's (a LeakyReLU slope other
    than 0.01, say), modules with hooks, and subclasses of nn.Linear or of containers with a forward of their
    own are left as they are. The fused modules take the Linear's Parameters (the same tensors when inplace),
    so devices, dtypes and requires_grad are kept."""
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) is nn.CrossEntropyLoss and not _has_hooks(model):
        fused = _fused_cross_entropy(model)
        if verbose:
            print(f"fuse: {model!r} -> {fused!r}")
        return fused
    for prefix, module in list(model.named_modules()):
        prefix = prefix + "." if prefix else ""
        for name, child in list(module._modules.items()):
            if type(child) is nn.CrossEntropyLoss and not _has_hooks(child):
                fused = _fused_cross_entropy(child)
                module._modules[name] = fused
                if verbose:
                    print(f"fuse: {prefix}{name} {child!r} -> {fused!r}")
        if _is_sequential(module):
            _fuse_pairs(module, prefix, verbose)
            runs = _mlp_runs(module) if type(module) is nn.Sequential else []
            if runs:
                module.__class__ = FusedSequential
                module._mlp_runs = runs
                module._fused_children = tuple(module._modules.values())
                names, children = list(module._modules), list(module._modules.values())
                for first, last, _ in runs if verbose else ():
                    layers = children[first:last + 1:2]
                    sizes = [layers[0].in_features] + [m.out_features for m in layers]
                    print(f"fuse: {prefix}{names[first]} to {prefix}{names[last]} -> one mlp op, sizes {sizes}")
    return model
