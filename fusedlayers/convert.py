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
of the fused table's functions: torch's modules with their default parameters, or any parameter-free module or
function that equals a table function within 1e-9 relative on float64 points in [-1000, 1000] (transformers'
GELUActivation and NewGELUActivation, timm's GELU). Every nn.CrossEntropyLoss becomes a FusedCrossEntropyLoss
with the same options. Hooks are honoured when the layers run, not only when fuse() looks: while a FusedDense or
its FoldedActivation has any hook (or a global module hook is registered), the pair computes the Linear and the
activation apart, so each hook sees the tensors the original modules gave it.
"""
import ast
import copy
import inspect
import textwrap
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import functional as FL
from .activations import REFERENCE, name_of_module
from .modules import FusedCrossEntropyLoss, FusedDense


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


def _weight_and_bias(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    params = layer._parameters  # direct, as FusedDense.forward, unless a parametrization has moved them
    try:
        return params["weight"], params["bias"]
    except KeyError:
        return layer.weight, layer.bias


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
            params = [_weight_and_bias(m) for m in layers]
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


# ---- modules with a forward of their own: what their class's source proves about a Linear and its activation

# Attributes of a Linear that code may read without calling it (TransformerEncoderLayer's fast path reads these).
_LINEAR_READS = frozenset({"weight", "bias", "in_features", "out_features"})
# Attributes of a module that reach its children without naming them (self[0], self.children(), ...).
_REFLECTIVE = frozenset({"children", "named_children", "modules", "named_modules", "_modules", "__dict__",
                         "__getattr__", "__getattribute__", "get_submodule", "apply", "_apply", "__getitem__",
                         "__iter__", "_call_impl", "_wrapped_call_impl"})
# ... of which torch.nn's own classes use these only to read hooks (TransformerEncoderLayer's fast-path check).
_TORCH_NN_READS = frozenset({"modules", "named_modules"})
# Names whose call reads or runs a method's locals or a module's attributes by name.
_DYNAMIC = frozenset({"locals", "vars", "eval", "exec", "globals", "getattr", "setattr", "delattr"})
# Expressions that, between an activation's call and the statement holding it, never skip evaluating it.
_ALWAYS_EVALUATED = (ast.Call, ast.BinOp, ast.UnaryOp, ast.Tuple, ast.List, ast.keyword, ast.Starred,
                     ast.Attribute, ast.Subscript, ast.Expr, ast.Assign, ast.AnnAssign, ast.Return)
_SCOPES = (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ListComp, ast.SetComp, ast.DictComp,
           ast.GeneratorExp)
_SETUP = ("__init__", "__setstate__")  # run before fuse(): only what they leave behind (closures, aliases) counts


def _class_methods(klass: type, strict: bool) -> list[ast.FunctionDef]:
    """The methods of klass's own body as syntax trees, checked against what the class really holds: every
    function in klass.__dict__ must be the def of its name in the source (not replaced afterwards, not defined
    twice, not swapped for a wrapper by a decorator: torch.jit.ignore returns the function itself); else
    ValueError. Not strict: the source as it is (for the modules above a block, searched for names only)."""
    lines, start = inspect.getsourcelines(klass)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    defs = {node.name: node for node in tree.body[0].body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for name, value in vars(klass).items() if strict else ():
        funcs = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [
            getattr(value, "__func__", value)]
        for f in funcs:
            if f is None or not (inspect.isfunction(f) or inspect.ismethod(f)):
                continue
            node = defs.get(f.__name__)
            first = node and (node.decorator_list[0].lineno if node.decorator_list else node.lineno)
            if node is None or hasattr(f, "__wrapped__") or f.__code__.co_name != node.name \
                    or f.__code__.co_firstlineno != start + first - 1:
                raise ValueError(f"{klass.__name__}.{name} is not the def its source shows (replaced, wrapped by a "
                                 f"decorator, or defined twice)")
    return list(defs.values())


class _Source:
    """The methods of a module's class and of every base but nn.Module (overridden ones too: super() reaches them)
    as syntax trees, every use of `self.<name>` in them, and the uses of self that reach children unnamed."""

    def __init__(self, cls: type, strict: bool = True) -> None:
        torch_nn = cls.__module__.startswith("torch.nn.")
        self.parent: dict[ast.AST, ast.AST] = {}
        self.uses: dict[str, list[ast.Attribute]] = {}
        self.method_of: dict[ast.AST, ast.FunctionDef] = {}
        self.this: dict[ast.FunctionDef, str] = {}
        self.reflective: list[str] = []
        for klass in cls.__mro__:
            if klass in (object, nn.Module):
                continue
            for method in _class_methods(klass, strict):
                self._read(method, torch_nn)

    def _read(self, method: ast.FunctionDef, torch_nn: bool) -> None:
        for node in ast.walk(method):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        if not method.args.args:
            return
        this = self.this[method] = method.args.args[0].arg
        setup = method.name in _SETUP
        for node in ast.walk(method):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
                up = self.parent[node]
                if isinstance(up, ast.Attribute) and up.attr in _REFLECTIVE:
                    self.reflective.append(f"{method.name}() uses super().{up.attr}")
            if not (isinstance(node, ast.Name) and node.id == this) or node is method.args.args[0]:
                continue
            up = self.parent[node]
            nested = any(isinstance(a, _SCOPES) for a in self._ancestors(node, method))
            if setup and not nested:
                if isinstance(up, ast.Attribute) or _is_super_or_init_call(up, node):
                    continue  # construction itself: gone once fuse() runs
                self.reflective.append(f"{method.name}() keeps {ast.unparse(up)}")
            elif not isinstance(up, ast.Attribute):
                if not _is_super_or_init_call(up, node):
                    self.reflective.append(f"{method.name}() uses {ast.unparse(up)}")
            elif up.attr in _REFLECTIVE and not (torch_nn and up.attr in _TORCH_NN_READS):
                self.reflective.append(f"{method.name}() uses {ast.unparse(up)}")
            elif isinstance(up.ctx, ast.Load) or not setup:
                self.uses.setdefault(up.attr, []).append(up)
                self.method_of[up] = method

    def _ancestors(self, node: ast.AST, stop: ast.AST):
        """The nodes enclosing node inside stop (stop itself left out)."""
        node = self.parent[node]
        while node is not stop:
            yield node
            node = self.parent[node]

    def chains(self) -> list[list[str]]:
        """Every attribute chain read from self (self.blk.fc1.weight -> ["blk", "fc1", "weight"])."""
        out = []
        for uses in self.uses.values():
            for use in uses:
                chain, node = [use.attr], use
                while isinstance(self.parent.get(node), ast.Attribute):
                    node = self.parent[node]
                    chain.append(node.attr)
                out.append(chain)
        return out

    def only_call(self, name: str) -> tuple[ast.Call | None, str]:
        """The one call `self.<name>(x)` in the class (one positional argument, nothing else), where every other
        use only reads a Linear's attributes (_LINEAR_READS); else None and why."""
        calls, others = [], []
        for use in self.uses.get(name, []):
            up = self.parent[use]
            if isinstance(up, ast.Call) and up.func is use:
                calls.append(up)
            elif not (isinstance(use.ctx, ast.Load) and isinstance(up, ast.Attribute) and up.attr in _LINEAR_READS):
                others.append(use)
        if len(calls) != 1 or others:
            return None, f"self.{name} is used {len(calls)} times as a call and {len(others)} times otherwise"
        call = calls[0]
        if len(call.args) != 1 or call.keywords or isinstance(call.args[0], ast.Starred):
            return None, f"self.{name} is called with other arguments than one tensor"
        return call, ""

    def activation_of(self, call: ast.Call) -> tuple[str | None, str]:
        """The attribute name A when the value of `call` (self.L(x)) always goes to `self.A(...)` and nowhere
        else: self.A(self.L(x)), or in the top-level, straight-line statements of its method `h = self.L(x)`
        with the next use of h being `self.A(h)` and h read nowhere after it, nor in a nested scope."""
        up, method = self.parent[call], self.method_of[call.func]
        this = self.this[method]
        if _is_self_call(up, call, this):
            return up.func.attr, ""
        if not (isinstance(up, ast.Assign) and up.value is call and len(up.targets) == 1
                and isinstance(up.targets[0], ast.Name) and up in method.body):
            return None, "its output is not assigned to a name at the top level of the method"
        h = up.targets[0].id
        for node in ast.walk(method):
            if isinstance(node, ast.Name) and node.id == h and any(
                    isinstance(a, _SCOPES) for a in self._ancestors(node, method)):
                return None, f"{h} is also used in a nested scope (lambda, comprehension, def)"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DYNAMIC:
                return None, f"{method.name}() calls {node.func.id}()"
        later = method.body[method.body.index(up) + 1:]
        for k, stmt in enumerate(later):
            names = [n for n in ast.walk(stmt) if isinstance(n, ast.Name) and n.id == h]
            if not names:
                continue
            reads = [n for n in names if isinstance(n.ctx, ast.Load) or isinstance(self.parent[n], ast.AugAssign)]
            stores = [n for n in names if n not in reads]
            act = self.parent[reads[0]] if len(reads) == 1 else None
            if not (act is not None and _is_self_call(act, reads[0], this) and self.always_evaluated(act, stmt)):
                return None, f"{h} = self.L(...) is next used otherwise than as the one argument of self.<act>({h})"
            if not (stores and isinstance(stmt, ast.Assign)) and any(
                    isinstance(n, ast.Name) and n.id == h for s in later[k + 1:] for n in ast.walk(s)):
                return None, f"{h} = self.L(...) is read again after self.{act.func.attr}({h})"
            return act.func.attr, ""
        return None, f"{h} = self.L(...) is never passed to an activation"

    def always_evaluated(self, node: ast.AST, stmt: ast.stmt) -> bool:
        return isinstance(stmt, _ALWAYS_EVALUATED) and all(
            isinstance(a, _ALWAYS_EVALUATED) for a in self._ancestors(node, stmt))


def _is_self_call(node: ast.AST, arg: ast.AST, this: str) -> bool:
    """Whether node is `this.A(arg)`: a call of an attribute of the method's first argument, arg alone."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id == this and node.args == [arg] and not node.keywords)


def _is_super_or_init_call(up: ast.AST, node: ast.AST) -> bool:
    """Whether the bare self `node` is an argument of a call that neither keeps it nor reaches its children:
    super(...), Base.__init__(self, ...), hasattr, isinstance, type."""
    return isinstance(up, ast.Call) and node in up.args and (
        (isinstance(up.func, ast.Name) and up.func.id in ("super", "hasattr", "isinstance", "type"))
        or (isinstance(up.func, ast.Attribute) and up.func.attr == "__init__"))


_SOURCES: dict[tuple[type, bool], "_Source | Exception"] = {}


def _source(cls: type, strict: bool = True) -> "_Source":
    """cls's _Source, read once per fuse() call (an exception if it cannot be read)."""
    if (cls, strict) not in _SOURCES:
        try:
            _SOURCES[cls, strict] = _Source(cls, strict)
        except (OSError, TypeError, SyntaxError, IndexError, AttributeError, ValueError) as e:
            _SOURCES[cls, strict] = e
    found = _SOURCES[cls, strict]
    if isinstance(found, Exception):
        raise found
    return found


def _reached_from_above(ancestors: list[tuple[nn.Module, list[str]]], names: tuple[str, ...]) -> str | None:
    """An ancestor whose code names one of `names` inside the block (self.blk.fc1 from the block's parent): that
    code would see the fused module; ancestors: (module, the path from it to the block)."""
    for ancestor, path in ancestors:
        if isinstance(ancestor, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and type(ancestor).__module__.startswith(
                "torch.nn."):
            continue
        try:
            source = _source(type(ancestor), strict=False)
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
        source = _source(type(module))
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError, ValueError) as e:
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
    _SOURCES.clear()
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
