"""Imports point downward only (DESIGN.md section 2): a reader finds any concern by its
folder, and a lower layer never needs a higher one to be tested or reused."""

from __future__ import annotations

import ast

from conftest import ROOT

OURS = {"cards", "runtime", "drivers", "storage", "sync", "daemon", "backend"}
ALLOWED = {
    "cards": set(),
    "runtime": set(),
    "drivers": {"cards", "runtime"},
    "storage": {"cards", "runtime"},
    "sync": {"storage", "cards", "runtime"},
    "daemon": {"sync", "storage", "drivers", "cards", "runtime"},
    "backend": {"sync", "cards", "runtime"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """{module path: our other packages it imports}."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        others = (names & OURS) - {package}
        if others:
            found[str(path.relative_to(ROOT))] = others
    return found


def test_imports_point_downward_only():
    wrong = {
        module: sorted(others - ALLOWED[package])
        for package in ALLOWED
        for module, others in imported_packages(package).items()
        if others - ALLOWED[package]
    }
    assert wrong == {}, f"imports against DESIGN.md section 2: {wrong}"


def test_drivers_sync_daemon_and_backend_share_the_runtime_threads_and_backoff():
    users = {
        package
        for package in ALLOWED
        if any("runtime" in others for others in imported_packages(package).values())
    }
    assert {"drivers", "sync", "daemon", "backend"} <= users
