"""A thread the process owns: named, started once, stopped and joined within a bound.

Every long-running part of redeemd runs in one (a scanner's supervisor, the sync worker
and its network thread, the local API, the verdict hook, the backend's publisher and
collector and their broker connections). None is a daemon thread: the interpreter kills
a daemon thread wherever it is at exit (inside a write, holding a lock), and a thread
nobody joins hides a stop that does not work. So each owner says how to wake its thread
(close the device, put a sentinel in its queue, disconnect): `stop` sets `stopping`,
calls that, and waits at most `timeout` seconds. A thread still running after that is
logged by name, so the journal says which part hung, and `stop` returns False.

    >>> worker = OwnedThread("sync", run, wake=inbox.close)
    >>> worker.start()
    >>> worker.stop(timeout=2.0)   # sets worker.stopping, wakes, joins; False if it hung
    True
    >>> stop_all([a, b], timeout=2.0)   # both asked first, joined against one deadline
    True
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("redeemd")


class OwnedThread:
    def __init__(
        self,
        name: str,
        run: Callable[[], None],
        *,
        wake: Callable[[], None] | None = None,
        stopping: threading.Event | None = None,
    ):
        """`run` is the thread's body: it returns once `stopping` is set (or its work is
        done). `wake` makes a blocked `run` notice the stop; `stopping` may be an event
        the owner already hands to others (a driver's stop event)."""
        self.name = name
        self.stopping = stopping if stopping is not None else threading.Event()
        self._run = run
        self._wake = wake
        self._thread = threading.Thread(target=self._main, name=name)

    def start(self) -> None:
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float) -> bool:
        """Ask the thread to stop, wake it and wait at most `timeout` seconds; True if it
        has ended (or never started)."""
        self.ask_stop()
        return self.join(timeout)

    def ask_stop(self) -> None:
        """Set `stopping` and wake the thread, without waiting for it."""
        self.stopping.set()
        if self._wake is not None:
            try:
                self._wake()
            except Exception:  # waking a dead device may fail; the stop event still holds
                log.debug("waking thread %s failed", self.name, exc_info=True)

    def join(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds for the thread to end; True if it has."""
        if not self.started:
            return True
        if self._thread is threading.current_thread():
            return False  # asked from inside itself: it ends when its body returns
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "thread %s did not stop within %g s; it is left running until it returns",
                self.name,
                timeout,
            )
            return False
        return True

    def _main(self) -> None:
        try:
            self._run()
        except Exception:  # the owner sees the thread gone; the journal says why
            log.exception("thread %s failed", self.name)


def stop_all(threads: Iterable[OwnedThread], timeout: float) -> bool:
    """Ask every thread to stop first, then join them against one deadline: stopping
    several takes the longest single wait, not the sum. True if all have ended."""
    threads = list(threads)
    for thread in threads:
        thread.ask_stop()
    deadline = time.monotonic() + timeout
    ended = [thread.join(max(0.0, deadline - time.monotonic())) for thread in threads]
    return all(ended)
