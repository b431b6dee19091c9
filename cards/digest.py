"""Keyed code digests: the only form in which a code is stored or sent.

HMAC-SHA256 under the merchant's code key, truncated to 16 bytes. Without the key a
leaked database or a sniffed MQTT message does not reveal redeemable codes, and short
codes (6-digit coupons) cannot be brute-forced from their digest alone.
"""

from __future__ import annotations

import hmac

DIGEST_SIZE = 16


def code_digest(code_key: bytes, text: str) -> bytes:
    """Digest of a normalised code.

    >>> code_digest(b"k" * 32, "DEMO-0001").hex()[:8]
    '750645a5'
    """
    return hmac.digest(code_key, text.encode("utf-8"), "sha256")[:DIGEST_SIZE]


def short(digest: bytes | None) -> str:
    """The most of a digest a log line or a screen may show."""
    return digest.hex()[:8] if digest else "-"


class CodeDigester:
    """`code_digest` with the key's HMAC pads computed once: the scan path digests every
    read, and re-deriving the pads costs more than hashing a short code."""

    def __init__(self, code_key: bytes):
        self._mac = hmac.new(code_key, digestmod="sha256")

    def __call__(self, text: str) -> bytes:
        mac = self._mac.copy()
        mac.update(text.encode("utf-8"))
        return mac.digest()[:DIGEST_SIZE]
