"""The tree's shape: small functions and modules, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
PACKAGES = ("dtml_deploy", "training", "export", "benchmarks")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_no_function_over_60_lines_and_no_module_over_400_outside_tests() -> None:
    too_long = []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "over the size limits:\n" + "\n".join(too_long)


def test_the_size_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def long():\n{body}\n")
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert fn.end_lineno - fn.lineno + 1 == MAX_FUNCTION_LINES + 1  # type: ignore[operator]


def _cycles(graph: object, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.find_modules_directly_imported_by(v):  # type: ignore[attr-defined]
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles() -> None:
    """Not even through imports inside functions: io/ once had two (challenge <-> datasets, volume ->
    dicom_series/itk_io -> volume), and bundle_schema imported qc, a layer above it."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("dtml_deploy", "training", "export", exclude_type_checking_imports=True)
    assert _cycles(graph, set(graph.modules)) == []
