"""The package's import graph: no circles, and every module imports on its own.

Every module under neollm/ is parsed with ``ast``; every import counts, at module level and
inside functions (an import inside a function hides a circle from Python, not from the design).
``from neollm.x import y`` is an edge to ``neollm.x.y`` when that is a module, else to
``neollm.x``; relative imports are resolved. A module's implicit import of its parent packages'
``__init__`` is not an edge, but an explicit import of a package is an edge to its ``__init__``.
Imports under ``if TYPE_CHECKING:`` are not edges: they never run (annotations only).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "neollm"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module under neollm/ (packages by their ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(name: str, known: dict[str, Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) bodies."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                inside.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return inside


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The neollm modules ``name`` (file ``path``) imports, anywhere in its body."""
    package = name if _is_package(name, known) else name.rpartition(".")[0]
    edges = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in known else source)
        else:
            continue
        for target in targets:
            if target != "neollm" and not target.startswith("neollm."):
                continue
            while target and target not in known:  # `import neollm.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def test_graph_resolves_relative_and_from_imports():
    graph = import_graph()
    assert "neollm.loss.linear_ce" in graph["neollm.loss"]  # `from neollm.loss.linear_ce import ...`
    assert "neollm.errors" in graph["neollm.loss.settings"]
    assert "neollm" not in graph["neollm.loss.settings"]  # no implicit edge to the parent package


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among neollm modules (each line one circle):\n" + "\n".join(
        " <-> ".join(component) for component in found)


def test_every_module_imports_in_one_interpreter():
    """Import every module in sorted order in one fresh interpreter: a module that imports only
    when something else was imported first fails here."""
    names = sorted(modules())
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
