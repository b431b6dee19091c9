"""Signed envelopes: magic | u32 header_len | canonical JSON header | Ed25519 signature.

Batch headers and manifests share this shape. Opening one checks everything that does
not depend on what the header says: sizes, JSON, version, the issuer delegation against
the configured roots, and the signature under the envelope's domain.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from cards import keys

MAX_HEADER_SIZE = 1 << 20
_U32 = struct.Struct(">I")


class EnvelopeError(ValueError):
    """The envelope cannot be trusted; nothing in it may be used."""


@dataclass(frozen=True)
class Envelope:
    body: dict[str, Any]
    delegation: keys.Delegation
    raw: bytes
    signature: bytes
    end: int
    """Offset of the first byte after the signature."""


def seal(magic: bytes, domain: bytes, body: dict[str, Any], issuer_private: bytes) -> bytes:
    header = keys.canonical_json(body)
    signature = keys.sign(issuer_private, domain, header)
    return magic + _U32.pack(len(header)) + header + signature


def open_signed(
    data: bytes, magic: bytes, domain: bytes, roots: dict[str, bytes], what: str
) -> Envelope:
    if len(data) < 8 or data[:4] != magic:
        raise EnvelopeError(f"not a redeemd {what}: it does not start with {magic.decode()}")
    (header_len,) = _U32.unpack_from(data, 4)
    if header_len > MAX_HEADER_SIZE:
        raise EnvelopeError(f"header of {header_len} bytes exceeds the {MAX_HEADER_SIZE} limit")
    end = 8 + header_len
    if len(data) < end + 64:
        raise EnvelopeError("truncated: the header or its signature is cut off")
    raw = data[8:end]
    signature = data[end : end + 64]
    try:
        body = json.loads(raw)
    # Parsed before the signature is checked, so any byte string must end here as an
    # EnvelopeError: ValueError covers over-long integers, RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError(f"header is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EnvelopeError("header must be a JSON object")
    if type(body.get("v")) is not int or body["v"] != 1:
        raise EnvelopeError(f"{what} format version {body.get('v')!r} is not supported (need 1)")
    try:
        delegation = keys.parse_delegation(body.get("issuer"), roots)
    except keys.TrustError as exc:
        raise EnvelopeError(str(exc)) from None
    if body.get("key_id") != delegation.key_id:
        raise EnvelopeError("header key_id does not match the issuer delegation")
    if not keys.verify(delegation.public_key, signature, domain, raw):
        raise EnvelopeError(f"bad signature: header not signed by issuer key {delegation.key_id}")
    return Envelope(body, delegation, raw, signature, end + 64)
