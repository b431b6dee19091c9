"""Parsing the events a box sends (docs/protocol.md 16.3) into typed records.

A message is `{"v":1,"box":BOX,"records":[R, ...]}` on `{p}/{merchant}/box/{box}/events`.
Every record must belong to the box and merchant named by the topic: the broker ACL
confines a box to its own subtree, and the collector refuses anything that claims to
be from somewhere else rather than storing it under the wrong box.

>>> message = b'{"v":1,"box":"b1","records":[]}'
>>> parse_message(message, merchant="demo", box="b1")
[]
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

MAX_RECORDS = 10_000


class EventError(ValueError):
    """An events message is refused as a whole; nothing from it is stored or acked."""


@dataclass(frozen=True)
class Event:
    """One ledger record as the backend stores it; `raw` is the record's JSON text."""

    id: str
    seq: int
    box: str
    merchant: str
    at_ms: int
    digest: str | None
    card_id: int | None
    action: str
    verdict: str
    uses: int | None
    amount: int | None
    uses_left: int | None
    balance: int | None
    reverses: str | None
    raw: str

    @property
    def id_bytes(self) -> bytes:
        """The record id as 16 raw bytes, as it goes into a consumed batch entry."""
        return uuid.UUID(self.id).bytes


def parse_message(payload: bytes, *, merchant: str, box: str) -> list[Event]:
    """The records of one events message, checked against the topic's merchant and box."""
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise EventError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or message.get("v") != 1:
        raise EventError('not a v1 events message (expected {"v":1,"box":...,"records":[...]})')
    if message.get("box") != box:
        raise EventError(f"message names box {message.get('box')!r} on box {box!r}'s topic")
    records = message.get("records")
    if not isinstance(records, list):
        raise EventError("'records' must be a list")
    if len(records) > MAX_RECORDS:
        raise EventError(f"{len(records)} records in one message (at most {MAX_RECORDS})")
    return [_record(r, merchant, box, i) for i, r in enumerate(records)]


def _record(value: object, merchant: str, box: str, index: int) -> Event:
    if not isinstance(value, dict):
        raise EventError(f"record {index} is not an object")

    def need(name: str, kind: type, nullable: bool = False):
        v = value.get(name)
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, kind):
            raise EventError(f"record {index}: '{name}' must be {kind.__name__}, got {v!r}")
        return v

    record_id = need("id", str)
    try:
        record_id = str(uuid.UUID(record_id))
    except ValueError:
        raise EventError(f"record {index}: id {record_id!r} is not a UUID") from None
    seq = need("seq", int)
    if seq < 1:
        raise EventError(f"record {index}: seq must be >= 1, got {seq}")
    if need("box", str) != box or need("merchant", str) != merchant:
        raise EventError(
            f"record {index} claims {value.get('merchant')}/{value.get('box')} "
            f"on the topic of {merchant}/{box}"
        )
    digest = need("digest", str, nullable=True)
    if digest is not None:
        try:
            if len(bytes.fromhex(digest)) != 16:
                raise ValueError
        except ValueError:
            raise EventError(f"record {index}: digest must be 32 hex digits") from None
        digest = digest.lower()
    reverses = need("reverses", str, nullable=True)
    if reverses is not None:
        try:
            reverses = str(uuid.UUID(reverses))
        except ValueError:
            raise EventError(f"record {index}: reverses {reverses!r} is not a UUID") from None
    return Event(
        id=record_id,
        seq=seq,
        box=box,
        merchant=merchant,
        at_ms=need("at_ms", int),
        digest=digest,
        card_id=need("card_id", int, nullable=True),
        action=need("action", str),
        verdict=need("verdict", str),
        uses=need("uses", int, nullable=True),
        amount=need("amount", int, nullable=True),
        uses_left=need("uses_left", int, nullable=True),
        balance=need("balance", int, nullable=True),
        reverses=reverses,
        raw=json.dumps(value, sort_keys=True, separators=(",", ":")),
    )
