"""What the box and conflicts pages read from the store: a box's recent records (with
their verdict and reason, the digest as a prefix only), its gaps, and the double
redemptions found. Read-only SQL both engines accept, as backend/store.py writes it.

    >>> recent_records(store, "acme", "box-0042", limit=50)
    >>> conflicts(store, box="box-0042")
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from backend.store import Store

DIGEST_PREFIX = 12
"""Hex digits of a code's digest a page shows: enough to tell records apart, and even
the whole digest would not give the code back (docs/threat-model.md)."""


def prefix(digest: str | None) -> str:
    return "-" if not digest else digest[:DIGEST_PREFIX] + "…"


@dataclass(frozen=True)
class Record:
    seq: int
    at_ms: int
    action: str
    verdict: str
    reason: str | None
    digest: str
    """A prefix only (`prefix`)."""
    card_id: int | None


def _reason(raw: str) -> str | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    reason = doc.get("reason") if isinstance(doc, dict) else None
    return reason if isinstance(reason, str) else None


def recent_records(store: Store, merchant: str, box: str, limit: int = 100) -> list[Record]:
    """The box's newest stored records, newest first."""
    rows = store.engine.execute(
        "SELECT seq, at_ms, action, verdict, raw, digest, card_id FROM events "
        "WHERE merchant = ? AND box = ? ORDER BY seq DESC LIMIT ?",
        (merchant, box, limit),
    ).fetchall()
    return [Record(r[0], r[1], r[2], r[3], _reason(r[4]), prefix(r[5]), r[6]) for r in rows]


def by_reason(records: list[Record]) -> list[tuple[str, str, int]]:
    """(verdict, reason or "-", count) over `records`, the most frequent first."""
    counted = Counter((r.verdict, r.reason or "-") for r in records)
    return [(v, reason, n) for (v, reason), n in counted.most_common()]


@dataclass(frozen=True)
class GapRow:
    first: int
    last: int
    detected_at: int
    filled_at: int | None


def gaps(store: Store, merchant: str, box: str, limit: int = 50) -> list[GapRow]:
    rows = store.engine.execute(
        "SELECT first, last, detected_at, filled_at FROM gaps WHERE merchant = ? AND box = ? "
        "ORDER BY detected_at DESC, first DESC LIMIT ?",
        (merchant, box, limit),
    ).fetchall()
    return [GapRow(*r) for r in rows]


@dataclass(frozen=True)
class ConflictRow:
    merchant: str
    digest: str
    """A prefix only."""
    first_box: str
    first_id: str
    second_box: str
    second_id: str
    detected_at: int
    consumed_seq: int | None
    """The consumed-elsewhere batch that told the other boxes, None if none was signed."""


def conflicts(store: Store, box: str | None = None, limit: int = 200) -> list[ConflictRow]:
    """Double redemptions found, newest first; with `box`, those it took part in."""
    where, params = ("WHERE first_box = ? OR second_box = ? ", (box, box)) if box else ("", ())
    rows = store.engine.execute(
        "SELECT merchant, digest, first_box, first_id, second_box, second_id, detected_at, "
        f"consumed_seq FROM conflicts {where}ORDER BY detected_at DESC, first_id LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [ConflictRow(r[0], prefix(r[1]), *r[2:]) for r in rows]


@dataclass(frozen=True)
class GrantLine:
    """A box's dispensing grant as the backend made it, beside what the box last said
    it used of it (its status's `dispensing.grants[].used`, docs/protocol.md 16.5)."""

    id: str
    cards: tuple[int, ...]
    quota: int
    used: int | None
    """None while the box has not reported this grant."""
    not_before: int
    not_after: int
    revoked: bool

    @property
    def left(self) -> int | None:
        return None if self.used is None else max(self.quota - self.used, 0)


def _used(raw: str | None) -> dict[str, int]:
    """{grant id: used counter} from a stored status's `dispensing` member."""
    try:
        doc = json.loads(raw or "null")
        listed = doc["dispensing"]["grants"]
        return {
            g["id"]: g["used"]
            for g in listed
            if isinstance(g.get("id"), str) and isinstance(g.get("used"), int)
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def dispensing(store: Store, box: str, raw_status: str | None) -> list[GrantLine]:
    """The box's grants, newest first, with the used counters its status reports."""
    from backend import grants  # the dispensing tables (m004): only this page reads them

    used = _used(raw_status)
    return [
        GrantLine(g.id, g.cards, g.quota, used.get(g.id), g.not_before, g.not_after, g.revoked)
        for g in reversed(grants.grants(store, box))
    ]
