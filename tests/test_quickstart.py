"""The README's first command, `./dev demo`, on a copy of the working tree.

The copy gets the files git would put in a clone (tracked plus untracked-but-not-ignored,
as they are in the working tree now). Its `.venv` reuses this checkout's installed
environment through symlinks, with its own fresh install stamp, so `./dev` skips pip and
never touches the shared venv; PYTHONPATH makes the copy's own code the code that runs
(the shared venv's editable install points at this checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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


def test_dev_demo_prints_a_quick_second_scan_as_the_same_read(clone):
    # Typed twice within the 2 s debounce: one read, shown as such rather than silence.
    result = _dev_demo(clone, b"DEMO-0002\nDEMO-0002\n")
    out = result.stdout.decode()
    assert [v.split()[0] for v in _verdicts(result)] == ["accepted"], out
    [repeat] = [line for line in out.splitlines() if line.startswith("same read")]
    assert "accepted" in repeat and "not recorded again" in repeat, repeat
    assert "DEMO-0002" not in out
    assert "same read" in (clone / "README.md").read_text()


def _dev(clone: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """`./dev ARGS` in `clone`; any PIP_ variable given replaces all of this machine's."""
    drop = ("REDEEMD_CONFIG", "STATE_DIRECTORY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if any(k.startswith("PIP_") for k in extra_env):
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
    env.update(extra_env, PYTHONPATH=str(clone))
    return subprocess.run(
        ["./dev", *args], cwd=clone, capture_output=True, text=True, timeout=120, env=env
    )


def test_dev_status_and_doctor_look_at_the_demo(clone, tmp_path):
    _dev_demo(clone, b"DEMO-0003\n")
    # A real box's config on the same machine is not what they read.
    real = tmp_path / "real-box"
    real.mkdir()
    config = real / "config.toml"
    config.write_text(f'[box]\nstate_dir = "{real}"\n')
    status = _dev(clone, "status", "--json", REDEEMD_CONFIG=str(config))
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["database"] == str(clone / ".demo" / "redeemd.db")
    assert info["cache_seq"] == 2 and info["ledger_seq"] >= 1, info
    doctor = _dev(clone, "doctor", REDEEMD_CONFIG=str(config))
    assert str(clone / ".demo") in doctor.stdout, doctor.stdout
    assert str(real) not in doctor.stdout + doctor.stderr
    assert sorted(p.name for p in real.iterdir()) == ["config.toml"]


def test_dev_status_without_a_demo_says_to_start_one(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(ROOT / "dev", bare / "dev")
    result = _dev(bare, "status")
    assert result.returncode != 0
    assert "run ./dev demo first" in result.stderr


# `./dev` builds its own venv with pip; what it says when that fails. A project of one
# package, in a scratch directory beside a copy of `dev`, with a venv of its own: pip
# never touches the shared venv, and this machine's pip configuration is left out.
def _project(tmp_path: Path, setup_py: str) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "dev", project / "dev")
    (project / "setup.py").write_text(setup_py)
    return project


def test_dev_reports_a_compile_error_as_a_compile_error(tmp_path):
    project = _project(
        tmp_path,
        "from setuptools import Extension, setup\n\n"
        'setup(name="needs-headers", version="0", '
        'ext_modules=[Extension("needs_headers", ["needs_headers.c"])])\n',
    )
    (project / "needs_headers.c").write_text("#include <no_such_header_for_redeemd.h>\n")
    # Built offline: a venv made here (`./dev` keeps a working one) that sees the shared
    # venv's setuptools (one that builds wheels by itself) through a .pth file instead of
    # its own older one, and pip without build isolation or an index.
    venv = project / ".venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([venv / "bin" / "pip", "uninstall", "-q", "-y", "setuptools"], check=True,
                   timeout=120, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})  # fmt: skip
    [site] = venv.glob("lib/python3*/site-packages")
    [shared] = VENV.glob("lib/python3*/site-packages")
    (site / "shared-setuptools.pth").write_text(f"{shared}\n")
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_BUILD_ISOLATION": "0", "PIP_NO_INDEX": "1"}
    result = _dev(project, "demo", **offline)
    assert result.returncode != 0
    assert "did not compile" in result.stderr, result.stderr
    assert "no_such_header_for_redeemd.h" in result.stderr, result.stderr
    assert "network" not in result.stderr.replace("not a network one", ""), result.stderr
    assert "no_such_header_for_redeemd.h" in (venv / "pip-install.log").read_text()


def test_dev_reports_an_unreachable_index_as_a_network_error(tmp_path):
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    project = _project(tmp_path, 'from setuptools import setup\n\nsetup(name="x", version="0")\n')
    # pip asks the index for setuptools to build the project in isolation, and fails
    # (with a build-system table, as redeemd has: an older pip would use setup.py alone).
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    unreachable = {"PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "1",
                   "PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple"}  # fmt: skip
    result = _dev(project, "demo", **unreachable)
    assert result.returncode != 0
    assert "PyPI could not be reached" in result.stderr, result.stderr
    assert "did not compile" not in result.stderr, result.stderr
