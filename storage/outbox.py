"""The outbox: ledger records waiting for the backend's application ack.

SQLite is the only queue (paho's is in memory); a record leaves only when the backend has
said it stored the record, never on a mere PUBACK.

The outbox is not a copy of the ledger rows but a view of them (migration m006): the
records after the `acked` mark in ledger_marks, minus those in outbox_acked (acked by
id, out of order, ahead of the mark). A scan writes only its ledger row, and an ack
moves the mark: one page per ack instead of one outbox row written and deleted per
record. `SELECT ... FROM outbox` reads the waiting box sequences as the table did.

    ack_upto(conn, 12)        # every record up to seq 12 is stored by the backend
    ack(conn, [15, 17])       # and these two, ahead of it
    records(conn, 0, 200)     # what the pump sends next: 13, 14, 16, 18 ...
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from storage import accounts
from storage.ledger import COLUMNS, Redemption


def depth(conn: sqlite3.Connection) -> int:
    """How many records wait. Box sequences have no gaps (protocol.md 16.3), so that is
    the records after the mark less those acked ahead of it: counting the view would
    read every waiting row (66 ms at a 200,000-record backlog), and the sync thread
    asks after every pass."""
    try:
        row = conn.execute(
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM ledger) - seq - "
            "(SELECT COUNT(*) FROM outbox_acked) FROM ledger_marks WHERE name = 'acked'"
        ).fetchone()
    except sqlite3.OperationalError:
        # A database of a release before m006 (doctor reads one without migrating it):
        # its outbox is a table.
        value: int = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return value
    waiting: int = max(row[0], 0)
    return waiting


def oldest_ms(conn: sqlite3.Connection) -> int | None:
    """When the oldest waiting record was made (ms since the epoch); None when none waits."""
    row = conn.execute(
        "SELECT l.at_ms FROM outbox o JOIN ledger l USING (seq) ORDER BY o.seq LIMIT 1"
    ).fetchone()
    return None if row is None else row[0]


def records(conn: sqlite3.Connection, after: int, limit: int) -> list[Redemption]:
    """The next `limit` waiting ledger records with box sequence > `after`, in order."""
    # From the later of `after` and the mark, on the ledger itself: through the view
    # SQLite starts at the mark and walks every record the pump has already sent.
    rows = conn.execute(
        f"SELECT {', '.join(COLUMNS)} FROM ledger WHERE seq > ? "
        "AND seq NOT IN (SELECT seq FROM outbox_acked) ORDER BY seq LIMIT ?",
        (max(after, acked_upto(conn)), limit),
    )
    return [Redemption(*row) for row in rows]


def first_seq(conn: sqlite3.Connection) -> int | None:
    # ORDER BY ... LIMIT 1, not MIN(): SQLite's MIN shortcut does not reach into a view,
    # which would count every waiting record on each pump pass.
    row = conn.execute("SELECT seq FROM outbox ORDER BY seq LIMIT 1").fetchone()
    return None if row is None else row[0]


def acked_upto(conn: sqlite3.Connection) -> int:
    """Every record with box sequence <= this is acknowledged."""
    value: int = conn.execute("SELECT seq FROM ledger_marks WHERE name = 'acked'").fetchone()[0]
    return value


def seqs_waiting(conn: sqlite3.Connection, seqs: Iterable[int]) -> list[int]:
    """Those of `seqs` that are waiting records, in order."""
    wanted = sorted(set(seqs))
    if not wanted:
        return []
    waiting: list[int] = []
    for start in range(0, len(wanted), 500):  # under SQLite's variable limit
        chunk = wanted[start : start + 500]
        query = f"SELECT seq FROM outbox WHERE seq IN ({', '.join('?' * len(chunk))}) ORDER BY seq"
        waiting += [row[0] for row in conn.execute(query, chunk)]
    return waiting


def ack(conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
    """Mark these records acknowledged (out of order, by id); returns how many were still
    waiting. The caller owns the transaction."""
    waiting = seqs_waiting(conn, seqs)
    for start in range(0, len(waiting), 500):  # under SQLite's variable limit
        chunk = tuple(waiting[start : start + 500])
        accounts.release(conn, f"seq IN ({', '.join('?' * len(chunk))})", chunk)
    conn.executemany("INSERT OR IGNORE INTO outbox_acked(seq) VALUES (?)", ((s,) for s in waiting))
    _settle(conn)
    return len(waiting)


def ack_upto(conn: sqlite3.Connection, upto: int) -> int:
    """Mark every record with box sequence <= `upto` acknowledged; returns how many were
    still waiting. Never beyond the ledger's last record: a later record (a box restored
    from backup writes its sequences again) must wait for its own ack. The caller owns
    the transaction."""
    mark = acked_upto(conn)
    upto = min(upto, conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0])
    if upto <= mark:
        return 0
    removed: int = conn.execute("SELECT COUNT(*) FROM outbox WHERE seq <= ?", (upto,)).fetchone()[0]
    # The unacknowledged spend of the offline limits (issue 13) loses these records.
    accounts.release(
        conn, "seq > ? AND seq <= ? AND seq NOT IN (SELECT seq FROM outbox_acked)", (mark, upto)
    )
    conn.execute("UPDATE ledger_marks SET seq = ? WHERE name = 'acked'", (upto,))
    _settle(conn)
    return removed


def _settle(conn: sqlite3.Connection) -> None:
    """Move the mark over the records acked by id right after it, and forget those."""
    mark = acked_upto(conn)
    first = first_seq(conn)
    settled = first - 1 if first is not None else max(mark, _last_acked(conn))
    if settled > mark:
        conn.execute("UPDATE ledger_marks SET seq = ? WHERE name = 'acked'", (settled,))
    conn.execute("DELETE FROM outbox_acked WHERE seq <= ?", (max(mark, settled),))


def _last_acked(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox_acked").fetchone()[0]
    return value
