"""What the backend tests share: a backend key directory, a plain paho client standing in
for a box, ledger records as a box would send them, and waiting on conditions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT
from conftest import wait_for as wait_until

from backend.keystore import Keystore
from backend.store import IssuedBatch, Store
from cards import batch, keys
from cards.batch import Kind

PREFIX = "redeemd/v1"


def make_backend(
    directory: Path,
    merchants: tuple[str, ...] = ("demo",),
    boxes: tuple[str, ...] = (),
) -> Keystore:
    """Keys and a delegation for `merchants`; `boxes` registered for the first merchant
    (`redeemd-backend box add`), since the collector takes events only from those."""
    store = Keystore(directory)
    store.generate()
    now = int(time.time())
    store.save_delegation(
        keys.delegate(
            store.private("root"), store.public("issuer"), merchants, now - 3600, now + 86400 * 30
        )
    )
    if boxes:
        register(directory, merchants[0], *boxes)
    return store


def register(directory: Path, merchant: str, *boxes: str) -> None:
    """Register `boxes` for `merchant` in backend.db, as `redeemd-backend box add` does."""
    backend = Store.open(directory)
    try:
        backend.add_boxes(merchant, boxes)
    finally:
        backend.close()


def roots(keystore: Keystore) -> dict[str, bytes]:
    public = keystore.public("root")
    return {keys.key_id(public): public}


def issue(
    directory: Path, kind: Kind = Kind.REVOKE, count: int = 3, chunk_size: int = 1 << 18
) -> IssuedBatch:
    """Issue a batch through backend.db, as `redeemd-backend issue` does."""
    keystore = Keystore(directory)
    entries = batch.encode_digests(os.urandom(16) for _ in range(count))
    now = int(time.time())

    def sign(seq: int) -> bytes:
        return batch.build(
            keystore.private("issuer"), keystore.delegation(), merchant="demo", seq=seq,
            kind=kind, entries=entries, created_at=now, expires_at=now + 86400,
            chunk_size=chunk_size,
        )  # fmt: skip

    store = Store.open(directory)
    try:
        return store.issue("demo", kind, sign)
    finally:
        store.close()


def record(
    seq: int,
    box: str,
    *,
    action: str = "check",
    digest: bytes | None = None,
    uses: int | None = None,
    uses_left: int | None = None,
    record_id: str | None = None,
) -> dict:
    """One ledger record as a box sends it (docs/protocol.md 16.3)."""
    return {
        "seq": seq, "id": record_id or str(uuid.uuid4()), "at_ms": int(time.time() * 1000) + seq,
        "box": box, "merchant": "demo", "store": "store-1",
        "digest": digest.hex() if digest else None, "card_id": 1 if digest else None,
        "action": action, "uses": uses, "amount": None, "uses_left": uses_left,
        "balance": None, "verdict": "accepted", "reason": None, "source": "stdin",
        "symbology": None, "operator": None, "cache_seq": 1, "reverses": None,
    }  # fmt: skip


class FakeBox:
    """A plain paho client on a box's topics: sends events and requests, keeps what arrives."""

    def __init__(self, port: int, box: str, merchant: str = "demo", extra: tuple[str, ...] = ()):
        self.box = box
        self.base = f"{PREFIX}/{merchant}"
        self.own = f"{self.base}/box/{box}"
        self.received: list[tuple[str, bytes]] = []
        self.on_ack: Callable[[dict], None] | None = None
        self._lock = threading.Lock()
        self.topics = (f"{self.own}/ack", f"{self.own}/batches/+", *extra)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=box, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._connected
        self.client.on_message = self._message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, f"{box} subscribed")

    def _connected(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _message(self, client, userdata, message) -> None:
        if message.topic == f"{self.own}/ack" and self.on_ack is not None:
            self.on_ack(json.loads(message.payload))
        with self._lock:
            self.received.append((message.topic, message.payload))

    def send(self, records: list[dict]) -> None:
        body = json.dumps({"v": 1, "box": self.box, "records": records}).encode()
        self.client.publish(f"{self.own}/events", body, qos=1).wait_for_publish(10)

    def request(self, first: int, last: int) -> None:
        body = json.dumps({"v": 1, "from": first, "to": last}).encode()
        self.client.publish(f"{self.own}/request", body, qos=1).wait_for_publish(10)

    def messages(self, topic_filter: Callable[[str], bool]) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.received if topic_filter(t)]

    def acks(self) -> list[dict]:
        return [json.loads(p) for _, p in self.messages(lambda t: t == f"{self.own}/ack")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class CliProcess:
    """`python -m backend.cli ...` as a real process; its stdout lines are collected."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "backend.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, predicate: Callable[[str], bool], what: str, after: int = 0) -> str:
        def found():
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"process exited: {self.lines}")
            return next((line for line in self.lines[after:] if predicate(line)), None)

        return wait_until(found, f"{what}; output so far: {self.lines}")

    def kill(self) -> int:
        """kill -9: no clean disconnect, no rollback said, whatever was in flight lost."""
        self.process.kill()
        code = self.process.wait(10)
        self._reader.join(5)
        return code

    def stop(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self._reader.join(5)
        return code


@pytest.fixture
def boxes(broker):
    """make(name) -> a FakeBox on the test's broker, closed after the test."""
    made: list[FakeBox] = []

    def make(name: str, extra: tuple[str, ...] = ()) -> FakeBox:
        made.append(FakeBox(broker.port, name, extra=extra))
        return made[-1]

    yield make
    for box in made:
        box.close()
