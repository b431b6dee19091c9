"""The outbox: ledger records waiting for the backend's application ack.

SQLite is the only queue (paho's is in memory); a row leaves only when the backend has
said it stored the record, never on a mere PUBACK.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from storage.ledger import COLUMNS, Redemption


def depth(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


def oldest_ms(conn: sqlite3.Connection) -> int | None:
    return conn.execute(
        "SELECT l.at_ms FROM outbox o JOIN ledger l USING (seq) ORDER BY o.seq LIMIT 1"
    ).fetchone()


def pending(conn: sqlite3.Connection, limit: int) -> list[int]:
    return [r[0] for r in conn.execute("SELECT seq FROM outbox ORDER BY seq LIMIT ?", (limit,))]


def ack(conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
    """Remove acknowledged records; returns how many were still waiting."""
    cur = conn.executemany("DELETE FROM outbox WHERE seq = ?", ((s,) for s in seqs))
    return cur.rowcount


def records(conn: sqlite3.Connection, after: int, limit: int) -> list[Redemption]:
    """The next `limit` waiting ledger records with box sequence > `after`, in order."""
    columns = ", ".join(f"l.{c}" for c in COLUMNS)
    rows = conn.execute(
        f"SELECT {columns} FROM outbox o JOIN ledger l USING (seq) WHERE o.seq > ? "
        "ORDER BY o.seq LIMIT ?",
        (after, limit),
    )
    return [Redemption(*row) for row in rows]


def first_seq(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT MIN(seq) FROM outbox").fetchone()
    return row[0]


def ack_upto(conn: sqlite3.Connection, upto: int) -> int:
    """Remove every waiting record with box sequence <= `upto`; returns how many."""
    return conn.execute("DELETE FROM outbox WHERE seq <= ?", (upto,)).rowcount
