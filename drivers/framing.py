"""Splitting a byte stream into scans: a pure function of bytes, tested without devices.

Scanners end a read with CR, LF or CRLF; some wrap it in STX/ETX. A read may arrive in
pieces or several at once, so the framer keeps what is left over between feeds. A
line longer than the limit without a terminator is dropped (and reported), so a
scanner stuck sending garbage cannot grow memory without bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TERMINATORS = re.compile(rb"\r\n|\r|\n|\x03")


@dataclass
class LineFramer:
    max_length: int = 4096
    buffer: bytearray = field(default_factory=bytearray)
    overflowed: int = 0
    """How many over-long frames were dropped since the last look."""

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every complete frame (without its terminator)."""
        self.buffer += data
        frames = []
        start = 0
        for match in _TERMINATORS.finditer(self.buffer):
            frame = bytes(self.buffer[start : match.start()]).lstrip(b"\x02")
            start = match.end()
            if len(frame) > self.max_length:
                self.overflowed += 1
            elif frame.strip():
                frames.append(frame)
        del self.buffer[:start]
        if len(self.buffer) > self.max_length:
            # No terminator in sight: discard and resynchronise on the next one.
            self.overflowed += 1
            self.buffer.clear()
        return frames
