"""One read, one scan: the same code from the same scanner inside the debounce window
is the read already decided, not a new scan.

A scanner held over a code reads it many times a second; a cashier's double scan is
one purchase. A repeat is answered as the read it repeats was answered (not as the
last read, which may be another code), because a scanner in host-ACK mode waits for
an answer to every read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Repeat:
    """A debounced repeat of a read already decided: nothing is recorded again."""

    accepted: bool
    """How the read it repeats was answered."""
    age: float
    """Seconds since that code's previous read from this scanner."""


class Debounce:
    """The reads of the last `window` seconds, by (source, code key).

    `clock` is monotonic seconds; tests pass their own to move time by hand.
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        # (source, key) -> [time of its last read, whether that read was accepted (None
        # until decided)], oldest read first: a read moves its key to the end.
        self._recent: OrderedDict[tuple[str, bytes], list] = OrderedDict()
        # The entry of the last new read, until `decided` answers it: the scan path
        # need not build and hash its key a second time after the COMMIT.
        self._undecided: list | None = None

    def read(self, source: str, key: bytes) -> Repeat | None:
        """A Repeat if this read repeats one decided inside the window, else None: a
        new read, to be decided and then reported with `decided`. A read left
        undecided (nothing recorded) has no repeats: the next one is tried afresh."""
        now = self.clock()
        window = self.window
        recent = self._recent
        # Expiry stops at the first live entry: amortised O(1) per scan even when a
        # burst fills the whole window.
        while recent:
            oldest, entry = next(iter(recent.items()))
            if now - entry[0] < window:
                break
            del recent[oldest]
        last = recent.pop((source, key), None)
        if last is not None and last[1] is not None and now - last[0] < window:
            age = now - last[0]
            last[0] = now
            recent[(source, key)] = last
            self._undecided = None
            return Repeat(last[1], age)
        self._undecided = recent[(source, key)] = [now, None]
        return None

    def decided(self, accepted: bool) -> None:
        """The new read just taken by `read` was answered: its repeats get the same
        answer. (If it has left the window meanwhile, setting it changes nothing.)"""
        entry = self._undecided
        if entry is not None:
            entry[1] = accepted
            self._undecided = None
