"""The layers, read from the source: each package imports only downward, nothing imports in a
circle, and no module takes another's private names.

Every import counts, wherever it is written (top of file, inside a function, under
`TYPE_CHECKING`): a cycle that only type checkers follow is still a cycle for a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "observability")

#: Who may import whom. A module belongs to the longest prefix listed; it may import its own
#: layer and the layers named here (and any third-party module).
ALLOWED: dict[str, set[str]] = {
    "pipeline.runtime": set(),
    "pipeline.fake_claude": set(),
    "pipeline.claude": {"pipeline.runtime"},
    "observability": {"pipeline.runtime"},
    "pipeline": {"pipeline.runtime", "pipeline.claude"},  # the facade: pipeline/__init__.py
    "pipeline.client": {"pipeline.runtime", "pipeline.claude", "observability"},
    "stages": {"pipeline", "pipeline.runtime", "pipeline.claude"},
    "pipeline.cli": {
        "pipeline",
        "pipeline.runtime",
        "pipeline.claude",
        "pipeline.client",
        "pipeline.fake_claude",
        "observability",
        "stages",
    },
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            names = [a.name for a in node.names]
            # `from pipeline.cli import render` imports the module pipeline.cli.render.
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            if submodules:
                for sub in submodules:
                    yield sub, [], node.lineno
                names = [n for n in names if f"{base}.{n}" not in MODULES]
                if not names:
                    continue
            yield base, names, node.lineno


def _ours(module: str) -> str | None:
    """The project module an import names (a package's `__init__` for a package)."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def _layer(module: str) -> str:
    return max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            ours = _ours(target)
            if ours is not None and ours != name:
                edges[name].add(ours)
    return edges


def test_every_import_goes_down_a_layer() -> None:
    wrong = []
    for name, path in MODULES.items():
        mine = _layer(name)
        for target, _, line in _imports(name, path):
            ours = _ours(target)
            if ours is None:
                continue
            theirs = _layer(ours)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {ours}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_takes_anothers_private_names() -> None:
    taken = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            if _ours(target) is None:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                taken.append(f"{path.relative_to(ROOT)}:{line}: {target}.{', '.join(private)}")
    assert not taken, "private names imported:\n" + "\n".join(taken)


def test_the_checks_see_a_violation() -> None:
    """The walker finds what it is meant to find (a test of the test)."""
    assert "pipeline.runtime.runner" in MODULES and "pipeline.claude.caller" in MODULES
    assert _layer("pipeline.runtime.scripts") == "pipeline.runtime"
    assert _layer("pipeline.client") == "pipeline.client"
    assert "pipeline.claude" not in ALLOWED["pipeline.runtime"]
    edges = _edges()
    assert "pipeline.runtime.stage" in edges["pipeline.runtime.runner"]


@pytest.mark.parametrize("package", ["pipeline.runtime", "pipeline.claude"])
def test_packages_exist_with_their_modules(package: str) -> None:
    assert sum(1 for m in MODULES if m.startswith(package + ".")) >= 8
