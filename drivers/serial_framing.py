"""Splitting a serial scanner's byte stream into reads: a pure object, tested without devices.

Like pyserial's `serial.threaded.LineReader` / `FramedPacket`, framing is separate from
the thread that moves bytes: the device loop calls `feed()` with whatever `read()`
returned and `idle()` when the line has been quiet for `idle_gap`; both return the
complete frames, with terminators, STX and the configured prefix/suffix removed.

    >>> framer = SerialFramer(terminator="auto")
    >>> framer.feed(b"DEMO-0001\\r\\nDEMO-")
    [b'DEMO-0001']
    >>> framer.feed(b"0002\\x03")
    [b'DEMO-0002']

Terminators (the `terminator` config key):

- ``auto``: CR, LF, CRLF, TAB or ETX, whichever comes (a CRLF split across two reads is
  still one read, because the empty "frame" between CR and LF is ignored; so is a TAB
  followed by CR). TAB is a terminator because many scanners ship with a TAB suffix
  (to jump to the next form field) and a code cannot contain one: `cards.normalize`
  refuses every control character but GS, so a TAB inside a read could only have made
  it `malformed`, never a different code.
- ``cr``, ``lf``, ``crlf``, ``tab``, ``etx``: only that one.
- ``none``: the scanner sends no terminator; a read ends when the line goes idle.

STX (0x02) always starts a new frame: a scanner that frames with STX/ETX and lost the
end of a frame (a glitch, a replug) resynchronises on the next STX, and the unfinished
bytes before it are discarded rather than glued to the next code.

Frames longer than `max_length` are dropped and counted in `dropped`; after a drop the
framer discards everything up to the next terminator, STX or idle gap, so the tail of a
runaway line is never taken for a code and memory stays bounded by `max_length`. Each
drop yields one `cards.normalize.OVERSIZED` frame in its place, which normalisation
rejects as `malformed`: the cashier sees the read was refused, as with the stdin framer.
Anything else, NUL bytes and invalid UTF-8 included, is passed on as bytes:
`cards.normalize` decides whether it is a code (and rejects it as `malformed` if not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cards.normalize import OVERSIZED

STX = 0x02
ETX = 0x03

TERMINATORS: dict[str, bytes | None] = {
    # The order of the alternatives matters for auto: CRLF before CR, so that a CRLF in
    # one read is one terminator (an empty frame would be skipped anyway).
    "auto": rb"\r\n|\r|\n|\t|\x03",
    "cr": rb"\r",
    "lf": rb"\n",
    "crlf": rb"\r\n",
    "tab": rb"\t",
    "etx": rb"\x03",
    "none": None,
}

DEFAULT_MAX_LENGTH = 4096


@dataclass
class SerialFramer:
    terminator: str = "auto"
    prefix: bytes = b""
    suffix: bytes = b""
    max_length: int = DEFAULT_MAX_LENGTH
    strip_leading: tuple[bytes, ...] = ()
    """Byte strings removed from the start of a frame: replies the scanner sends to our
    host commands (a Zebra SSI CMD_ACK packet) that would otherwise prefix the next code."""

    dropped: int = 0
    """Over-long frames dropped so far (shown in `redeemd status`)."""
    discarded: int = 0
    """Unfinished frames thrown away because an STX started a new one."""

    _buffer: bytearray = field(default_factory=bytearray, repr=False)
    _skipping: bool = field(default=False, repr=False)
    _pattern: re.Pattern[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.terminator not in TERMINATORS:
            raise ValueError(
                f"terminator {self.terminator!r}: must be one of {', '.join(TERMINATORS)}"
            )
        if self.max_length < 1:
            raise ValueError("max_length must be positive")
        expression = TERMINATORS[self.terminator]
        # STX is matched too: it ends whatever came before it (see the module docstring).
        self._pattern = re.compile(b"|".join(p for p in (expression, rb"\x02") if p))

    @property
    def pending(self) -> int:
        """Bytes waiting for a terminator (what `idle()` would flush)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes from the line; return every frame they complete."""
        frames: list[bytes] = []
        assert self._pattern is not None
        start = 0
        # The buffer left from the last feed holds no terminator, so searching all of it
        # again finds nothing old; it is at most max_length long.
        self._buffer += data
        for match in self._pattern.finditer(self._buffer):
            piece = bytes(self._buffer[start : match.start()])
            start = match.end()
            if match.group() == b"\x02":
                if piece and not self._skipping:
                    self.discarded += 1
                self._skipping = False
                continue
            self._finish(piece, frames)
        del self._buffer[:start]
        if len(self._buffer) > self.max_length + len(self.prefix) + len(self.suffix):
            self._overflow(frames)
        return frames

    def idle(self) -> list[bytes]:
        """The line went quiet for the idle gap.

        With `terminator = "none"` the bytes so far are one read. With a terminator they
        are kept (a slow USB bridge may pause inside a frame), except after an overflow,
        where the quiet line is the end of the runaway data."""
        if self.terminator != "none":
            if self._skipping:
                self._skipping = False
                self._buffer.clear()
            return []
        frames: list[bytes] = []
        piece = bytes(self._buffer)
        self._buffer.clear()
        self._finish(piece, frames)
        return frames

    def _finish(self, piece: bytes, frames: list[bytes]) -> None:
        if self._skipping:
            self._skipping = False
            return
        for leading in self.strip_leading:
            while leading and piece.startswith(leading):
                piece = piece[len(leading) :]
        if self.prefix and piece.startswith(self.prefix):
            piece = piece[len(self.prefix) :]
        if self.suffix and piece.endswith(self.suffix):
            piece = piece[: -len(self.suffix)]
        if len(piece) > self.max_length:
            self.dropped += 1
            frames.append(OVERSIZED)
        elif piece.strip(b" \t\r\n"):
            frames.append(piece)

    def _overflow(self, frames: list[bytes]) -> None:
        if not self._skipping:
            self.dropped += 1
            self._skipping = True
            frames.append(OVERSIZED)
        self._buffer.clear()
