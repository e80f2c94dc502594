"""The package layers read one way: the foundation, then the subsystems, then the app.

Every ``import`` of every module (module level or inside a function) is walked with ``ast``:

- ``waitroom.core`` (settings, errors, keys, clients, logs, HTTP plumbing) imports nothing
  of the project outside itself;
- the subsystems (``waitroom.line``, ``admission``, ``inventory``, ``workers``) import the
  foundation and each other's public names, never the app;
- the app (the rest of ``waitroom``: routes, composition roots, the CLI) may import anything
  below it; nothing but ``stress`` and ``tests`` imports ``stress``, nothing imports ``tests``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("waitroom", "admission", "inventory", "workers", "stress")
#: Lower number = lower layer; a module may import its own layer or lower ones.
CORE, SUBSYSTEM, APP, TOOLS, TESTS = range(5)
LAYER_NAMES = {CORE: "foundation", SUBSYSTEM: "subsystem", APP: "app", TOOLS: "stress"}


def layer(module: str) -> int | None:
    """The layer of a project module, None for a third-party or standard one."""
    top = module.split(".")[0]
    if module == "waitroom.core" or module.startswith("waitroom.core."):
        return CORE
    if module == "waitroom.line" or module.startswith("waitroom.line."):
        return SUBSYSTEM
    if top in ("admission", "inventory", "workers"):
        return SUBSYSTEM
    if top == "waitroom":
        return APP
    if top == "stress":
        return TOOLS
    if top == "tests":
        return TESTS
    return None


def package_of(module: str) -> str:
    """The unit whose private names stay private: ``waitroom.line``, ``admission``..."""
    parts = module.split(".")
    if parts[0] == "waitroom" and len(parts) > 1 and parts[1] in ("core", "line"):
        return ".".join(parts[:2])
    return parts[0]


def module_name(path: Path) -> str:
    """``waitroom/core/db.py`` -> ``waitroom.core.db``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, imported module, names taken from it)`` for every import in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            else:
                target = node.module or ""
            yield node.lineno, target, [a.name for a in node.names]


def violations(source: str, module: str) -> list[str]:
    """The import edges of ``module`` that run the wrong way."""
    found: list[str] = []
    here = layer(module)
    assert here is not None, module
    for line, target, names in imports(source, module):
        there = layer(target)
        if there is None:
            continue
        edge = f"{module}:{line} imports {target}"
        if there == TESTS and here != TESTS:
            found.append(f"{edge}: only tests import tests")
        elif there > here and here != TESTS:
            found.append(f"{edge}: the {LAYER_NAMES[here]} may not import the {LAYER_NAMES[there]}")
        elif here != TESTS and package_of(target) != package_of(module):
            private = [n for n in names if n.startswith("_")]
            if private:
                found.append(f"{edge}: private names {private} of another package")
    return found


def project_modules() -> Iterator[tuple[Path, str]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, module_name(path)


def test_every_import_runs_down_the_layers() -> None:
    found = [
        problem
        for path, module in project_modules()
        for problem in violations(path.read_text(), module)
    ]
    assert found == []


def test_the_walk_sees_every_package() -> None:
    modules = {module for _, module in project_modules()}
    for expected in (
        "waitroom.core.settings",
        "waitroom.line.room",
        "waitroom.app",
        "admission.loop",
        "inventory.actor",
        "workers.main",
        "stress.join",
    ):
        assert expected in modules


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("waitroom.core.keys", "from waitroom.line.room import Rooms", "foundation may not"),
        ("waitroom.core.db", "import admission.passes", "foundation may not"),
        ("admission.loop", "from waitroom.app import create_app", "subsystem may not"),
        ("inventory.store", "def f():\n    from waitroom import services", "subsystem may not"),
        ("workers.main", "from waitroom.checkout_api import reserve", "subsystem may not"),
        ("waitroom.app", "from stress.join import main", "app may not"),
        ("waitroom.cli", "from tests.harness import running", "only tests"),
        ("admission.loop", "from inventory.actor import _Batch", "private names"),
        ("waitroom.line.room", "from waitroom.core.http import _x", "private names"),
        ("waitroom.app", "from inventory.ledger import _apply", "private names"),
    ],
)
def test_an_edge_that_runs_back_up_is_caught(module: str, source: str, expected: str) -> None:
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0]


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("waitroom.core.clients", "from waitroom.core.db import create_pool"),
        ("admission.loop", "from waitroom.line.room import Rooms"),
        ("waitroom.line.messages", "from admission.passes import read_claims"),
        ("workers.main", "from inventory.hosting import InventoryHost"),
        ("waitroom.services", "from admission.loop import AdmissionService"),
        ("inventory.actor", "from inventory.ledger import _private_helper"),
        ("stress.join", "from waitroom.app import create_app"),
    ],
)
def test_edges_down_the_layers_are_allowed(module: str, source: str) -> None:
    assert violations(source, module) == []
