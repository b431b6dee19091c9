"""The sync thread: one owner for the session, the pump, the intakes and the status.

The service starts it after the engine and stops it on shutdown within a bounded time.
paho's network thread only hands events over through a queue; everything that touches
SQLite happens here, on this thread's own connection, so the scan path never waits for
the network and the engine stays the only writer of scans (it notices applied batches
through PRAGMA data_version, and a new grant set by its seq).

    >>> sync = Sync(config.sync, box="box-1", merchant="demo", database=path,
    ...             roots=config.trust.root_keys, max_batch_bytes=512 << 20,
    ...             box_key=key.public)     # grant sets must name it; the status shows it
    >>> sync.start()
    >>> sync.state().connected
    True
    >>> sync.stop()      # publishes "offline", disconnects cleanly, joins both threads
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from runtime.threads import OwnedThread
from storage import outbox
from storage.database import connect
from sync import acks, status
from sync.grants import GrantIntake
from sync.intake import Intake
from sync.pump import Pump
from sync.session import Down, Event, LinkSettings, Message, Published, Session, Up
from sync.topics import Topics

log = logging.getLogger("redeemd.sync")

TICK = 1.0
"""The longest the sync thread sleeps with nothing to do. What it must do at once comes
as an event: the network's (a connection, an ack, a PUBACK, a batch) and the engine's
`wake()` after a record is committed; its timers (resends, the status) are seconds
apart. A 0.2 s poll of the outbox cost a fleet of 1000 simulated boxes both cores
while idle (docs/decisions.md, "Found at 1000 boxes")."""
MAX_QUEUED_MESSAGES = 1000


class Wake:
    """Something to do: a record was committed (`Sync.wake`), or the thread must stop."""


WAKE = Wake()


class SyncSettings(LinkSettings, Protocol):
    @property
    def topic_prefix(self) -> str: ...
    @property
    def max_records(self) -> int: ...
    @property
    def status_every(self) -> float: ...
    @property
    def request_retry(self) -> float: ...


@dataclass(frozen=True)
class SyncState:
    """What sync is doing, for status.json, `redeemd status` and systemd's STATUS line.
    Replaced whole by the sync thread, so any thread may read the one it holds."""

    enabled: bool = True
    connected: bool = False
    broker: str | None = None
    last_error: str | None = None
    publish_error: str | None = None
    outbox_depth: int | None = None
    in_flight: int | None = None
    sent_upto: int | None = None
    events_messages: int | None = None
    cache_seq: int | None = None
    manifest_seq: int | None = None
    requested: tuple[int, int] | None = None
    """The batches asked for and not yet all here (first, last)."""
    batches_applied: int | None = None
    last_applied: str | None = None
    refused: int | None = None
    last_refused: str | None = None
    alarm: str | None = None
    stuck: str | None = None
    manifests_ignored: int | None = None
    dropped: int | None = None
    grant_seq: int | None = None
    """The dispensing grant set held (protocol.md 18); None while none is."""
    grants_refused: int | None = None
    last_grants_refused: str | None = None
    """Why the newest grant set that arrived was refused; None once one is installed."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class Sync:
    def __init__(
        self,
        settings: SyncSettings,
        *,
        box: str,
        merchant: str,
        database: Path,
        roots: dict[str, bytes],
        max_batch_bytes: int,
        drivers: Callable[[], list[dict[str, object]]] = list,
        box_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """`box_key`: the box's own Ed25519 public key (32 bytes), which grant sets
        must name and the status shows; None: grant sets are refused."""
        self.settings = settings
        self.box = box
        self.merchant = merchant
        self.database = database
        self.roots = roots
        self.max_batch_bytes = max_batch_bytes
        self.drivers = drivers
        self.box_key = box_key
        self.clock = clock
        self.topics = Topics(settings.topic_prefix, merchant, box)
        self.events: queue.Queue[Event | Wake] = queue.Queue()
        self.session = Session(
            settings,
            box,
            will=(self.topics.status, status.will_payload(box)),
            subscriptions=self.topics.subscriptions(),
            events=self._enqueue,
        )
        self.thread = OwnedThread("sync", self._run, wake=self.wake)
        self._stop = self.thread.stopping
        self.pump: Pump | None = None
        self.intake: Intake | None = None
        self.grants: GrantIntake | None = None
        self.error: str | None = None
        self.dropped = 0
        self._state = SyncState()

    # ------------------------------------------------------------------ owner API

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Publish "offline", disconnect and wait at most `timeout` seconds for the
        threads; True if all ended. The sync thread notices the stop at once (woken),
        waits at most 2 s for the offline status and 2 s for the network thread."""
        return self.thread.stop(timeout) and not self.session.thread.is_alive()

    def wake(self) -> None:
        """A record was committed: send it now rather than at the next TICK. Cheap and
        safe from any thread; wakes that pile up while the thread works cost nothing."""
        self.events.put(WAKE)

    def state(self) -> SyncState:
        """For status.json and `redeemd status` (immutable, safe from any thread)."""
        return self._state

    def update_trust(self, roots: dict[str, bytes], max_batch_bytes: int) -> None:
        """New root keys after a reload, without dropping the broker session. The
        intake reads them per message; replacing the attribute is atomic."""
        self.roots = roots
        self.max_batch_bytes = max_batch_bytes
        intake = self.intake
        if intake is not None:
            intake.roots = roots
            intake.max_batch_bytes = max_batch_bytes
        grants = self.grants
        if grants is not None:
            grants.update_trust(roots, self.box_key)

    def update_box_key(self, box_key: bytes | None) -> None:
        """The box's key after it was made again (a reload): grant sets are checked
        against it and the status shows it from the next message on."""
        self.box_key = box_key
        grants = self.grants
        if grants is not None:
            grants.update_trust(self.roots, box_key)

    # ------------------------------------------------------------------ network thread side

    def _enqueue(self, event: Event) -> None:
        # A flood of downstream messages must not grow memory without bound; what is
        # dropped here is requested again (batches) or sent again (acks are repeated
        # for duplicates). Control events are never dropped.
        if isinstance(event, Message) and self.events.qsize() >= MAX_QUEUED_MESSAGES:
            self.dropped += 1
            return
        self.events.put(event)

    # ------------------------------------------------------------------ sync thread

    def _run(self) -> None:
        try:
            conn = connect(self.database)
        except Exception as exc:
            self.error = f"cannot open the database for sync: {exc}"
            log.error("sync: %s", self.error)
            self._state = SyncState(last_error=self.error)
            return
        try:
            self._serve(conn)
        finally:
            self._shutdown(conn)
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        s = self.settings
        self.pump = Pump(
            conn,
            box=self.box,
            topic=self.topics.events,
            publish=self._publish,
            max_inflight=s.max_inflight,
            max_records=s.max_records,
            retry=s.request_retry,
        )
        self.intake = Intake(
            conn,
            merchant=self.merchant,
            roots=self.roots,
            max_batch_bytes=self.max_batch_bytes,
            request_topic=self.topics.request,
            publish=self._publish,
            retry=s.request_retry,
            clock=self.clock,
        )
        self.grants = GrantIntake(
            conn, merchant=self.merchant, box=self.box, roots=self.roots, box_key=self.box_key
        )
        self.session.start()
        next_status = float("inf")
        while not self._stop.is_set():
            try:
                event: Event | Wake | None = self.events.get(timeout=TICK)
            except queue.Empty:
                event = None
            now = self.clock()
            applied = self.intake.applied, self.grants.installed
            try:
                while event is not None:
                    if isinstance(event, Up):
                        self.pump.connected(now)
                        self.intake.reconnected()
                        next_status = now  # tell the world at once
                    self._handle(conn, event, now)
                    try:
                        event = self.events.get_nowait()
                    except queue.Empty:
                        event = None
                self.grants.tick()
                if (self.intake.applied, self.grants.installed) != applied:
                    # The status is the box's acknowledgement of a batch: its cache_seq
                    # rises only once the batch is committed. Tell the backend now; the
                    # same for a new grant set (its grant_seq, a revocation taking effect).
                    next_status = now
                if self.session.connected:
                    self.intake.tick()
                    self.pump.fill(now)
                    if now >= next_status:
                        self._publish_status(conn, "online", now)
                        next_status = now + s.status_every
                self.error = None
            except sqlite3.Error as exc:
                # Disk full, locked too long: report, keep the link, try again next tick.
                self.error = f"database error in sync: {exc}"
                log.warning("sync: %s", self.error)
                self._stop.wait(1.0)
            except Exception as exc:  # a sync bug must never take the daemon down
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("sync: unexpected error; continuing")
                self._stop.wait(1.0)
            self._update_state(conn, now)

    def _handle(self, conn: sqlite3.Connection, event: Event | Wake, now: float) -> None:
        assert self.pump is not None and self.intake is not None
        if isinstance(event, Down):
            self.pump.disconnected()
        elif isinstance(event, Published):
            self.pump.published((event.generation, event.mid), event.reason, event.reason_text, now)
        elif isinstance(event, Message):
            self._on_message(conn, event)

    def _on_message(self, conn: sqlite3.Connection, message: Message) -> None:
        assert self.pump is not None and self.intake is not None and self.grants is not None
        topic = message.topic
        if topic == self.topics.ack:
            try:
                ack = acks.parse(message.payload)
            except acks.AckError as exc:
                self.intake.refuse(topic, str(exc))
                return
            removed = acks.apply(conn, ack, self.pump.sent_upto)
            if removed:
                log.debug("sync: backend acknowledged %d record(s)", removed)
        elif topic == self.topics.manifest:
            self.intake.on_manifest(topic, message.payload)
        elif topic == self.topics.grants:
            self.grants.on_grants(topic, message.payload)
        else:
            seq = self.topics.batch_seq(topic)
            if seq is None:
                self.intake.refuse(topic, "not a topic redeemd subscribes to")
            else:
                self.intake.on_chunk(topic, seq, message.payload)

    def _publish(self, topic: str, payload: bytes) -> tuple[int, int] | None:
        return self.session.publish(topic, payload)

    def _status_payload(self, conn: sqlite3.Connection, state: str, now: float) -> bytes:
        assert self.pump is not None and self.intake is not None and self.grants is not None
        oldest = outbox.oldest_ms(conn)
        at, cache_age = status.clock(conn, self.merchant, now)  # floored (section 12)
        return status.status_payload(
            box=self.box,
            state=state,
            at=at,
            cache_seq=self.intake.last_seq,
            cache_age_s=cache_age,
            outbox_depth=outbox.depth(conn),
            outbox_oldest_age_s=None if oldest is None else int(at - oldest / 1000),
            publish_error=self.pump.publish_error,
            drivers=self.drivers(),
            alarm=self.intake.alarm,
            stuck=self.intake.stuck,
            manifests_ignored=self.intake.manifests_ignored,
            box_key=status.box_key_status(self.box_key),
            dispensing=self.grants.status(),
        )

    def _publish_status(self, conn: sqlite3.Connection, state: str, now: float) -> None:
        self.session.publish(
            self.topics.status, self._status_payload(conn, state, now), retain=True
        )

    def _update_state(self, conn: sqlite3.Connection, now: float) -> None:
        assert self.pump is not None and self.intake is not None and self.grants is not None
        try:
            depth = outbox.depth(conn)
        except sqlite3.Error:
            depth = None
        intake, pump, grants = self.intake, self.pump, self.grants
        try:
            grant_seq = grants.held_seq
        except sqlite3.Error:
            grant_seq = None
        self._state = SyncState(
            broker=self.settings.broker,
            connected=self.session.connected,
            last_error=self.error or self.session.last_error,
            publish_error=pump.publish_error,
            outbox_depth=depth,
            in_flight=len(pump.inflight),
            sent_upto=pump.sent_upto,
            events_messages=pump.messages,
            cache_seq=intake.last_seq,
            manifest_seq=intake.manifest.latest_seq if intake.manifest else None,
            requested=intake.requested,
            batches_applied=intake.applied,
            last_applied=intake.last_applied,
            refused=intake.refused,
            last_refused=intake.last_refused,
            alarm=intake.alarm,
            stuck=intake.stuck,
            manifests_ignored=intake.manifests_ignored,
            dropped=self.dropped,
            grant_seq=grant_seq,
            grants_refused=grants.refused,
            last_grants_refused=grants.last_refused,
        )

    def _shutdown(self, conn: sqlite3.Connection) -> None:
        if self.pump is not None and self.session.connected:
            try:
                payload = self._status_payload(conn, "offline", self.clock())
                self.session.wait_published(self.topics.status, payload, 2.0, retain=True)
            except Exception:
                log.debug("sync: could not publish the offline status", exc_info=True)
        self.session.stop(timeout=2.0)  # one still connecting is logged by its thread name
        self._state = replace(self._state, connected=False)
