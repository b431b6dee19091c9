"""A real PostgreSQL server for tests, started by the test itself on a free loopback port.

Like tests/broker.py for Mosquitto: `initdb` and `pg_ctl` in a temporary directory, so a
test can stop the server, restart it, or kill it with SIGKILL and prove that what was
committed before is still there. A PostgreSQL the machine happens to run is never used.

initdb refuses to run as root, so when the tests run as root every server command runs
as the `postgres` system user (runuser), in a directory that user owns. A missing
PostgreSQL fails the test with what to install.

    >>> server = PostgreSQL().start()
    >>> url = server.create_database()       # postgresql://postgres@127.0.0.1:PORT/test_1
    >>> server.kill(); server.start()         # a crash, then recovery from the WAL
    >>> server.cleanup()

Fixtures, registered in conftest.py: `postgresql` (one server for the whole session,
started by the first test that asks for it), `postgresql_url` (a fresh database on it for
one test) and `own_postgresql` (a server of the test's own, to stop or kill).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from broker import free_port

INSTALL = "postgresql is not installed: run 'sudo apt-get install postgresql' (./dev test does it)"
SUPERUSER = "postgres"


def _binaries() -> Path:
    """The directory holding initdb and pg_ctl: on PATH, or Debian's versioned directory
    (the Debian package puts only wrappers, not initdb, on PATH)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not versions:
        pytest.fail(INSTALL)
    return versions[-1].parent


class PostgreSQL:
    """One PostgreSQL cluster in its own temporary directory, on its own port."""

    _databases = itertools.count(1)

    def __init__(self, port: int | None = None):
        self.bin = _binaries()
        # Not under pytest's tmp_path: its parents are root's and 0700, which the
        # postgres user could not even pass through. The directory is the server's.
        self.dir = Path(tempfile.mkdtemp(prefix="redeemd-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "run"
        self.socket_dir.mkdir()
        self.log = self.dir / "postgresql.log"
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            try:
                user = pwd.getpwnam(SUPERUSER)
            except KeyError:
                pytest.fail(f"no '{SUPERUSER}' system user to run PostgreSQL as: {INSTALL}")
            for path in (self.dir, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._initdb()

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(self.bin / command[0]), *command[1:]]
        if self._as_postgres:
            argv = ["runuser", "-u", SUPERUSER, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def _initdb(self) -> None:
        done = self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"initdb failed: {done.stderr[-2000:]}")

    @property
    def url(self) -> str:
        """The URL of the `postgres` database; `create_database` gives a fresh one."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (first line of postmaster.pid)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start(self) -> PostgreSQL:
        """Start the postmaster as this process's child (through runuser when root), and
        return once it accepts connections. Not `pg_ctl start`: it leaves the postmaster
        to init, and a killed postmaster nobody reaps stays a zombie whose pid, still in
        postmaster.pid, makes the next start refuse."""
        assert self.process is None or self.process.poll() is not None, "already running"
        argv = [
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1",
            # Tests open many short-lived connections; the default 100 is reached by a
            # suite that forgets to close a few.
            "-c", "max_connections=200",
        ]  # fmt: skip
        if self._as_postgres:
            argv = ["runuser", "-u", SUPERUSER, "--", *argv]
        log = self.log.open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"PostgreSQL exited at start: {self.log.read_text()[-2000:]}")
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"PostgreSQL did not accept connections: {self.log.read_text()[-2000:]}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """A clean shutdown (fast mode: open sessions are ended, then a checkpoint)."""
        if self.pid is not None:
            done = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
            if done.returncode != 0:
                pytest.fail(f"PostgreSQL did not stop: {done.stdout}{done.stderr}")
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait(30)
            self.process = None

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and then to every process it started, so
        no backend finishes a commit after the "crash". The next start recovers from
        the WAL, as after a power cut."""
        pid = self.pid
        if pid is None:
            self._reap()
            return
        children = _children(pid)
        os.kill(pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        # Until the last of them is gone, its shared memory is still attached and a new
        # postmaster refuses to start.
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in (pid, *children)):
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL processes {pid} {children} outlived SIGKILL")
            time.sleep(0.02)
        self._reap()  # runuser, our child, exits once its postmaster is gone

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"test_{next(self._databases)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def cleanup(self) -> None:
        """Stop the server (or end what is left of it) and remove its directory."""
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    # A killed process whose parent has not reaped it yet is a zombie: it holds nothing.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgreSQL]:
    """One PostgreSQL for the whole session, started only when a test asks for it.
    Tests share it through `postgresql_url` (a database each); a test that stops or
    kills the server takes `own_postgresql` instead."""
    server = PostgreSQL().start()
    yield server
    server.cleanup()


@pytest.fixture
def postgresql_url(postgresql: PostgreSQL) -> str:
    """A fresh, empty database on the session's server, for this test alone."""
    return postgresql.create_database()


@pytest.fixture
def own_postgresql() -> Iterator[PostgreSQL]:
    """A PostgreSQL of this test's own, which it may stop, restart or kill."""
    server = PostgreSQL().start()
    yield server
    server.cleanup()
