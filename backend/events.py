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
import re
import uuid
from dataclasses import dataclass

MAX_RECORDS = 10_000
_GRANT_ID = re.compile(r"[0-9a-fA-F]{16}")
_ACCOUNT_ID = re.compile(r"[0-9a-fA-F]{32}")


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
    grant_id: str | None = None
    """A `dispense` record's grant (16 hex digits) and counter: the claim code it minted
    is (grant_id, counter), which the claim service's claims name too (issue 12)."""
    counter: int | None = None
    account: str | None = None
    """The card account the record spent from (32 hex digits, issue 13): present on
    records of codes linked to an account, which the backend reconciles per account."""
    cache_seq: int | None = None
    """The box's applied batch sequence when it decided: tells a redemption on a box that
    had not applied a transfer yet (backend/accounts.py)."""


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


# The typed fields of a record: (name, type, may be null). `type(v) is t` rather than
# isinstance, so that JSON true/false never pass for integers.
_FIELDS = (
    ("at_ms", int, False),
    ("card_id", int, True),
    ("action", str, False),
    ("verdict", str, False),
    ("uses", int, True),
    ("amount", int, True),
    ("uses_left", int, True),
    ("balance", int, True),
)


def _record(value: object, merchant: str, box: str, index: int) -> Event:
    if not isinstance(value, dict):
        raise EventError(f"record {index} is not an object")
    get = value.get
    for name, kind, nullable in _FIELDS:
        v = get(name)
        if type(v) is not kind and not (v is None and nullable):
            raise EventError(f"record {index}: '{name}' must be {kind.__name__}, got {v!r}")
    record_id = get("id")
    try:
        record_id = str(uuid.UUID(record_id))
    except (TypeError, ValueError, AttributeError):
        raise EventError(f"record {index}: id {record_id!r} is not a UUID") from None
    seq = get("seq")
    if type(seq) is not int or seq < 1:
        raise EventError(f"record {index}: seq must be an integer >= 1, got {seq!r}")
    if get("box") != box or get("merchant") != merchant:
        raise EventError(
            f"record {index} claims {get('merchant')}/{get('box')} on the topic of {merchant}/{box}"
        )
    digest = get("digest")
    if digest is not None:
        try:
            if type(digest) is not str or len(bytes.fromhex(digest)) != 16:
                raise ValueError
        except ValueError:
            raise EventError(f"record {index}: digest must be 32 hex digits") from None
        digest = digest.lower()
    reverses = get("reverses")
    if reverses is not None:
        try:
            reverses = str(uuid.UUID(reverses))
        except (TypeError, ValueError, AttributeError):
            raise EventError(f"record {index}: reverses {reverses!r} is not a UUID") from None
    grant_id, counter = get("grant_id"), get("counter")
    if grant_id is not None and (type(grant_id) is not str or not _GRANT_ID.fullmatch(grant_id)):
        raise EventError(f"record {index}: grant_id must be 16 hex digits, got {grant_id!r}")
    if counter is not None and (type(counter) is not int or counter < 0):
        raise EventError(f"record {index}: counter must be an integer >= 0, got {counter!r}")
    account = get("account")
    if account is not None and (type(account) is not str or not _ACCOUNT_ID.fullmatch(account)):
        raise EventError(f"record {index}: account must be 32 hex digits, got {account!r}")
    cache_seq = get("cache_seq")
    if cache_seq is not None and (type(cache_seq) is not int or cache_seq < 0):
        raise EventError(f"record {index}: cache_seq must be an integer >= 0, got {cache_seq!r}")
    return Event(
        id=record_id,
        seq=seq,
        box=box,
        merchant=merchant,
        at_ms=value["at_ms"],
        digest=digest,
        card_id=value.get("card_id"),
        action=value["action"],
        verdict=value["verdict"],
        uses=get("uses"),
        amount=get("amount"),
        uses_left=get("uses_left"),
        balance=get("balance"),
        reverses=reverses,
        raw=json.dumps(value, sort_keys=True, separators=(",", ":")),
        grant_id=grant_id.lower() if grant_id is not None else None,
        counter=counter,
        account=account.lower() if account is not None else None,
        cache_seq=cache_seq,
    )
