"""Claim codes v1: what a box hands a customer to claim a card in their wallet, offline.

A box mints one under a grant (cards/grant.py) with its own key; the customer's phone
opens it through the claim URL, and the backend's claim service checks it against the
grant it signed and answers with a signed code (cards/signed_code.py) for the card. The
box needs no network to mint; the claim service needs nothing from the box but the code.

Text form: `RC1` followed by unpadded base32 (A-Z, 2-7) of a 28-byte payload and its
64-byte Ed25519 signature, 151 characters, all in the QR alphanumeric set like a signed
code's. Payload, big-endian: box key id (8 bytes) | grant id (8 bytes) | counter (u32) |
card id (u32) | claim_by (u32, Unix seconds). The signature covers `redeemd-claim-v1\\0`
+ payload. (grant id, counter) names a claim code once and for all: the box commits each
counter in a `dispense` ledger record before it shows the code, so a counter is never
minted twice and never above the grant's quota. docs/protocol.md section 18.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cards import base32, keys
from cards.grant import Grant, GrantSet
from cards.verdict import Reason

PREFIX = "RC1"
DOMAIN = b"redeemd-claim-v1\x00"
_PAYLOAD = struct.Struct(">8s8sIII")
_RAW_SIZE = _PAYLOAD.size + 64
TEXT_LENGTH = len(PREFIX) + (_RAW_SIZE * 8 + 4) // 5
MAX_U32 = 0xFFFFFFFF


class ClaimCodeError(ValueError):
    """A claim code cannot be minted or parsed; the message says which field and why."""


@dataclass(frozen=True)
class ClaimCode:
    box_key_id: str
    grant_id: str
    counter: int
    card_id: int
    claim_by: int
    payload: bytes
    signature: bytes


def looks_like_claim(text: str) -> bool:
    return len(text) == TEXT_LENGTH and text.startswith(PREFIX)


def mint(box_private: bytes, grant_id: str, counter: int, card_id: int, claim_by: int) -> str:
    """The claim code for counter `counter` of grant `grant_id`. The caller commits the
    counter before showing the result (durable before shown)."""
    for name, value in (("counter", counter), ("card id", card_id), ("claim_by", claim_by)):
        if not 0 <= value <= MAX_U32:
            raise ClaimCodeError(f"{name} {value} is out of range: allowed 0..{MAX_U32}")
    try:
        grant_raw = bytes.fromhex(grant_id)
    except ValueError:
        grant_raw = b""
    if len(grant_raw) != 8:
        raise ClaimCodeError(f"grant id {grant_id!r} must be 16 hex digits")
    kid = bytes.fromhex(keys.key_id(keys.public_of(box_private)))
    payload = _PAYLOAD.pack(kid, grant_raw, counter, card_id, claim_by)
    signature = keys.sign(box_private, DOMAIN, payload)
    return PREFIX + base32.encode(payload + signature)


def parse(text: str) -> ClaimCode:
    """Decode a claim code's fields; `verify` checks the signature."""
    if not looks_like_claim(text):
        raise ClaimCodeError(
            f"not a claim code: it must be {TEXT_LENGTH} characters starting {PREFIX}"
        )
    try:
        raw = base32.decode(text[len(PREFIX) :], _RAW_SIZE)
    except ValueError as exc:
        raise ClaimCodeError(f"claim code {exc}") from None
    kid, grant_raw, counter, card_id, claim_by = _PAYLOAD.unpack(raw[: _PAYLOAD.size])
    return ClaimCode(
        box_key_id=kid.hex(),
        grant_id=grant_raw.hex(),
        counter=counter,
        card_id=card_id,
        claim_by=claim_by,
        payload=raw[: _PAYLOAD.size],
        signature=raw[_PAYLOAD.size :],
    )


def verify(code: ClaimCode, box_public: bytes) -> bool:
    return keys.key_id(box_public) == code.box_key_id and keys.verify(
        box_public, code.signature, DOMAIN, code.payload
    )


def refusal(code: ClaimCode, grants: GrantSet, now: int) -> tuple[Reason, str] | None:
    """Why the claim service must refuse `code` (already verified with the set's box key)
    under the grants it signed for that box; None when the code may be claimed. The
    service still checks that (grant, counter) was not claimed before."""
    grant = grants.find(code.grant_id)
    if grant is None:
        return Reason.NO_GRANT, f"grant {code.grant_id} is not one this box holds"
    if grant.revoked:
        return Reason.GRANT_REVOKED, f"grant {grant.id} was revoked by the merchant"
    if code.card_id not in grant.cards:
        return Reason.NO_GRANT, f"grant {grant.id} does not cover card {code.card_id}"
    if not 1 <= code.counter <= grant.quota:
        return Reason.QUOTA_EXHAUSTED, (
            f"counter {code.counter} is outside grant {grant.id}'s quota 1..{grant.quota}"
        )
    if code.claim_by > grant.not_after + CLAIM_GRACE:
        return Reason.GRANT_EXPIRED, "the code's claim-by date is past the grant's window"
    if now > code.claim_by:
        return Reason.EXPIRED, f"the code had to be claimed by {keys.iso(code.claim_by)}"
    return None


# A claim code minted in a grant's last minutes may be claimed for up to this long after
# the grant ends: the customer scans at the counter, then opens the link at home.
CLAIM_GRACE = 7 * 86400


@dataclass(frozen=True)
class Choice:
    """The grant to mint under and the counter to commit, or why nothing may be minted."""

    grant: Grant | None
    counter: int
    reason: Reason | None
    detail: str


def choose(grants: GrantSet | None, used: dict[str, int], card_id: int, now: int) -> Choice:
    """Pick the grant a box mints a claim code for `card_id` under at `now`.

    `used` is the highest counter the box committed per grant id. Among the grants that
    cover the card, are in their window and have quota left, the one that ends first is
    used, so quota that would lapse goes out before quota that keeps. When none can be
    used the reason is the most telling one: a covering grant out of quota says
    `quota_exhausted` before one that has not started or has ended says so.
    """
    if grants is None:
        return Choice(None, 0, Reason.NO_GRANT, "this box holds no dispensing grant")
    covering = [g for g in grants.grants if card_id in g.cards]
    if not covering:
        return Choice(None, 0, Reason.NO_GRANT, f"no grant on this box covers card {card_id}")
    if all(g.revoked for g in covering):
        return Choice(
            None,
            0,
            Reason.GRANT_REVOKED,
            (f"the merchant revoked this box's grant for card {card_id}"),
        )
    covering = [g for g in covering if not g.revoked]
    usable = [
        g for g in covering if g.not_before <= now <= g.not_after and used.get(g.id, 0) < g.quota
    ]
    if usable:
        grant = min(usable, key=lambda g: (g.not_after, g.id))
        return Choice(grant, used.get(grant.id, 0) + 1, None, "")
    current = [g for g in covering if g.not_before <= now <= g.not_after]
    if current:
        return Choice(
            None,
            0,
            Reason.QUOTA_EXHAUSTED,
            (
                f"every grant for card {card_id} has used its quota "
                f"({', '.join(f'{g.id}: {g.quota}' for g in current)}); ask the merchant for more"
            ),
        )
    if any(g.not_before > now for g in covering):
        first = min(g.not_before for g in covering if g.not_before > now)
        return Choice(
            None,
            0,
            Reason.GRANT_NOT_YET_VALID,
            (f"the grant for card {card_id} starts at {keys.iso(first)}"),
        )
    return Choice(None, 0, Reason.GRANT_EXPIRED, f"the grant for card {card_id} has ended")
