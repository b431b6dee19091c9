"""A real Mosquitto broker for tests, started by the test session on a free loopback port.

Tests can stop it, restart it (with or without persistence), give it an ACL, and cut
connections. A missing `mosquitto` binary fails the test with what to install.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from ports import free_port  # noqa: F401  (tests import it from here too)


class Broker:
    def __init__(self, directory: Path, port: int | None = None):
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if binary is None:
            pytest.fail(
                "mosquitto is not installed: run 'sudo apt-get install mosquitto' (./dev test does it)"
            )
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.persistence = True
        self.acl: str | None = None
        # Mosquitto's default: past this many, messages queued for an offline client
        # are dropped silently (DESIGN.md section 7); tests lower it to prove we pull.
        self.max_queued = 1000
        # Lines for the listener (TLS files ...) and global lines (password_file ...).
        self.listener_options: list[str] = []
        self.options: list[str] = []
        self.anonymous = True
        self.log = self.dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            *self.listener_options,
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            *self.options,
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"max_queued_messages {self.max_queued}",
            # Started as root, mosquitto drops to user "mosquitto", which cannot write
            # the test's directory; stay the user running the tests.
            f"user {getpass.getuser()}",
        ]
        if self.acl is not None:
            acl = self.dir / "acl"
            acl.write_text(self.acl)
            lines.append(f"acl_file {acl}")
        path = self.dir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> Broker:
        assert self.process is None, "broker already running"
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self._config())], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                pytest.fail(f"mosquitto exited at start: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"mosquitto did not listen on port {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, *, persistence: bool | None = None) -> None:
        self.stop()
        if persistence is not None:
            self.persistence = persistence
            if not persistence:
                for db in self.dir.glob("mosquitto.db*"):
                    db.unlink()
        self.start()


def shipped_settings(text: str, paths: dict[str, str]) -> tuple[list[str], list[str]]:
    """The lines of a shipped mosquitto.conf (systemd/mosquitto.conf) for a test broker:
    (global lines, lines of its listener), every file named in `paths` replaced by the
    test's own. The `listener` line is the Broker's own (a free loopback port), and the
    TLS files are left out: TLS is proven in test_sync_tls.py, these lines prove who may
    log in and do what."""
    settings: list[str] = []
    listener: list[str] | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            assert listener is None, "one listener in the shipped file"
            listener = []
            continue
        if key in ("certfile", "keyfile", "cafile"):
            continue
        line = f"{key} {paths.get(value, value)}"
        (settings if listener is None else listener).append(line)
    return settings, listener or []


@pytest.fixture
def broker(tmp_path: Path):
    """A fresh Mosquitto for one test, on its own port and directory."""
    instance = Broker(tmp_path / "broker").start()
    yield instance
    instance.stop()
