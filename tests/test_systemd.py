"""The files in systemd/, checked by the real tools that will read them on a box.

`systemd-analyze verify` reads the unit, `systemd-sysusers` and `systemd-tmpfiles`
apply the user and directory files into a temporary root. The broker files
(mosquitto.conf, mosquitto-acl.conf) are attacked on a real Mosquitto in
test_security.py. A missing tool fails the test with what to install (./dev test
installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from drivers import discovery

SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "redeemd.service"
PASSWORD = "s3cret-for-tests"


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name) if p.exists()), None
    )
    if found is None:
        pytest.fail(
            f"{name} is not installed: run 'sudo apt-get install {package}' (./dev test does it)"
        )
    return found


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify(unit: Path) -> None:
    """`systemd-analyze verify` with nothing to say about `unit` (it warns about
    unknown keys and bad values but exits 0, so the output counts too)."""
    result = subprocess.run(
        [tool("systemd-analyze", "systemd"), "verify", str(unit)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    about_unit = [
        line for line in (result.stdout + result.stderr).splitlines() if unit.name in line
    ]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


def verifiable_copy(unit_text: str, prefix: str, redeemd: Path, directory: Path) -> Path:
    """verify wants ExecStart's program to exist: point a copy at a real `redeemd`."""
    copy = directory / "redeemd.service"
    copy.write_text(unit_text.replace(f"{prefix}/.venv/bin/redeemd", str(redeemd)))
    return copy


# ---------------------------------------------------------------- the unit


def test_unit_passes_systemd_analyze_verify(tmp_path):
    redeemd = Path(sys.executable).parent / "redeemd"
    assert redeemd.exists(), "the test environment has no redeemd script (./dev test installs it)"
    verify(verifiable_copy(UNIT.read_text(), "/opt/redeemd", redeemd, tmp_path))


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    redeemd = Path(sys.executable).parent / "redeemd"
    text = UNIT.read_text().replace("Type=notify", "Typ=notify")
    with pytest.raises(AssertionError, match="Unknown key"):
        verify(verifiable_copy(text, "/opt/redeemd", redeemd, tmp_path))


def test_unit_is_hardened_and_talks_to_systemd():
    unit = unit_settings(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "User": ["redeemd"],
        "Group": ["redeemd"],
        "ProtectSystem": ["strict"],
        "StateDirectory": ["redeemd"],
        "RuntimeDirectory": ["redeemd"],
        "NoNewPrivileges": ["yes"],
        "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
        "Restart": ["always"],
        "DevicePolicy": ["closed"],
        "KillSignal": ["SIGTERM"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "CapabilityBoundingSet": [""],
        # Config and keys: root's, read-only to the daemon (issue 17.4).
        "ReadOnlyPaths": ["-/etc/redeemd"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert set(unit["SupplementaryGroups"][0].split()) <= {"input", "dialout", "video"}
    assert re.fullmatch(r"\d+s", unit["WatchdogSec"][0])
    assert re.fullmatch(r"\d+s", unit["TimeoutStopSec"][0])
    allowed = {line.split()[0] for line in unit["DeviceAllow"]}
    assert {"char-ttyUSB", "char-ttyACM", "char-ttyS", "char-input", "char-video4linux"} <= allowed
    assert unit["ExecStart"] == ["/opt/redeemd/.venv/bin/redeemd run"]


# ---------------------------------------------------------------- sysusers, tmpfiles


def applied_root(tmp_path: Path) -> Path:
    """A temporary root with the redeemd user made by the real systemd-sysusers."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = subprocess.run(
        [tool("systemd-sysusers", "systemd"), f"--root={root}",
         str(SYSTEMD / "sysusers.d" / "redeemd.conf")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root


def passwd_of(root: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    users = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    return users, groups


def test_sysusers_makes_a_system_user_in_the_device_groups(tmp_path):
    users, groups = passwd_of(applied_root(tmp_path))
    user = users["redeemd"]
    assert int(user[2]) < 1000, "a system user"
    assert user[5] == "/var/lib/redeemd" and user[6] == "/usr/sbin/nologin"
    assert groups["redeemd"][2] == user[3], "its own primary group"
    for group in ("input", "dialout", "video"):
        assert "redeemd" in groups[group][3].split(","), group


def test_tmpfiles_gives_config_and_keys_to_root_readable_by_the_daemon(tmp_path):
    root = applied_root(tmp_path)
    (root / "etc/redeemd/keys").mkdir(parents=True)
    (root / "etc/redeemd/config.toml").write_text("[box]\n")
    (root / "etc/redeemd/config.toml").chmod(0o644)
    # As an operator copies them in (scp, install): root's, 0600. Issue 17.3: the daemon
    # could not read code.key because tmpfiles stopped at an unsafe path transition.
    for name in ("root.pub", "code.key"):
        (root / "etc/redeemd/keys" / name).write_text("key\n")
        (root / "etc/redeemd/keys" / name).chmod(0o600)
    (root / "var/lib/redeemd").mkdir(parents=True)
    result = subprocess.run(
        [tool("systemd-tmpfiles", "systemd"), f"--root={root}", "--create",
         str(SYSTEMD / "tmpfiles.d" / "redeemd.conf")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    users, groups = passwd_of(root)
    uid, gid = int(users["redeemd"][2]), int(groups["redeemd"][2])
    modes = {
        "etc/redeemd": (0o750, 0, gid),
        "etc/redeemd/config.toml": (0o640, 0, gid),
        "etc/redeemd/keys": (0o750, 0, gid),
        "etc/redeemd/keys/root.pub": (0o640, 0, gid),
        "etc/redeemd/keys/code.key": (0o640, 0, gid),
        "var/lib/redeemd": (0o750, uid, gid),
    }
    if os.geteuid() != 0:
        # Only root may give files to another user; the modes are checked all the same.
        assert "Operation not permitted" in result.stderr or result.returncode == 0, result.stderr
    else:
        assert result.returncode == 0, result.stderr
    for path, (mode, owner, group) in modes.items():
        st = (root / path).stat()
        assert st.st_mode & 0o7777 == mode, path
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (owner, group), path


# ---------------------------------------------------------------- udev rules


def test_udev_rules_name_serial_scanners_and_keep_modemmanager_away():
    text = (SYSTEMD / "60-redeemd-scanners.rules").read_text()
    assert text == discovery.udev_rules()
    tty = [line for line in text.splitlines() if line.startswith('SUBSYSTEM=="tty"')]
    assert len(tty) == len(discovery.SCANNER_VENDORS)
    for line in tty:
        assert 'ENV{ID_MM_DEVICE_IGNORE}="1"' in line and 'SYMLINK+="scanner-' in line
        assert 'GROUP="dialout"' in line
