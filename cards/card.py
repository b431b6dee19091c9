"""Card templates: what a kind of coupon, ticket or gift card allows.

Templates travel in `cards` batches as JSON objects (docs/protocol.md lists the
fields). Parsing is strict, because a template that silently means something else on
the box than in the backend turns into money lost at the counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class CardKind(StrEnum):
    COUPON = "coupon"
    CASH = "cash"
    DISCOUNT = "discount"
    GIFT = "gift"
    GROUPON = "groupon"
    MEMBER = "member"
    TICKET = "ticket"
    STORED_VALUE = "stored_value"


# Kinds whose value is a balance in minor units rather than a number of uses.
BALANCE_KINDS = frozenset({CardKind.GIFT, CardKind.STORED_VALUE})


class CardError(ValueError):
    """A card template is invalid; the message names the field."""


@dataclass(frozen=True)
class Card:
    card_id: int
    merchant: str
    kind: CardKind
    title: str = ""
    uses: int | None = 1
    """Uses per code; None means unlimited."""
    balance: int | None = None
    """Initial balance in minor units for balance kinds."""
    stores: frozenset[str] = frozenset()
    """Stores where it may be redeemed; empty means every store of the merchant."""
    weekdays: frozenset[int] = frozenset()
    """ISO weekdays (1 = Monday) when it may be redeemed; empty means every day."""
    hours: tuple[tuple[int, int], ...] = ()
    """Local-time windows in minutes since midnight, [start, end); empty means all day."""
    valid_from: int | None = None
    valid_until: int | None = None
    two_phase: bool = False
    """A scan only checks; the POS app confirms with `redeem` (and an amount)."""
    reversal_window: int = 0
    """Seconds after a redemption during which it may be reversed; 0 = never."""

    @property
    def uses_balance(self) -> bool:
        return self.kind in BALANCE_KINDS


def parse_card(value: dict[str, Any]) -> Card:
    """Build a Card from its JSON object.

    >>> parse_card({"id": 7, "merchant": "demo", "kind": "coupon"}).uses
    1
    """
    known = {
        "id",
        "merchant",
        "kind",
        "title",
        "uses",
        "balance",
        "stores",
        "weekdays",
        "hours",
        "valid_from",
        "valid_until",
        "two_phase",
        "reversal_window",
    }
    if not isinstance(value, dict):
        raise CardError(f"a card template must be a JSON object, got {value!r}")
    unknown = set(value) - known
    if unknown:
        raise CardError(f"card has unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
    card_id = _count(value, "id")
    if card_id > 0xFFFFFFFF:
        raise CardError(
            f"card id {card_id} does not fit in 32 bits (entries and signed codes carry u32)"
        )
    try:
        kind = CardKind(str(value.get("kind")))
    except ValueError:
        allowed = ", ".join(k.value for k in CardKind)
        raise CardError(
            f"card {card_id}: kind {value.get('kind')!r} is not one of {allowed}"
        ) from None
    merchant = value.get("merchant")
    if not isinstance(merchant, str) or not merchant:
        raise CardError(f"card {card_id}: merchant must be a non-empty string")
    balance_kind = kind in BALANCE_KINDS
    uses = value.get("uses", None if balance_kind or kind is CardKind.MEMBER else 1)
    if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or uses < 1):
        raise CardError(f"card {card_id}: uses must be a positive integer or null (unlimited)")
    if not isinstance(value.get("hours", []), list):
        raise CardError(f"card {card_id}: hours must be a list like ['09:00-17:30']")
    hours = []
    for window in value.get("hours", []):
        try:
            start, end = (_minutes(t) for t in window.split("-"))
        except (AttributeError, ValueError):
            raise CardError(
                f"card {card_id}: hours entry {window!r} must look like '09:00-17:30'"
            ) from None
        hours.append((start, end))
    weekdays = value.get("weekdays", [])
    if not isinstance(weekdays, list) or not all(type(d) is int and 1 <= d <= 7 for d in weekdays):
        raise CardError(f"card {card_id}: weekdays must be a list of 1 (Monday) .. 7 (Sunday)")
    stores = value.get("stores", [])
    if not isinstance(stores, list) or not all(isinstance(s, str) for s in stores):
        raise CardError(f"card {card_id}: stores must be a list of store ids")
    two_phase = value.get("two_phase", balance_kind)
    if not isinstance(two_phase, bool):
        raise CardError(f"card {card_id}: two_phase must be true or false")
    return Card(
        card_id=card_id,
        merchant=merchant,
        kind=kind,
        title=str(value.get("title", "")),
        uses=uses,
        balance=_int(value, "balance"),
        stores=frozenset(stores),
        weekdays=frozenset(weekdays),
        hours=tuple(hours),
        valid_from=_int(value, "valid_from"),
        valid_until=_int(value, "valid_until"),
        two_phase=two_phase,
        reversal_window=_int(value, "reversal_window") or 0,
    )


def _int(value: dict[str, Any], name: str) -> int | None:
    return None if value.get(name) is None else _count(value, name)


def _count(value: dict[str, Any], name: str) -> int:
    item = value.get(name)
    if not isinstance(item, int) or isinstance(item, bool) or item < 0:
        raise CardError(f"card field '{name}' must be a non-negative integer, got {item!r}")
    return item


def _minutes(text: str) -> int:
    hour, minute = text.strip().split(":")
    result = int(hour) * 60 + int(minute)
    if not (0 <= int(minute) < 60 and 0 <= result <= 24 * 60):
        raise ValueError(text)
    return result


# ---------------------------------------------------------------- offline limits

# A box id as the config allows it (1-64 of A-Z a-z 0-9 _ . -), or "*" for every box.
_BOX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
EVERY_BOX = "*"


@dataclass(frozen=True)
class Limit:
    """An offline spending limit for one card template on one box (or every box).

    Amounts are what the card counts: minor units for balance kinds, uses for the
    others. None means no cap of that kind (docs/protocol.md 19.5).
    """

    card_id: int
    box: str
    """A box id, or EVERY_BOX ("*"); a limit naming the box wins over "*"."""
    per_redemption: int | None = None
    """One redemption may take at most this much."""
    per_account: int | None = None
    """What this box accepted for one account (a code without one is its own account)
    in records the backend has not acknowledged yet, plus this redemption, may not be
    more than this."""


def parse_limit(value: dict[str, Any]) -> Limit:
    """Build a Limit from its JSON object in a `limits` batch.

    >>> parse_limit({"card": 5, "box": "*", "per_redemption": 2000, "per_account": None})
    Limit(card_id=5, box='*', per_redemption=2000, per_account=None)
    """
    known = {"card", "box", "per_redemption", "per_account"}
    if not isinstance(value, dict):
        raise CardError(f"a limit must be a JSON object, got {value!r}")
    if set(value) != known:
        raise CardError(
            f"limit has fields {sorted(value)}; it must have exactly {sorted(known)} "
            "(null for a cap that does not apply)"
        )
    card_id = _count(value, "card")
    if card_id > 0xFFFFFFFF:
        raise CardError(f"limit: card id {card_id} does not fit in 32 bits")
    box = value["box"]
    if not isinstance(box, str) or not (
        box == EVERY_BOX or (1 <= len(box) <= 64 and set(box) <= _BOX_CHARS)
    ):
        raise CardError(
            f"limit for card {card_id}: box {box!r} must be a box id (1-64 of A-Z a-z 0-9 "
            '_ . -) or "*" for every box'
        )
    caps = {}
    for name in ("per_redemption", "per_account"):
        cap = value[name]
        if cap is not None and (type(cap) is not int or not 0 <= cap <= (1 << 63) - 1):
            raise CardError(
                f"limit for card {card_id} on box {box}: {name} must be null or an integer "
                f"0..2^63-1 (minor units or uses), got {cap!r}"
            )
        caps[name] = cap
    return Limit(card_id, box, caps["per_redemption"], caps["per_account"])


def parse_limits(values: list[Any]) -> list[Limit]:
    """Every limit of a `limits` batch; CardError for the first bad one or for two limits
    of the same card and box (which one holds would be ambiguous)."""
    limits = [parse_limit(v) for v in values]
    seen: set[tuple[int, str]] = set()
    for limit in limits:
        key = (limit.card_id, limit.box)
        if key in seen:
            raise CardError(f"two limits for card {limit.card_id} on box {limit.box!r}")
        seen.add(key)
    return limits


def limit_for(limits: Iterable[Limit], card_id: int, box: str) -> Limit | None:
    """The limit that holds for `card_id` on box `box`: the one naming the box, else the
    one for every box, else None."""
    found = None
    for limit in limits:
        if limit.card_id == card_id:
            if limit.box == box:
                return limit
            if limit.box == EVERY_BOX:
                found = limit
    return found
