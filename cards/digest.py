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
