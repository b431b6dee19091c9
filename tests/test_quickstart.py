"""The README's first command, `./dev demo`, on a copy of the working tree.

The copy gets the files git would put in a clone (tracked plus untracked-but-not-ignored,
as they are in the working tree now). Its `.venv` reuses this checkout's installed
environment through symlinks, with its own fresh install stamp, so `./dev` skips pip and
never touches the shared venv; PYTHONPATH makes the copy's own code the code that runs
(the shared venv's editable install points at this checkout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

VENV = ROOT / ".venv"


def _tree_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    skip = (".venv", ".demo")
    return [p for p in listed.split("\0") if p and p.split("/")[0] not in skip]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("clone")
    for name in _tree_files():
        source = ROOT / name
        if not source.is_file():  # tracked but deleted in the working tree
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
    venv = dest / ".venv"
    venv.mkdir()
    for entry in VENV.iterdir():
        if not entry.name.startswith(".installed-"):
            (venv / entry.name).symlink_to(entry)
    # `./dev` installs when pyproject.toml is newer than the stamp; this one is newer.
    (venv / ".installed-base").touch()
    (venv / ".installed-test").touch()
    os.utime(dest / "pyproject.toml", (0, 0))
    return dest


def _dev_demo(clone: Path, scans: bytes, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("REDEEMD_CONFIG", "STATE_DIRECTORY")}
    env.update(extra_env, PYTHONPATH=str(clone))
    result = subprocess.run(
        ["./dev", "demo"], cwd=clone, input=scans, capture_output=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr.decode()
    assert "installing into" not in result.stderr.decode(), "./dev reinstalled the venv"
    return result


def _verdicts(result: subprocess.CompletedProcess) -> list[str]:
    """The verdict lines (the first run also reports the demo setup on stdout)."""
    lines = result.stdout.decode().splitlines()
    return [line for line in lines if line.startswith(("accepted", "rejected"))]


def test_dev_demo_accepts_then_refuses_repeat_and_junk(clone):
    first = _dev_demo(clone, b"DEMO-0001\n")
    assert [v.split()[0] for v in _verdicts(first)] == ["accepted"], first.stdout
    assert "Type a code and press Enter" in first.stderr.decode()

    second = _dev_demo(clone, b"DEMO-0001\nju\x01nk\n")
    lines = _verdicts(second)
    assert len(lines) == 2, second.stdout
    assert lines[0].startswith("rejected: already_redeemed"), lines
    assert lines[1].startswith("rejected: malformed"), lines
    assert "DEMO-0001" not in lines[0] + lines[1]  # codes appear only as digests


def test_dev_demo_signed_code_is_accepted(clone):
    _dev_demo(clone, b"")  # sets up .demo/ if no other test has yet
    signed = (clone / ".demo" / "signed-code.txt").read_text().strip()
    assert signed
    result = _dev_demo(clone, signed.encode() + b"\n")
    assert [v.split()[0] for v in _verdicts(result)] == ["accepted"], result.stdout
    # The banner shows the start of the very code the demo wrote.
    assert signed[:24] in result.stderr.decode()


def test_dev_demo_ignores_the_config_of_a_real_box(clone, tmp_path):
    # A machine that also runs (or is) a box: the demo must not read its config or
    # touch its database.
    real = tmp_path / "real-box"
    real.mkdir()
    config = real / "config.toml"
    config.write_text(f'[box]\nstate_dir = "{real}"\n')
    result = _dev_demo(clone, b"NOT-A-CODE\n", REDEEMD_CONFIG=str(config))
    assert [v.split()[:2] for v in _verdicts(result)] == [["rejected:", "unknown_code"]]
    assert sorted(p.name for p in real.iterdir()) == ["config.toml"]


def test_dev_demo_redoes_an_interrupted_setup(clone):
    _dev_demo(clone, b"")
    # Interrupted after the import, before the signed code was written.
    (clone / ".demo" / "signed-code.txt").unlink()
    result = _dev_demo(clone, b"DEMO-0020\n")
    assert "applied issue batch" in result.stdout.decode()  # the setup ran again
    assert [v.split()[0] for v in _verdicts(result)] == ["accepted"], result.stdout
    assert (clone / ".demo" / "signed-code.txt").read_text().strip()
