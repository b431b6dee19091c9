"""The two SQL engines the backend store runs on, SQLite and PostgreSQL, and only what
differs between them.

backend/store.py holds the store's logic once, in SQL both engines accept: `?`
placeholders, `INSERT ... ON CONFLICT DO NOTHING`, SQLite's column types. An engine
runs that SQL on its connection and supplies the rest:

- placeholders: SQLite takes `?` as written; PostgreSQL (psycopg) gets `%s`;
- the write transaction: SQLite's `BEGIN IMMEDIATE` takes the one database-wide write
  lock up front. PostgreSQL has no such lock and lets writers run side by side, so a
  transaction that must not interleave with another (the batch-sequence allocator, a
  box's high-water mark) takes named transaction-scoped advisory locks (`lock`), which
  are a no-op on SQLite;
- schema: the migration steps are SQLite DDL; PostgreSQL gets them with INTEGER as
  BIGINT (box sequences and millisecond times pass 2^31), BLOB as BYTEA and no
  `WITHOUT ROWID`;
- migrations: sqlite-utils' `Migrations` on SQLite (its `_sqlite_migrations` table, as
  before); on PostgreSQL a `redeemd_migrations` table with the same step names, applied
  in one transaction under an advisory lock so processes starting together do not race.

    >>> engine = open_engine(Path("keys/"), "postgresql://redeemd@db.example/redeemd", STEPS)
    >>> with engine.transaction():
    ...     engine.lock([("batches", "acme")])
    ...     engine.execute("SELECT COALESCE(MAX(seq), 0) FROM batches WHERE merchant = ?", ["acme"])
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

FILENAME = "backend.db"
MIGRATION_SET = "redeemd-backend"

Step = tuple[str, str]
"""A named migration step: (name, SQLite DDL script)."""


class EngineError(RuntimeError):
    """The database cannot be opened or migrated; the message says which and why."""


class Engine:
    """A connection to the store's database and the SQL dialect it speaks."""

    name: str
    migrations_table: str
    """Where the applied migration steps are recorded (name column: the step's name)."""
    conn: Any
    """The driver's connection (sqlite3 or psycopg), for tests and tools that look inside."""
    errors: tuple[type[Exception], ...]
    """What the driver raises when a statement or the connection fails."""

    @property
    def broken(self) -> bool:
        """True once the connection is lost for good (a restarted server): only a new
        connection helps. A SQLite file never is."""
        return False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement written with `?` placeholders; returns the driver's cursor."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    def insert_new(self, table: str, columns: Sequence[str], rows: list[Sequence[Any]]) -> None:
        """Inside a transaction: insert `rows` into `table`, skipping any whose key is
        already there (ON CONFLICT DO NOTHING), as one bulk operation."""
        if rows:
            marks = ", ".join("?" * len(columns))
            self.executemany(
                f"INSERT INTO {table}({', '.join(columns)}) VALUES ({marks}) "
                "ON CONFLICT DO NOTHING",
                rows,
            )

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """A write transaction: commit at the end of the block, roll back on an error."""
        raise NotImplementedError

    def lock(self, keys: Iterable[tuple[str, ...]]) -> None:
        """Inside a transaction: wait until no other transaction holds any of `keys`, and
        hold them until this one ends. Keys are taken in one global order, so two
        transactions asking for overlapping sets cannot deadlock."""

    def close(self) -> None:
        self.conn.close()


def open_engine(directory: Path, database: str | None, steps: Sequence[Step]) -> Engine:
    """The store's database: `{directory}/backend.db` when `database` is None, else the
    PostgreSQL database at the URL `database` (postgresql://user@host:port/name)."""
    if database is None:
        directory.mkdir(parents=True, exist_ok=True)
        return SQLite.open(directory / FILENAME, steps)
    check_url(database)
    return PostgreSQL.open(database, steps)


def check_url(database: str) -> None:
    """Refuse a database URL no retry can fix: an unknown kind, or PostgreSQL without
    its driver installed. (A server that does not answer is worth retrying.)"""
    if urlsplit(database).scheme not in ("postgresql", "postgres"):
        raise EngineError(
            f"unknown database {redact(database)!r}: give a postgresql://user@host:port/name "
            "URL, or none for the SQLite file backend.db in the backend's directory"
        )
    try:
        import psycopg  # noqa: F401  (only a backend on PostgreSQL needs the driver)
    except ImportError:
        raise EngineError(
            f"{redact(database)} needs the PostgreSQL driver, which is not installed: "
            "install redeemd with its postgresql extra (pip install 'redeemd[postgresql]')"
        ) from None


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


# ------------------------------------------------------------------ SQLite


class SQLite(Engine):
    name = "sqlite"
    migrations_table = Migrations.migrations_table

    errors = (sqlite3.Error,)

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        # The hot path: the statement as written, straight to sqlite3.
        self.execute = conn.execute  # type: ignore[method-assign, assignment]

    @classmethod
    def open(cls, path: Path, steps: Sequence[Step]) -> SQLite:
        # Processes starting together (publish, collectors) would race to switch to WAL and
        # migrate; SQLite answers a read lock upgrading to a write lock with an immediate
        # "database is locked", not a wait. One opener at a time, then.
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _private(path)
            try:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                # Several processes share the file; a writer waits for another's commit.
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                migrations = Migrations(MIGRATION_SET)
                for name, script in steps:
                    migrations(name=name)(_script_step(script))
                migrations.apply(Database(conn, recursive_triggers=False, execute_plugins=False))
            except sqlite3.Error as exc:
                raise EngineError(f"cannot open backend database {path}: {exc}") from None
        return cls(conn)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock up front, so reading the next sequence and
        # inserting it cannot interleave with another writer: `lock` has nothing to add.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")


def _script_step(script: str):  # noqa: ANN202  (a sqlite-utils migration function)
    def step(db: Database) -> None:
        db.executescript(script)

    return step


def _private(path: Path) -> None:
    """Make `path` readable by the backend's user only (0600), as its keys are, before
    SQLite writes to it: it holds every box's ledger and every batch. SQLite gives the
    -wal and -shm files the database's mode. A file an older release made 0644 is
    narrowed too."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        # Missing, or another user's (SQLite then says what it cannot open).
        with contextlib.suppress(OSError):
            if name.stat().st_mode & 0o077:
                name.chmod(0o600)


# ------------------------------------------------------------------ PostgreSQL


class PostgreSQL(Engine):
    name = "postgresql"
    migrations_table = "redeemd_migrations"

    def __init__(self, conn: Any, url: str):
        import psycopg

        self.conn = conn
        self.url = url
        self.errors = (psycopg.Error,)
        self._statements: dict[str, str] = {}

    @property
    def broken(self) -> bool:
        return bool(self.conn.closed or self.conn.broken)

    @classmethod
    def open(cls, url: str, steps: Sequence[Step]) -> PostgreSQL:
        import psycopg  # present: open_engine checked the URL first

        try:
            # autocommit: a statement outside `transaction()` commits by itself, as on
            # SQLite with isolation_level=None; `transaction()` sends BEGIN/COMMIT.
            conn = psycopg.connect(url, autocommit=True)
            # psycopg prepares a statement run 5 times; PostgreSQL then may keep a
            # generic plan chosen while the tables were small: a seq scan of events
            # per collected message, 10x slower once they grow (measured on the
            # collector's duplicate and conflict look-ups: 27 ms a message). A custom
            # plan per execution costs a fraction of a millisecond of planning.
            conn.execute("SET plan_cache_mode = force_custom_plan")
        except psycopg.Error as exc:
            raise EngineError(f"cannot connect to {redact(url)}: {exc}".strip()) from None
        engine = cls(conn, url)
        try:
            engine._migrate(steps)
        except psycopg.Error as exc:
            conn.close()
            raise EngineError(f"cannot migrate {redact(url)}: {exc}".strip()) from None
        return engine

    def _sql(self, sql: str) -> str:
        translated = self._statements.get(sql)
        if translated is None:
            # The store's SQL has no literal `?` or `%`: every `?` is a placeholder.
            translated = self._statements[sql] = sql.replace("?", "%s")
        return translated

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(self._sql(sql), rows)

    def insert_new(self, table: str, columns: Sequence[str], rows: list[Sequence[Any]]) -> None:
        # COPY into a temporary twin of the table, then one INSERT ... SELECT: COPY has
        # no ON CONFLICT, and one INSERT statement per row (executemany, even pipelined)
        # ran at a tenth of COPY's rate. The twin is emptied at every commit.
        if not rows:
            return
        staging = f"staging_{table}"
        names = ", ".join(columns)
        self.conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {staging} "
            f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with self.conn.cursor() as cursor:
            with cursor.copy(f"COPY {staging}({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cursor.execute(
                f"INSERT INTO {table}({names}) SELECT {names} FROM {staging} ON CONFLICT DO NOTHING"
            )
            cursor.execute(f"DELETE FROM {staging}")

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.conn.transaction()

    def lock(self, keys: Iterable[tuple[str, ...]]) -> None:
        ordered = sorted({advisory_key(*k) for k in keys})
        if ordered:
            # One round trip for a group commit's hundreds of keys: unnest yields the
            # array in its order, so they are taken in the sorted order.
            self.conn.execute(
                "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k",
                (ordered,),
            )

    def _migrate(self, steps: Sequence[Step]) -> None:
        with self.conn.transaction():
            # PostgreSQL's DDL is transactional: every pending step and its record commit
            # together or not at all, and a second process starting now waits here, then
            # finds nothing left to do.
            self.lock([("migrations", MIGRATION_SET)])
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS redeemd_migrations (migration_set TEXT NOT NULL, "
                "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
                "PRIMARY KEY (migration_set, name))"
            )
            applied = {
                name
                for (name,) in self.conn.execute(
                    "SELECT name FROM redeemd_migrations WHERE migration_set = %s",
                    (MIGRATION_SET,),
                )
            }
            for name, script in steps:
                if name in applied:
                    continue
                # No parameters: psycopg sends the script as one simple query, which
                # may hold several statements.
                self.conn.execute(postgresql_ddl(script).encode())
                self.conn.execute(
                    "INSERT INTO redeemd_migrations(migration_set, name) VALUES (%s, %s)",
                    (MIGRATION_SET, name),
                )


def postgresql_ddl(script: str) -> str:
    """A migration step's SQLite DDL as PostgreSQL DDL."""
    script = re.sub(r"\bINTEGER\b", "BIGINT", script)
    script = re.sub(r"\bBLOB\b", "BYTEA", script)
    return re.sub(r"\)\s*WITHOUT ROWID", ")", script)


def advisory_key(*parts: str) -> int:
    """A signed 64-bit key for pg_advisory_xact_lock, the same in every process (Python's
    hash() is salted per process)."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
