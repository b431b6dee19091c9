"""`redeemd status` beside a real `redeemd run` process and a real Mosquitto: drivers,
cache, time floor against the clock, outbox depth and age, the broker connection and
the last errors, in `--json` and in the text a technician reads.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import CREATED, ROOT, Box, wait_for
from test_sync_box import sync_box


def status(box: Box) -> dict:
    result = box.cli("status", "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


@pytest.fixture
def daemon():
    """Start `redeemd run` for a box, scans on its standard input; stopped at the end."""
    processes: list[subprocess.Popen] = []

    def start(box: Box) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "-c", str(box.config_path), "run", "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.terminate()
        process.communicate(timeout=30)


def test_status_of_a_stopped_box_shows_cache_floor_clock_and_outbox(loaded_box):
    loaded_box.cli("run", "--json", input=b"DEMO-0001\nDEMO-0002\n")
    info = status(loaded_box)
    assert info["cache_seq"] == 2 and info["cache_age_s"] >= 0
    assert info["time_floor"] == CREATED
    assert info["clock"] - info["time_floor"] == info["clock_minus_floor_s"] > 0
    assert info["clock_behind_floor"] is False
    assert info["outbox_depth"] == 2 and info["outbox_oldest_age_s"] >= 0
    assert info["daemon"] == "not running"
    assert info["broker"] is None and info["broker_connected"] is None
    assert info["last_errors"] == []
    text = loaded_box.cli("status").stdout.decode()
    assert "clock_minus_floor_s:" in text and "last error: none" in text


def test_status_of_a_running_box_follows_the_broker_connection(tmp_path, keyset, broker, daemon):
    box = sync_box(tmp_path, keyset, broker)
    process = daemon(box)
    process.stdin.write(b"DEMO-0001\n")
    process.stdin.flush()
    info = wait_for(
        lambda: (s := status(box))["broker_connected"] and s["ledger_seq"] == 1 and s,
        "the running daemon connected to the broker",
    )
    assert info["daemon"] == f"running, pid {process.pid}"
    assert info["broker"] == broker.url
    assert info["outbox_depth"] == 1, "no backend acknowledges it"
    (driver,) = info["drivers"]
    assert (driver["name"], driver["kind"]) == ("stdin", "stdin")
    assert info["sync"]["connected"] is True
    broker.stop()
    info = wait_for(
        lambda: (s := status(box))["broker_connected"] is False and s["last_errors"] and s,
        "the lost connection in status",
    )
    assert any(error.startswith("sync last_error: ") for error in info["last_errors"])
    text = box.cli("status").stdout.decode()
    assert "sync connected: no" in text
    assert "last error: sync last_error:" in text
    assert "scanner stdin: stdin" in text


def test_a_killed_daemon_is_not_running_even_as_a_zombie_and_its_scanners_are_stopped(
    loaded_box, daemon
):
    process = daemon(loaded_box)
    wait_for(
        lambda: (s := status(loaded_box))["drivers"] and s["drivers"][0]["state"] == "connected",
        "the running daemon's stdin scanner",
    )
    process.kill()  # not reaped: a zombie, which still answers kill(pid, 0)
    wait_for(lambda: _zombie(process.pid), "the killed daemon to be a zombie")
    for _ in ("zombie", "reaped"):
        info = status(loaded_box)
        assert info["daemon"] == "not running", info
        (driver,) = info["drivers"]
        assert (driver["state"], driver["last_state"]) == ("stopped", "connected")
        assert "redeemd is not running" in driver["message"]
        text = loaded_box.cli("status").stdout.decode()
        assert "scanner stdin: stdin stopped (redeemd is not running" in text, text
        assert "connected," not in text
        process.wait(timeout=30)


def test_status_text_says_yes_no_and_none_yet_instead_of_python_values(box):
    box.cli("run", input=b"DEMO-0001\n")  # no batch: no cache, no floor, nothing synced
    text = box.cli("status").stdout.decode()
    for word in ("None", "False", "True"):
        assert word not in text, text
    assert "stale: yes" in text and "clock_behind_floor: no" in text
    assert "time_floor: none yet" in text and "cache_age_s: no batch applied yet" in text
    assert "broker: none (sync is disabled)" in text


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
