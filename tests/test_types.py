"""The type checker is part of `./dev test` (issue 10.4): strict on cards/, runtime/,
storage/ and sync/, a plain check on the rest, before the tests run."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT

STRICT = {
    "disallow_any_generics",
    "disallow_untyped_defs",
    "disallow_incomplete_defs",
    "disallow_untyped_calls",
    "check_untyped_defs",
    "warn_return_any",
    "strict_equality",
}


def test_dev_test_runs_mypy_after_ruff_and_before_pytest():
    script = (ROOT / "dev").read_text()
    body = script[script.index("run_tests() {") :]
    body = body[: body.index("\n}\n")]
    lines = [line.strip() for line in body.splitlines()]
    order = [
        i
        for i, line in enumerate(lines)
        if re.match(r'"\$VENV/bin/(ruff|mypy)"|"\$VENV/bin/python" -m pytest', line)
    ]
    assert [lines[i].split()[0].split("/")[-1].rstrip('"') for i in order] == [
        "ruff",
        "ruff",
        "mypy",
        "python",
    ]


def test_mypy_checks_every_package_and_cards_runtime_storage_and_sync_strictly():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    packages = {"cards", "runtime", "drivers", "storage", "sync", "daemon", "backend"}
    assert set(config["files"]) == packages
    strict = [o for o in config["overrides"] if {k for k, v in o.items() if v is True} >= STRICT]
    assert any({"cards.*", "runtime.*", "storage.*", "sync.*"} <= set(o["module"]) for o in strict)
    assert all("disable_error_code" not in o and "ignore_errors" not in o for o in strict)


def test_only_the_config_models_turn_a_check_off():
    """The config models write defaults as config.toml has them (docs/decisions.md); no
    other module may switch a mypy error code off."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    relaxed = {
        module
        for o in config["overrides"]
        if "disable_error_code" in o or o.get("ignore_errors")
        for module in o["module"]
    }
    assert relaxed == {"daemon.config_model", "drivers.settings"}
