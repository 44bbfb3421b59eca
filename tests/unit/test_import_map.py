"""The package map holds: controller/, node/ and server/ never import each
other, common/ imports none of them (nor clients/), nothing imports clients/
but clients/ itself, and the one module allowed to import more than one of
the three services is the process wiring, clients/serve.py. Every import
counts, at the top of a module or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "controller", "node", "server", "clients")
SERVICES = {"controller", "node", "server"}
WIRING = "clients/serve.py"


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The vmattach packages (common, controller, ...) the module imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "vmattach":
                names = [f"vmattach.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; use vmattach.<package>")
        for name in names:
            parts = name.split(".")
            if parts[0] == "vmattach" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
            elif parts[0] in PACKAGES:  # the folder name instead of the namespace
                found.add(parts[0])
    return found


def test_every_package_has_modules():
    assert {p.relative_to(ROOT).parts[0] for p in modules()} == set(PACKAGES)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_package_map(path):
    rel = path.relative_to(ROOT).as_posix()
    own = rel.split("/")[0]
    others = imported_packages(path) - {own}
    if own == "common":
        assert not others, f"{rel} imports {sorted(others)}; common/ imports no other package"
    elif own in SERVICES:
        assert others <= {"common"}, f"{rel} imports {sorted(others - {'common'})}"
    elif rel != WIRING:
        assert len(others & SERVICES) <= 1, \
            f"{rel} imports {sorted(others & SERVICES)}: only {WIRING} wires services together"


def test_the_wiring_module_is_the_one_that_imports_all_three_services():
    assert imported_packages(ROOT / WIRING) >= SERVICES


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from vmattach.node import app\n    import vmattach.server.facade\n")
    assert imported_packages(sample) == {"node", "server"}
