"""`redeemd-backend publish`: batches and the signed manifest out to the boxes, resends on request.

Downstream is pull-style (DESIGN.md section 7): Mosquitto drops queued messages for
offline boxes, so what every box can always find is the retained manifest
`{p}/{merchant}/manifest` naming the newest sequence. A box that lacks sequences asks on
`{p}/{merchant}/box/{box}/request` and gets exactly those batches on its own
`{p}/{merchant}/box/{box}/batches/{seq}`. New batches also go once to
`{p}/{merchant}/batches/{seq}` for the boxes that are online.

The publisher polls backend.db for batches issued while it runs (by `issue` or by the
collector's consumed-elsewhere batches) and re-signs the manifest when the newest
sequence moves, after every (re)connect (the broker may have lost its retained
messages) and at least every heartbeat. A stored batch that has expired (or soon will)
goes out re-signed (backend/resign.py), so a box back after months offline catches up.

    >>> publisher = Publisher(Path("keys/"), "mqtt://127.0.0.1:1883")
    >>> publisher.start()   # a thread; publisher.run(stop_event) blocks instead
    >>> publisher.stop()
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from backend import grants, resign
from backend.connection import Connection, Message, default_client_id
from backend.keystore import Keystore, KeystoreError
from backend.store import IssuedBatch, Store
from backend.store_keeper import StoreKeeper
from cards import keys, manifest
from runtime.threads import OwnedThread
from sync.session import STOP_BOUND

DEFAULT_PREFIX = "redeemd/v1"
# How long `stop` waits for the thread: its round ends at once once stopped (a publish
# waiting for a PUBACK gives up), then the broker connection stops (its own bound).
STOP_WAIT = STOP_BOUND + 5.0
DEFAULT_HEARTBEAT = 3600.0
MAX_RESEND = 1000
"""At most this many batches answer one request; the box asks again for the rest."""


def _print(line: str) -> None:
    print(line, flush=True)


class RequestError(ValueError):
    pass


def parse_request(payload: bytes) -> tuple[int, int]:
    """`{"v":1,"from":F,"to":T}` -> (F, T), docs/protocol.md 16.2.

    >>> parse_request(b'{"v":1,"from":3,"to":5}')
    (3, 5)
    """
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"not JSON: {exc}") from None
    if not isinstance(value, dict) or value.get("v") != 1:
        raise RequestError('not a v1 request (expected {"v":1,"from":F,"to":T})')
    first, last = _seq(value, "from"), _seq(value, "to")
    if first > last:
        raise RequestError(f"'from' {first} is after 'to' {last}")
    return first, last


def _seq(request: dict[str, object], name: str) -> int:
    number = request.get(name)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise RequestError(f"'{name}' must be an integer >= 1, got {number!r}")
    return number


def sign_manifest(
    keystore: Keystore, merchant: str, latest: int, heartbeat: float = DEFAULT_HEARTBEAT
) -> bytes:
    """A manifest signed now by the issuer key (re-read, so a new delegation is used)."""
    now = int(time.time())
    return manifest.build(
        keystore.private("issuer"),
        keystore.delegation(),
        merchant=merchant,
        latest_seq=latest,
        created_at=now,
        # Stale only after several missed heartbeats: one slow round is not "cut off".
        expires_at=now + max(60, int(3 * heartbeat)),
    )


class Publisher:
    def __init__(
        self,
        directory: Path,
        broker: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        merchants: Iterable[str] | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        poll: float = 0.5,
        say: Callable[[str], None] = _print,
        client_id: str | None = None,
    ):
        self.dir = directory
        self.prefix = prefix.rstrip("/")
        self.merchants = list(merchants) if merchants else None
        self.heartbeat = heartbeat
        self.poll = poll
        self.say = say
        self.keystore = Keystore(directory)
        self.keystore.require_signing(self.merchants or ())
        self.link = Connection(broker, client_id or default_client_id("publish"), say)
        self._requests: queue.Queue[Message] = queue.Queue()
        self._signed: dict[str, tuple[int, float]] = {}
        """merchant -> (latest_seq, monotonic time) of the last manifest the broker took."""
        self._unsigned: dict[str, str] = {}
        """merchant -> why its manifest cannot be signed (said once per reason)."""
        self._resign = threading.Event()
        self._worker = OwnedThread("publish", self.run)
        self._stop = self._worker.stopping

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run in an owned thread `publish` (`run` blocks instead)."""
        self._worker.start()

    def stop(self, timeout: float = STOP_WAIT) -> bool:
        """Stop and join the thread, waiting at most `timeout` seconds; True if it ended.
        A publish waiting for the broker gives up at once (link.cancel), so a hung broker
        does not hold the stop."""
        return self._worker.stop(timeout)

    def run(self, stop: threading.Event | None = None) -> None:
        """Publish until `stop` (or `self.stop()`) is set. Owns the connection."""
        stop = stop or self._stop
        self.link.cancel = stop
        keeper = StoreKeeper(self.dir, self.say, stop)
        if keeper.store() is None:
            return  # stopped while waiting for the database
        for topic in self._request_topics():
            self.link.subscribe(topic)
        self.link.on_message(self._requests.put)
        # After any (re)connect the retained manifest may be gone (a broker restarted
        # without persistence): sign and publish it again.
        self.link.on_connect(self._resign.set)
        self.link.start()
        try:
            while not stop.is_set() and not self._stop.is_set():
                if self.link.connected.is_set():
                    store = keeper.store()  # waits while the database is lost
                    if store is None:
                        break
                    failures: tuple[type[Exception], ...] = (
                        *store.errors,
                        KeystoreError,
                        keys.TrustError,
                    )
                    try:
                        self._tick(store)
                    except failures as exc:
                        self.say(f"publish round failed: {exc}; retrying")
                        keeper.check(exc)
                stop.wait(self.poll)
        finally:
            self.link.stop()
            keeper.close()

    def _request_topics(self) -> list[str]:
        if self.merchants is None:
            return [f"{self.prefix}/+/box/+/request"]
        return [f"{self.prefix}/{m}/box/+/request" for m in self.merchants]

    # ------------------------------------------------------------ one round

    def _tick(self, store: Store) -> None:
        while True:
            try:
                message = self._requests.get_nowait()
            except queue.Empty:
                break
            self._answer(store, message)
        for stored in store.unpublished(self.merchants):
            # Issued while no publisher ran, possibly long ago: it goes out current.
            try:
                issued = resign.current(stored, self.keystore)
            except KeystoreError as exc:
                # Boxes ask for it once it can be signed; the other merchants go on.
                if self._unsigned.get(stored.merchant) != str(exc):
                    self._unsigned[stored.merchant] = str(exc)
                    self.say(f"batch {stored.merchant}/{stored.seq} not published: {exc}")
                continue
            if not self._publish_batch(issued, f"{self.prefix}/{issued.merchant}/batches"):
                return
            store.mark_published(issued.merchant, issued.seq)
            self.say(
                f"published {issued.kind} batch {issued.merchant}/{issued.seq} "
                f"({issued.count} entries, {len(issued.chunks())} chunks"
                f"{', re-signed' if issued is not stored else ''})"
            )
        reconnected = self._resign.is_set()
        self._resign.clear()
        # Grant sets signed while no broker was reachable (or by a command without
        # --broker) go out now; after a reconnect every box's newest again, retained.
        for granted in grants.publish_pending(
            store, self.link, self.prefix, merchants=self.merchants, again=reconnected
        ):
            self.say(f"published grant set {granted.seq} of box {granted.merchant}/{granted.box}")
        for merchant in self.merchants or store.merchants():
            latest = store.latest_seq(merchant)
            signed = self._signed.get(merchant)
            due = signed is None or time.monotonic() - signed[1] >= self.heartbeat
            if reconnected or due or signed is None or signed[0] != latest:
                self._publish_manifest(merchant, latest)

    def _publish_batch(self, issued: IssuedBatch, topic: str) -> bool:
        return all(self.link.publish(f"{topic}/{issued.seq}", chunk) for chunk in issued.chunks())

    def _publish_manifest(self, merchant: str, latest: int) -> None:
        try:
            self.keystore.require_signing((merchant,))
            data = sign_manifest(self.keystore, merchant, latest, self.heartbeat)
        except KeystoreError as exc:
            # Every box of this merchant would refuse it (not delegated, or the delegation
            # ended): say why once, and still serve the other merchants.
            if self._unsigned.get(merchant) != str(exc):
                self._unsigned[merchant] = str(exc)
                self.say(f"manifest {merchant} not published: {exc}")
            return
        self._unsigned.pop(merchant, None)
        if self.link.publish(f"{self.prefix}/{merchant}/manifest", data, retain=True):
            self._signed[merchant] = (latest, time.monotonic())
            self.say(f"manifest {merchant}: latest_seq {latest}")

    def _answer(self, store: Store, message: Message) -> None:
        parts = message.topic[len(self.prefix) + 1 :].split("/")
        if len(parts) != 4 or parts[1] != "box" or parts[3] != "request":
            return
        merchant, box = parts[0], parts[2]
        try:
            first, last = parse_request(message.payload)
        except RequestError as exc:
            self.say(f"refused request from {merchant}/{box}: {exc}")
            return
        latest = store.latest_seq(merchant)
        if first > latest:
            self.say(
                f"request from {merchant}/{box} for {first}..{last}: nothing issued after {latest}"
            )
            return
        last = min(last, latest, first + MAX_RESEND - 1)
        batches = store.batches(merchant, first, last)
        missing = sorted(set(range(first, last + 1)) - {b.seq for b in batches})
        if missing:
            self.say(
                f"cannot resend {merchant} {ranges(missing)} to {box}: not in the backend's database "
                "(issued before it existed); issue a snapshot"
            )
        topic = f"{self.prefix}/{merchant}/box/{box}/batches"
        chunks = 0
        resigned = []
        for stored in batches:
            # A box back from weeks offline asks for batches that expired meanwhile; the
            # stored copy would be refused again and again (protocol.md 16.6).
            issued = resign.current(stored, self.keystore)
            if issued is not stored:
                resigned.append(issued.seq)
            if not self._publish_batch(issued, topic):
                self.say(
                    f"resend to {merchant}/{box} interrupted at {issued.seq}; box will ask again"
                )
                return
            chunks += len(issued.chunks())
        if batches:
            note = f", re-signed {ranges(resigned)}: expired or expiring" if resigned else ""
            self.say(
                f"resent {merchant} {batches[0].seq}..{batches[-1].seq} to {box} "
                f"({len(batches)} batches, {chunks} chunks{note})"
            )


def ranges(numbers: list[int]) -> str:
    """Sorted sequences as a person reads them.

    >>> ranges([3, 4, 5, 9])
    '3..5, 9'
    """
    out = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}..{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)
