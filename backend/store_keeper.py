"""The store a long-running backend process works on, opened again when the database is lost.

Two ways to wait for it: `StoreKeeper` blocks (with backoff) until the database answers,
which suits a loop such as the collector or the publisher; `StoreOnDemand` never blocks,
which suits a page: a request while the database is away is answered 503 at once, and one
request every RETRY_ON_DEMAND seconds tries to reconnect (the claim service, the console).

A collector or publisher outlives its database connection: PostgreSQL restarts, fails
over, or drops idle connections. A statement on a lost connection raises, and nothing
was committed, so nothing was acked: the boxes still hold their records and send them
again. What the process must do is get a new connection, without a busy loop and
without a line per attempt, and say when the database is back. A SQLite file is never
lost this way (`Store.broken` stays False), so on the embedded default this only ever
opens the store once.

    >>> keeper = StoreKeeper(Path("keys/"), say=print, stop=stop_event)
    >>> store = keeper.store()        # waits for the database; None once `stop` is set
    >>> ...                           # a round of work; on a database error:
    >>> keeper.check(exc)             # drops the store if its connection is gone
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backend.engines import EngineError, check_url
from backend.store import DATABASE_ENV, Store, StoreError
from runtime.backoff import Backoff

# Reconnect attempts: soon after the loss, then at most this often.
FIRST_RETRY = 0.5
RETRY_CAP = 15.0
# A database that stays away is said again this often, so the journal shows it is still
# being retried.
SAY_EVERY = 60.0
# While the database is unreachable, a request tries to reconnect at most this often;
# the others get their 503 at once.
RETRY_ON_DEMAND = 2.0


class StoreKeeper:
    def __init__(
        self,
        directory: Path,
        say: Callable[[str], None],
        stop: threading.Event,
        database: str | None = None,
    ):
        self.dir = directory
        self.say = say
        self.stop = stop
        self.database = database or os.environ.get(DATABASE_ENV) or None
        self._store: Store | None = None
        self._lost_at: float | None = None
        self._said_at: float | None = None
        self._backoff = Backoff(FIRST_RETRY, RETRY_CAP)

    @property
    def where(self) -> str:
        """The database, as a person reads it (never with its password)."""
        return Store.describe(self.dir, self.database)

    def store(self) -> Store | None:
        """The open store, connecting (with backoff) while the database cannot be
        reached, at start as after a loss: a collector started with its database, or
        before it at boot, waits for it. None once `stop` is set. A URL no retry can
        fix (an unknown kind, a missing driver) raises StoreError at once."""
        if self._store is None and self.database is not None:
            try:
                check_url(self.database)
            except EngineError as exc:
                raise StoreError(str(exc)) from None
        while self._store is None:
            if self.stop.is_set():
                return None
            try:
                self._store = Store.open(self.dir, self.database)
            except Exception as exc:  # StoreError, or the driver's own on a half-up server
                now = time.monotonic()
                if self._said_at is None or now - self._said_at >= SAY_EVERY:
                    self._said_at = now
                    self.say(
                        f"database {self.where} unreachable: {exc}; retrying, nothing is "
                        "stored or acked until it answers"
                    )
                if self._lost_at is None:
                    self._lost_at = now
                self.stop.wait(self._backoff.next())
                continue
            self._backoff.reset()
            if self._lost_at is not None:
                away = time.monotonic() - self._lost_at
                self.say(f"database {self.where} is reachable again after {away:.0f} s")
                self._lost_at = None
                self._said_at = None
        return self._store

    def check(self, exc: BaseException | None = None) -> None:
        """After a round of work (that raised `exc`, if given): drop the store if its
        connection is gone, so the next `store()` reconnects. Other errors (a full
        disk, a lock timeout) keep it: the next round tries again on the same
        connection."""
        store = self._store
        if store is None or not store.broken:
            return
        self._store = None
        self._lost_at = self._said_at = time.monotonic()  # the loss is said below
        with contextlib.suppress(Exception):  # a lost connection may fail to close
            store.close()
        why = f": {exc}" if exc is not None else ""
        self.say(
            f"lost the database {self.where}{why}; reconnecting. Nothing is acked until "
            "it is back: the boxes keep their records and send them again"
        )

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


class StoreOnDemand:
    """The store of a process that answers requests: opened on demand and dropped when
    its connection is lost, so a request never waits for a database that is away. Its
    losses and returns are said once each, not once per request."""

    def __init__(self, directory: Path, database: str | None, say: Callable[[str], None]):
        self.dir = directory
        self.database = database
        self.say = say
        self._store: Store | None = None
        self._retry_at = 0.0
        self._lost = False

    @property
    def where(self) -> str:
        """The database, as a person reads it (never with its password)."""
        return Store.describe(self.dir, self.database)

    def store(self) -> Store | None:
        """The open store, or None while the database cannot be reached."""
        if self._store is not None:
            return self._store
        if time.monotonic() < self._retry_at:
            return None
        try:
            self._store = Store.open(self.dir, self.database)
        except Exception as exc:  # StoreError, or the driver's own on a half-up server
            self._retry_at = time.monotonic() + RETRY_ON_DEMAND
            if not self._lost:
                self._lost = True
                self.say(
                    f"database {self.where} unreachable: {exc}; answering 503 until it is back"
                )
            return None
        if self._lost:
            self._lost = False
            self.say(f"database {self.where} is reachable again")
        return self._store

    def failed(self, exc: BaseException) -> None:
        """After a statement failed (and its request was answered 503): drop the store if
        its connection is gone, so a later request reconnects."""
        store = self._store
        self.say(f"database error: {exc}; answered 503")
        if store is not None and store.broken:
            self._store = None
            self._lost = True
            with contextlib.suppress(Exception):  # a lost connection may fail to close
                store.close()
            self.say(f"lost the database {self.where}; reconnecting on a later request")

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
