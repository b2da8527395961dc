"""The package's layering, read from the source: no import cycles, and each layer imports only downward.

Every ``import`` and ``from ... import`` of a gdino module counts, at module level or inside a
function, under ``TYPE_CHECKING`` or not: a cycle through a deferred import is still two modules
that each need the other. Shims left at old paths (a module that only re-exports another) are
kept out of the graph, since nothing inside the package may import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "gdino"

# Layers, lowest first: a module may import its own layer and the ones before it.
LAYERS = [
    ("config", "boxes"),
    ("model",),
    ("checkpoint", "processing"),
    ("detections", "postprocess", "loss", "detector"),
    ("export", "onnx"),
    # Fine-tuning runs the detector as an application does (its epochs show the apps' progress bar);
    # gdino.apps.train_command is its command line. Module cycles are still refused (test_no_import_cycles).
    ("training", "apps"),
]
# Top-level names no layer may import (none at present; a package added on top of the apps would go here).
UPPER: tuple[str, ...] = ()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_shim(tree: ast.Module) -> bool:
    """A module whose body is a docstring and re-exports (and a ``__main__`` guard) only."""
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    allowed = (ast.ImportFrom, ast.Import, ast.If)
    return bool(body) and all(isinstance(node, allowed) for node in body) and any(
        isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names) for node in body
    )


def _imports(path: Path, module: str, tree: ast.Module) -> set[str]:
    """The gdino modules ``module`` imports (a name imported from a package counts as its submodule if there is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "gdino"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gdino":
                continue
            found.add(target)
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    return found


def _graph() -> tuple[dict[str, set[str]], set[str]]:
    trees = {}
    for path in PACKAGE.rglob("*.py"):
        trees[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    shims = {name for name, (_, tree) in trees.items() if _is_shim(tree)}
    modules = set(trees) - shims
    graph = {}
    for name in modules:
        path, tree = trees[name]
        graph[name] = {m for m in _imports(path, name, tree) if m in modules and m != name}
    return graph, shims


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _layer(module: str) -> int | None:
    first = module.split(".")[1] if "." in module else ""
    for level, names in enumerate(LAYERS):
        if first in names:
            return level
    return None


def test_the_graph_sees_imports() -> None:
    graph, shims = _graph()
    assert "gdino.model.grounding_dino" in graph
    assert "gdino.model.transformer" in graph["gdino.model.grounding_dino"]
    assert "gdino.detector" in graph["gdino.apps.cli"] or any(
        "gdino.detector" in graph[m] for m in graph if m.startswith("gdino.apps.")
    )
    assert "gdino.cli" in shims and "gdino.weights" in shims


def test_no_import_cycles() -> None:
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_a_cycle_is_found() -> None:
    """The checker itself: a made-up graph with a cycle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("prefix", ["gdino.model"])
def test_model_imports_only_model_and_config(prefix: str) -> None:
    graph, _ = _graph()
    outside = {
        (name, target)
        for name, targets in graph.items()
        if name.startswith(prefix + ".") or name == prefix
        for target in targets
        if not (target.startswith(prefix + ".") or target in (prefix, "gdino.config"))
    }
    assert outside == set()


def test_layers_import_only_downward() -> None:
    graph, _ = _graph()
    upward = set()
    for name, targets in graph.items():
        own = _layer(name)
        if own is None:
            continue
        for target in targets:
            level = _layer(target)
            first = target.split(".")[1] if "." in target else ""
            if first in UPPER or (level is not None and level > own):
                upward.add((name, target))
    assert upward == set()
