"""How fuse() reads model code: what a module's class source proves about a Linear child and the activation its
output goes to (fusedlayers/convert.py uses it; the rules are in its docstring and the README). Only syntax trees
are read (inspect, ast); nothing of the model is run."""
import ast
import inspect
import textwrap

from torch import nn

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


class Source:
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


_SOURCES: dict[tuple[type, bool], "Source | Exception"] = {}


def source(cls: type, strict: bool = True) -> "Source":
    """cls's Source, read once per fuse() call (an exception if it cannot be read)."""
    if (cls, strict) not in _SOURCES:
        try:
            _SOURCES[cls, strict] = Source(cls, strict)
        except (OSError, TypeError, SyntaxError, IndexError, AttributeError, ValueError) as e:
            _SOURCES[cls, strict] = e
    found = _SOURCES[cls, strict]
    if isinstance(found, Exception):
        raise found
    return found


def forget() -> None:
    """Drops the classes read so far (fuse() reads each class once per call; a class may be edited in between)."""
    _SOURCES.clear()
