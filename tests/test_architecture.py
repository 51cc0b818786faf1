"""The import contract (docs/architecture.md): layers point down, and no module cycles.

Every module under ``src/tinyllm`` is parsed with ``ast``; every ``import``/``from ... import``
counts, including those inside functions. Each module maps to a layer by its first package below
``tinyllm``; an import from a lower layer to a higher one fails with ``file:line``, and so does
any cycle between modules or between packages. Imports inside ``if TYPE_CHECKING:`` blocks count
for the layer direction (a lower layer must not name a higher layer's types) but not for
cycles (they never run, so they cannot form an import cycle). ``tinyllm/__init__.py`` (the public
Python API) sits above everything and is exempt. Imports within one layer are allowed if they do
not form a cycle.

Run it alone with ``.venv/bin/pytest tests/test_architecture.py -q``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tinyllm"

# Higher number = higher layer; imports may only point to the same or a lower number.
LAYERS: dict[str, int] = {
    "errors": 1,
    "util": 1,
    "models": 2,
    "data": 2,
    "core": 3,
    "eval": 3,
    "kernels": 3,
    "checkpoint": 3,
    "prune": 4,
    "quant": 4,
    "distill": 4,
    "export": 5,
    "runtime": 5,
    "pipeline": 6,
    "cli": 7,
    "__main__": 7,  # `python -m tinyllm` (and torchrun ... -m tinyllm): the CLI's entry
}
TOP = "tinyllm"  # tinyllm/__init__.py: the public API, above every layer
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Edge:
    """One import statement: ``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int
    type_only: bool = False  # inside `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    """``src/tinyllm/quant/gptq.py`` -> ``tinyllm.quant.gptq`` (packages drop ``__init__``)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    """The absolute module a ``from`` import names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = source.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a tinyllm module, or None for third-party names."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers of the statements inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        name = getattr(test, "id", None) or getattr(test, "attr", None)
        if name == "TYPE_CHECKING":
            for stmt in node.body:
                for inner in ast.walk(stmt):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def imports_of(source: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """Every tinyllm module that ``source`` imports, wherever in the file the import sits."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    type_only = _type_checking_lines(tree)
    edges: list[Edge] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, source, is_package)
            # `from tinyllm.quant import gptq` imports the submodule when there is one.
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
            names = [n if _known(n, modules) == n else base for n in names]
        for name in names:
            target = _known(name, modules)
            if target is not None and target != source:
                edges.append(Edge(source, target, path, node.lineno, node.lineno in type_only))
    return edges


def all_edges() -> list[Edge]:
    """The whole import graph of the package."""
    modules = all_modules()
    return [e for name, path in modules.items() for e in imports_of(name, path, modules)]


def layer_of(module: str) -> int:
    """The layer number of a module (``tinyllm`` itself is above every layer)."""
    parts = module.split(".")
    if len(parts) == 1:
        return max(LAYERS.values()) + 1
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: no layer assigned; add its package to LAYERS")
    return LAYERS[parts[1]]


def _where(edge: Edge) -> str:
    """``src/tinyllm/x.py:12`` (paths outside the repository as they are)."""
    path = edge.path
    if path.is_relative_to(SRC.parent):
        path = path.relative_to(SRC.parent)
    return f"{path}:{edge.line}"


def upward_imports(edges: list[Edge]) -> list[str]:
    """``file:line: a (layer n) imports b (layer m)`` for every import that points up."""
    bad = []
    for e in edges:
        if e.source == TOP:
            continue
        src, dst = layer_of(e.source), layer_of(e.target)
        if dst > src:
            bad.append(f"{_where(e)}: {e.source} (layer {src}) imports {e.target} (layer {dst})")
    return bad


def _package_of(module: str) -> str:
    """The dotted name up to the layer package: ``tinyllm.quant.gptq`` -> ``tinyllm.quant``."""
    return ".".join(module.split(".")[:2])


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def _shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside one strongly connected component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [start]


def describe_cycles(edges: list[Edge], key: Callable[[str], str]) -> list[str]:
    """One entry per cycle of the graph ``key(source) -> key(target)``: its members, then one
    shortest loop through them with the ``file:line`` of an import on each hop."""
    graph: dict[str, set[str]] = {}
    site: dict[tuple[str, str], Edge] = {}
    for e in edges:
        a, b = key(e.source), key(e.target)
        if a != b and TOP not in (a, b) and not e.type_only:
            graph.setdefault(a, set()).add(b)
            site.setdefault((a, b), e)
    lines = []
    for component in find_cycles(graph):
        loop = _shortest_cycle(graph, component[0], set(component))
        hops = [f"{a} -> {b}  ({_where(site[a, b])})" for a, b in pairwise(loop)]
        lines.append(" <-> ".join(component) + ":\n    " + "\n    ".join(hops))
    return lines


def test_every_package_has_a_layer() -> None:
    """A new top-level package must be placed in a layer before it can be imported."""
    for module in all_modules():
        layer_of(module)


def test_imports_point_down() -> None:
    """No module imports from a higher layer (see docs/architecture.md)."""
    bad = upward_imports(all_edges())
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_no_module_cycles() -> None:
    """No two modules import each other, directly or through others."""
    cycles = describe_cycles(all_edges(), key=lambda m: m)
    assert not cycles, "module import cycles:\n" + "\n".join(cycles)


def test_no_package_cycles() -> None:
    """No two packages (quant, prune, eval, ...) import each other, directly or through others."""
    cycles = describe_cycles(all_edges(), key=_package_of)
    assert not cycles, "package import cycles:\n" + "\n".join(cycles)


def test_checker_catches_an_upward_import_and_a_cycle() -> None:
    """The checker itself: a made-up upward edge and a made-up cycle are both reported."""
    p = PACKAGE / "models" / "load.py"
    up = [Edge("tinyllm.models.load", "tinyllm.quant.gptq", p, 7)]
    assert upward_imports(up) == [
        "src/tinyllm/models/load.py:7: tinyllm.models.load (layer 2) imports "
        "tinyllm.quant.gptq (layer 4)"
    ]
    loop = [
        Edge("tinyllm.quant.a", "tinyllm.quant.b", p, 1),
        Edge("tinyllm.quant.b", "tinyllm.quant.c", p, 2),
        Edge("tinyllm.quant.c", "tinyllm.quant.a", p, 3),
    ]
    (cycle,) = describe_cycles(loop, key=lambda m: m)
    assert cycle.startswith("tinyllm.quant.a <-> tinyllm.quant.b <-> tinyllm.quant.c")
    assert describe_cycles(loop[:2], key=lambda m: m) == []


def test_relative_and_function_level_imports_are_seen(tmp_path: Path) -> None:
    """Imports inside functions and relative imports are part of the graph."""
    modules = all_modules()
    path = tmp_path / "probe.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "def f():\n    from ..quant import gptq\n    import tinyllm.cli.app\n"
        "if TYPE_CHECKING:\n    from tinyllm.runtime.engine import Engine\n"
    )
    edges = imports_of("tinyllm.models.probe", path, modules)
    assert {(e.target, e.line, e.type_only) for e in edges} == {
        ("tinyllm.quant.gptq", 3, False),
        ("tinyllm.cli.app", 4, False),
        ("tinyllm.runtime.engine", 6, True),
    }
    assert len(upward_imports(edges)) == 3  # type-only imports still point up
    back = [Edge("tinyllm.runtime.engine", "tinyllm.models.probe", path, 1)]
    assert describe_cycles(edges + back, key=lambda m: m) == []  # ... but form no cycle


def long_functions() -> list[str]:
    """``file:line name (n lines)`` for every function body over the limit."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    rel = path.relative_to(SRC.parent)
                    found.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_60_lines() -> None:
    """No function in src/tinyllm is longer than 60 lines (decorators excluded)."""
    found = long_functions()
    assert not found, "functions over 60 lines:\n" + "\n".join(found)
