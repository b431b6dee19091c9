"""The value a scanner driver hands to the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scan:
    """One read from one scanner.

    `code` is the framed payload as bytes (terminators and framing removed by the
    driver, nothing else): it may still be invalid UTF-8 or carry an AIM prefix, and
    `cards.normalize` decides whether it is a code at all.
    """

    code: bytes
    source: str
    symbology: str | None = None
    at: float = 0.0
