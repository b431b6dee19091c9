"""Opening the database: pragmas, integrity check, migrations.

synchronous=FULL with WAL makes every COMMIT an fsync of the WAL: after COMMIT returns
the ledger row survives power loss. That is what lets the engine show a verdict only
after its commit (durable before shown).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database

from storage.migrations import migrations

WAL_SIZE_LIMIT = 16 << 20


class StorageError(RuntimeError):
    """The database cannot be opened or written; the message says what to do."""


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode with the pragmas every redeemd connection needs."""
    path = Path(path)
    try:
        if readonly:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            # A big import grows the -wal file to the size of everything it wrote (310 MB
            # for 10M codes) and SQLite reuses it without ever shrinking it while any
            # connection stays open; this truncates it on the next write instead. Normal
            # scans never reach the limit (an autocheckpoint cycle is about 4 MB).
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA synchronous = FULL")
    except (sqlite3.Error, OSError) as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from None
    return conn


def open_database(path: str | Path, *, check: bool = True) -> sqlite3.Connection:
    """Open (creating if needed), check and migrate the database at `path`."""
    conn = connect(path)
    try:
        if check:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise StorageError(
                    f"database {path} is damaged ({result}); stop redeemd, move the file "
                    "aside and restore from backup (docs/operations.md)"
                )
        migrations.apply(Database(conn, recursive_triggers=False, execute_plugins=False))
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StorageError(f"database {path} cannot be used: {exc}") from None
    return conn
