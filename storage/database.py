"""Opening the database: pragmas, integrity check, migrations, and the first-use marker.

synchronous=FULL with WAL makes every COMMIT an fsync of the WAL: after COMMIT returns
the ledger row survives power loss. That is what lets the engine show a verdict only
after its commit (durable before shown).

The database holds the ledger and the anti-rollback state (the applied batch sequence
and the time floor). A box whose database vanished or was emptied must not quietly
start over: it would accept old batches again. So the first use leaves a marker beside
the database (`redeemd.db` -> `redeemd.initialised`), and a missing or zero-byte
database with a marker is refused until it is restored or `redeemd init` is run.

    conn = open_database("/var/lib/redeemd/redeemd.db")   # DatabaseLost if it vanished
    conn = open_database(path, init=True)                 # `redeemd init`: start over
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from sqlite_utils import Database

from storage.migrations import migrations

log = logging.getLogger("redeemd.storage")

WAL_SIZE_LIMIT = 16 << 20


class StorageError(RuntimeError):
    """The database cannot be opened or written; the message says what to do."""


class DatabaseLost(StorageError):
    """The database is missing or empty on a box that has used one: refused, not
    silently started over."""


def marker_path(database: str | Path) -> Path:
    """The first-use marker beside `database`. Its name does not start with the
    database's (`redeemd.db*`), so moving the database files aside to restore a backup,
    as docs/operations.md says, leaves it in place."""
    database = Path(database)
    return database.with_name(f"{database.stem}.initialised")


def is_empty(database: str | Path) -> bool:
    """Missing or zero bytes: SQLite would start a new, empty database there."""
    try:
        return Path(database).stat().st_size == 0
    except FileNotFoundError:
        return True


def refuse_if_lost(database: str | Path) -> None:
    """DatabaseLost if `database` is missing or empty although this box used one."""
    database = Path(database)
    marker = marker_path(database)
    if not is_empty(database) or not marker.exists():
        return
    what = "missing" if not database.exists() else "empty (0 bytes)"
    raise DatabaseLost(
        f"database {database} is {what}, but this box has used one before ({marker} "
        "exists). Starting over would lose the ledger and the anti-rollback state (the "
        "applied batch sequence and the time floor), so old batches could be applied "
        "again. Restore the database from backup (docs/operations.md, 'Back up and "
        "restore the ledger'), or check that [box] database names the right file and "
        "its disk is mounted; only to start this box over as new, run `redeemd init`"
    )


def mark(database: str | Path, *, again: bool = False) -> None:
    """Leave the first-use marker beside `database` (once, unless `again`; durable, as
    the database). Not being able to write it is a warning: the database itself opened,
    and the daemon's next start (as the database's owner) writes it."""
    database = Path(database)
    marker = marker_path(database)
    if marker.exists() and not again:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    text = (
        f"redeemd started using {database.name} here on {stamp}.\n"
        f"While this file exists, redeemd refuses to start on a missing or empty "
        f"{database.name}: restore it from backup, or run `redeemd init` to start over.\n"
    )
    partial = marker.with_name(marker.name + ".partial")
    try:
        with open(partial, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, marker)
        directory = os.open(marker.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        log.warning(
            "cannot write %s (%s): without it a lost database would not be noticed; the "
            "directory of the database must be writable by redeemd's user",
            marker,
            exc.strerror or exc,
        )


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


def open_database(
    path: str | Path, *, check: bool = True, init: bool = False
) -> sqlite3.Connection:
    """Open (creating it on a box's first use), check and migrate the database at
    `path`. DatabaseLost if it is missing or empty on a box that used one before,
    unless `init` (`redeemd init`: start over as a new box)."""
    if not init:
        refuse_if_lost(path)
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
    # After the schema is in: a crash before this leaves a database without a marker,
    # which the next open marks. A box from before markers is marked on its next start.
    mark(path, again=init)
    return conn
