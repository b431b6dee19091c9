"""examples/pos_client.py against the real `redeemd run`: its one-shot commands, and a
watching client that outlives a daemon restart (issue 16.17)."""

# ruff: noqa: F811  (the daemon_box fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

from api_helpers import WAIT, Client, wait_for
from conftest import ROOT, read_json_lines
from test_api_service import Daemon, daemon_box  # noqa: F401  (fixture)


def example(socket) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "pos_client.py"), "--socket", str(socket)]


def once(socket, *args: str) -> dict:
    result = subprocess.run([*example(socket), *args], capture_output=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr.decode()
    (line,) = read_json_lines(result.stdout)
    return line


def subscribers(socket) -> int:
    client = Client(socket)
    try:
        return client.request({"cmd": "status"})["status"]["api"]["subscribers"]
    finally:
        client.close()


def test_the_example_client_checks_redeems_and_reverses(daemon_box):
    box, socket = daemon_box
    daemon = Daemon(box)
    daemon.connect(socket).close()

    check = once(socket, "--check", "DEMO-0005")
    assert (check["what"], check["verdict"]["action"]) == ("check", "check")
    redeem = once(socket, "--redeem", "GIFT-0001", "--amount", "700", "--operator", "till-3")
    assert redeem["verdict"]["verdict"] == "accepted" and redeem["verdict"]["balance"] == 4300
    assert redeem["replayed"] is False
    reverse = once(socket, "--reverse", redeem["verdict"]["record_id"], "--operator", "till-3")
    assert reverse["verdict"]["action"] == "reverse" and reverse["verdict"]["balance"] == 5000
    again = once(socket, "--reverse", redeem["verdict"]["record_id"])
    assert again["verdict"]["reason"] == "already_reversed"
    uses = once(socket, "--redeem", "LUNCH-0001", "--uses", "2")
    assert uses["verdict"]["uses_left"] == 1

    code, _, stderr = daemon.finish()
    assert code == 0, stderr


def test_the_example_client_reconnects_when_the_daemon_restarts(daemon_box):
    box, socket = daemon_box
    daemon = Daemon(box)
    daemon.connect(socket).close()
    watcher = subprocess.Popen(
        [*example(socket), "--count", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    printed: list[dict] = []
    reader = threading.Thread(
        target=lambda: printed.extend(json.loads(line) for line in watcher.stdout), daemon=True
    )
    reader.start()
    try:
        wait_for(lambda: subscribers(socket) == 1, "the example client to subscribe")
        daemon.scan("DEMO-0001")
        wait_for(lambda: printed, "the first verdict printed")

        daemon.proc.send_signal(signal.SIGTERM)  # an update restarts redeemd
        code, _, stderr = daemon.finish()
        assert code == 0, stderr
        assert watcher.poll() is None, "the client exited when redeemd went away"

        restarted = Daemon(box)
        restarted.connect(socket).close()
        wait_for(lambda: subscribers(socket) == 1, "the example client to subscribe again")
        restarted.scan("DEMO-0002")
        assert watcher.wait(timeout=WAIT) == 0, watcher.stderr.read().decode()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    reader.join(WAIT)
    err = watcher.stderr.read()
    assert [(line["what"], line["verdict"], line["box_seq"]) for line in printed] == [
        ("verdict", "accepted", 1),
        ("verdict", "accepted", 2),
    ]
    assert "reconnecting" in err.decode() and "subscribed again" in err.decode()
    code, _, stderr = restarted.finish()
    assert code == 0, stderr
