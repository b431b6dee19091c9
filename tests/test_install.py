"""systemd/install.sh into a temporary root: the files a box gets, their modes, and a
`redeemd` that runs from the virtual environment it built.

The install is offline (--offline): the new environment reuses this test
environment's packages and pip installs only this checkout, so no network is needed.
systemctl, udevadm, systemd-sysusers and systemd-tmpfiles are shadowed by scripts
that record a call: with --root nothing outside the root may be touched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_systemd import verifiable_copy, verify

INSTALL = ROOT / "systemd" / "install.sh"
SYSTEM_TOOLS = ("systemctl", "udevadm", "systemd-sysusers", "systemd-tmpfiles")


def install(root: Path, *args: str, shims: Path) -> subprocess.CompletedProcess:
    shims.mkdir(exist_ok=True)
    for name in SYSTEM_TOOLS:
        shim = shims / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "{shims}/called"\n')
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}
    env.pop("REDEEMD_CONFIG", None)
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--python", sys.executable, "--offline", *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=root.parent,
    )  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("install")
    root = base / "root"
    result = install(root, shims=base / "shims")
    assert result.returncode == 0, result.stderr
    assert not (base / "shims" / "called").exists(), (base / "shims" / "called").read_text()
    return root, result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_install_lays_out_the_unit_users_rules_and_config(installed):
    root, _ = installed
    shipped = ROOT / "systemd"
    files = {
        "etc/systemd/system/redeemd.service": (shipped / "redeemd.service", 0o644),
        "etc/sysusers.d/redeemd.conf": (shipped / "sysusers.d" / "redeemd.conf", 0o644),
        "etc/tmpfiles.d/redeemd.conf": (shipped / "tmpfiles.d" / "redeemd.conf", 0o644),
        "etc/udev/rules.d/60-redeemd-scanners.rules": (
            shipped / "60-redeemd-scanners.rules",
            0o644,
        ),
        "etc/redeemd/config.toml": (ROOT / "config.example.toml", 0o640),
        "opt/redeemd/config.example.toml": (ROOT / "config.example.toml", 0o644),
        "opt/redeemd/docs/operations.md": (ROOT / "docs" / "operations.md", 0o644),
    }
    for path, (source, expected) in files.items():
        assert (root / path).read_bytes() == source.read_bytes(), path
        assert mode(root / path) == expected, path
    assert mode(root / "etc/redeemd") == 0o750
    link = root / "usr/local/bin/redeemd"
    assert link.is_symlink() and os.readlink(link) == "/opt/redeemd/.venv/bin/redeemd"


def test_installed_redeemd_runs_from_its_own_virtual_environment(installed, tmp_path):
    root, _ = installed
    venv = root / "opt/redeemd/.venv"
    result = subprocess.run(
        [str(venv / "bin/redeemd"), "--help"], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "doctor" in result.stdout and "status" in result.stdout
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import daemon.cli; print(daemon.cli.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), "the installed copy, not the checkout"


def test_installed_unit_passes_systemd_analyze_verify(installed, tmp_path):
    root, _ = installed
    unit = (root / "etc/systemd/system/redeemd.service").read_text()
    verify(verifiable_copy(unit, "/opt/redeemd", root / "opt/redeemd/.venv/bin/redeemd", tmp_path))


def test_install_with_root_says_what_to_run_on_the_box(installed):
    _, result = installed
    for step in ("systemd-sysusers", "systemd-tmpfiles --create", "udevadm control --reload",
                 "systemctl daemon-reload", "systemctl enable redeemd", "redeemd doctor"):  # fmt: skip
        assert step in result.stderr, step


def test_install_keeps_an_existing_config_and_rewrites_the_unit_for_another_prefix(tmp_path):
    root = tmp_path / "root"
    (root / "etc/redeemd").mkdir(parents=True)
    (root / "etc/redeemd/config.toml").write_text('[box]\nid = "box-0042"\n')
    result = install(root, "--prefix", "/srv/redeemd", shims=tmp_path / "shims")
    assert result.returncode == 0, result.stderr
    assert "kept the existing" in result.stderr
    assert (root / "etc/redeemd/config.toml").read_text() == '[box]\nid = "box-0042"\n'
    unit = (root / "etc/systemd/system/redeemd.service").read_text()
    assert "ExecStart=/srv/redeemd/.venv/bin/redeemd run" in unit and "/opt/" not in unit
    assert (root / "srv/redeemd/.venv/bin/redeemd").exists()
    assert os.readlink(root / "usr/local/bin/redeemd") == "/srv/redeemd/.venv/bin/redeemd"
    assert not (tmp_path / "shims" / "called").exists()


def test_install_refuses_a_relative_prefix(tmp_path):
    result = install(tmp_path / "root", "--prefix", "opt/redeemd", shims=tmp_path / "shims")
    assert result.returncode == 1
    assert "--prefix must be an absolute path" in result.stderr
    assert not (tmp_path / "root" / "opt").exists()


def test_install_moves_keys_out_of_the_state_directory_and_points_the_config_there(tmp_path):
    """Issue 17.4: /var/lib/redeemd is the daemon's, so keys there could be swapped by it."""
    root = tmp_path / "root"
    old = root / "var/lib/redeemd/keys"
    old.mkdir(parents=True)
    (old / "root.pub").write_text("root\n")
    (old / "code.key").write_text("code\n")
    secret = tmp_path / "root-only-secret"
    secret.write_text("not for the daemon\n")
    (old / "evil.pub").symlink_to(secret)  # planted by the daemon's user: never followed
    (root / "etc/redeemd").mkdir(parents=True)
    example = (ROOT / "config.example.toml").read_text()
    (root / "etc/redeemd/config.toml").write_text(
        example.replace("{config_dir}/keys/", "{state_dir}/keys/")
    )
    result = install(root, shims=tmp_path / "shims")
    assert result.returncode == 0, result.stderr
    keys = root / "etc/redeemd/keys"
    assert sorted(p.name for p in keys.iterdir()) == ["code.key", "root.pub"]
    assert (keys / "root.pub").read_text() == "root\n" and mode(keys / "code.key") == 0o640
    assert not (old / "root.pub").exists() and not (old / "code.key").exists()
    assert "moved root.pub code.key" in result.stderr and "compare them" in result.stderr
    config = (root / "etc/redeemd/config.toml").read_text()
    assert 'root_key_files = ["/etc/redeemd/keys/root.pub"]' in config
    assert 'code_key_file = "/etc/redeemd/keys/code.key"' in config
    assert "{state_dir}/keys" in (root / "etc/redeemd/config.toml.before-keys-move").read_text()


def test_a_fresh_install_has_an_empty_keys_directory_beside_the_config(installed):
    root, result = installed
    assert mode(root / "etc/redeemd/keys") == 0o750
    assert list((root / "etc/redeemd/keys").iterdir()) == []
    assert "/etc/redeemd/keys/" in result.stderr
    assert not (root / "var/lib/redeemd/keys").exists()
