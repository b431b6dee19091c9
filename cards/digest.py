"""Keyed code digests: the only form in which a code is stored or sent.

HMAC-SHA256 under the merchant's code key, truncated to 16 bytes. Without the key a
leaked database or a sniffed MQTT message does not reveal redeemable codes, and short
codes (6-digit coupons) cannot be brute-forced from their digest alone.
"""

from __future__ import annotations

import hashlib
import hmac

DIGEST_SIZE = 16
_BLOCK = 64  # SHA-256 block size: the HMAC key is padded to it
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def code_digest(code_key: bytes, text: str) -> bytes:
    """Digest of a normalised code.

    >>> code_digest(b"k" * 32, "DEMO-0001").hex()[:8]
    '750645a5'
    """
    return hmac.digest(code_key, text.encode("utf-8"), "sha256")[:DIGEST_SIZE]


def short(digest: bytes | None) -> str:
    """The most of a digest a log line or a screen may show."""
    return digest[:4].hex() if digest else "-"


class CodeDigester:
    """`code_digest` with the key's HMAC pads computed once: the scan path digests every
    read, and re-deriving the pads costs more than hashing a short code.

    HMAC (RFC 2104) is kept as its two keyed SHA-256 states, copied for each digest, as
    the pure-Python fallback in the standard library's hmac module does: the same bytes
    as hmac.digest, without hmac.HMAC's Python-level copy/update/digest calls.
    """

    def __init__(self, code_key: bytes):
        key = hashlib.sha256(code_key).digest() if len(code_key) > _BLOCK else code_key
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def __call__(self, text: str) -> bytes:
        inner = self._inner.copy()
        inner.update(text.encode("utf-8"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:DIGEST_SIZE]
