"""`redeemd backup` while the daemon scans, and the restore docs/operations.md describes
(stop, move the damaged files aside, put the copy in place, start): the restored box
continues its ledger from the copy without a gap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

from conftest import ROOT


def start(box) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "-c", str(box.config_path), "run", "--json"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def scan(daemon: subprocess.Popen, code: str) -> dict:
    daemon.stdin.write(code.encode() + b"\n")
    daemon.stdin.flush()
    return json.loads(daemon.stdout.readline())


def test_backup_while_scanning_and_restore_continue_the_ledger(loaded_box, tmp_path):
    daemon = start(loaded_box)
    try:
        for i in range(1, 4):
            assert scan(daemon, f"DEMO-{i:04d}")["verdict"] == "accepted"
        copy = tmp_path / "backup" / "redeemd-copy.db"
        copy.parent.mkdir()
        result = loaded_box.cli("backup", str(copy))  # the daemon is still running
        assert result.returncode == 0, result.stderr
        assert b"ledger up to seq 3" in result.stdout
        assert scan(daemon, "DEMO-0004")["box_seq"] == 4  # after the backup: not in it
        again = loaded_box.cli("backup", str(copy))
        assert again.returncode != 0 and b"already exists" in again.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0

    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT MAX(seq) FROM ledger").fetchone()[0] == 3
    finally:
        conn.close()
    assert not list(copy.parent.glob("*-wal")), "the copy is one self-contained file"

    # Restore as docs/operations.md says.
    damaged = loaded_box.dir / "damaged"
    damaged.mkdir()
    for path in loaded_box.dir.glob("redeemd.db*"):
        path.rename(damaged / path.name)
    shutil.copyfile(copy, loaded_box.database)
    daemon = start(loaded_box)
    try:
        # DEMO-0004 was redeemed after the backup: the restored box does not know it.
        verdict = scan(daemon, "DEMO-0004")
        assert verdict["verdict"] == "accepted" and verdict["box_seq"] == 4
        assert scan(daemon, "DEMO-0001").get("reason") == "already_redeemed"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_backup_into_a_missing_directory_is_one_clear_line(loaded_box, tmp_path):
    result = loaded_box.cli("backup", str(tmp_path / "nowhere" / "copy.db"))
    assert result.returncode != 0
    assert result.stderr.decode().count("\n") == 1 and b"not a directory" in result.stderr
    assert b"Traceback" not in result.stderr
