"""Signed codes v1: self-validating codes a box can accept before any batch lists them.

Text form: `RD1` followed by unpadded RFC 4648 base32 (A-Z, 2-7) of a 28-byte payload
and its 64-byte Ed25519 signature. Every character is in the QR alphanumeric set, so
the code encodes compactly, and it is plain ASCII, which zbar returns unmangled.

Payload, big-endian: key id (8 bytes) | card id (u32) | serial (u64) |
not_before (u32, Unix seconds) | not_after (u32). The signature covers
`redeemd-code-v1\\0` + payload. A time field of 0 means "use the card's window"; the
window a box applies is always inside the issuer's delegation (`window`). See
docs/protocol.md section 8 for the rules and a test vector.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cards import base32, keys
from cards.card import Card

PREFIX = "RD1"
DOMAIN = b"redeemd-code-v1\x00"
_PAYLOAD = struct.Struct(">8sIQII")
_RAW_SIZE = _PAYLOAD.size + 64
TEXT_LENGTH = len(PREFIX) + (_RAW_SIZE * 8 + 4) // 5


MAX_CARD_ID = 0xFFFFFFFF
MAX_SERIAL = 0xFFFFFFFFFFFFFFFF
MAX_TIME = 0xFFFFFFFF


class SignedCodeError(ValueError):
    """A signed code cannot be minted or parsed; the message says which field and why."""


@dataclass(frozen=True)
class SignedCode:
    key_id: str
    card_id: int
    serial: int
    not_before: int
    not_after: int
    payload: bytes
    signature: bytes


def looks_signed(text: str) -> bool:
    """Cheap test used by classification; `parse` does the real work."""
    return len(text) == TEXT_LENGTH and text.startswith(PREFIX)


def mint(
    issuer_private: bytes,
    card_id: int,
    serial: int,
    not_before: int,
    not_after: int,
) -> str:
    """A signed code for `card_id`/`serial`, valid in [not_before, not_after].

    Raises SignedCodeError when a field does not fit the payload (u32 card id and
    times, u64 serial).
    """
    for name, value, largest in (
        ("card id", card_id, MAX_CARD_ID),
        ("serial", serial, MAX_SERIAL),
        ("not_before", not_before, MAX_TIME),
        ("not_after", not_after, MAX_TIME),
    ):
        if not 0 <= value <= largest:
            raise SignedCodeError(f"{name} {value} is out of range: allowed 0..{largest}")
    kid = bytes.fromhex(keys.key_id(keys.public_of(issuer_private)))
    payload = _PAYLOAD.pack(kid, card_id, serial, not_before, not_after)
    signature = keys.sign(issuer_private, DOMAIN, payload)
    return PREFIX + base32.encode(payload + signature)


def parse(text: str) -> SignedCode:
    """Decode a signed code's fields; the signature is checked by `verify`."""
    if not looks_signed(text):
        raise SignedCodeError(f"not a {PREFIX} signed code (wrong prefix or length)")
    try:
        raw = base32.decode(text[len(PREFIX) :], _RAW_SIZE)
    except ValueError as exc:
        raise SignedCodeError(f"signed code {exc}") from None
    kid, card_id, serial, not_before, not_after = _PAYLOAD.unpack(raw[: _PAYLOAD.size])
    return SignedCode(
        key_id=kid.hex(),
        card_id=card_id,
        serial=serial,
        not_before=not_before,
        not_after=not_after,
        payload=raw[: _PAYLOAD.size],
        signature=raw[_PAYLOAD.size :],
    )


def verify(code: SignedCode, issuer_public: bytes) -> bool:
    return keys.verify(issuer_public, code.signature, DOMAIN, code.payload)


def inside_delegation(code: SignedCode, delegation: keys.Delegation) -> bool:
    """True when the code's non-zero time fields lie inside the delegation's window: a
    leaked issuer key must not mint codes valid before or after it was trusted to sign."""
    return (not code.not_before or code.not_before >= delegation.not_before) and (
        not code.not_after or code.not_after <= delegation.not_after
    )


def window(code: SignedCode, card: Card, delegation: keys.Delegation) -> tuple[int, int]:
    """The (not_before, not_after) a box applies to `code`, both inclusive, always inside
    the delegation's window (check `inside_delegation` first for non-zero fields).

    A field of 0 stands for the card's `valid_from` / `valid_until`, clipped to the
    delegation's window; a card without that bound gets the delegation's, so a code
    with `not_after = 0` still ends when its issuer key's delegation does.
    """
    not_before = max(code.not_before or card.valid_from or 0, delegation.not_before)
    if code.not_after:
        not_after = min(code.not_after, delegation.not_after)
    elif card.valid_until is None:
        not_after = delegation.not_after
    else:
        not_after = min(card.valid_until, delegation.not_after)
    return not_before, not_after
