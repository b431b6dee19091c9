"""The outbox: ledger records waiting for the backend's application ack.

SQLite is the only queue (paho's is in memory); a row leaves only when the backend has
said it stored the record, never on a mere PUBACK.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable


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
