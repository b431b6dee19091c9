"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams.

The protocol is one datagram of `KEY=value` lines to the Unix socket named by
$NOTIFY_SOCKET (a leading "@" means the abstract namespace). libsystemd's sd_notify
does no more than that; binding it would add a C build dependency to every box for
twenty lines, and the PyPI wrappers around it are unmaintained. Outside systemd
(no $NOTIFY_SOCKET) every call is a no-op, so `redeemd run` behaves the same in a
terminal.

    >>> notify = Notifier()
    >>> notify.ready("cache seq 12, 2 scanners")
    >>> if notify.watchdog_due(): notify.watchdog()
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("redeemd")


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ, clock=time.monotonic):
        self.clock = clock
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        # WatchdogSec= sets WATCHDOG_USEC (and WATCHDOG_PID, which must be us): ping at
        # half the interval, as sd_watchdog_enabled(3) recommends.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_every: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_every = int(usec) / 2e6
        self._last_ping = clock()
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> None:
        if self.address is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(message, self.address)
        except OSError as exc:
            # systemd went away or the socket is gone: nothing to tell, keep serving.
            log.debug("sd_notify to %s failed: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 match RELOADING=1 to the reload it asked for.
        self.send(
            RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        )

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="stopping")

    def watchdog_due(self) -> bool:
        return (
            self.watchdog_every is not None
            and self.clock() - self._last_ping >= self.watchdog_every
        )

    def watchdog(self) -> None:
        self._last_ping = self.clock()
        self.send(WATCHDOG="1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
