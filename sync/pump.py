"""The outbox pump: ledger records from SQLite to the events topic, in box-sequence order.

paho keeps unacknowledged publishes in memory only, so the pump never hands it more
than a bounded window: at most `max_inflight` events messages the broker has not
PUBACKed yet, each with up to `max_records` records (several per message when there is
a backlog). A PUBACK only frees a window slot; records stay in the outbox until the
backend's application ack (sync/acks.py). A PUBACK with a failure reason code (an ACL
refusal is 0x87 Not authorized) is reported and the records are sent again later.

After every (re)connect the pump starts again from the oldest waiting record, and it
rewinds when the oldest record has waited `retry` seconds without an ack (a lost ack, a
collector that was down): the backend stores by record id, so sending twice is harmless,
losing is not.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from storage import outbox

log = logging.getLogger("redeemd.sync")


@dataclass(frozen=True)
class InFlight:
    first: int
    last: int
    count: int


class Pump:
    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        box: str,
        topic: str,
        publish: Callable[[str, bytes], tuple[int, int] | None],
        max_inflight: int,
        max_records: int,
        retry: float,
    ):
        self.conn = conn
        self.box = box
        self.topic = topic
        self._publish = publish
        self.max_inflight = max_inflight
        self.max_records = max_records
        self.retry = retry
        self.inflight: dict[tuple[int, int], InFlight] = {}
        self.cursor = 0
        self.sent_upto = 0
        """Highest box sequence this process has handed to the broker (acks are
        clamped to it)."""
        self.publish_error: str | None = None
        self.messages = 0
        self.records = 0
        self._hold_until = 0.0
        self._oldest: tuple[int | None, float] = (None, 0.0)

    def connected(self, now: float) -> None:
        """A new connection: paho's old window is gone with its client; start over."""
        self.inflight.clear()
        self.cursor = 0
        self._hold_until = 0.0
        self._oldest = (None, now)

    def disconnected(self) -> None:
        self.inflight.clear()

    def fill(self, now: float) -> None:
        """Publish waiting records while the window has room."""
        self._rewind_if_stuck(now)
        if now < self._hold_until:
            return
        while len(self.inflight) < self.max_inflight:
            batch = outbox.records(self.conn, self.cursor, self.max_records)
            if not batch:
                return
            payload = json.dumps(
                {"v": 1, "box": self.box, "records": [r.to_json() for r in batch]},
                separators=(",", ":"),
            ).encode()
            token = self._publish(self.topic, payload)
            if token is None:
                return  # not connected: the outbox keeps everything
            first, last = batch[0].seq, batch[-1].seq
            self.inflight[token] = InFlight(first, last, len(batch))
            self.cursor = last
            self.sent_upto = max(self.sent_upto, last)
            self.messages += 1
            self.records += len(batch)

    def published(self, token: tuple[int, int], reason: int, reason_text: str, now: float) -> None:
        sent = self.inflight.pop(token, None)
        if sent is None:
            return  # a status or request message, or one from an earlier connection
        if reason < 0x80:
            if self.publish_error is not None:
                log.info("sync: the broker accepts events again")
            self.publish_error = None
            return
        self.publish_error = (
            f"broker refused events {sent.first}..{sent.last} on {self.topic}: "
            f"{reason_text} (0x{reason:02x}); records stay in the outbox"
        )
        log.warning("sync: %s", self.publish_error)
        # Send them again, in order, after a pause (an ACL fix needs no restart).
        self.cursor = min(self.cursor, sent.first - 1)
        self._hold_until = now + self.retry

    def _rewind_if_stuck(self, now: float) -> None:
        oldest = outbox.first_seq(self.conn)
        seen, since = self._oldest
        if oldest != seen:
            self._oldest = (oldest, now)
            return
        if oldest is not None and oldest <= self.cursor and now - since >= self.retry:
            log.info(
                "sync: record %d not acknowledged after %.0f s; sending again", oldest, self.retry
            )
            self.cursor = oldest - 1
            self._oldest = (oldest, now)
