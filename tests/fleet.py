"""A fleet for end-to-end tests: one reference-backend directory (keys, backend.db with
the demo cards and FLEET-0001.. codes issued through `redeemd-backend issue`), boxes
that trust it and import those batches with `redeemd import`, each run as a real
`redeemd run --json` process, and the backend's real `publish` / `collect` processes.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from backend_helpers import CliProcess, make_backend
from conftest import ROOT, wait_for

from backend.store import DATABASE_ENV, Store

WAIT = 120.0
CODES = 1200


def backend_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


class Daemon:
    """`redeemd run --json` as a real process: scans in on stdin, verdict lines out."""

    def __init__(self, box: FleetBox):
        self.box = box
        self.verdicts: list[dict] = []
        self.stderr = open(box.dir / "stderr.txt", "ab")  # noqa: SIM115 (closed in wait)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "-c", str(box.config), "run", "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip():
                self.verdicts.append(json.loads(line))

    def scan(self, *codes: str) -> None:
        self.process.stdin.write(b"".join(c.encode() + b"\n" for c in codes))
        self.process.stdin.flush()

    def wait_verdicts(self, n: int) -> list[dict]:
        def enough():
            if self.process.poll() is not None:
                raise AssertionError(f"{self.box.id} exited: {self.box.stderr()[-2000:]}")
            return len(self.verdicts) >= n

        wait_for(enough, f"{n} verdicts from {self.box.id}")
        return self.verdicts

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self._wait()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self._wait()

    def _wait(self) -> int:
        code = self.process.wait(WAIT)
        self._reader.join(10)
        self.stderr.close()
        return code


class FleetBox:
    """One box's directory: its config (trusting the fleet's backend) and database."""

    def __init__(
        self,
        directory: Path,
        backend: Path,
        box_id: str,
        broker_url: str,
        extra: str = "",
        state_dir: Path | None = None,
    ):
        """`extra` is appended to the config ([[scanner]] blocks, [api] ...); the state
        (database, status.json) goes in `state_dir`, by default `directory`."""
        self.dir = directory
        self.id = box_id
        self.state_dir = state_dir or directory
        self.database = self.state_dir / "redeemd.db"
        self.config = directory / "config.toml"
        self.extra = extra
        self.backend = backend
        self.broker_url = broker_url
        directory.mkdir(parents=True)
        self.write_config()

    def write_config(self, extra: str | None = None) -> None:
        if extra is not None:
            self.extra = extra
        self.config.write_text(
            f"""
[box]
id = "{self.id}"
merchant = "demo"
store = "store-1"
state_dir = "{self.state_dir}"
timezone = "UTC"

[trust]
root_key_files = ["{self.backend}/root.pub"]
code_key_file = "{self.backend}/code.key"

[sync]
enabled = true
broker = "{self.broker_url}"
keepalive = "5s"
status_every = "1s"
request_retry = "2s"
{self.extra}
"""
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "-c", str(self.config), *args],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip

    def query(self, sql: str, *args) -> list[tuple]:
        conn = sqlite3.connect(self.database, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def ledger(self) -> list[tuple[int, str]]:
        """(box sequence, record id) of every ledger row, in order."""
        rows = self.query("SELECT seq, id FROM ledger ORDER BY seq")
        return [(seq, str(uuid.UUID(bytes=rid))) for seq, rid in rows]

    def outbox(self) -> int:
        return self.query("SELECT COUNT(*) FROM outbox")[0][0]

    def cache_seq(self) -> int:
        rows = self.query("SELECT last_seq FROM trust WHERE merchant = 'demo'")
        return rows[0][0] if rows else 0

    def stderr(self) -> str:
        path = self.dir / "stderr.txt"
        return path.read_text(errors="replace") if path.exists() else ""


class Fleet:
    """A backend directory (keys, backend.db with cards and codes issued) and its boxes."""

    def __init__(self, directory: Path, broker):
        self.dir = directory
        self.broker = broker
        self.backend = directory / "backend"
        make_backend(self.backend)
        codes = directory / "codes.csv"
        codes.write_text(
            "code,card_id\n" + "".join(f"FLEET-{i:04d},1\n" for i in range(1, CODES + 1))
        )
        for kind, source in (("cards", ROOT / "backend/demo/cards.json"), ("issue", codes)):
            self.issue(kind, source)
        self.processes: list[CliProcess] = []
        self.daemons: list[Daemon] = []

    def issue(self, kind: str, source: Path, *extra: str) -> Path:
        seq = self.latest_seq() + 1
        out = self.backend / f"{seq:04d}-{kind}.rdb"
        backend_cli(
            "issue", "--dir", str(self.backend), "--merchant", "demo", "--kind", kind,
            "--input", str(source), "--out", str(out), *extra,
        )  # fmt: skip
        return out

    def box(
        self,
        box_id: str,
        broker_url: str | None = None,
        extra: str = "",
        state_dir: Path | None = None,
    ) -> FleetBox:
        """A box with the cards and codes imported from files, as a technician would."""
        box = FleetBox(
            self.dir / box_id, self.backend, box_id, broker_url or self.broker.url, extra,
            state_dir,
        )  # fmt: skip
        files = sorted(str(p) for p in self.backend.glob("000[12]-*.rdb"))
        result = box.cli("import", *files)
        assert result.returncode == 0, result.stderr
        # The collector takes events only from boxes registered for their merchant.
        backend_cli("box", "add", "--dir", str(self.backend), "--merchant", "demo", box_id)
        return box

    def run(self, box: FleetBox) -> Daemon:
        daemon = Daemon(box)
        self.daemons.append(daemon)
        return daemon

    def collector(self) -> CliProcess:
        return self._start("collect", "--dir", str(self.backend), "--broker", self.broker.url)

    def publisher(self) -> CliProcess:
        return self._start(
            "publish", "--dir", str(self.backend), "--broker", self.broker.url, "--poll", "0.2s"
        )

    def _start(self, *args: str) -> CliProcess:
        process = CliProcess(*args)
        self.processes.append(process)
        return process

    def query(self, sql: str, *args) -> list[tuple]:
        """`sql` (with ? placeholders) on the backend's store: backend.db, or the
        PostgreSQL database in $REDEEMD_BACKEND_DATABASE when a test sets it."""
        if os.environ.get(DATABASE_ENV):
            store = Store.open(self.backend)
            try:
                return [tuple(row) for row in store.engine.execute(sql, args).fetchall()]
            finally:
                store.close()
        conn = sqlite3.connect(self.backend / "backend.db", timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def latest_seq(self) -> int:
        path = self.backend / "backend.db"
        if not path.exists() and not os.environ.get(DATABASE_ENV):
            return 0
        return self.query("SELECT COALESCE(MAX(seq), 0) FROM batches")[0][0]

    def collected(self, box: FleetBox) -> list[tuple[int, str]]:
        return self.query("SELECT seq, id FROM events WHERE box = ? ORDER BY seq", box.id)

    def all_collected(self, box: FleetBox) -> bool:
        """Every ledger row of the box is in backend.db and its outbox is empty."""
        return box.outbox() == 0 and self.collected(box) == box.ledger()

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon._wait()
        for process in self.processes:
            process.stop()
