"""Keeping scanners running: each driver in its own thread, restarted with backoff.

A scanner that is unplugged, refuses to open or sends garbage must never take the
daemon down, and must come back by itself when it can. The supervisor owns the thread,
catches whatever the driver raises, records it in the driver's state for
`redeemd status`, waits (runtime.backoff: exponential with full jitter, so a fleet of
boxes on one flaky hub does not retry in lockstep) and runs the driver again. The thread
is a runtime.threads.OwnedThread: stopping closes the driver and joins it, bounded.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Protocol

from cards.scan import Scan
from runtime.backoff import Backoff
from runtime.threads import OwnedThread

log = logging.getLogger("redeemd.drivers")


class DriverError(RuntimeError):
    """A scanner cannot be used right now; the message tells the technician why and what to do.

    Shown as state `error`: something on the box needs fixing (permissions, a port held
    by another program, a missing ffmpeg), though the driver keeps retrying.
    """


class DeviceGone(DriverError):
    """The scanner is not there: unplugged, or not plugged in yet. State `disconnected`:
    the normal life of a USB device, which comes back by itself when it is plugged in."""


# How often a driver whose device is not there is run again (see Supervisor._loop).
GONE_RETRY = 1.0

# OSErrors that mean the device went away, not that something is wrong with the box.
_GONE_ERRNOS = frozenset((errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EIO))


class Status(StrEnum):
    """Where a scanner is, as `redeemd status` and status.json name it (the words are
    the contract, so a StrEnum: it compares and serialises as its word)."""

    STARTING = "starting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    """Not there: unplugged, or not plugged in yet; looked for again every second."""
    ERROR = "error"
    """Something on the box needs fixing; retried with backoff."""
    ENDED = "ended"
    """Its input closed (stdin at end of file); not run again."""
    STOPPED = "stopped"


@dataclass
class DriverState:
    """Live state of one scanner, shown by `redeemd status`. Written by its thread only."""

    name: str
    kind: str
    state: Status = Status.STARTING
    message: str = ""
    last_scan: float | None = None
    scans: int = 0
    restarts: int = 0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class Driver(Protocol):
    """What every scanner driver provides. One object per configured scanner."""

    name: str
    kind: str

    def run(self, emit: Callable[[Scan], None], stop: threading.Event, state: DriverState) -> None:
        """Read scans until `stop` is set (return) or the source ends for good (return).

        Raise DriverError or OSError when the device is lost or cannot be opened; the
        supervisor reports it and calls run() again after a backoff. Set
        `state.state = Status.CONNECTED` once the device is open.
        """
        ...

    def feedback(self, accepted: bool) -> None:
        """Tell the scanner the verdict (beep/LED) if it supports host commands."""
        ...

    def close(self) -> None:
        """Called from another thread on shutdown: make run() return soon."""
        ...


class Unavailable:
    """Stands in for a scanner whose driver cannot even be built on this box (its Python
    package missing, no keyboard layouts): it shows as `error` with the reason in
    `redeemd status` and the journal (once), and the daemon and the other scanners run
    on. Installing what is missing and restarting redeemd brings the scanner up."""

    def __init__(self, name: str, kind: str, reason: str):
        self.name, self.kind, self.reason = name, kind, reason

    def run(self, emit: Callable[[Scan], None], stop: threading.Event, state: DriverState) -> None:
        raise DriverError(self.reason)

    def feedback(self, accepted: bool) -> None:
        pass

    def close(self) -> None:
        pass


class Supervisor:
    """Runs one driver in its own owned thread `scanner-NAME`, again after every failure.

    `on_end` runs on that thread when it is about to end (stopped, or the source ended
    for good): the service uses it to notice an ended source without polling."""

    def __init__(
        self,
        driver: Driver,
        emit: Callable[[Scan], None],
        *,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        gone_retry: float = GONE_RETRY,
        on_end: Callable[[], None] | None = None,
    ):
        self.driver = driver
        self.state = DriverState(driver.name, driver.kind)
        self._last_failure: tuple[Status, str] | None = None
        self._emit = emit
        self._stop = threading.Event()
        self._backoff = Backoff(initial_backoff, max_backoff)
        self._gone_retry = gone_retry
        self._on_end = on_end
        self.thread = OwnedThread(
            f"scanner-{driver.name}", self._run, wake=self._close, stopping=self._stop
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Ask the driver to stop (close() unblocks its read) and wait at most `timeout`
        seconds for its thread; True if it has ended."""
        return self.thread.stop(timeout)

    def _close(self) -> None:
        try:
            self.driver.close()
        except Exception:  # closing a dead device may fail; the thread still ends
            log.debug("closing scanner %s failed", self.driver.name, exc_info=True)

    @property
    def ended(self) -> bool:
        return self.state.state in (Status.ENDED, Status.STOPPED)

    def _count(self, scan: Scan) -> None:
        self.state.scans += 1
        self.state.last_scan = scan.at or time.time()
        self._emit(scan)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._on_end is not None:
                self._on_end()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            gone = False
            try:
                self.driver.run(self._count, self._stop, self.state)
                if not self._stop.is_set():
                    self.state.state = Status.ENDED
                    log.info("scanner %s: input ended", self.driver.name)
                break
            except (DriverError, OSError) as exc:
                gone = isinstance(exc, DeviceGone) or (
                    not isinstance(exc, DriverError) and exc.errno in _GONE_ERRNOS
                )
                self._report(Status.DISCONNECTED if gone else Status.ERROR, str(exc))
            except Exception as exc:  # a driver bug must not end the daemon
                self.state.state = Status.ERROR
                self.state.message = f"{type(exc).__name__}: {exc}"
                log.exception("scanner %s failed; restarting it", self.driver.name)
            if time.monotonic() - started > 60:
                self._backoff.reset()  # it ran fine for a while: start backing off afresh
            # Looking for a device that is not there costs a stat() or a failed open():
            # look every `gone_retry`, so a replugged scanner is back at once rather than
            # after a backoff grown while it was away.
            if self._stop.wait(self._gone_retry if gone else self._backoff.next()):
                break
            self.state.restarts += 1
        if self._stop.is_set():
            self.state.state = Status.STOPPED
            self.state.message = ""

    def _report(self, state: Status, message: str) -> None:
        """Record a failure; log it only when it is news, so that a scanner left
        unplugged does not write the same line to the journal at every retry. News: not
        the failure reported last time, or the driver connected in between (a driver
        may change its state and message while it tries, so they are no record)."""
        news = self.state.state is Status.CONNECTED or (state, message) != self._last_failure
        self._last_failure = (state, message)
        self.state.state, self.state.message = state, message
        level = logging.WARNING if news else logging.DEBUG
        log.log(level, "scanner %s: %s; retrying", self.driver.name, message)
