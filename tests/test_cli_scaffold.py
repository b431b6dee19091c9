"""runtime/cli.py is the one scaffold of both command lines (issue 10.3): every command,
nested ones included, has a summary and an example in its --help, and neither CLI builds
its subcommands by hand again."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from backend import cli as backend_cli
from daemon import cli as daemon_cli
from runtime.cli import Commands, program


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every command under `parser`, groups and their actions too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


@pytest.mark.parametrize(
    "parser", [daemon_cli._parser, backend_cli._parser], ids=["redeemd", "redeemd-backend"]
)
def test_every_command_and_box_action_shows_an_example_that_uses_it(parser):
    found = dict(commands(parser()))
    assert found, "no commands"
    for path, sub in found.items():
        text = sub.format_help()
        assert "example" in text, path
        assert " ".join(path) in text.split("example", 1)[1], path


def test_the_backends_box_actions_are_found_and_take_dir_but_box_itself_does_not():
    found = dict(commands(backend_cli._parser()))
    assert {("box", "add"), ("box", "remove"), ("box", "list"), ("box", "acl")} <= set(found)
    assert "--dir" in found[("box", "add")].format_help()
    assert "--dir" not in found[("box",)].format_usage()


def test_neither_command_line_builds_subcommands_by_hand():
    by_hand = []
    for package in ("daemon", "backend"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("add_subparsers", "add_parser")
                ):
                    by_hand.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert by_hand == [], "subcommands go through runtime.cli.Commands"


def test_a_command_without_an_example_is_refused_when_the_parser_is_built():
    with pytest.raises(ValueError, match="needs an example"):
        Commands(program("x", "x")).add("run", lambda args: 0, "Run.")


def test_box_without_an_action_prints_its_help_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", "box"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ACTION" in result.stderr and "example" in result.stderr
