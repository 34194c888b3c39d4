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


def _packages() -> list[str]:
    """The packages `pip install dtml` puts into site-packages: setuptools' own search with pyproject's
    patterns (the wheel holds exactly these: dtml_deploy, dtml_export and dtml_training at the top)."""
    from setuptools import find_packages

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))


def test_installing_puts_no_bare_training_or_export_package_into_site_packages() -> None:
    packages = _packages()
    assert {p.split(".")[0] for p in packages} == {"dtml_deploy", "dtml_training", "dtml_export"}
    # every package folder of training/ and export/ is installed under its dtml name
    for folder, name in (("training", "dtml_training"), ("export", "dtml_export")):
        subs = {str(p.parent.relative_to(REPO / folder)).replace("/", ".")
                for p in (REPO / folder).rglob("__init__.py")}
        assert {name if s == "." else f"{name}.{s}" for s in subs} <= set(packages)


def test_nothing_imports_training_or_export_by_their_folder_names() -> None:
    """Installed, only dtml_training and dtml_export exist; a bare `import training` would find a user's."""
    bare = []
    for path in [*_sources(), *sorted((REPO / "tests").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bare += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names
                     if n.split(".")[0] in ("training", "export")]
    assert not bare, "import dtml_training / dtml_export instead: " + ", ".join(bare)
