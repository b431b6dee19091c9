"""The value a scanner driver hands to the engine."""

from __future__ import annotations

from dataclasses import dataclass

from cards.normalize import aim_identifier


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


def scanned(code: bytes, source: str, at: float) -> Scan:
    """A read from a scanner that sends text (serial, keyboard wedge, stdin): its
    symbology is the AIM identifier it put before the code, if any (the camera knows
    its own). Named here, in the driver's thread, not on the engine's scan path.

    >>> scanned(b"]Q1DEMO-0001", "counter", 0.0).symbology
    ']Q1'
    """
    return Scan(code=code, source=source, symbology=aim_identifier(code), at=at)
