"""Signed manifests: the backend's retained statement of the newest batch sequence.

A box compares the manifest's `latest_seq` with what it has applied and asks for the
difference; a manifest re-signed periodically also proves the box is not cut off
(freshness). Same envelope as a batch header, with its own magic and domain, so one can
never be replayed as the other. docs/protocol.md section 16.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cards import envelope, keys

MAGIC = b"RDM1"
DOMAIN = b"redeemd-manifest-v1\x00"


class ManifestError(ValueError):
    """The manifest is refused; the box keeps what it knew."""


@dataclass(frozen=True)
class Manifest:
    merchant: str
    latest_seq: int
    created_at: int
    expires_at: int
    issuer: keys.Delegation


def build(
    issuer_private: bytes,
    delegation: keys.Delegation,
    *,
    merchant: str,
    latest_seq: int,
    created_at: int,
    expires_at: int,
) -> bytes:
    body = {
        "v": 1,
        "merchant": merchant,
        "latest_seq": latest_seq,
        "created_at": created_at,
        "expires_at": expires_at,
        "key_id": delegation.key_id,
        "issuer": delegation.to_json(),
    }
    return envelope.seal(MAGIC, DOMAIN, body, issuer_private)


def open_manifest(data: bytes, roots: dict[str, bytes]) -> Manifest:
    """Verify a manifest completely (trust chain, signature, scope, fields)."""
    try:
        sealed = envelope.open_signed(data, MAGIC, DOMAIN, roots, "manifest")
    except envelope.EnvelopeError as exc:
        raise ManifestError(str(exc)) from None
    if len(data) != sealed.end:
        raise ManifestError("trailing bytes after the manifest signature")
    body = sealed.body

    def need(name: str, kind: type) -> Any:
        value = body.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ManifestError(f"manifest field '{name}' must be {kind.__name__}, got {value!r}")
        return value

    manifest = Manifest(
        merchant=need("merchant", str),
        latest_seq=need("latest_seq", int),
        created_at=need("created_at", int),
        expires_at=need("expires_at", int),
        issuer=sealed.delegation,
    )
    if manifest.latest_seq < 0:
        raise ManifestError("manifest latest_seq is negative")
    if not sealed.delegation.allows(manifest.merchant, manifest.created_at):
        raise ManifestError(sealed.delegation.refusal(manifest.merchant, manifest.created_at))
    return manifest
