"""The local API of the real `redeemd run` process: scans on stdin become events on the
socket, the POS application redeems over it, and the example client works against it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from api_helpers import WAIT, Client, wait_for
from conftest import ROOT, Box, read_json_lines, write_box


def api_box(box: Box, socket: Path) -> Box:
    """The loaded box, with its API socket in its own directory."""
    return write_box(box.dir, box.keyset, extra=f'\n[api]\nsocket = "{socket}"\n')


class Daemon:
    def __init__(self, box: Box, as_json: bool = True):
        self.box = box
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "-c", str(box.config_path), "run",
             *(["--json"] if as_json else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip

    def scan(self, code: str) -> None:
        self.proc.stdin.write(code.encode() + b"\n")
        self.proc.stdin.flush()

    def connect(self, path: Path) -> Client:
        def attempt():
            if self.proc.poll() is not None:
                raise AssertionError(f"redeemd exited: {self.proc.stderr.read().decode()}")
            try:
                return Client(path)
            except (FileNotFoundError, ConnectionRefusedError):
                return None

        return wait_for(attempt, f"redeemd to serve {path}")  # type: ignore[return-value]

    def finish(self) -> tuple[int, list[dict], str]:
        """Close stdin (the scanner ends, so does the daemon) and collect the output."""
        out, err = self.proc.communicate(timeout=WAIT)
        return self.proc.returncode, read_json_lines(out), err.decode()


@pytest.fixture
def daemon_box(loaded_box, tmp_path) -> tuple[Box, Path]:
    socket = tmp_path / "run" / "api.sock"
    return api_box(loaded_box, socket), socket


def test_scan_on_stdin_is_an_event_and_the_pos_confirms_it_over_the_socket(daemon_box):
    box, socket = daemon_box
    daemon = Daemon(box)
    pos = daemon.connect(socket)
    assert pos.request({"cmd": "subscribe"})["ok"] is True
    status = pos.request({"cmd": "status"})["status"]
    assert status["api"]["subscribers"] == 1 and status["drivers"][0]["name"] == "stdin"

    daemon.scan("DEMO-0001")
    event = pos.event()
    assert event["event"] == "verdict" and event["verdict"] == "accepted"
    assert event["source"] == "stdin" and event["box_seq"] == 1

    daemon.scan("GIFT-0001")  # a two-phase card: the scan only checks
    checked = pos.event()
    assert checked["event"] == "checked" and checked["balance"] == 5000
    confirm = {"cmd": "redeem", "check_id": checked["check_id"], "amount": 1250,
               "operator": "anna", "key": str(uuid.uuid4())}  # fmt: skip
    answer = pos.request(confirm)
    assert answer["verdict"]["verdict"] == "accepted" and answer["verdict"]["balance"] == 3750
    assert pos.request(confirm)["replayed"] is True  # a retry does not charge twice

    manual = pos.request({"cmd": "manual", "code": "DEMO-0002"})
    assert manual["verdict"]["source"] == "manual"
    pos.close()

    code, printed, stderr = daemon.finish()
    assert code == 0, stderr
    assert [p["action"] for p in printed] == ["redeem", "check", "redeem", "redeem"]
    assert not socket.exists()
    conn = sqlite3.connect(box.database)
    rows = conn.execute("SELECT action, amount, operator, source FROM ledger ORDER BY seq")
    assert rows.fetchall() == [
        ("redeem", None, None, "stdin"),
        ("check", None, None, "stdin"),
        ("redeem", 1250, "anna", "stdin"),
        ("redeem", None, None, "manual"),
    ]
    assert conn.execute("SELECT COUNT(*) FROM api_requests").fetchone() == (1,)
    for text in ("DEMO-0001", "GIFT-0001", "DEMO-0002"):
        assert text not in stderr and text not in json.dumps(printed)


def test_sigterm_closes_clients_and_removes_the_socket(daemon_box):
    box, socket = daemon_box
    daemon = Daemon(box)
    pos = daemon.connect(socket)
    pos.request({"cmd": "subscribe"})
    daemon.proc.send_signal(signal.SIGTERM)
    assert pos.closed_by_server()
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    assert not socket.exists()


def test_daemon_without_a_usable_socket_logs_what_to_do_and_keeps_scanning(loaded_box):
    (loaded_box.dir / "not-a-dir").write_text("")
    box = api_box(loaded_box, loaded_box.dir / "not-a-dir" / "api.sock")
    daemon = Daemon(box)
    daemon.scan("DEMO-0001")
    code, printed, stderr = daemon.finish()
    assert code == 0, stderr
    assert [p["verdict"] for p in printed] == ["accepted"]
    warnings = [line for line in stderr.splitlines() if "local API disabled" in line]
    assert len(warnings) == 1, stderr
    assert "[api] socket" in warnings[0] and "not-a-dir" in warnings[0]


def test_api_can_be_switched_off(loaded_box, tmp_path):
    box = write_box(loaded_box.dir, loaded_box.keyset,
                    extra=f'\n[api]\nenabled = false\nsocket = "{tmp_path}/x.sock"\n')  # fmt: skip
    daemon = Daemon(box)
    daemon.scan("DEMO-0001")
    code, printed, stderr = daemon.finish()
    assert code == 0 and [p["verdict"] for p in printed] == ["accepted"], stderr
    assert not (tmp_path / "x.sock").exists() and "local API" not in stderr


def test_example_pos_client_confirms_a_checked_card_against_the_real_daemon(daemon_box):
    box, socket = daemon_box
    daemon = Daemon(box)
    daemon.connect(socket).close()
    example = [sys.executable, str(ROOT / "examples" / "pos_client.py"), "--socket", str(socket)]
    status = subprocess.run([*example, "--status"], capture_output=True, timeout=WAIT)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"]["box"] == "box-1"

    client = subprocess.Popen(
        [*example, "--amount", "1250", "--operator", "till-2", "--count", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Subscribed once the server counts a subscriber; then scan.
    watcher = Client(socket)
    wait_for(
        lambda: watcher.request({"cmd": "status"})["status"]["api"]["subscribers"] >= 1,
        "the example client to subscribe",
    )
    watcher.close()
    daemon.scan("GIFT-0001")
    out, err = client.communicate(timeout=WAIT)
    assert client.returncode == 0, err
    lines = read_json_lines(out)
    assert [line["what"] for line in lines] == ["checked", "verdict", "redeemed"]
    assert lines[2]["verdict"]["balance"] == 3750

    manual = subprocess.run([*example, "--manual", "DEMO-0003"], capture_output=True,
                            timeout=WAIT)  # fmt: skip
    assert json.loads(manual.stdout)["verdict"]["source"] == "manual"

    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    conn = sqlite3.connect(box.database)
    assert conn.execute(
        "SELECT amount, operator FROM ledger WHERE action = 'redeem' AND card_id = 5"
    ).fetchall() == [(1250, "till-2")]


def test_redeem_retried_after_kill_9_and_restart_is_answered_not_redeemed_again(daemon_box):
    box, socket = daemon_box
    request = {"cmd": "redeem", "code": "GIFT-0001", "amount": 900, "key": str(uuid.uuid4())}
    daemon = Daemon(box)
    first = daemon.connect(socket).request(request)
    assert first["verdict"]["verdict"] == "accepted"
    daemon.proc.kill()  # the answer was lost, as far as the POS application knows
    daemon.proc.communicate(timeout=WAIT)

    restarted = Daemon(box)  # the socket file left behind is replaced
    again = restarted.connect(socket).request(request)
    assert again["replayed"] is True and again["verdict"] == first["verdict"]
    code, _, stderr = restarted.finish()
    assert code == 0, stderr
    conn = sqlite3.connect(box.database)
    assert conn.execute("SELECT COUNT(*), MIN(balance) FROM ledger").fetchone() == (1, 4100)


def test_a_deeply_nested_line_is_refused_and_the_api_keeps_serving_everyone(daemon_box):
    box, socket = daemon_box
    daemon = Daemon(box)
    bystander = daemon.connect(socket)
    assert bystander.request({"cmd": "subscribe"})["ok"] is True
    attacker = daemon.connect(socket)
    nested = b"[" * 30_000 + b"]" * 30_000  # 60 KB: under the 64 KiB line limit
    attacker.send(nested + b"\n")
    refused = attacker.answer()
    assert refused["ok"] is False and refused["error"] == "bad_json", refused
    assert "nested" in refused["message"]
    # The same connection, the other one and a new one are all still served.
    assert attacker.request({"cmd": "status"})["ok"] is True
    assert bystander.request({"cmd": "status"})["status"]["api"]["clients"] == 2
    assert daemon.connect(socket).request({"cmd": "check", "code": "DEMO-0001"})["ok"] is True
    daemon.scan("DEMO-0001")
    assert bystander.event()["verdict"] == "accepted"
    for client in (attacker, bystander):
        client.close()
    code, printed, stderr = daemon.finish()
    assert code == 0, stderr
    assert [p["verdict"] for p in printed] == ["accepted"]
    assert "Traceback" not in stderr and "I/O loop failed" not in stderr


def test_the_console_says_redeemed_and_reversed(daemon_box):
    box, socket = daemon_box
    daemon = Daemon(box, as_json=False)
    pos = daemon.connect(socket)
    pos.request({"cmd": "subscribe"})
    daemon.scan("DEMO-0001")
    redeemed = pos.event()
    reversal = pos.request({"cmd": "reverse", "record_id": redeemed["record_id"]})
    assert reversal["verdict"]["action"] == "reverse"
    pos.close()
    out, err = daemon.proc.communicate(timeout=WAIT)
    lines = out.decode().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["accepted", "redeemed"],
        ["accepted", "reversed"],
    ]
    assert "reverseed" not in out.decode()
