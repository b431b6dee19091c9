"""Scans typed or piped on standard input (or read from a FIFO): for testing, demos and
integrations that already have the code as text. One line, one scan."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import BinaryIO

from cards.scan import Scan
from drivers.framing import LineFramer


class StreamScanner:
    """Reads a byte stream until EOF and emits one Scan per line."""

    def __init__(self, name: str, stream: BinaryIO, emit: Callable[[Scan], None]):
        self.name = name
        self.stream = stream
        self.emit = emit
        self.state = "connected"
        self.scans = 0
        self.last_scan: float | None = None

    def run(self) -> None:
        framer = LineFramer()
        fd = self.stream.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            for frame in framer.feed(data):
                self.scans += 1
                self.last_scan = time.time()
                self.emit(Scan(code=frame, source=self.name, at=self.last_scan))
        for frame in framer.feed(b"\n"):
            self.emit(Scan(code=frame, source=self.name, at=time.time()))
        self.state = "closed"
