"""The package's shape (issue 11): no runtime import cycle, modules one can read in a sitting,
and no module importing another package's private names."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "backbeat_sync"
#: Modules another helper is splitting (issue 11's other half); checked for cycles and privates only.
NOT_YET_SPLIT: set[str] = set()
MAX_LINES = 800
#: Statements whose body runs (or may run) with the module: their imports count.
BLOCKS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.For, ast.While)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) of every import that can run: at module level
    and inside functions (a lazy import is a runtime import too); TYPE_CHECKING ones aside."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.For, ast.While)
            ):
                visit(node.body)
            elif isinstance(node, ast.Import):
                out.extend((a.name, []) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [a.name for a in node.names]
                out.append((target, names))

    visit(tree.body)
    return out


def graph() -> dict[str, set[str]]:
    """Runtime import edges between the package's modules."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names in runtime_imports(name, path):
            if target in mods:
                edges[name].add(target)
            for n in names:  # ``from . import events``
                if f"{target}.{n}" in mods:
                    edges[name].add(f"{target}.{n}")
    return edges


def test_no_runtime_import_cycle() -> None:
    """No module reaches itself through its imports, lazy ones included (TYPE_CHECKING aside)."""
    edges = graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if n.startswith(m + "."):
                continue  # a package importing its own modules
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m)
    # A module importing a name from its own package's __init__ is the parent-package
    # edge Python resolves first; only cycles between sibling or unrelated modules count.
    real = [c for c in cycles if not any(b.startswith(a + ".") for a, b in itertools.pairwise(c))]
    assert real == []


def test_no_module_over_800_lines() -> None:
    """Every module reads in one sitting (the two another helper is splitting aside)."""
    long = {
        name: len(path.read_text().splitlines())
        for name, path in modules().items()
        if name not in NOT_YET_SPLIT and len(path.read_text().splitlines()) > MAX_LINES
    }
    assert long == {}


def test_no_module_imports_another_packages_private_names() -> None:
    """``from X import _y`` only within X's own package."""
    offenders = []
    for name, path in modules().items():
        own = name.rpartition(".")[0] if path.name != "__init__.py" else name
        for target, names in runtime_imports(name, path):
            if not target.startswith("backbeat_sync"):
                continue
            for n in names:
                private = n.startswith("_") and not n.startswith("__")
                if private and not (target == own or target.startswith(own + ".")):
                    offenders.append(f"{name}: from {target} import {n}")
    assert offenders == []
