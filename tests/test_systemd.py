"""The files in systemd/, checked by the real tools that will read them on a box.

`systemd-analyze verify` reads the unit, `systemd-sysusers` and `systemd-tmpfiles`
apply the user and directory files into a temporary root, and a real Mosquitto
enforces mosquitto-acl.conf against real MQTT clients. A missing tool fails the test
with what to install (./dev test installs it).
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import os
import queue
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import ROOT

from drivers import discovery
from sync.topics import Topics

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
    (root / "etc/redeemd").mkdir()
    (root / "etc/redeemd/config.toml").write_text("[box]\n")
    (root / "etc/redeemd/config.toml").chmod(0o644)
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
        "var/lib/redeemd": (0o750, uid, gid),
        "var/lib/redeemd/keys": (0o750, 0, gid),
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


# ---------------------------------------------------------------- the broker ACL


class Client:
    """A plain MQTT v5 client that logs in as `user` and reports broker answers."""

    def __init__(self, port: int, user: str):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.answers: queue.Queue[tuple[str, object]] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{user}" if user.startswith("box-") else f"{user}-{random.getrandbits(32)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(user, PASSWORD)
        self.client.on_connect = lambda c, u, f, reason, p: self.answers.put(("connect", reason))
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.answers.put(
            ("suback", reasons)
        )
        self.client.on_publish = lambda c, u, mid, reason, p: self.answers.put(("puback", reason))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        kind, reason = self.answers.get(timeout=30)
        assert kind == "connect" and not reason.is_failure, f"{user}: {reason}"

    def subscribe(self, topic: str) -> bool:
        """True if the broker granted the subscription."""
        self.client.subscribe(topic, qos=1)
        kind, reasons = self.answers.get(timeout=30)
        assert kind == "suback"
        return not reasons[0].is_failure

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> bool:
        """True if the broker accepted the message (MQTT v5 PUBACK, QoS 1)."""
        self.client.publish(topic, payload, qos=1, retain=retain)
        kind, reason = self.answers.get(timeout=30)
        assert kind == "puback"
        return not reason.is_failure

    def received(self, topic: str, payload: bytes) -> bool:
        """Wait for one message; a marker published after it bounds the wait."""
        while True:
            try:
                got = self.messages.get(timeout=30)
            except queue.Empty:
                return False
            if got == (topic, payload):
                return True
            if got[1] == b"marker":
                return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def acl_broker(tmp_path, broker):
    """The test's broker with passwords for two boxes and the backend, and
    systemd/mosquitto-acl.conf exactly as shipped."""
    passwd = tool("mosquitto_passwd", "mosquitto")
    passwords = tmp_path / "passwords"
    passwords.touch()
    for user in ("box-1", "box-2", "redeemd-backend"):
        subprocess.run([passwd, "-b", str(passwords), user, PASSWORD], check=True)
    broker.anonymous = False
    broker.options = [f"password_file {passwords}"]
    broker.acl = (SYSTEMD / "mosquitto-acl.conf").read_text()
    broker.restart()
    clients: list[Client] = []

    def connect(user: str) -> Client:
        clients.append(Client(broker.port, user))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def test_acl_lets_a_box_use_its_own_topics_and_the_merchant_s(acl_broker):
    backend, box = acl_broker("redeemd-backend"), acl_broker("box-1")
    topics = Topics("redeemd/v1", "demo", "box-1")
    assert backend.subscribe("$share/main/redeemd/v1/+/box/+/events")
    assert backend.subscribe("redeemd/v1/+/box/+/request")
    assert backend.subscribe("redeemd/v1/+/box/+/status")
    for topic in topics.subscriptions():
        assert box.subscribe(topic), topic
    for topic in (topics.events, topics.request, topics.status):
        assert box.publish(topic, b"up"), topic
        assert backend.received(topic, b"up"), topic
    for topic in (topics.manifest, "redeemd/v1/demo/batches/7", topics.ack,
                  "redeemd/v1/demo/box/box-1/batches/7"):  # fmt: skip
        assert backend.publish(topic, b"down"), topic
        assert box.received(topic, b"down"), topic


def test_acl_keeps_a_box_out_of_other_boxes_and_backend_topics(acl_broker):
    backend, box, other = acl_broker("redeemd-backend"), acl_broker("box-1"), acl_broker("box-2")
    mine, theirs = Topics("redeemd/v1", "demo", "box-1"), Topics("redeemd/v1", "demo", "box-2")
    assert backend.subscribe("redeemd/v1/+/box/+/events")
    assert backend.subscribe("redeemd/v1/+/box/+/status")
    # A box cannot speak for another box, nor publish what only the backend may.
    for topic in (theirs.events, theirs.status, mine.ack, mine.manifest,
                  "redeemd/v1/demo/batches/9", "redeemd/v1/demo/box/box-1/batches/9"):  # fmt: skip
        assert not box.publish(topic, b"forged"), topic
    assert box.publish(mine.events, b"marker")
    first = backend.messages.get(timeout=30)
    assert first == (mine.events, b"marker"), "nothing forged reached the backend"
    # Nor listen to another box's acks, resent batches or the fleet's events: Mosquitto
    # grants the subscription and then delivers nothing the ACL does not let it read.
    for topic in (theirs.ack, theirs.box_batches, "redeemd/v1/demo/box/+/events", "redeemd/v1/#"):
        box.subscribe(topic)
    assert other.subscribe(theirs.ack)
    assert backend.publish(theirs.ack, b"for box-2")
    assert backend.publish("redeemd/v1/demo/box/box-2/batches/3", b"for box-2")
    assert other.publish(theirs.events, b"from box-2")
    assert other.received(theirs.ack, b"for box-2")
    assert backend.publish(mine.ack, b"marker")
    assert box.messages.get(timeout=30) == (mine.ack, b"marker"), "box-1 got box-2's messages"
