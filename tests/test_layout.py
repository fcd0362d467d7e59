"""The layout's own rules: no import circle among fusedlayers' modules (imports inside functions count), and no
library source file above about 500 lines (510: a little room, not a new rule)."""
import ast
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "fusedlayers")


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file. `from . import x` imports the submodule x
    when there is one, else the package itself."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != name}


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path[path.index(n):] + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert graph["fusedlayers.functional"] >= {"fusedlayers.backends", "fusedlayers.ops.dense"}  # the graph is read


def test_source_files_are_short():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "csrc", "fusedlayers",
                            "bench", "setup.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    sources = [f for f in files if f.endswith((".py", ".cpp", ".h", ".cu", ".cuh"))]
    assert len(sources) > 30  # the listing found the tree
    long = {f: n for f in sources if (n := len(open(os.path.join(REPO, f)).read().splitlines())) > 510}
    assert not long, long
