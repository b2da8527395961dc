"""The package's layering, read from the source: one layer per folder, imports only downward, no
import cycles, no alias modules, and no import of a path that was removed.

Every ``import`` and ``from ... import`` of a gdino module counts, at module level or inside a
function, under ``TYPE_CHECKING`` or not: a cycle through a deferred import is still two modules
that each need the other. Every module is in the graph; none is left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "gdino"

# One folder a layer, lowest first: a module may import its own layer and the ones before it.
LAYERS = (
    "utils",  # boxes, checks, progress, files, hub: nothing of gdino below them
    "models",  # one folder per model family; tensors only
    "processing",  # prompts, label lists, tokenizer, images, the processor
    "checkpoint",  # key conversion, strict loading, saving
    "loss",  # matcher, criterion, denoising
    "inference",  # the detector, the one decode and detect loop, Detections
    "runtime",  # torch-free runtimes for exported graphs
    "export",  # writing exported graphs
    "evaluation",  # the COCO protocol
    "training",  # data sets, captions, augmentation, the loop
    # adapters for other frameworks' pipelines (SAHI): they use the inference layer, and only apps may
    # use them, so they sit just under apps; nothing of gdino's own depends on a framework it wraps
    "integrations",
    "apps",  # the command line, labelling, exports, drawing, the server
)
# The package itself (its lazy public names) and ``python -m gdino`` sit on top of every layer.
TOP = ("gdino", "gdino.__main__")
# What a layer may take from the package's ``__init__``: the version string, nothing else.
FROM_TOP = {"gdino.__version__"}

# Old module paths, removed in 0.2 (CHANGELOG.md); nothing may import them again.
REMOVED = (
    "gdino.arguments",
    "gdino.boxes",
    "gdino.checks",
    "gdino.chunking",
    "gdino.classes",
    "gdino.cli",
    "gdino.commands",
    "gdino.config",
    "gdino.convert",
    "gdino.detections",
    "gdino.detector",
    "gdino.draw",
    "gdino.evaluate",
    "gdino.exports",
    "gdino.image",
    "gdino.label",
    "gdino.model",
    "gdino.onnx",
    "gdino.postprocess",
    "gdino.progress",
    "gdino.prompts",
    "gdino.server",
    "gdino.text",
    "gdino.weights",
    "gdino.apps.evaluate",
    "gdino.apps.progress",
    "gdino.training.checkpoints",
    "gdino.training.loss",
    "gdino.training.matcher",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_alias(tree: ast.Module) -> bool:
    """A module that only re-exports others: its body is a docstring, imports, ``__all__`` and guards.

    A package ``__init__`` that forwards attribute look-ups (a module-level ``__getattr__``) is one
    too; the top package's lazy public names are the one exception (``TOP``).
    """
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in body):
        return True
    imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
    rest = [node for node in body if node not in imports and not _is_all_or_main_guard(node)]
    gdino_imports = [
        n for n in imports if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("gdino"))
    ]
    return bool(gdino_imports) and not rest


def _is_all_or_main_guard(node: ast.stmt) -> bool:
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
    return isinstance(node, ast.If)


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
            names = {f"{target}.{alias.name}" for alias in node.names}
            found |= names if target == "gdino" else names | {target}
    return found


def _trees() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"))) for p in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports (``FROM_TOP`` names kept as given)."""
    trees = _trees()
    graph = {}
    for name, (path, tree) in trees.items():
        graph[name] = {m for m in _imports(path, name, tree) if (m in trees or m in FROM_TOP) and m != name}
    return graph


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
        for other in sorted(graph.get(node, ())):
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
    """The layer's index; ``len(LAYERS)`` for the top; None for a module in no layer."""
    if module in TOP:
        return len(LAYERS)
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _upward(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    found = set()
    for name, targets in graph.items():
        own = _layer(name)
        assert own is not None, name
        for target in targets - FROM_TOP:
            level = _layer(target)
            if level is None or level > own:
                found.add((name, target))
    return found


def test_the_graph_sees_every_module() -> None:
    graph = _graph()
    assert set(graph) == set(_trees())
    assert "gdino.models.grounding_dino.transformer" in graph["gdino.models.grounding_dino.model"]
    assert "gdino.inference.detector" in graph["gdino.apps.arguments"]
    assert "gdino.utils.progress" in graph["gdino.training.trainer"]  # a function-level import


def test_every_module_is_in_one_layer() -> None:
    """No module outside the layers' folders (the root holds only ``__init__`` and ``__main__``)."""
    assert sorted(m for m in _graph() if _layer(m) is None) == []
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(LAYERS)


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_a_cycle_is_found() -> None:
    """The checker itself: a made-up graph with a cycle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_layers_import_only_downward() -> None:
    assert _upward(_graph()) == set()


def test_an_upward_import_is_found() -> None:
    """The checker itself: training importing the apps is reported."""
    graph = {"gdino.training.trainer": {"gdino.apps.cli"}, "gdino.apps.cli": {"gdino.training.trainer"}}
    assert _upward(graph) == {("gdino.training.trainer", "gdino.apps.cli")}


@pytest.mark.parametrize(
    "family", sorted(p.name for p in (PACKAGE / "models").iterdir() if (p / "__init__.py").is_file())
)
def test_a_model_family_imports_only_itself_and_utils(family: str) -> None:
    prefix = f"gdino.models.{family}"
    outside = {
        (name, target)
        for name, targets in _graph().items()
        if name.startswith(prefix + ".") or name == prefix
        for target in targets
        if not (target.startswith((prefix + ".", "gdino.utils.")) or target == prefix)
    }
    assert outside == set()


def test_no_alias_modules() -> None:
    aliases = sorted(name for name, (_, tree) in _trees().items() if name not in TOP and _is_alias(tree))
    assert aliases == []


def test_an_alias_is_found() -> None:
    """The checker itself: a module of re-exports (as the removed old paths were) is one."""
    alias = ast.parse('"""Moved."""\n\nfrom gdino.apps.cli import *  # noqa: F403\nfrom gdino.apps.cli import main\n')
    forwarding = ast.parse("def __getattr__(name):\n    return name\n")
    real = ast.parse("from gdino.utils.boxes import cxcywh_to_xyxy\n\nSIZE = 4\n")
    assert _is_alias(alias) and _is_alias(forwarding) and not _is_alias(real)


def _python_files() -> list[Path]:
    return [p for d in ("src", "tests", "bench", "scripts") for p in (ROOT / d).rglob("*.py")]


def test_no_import_of_a_removed_path() -> None:
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found += [(path.relative_to(ROOT).as_posix(), n) for n in names if n in REMOVED]
    assert found == []


def test_no_command_runs_a_removed_path() -> None:
    """``python -m gdino`` everywhere (scripts, bench, tests, docs), never an old module path."""
    pattern = re.compile(
        r"""-m["',\s]+(gdino(?:\.\w+)+)"""
    )  # a dotted module after -m, in a shell line or an argv list
    texts = [*_python_files(), *(ROOT / "scripts").glob("*.sh"), ROOT / "README.md", ROOT / "bench" / "README.md"]
    found = [(p.name, m) for p in texts for m in pattern.findall(p.read_text(encoding="utf-8"))]
    assert found == []


def test_every_name_imported_from_gdino_exists() -> None:
    """Each ``from gdino.x import name`` in src, tests, bench and scripts (function-level ones
    included) names a module that imports and an attribute it has: a bench script importing a
    private name through a star import, or a name that moved, fails here, not when it runs."""
    import importlib

    missing = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("gdino")):
                continue
            assert node.module is not None
            try:
                module = importlib.import_module(node.module)
            except ImportError as e:
                if "gdino" in str(e.name or ""):
                    missing.append((path.relative_to(ROOT).as_posix(), node.module, str(e)))
                continue  # an optional third-party package this machine lacks
            for alias in node.names:
                if not hasattr(module, alias.name) and not _is_submodule(node.module, alias.name):
                    missing.append((path.relative_to(ROOT).as_posix(), node.module, alias.name))
    assert missing == []


def _is_submodule(package: str, name: str) -> bool:
    """Whether ``package.name`` is a module (False when ``package`` is a plain module, not a package)."""
    import importlib.util

    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except ModuleNotFoundError:
        return False
