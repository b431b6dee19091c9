"""The scaffold of redeemd's two command lines, `redeemd` and `redeemd-backend`.

Both follow one rule: every command has a one-line summary (listed in the program's
--help) and at least one example (in its own --help), because the person at a box or a
backend reads --help to find out what to type. Writing that rule once keeps the two CLIs
from drifting apart, as the two copies of the helper this replaces had started to.

    parser = program("redeemd-backend", HELP)
    commands = Commands(parser, common=lambda p: p.add_argument("--dir", required=True))
    p = commands.add("keygen", cmd_keygen, "Create keys.", "redeemd-backend keygen --dir k/")
    p.add_argument("--force", action="store_true")
    box = commands.group("box", "Register boxes.", "redeemd-backend box list --dir k/")
    box.add("list", cmd_list, "List boxes.", "redeemd-backend box list --dir k/")

argparse rather than click or typer: both CLIs, their error handling and their tests
(which walk the parsers) are argparse already, and what they shared is this one helper.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]
"""What a command runs: the parsed arguments in, the exit status out."""


def program(prog: str, description: str) -> argparse.ArgumentParser:
    """The top-level parser; `description` (with its examples) is printed as written."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


class Commands:
    """The commands under one parser: `redeemd COMMAND` or `redeemd-backend box ACTION`.

    `common(parser)` adds the arguments every command here takes (the backend's --dir,
    the daemon's -c and -v after the command); a group takes none itself, only its own
    commands do, so `box add --dir D` is not asked for --dir twice.
    """

    def __init__(
        self,
        parser: argparse.ArgumentParser,
        *,
        metavar: str = "COMMAND",
        common: Callable[[argparse.ArgumentParser], object] | None = None,
    ):
        self._sub = parser.add_subparsers(metavar=metavar)
        self._common = common

    def add(
        self, name: str, func: Handler, summary: str, *examples: str, details: str = ""
    ) -> argparse.ArgumentParser:
        """A command running `func`; its --help shows `summary`, `details` and `examples`."""
        parser = self._parser(name, summary, examples, details)
        parser.set_defaults(func=func)
        if self._common is not None:
            self._common(parser)
        return parser

    def group(
        self,
        name: str,
        summary: str,
        *examples: str,
        details: str = "",
        metavar: str = "ACTION",
        common: Callable[[argparse.ArgumentParser], object] | None = None,
    ) -> Commands:
        """A command with commands of its own (which take this one's `common` unless given
        another); given none, it prints its help and exits 2."""
        parser = self._parser(name, summary, examples, details)
        parser.set_defaults(func=lambda _args: _usage(parser))
        return Commands(parser, metavar=metavar, common=common or self._common)

    def _parser(
        self, name: str, summary: str, examples: tuple[str, ...], details: str
    ) -> argparse.ArgumentParser:
        if not examples:
            raise ValueError(f"command {name!r} needs an example for its --help")
        heading = "example:" if len(examples) == 1 else "examples:"
        text = f"{summary} {details}".rstrip()
        lines = "\n".join(f"  {example}" for example in examples)
        return self._sub.add_parser(
            name,
            help=summary,
            description=f"{text}\n\n{heading}\n{lines}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2
