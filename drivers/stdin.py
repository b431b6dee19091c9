"""Scans typed or piped on standard input, or read from a FIFO: for testing, demos and
integrations that already have the code as text. One line, one scan."""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable, Mapping

from cards.scan import Scan, scanned
from drivers.framing import LineFramer
from drivers.settings import StdinSettings
from drivers.supervisor import DriverState, Status


class StreamScanner:
    kind = "stdin"

    def __init__(self, name: str, settings: StdinSettings | Mapping[str, object]):
        self.name = name
        self.settings = StdinSettings.of(settings)

    def run(self, emit: Callable[[Scan], None], stop: threading.Event, state: DriverState) -> None:
        path = self.settings.path
        if path == "-":
            fd, owned = sys.stdin.fileno(), False
        else:
            # O_RDWR on a FIFO: the read end never sees EOF when a writer goes away, so
            # an integration can reopen it at will.
            fd, owned = os.open(path, os.O_RDWR | os.O_NONBLOCK), True
        state.state = Status.CONNECTED
        framer = LineFramer()
        try:
            while not stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                for frame in framer.feed(data):
                    emit(scanned(frame, self.name, time.time()))
            for frame in framer.feed(b"\n"):
                emit(scanned(frame, self.name, time.time()))
        finally:
            if owned:
                os.close(fd)

    def feedback(self, accepted: bool) -> None:
        pass

    def close(self) -> None:
        pass
