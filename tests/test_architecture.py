"""The shape of the code, checked on its source: no import circles among the project's modules (imports inside
functions count too), the core never imports ``extension/``, and no training type is tested by name outside the
objective registry (``objectives.py``) and the config's validation."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {".venv", "tests", "bench", ".git", "runs"}


def _sources() -> dict[str, Path]:
    """Project module name -> file, for every module outside the tests and benchmarks."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP:
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (the longest known prefix of each imported name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                if ".".join(parts[:k]) in modules:
                    found.add(".".join(parts[:k]))
                    break
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    # a package's __init__ is imported with any of its modules; packages here have empty ones
    return {name: _imports(path, modules) - {name} for name, path in sources.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles():
    graph = _graph()
    assert {"train", "module", "objectives", "config", "distributed", "extension.genrm"} <= set(graph)
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_core_does_not_import_extension():
    importers = {name for name, imported in _graph().items()
                 if not name.startswith("extension") and any(m.startswith("extension") for m in imported)}
    assert importers == set(), f"core modules importing extension/: {sorted(importers)}"


def _names_training_type(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "training_type") or (
        isinstance(node, ast.Name) and node.id == "training_type") or (
        isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "training_type")


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(_is_literal(e) for e in node.elts)


def training_type_comparisons(source: str) -> list[int]:
    """Lines comparing a training type with a literal name (``cfg.training_type == "dpo"``, ``... in ("sft", ...)``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_names_training_type(s) for s in sides) and any(_is_literal(s) for s in sides):
                lines.append(node.lineno)
    return lines


def test_comparison_finder_finds_them():
    assert training_type_comparisons('if cfg.training_type == "dpo": pass\nx = training_type in ("a", "b")') == [1, 2]
    assert training_type_comparisons('if cfg["training_type"] != "bt": pass') == [1]
    assert training_type_comparisons("if objective.uses_reference: pass") == []


def test_no_training_type_compared_by_name_outside_the_registry():
    allowed = {"objectives", "config"}
    offenders = {name: training_type_comparisons(path.read_text())
                 for name, path in _sources().items() if name not in allowed}
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}, f"training types compared by name (use the Objective's fields): {offenders}"
