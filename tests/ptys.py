"""A pseudo-terminal standing in for a serial scanner: the test writes what the scanner
would send on the master side; the driver opens the slave path like a real port."""

from __future__ import annotations

import os
import select
import termios
import time

WAIT = 60.0


class Pty:
    """One pseudo-terminal pair; `path` is the slave the driver opens."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.path = os.ttyname(self._slave)
        self.received = bytearray()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def read_until(self, expected: bytes, timeout: float = WAIT) -> bytes:
        """What the driver wrote, once it contains `expected`."""
        deadline = time.monotonic() + timeout
        while expected not in self.received:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{expected!r} never arrived; got {bytes(self.received)!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.received += os.read(self.master, 4096)
        return bytes(self.received)

    def line_settings(self) -> list:
        """The slave's termios settings, as the driver left them on the port."""
        return termios.tcgetattr(self._slave)

    def set_line(self, speed: int, cflag_on: int, iflag_on: int = 0) -> None:
        """Put the port in another state first, so what the driver sets is visible."""
        iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(self._slave)
        termios.tcsetattr(
            self._slave,
            termios.TCSANOW,
            [iflag | iflag_on, oflag, cflag | cflag_on, lflag, speed, speed, cc],
        )

    def unplug(self) -> None:
        # Once only: a closed descriptor number may already belong to someone else.
        if self.master >= 0:
            os.close(self.master)
            os.close(self._slave)
            self.master = self._slave = -1
