"""The quick start installs the box alone (`./dev demo`: no extras), and its setup runs
`redeemd-backend keygen`, `delegate`, `issue` and `mint`: those commands, and the box's
CLI, must work without the extras' packages (web: starlette, uvicorn, argon2-cffi,
pygal; postgresql: psycopg; drivers' compiled ones). A module of an extra imported at
the top of a module every command loads broke `./dev demo` on a fresh machine once.
The test runs the commands with those packages made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

EXTRAS = ("starlette", "uvicorn", "argon2", "pygal", "psycopg", "playwright", "zxingcpp",
          "evdev", "xkbcommon", "zbar", "PIL", "numpy", "inotify_simple")  # fmt: skip

BLOCK = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    code = (
        BLOCK
        + f"import runpy, sys; sys.argv = ['x', *{list(args)!r}]; runpy.run_module({module!r}, run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_the_demos_backend_commands_and_the_box_cli_need_no_extra(tmp_path: Path):
    keys = tmp_path / "keys"
    for args in (
        ("keygen", "--dir", str(keys)),
        ("delegate", "--dir", str(keys), "--merchant", "demo"),
        ("issue", "--dir", str(keys), "--merchant", "demo", "--kind", "cards",
         "--input", str(ROOT / "backend/demo/cards.json"), "--out", str(tmp_path / "c.rdb")),
        ("mint", "--dir", str(keys), "--card", "1", "--serial", "1"),
        ("--help",),
    ):  # fmt: skip
        done = run("backend.cli", *args)
        assert done.returncode == 0, f"redeemd-backend {args[0]}: {done.stderr[-1500:]}"
    done = run("daemon.cli", "--help")
    assert done.returncode == 0, done.stderr[-1500:]
