"""`redeemd-backend collect`: box events into backend.db, acked only after the commit.

Subscribes to `$share/{group}/{p}/+/box/+/events`: with a shared subscription the broker
hands each message to one collector of the group, so several collectors (on one
backend.db) can run side by side. For every message, in this order:

1. refuse it unless its box is registered (`redeemd-backend box add`) for the merchant
   in its topic: the collector stores only what the backend was set up for, whatever
   the broker lets through; then parse and check the records (docs/protocol.md 16.3);
   a bad message is refused whole. A refused message is never acked, so the box keeps
   its records and sends them again once the box is registered;
2. store them in one transaction, idempotent by record id, advancing the box's
   contiguous high-water mark, noting gaps and flagging double redemptions; a
   double redemption also issues a consumed-elsewhere batch in the same commit.
   Messages already waiting when one is taken share its commit (group commit: one
   fsync for up to 64 messages, which is what lets a backlog drain fast);
3. only then ack `{"v":1,"upto":N,"ids":[...]}` on `{p}/{merchant}/box/{box}/ack` (a
   box deletes acked records from its outbox, so an ack before the commit could lose
   them for good);
4. publish the consumed batch and re-sign the manifest so the other boxes learn it.

It also follows every registered box's retained status, `{p}/+/box/+/status`, with a
plain subscription, and keeps the latest per box in the store (backend/box_status.py),
for `redeemd-backend boxes`.

    >>> collector = Collector(Path("keys/"), "mqtt://127.0.0.1:1883", group="acme")
    >>> collector.start()   # a thread; collector.run(stop_event) blocks instead
    >>> collector.stop()
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from backend import publish
from backend.box_status import StatusRecorder
from backend.connection import Connection, Message, default_client_id
from backend.events import Event, EventError, parse_message
from backend.keystore import Keystore, KeystoreError
from backend.store import IssuedBatch, Store, Stored
from backend.store_keeper import StoreKeeper
from cards import batch, keys
from cards.batch import BatchError, Kind
from runtime.threads import OwnedThread
from sync.session import STOP_BOUND

DEFAULT_GROUP = "redeemd-collect"
# How long `stop` waits for the thread: its round ends at once once stopped (a publish
# waiting for a PUBACK gives up), then the broker connection stops (its own bound).
STOP_WAIT = STOP_BOUND + 5.0
CONSUMED_EXPIRES = 30 * 86400
# At most this many waiting events messages are stored in one commit.
GROUP_COMMIT = 64
# A refused box sends its records again every request_retry (30 s by default): say so
# the first time, then at most this often per box, with the count.
REFUSAL_LOG_EVERY = 60.0


def _print(line: str) -> None:
    print(line, flush=True)


class Collector:
    def __init__(
        self,
        directory: Path,
        broker: str,
        *,
        prefix: str = publish.DEFAULT_PREFIX,
        group: str = DEFAULT_GROUP,
        say: Callable[[str], None] = _print,
        client_id: str | None = None,
    ):
        self.dir = directory
        self.prefix = prefix.rstrip("/")
        self.group = group
        self.say = say
        self.keystore = Keystore(directory)
        # Conflicts are answered with a signed batch: without the issuer key and its
        # delegation the collector could only flag them, so refuse to start instead.
        self.keystore.require_signing()
        self.link = Connection(broker, client_id or default_client_id(f"collect-{group}"), say)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._unpublished: list[IssuedBatch] = []
        self._worker = OwnedThread("collect", self.run)
        self._stop = self._worker.stopping
        # Messages refused per "merchant/box" since start (unknown box, wrong merchant,
        # malformed), and when each was last reported.
        self.refused: Counter[str] = Counter()
        self._refusal_said: dict[str, float] = {}
        self.statuses = StatusRecorder(self.prefix, say)

    @property
    def topic(self) -> str:
        return f"$share/{self.group}/{self.prefix}/+/box/+/events"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run in an owned thread `collect` (`run` blocks instead)."""
        self._worker.start()

    def stop(self, timeout: float = STOP_WAIT) -> bool:
        """Stop and join the thread, waiting at most `timeout` seconds; True if it ended.
        A publish waiting for the broker gives up at once (link.cancel), so a hung broker
        does not hold the stop."""
        return self._worker.stop(timeout)

    def run(self, stop: threading.Event | None = None) -> None:
        """Collect until `stop` (or `self.stop()`) is set. Owns the connection and
        does all database work on this thread, never on paho's network thread."""
        stop = stop or self._stop
        self.link.cancel = stop
        keeper = StoreKeeper(self.dir, self.say, stop)
        first = keeper.store()
        if first is None:
            return  # stopped while waiting for the database
        # Consumed batches a previous run committed but could not publish.
        self._unpublished = [b for b in first.unpublished() if b.kind is Kind.CONSUMED]
        self._say_fleet(first)
        self.link.subscribe(self.topic)
        self.link.subscribe(self.statuses.topic)
        self.link.on_message(self._inbox.put)
        self.link.start()
        try:
            while not stop.is_set() and not self._stop.is_set():
                # While the database is lost this waits for it (messages queue up): a
                # reconnect in progress is no reason to take more than one can store.
                store = keeper.store()
                if store is None:
                    break
                try:
                    messages = [self._inbox.get(timeout=0.2)]
                except queue.Empty:
                    messages = []
                # Whatever else is already waiting goes into the same commit.
                while messages and len(messages) < GROUP_COMMIT:
                    try:
                        messages.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                try:
                    if messages:
                        self._handle(store, messages)
                    if self._unpublished and self.link.connected.is_set():
                        self._publish_consumed(store)
                except store.errors as exc:
                    # Said by _handle; nothing of it was acked. Reconnect if it is gone.
                    keeper.check(exc)
                else:
                    keeper.check()  # the status recorder swallows its own database errors
        finally:
            self.link.stop()
            keeper.close()

    def _say_fleet(self, store: Store) -> None:
        # After an upgrade, boxes that sent events before registration existed are refused
        # until registered: say so at start, not only one refusal at a time.
        if not store.fleet():
            self.say(
                f"no boxes registered in {Store.describe(self.dir)}: every events message is "
                f"refused until you run redeemd-backend box add --dir {self.dir} --merchant M BOX"
            )
        unregistered = store.seen_unregistered()
        if unregistered:
            names = ", ".join(f"{m}/{b}" for m, b in unregistered[:10])
            more = f" and {len(unregistered) - 10} more" if len(unregistered) > 10 else ""
            self.say(
                f"{len(unregistered)} box(es) sent events before but are not registered for "
                f"that merchant: {names}{more}; their new events are refused until "
                "`redeemd-backend box add` (redeemd-backend box list shows them)"
            )

    # ------------------------------------------------------------ one message

    def _handle(self, store: Store, messages: list[Message]) -> None:
        parsed: list[tuple[str, str, list[Event]]] = []
        for message in messages:
            if self.statuses.is_status(message.topic):
                self.statuses.record(store, message)
                continue
            parts = message.topic[len(self.prefix) + 1 :].split("/")
            if len(parts) != 4 or parts[1] != "box" or parts[3] != "events":
                continue
            merchant, box = parts[0], parts[2]
            registered = store.merchant_of(box)
            if registered != merchant:
                self._refuse_unknown(merchant, box, registered)
                continue
            try:
                events = parse_message(message.payload, merchant=merchant, box=box)
            except EventError as exc:
                self.refused[f"{merchant}/{box}"] += 1
                self.say(f"refused events from {merchant}/{box}: {exc}")
                continue
            if events:
                parsed.append((merchant, box, events))
        if not parsed:
            return
        refusals: tuple[type[Exception], ...] = (
            *store.errors,
            KeystoreError,
            keys.TrustError,
            BatchError,
        )
        try:
            results = store.store_messages(parsed, self._sign_consumed)
        except refusals as exc:
            # Rolled back and not acked: the boxes keep the records and send them again.
            boxes = ", ".join(sorted({f"{m}/{b}" for m, b, _ in parsed}))
            self.say(f"could not store events from {boxes}: {exc}; not acked")
            if isinstance(exc, store.errors):
                raise  # the run loop reconnects if the database is gone
            return
        # Committed: now, and only now, the boxes may forget these records.
        for (merchant, box, events), stored in zip(parsed, results, strict=True):
            ack = {"v": 1, "upto": stored.upto, "ids": list(stored.ids)}
            self.link.send(f"{self.prefix}/{merchant}/box/{box}/ack", json.dumps(ack).encode())
            self._report(stored, events[0].seq, events[-1].seq)
            if stored.consumed is not None:
                self._unpublished.append(stored.consumed)
        if self._unpublished and self.link.connected.is_set():
            self._publish_consumed(store)

    def _refuse_unknown(self, merchant: str, box: str, registered: str | None) -> None:
        where = f"{merchant}/{box}"
        self.refused[where] += 1
        now = time.monotonic()
        said = self._refusal_said.get(where)
        if said is not None and now - said < REFUSAL_LOG_EVERY:
            return
        self._refusal_said[where] = now
        count = self.refused[where]
        if registered is None:
            why = (
                f"box {box} is not registered; if it is yours: redeemd-backend box add "
                f"--dir {self.dir} --merchant {merchant} {box}, then write the broker ACL "
                "again (box acl)"
            )
        else:
            why = (
                f"box {box} is registered for merchant {registered}, not {merchant}: the "
                "broker let it write another merchant's topic; write the broker ACL again "
                "(redeemd-backend box acl) and reload the broker"
            )
        self.say(
            f"REFUSED events from {where}: {why}; nothing stored or acked, the box keeps "
            f"its records ({count} message(s) refused from {where} so far)"
        )

    def _report(self, stored: Stored, first: int, last: int) -> None:
        where = f"{stored.merchant}/{stored.box}"
        extra = f" and {len(stored.ids)} ids above it" if stored.ids else ""
        self.say(
            f"stored {where} {first}..{last}: {stored.new} new, {stored.duplicates} duplicate; "
            f"acked upto {stored.upto}{extra}"
        )
        for gap in stored.gaps:
            self.say(f"gap {where}: missing {gap.first}..{gap.last}")
        for gap in stored.filled:
            self.say(f"gap filled {where}: {gap.first}..{gap.last}")
        for c in stored.conflicts:
            self.say(
                f"CONFLICT {c.merchant}: code {c.digest} redeemed on {c.first_box} ({c.first_id}) "
                f"and on {c.second_box} ({c.second_id})"
            )
        if stored.consumed is not None:
            b = stored.consumed
            self.say(f"issued consumed batch {b.merchant}/{b.seq}: {b.count} entries")

    def _sign_consumed(self, merchant: str, seq: int, entries: bytes) -> bytes:
        now = int(time.time())
        return batch.build(
            self.keystore.private("issuer"),
            self.keystore.delegation(),
            merchant=merchant,
            seq=seq,
            kind=Kind.CONSUMED,
            entries=entries,
            created_at=now,
            expires_at=now + CONSUMED_EXPIRES,
        )

    def _publish_consumed(self, store: Store) -> None:
        while self._unpublished:
            issued = self._unpublished[0]
            topic = f"{self.prefix}/{issued.merchant}/batches/{issued.seq}"
            if not all(self.link.publish(topic, chunk) for chunk in issued.chunks()):
                return  # retried when connected again; a running publisher may do it first
            store.mark_published(issued.merchant, issued.seq)
            self._unpublished.pop(0)
            self.say(
                f"published consumed batch {issued.merchant}/{issued.seq} "
                f"({len(issued.chunks())} chunks)"
            )
            latest = store.latest_seq(issued.merchant)
            data = publish.sign_manifest(self.keystore, issued.merchant, latest)
            if self.link.publish(f"{self.prefix}/{issued.merchant}/manifest", data, retain=True):
                self.say(f"manifest {issued.merchant}: latest_seq {latest}")
