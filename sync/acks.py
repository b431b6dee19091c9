"""Application acks from the backend (docs/protocol.md 16.4): the only way a record
leaves the outbox (storage/outbox.py: a mark moved, nothing deleted from the ledger).

`{"v":1,"upto":N,"ids":[ID, ...]}` means the backend has committed every record of this
box with seq <= N and also the listed ids. A PUBACK never removes anything: it only
says the broker took the packet.

    >>> parse(b'{"v":1,"upto":12,"ids":[]}')
    Ack(upto=12, ids=())
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass

from storage import ledger, outbox

MAX_IDS = 10_000


class AckError(ValueError):
    """The ack message is refused as a whole; the outbox is unchanged."""


@dataclass(frozen=True)
class Ack:
    upto: int
    ids: tuple[bytes, ...]


def parse(payload: bytes) -> Ack:
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise AckError(f"ack is not JSON: {exc}") from None
    if not isinstance(message, dict) or message.get("v") != 1 or isinstance(message.get("v"), bool):
        raise AckError('ack is not {"v":1,"upto":N,"ids":[...]}')
    upto = message.get("upto", 0)
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto < 2**63:
        raise AckError(f"ack 'upto' must be an integer >= 0, got {upto!r}")
    raw_ids = message.get("ids", [])
    if not isinstance(raw_ids, list) or len(raw_ids) > MAX_IDS:
        raise AckError(f"ack 'ids' must be a list of at most {MAX_IDS} record ids")
    ids = []
    for value in raw_ids:
        try:
            ids.append(uuid.UUID(value).bytes)
        except (TypeError, ValueError, AttributeError):
            raise AckError(f"ack names {value!r}, which is not a record id (UUID)") from None
    return Ack(upto, tuple(ids))


def apply(conn: sqlite3.Connection, ack: Ack, sent_upto: int) -> int:
    """Mark the acked records delivered; returns how many were still waiting.

    Only records this process has already sent (seq <= `sent_upto`) can be acked: a
    backend that acks far ahead (a box restored from an old backup, a confused
    collector) must not delete records it has never received. The same transaction
    indexes the ids of the records written since the last one (storage.ledger.index_ids),
    so the ids the ack names are found by the index and the scan path writes none.
    """
    upto = min(ack.upto, sent_upto)
    if upto <= 0 and not ack.ids:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        ledger.index_ids(conn)
        seqs = []
        for record_id in ack.ids:
            record = ledger.by_id(conn, record_id)
            if record is not None and upto < record.seq <= sent_upto:
                seqs.append(record.seq)
        removed = outbox.ack_upto(conn, upto) if upto > 0 else 0
        removed += outbox.ack(conn, seqs) if seqs else 0
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return removed
