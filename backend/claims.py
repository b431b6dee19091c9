"""Claims on the backend side: each claim code accepted once, and dispensed -> claimed -> redeemed.

The claim service (backend/claim_service.py) decides whether a claim code may be
claimed; this module records the claim and answers what the backend knows of the
funnel. A claim row names the claim code by (grant_id, counter), its primary key: a
second claim of the same code finds the row (or, racing, the key) and is refused. The
row holds the signed code's keyed digest, never its text, and is committed before the
customer is shown the code (durable before shown): a crash after the commit loses a
page, never a claim that nobody knows was made.

Serials. A signed code is (issuer key, card, serial, window); two codes of one card with
one serial are the same code to every revocation and report. The claim service takes
its serials from CLAIM_SERIAL_BASE (2^62) up, per card id, allocated in the claim's own
transaction under the card's lock, and a unique index on (card_id, serial) backs it:
`redeemd-backend mint --serial N` is given small serials by people, which never reach
2^62, and the range stays below 2^63 so both SQLite's and PostgreSQL's signed 64-bit
integers hold it. Per card id, not per merchant: a signed code names no merchant, and
one issuer key may sign for several.

    >>> claimed = record(store, code=parsed, merchant="acme", box="box-1", claim_digest=d,
    ...                  code_key=k, sign=lambda serial: mint(issuer, 7, serial, nb, 0), now=now)
    >>> claimed.serial
    4611686018427387905
    >>> funnel(store, "card")[0].to_json()
    {'merchant': 'acme', 'card': 7, 'dispensed': 120, 'claimed': 80, 'redeemed': 31}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from backend.store import Store
from cards import batch
from cards.batch import BatchError, Kind
from cards.claim_code import ClaimCode
from cards.digest import code_digest

CLAIM_SERIAL_BASE = 1 << 62
BY = ("card", "box", "store", "day")


class AlreadyClaimed(Exception):
    """The claim code was claimed before; `claimed_at` says when (Unix seconds)."""

    def __init__(self, grant_id: str, counter: int, claimed_at: int):
        super().__init__(f"claim code {grant_id}/{counter} was already claimed")
        self.claimed_at = claimed_at


@dataclass(frozen=True)
class Claimed:
    """A committed claim and the signed code it gave. `code` is the plaintext for the
    customer's page only: the store keeps `code_digest`."""

    grant_id: str
    counter: int
    merchant: str
    box: str
    card_id: int
    serial: int
    claimed_at: int
    code: str
    code_digest: str


def record(
    store: Store,
    *,
    code: ClaimCode,
    merchant: str,
    box: str,
    claim_digest: str,
    code_key: bytes,
    sign: Callable[[int], str],
    now: int,
) -> Claimed:
    """Accept `code` (already verified and checked against its grant) once: allocate
    the card's next claim serial, `sign(serial)` the signed code, and commit the claim
    row with its digest. AlreadyClaimed when (grant_id, counter) has a row."""
    with store.engine.transaction():
        store.engine.lock(
            [("claim", code.grant_id, str(code.counter)), ("claim-serial", str(code.card_id))]
        )
        row = store.engine.execute(
            "SELECT claimed_at FROM claims WHERE grant_id = ? AND counter = ?",
            (code.grant_id, code.counter),
        ).fetchone()
        if row is not None:
            raise AlreadyClaimed(code.grant_id, code.counter, row[0])
        (last,) = store.engine.execute(
            "SELECT COALESCE(MAX(serial), ?) FROM claims WHERE card_id = ?",
            (CLAIM_SERIAL_BASE, code.card_id),
        ).fetchone()
        serial = last + 1
        text = sign(serial)
        digest = code_digest(code_key, text).hex()
        store.engine.execute(
            "INSERT INTO claims(grant_id, counter, merchant, box, card_id, serial, claimed_at, "
            "claim_digest, code_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                code.grant_id,
                code.counter,
                merchant,
                box,
                code.card_id,
                serial,
                now,
                claim_digest,
                digest,
            ),
        )
    return Claimed(
        code.grant_id, code.counter, merchant, box, code.card_id, serial, now, text, digest
    )


def claimed_at(store: Store, grant_id: str, counter: int) -> int | None:
    """When the claim code (grant_id, counter) was claimed, or None."""
    row = store.engine.execute(
        "SELECT claimed_at FROM claims WHERE grant_id = ? AND counter = ?", (grant_id, counter)
    ).fetchone()
    return row[0] if row else None


def card_titles(store: Store, merchant: str, roots: dict[str, bytes]) -> dict[int, str]:
    """{card id: title} from `merchant`'s card batches (a later template wins), for the
    claim page. A batch that no longer verifies (its delegation's root was replaced)
    is skipped: a title is a courtesy, not a decision."""
    titles: dict[int, str] = {}
    rows = store.engine.execute(
        "SELECT data FROM batches WHERE merchant = ? AND kind = ? ORDER BY seq",
        (merchant, Kind.CARDS.value),
    ).fetchall()
    for (data,) in rows:
        try:
            templates = batch.open_file(bytes(data), roots).card_templates()
        except BatchError:
            continue
        for template in templates:
            if isinstance(template.get("id"), int) and isinstance(template.get("title"), str):
                titles[template["id"]] = template["title"]
    return titles


def latest_cards_seq(store: Store, merchant: str) -> int:
    """The newest cards batch of `merchant` (0 if none): titles change only with it."""
    (seq,) = store.engine.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM batches WHERE merchant = ? AND kind = ?",
        (merchant, Kind.CARDS.value),
    ).fetchone()
    return seq


# ------------------------------------------------------------------ the funnel


@dataclass(frozen=True)
class FunnelRow:
    merchant: str
    key: str | int
    dispensed: int
    claimed: int
    redeemed: int

    def to_json(self, by: str) -> dict[str, object]:
        return {
            "merchant": self.merchant,
            by: self.key,
            "dispensed": self.dispensed,
            "claimed": self.claimed,
            "redeemed": self.redeemed,
        }


def funnel(
    store: Store,
    by: str = "card",
    *,
    box: str | None = None,
    card: int | None = None,
    sold_at: str | None = None,
) -> list[FunnelRow]:
    """Dispensed -> claimed -> redeemed counts per merchant and card, dispensing box,
    dispensing box's store, or UTC day (each step on the day it happened: the dispense
    record's time, the claim's, the first redemption's).

    Dispensed: accepted `dispense` records the collector stored. Claimed: claims.
    Redeemed: claims whose signed code has an accepted `redeem` record (on any box of the
    merchant) not undone by an accepted reversal. A claim is counted under the box that
    minted its claim code, and under that box's store as its `dispense` record names it
    ("-" until that record arrives: a claim can come before the box's records do).
    `box`, `card` and `sold_at` (a store) count only what they name, whatever `by` is.
    """
    if by not in BY:
        raise ValueError(f"funnel by {by!r}: allowed {', '.join(BY)}")
    counts: dict[tuple[str, str | int], list[int]] = {}
    stores: dict[tuple[str, int], str] = {}
    box_store: dict[tuple[str, str], str] = {}

    def add(merchant: str, key: str | int, column: int) -> None:
        counts.setdefault((merchant, key), [0, 0, 0])[column] += 1

    def wanted(on_box: str, card_id: int | None, where: str) -> bool:
        return (
            (box is None or on_box == box)
            and (card is None or card_id == card)
            and (sold_at is None or where == sold_at)
        )

    dispensed = store.engine.execute(
        "SELECT merchant, box, card_id, raw, at_ms FROM events WHERE action = 'dispense' "
        "AND verdict = 'accepted'"
    ).fetchall()
    for merchant, on_box, card_id, raw, at_ms in dispensed:
        record = json.loads(raw)
        where = record.get("store") if isinstance(record.get("store"), str) else "-"
        if isinstance(record.get("grant_id"), str) and isinstance(record.get("counter"), int):
            stores[(record["grant_id"].lower(), record["counter"])] = where
        box_store[(merchant, on_box)] = where
        if wanted(on_box, card_id, where):
            keyed = {"card": card_id, "box": on_box, "store": where, "day": _day(at_ms)}
            add(merchant, keyed[by], 0)
    redeemed = {
        digest: first
        for digest, first in store.engine.execute(
            "SELECT c.code_digest, MIN(e.at_ms) FROM claims c JOIN events e "
            "ON e.merchant = c.merchant AND e.digest = c.code_digest WHERE e.action = 'redeem' "
            "AND e.verdict = 'accepted' AND NOT EXISTS (SELECT 1 FROM events r "
            "WHERE r.reverses = e.id AND r.action = 'reverse' AND r.verdict = 'accepted') "
            "GROUP BY c.code_digest"
        ).fetchall()
    }
    for grant_id, counter, merchant, minted_on, card_id, digest, claimed_at in store.engine.execute(
        "SELECT grant_id, counter, merchant, box, card_id, code_digest, claimed_at FROM claims"
    ).fetchall():
        where = stores.get((grant_id, counter)) or box_store.get((merchant, minted_on), "-")
        if not wanted(minted_on, card_id, where):
            continue
        keys = {"card": card_id, "box": minted_on, "store": where}
        add(merchant, keys.get(by) or _day(claimed_at * 1000), 1)
        if digest in redeemed:
            add(merchant, keys.get(by) or _day(redeemed[digest]), 2)
    return [
        FunnelRow(merchant, key, *numbers)
        for (merchant, key), numbers in sorted(counts.items(), key=lambda item: _order(*item[0]))
    ]


def _day(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at_ms // 1000))


def _order(merchant: str, key: str | int) -> tuple[str, int, str]:
    # Card ids in numeric order (2 before 10), names in text order.
    return merchant, key if isinstance(key, int) else 0, str(key)
