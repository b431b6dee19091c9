"""One box end to end, everything real: a serial scanner on a pseudo-terminal, the POS
application on the local API socket, `redeemd run`, Mosquitto and the reference
collector. On the way: a SIGHUP with a changed config, a `kill -9` and restart, a full
disk, and a SIGTERM. Checked throughout: what the POS app was shown is on disk, the box
sequence has no gaps, and every record reaches the collector.

The full disk is a real one where the machine allows it: the box's state directory is
a small tmpfs (needs root, as CI has). Elsewhere the test injects the same failure by
lowering the daemon's RLIMIT_FSIZE (writes fail with EFBIG, which SQLite reports like
a full disk), and says which of the two it used.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from api_helpers import Client
from broker import broker  # noqa: F401  (fixture)
from conftest import wait_for
from fleet import Fleet
from ptys import Pty


class SmallDisk:
    """The box's state directory, on a filesystem the test can fill and free."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(path)],
            capture_output=True,
        )
        self.tmpfs = mounted.returncode == 0
        self.how = "a 16 MiB tmpfs" if self.tmpfs else "RLIMIT_FSIZE on the daemon (not root)"
        self.filler = path / "filler"
        self._pid: int | None = None

    def fill(self, pid: int) -> None:
        if self.tmpfs:
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for size in (1 << 20, 4096, 512, 1):  # down to the last byte
                    with contextlib.suppress(OSError):  # ENOSPC: this size no longer fits
                        while True:
                            os.write(fd, b"\0" * size)
            finally:
                os.close(fd)
        else:
            _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))
            self._pid = pid

    def free(self) -> None:
        if self.tmpfs:
            self.filler.unlink(missing_ok=True)
        elif self._pid is not None:
            _, hard = resource.prlimit(self._pid, resource.RLIMIT_FSIZE)
            resource.prlimit(self._pid, resource.RLIMIT_FSIZE, (hard, hard))

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


@pytest.fixture
def disk(tmp_path):
    instance = SmallDisk(tmp_path / "state")
    yield instance
    instance.close()


def subscribe(path: Path) -> Client:
    """Connect as a POS app does: retrying while the daemon (re)starts; after a kill -9
    the old socket file is still there until the new daemon replaces it."""

    def connect() -> Client | None:
        try:
            return Client(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None

    client = wait_for(connect, f"the local API socket {path}")
    assert client.request({"cmd": "subscribe"})["ok"]
    return client


def codes(*names: str) -> bytes:
    return b"".join(name.encode() + b"\r" for name in names)


def test_a_box_end_to_end_through_reload_crash_full_disk_and_stop(fleet, disk, tmp_path):
    print(f"full disk: {disk.how}")
    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    pty = Pty()
    socket_path = tmp_path / "api.sock"
    scanner = f'[[scanner]]\ntype = "serial"\nname = "counter"\nport = "{pty.path}"\n'
    api = f'[api]\nsocket = "{socket_path}"\n'
    box = fleet.box("box-e2e", extra=scanner + api, state_dir=disk.path)
    daemon = fleet.run(box)
    pos = subscribe(socket_path)
    # pyserial flushes the port's input when it opens it: what the scanner sent before
    # the daemon had the port is gone, as with a real scanner. Send once it is open.
    wait_for(lambda: "scanner counter: open" in box.stderr(), "the serial port open")
    shown: list[dict] = []

    def next_event() -> dict:
        event = pos.event()
        shown.append(event)
        return event

    # Scans flow from the serial scanner to the POS app and on to the collector.
    pty.send(codes("FLEET-0001", "FLEET-0002", "NOPE-0001"))
    first = [next_event() for _ in range(3)]
    assert [e.get("reason", e["verdict"]) for e in first] == [
        "accepted",
        "accepted",
        "unknown_code",
    ]
    assert all(e["source"] == "counter" for e in first)
    wait_for(lambda: fleet.all_collected(box), "the first three records collected")

    # SIGHUP with a changed config: the new debounce applies at once (a repeat read is
    # now a second scan), and neither the scanner nor the POS app's connection drops.
    box.write_config(scanner + api + '\n[scan]\ndebounce = "0s"\n')
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in box.stderr(), "the reload in the log")
    pty.send(codes("FLEET-0003", "FLEET-0003"))
    assert next_event()["verdict"] == "accepted"
    assert next_event().get("reason") == "already_redeemed"
    # The POS app's commands reach the reloaded engine too.
    checked = pos.request({"cmd": "check", "code": "FLEET-0004"})
    assert checked["ok"] and checked["verdict"]["action"] == "check"
    assert pos.request({"cmd": "check", "code": "FLEET-0003"})["verdict"]["reason"] == (
        "already_redeemed"
    )

    # kill -9 in the middle of a burst; the restarted daemon goes on from the same port.
    pty.send(codes(*(f"FLEET-{i:04d}" for i in range(10, 60))))
    for _ in range(5):
        next_event()
    daemon.kill()
    opened = box.stderr().count("scanner counter: open")
    daemon = fleet.run(box)
    pos = subscribe(socket_path)
    wait_for(lambda: box.stderr().count("scanner counter: open") > opened, "the port reopened")
    pty.send(codes("FLEET-0100"))
    after = next_event()
    assert after["verdict"] == "accepted" and after["record_id"] in {r for _, r in box.ledger()}

    # A full disk: scans are refused with storage_error, the daemon keeps serving, and
    # it accepts again once there is space.
    disk.fill(daemon.process.pid)
    refused = None
    for i in range(200, 2200):
        pty.send(codes(f"NOPE-{i:05d}"))
        event = next_event()
        if event.get("reason") == "storage_error":
            refused = event
            break
    assert refused is not None, f"no storage_error with {disk.how}"
    pty.send(codes("FLEET-0101"))
    assert next_event().get("reason") == "storage_error", "still full: still refused"
    assert daemon.process.poll() is None
    disk.free()
    pty.send(codes("FLEET-0101"))
    wait_for(lambda: next_event()["verdict"] == "accepted", "FLEET-0101 accepted with space again")

    # Everything shown is on disk, without gaps, and reaches the collector.
    ledger = box.ledger()
    assert [seq for seq, _ in ledger] == list(range(1, len(ledger) + 1)), "no gaps"
    recorded = {rid for _, rid in ledger}
    accepted = {e["record_id"] for e in shown if e["verdict"] == "accepted"}
    assert accepted <= recorded, "an accepted verdict the POS app saw has no ledger row"
    wait_for(lambda: fleet.all_collected(box), "every record collected after it all")

    # SIGTERM: a clean exit within 5 s, the database intact.
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(5) == 0
    conn = sqlite3.connect(box.database)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert not socket_path.exists(), "the socket is removed on a clean stop"
    assert os.path.exists(box.database)
