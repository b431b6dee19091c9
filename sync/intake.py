"""Batch intake, pull-style: manifest -> request what is missing -> chunks -> apply.

Mosquitto drops messages queued for an offline client past `max_queued_messages`, so
the box does not rely on being sent everything: the backend keeps a retained, signed
manifest of its latest sequence, and the box asks for the range it lacks on its
`request` topic, again with backoff until the batches arrive (docs/protocol.md 16.1,
16.2). Chunks are verified against their signed header on arrival (cards.batch), a
complete batch is applied with storage.batch_import on this thread's own SQLite
connection (the engine notices through PRAGMA data_version), in sequence order: a batch
that arrives before its predecessors waits, within bounds on how far ahead and how many
bytes. Anything forged, replayed, truncated, oversized or malformed is refused and
reported; nothing from it is written.

Three things a person looking at a box must be able to see (protocol.md 16.5): a
different batch with an applied sequence raises the key-compromise `alarm` as `redeemd
import` does; a box that cannot move on because the batch it needs is refused says why
in `stuck` and asks again ever more slowly (up to an hour apart at the default retry)
instead of looping with the backend; manifests ignored for being older than the one
kept are counted.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable

from cards.batch import CHUNK_MAGIC, Batch, BatchError, ChunkAssembler, Kind, VerifiedHeaders
from cards.manifest import Manifest, ManifestError, open_manifest
from storage import batch_import, trust
from storage.batch_import import MAX_CLOCK_AHEAD, BatchConflict, ImportRefused, SequenceGap

log = logging.getLogger("redeemd.sync")

# How far beyond the applied sequence a batch may be kept waiting, and how many bytes
# of chunks and complete batches may wait in memory altogether. Whatever is dropped for
# these limits is requested again later.
MAX_AHEAD = 64
MAX_WAITING_BYTES = 64 << 20
MAX_MESSAGE = 16 << 20
RETRY_BACKOFF_MAX = 8
# While the batch the box needs next is refused (expired and not re-signed, from a key
# the box does not trust...), asking again soon only repeats the refusal: the backoff
# keeps doubling up to this many retry periods (64 min at the default 30 s).
STUCK_BACKOFF_MAX = 128
# After this many requests for the same first sequence with nothing applied, the box
# says so in `stuck` (the backend may not run, or may not hold the batches).
UNANSWERED_REQUESTS = 5


class Intake:
    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        merchant: str,
        roots: dict[str, bytes],
        max_batch_bytes: int,
        request_topic: str,
        publish: Callable[[str, bytes], tuple[int, int] | None],
        retry: float,
        clock: Callable[[], float] = time.time,
    ):
        self.conn = conn
        self.merchant = merchant
        self.roots = roots
        self.max_batch_bytes = max_batch_bytes
        self.request_topic = request_topic
        self._publish = publish
        self.retry = retry
        self.clock = clock
        self.manifest: Manifest | None = None
        self.assemblers: dict[int, ChunkAssembler] = {}
        self.complete: dict[int, Batch] = {}
        self.want_to = 0
        """Highest sequence known to exist (from the manifest or a batch that arrived)."""
        self.requested: tuple[int, int] | None = None
        self._next_request = 0.0
        self._tries = 0
        self.applied = 0
        self.refused = 0
        self.last_refused: str | None = None
        self.last_applied: str | None = None
        self.alarm: str | None = None
        """The last conflicting batch (possible key compromise); kept until restart."""
        self.stuck: str | None = None
        """Why the next batch cannot be applied; cleared when one is."""
        self._refused_next = False
        """The next batch arrived and was refused: back off further (STUCK_BACKOFF_MAX)."""
        self._unanswered = 0
        """Requests sent since a batch was last applied."""
        self.manifests_ignored = 0
        """Valid manifests ignored because they were signed before the one kept (16.1)."""
        self.last_seq = trust.state(conn, merchant).last_seq

    # ------------------------------------------------------------------ time

    def _times(self) -> tuple[int, int]:
        wall = int(self.clock())
        return wall, max(wall, trust.time_floor(self.conn))

    # ------------------------------------------------------------------ reports

    def refuse(self, topic: str, why: str) -> None:
        self.refused += 1
        self.last_refused = f"{topic}: {why}"
        log.warning("sync: refused %s: %s", topic, why)

    def raise_alarm(self, topic: str, exc: BatchConflict) -> None:
        self.refused += 1
        self.last_refused = f"{topic}: {exc}"
        self.alarm = f"{topic}: {exc}"
        log.error("sync: ALARM %s: %s", topic, exc)

    # ------------------------------------------------------------------ manifest

    def on_manifest(self, topic: str, payload: bytes) -> None:
        if len(payload) > MAX_MESSAGE:
            return self.refuse(topic, f"oversized manifest ({len(payload)} bytes)")
        try:
            manifest = open_manifest(payload, self.roots)
        except ManifestError as exc:
            return self.refuse(topic, f"manifest: {exc}")
        if manifest.merchant != self.merchant:
            return self.refuse(topic, f"manifest is for merchant {manifest.merchant!r}")
        wall, now = self._times()
        floor = trust.time_floor(self.conn)
        if wall >= floor and manifest.created_at > wall + MAX_CLOCK_AHEAD:
            return self.refuse(
                topic, f"manifest signed at {manifest.created_at}, more than a day ahead of {wall}"
            )
        if manifest.expires_at < now:
            return self.refuse(topic, f"stale manifest (expired at {manifest.expires_at})")
        if self.manifest is not None and manifest.created_at < self.manifest.created_at:
            # A retained copy redelivered after a newer one, or a backend whose clock
            # went back: never a reason to forget what the newer one said.
            self.manifests_ignored += 1
            log.info(
                "sync: ignored a manifest signed at %d, before the one kept (signed at %d, "
                "latest_seq %d); %d ignored so far",
                manifest.created_at,
                self.manifest.created_at,
                self.manifest.latest_seq,
                self.manifests_ignored,
            )
            return None
        self.manifest = manifest
        # On disk: the floor (a box without a clock stays close to the truth even when
        # no batch arrives, protocol.md section 12) and the cache's age (16.1), which
        # the engine's stale_policy reads from storage.
        self._keep(manifest, now)
        self.want_to = max(self.want_to, manifest.latest_seq)
        return None

    @property
    def roots(self) -> dict[str, bytes]:
        return self._roots

    @roots.setter
    def roots(self, roots: dict[str, bytes]) -> None:
        """New roots (a reload) also start a new set of verified headers: a header
        verified under a root the box no longer trusts must be checked again."""
        self._roots = roots
        self.headers = VerifiedHeaders(roots)

    # ------------------------------------------------------------------ batches

    def on_chunk(self, topic: str, seq: int, payload: bytes) -> None:
        if len(payload) > MAX_MESSAGE:
            return self.refuse(topic, f"oversized chunk ({len(payload)} bytes)")
        try:
            header, _ = self.headers.read(payload, CHUNK_MAGIC)
        except BatchError as exc:
            return self.refuse(topic, str(exc))
        if header.seq != seq:
            return self.refuse(topic, f"chunk of batch {header.seq} on the topic of batch {seq}")
        if header.merchant != self.merchant:
            return self.refuse(topic, f"batch is for merchant {header.merchant!r}")
        if header.seq <= self.last_seq:
            # Decided from the signed header alone, by the rules `redeemd import` uses.
            try:
                if batch_import.replayed(self.conn, header):
                    log.debug("sync: batch %d already applied (replay)", header.seq)
                    return None
            except BatchConflict as exc:
                return self.raise_alarm(topic, exc)
            except ImportRefused as exc:
                return self.refuse(topic, str(exc))
        if header.seq in self.complete:
            return None
        if header.seq > self.last_seq + MAX_AHEAD and header.kind is not Kind.SNAPSHOT:
            log.info("sync: batch %d is too far ahead; it will be requested later", header.seq)
            self.want_to = max(self.want_to, header.seq)
            return None
        assembler = self.assemblers.get(seq)
        if assembler is not None and assembler.header and assembler.header.raw != header.raw:
            # Two authentic versions of one batch (the backend re-signed it): the newer
            # signature wins and the older partial batch is dropped.
            if header.created_at < assembler.header.created_at:
                return self.refuse(topic, f"an older signing of batch {seq} than the one arriving")
            assembler = None
        if assembler is None:
            assembler = self.assemblers[seq] = ChunkAssembler(
                self.roots, self.max_batch_bytes, self.headers
            )
        try:
            batch = assembler.add(payload)
        except BatchError as exc:
            if not assembler.pieces or len(assembler.pieces) == len(header.chunks):
                del self.assemblers[seq]  # nothing kept, or complete and refused as a whole
            return self.refuse(topic, str(exc))
        self.want_to = max(self.want_to, header.seq)
        if batch is None:
            self._bound_memory()
            return None
        del self.assemblers[seq]
        self.complete[seq] = batch
        self._bound_memory()
        self.apply_ready(topic)
        return None

    def apply_ready(self, topic: str = "batches") -> None:
        """Apply every waiting batch that is next in sequence (or a snapshot)."""
        while True:
            for seq in [s for s in self.complete if s <= self.last_seq]:
                del self.complete[seq]
            batch = self.complete.get(self.last_seq + 1)
            if batch is None:
                snapshots = [s for s, b in self.complete.items() if b.header.kind is Kind.SNAPSHOT]
                if not snapshots:
                    return
                batch = self.complete[max(snapshots)]
            seq = batch.header.seq
            del self.complete[seq]
            wall, now = self._times()
            try:
                result = batch_import.apply(
                    self.conn, batch, merchant=self.merchant, now=now, wall=wall
                )
            except SequenceGap as exc:
                self.want_to = max(self.want_to, exc.last_missing)
                self.complete[seq] = batch
                return
            except BatchConflict as exc:
                self.raise_alarm(f"{topic} (batch {seq})", exc)
                continue
            except ImportRefused as exc:
                self.refuse(f"{topic} (batch {seq})", str(exc))
                self.stuck = f"batch {seq} refused: {exc}"
                self._refused_next = True
                continue
            except sqlite3.Error as exc:
                self.refuse(f"{topic} (batch {seq})", f"cannot write the cache: {exc}")
                return
            self.last_seq = trust.state(self.conn, self.merchant).last_seq
            self.applied += 1
            self.last_applied = result.describe()
            self.stuck = None
            self._refused_next = False
            self._unanswered = 0
            self._tries = 0
            self._next_request = self.clock() + self.retry
            log.info("sync: %s", self.last_applied)

    def _bound_memory(self) -> None:
        def size() -> int:
            waiting = sum(len(b.entries) for b in self.complete.values())
            return waiting + sum(
                len(p) for a in self.assemblers.values() for p in a.pieces.values()
            )

        while size() > MAX_WAITING_BYTES:
            # Drop the batch furthest ahead: it is needed last and will be requested again.
            victims = [*self.assemblers, *self.complete]
            far = max(victims)
            self.assemblers.pop(far, None)
            self.complete.pop(far, None)
            log.info("sync: too much waiting in memory; dropped batch %d for now", far)

    # ------------------------------------------------------------------ requests

    def tick(self) -> None:
        """Ask for the missing range when it is time (with backoff while nothing comes)."""
        self.last_seq = trust.state(self.conn, self.merchant).last_seq
        if self.want_to <= self.last_seq:
            self.requested = None
            self.stuck = None  # caught up another way (`redeemd import`)
            self._refused_next = False
            self._unanswered = 0
            return
        first = self.last_seq + 1
        last = min(self.want_to, self.last_seq + MAX_AHEAD)
        while last >= first and last in self.complete:
            last -= 1
        if last < first:
            return
        now = self.clock()
        if self.requested is not None and first <= self.requested[1] and now < self._next_request:
            return  # what was asked for is probably still on its way
        payload = json.dumps({"v": 1, "from": first, "to": last}, separators=(",", ":")).encode()
        if self._publish(self.request_topic, payload) is None:
            return
        log.info("sync: requested batches %d..%d", first, last)
        self.requested = (first, last)
        cap = STUCK_BACKOFF_MAX if self._refused_next else RETRY_BACKOFF_MAX
        self._next_request = now + self.retry * min(2**self._tries, cap)
        self._tries = min(self._tries + 1, 16)
        self._unanswered += 1
        if self._unanswered >= UNANSWERED_REQUESTS and not self._refused_next:
            self.stuck = (
                f"asked for batches {first}..{last} {self._unanswered} times and batch "
                f"{first} never arrived: is the backend's publisher running, and does it "
                "hold it? (a backend that lost it issues a snapshot)"
            )

    def reconnected(self) -> None:
        self._next_request = 0.0
        self._tries = 0

    # ------------------------------------------------------------------ status

    def cache_age(self, now: float) -> int | None:
        """now - created_at of the newest manifest whose latest_seq is applied (16.1),
        else of the newest applied batch, as storage keeps them (trust.cache_time)."""
        known = trust.cache_time(self.conn, self.merchant)
        return None if known is None else int(now - known)

    def _keep(self, manifest: Manifest, now: int) -> None:
        try:
            # Under the write lock: `redeemd import` may apply a batch from another
            # process, and keep_manifest compares with the applied sequence.
            self.conn.execute("BEGIN IMMEDIATE")
            trust.keep_manifest(
                self.conn, self.merchant, manifest.latest_seq, manifest.created_at, now
            )
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            log.warning("sync: cannot save the manifest's signed time: %s", exc)
