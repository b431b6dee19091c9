"""Ed25519 keys, key ids and issuer delegations (root -> issuer).

Roots live in the box's config and never sign batches themselves; they sign short
delegations that say "this issuer key may sign for these merchants between these
times". A stolen issuer key is therefore bounded in scope and time, and rotating it
needs no change on the boxes. Signatures always cover a domain-separation prefix so a
delegation can never be replayed as a batch or a code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

KEY_ID_SIZE = 8
DELEGATION_DOMAIN = b"redeemd-delegation-v1\x00"


class TrustError(ValueError):
    """A signature, key or delegation cannot be trusted; the message says which and why."""


def key_id(public_key: bytes) -> str:
    """Key id: the first 8 bytes of SHA-256 of the raw public key, in hex."""
    return hashlib.sha256(public_key).digest()[:KEY_ID_SIZE].hex()


def canonical_json(value: object) -> bytes:
    """The one byte form of a JSON value that is signed: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | bytes, what: str, size: int | None = None) -> bytes:
    """The bytes behind base64 `text` (a key file's content may be given as read);
    TrustError names `what` and the first thing wrong with it."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as exc:
            raise TrustError(
                f"{what} is not base64 text: it holds byte 0x{text[exc.start]:02x} at offset "
                f"{exc.start} (a binary or re-encoded file, or the wrong file)"
            ) from None
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError):
        raise TrustError(f"{what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise TrustError(f"{what} must be {size} bytes, got {len(data)}")
    return data


def new_private_key() -> bytes:
    from cryptography.hazmat.primitives import serialization

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_of(private_key: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return (
        Ed25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def sign(private_key: bytes, domain: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(domain + message)


def verify(public_key: bytes, signature: bytes, domain: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, domain + message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Delegation:
    """A root's statement that an issuer key may sign for `merchants` in a time window."""

    key_id: str
    public_key: bytes
    merchants: tuple[str, ...]
    not_before: int
    not_after: int
    root_key_id: str
    signature: bytes

    def body(self) -> dict[str, object]:
        return {
            "v": 1,
            "key_id": self.key_id,
            "public_key": b64(self.public_key),
            "merchants": list(self.merchants),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "root_key_id": self.root_key_id,
        }

    def to_json(self) -> dict[str, object]:
        return {"cert": self.body(), "sig": b64(self.signature)}

    def allows(self, merchant: str, at: int) -> bool:
        return merchant in self.merchants and self.not_before <= at <= self.not_after

    def refusal(self, merchant: str, at: int) -> str:
        """Why `allows(merchant, at)` is False, in words and dates a person reads."""
        if merchant not in self.merchants:
            why = f"it is delegated for merchant(s) {', '.join(map(repr, self.merchants))} only"
        else:
            why = f"it is delegated from {iso(self.not_before)} to {iso(self.not_after)}"
        return (
            f"issuer key {self.key_id} may not sign for merchant {merchant!r} at {iso(at)}: {why}"
        )


def iso(seconds: int) -> str:
    """Unix seconds as an ISO 8601 UTC time (2026-09-21T00:00:00Z); the number itself
    if no calendar date has it."""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (Unix seconds)"


def delegate(
    root_private: bytes,
    issuer_public: bytes,
    merchants: tuple[str, ...],
    not_before: int,
    not_after: int,
) -> Delegation:
    unsigned = Delegation(
        key_id=key_id(issuer_public),
        public_key=issuer_public,
        merchants=tuple(merchants),
        not_before=not_before,
        not_after=not_after,
        root_key_id=key_id(public_of(root_private)),
        signature=b"",
    )
    signature = sign(root_private, DELEGATION_DOMAIN, canonical_json(unsigned.body()))
    return Delegation(**{**unsigned.__dict__, "signature": signature})


def parse_delegation(value: object, roots: dict[str, bytes]) -> Delegation:
    """Check a delegation against the configured roots; TrustError says what failed."""
    if not isinstance(value, dict) or not isinstance(value.get("cert"), dict):
        raise TrustError("issuer delegation must be an object with 'cert' and 'sig'")
    cert = value["cert"]
    try:
        delegation = Delegation(
            key_id=_field(cert, "key_id", str),
            public_key=unb64(_field(cert, "public_key", str), "issuer public key", 32),
            merchants=tuple(_field(cert, "merchants", list)),
            not_before=_field(cert, "not_before", int),
            not_after=_field(cert, "not_after", int),
            root_key_id=_field(cert, "root_key_id", str),
            signature=unb64(_field(value, "sig", str), "delegation signature", 64),
        )
    except (TypeError, KeyError) as exc:
        raise TrustError(f"issuer delegation: {exc.args[0]}") from None
    if type(cert.get("v")) is not int or cert["v"] != 1:
        raise TrustError(f"issuer delegation version {cert.get('v')!r} is not supported (need 1)")
    if not all(isinstance(m, str) for m in delegation.merchants):
        raise TrustError("issuer delegation: merchants must be strings")
    if delegation.key_id != key_id(delegation.public_key):
        raise TrustError("issuer delegation: key_id does not match the public key")
    root = roots.get(delegation.root_key_id)
    if root is None:
        raise TrustError(
            f"issuer key {delegation.key_id} is signed by root {delegation.root_key_id}, "
            "which is not in this box's [trust] root_keys"
        )
    if not verify(root, delegation.signature, DELEGATION_DOMAIN, canonical_json(cert)):
        raise TrustError(f"issuer delegation for key {delegation.key_id}: bad root signature")
    return delegation


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    if name not in obj:
        raise KeyError(f"missing field '{name}'")
    value = obj[name]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value
