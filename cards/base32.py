"""Canonical unpadded base32 (RFC 4648: A-Z, 2-7): the text of signed and claim codes.

Every character is in the QR alphanumeric set, so a code encodes compactly, and it is
plain ASCII, which every scanner returns unmangled. Exactly one text stands for one byte
string: padding is left off, and a text whose last character carries non-zero padding
bits is refused, so that two texts can never be one code (docs/protocol.md section 8).
"""

from __future__ import annotations

import base64
import binascii

ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def decode(text: str, size: int) -> bytes:
    """The `size` bytes behind `text`; ValueError says, after the code's name, what is
    wrong ("contains characters outside base32 (A-Z, 2-7)" ...)."""
    if not ALPHABET.issuperset(text):
        raise ValueError("contains characters outside base32 (A-Z, 2-7)")
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except binascii.Error:
        raise ValueError("is not valid base32") from None
    if len(raw) != size or encode(raw) != text:
        raise ValueError("is not in canonical form")
    return raw
