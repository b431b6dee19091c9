"""Splitting a byte stream into scans: a pure function of bytes, tested without devices.

Scanners end a read with CR, LF or CRLF; some wrap it in STX/ETX. A read may arrive in
pieces or several at once, so the framer keeps what is left over between feeds.

A line longer than `max_length` is discarded up to and including its terminator, so a
scanner (or a pipe) sending garbage cannot grow memory without bound, and the tail of a
runaway line is never taken for a code of its own. In its place the framer returns one
`cards.normalize.OVERSIZED` frame, which normalisation rejects as `malformed`: the
cashier sees that a read was refused. This is the same discard-until-terminator rule as
`drivers.serial_framing`.

    >>> framer = LineFramer(max_length=8)
    >>> framer.feed(b"0123456789")
    [b'\\x18oversized']
    >>> framer.feed(b"DEMO\\nDEMO-1\\n")
    [b'DEMO-1']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cards.normalize import OVERSIZED

_TERMINATORS = re.compile(rb"\r\n|\r|\n|\x03")


@dataclass
class LineFramer:
    max_length: int = 4096
    buffer: bytearray = field(default_factory=bytearray)
    overflowed: int = 0
    """How many over-long lines were discarded so far."""
    skipping: bool = False
    """True while discarding the rest of an over-long line, up to its terminator."""

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every complete frame (without its terminator)."""
        self.buffer += data
        frames = []
        start = 0
        for match in _TERMINATORS.finditer(self.buffer):
            # The length counts every byte of the line, STX included, as the check on an
            # unterminated line below does: the verdict must not depend on how the bytes
            # were split into reads.
            line = bytes(self.buffer[start : match.start()])
            start = match.end()
            if self.skipping:
                # The tail of a line already reported as OVERSIZED.
                self.skipping = False
            elif len(line) > self.max_length:
                self.overflowed += 1
                frames.append(OVERSIZED)
            else:
                frame = line.lstrip(b"\x02")
                if frame.strip():
                    frames.append(frame)
        del self.buffer[:start]
        if len(self.buffer) > self.max_length:
            # No terminator in sight: report the line now (a stuck scanner may never end
            # it) and discard it up to the next terminator.
            if not self.skipping:
                self.overflowed += 1
                frames.append(OVERSIZED)
                self.skipping = True
            self.buffer.clear()
        return frames
