"""How long to wait before trying again: exponential backoff with full jitter.

A scanner that fails to open and a broker that cannot be reached are retried by the
same rule: wait a random time between 0 and a cap that doubles with every failure up to
a maximum, and start again from the first cap once things worked for a while. The
randomness keeps a fleet of boxes behind one flaky hub or uplink from retrying in
lockstep ("full jitter", AWS Architecture Blog, 2015).

Why not `backoff` or `tenacity`: both wrap a call that is retried until it succeeds.
Our loops supervise something long-lived (a driver's read loop, a broker connection),
wait on a stop event so shutdown is not held up by a sleep, and reset after a good run;
expressed as a retried call they would need a custom wait, a custom sleep and a new
retrier per reset, for a rule that is three lines here (docs/decisions.md).

    >>> delays = Backoff(first=0.5, cap=30.0)
    >>> stop.wait(delays.next())   # 0..0.5 s, then 0..1 s, 0..2 s ... 0..30 s
    >>> delays.reset()             # it worked: the next failure waits 0..0.5 s again
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        first: float,
        cap: float,
        *,
        uniform: Callable[[float, float], float] | None = None,
    ):
        """`uniform(low, high)` draws the wait (tests pass one that records the bounds);
        by default `random.uniform`."""
        if first <= 0 or cap < first:
            raise ValueError(f"backoff needs 0 < first <= cap, got first={first} cap={cap}")
        self.first = first
        self.cap = cap
        self._uniform = uniform
        self._ceiling = first

    @property
    def ceiling(self) -> float:
        """The most the next wait can be."""
        return self._ceiling

    def next(self) -> float:
        """The wait before the next attempt; each call doubles the ceiling (up to `cap`)."""
        delay = (self._uniform or random.uniform)(0.0, self._ceiling)
        self._ceiling = min(self._ceiling * 2, self.cap)
        return delay

    def reset(self) -> None:
        """It worked: the next failure is retried soon again."""
        self._ceiling = self.first
