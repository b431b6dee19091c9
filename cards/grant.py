"""Dispensing grants: the merchant's signed permission for one box key to mint claim codes.

A box dispenses offline, so the limit on what it may hand out must travel to it signed
and be enforced on the box: which cards, how many claim codes (a quota, counted by the
box's own gap-free counter per grant), in which window. A stolen or cloned box can then
mint no more than its grants allow, and the claim service refuses anything outside them.

The backend sends a box its **grant set**: every grant the box holds, plus the ids of
grants it revoked (kept, marked, so the box can say why it stops), in one envelope (the batch header's shape, section 6 of
docs/protocol.md) with its own magic and domain, signed by an issuer key whose
delegation from a root covers the merchant: root -> issuer -> grant, the chain of
batches. A newer set (higher `seq`) replaces the older one whole, so revoking is
publishing a set that marks the grant revoked; a set never rolls back (`seq` only grows), so a
replayed old set cannot bring a revoked grant back. docs/protocol.md section 18.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cards import envelope, keys

MAGIC = b"RDG1"
DOMAIN = b"redeemd-grant-v1\x00"
MAX_QUOTA = 0xFFFFFFFF
MAX_CARD_ID = 0xFFFFFFFF
MAX_TIME = 0xFFFFFFFF
MAX_GRANTS = 256
_GRANT_ID = re.compile(r"[0-9a-f]{16}")


class GrantError(ValueError):
    """A grant set is refused as a whole; the box keeps the set it had."""


@dataclass(frozen=True)
class Grant:
    """The right to mint claim codes `1..quota` for `cards` in [not_before, not_after],
    unless `revoked`."""

    id: str
    cards: tuple[int, ...]
    quota: int
    not_before: int
    not_after: int
    revoked: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "cards": list(self.cards),
            "quota": self.quota,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "revoked": self.revoked,
        }


@dataclass(frozen=True)
class GrantSet:
    """Every grant one box key holds, as of `seq`; `raw` is the signed message."""

    merchant: str
    box: str
    box_key_id: str
    seq: int
    created_at: int
    grants: tuple[Grant, ...]
    issuer: keys.Delegation
    raw: bytes

    def find(self, grant_id: str) -> Grant | None:
        return next((g for g in self.grants if g.id == grant_id), None)


def build(
    issuer_private: bytes,
    delegation: keys.Delegation,
    *,
    merchant: str,
    box: str,
    box_public: bytes,
    seq: int,
    created_at: int,
    grants: tuple[Grant, ...],
) -> bytes:
    """The signed grant set; `open_grants` accepts exactly what this builds."""
    body = {
        "v": 1,
        "merchant": merchant,
        "box": box,
        "box_key": keys.b64(box_public),
        "box_key_id": keys.key_id(box_public),
        "seq": seq,
        "created_at": created_at,
        "grants": [g.to_json() for g in grants],
        "key_id": delegation.key_id,
        "issuer": delegation.to_json(),
    }
    _check_body(body)
    return envelope.seal(MAGIC, DOMAIN, body, issuer_private)


def open_grants(data: bytes, roots: dict[str, bytes]) -> GrantSet:
    """Verify a grant set completely: trust chain, signature, the delegation's scope at
    `created_at`, every field's type and range. Whose box it is for is the caller's
    check (`refusal_for`), since only the box knows its own name and key."""
    try:
        sealed = envelope.open_signed(data, MAGIC, DOMAIN, roots, "grant set")
    except envelope.EnvelopeError as exc:
        raise GrantError(str(exc)) from None
    if len(data) != sealed.end:
        raise GrantError("trailing bytes after the grant set's signature")
    body = sealed.body
    _check_body(body)
    box_public = keys.unb64(body["box_key"], "grant set box_key", 32)
    if keys.key_id(box_public) != body["box_key_id"]:
        raise GrantError("grant set box_key_id is not the key id of its box_key")
    if not sealed.delegation.allows(body["merchant"], body["created_at"]):
        raise GrantError(sealed.delegation.refusal(body["merchant"], body["created_at"]))
    return GrantSet(
        merchant=body["merchant"],
        box=body["box"],
        box_key_id=body["box_key_id"],
        seq=body["seq"],
        created_at=body["created_at"],
        grants=tuple(
            Grant(
                g["id"],
                tuple(g["cards"]),
                g["quota"],
                g["not_before"],
                g["not_after"],
                g["revoked"],
            )
            for g in body["grants"]
        ),
        issuer=sealed.delegation,
        raw=data,
    )


def refusal_for(grants: GrantSet, *, merchant: str, box: str, box_key_id: str) -> str | None:
    """Why this box must not take `grants`, in words for its technician; None if it may."""
    if grants.merchant != merchant:
        return f"the grant set is for merchant {grants.merchant!r}, this box is {merchant!r}"
    if grants.box != box:
        return f"the grant set is for box {grants.box!r}, this box is {box!r}"
    if grants.box_key_id != box_key_id:
        return (
            f"the grant set is for box key {grants.box_key_id}, this box's key is {box_key_id} "
            "(was the box key made again?): grant the key `redeemd box-key` shows"
        )
    return None


def _check_body(body: dict[str, Any]) -> None:
    def need(obj: dict[str, Any], name: str, kind: type, where: str = "grant set") -> Any:
        value = obj.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise GrantError(f"{where} field '{name}' must be {kind.__name__}, got {value!r}")
        return value

    for name in ("merchant", "box", "box_key", "box_key_id"):
        if not need(body, name, str):
            raise GrantError(f"grant set field '{name}' is empty")
    for name in ("seq", "created_at"):
        if not 0 <= need(body, name, int) <= (1 << 63) - 1:
            raise GrantError(f"grant set field '{name}' is out of range")
    grants = need(body, "grants", list)
    if len(grants) > MAX_GRANTS:
        raise GrantError(f"grant set holds {len(grants)} grants (at most {MAX_GRANTS})")
    seen: set[str] = set()
    for index, g in enumerate(grants):
        where = f"grant {index}"
        if not isinstance(g, dict):
            raise GrantError(f"{where} is not an object")
        grant_id = need(g, "id", str, where)
        if not _GRANT_ID.fullmatch(grant_id):
            raise GrantError(f"{where}: id {grant_id!r} must be 16 lower-case hex digits")
        if grant_id in seen:
            raise GrantError(f"{where}: id {grant_id} appears twice")
        seen.add(grant_id)
        cards = need(g, "cards", list, where)
        if not cards or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 < c <= MAX_CARD_ID for c in cards
        ):
            raise GrantError(
                f"{where}: cards must be a non-empty list of card ids 1..{MAX_CARD_ID}"
            )
        if not 1 <= need(g, "quota", int, where) <= MAX_QUOTA:
            raise GrantError(f"{where}: quota must be 1..{MAX_QUOTA}")
        not_before, not_after = need(g, "not_before", int, where), need(g, "not_after", int, where)
        if not 0 <= not_before <= not_after <= MAX_TIME:
            raise GrantError(f"{where}: window must be 0 <= not_before <= not_after <= {MAX_TIME}")
        if not isinstance(g.get("revoked"), bool):
            raise GrantError(
                f"{where} field 'revoked' must be true or false, got {g.get('revoked')!r}"
            )
