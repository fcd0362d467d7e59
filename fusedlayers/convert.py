"""fuse(model): an existing model's layers swapped for their fused equivalents in one call.

Every nn.Linear whose output the model's code passes straight to an activation becomes a FusedDense in the
Linear's place, and the activation a FoldedActivation, a parameter-free identity: Parameters and state_dict keys
stay as they were, so a checkpoint of the original loads into the fused model and back. Two places are searched:
  - sequential containers (an nn.Sequential, or a subclass that keeps nn.Sequential.forward): a Linear directly
    followed by an activation module. Where one mlp op call is faster than layer by layer (mlp_is_faster), an
    nn.Sequential becomes a FusedSequential: the same children, each such run of layers computed by one op call.
  - any other module, by reading its class's source (inspect and ast; nothing is run): a Linear child `self.L`
    whose one call in the whole class is the argument of the one call of an activation `self.A`, either nested,
    `self.A(self.L(x))`, or in straight-line code, `h = self.L(x)` and the next use of h is `self.A(h)` (and h is
    never read again). That covers the MLP blocks of timm, transformers (BERT, Llama's gate, ...) and
    nn.TransformerEncoderLayer without a list of class names: what the code does decides, and whatever cannot be
    proved (a second call of L or A, a use of L's output in a branch, no source) is left as it is.
An activation is a module or a function attribute (TransformerEncoderLayer's self.activation) that computes one
of the fused table's functions: torch's modules with their default parameters, torch's functions
(ACTIVATION_FUNCTIONS), and the classes of other libraries named in KNOWN_ACTIVATIONS, each checked on float64
points before it is folded; GPT-2's Conv1D (TRANSPOSED_LINEARS) takes a Linear's place. Every
nn.CrossEntropyLoss becomes a FusedCrossEntropyLoss
with the same options. Hooks are honoured when the layers run, not only when fuse() looks: while a FusedDense or
its FoldedActivation has any hook (or a global module hook is registered), the pair computes the Linear and the
activation apart, so each hook sees the tensors the original modules gave it.
"""
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import functional as FL
from .activations import REFERENCE, name_of_module
from .convert_source import forget as forget_sources
from .convert_source import source as read_source
from .modules import FusedCrossEntropyLoss, FusedDense, weight_and_bias


def mlp_is_faster(sizes: list[int]) -> bool:
    """Whether one mlp op call beats a FusedDense module per layer, forward and backward, for a run of layers
    with these widths ([in, h1, ..., out]). Measured on the CPU (one thread, float32, batch 1 to 1024, widths
    2 to 784; ratio of the 10th percentiles, interleaved): the op was 1.03x to 3.6x faster for every run of
    two or more layers. Narrow ones (widths <= 32, few multiply-adds) take the op's fused path; wider ones go
    through the same dense kernels as FusedDense, but with one autograd node and one call for the whole run."""
    return len(sizes) >= 3


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether a hook for every module is registered (torch.nn.modules.module.register_module_forward_hook...)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


class FoldedActivation(nn.Module):
    """The place of an activation whose function the FusedDense before it (its `dense`) now applies: the identity,
    with no parameters, so the container's indices and state_dict keys stay those of the original. While either
    module has hooks, the two run apart (the FusedDense its linear part, this the activation), so every hook sees
    what the original modules gave it."""

    _dense = None  # the FusedDense that applies this activation, set by fuse() (not a child: keys stay the same)
    _apart = False  # whether that FusedDense's last call left the activation to this module

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.activation = activation

    def runs_apart(self) -> bool:
        dense = self._dense
        return dense is not None and (_has_hooks(self) or _has_hooks(dense) or _global_hooks())

    def forward(self, input: Tensor) -> Tensor:
        return REFERENCE[self.activation].f(input) if self._apart else input

    def extra_repr(self) -> str:
        return f"{self.activation!r}, applied by the FusedDense before it"


class FusedConv1D(FusedDense):
    """A FusedDense in the place of a layer that computes input @ weight + bias with weight (in_features,
    out_features) (transformers' Conv1D, GPT-2's MLP): the same Parameters, keys and shapes, read transposed."""

    _transposed = True

    @classmethod
    def from_conv1d(cls, layer: nn.Module, activation: str) -> "FusedConv1D":
        weight, bias = layer.weight, layer.bias
        fused = cls(weight.shape[0], weight.shape[1], bias=bias is not None, activation=activation, device="meta")
        fused.weight, fused.bias = weight, bias
        return fused


# Layers of other libraries that compute input @ weight + bias with weight stored (in_features, out_features), by
# qualified class name: what their forward does cannot be told from their Parameters (a square weight fits either
# layout), so each is named here. Add one with its module path and class name.
TRANSPOSED_LINEARS = frozenset({"transformers.pytorch_utils.Conv1D"})


def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _linear_kind(module: nn.Module) -> str | None:
    """"linear" for an nn.Linear (its subclasses are left: their forward or other methods may differ),
    "transposed" for a layer of TRANSPOSED_LINEARS with a (in, out) weight and an (out,) bias; else None."""
    if type(module) is nn.Linear:
        return "linear"
    if _qualname(module) not in TRANSPOSED_LINEARS:
        return None
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if weight is None or weight.dim() != 2 or bias is None or tuple(bias.shape) != (weight.shape[1],):
        return None
    return "transposed"


def _fold(linear: nn.Module, activation: str, replaced: nn.Module | None) -> tuple[FusedDense, FoldedActivation]:
    """The FusedDense that takes linear's place (sharing its Parameters) and the FoldedActivation that takes the
    activation's, each knowing the other (plain attributes, not children)."""
    dense = (FusedDense.from_linear(linear, activation) if type(linear) is nn.Linear
             else FusedConv1D.from_conv1d(linear, activation)).train(linear.training)
    folded = FoldedActivation(activation).train(linear.training if replaced is None else replaced.training)
    dense.__dict__["_folded"] = folded
    folded.__dict__["_dense"] = dense
    return dense, folded


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose runs of FusedDense layers (with the FoldedActivation after each, and maybe a
    final bare nn.Linear) run as one mlp op call each: one autograd node per run instead of one per layer.
    The children are unchanged, each one alone still computes what it did, and so are the state_dict keys.
    fuse() makes these; a container edited afterwards (a child replaced, added or removed) runs its children
    one by one, as an nn.Sequential, and so does a run while any of its modules has a hook."""

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
        i, hooks = 0, _global_hooks()
        for first, last, activations in self._mlp_runs:
            run = children[first:last + 1]
            if hooks or any(_has_hooks(m) for m in run):
                continue  # computed below, module by module
            for module in children[i:first]:
                input = module(input)
            layers = run[::2]
            head = layers[0]
            params = [weight_and_bias(m) for m in layers]
            biases = [b for _, b in params] if head.bias is not None else []
            input = FL.mlp_op(input, [w for w, _ in params], biases, activations, FL.saves_preact(head.save),
                              FL.backend_for(head.backend, input))
            i = last + 1
        for module in children[i:]:
            input = module(input)
        return input


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not _has_hooks(module)


# Activations of other libraries, by qualified class name -> the fused table's name; fuse() checks each against the
# table's function on float64 points before folding it (within 1e-10 relative; FastGELU's rounded sqrt(2/pi) is
# 4e-12 off). torch.nn's own modules are matched exactly, by class and parameters (fusedlayers/activations.py).
KNOWN_ACTIVATIONS = {
    "transformers.activations.GELUActivation": "gelu",
    "transformers.activations.NewGELUActivation": "gelu_tanh",
    "transformers.activations.GELUTanh": "gelu_tanh",
    "transformers.activations.PytorchGELUTanh": "gelu_tanh",
    "transformers.activations.FastGELUActivation": "gelu_tanh",
    "transformers.activations.SiLUActivation": "silu",
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.Swish": "silu",
    "timm.layers.activations.Sigmoid": "sigmoid",
    "timm.layers.activations.Tanh": "tanh",
}
# Functions a module may store as its activation (nn.TransformerEncoderLayer's self.activation), called with one
# tensor: these compute the table's functions with torch's defaults.
ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu", torch.tanh: "tanh",
                        F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.elu: "elu",
                        F.selu: "selu", torch.selu: "selu", F.softplus: "softplus", F.leaky_relu: "leaky_relu",
                        torch.cos: "cos", torch.sin: "sin"}

_PROBE = torch.cat([torch.linspace(-20.0, 20.0, 4001, dtype=torch.float64),
                    torch.tensor([-1e3, -100.0, -50.0, -30.0, 30.0, 50.0, 100.0, 1e3], dtype=torch.float64)])


def _computes(module: nn.Module, name: str) -> bool:
    """Whether module computes the table's function `name` on _PROBE, elementwise, within 1e-10 relative."""
    z = _PROBE.clone()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            y, y2 = module(z.clone()), module(z.clone().view(19, -1))
    except Exception:  # noqa: BLE001  (not a function of one tensor)
        return False
    return (isinstance(y, Tensor) and isinstance(y2, Tensor) and y.shape == z.shape and y.dtype == z.dtype
            and torch.equal(y2.reshape(-1), y)
            and bool(((y - REFERENCE[name].f(z)).abs() <= 1e-10 * (1 + z.abs())).all()))


def _activation_name(act) -> tuple[str | None, str]:
    """(the table's name for an activation module or function fuse() may fold, else None; why not)."""
    if not isinstance(act, nn.Module):
        name = ACTIVATION_FUNCTIONS.get(act) if callable(act) else None
        return (name, "") if name else (None, f"{act!r} is none of the fused activations' functions")
    if _has_hooks(act):
        return None, f"{act!r} has hooks"
    try:
        name = name_of_module(act)
        return (None, "nn.Identity is no activation") if name == "identity" else (name, "")
    except ValueError:
        pass
    name = KNOWN_ACTIVATIONS.get(_qualname(act))
    if name is None:
        return None, f"{act!r} is none of the fused activations (convert.KNOWN_ACTIVATIONS names other libraries')"
    if next(act.parameters(), None) is not None or next(act.buffers(), None) is not None or act._modules \
            or not _computes(act, name):
        return None, f"{act!r} does not compute {name} as its class is known to"
    return name, ""


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


class _Report:
    """What fuse() did and saw: printed as it goes with verbose=True; counted for the warning."""

    def __init__(self, verbose: bool) -> None:
        self.verbose, self.converted = verbose, 0

    def swapped(self, line: str) -> None:
        self.converted += 1
        if self.verbose:
            print(f"fuse: {line}")

    def left(self, what: str, reason: str) -> None:
        if self.verbose:
            print(f"fuse: left {what}: {reason}")


def _fuse_pairs(seq: nn.Sequential, prefix: str, report: _Report) -> None:
    names, children = list(seq._modules), list(seq._modules.values())
    i = 0
    while i < len(children):
        linear = children[i]
        if type(linear) is not nn.Linear:
            i += 1
            continue
        where = f"{prefix}{names[i]} {linear!r}"
        if _has_hooks(linear):
            report.left(where, "it has hooks")
            i += 1
            continue
        if i + 1 == len(children):
            break
        activation = children[i + 1]
        name, why = _activation_name(activation)
        if name is None:
            if not isinstance(activation, nn.Linear):
                report.left(f"{where} + {prefix}{names[i + 1]}", why)
            i += 1
            continue
        seq._modules[names[i]], seq._modules[names[i + 1]] = _fold(linear, name, activation)
        report.swapped(f"{where} + {prefix}{names[i + 1]} {activation!r} -> {seq._modules[names[i]]!r}")
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


# ---- modules with a forward of their own: what their class's source proves (fusedlayers/convert_source.py)


def _reached_from_above(ancestors: list[tuple[nn.Module, list[str]]], names: tuple[str, ...]) -> str | None:
    """An ancestor whose code names one of `names` inside the block (self.blk.fc1 from the block's parent): that
    code would see the fused module; ancestors: (module, the path from it to the block)."""
    for ancestor, path in ancestors:
        if isinstance(ancestor, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and type(ancestor).__module__.startswith(
                "torch.nn."):
            continue
        try:
            source = read_source(type(ancestor), strict=False)
        except Exception:  # noqa: BLE001  (no source: nothing named inside can be seen; torch's containers above)
            return f"the source of {type(ancestor).__name__}, which holds the block, cannot be read"
        for chain in source.chains():
            if chain[:len(path)] == path and len(chain) > len(path) and chain[len(path)] in names:
                return f"{type(ancestor).__name__} reaches self.{'.'.join(chain[:len(path) + 1])}"
    return None


def _fuse_block(module: nn.Module, prefix: str, ancestors: list, report: _Report) -> None:
    """Linear -> activation pairs in a module with a forward of its own, from its class's source."""
    linears = [name for name, child in module._modules.items() if _linear_kind(child) is not None]
    if not linears:
        return
    try:
        source = read_source(type(module))
    except Exception as e:  # noqa: BLE001  (read_source's: no source, or source that is not the class)
        report.left(f"{prefix}{', '.join(linears)}", f"the source of {type(module).__name__} cannot be read or "
                    f"does not match the class ({e})")
        return
    if "forward" in module.__dict__ or source.reflective:
        why = "its forward is replaced on the instance" if "forward" in module.__dict__ else source.reflective[0]
        report.left(f"{prefix}{', '.join(linears)}", f"{type(module).__name__}: {why}")
        return
    for name in linears:
        linear, where = module._modules[name], f"{prefix}{name} {module._modules[name]!r}"
        if _has_hooks(linear):
            report.left(where, "it has hooks")
            continue
        call, why = source.only_call(name)
        act_name, why = source.activation_of(call) if call is not None else (None, why)
        if act_name is not None and source.only_call(act_name)[0] is None:
            act_name, why = None, source.only_call(act_name)[1]
        if act_name is not None:
            above = _reached_from_above(ancestors, (name, act_name))
            if above is not None:
                act_name, why = None, above
        if act_name is None:
            report.left(where, why)
            continue
        act = module._modules[act_name] if act_name in module._modules else module.__dict__.get(act_name)
        if act is None:
            report.left(where, f"self.{act_name} is neither a child module nor a function stored on the instance")
            continue
        activation, why = _activation_name(act)
        if activation is None:
            report.left(where, why)
            continue
        dense, folded = _fold(linear, activation, act if isinstance(act, nn.Module) else None)
        module._modules[name] = dense
        module.__dict__.pop(act_name, None)
        module._modules[act_name] = folded
        report.swapped(f"{where} + {prefix}{act_name} {act!r} -> {dense!r}")


def _fused_cross_entropy(loss: nn.CrossEntropyLoss) -> nn.Module:
    fused = FusedCrossEntropyLoss(weight=loss.weight, ignore_index=loss.ignore_index, reduction=loss.reduction,
                                  label_smoothing=loss.label_smoothing)
    return fused.train(loss.training)


def fuse(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """The model with its layers swapped for fused ones, computing the same function with the same state_dict
    keys (see the module docstring for what is swapped and how fuse() decides). A copy (deep) unless inplace;
    use the returned module either way (a model that is itself an nn.CrossEntropyLoss is replaced). verbose
    prints one line per replacement and one per Linear left as it is, with the reason. Activations with other
    parameters than the fused table's (a LeakyReLU slope other than 0.01, say), modules with hooks, and
    subclasses of nn.Linear are left as they are; a warning says so when the model has nn.Linear layers and
    none was converted. The fused modules take the Linear's Parameters (the same tensors when inplace), so
    devices, dtypes and requires_grad are kept."""
    if not inplace:
        model = copy.deepcopy(model)
    report = _Report(verbose)
    if type(model) is nn.CrossEntropyLoss and not _has_hooks(model):
        fused = _fused_cross_entropy(model)
        report.swapped(f"{model!r} -> {fused!r}")
        return fused
    linears = sum(_linear_kind(m) is not None for m in model.modules())
    forget_sources()
    modules = dict(model.named_modules())
    for prefix, module in list(modules.items()):
        path = prefix.split(".") if prefix else []
        ancestors = [(modules[".".join(path[:i])], path[i:]) for i in range(len(path))]
        prefix = prefix + "." if prefix else ""
        for name, child in list(module._modules.items()):
            if type(child) is nn.CrossEntropyLoss and not _has_hooks(child):
                fused = _fused_cross_entropy(child)
                module._modules[name] = fused
                report.swapped(f"{prefix}{name} {child!r} -> {fused!r}")
        if _is_sequential(module):
            _fuse_pairs(module, prefix, report)
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
        elif not type(module).__module__.startswith("fusedlayers."):
            _fuse_block(module, prefix, ancestors, report)
    if linears and not report.converted and not any(type(m) is FoldedActivation for m in model.modules()):
        warnings.warn(f"fuse(): the model has {linears} nn.Linear layers and none was converted "
                      f"(fuse(model, verbose=True) says why)", stacklevel=2)
    return model
