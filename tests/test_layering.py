"""The package's floors: the library never imports the command line or the benchmarks, and
no two top-level modules import each other, directly or through others."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import facescale

ROOT = Path(facescale.__file__).parent
TOP_FLOORS = {"__main__", "cli", "commands", "benchmarking", "demo"}  # may import the library
LIBRARY_MAY_NOT_IMPORT = {"cli", "commands", "benchmarking"}


def _unit(module: str) -> str:
    """The top-level module or package of ``facescale.X.Y``: ``X``."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    """Top-level unit -> the other units it imports (at any depth, lazy imports too)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] == "configs":
            continue
        unit = parts[0]
        package = ["facescale", *parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    names = [".".join([*base, node.module] if node.module else base)]
                else:
                    names = [node.module or ""]
            for name in names:
                if name.startswith("facescale.") and _unit(name) != unit:
                    graph.setdefault(unit, set()).add(_unit(name))
    return graph


def test_the_library_never_imports_the_command_line_or_benchmarks():
    offenders = {
        (unit, target)
        for unit, targets in _imports().items()
        if unit not in TOP_FLOORS
        for target in targets & LIBRARY_MAY_NOT_IMPORT
    }
    assert not offenders, f"library modules importing a higher floor: {sorted(offenders)}"


def test_no_import_circles_between_top_level_modules():
    try:
        tuple(graphlib.TopologicalSorter(_imports()).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import circle: {' -> '.join(err.args[1])}") from None
