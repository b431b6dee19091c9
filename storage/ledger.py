"""The ledger: one row per verdict, the record the backend eventually receives.

Rows are never deleted. `seq` is the box sequence (gap-free), `id` a UUIDv7 that the
backend uses as the idempotency key. Codes appear only as keyed digests.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter

COLUMNS = (
    "seq",
    "id",
    "at_ms",
    "box",
    "merchant",
    "store",
    "digest",
    "card_id",
    "action",
    "uses",
    "amount",
    "uses_left",
    "balance",
    "verdict",
    "reason",
    "source",
    "symbology",
    "operator",
    "cache_seq",
    "reverses",
    "grant_id",
    "counter",
    "account",
)


def _insert(columns: tuple[str, ...]) -> str:
    return f"INSERT INTO ledger({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


INSERT = _insert(COLUMNS)
# The columns only some records fill: who redeemed through the local API, what a reversal
# undoes, a dispense's grant and counter, a linked code's account. A scanned code's
# record leaves them NULL, and sqlite3 sends every None it binds through its adapter
# lookup: five of them cost about 1.5 us on a scan, cold after the last fsync
# (docs/decisions.md, "Fewer bound NULLs"). `append` leaves them out when all are None,
# and all but the account on a linked code's scan (issue 13's account case); otherwise
# it binds them after the common ones (INSERT_RARE). INSERT keeps COLUMNS' order, for a
# Redemption's row().
_RARE = ("operator", "reverses", "grant_id", "counter", "account")
_COMMON = tuple(name for name in COLUMNS if name not in _RARE)
INSERT_COMMON = _insert(_COMMON)
INSERT_LINKED = _insert((*_COMMON, "account"))
INSERT_RARE = _insert((*_COMMON, *_RARE))


@dataclass(frozen=True, slots=True)
class Redemption:
    """One ledger record, as stored and as synced (docs/protocol.md, events)."""

    seq: int
    id: bytes
    at_ms: int
    box: str
    merchant: str
    store: str
    digest: bytes | None
    card_id: int | None
    action: str
    uses: int | None
    amount: int | None
    uses_left: int | None
    balance: int | None
    verdict: str
    reason: str | None
    source: str
    symbology: str | None
    operator: str | None
    cache_seq: int
    reverses: bytes | None = None
    # A `dispense` record's grant and the counter it committed (docs/protocol.md 18).
    grant_id: str | None = None
    counter: int | None = None
    # The account a linked code spent (docs/protocol.md 19); None for other codes.
    account: bytes | None = None

    def row(self) -> tuple[object, ...]:
        return _ROW(self)

    def to_json(self) -> dict[str, object]:
        # Spelled out: the pump encodes every record it sends, and
        # dataclasses.asdict (a deep copy) cost more than the JSON encoding itself.
        # grant_id and counter only on dispense records: every other event is sent as
        # it was before issue 12.
        out: dict[str, object] = {
            "seq": self.seq,
            "id": str(uuid.UUID(bytes=self.id)),
            "at_ms": self.at_ms,
            "box": self.box,
            "merchant": self.merchant,
            "store": self.store,
            "digest": self.digest.hex() if self.digest else None,
            "card_id": self.card_id,
            "action": self.action,
            "uses": self.uses,
            "amount": self.amount,
            "uses_left": self.uses_left,
            "balance": self.balance,
            "verdict": self.verdict,
            "reason": self.reason,
            "source": self.source,
            "symbology": self.symbology,
            "operator": self.operator,
            "cache_seq": self.cache_seq,
            "reverses": str(uuid.UUID(bytes=self.reverses)) if self.reverses else None,
        }
        if self.grant_id is not None:
            out["grant_id"] = self.grant_id
        if self.counter is not None:
            out["counter"] = self.counter
        # Only on records of a linked code (issue 13): every other event is as before.
        if self.account is not None:
            out["account"] = self.account.hex()
        return out


# A record's values in COLUMNS order, fetched in C: the pump turns every record it
# sends into a row, and a getattr loop in Python cost more than the INSERT.
_ROW = attrgetter(*COLUMNS)


# UUIDv7's fixed bits (RFC 9562 section 5.7): version 7 in bits 76-79 and the variant
# 0b10 in bits 62-63 of the 128-bit value.
_V7_BITS = (0x7 << 76) | (0x2 << 62)
_V7_FREE = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_RANDOM_BYTES = 10  # the 74 random bits of an id, and 6 more that the version and variant replace
_POOL_IDS = 100


class RecordIds:
    """Fresh UUIDv7 record ids (RFC 9562: 48 bits of Unix milliseconds, then random
    bits), as stored (16 bytes) and as shown (canonical text), for one writer thread.
    Ids from one instance strictly increase: one made in the same millisecond as the
    last is the last plus one (RFC 9562 section 6.2, method 3).

    Made here rather than by a library because the scan path makes one per scan and
    bench/scan_path.py showed the difference: the uuid6 package's uuid7() and the
    uuid.UUID round trip cost about 7 us and a dozen Python calls, about 0.06x of the
    floor on a cold scan (docs/decisions.md). For the same reason the random bits come
    from the OS a hundred ids at a time, not one getrandom call per scan, and there is
    no lock: the engine's one decider thread owns its instance; `new_id` serves any
    other thread.

    >>> raw, text = RecordIds()()
    >>> uuid.UUID(text).bytes == raw and uuid.UUID(text).version
    7
    """

    __slots__ = ("_last", "_pool", "_at")

    def __init__(self) -> None:
        self._last = 0
        self._pool = b""
        self._at = 0

    def __call__(self) -> tuple[bytes, str]:
        at = self._at
        if at == len(self._pool):
            self._pool = os.urandom(_RANDOM_BYTES * _POOL_IDS)
            at = 0
        self._at = at + _RANDOM_BYTES
        random_bits = int.from_bytes(self._pool[at : at + _RANDOM_BYTES])
        value = ((time.time_ns() // 1_000_000) << 80 | random_bits) & _V7_FREE | _V7_BITS
        if value <= self._last:
            value = (self._last + 1) & _V7_FREE | _V7_BITS
        self._last = value
        raw = value.to_bytes(16)
        h = raw.hex()
        return raw, f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_shared_ids = RecordIds()
_shared_lock = threading.Lock()


def new_id() -> tuple[bytes, str]:
    """A fresh record id from any thread (RecordIds, shared by the process)."""
    with _shared_lock:
        return _shared_ids()


def last_seq(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]
    return value


def append(
    conn: sqlite3.Connection,
    seq: int,
    record_id: bytes,
    at_ms: int,
    box: str,
    merchant: str,
    store: str,
    digest: bytes | None,
    card_id: int | None,
    action: str,
    uses: int | None,
    amount: int | None,
    uses_left: int | None,
    balance: int | None,
    verdict: str,
    reason: str | None,
    source: str,
    symbology: str | None,
    operator: str | None,
    cache_seq: int,
    reverses: bytes | None = None,
    grant_id: str | None = None,
    counter: int | None = None,
    account: bytes | None = None,
) -> None:
    """Insert one ledger row. The values are a Redemption's fields, in its order
    (COLUMNS), and this function is the one place that turns them into the row, so a
    caller never builds the INSERT's tuple itself. They are taken as values rather than
    as a Redemption because this runs on every scan, where building that 20-field frozen
    dataclass costs about 5 us, more than the Python of the rest of the row. Nothing
    else is written: the row waits in the outbox, a view of the ledger, until an ack
    moves past it (storage/outbox.py). The caller owns the transaction."""
    common = (
        seq,
        record_id,
        at_ms,
        box,
        merchant,
        store,
        digest,
        card_id,
        action,
        uses,
        amount,
        uses_left,
        balance,
        verdict,
        reason,
        source,
        symbology,
        cache_seq,
    )
    if operator is None and reverses is None and grant_id is None and counter is None:
        if account is None:
            conn.execute(INSERT_COMMON, common)
        else:
            conn.execute(INSERT_LINKED, (*common, account))
    else:
        conn.execute(INSERT_RARE, (*common, operator, reverses, grant_id, counter, account))


def by_id(conn: sqlite3.Connection, record_id: bytes) -> Redemption | None:
    """The record with this id: looked up in ledger_ids, then among the rows after its
    `ids` mark, which index_ids has not reached yet (those since the last ack or batch
    import: the ledger has no index on id, so that a scan writes no index page)."""
    columns = ", ".join(COLUMNS)
    row = conn.execute(
        f"SELECT {columns} FROM ledger WHERE seq = (SELECT seq FROM ledger_ids WHERE id = ?)",
        (record_id,),
    ).fetchone()
    if row is None:
        row = conn.execute(
            f"SELECT {columns} FROM ledger WHERE seq > "
            "(SELECT seq FROM ledger_marks WHERE name = 'ids') AND id = ? ORDER BY seq LIMIT 1",
            (record_id,),
        ).fetchone()
    return Redemption(*row) if row else None


def index_ids(conn: sqlite3.Connection) -> int:
    """Add the ids of the rows after the `ids` mark to ledger_ids and move the mark;
    returns how many. Run by every ack and batch import, in their transactions: the
    entries go in together, many per page, instead of one index page written per scan.
    UUIDv7 ids are unique by construction; a duplicate would keep its first row (OR
    IGNORE) rather than stop every later ack."""
    mark = conn.execute("SELECT seq FROM ledger_marks WHERE name = 'ids'").fetchone()[0]
    last = last_seq(conn)
    if last <= mark:
        return 0
    added = conn.execute(
        "INSERT OR IGNORE INTO ledger_ids(id, seq) SELECT id, seq FROM ledger "
        "WHERE seq > ? AND seq <= ? ORDER BY seq",
        (mark, last),
    ).rowcount
    conn.execute("UPDATE ledger_marks SET seq = ? WHERE name = 'ids'", (last,))
    return added


def is_reversed(conn: sqlite3.Connection, record_id: bytes) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM ledger WHERE reverses = ? AND verdict = 'accepted'", (record_id,)
        ).fetchone()
        is not None
    )


def records(conn: sqlite3.Connection, after: int = 0) -> Iterator[Redemption]:
    query = f"SELECT {', '.join(COLUMNS)} FROM ledger WHERE seq > ? ORDER BY seq"
    for row in conn.execute(query, (after,)):
        yield Redemption(*row)
