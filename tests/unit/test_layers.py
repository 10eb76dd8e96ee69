"""The package's layers point one way: every import of refold goes down the declared list.

core → store → kafka → engine → http → cli. The root module `refold` is the public API (it
re-exports core types and the Kafka clients users call), and so is `refold.tasks` (the task API,
re-exported from core); library modules never import them, and the example apps import nothing
else.
Function-level and TYPE_CHECKING imports count too: a layer that needs an upper one at run time
is as tangled as one that imports it at the top.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import refold

LAYERS = ["core", "store", "kafka", "engine", "http", "cli"]
DATA = {"schemas", "deploy"}  # package data, no code
PUBLIC = {"refold", "refold.tasks", "refold.sagas"}  # what an example app may import


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (subpackages may live in other
    folders of the repo, so walk each subpackage's own __path__)."""
    found: dict[str, Path] = {"refold": Path(refold.__file__)}
    for public in PUBLIC - {"refold"}:
        found[public] = Path(str(importlib.import_module(public).__file__))
    for sub in [*LAYERS, "examples", "examples.bank"]:
        package = importlib.import_module(f"refold.{sub}")
        for directory in package.__path__:
            for path in Path(directory).glob("*.py"):
                name = f"refold.{sub}" if path.stem == "__init__" else f"refold.{sub}.{path.stem}"
                found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The refold modules `name` imports (`from refold.x import y` names module y if y is one)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "refold")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "refold":
                continue
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out.update(subs or {node.module})
    return out - {name}


def _area(module: str) -> str:
    parts = module.split(".")
    return "refold" if len(parts) == 1 or module in PUBLIC else parts[1]


MODULES = _modules()
GRAPH = {name: _imports(name, path, set(MODULES)) for name, path in MODULES.items()}


def test_every_subpackage_is_a_declared_layer() -> None:
    areas = {_area(m) for m in MODULES}
    assert areas <= {*LAYERS, "examples", "refold"}, areas - {*LAYERS, "examples", "refold"}
    assert len(MODULES) > 30  # the walk found the package, not an empty folder


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str) -> None:
    here = _area(module)
    wrong = []
    for target in sorted(GRAPH[module]):
        there = _area(target)
        if there in DATA:
            continue
        if here == "examples":
            ok = target in PUBLIC or there == "examples"
        elif here == "refold":
            ok = there in ("core", "kafka")  # the API: types, and the publisher and clients
        elif there in ("refold", "examples"):
            ok = False  # the library never imports its own API root or an example app
        else:
            ok = LAYERS.index(there) <= LAYERS.index(here)
        if not ok:
            wrong.append(target)
    assert not wrong, f"{module} ({here}) imports upward or sideways: {wrong}"


def test_no_cycle_between_subpackages() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        for target in targets:
            a, b = _area(module), _area(target)
            if a != b:
                edges.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(a for a in edges if reaches(a, a, {a}))
    assert not cycles, f"subpackages in an import cycle: {cycles}"


def test_the_layer_check_can_fail() -> None:
    """The walk sees real imports: the cli imports the engine, the engine the store."""
    assert "refold.engine.worker" in GRAPH["refold.cli.main"]
    assert any(_area(t) == "store" for t in GRAPH["refold.engine.runtime"])
