"""`redeemd run` as a service: systemd notify and watchdog, SIGHUP reload, SIGTERM,
and the on_verdict hook. Every test runs the real daemon process.

systemd's side of the notify protocol is a Unix datagram socket named by
$NOTIFY_SOCKET; the test binds one and reads what the daemon sends, exactly as
systemd would, so no systemd is needed.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import ROOT, Box, wait_for

WAIT = 60.0


class Daemon:
    def __init__(self, box: Box, env: dict[str, str] | None = None):
        self.box = box
        self.verdicts: list[dict] = []
        self.stderr: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "-c", str(box.config_path), "run", "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )  # fmt: skip
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        for line in self.process.stdout:
            self.verdicts.append(json.loads(line))

    def _read_err(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def scan(self, *codes: str) -> None:
        self.process.stdin.write(b"".join(c.encode() + b"\n" for c in codes))
        self.process.stdin.flush()

    def wait_verdicts(self, n: int) -> list[dict]:
        wait_for(lambda: len(self.verdicts) >= n, f"{n} verdicts; stderr: {self.log()[-2000:]}")
        return self.verdicts

    def wait_log(self, text: str) -> str:
        return wait_for(
            lambda: next((line for line in self.stderr if text in line), None),
            f"{text!r} in the log; stderr: {self.log()[-2000:]}",
        )

    def log(self) -> str:
        return "".join(self.stderr)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(WAIT)
        for t in self._threads:
            t.join(10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(box: Box, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(box, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


class NotifySocket:
    """What systemd listens on: a datagram socket collecting notify messages."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def having(self, key: str) -> list[dict[str, str]]:
        return [m for m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def ledger_count(box: Box) -> int:
    conn = sqlite3.connect(box.database)
    try:
        return conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    finally:
        conn.close()


def test_ready_status_watchdog_and_stopping_reach_systemd(loaded_box, daemons, tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    try:
        daemon = daemons(
            loaded_box, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
        )
        ready = wait_for(lambda: notify.having("READY"), "READY=1")[0]
        assert ready["READY"] == "1" and "cache seq 2" in ready["STATUS"]
        assert ready["MAINPID"] == str(daemon.process.pid)
        # WatchdogSec=1s: pings at half the interval, from the engine loop.
        wait_for(lambda: len(notify.having("WATCHDOG")) >= 3, "watchdog pings")
        daemon.scan("DEMO-0001")
        daemon.wait_verdicts(1)
        assert daemon.stop() == 0
        wait_for(lambda: notify.having("STOPPING"), "STOPPING=1")
    finally:
        notify.close()


def test_a_start_that_migrates_asks_systemd_for_more_time_first(loaded_box, daemons, tmp_path):
    from storage.migrations import MIGRATION_TIMEOUT_S

    # A database of the release before m006: the migration copies the ledger.
    conn = sqlite3.connect(loaded_box.database)
    conn.execute("DELETE FROM _sqlite_migrations WHERE name >= 'm006'")
    conn.executescript(
        "DROP VIEW outbox; DROP TABLE ledger_marks; DROP TABLE outbox_acked; "
        "DROP TABLE ledger_ids; CREATE TABLE outbox (seq INTEGER PRIMARY KEY); "
        "DROP TABLE grant_set;"  # m008's
        # m009's (the ledger's `account` goes with m006's copy of the ledger)
        "DROP TABLE accounts; DROP TABLE topups_applied; DROP TABLE transfers_applied; "
        "DROP TABLE limits; ALTER TABLE codes DROP COLUMN account; "
        "ALTER TABLE codes DROP COLUMN spent;"
    )
    conn.close()
    notify = NotifySocket(tmp_path / "notify")
    try:
        daemon = daemons(loaded_box, {"NOTIFY_SOCKET": str(notify.path)})
        wait_for(lambda: notify.having("READY"), "READY=1")
        extend = notify.having("EXTEND_TIMEOUT_USEC")
        assert [m["EXTEND_TIMEOUT_USEC"] for m in extend] == [str(MIGRATION_TIMEOUT_S * 10**6)]
        assert notify.messages.index(extend[0]) < notify.messages.index(notify.having("READY")[0])
        assert daemon.stop() == 0
        # Started again on the migrated database: nothing to ask for.
        notify.messages.clear()
        daemons(loaded_box, {"NOTIFY_SOCKET": str(notify.path)})
        wait_for(lambda: notify.having("READY"), "READY=1 again")
        assert notify.having("EXTEND_TIMEOUT_USEC") == []
    finally:
        notify.close()


def test_sighup_reloads_the_config_keeps_scanning_and_a_broken_file_changes_nothing(
    loaded_box, daemons
):
    daemon = daemons(loaded_box)
    daemon.scan("DEMO-0001")
    assert daemon.wait_verdicts(1)[0]["verdict"] == "accepted"

    original = loaded_box.config_path.read_text()
    loaded_box.config_path.write_text(original.replace('debounce = "2s"', 'debounce = "0s"'))
    daemon.process.send_signal(signal.SIGHUP)
    assert "scan" in daemon.wait_log("reloaded")
    # The stdin scanner was not touched by the reload: the same stream goes on.
    daemon.scan("DEMO-0002")
    assert daemon.wait_verdicts(2)[1]["verdict"] == "accepted"

    loaded_box.config_path.write_text(original + "\n[scan]\nbogus = 1\n")
    daemon.process.send_signal(signal.SIGHUP)
    refused = daemon.wait_log("reload refused")
    assert "still running the previous configuration" in refused
    daemon.scan("DEMO-0003")
    assert daemon.wait_verdicts(3)[2]["verdict"] == "accepted"
    assert daemon.process.poll() is None
    assert daemon.stop() == 0
    assert ledger_count(loaded_box) == 3


def test_sighup_keeps_the_broker_session_when_sync_is_unchanged(loaded_box, daemons, broker):
    config = loaded_box.config_path.read_text()
    sync = f'[sync]\nenabled = true\nbroker = "{broker.url}"\n'
    loaded_box.config_path.write_text(config + sync)
    daemon = daemons(loaded_box)

    def connections() -> int:
        return broker.log.read_text().count(" as box-1 ")

    wait_for(connections, "the box connected to the broker")
    loaded_box.config_path.write_text(config.replace('debounce = "2s"', 'debounce = "1s"') + sync)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_log("reloaded")
    daemon.scan("DEMO-0004")
    daemon.wait_verdicts(1)
    wait_for(
        lambda: (
            json.loads((loaded_box.dir / "status.json").read_text())["sync"].get("outbox_depth")
            == 1
        ),
        "status after the reload",
    )
    assert connections() == 1, "the reload reconnected to the broker"
    assert daemon.stop() == 0


def test_the_on_verdict_hook_gets_the_verdict_but_never_the_code(loaded_box, daemons, tmp_path):
    out = tmp_path / "hook.out"
    hook = tmp_path / "light.sh"
    hook.write_text(
        f'#!/bin/sh\n{{ cat; echo "env $REDEEMD_VERDICT $REDEEMD_REASON"; }} >> {out}\n'
    )
    hook.chmod(0o755)
    loaded_box.config_path.write_text(
        loaded_box.config_path.read_text() + f'\n[hooks]\non_verdict = "{hook}"\n'
    )
    daemon = daemons(loaded_box)
    daemon.scan("DEMO-0005", "NOPE-0001")
    daemon.wait_verdicts(2)
    text = wait_for(
        lambda: out.exists() and out.read_text().count("env ") == 2 and out.read_text(),
        "two hook runs",
    )
    lines = text.splitlines()
    assert json.loads(lines[0])["verdict"] == "accepted" and lines[1] == "env accepted "
    assert json.loads(lines[2])["reason"] == "unknown_code"
    assert lines[3] == "env rejected unknown_code"
    assert "DEMO-0005" not in text and "NOPE-0001" not in text
    assert daemon.stop() == 0


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting for its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_hanging_hook_is_killed_with_its_children_and_never_delays_a_verdict(
    loaded_box, daemons, tmp_path
):
    pids = tmp_path / "children"
    hook = tmp_path / "stuck.sh"
    # The child is what a plain kill of the hook leaves behind.
    hook.write_text(f'#!/bin/sh\nsleep 600 &\necho $! >> "{pids}"\nwait\n')
    hook.chmod(0o755)
    loaded_box.config_path.write_text(
        loaded_box.config_path.read_text() + f'\n[hooks]\non_verdict = "{hook}"\ntimeout = "1s"\n'
    )
    daemon = daemons(loaded_box)
    daemon.scan("DEMO-0006", "DEMO-0007", "DEMO-0008")
    assert [v["verdict"] for v in daemon.wait_verdicts(3)] == ["accepted"] * 3
    line = daemon.wait_log("still running after 1 s")
    assert "killed" in line and "the verdict stands" in line
    assert daemon.stop() == 0
    children = [int(pid) for pid in pids.read_text().split()]
    assert children
    try:
        left = [pid for pid in children if _running(pid)]
        assert not left, f"the hook's children outlived it: {left}"
    finally:
        for pid in children:  # do not leave them behind when the fix is broken
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_hook_that_is_not_executable_is_a_config_error(loaded_box):
    loaded_box.config_path.write_text(
        loaded_box.config_path.read_text() + '\n[hooks]\non_verdict = "/nonexistent/light"\n'
    )
    result = loaded_box.cli("check-config")
    assert result.returncode != 0
    assert b"[hooks] on_verdict" in result.stderr and b"not an executable" in result.stderr


def test_sigterm_decides_the_scans_already_read_and_exits_zero(loaded_box, daemons):
    daemon = daemons(loaded_box)
    daemon.scan("DEMO-0009")
    daemon.wait_verdicts(1)
    daemon.scan(*(f"NOPE-{i:04d}" for i in range(200)))
    assert daemon.stop() == 0
    # Whatever the daemon printed is on disk, and nothing it recorded went unprinted.
    assert ledger_count(loaded_box) == len(daemon.verdicts)


def test_a_scanner_whose_driver_cannot_be_built_is_an_error_and_the_others_scan(
    loaded_box: Box, daemons, tmp_path: Path
):
    # A box installed without the drivers extra: importing evdev fails, as it would.
    blocked = tmp_path / "without-evdev"
    (blocked / "evdev").mkdir(parents=True)
    (blocked / "evdev" / "__init__.py").write_text(
        "raise ImportError('No module named evdev (blocked by the test)', name='evdev')\n"
    )
    with loaded_box.config_path.open("a") as config:
        config.write(
            '\n[[scanner]]\ntype = "hid"\nname = "wedge"\ndevice = "Honeywell*"\n'
            '\n[[scanner]]\ntype = "stdin"\nname = "keyboard"\n'
        )
    daemon = daemons(loaded_box, env={"PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"})
    daemon.scan("DEMO-0001")
    [verdict] = daemon.wait_verdicts(1)
    assert (verdict["verdict"], verdict["source"]) == ("accepted", "keyboard")

    def wedge() -> dict | None:
        status = json.loads(loaded_box.cli("status", "--json").stdout)
        found = [d for d in status.get("drivers", []) if d["name"] == "wedge"]
        return found[0] if found and found[0]["state"] == "error" else None

    state = wait_for(wedge, "the hid scanner shown as an error in status")
    assert "evdev" in state["message"] and "redeemd[drivers]" in state["message"]
    assert daemon.stop() == 0
    assert daemon.log().count("scanner wedge: hid scanners need the Python package evdev") == 1


def test_a_reload_that_changes_only_the_scanners_says_so(loaded_box, daemons):
    stdin = '\n[[scanner]]\ntype = "stdin"\nname = "stdin"\n'
    loaded_box.config_path.write_text(loaded_box.config_path.read_text() + stdin)
    daemon = daemons(loaded_box)
    daemon.scan("DEMO-0001")
    daemon.wait_verdicts(1)
    extra = '\n[[scanner]]\ntype = "serial"\nname = "extra"\nport = "/dev/ttyNOPE9"\n'
    loaded_box.config_path.write_text(loaded_box.config_path.read_text() + extra)
    daemon.process.send_signal(signal.SIGHUP)
    line = daemon.wait_log("reloaded")
    assert line.rstrip().endswith(f"reloaded {loaded_box.config_path}: scanners"), line
    assert "scanners: stopped none; started extra" in daemon.log()
    daemon.scan("DEMO-0002")  # the untouched stdin scanner still reads
    assert daemon.wait_verdicts(2)[1]["verdict"] == "accepted"
    assert daemon.stop() == 0
