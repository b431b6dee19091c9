"""The box side of MQTT sync, against a real Mosquitto.

The "backend" here is plain paho clients in the test: it reads the box's events,
requests and status, and publishes manifests, batches and acks exactly as
docs/protocol.md section 16 says. The box side is the real `sync.worker.Sync` (in
process, beside a real Engine on its own connection) or the real `redeemd run` process.
Nothing waits for a fixed time: every check waits for a condition, generously.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import CREATED, FAR, ROOT, Box, make_keyset, wait_for, write_box

from cards import batch, manifest
from cards.batch import Kind
from cards.scan import Scan
from daemon.engine import Engine
from storage import outbox, trust
from storage.database import connect, open_database
from sync.worker import Sync, SyncState

P = "redeemd/v1/demo"
BOX = f"{P}/box/box-1"
WAIT = 60.0
BOX_CODES = {**{f"DEMO-{i:04d}": 1 for i in range(1, 11)}, "GIFT-0001": 5}


class Backend:
    """A test-side backend: one plain paho client that records everything under the
    merchant's tree and publishes what the test tells it to."""

    def __init__(self, port: int):
        self.port = port
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client: mqtt.Client | None = None
        self.connect()

    def connect(self) -> None:
        ready = threading.Event()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-backend-{random.getrandbits(32)}",
            protocol=mqtt.MQTTv5,
        )

        def on_connect(c, userdata, flags, reason, properties):
            c.subscribe(f"{P}/#", qos=1)

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: ready.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        assert ready.wait(WAIT), "test backend could not subscribe"
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.client is not None
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == topic]

    def events(self) -> list[list[dict]]:
        return [json.loads(p)["records"] for p in self.on(f"{BOX}/events")]

    def seqs(self) -> list[int]:
        return [r["seq"] for message in self.events() for r in message]

    def statuses(self) -> list[dict]:
        return [json.loads(p) for p in self.on(f"{BOX}/status") if p]

    def requests(self) -> list[dict]:
        return [json.loads(p) for p in self.on(f"{BOX}/request")]

    def ack(self, upto: int = 0, ids: list[str] | None = None) -> None:
        self.publish(f"{BOX}/ack", json.dumps({"v": 1, "upto": upto, "ids": ids or []}).encode())


@pytest.fixture
def backend(broker):
    instance = Backend(broker.port)
    yield instance
    instance.close()


def sync_box(directory: Path, keyset, broker, sync: str = "", trust: str = "") -> Box:
    """A box with the demo cards (seq 1) and codes (seq 2), configured to sync."""
    from storage import batch_import

    box = write_box(
        directory,
        keyset,
        extra=f'[sync]\nenabled = true\nbroker = "{broker.url}"\nstatus_every = "1s"\n{sync}',
    )
    if trust:
        box.config_path.write_text(
            box.config_path.read_text().replace("[trust]\n", f"[trust]\n{trust}\n")
        )
    conn = open_database(box.database)
    try:
        for data in (keyset.cards_batch(1), keyset.issue_batch(BOX_CODES, seq=2)):
            parsed = batch.open_file(data, keyset.roots)
            batch_import.apply(conn, parsed, merchant="demo", now=CREATED)
    finally:
        conn.close()
    return box


class Running:
    """The in-process sync beside a real engine, both on their own connections."""

    def __init__(self, box: Box):
        self.box = box
        config = box.config
        self.config = config
        self.engine = Engine(open_database(box.database), config)
        self.reader = connect(box.database)
        self.sync = Sync(
            config.sync,
            box=config.box.id,
            merchant=config.box.merchant,
            database=config.box.database,
            roots=config.trust.root_keys,
            max_batch_bytes=config.trust.max_batch_bytes,
        )

    def start(self) -> Running:
        self.sync.start()
        return self

    def scan(self, code: str, source: str = "counter"):
        return self.engine.handle(Scan(code=code.encode(), source=source, at=time.time()))

    def depth(self) -> int:
        return outbox.depth(self.reader)

    def state(self) -> SyncState:
        return self.sync.state()

    def cache(self) -> tuple:
        rows = self.reader.execute("SELECT * FROM codes ORDER BY digest").fetchall()
        return rows, trust.state(self.reader, "demo"), trust.cards(self.reader).keys()

    def stop(self) -> None:
        assert self.sync.stop(timeout=10), "sync did not stop"
        self.engine.conn.close()
        self.reader.close()


@pytest.fixture
def running(request):
    started: list[Running] = []

    def make(box: Box) -> Running:
        instance = Running(box)
        started.append(instance)
        return instance

    yield make
    for instance in started:
        instance.stop()


def connected(run: Running) -> bool:
    return bool(run.state().connected)


# ---------------------------------------------------------------------- upstream


def test_events_arrive_in_order_and_leave_the_outbox_only_after_an_ack(
    tmp_path,
    keyset,
    broker,
    backend,
    running,
):
    box = sync_box(tmp_path, keyset, broker, sync='max_records = 7\nrequest_retry = "10m"')
    run = running(box)
    for i in range(30):
        run.scan(f"UNKNOWN-{i}")  # rejected scans are ledger records too
    run.start()
    wait_for(lambda: len(backend.seqs()) >= 30, "30 records on the events topic")
    assert backend.seqs() == list(range(1, 31))
    assert max(len(m) for m in backend.events()) > 1, "a backlog goes several records a message"
    assert all(len(m) <= 7 for m in backend.events())
    wait_for(lambda: run.state().in_flight == 0, "every events message PUBACKed")
    assert run.depth() == 30, "a PUBACK is not the backend's ack"

    record_25 = next(r for m in backend.events() for r in m if r["seq"] == 25)
    backend.ack(upto=20, ids=[record_25["id"]])
    wait_for(lambda: run.depth() == 9, "records 1..20 and 25 acknowledged")
    left = [r[0] for r in run.reader.execute("SELECT seq FROM outbox ORDER BY seq")]
    assert left == [21, 22, 23, 24, 26, 27, 28, 29, 30]

    new = run.scan("DEMO-0001")
    assert new.accepted
    wait_for(lambda: 31 in backend.seqs(), "a new scan is sent while connected")
    backend.ack(upto=31)
    wait_for(lambda: run.depth() == 0, "everything acknowledged")


def test_scans_while_the_broker_is_down_all_arrive_when_it_is_back(
    tmp_path,
    keyset,
    broker,
    backend,
    running,
):
    box = sync_box(tmp_path, keyset, broker, sync='request_retry = "2s"')
    run = running(box).start()
    wait_for(lambda: connected(run), "sync connected")
    backend.close()
    broker.stop()
    wait_for(lambda: not connected(run), "sync noticing the broker is gone")
    verdicts = [run.scan(f"DEMO-{i:04d}") for i in range(1, 11)]
    verdicts += [run.scan(f"NOPE-{i}") for i in range(15)]
    assert all(v.accepted for v in verdicts[:10]), "the engine works offline"
    assert run.depth() == 25
    assert run.state().last_error, "status says why sync is not connected"

    broker.start()
    backend.connect()
    # Records sent before the test backend subscribed are sent again (request_retry).
    wait_for(lambda: set(backend.seqs()) >= set(range(1, 26)), "every record after the outage")
    for message in backend.events():
        seqs = [r["seq"] for r in message]
        assert seqs == sorted(seqs)
    redeemed = [r for m in backend.events() for r in m if r["action"] == "redeem"]
    assert {r["seq"] for r in redeemed} == set(range(1, 11))
    backend.ack(upto=25)
    wait_for(lambda: run.depth() == 0, "outbox empty after the ack")
    assert connected(run)


def test_records_waiting_in_the_outbox_of_the_previous_release_are_sent_after_the_upgrade(
    tmp_path, keyset, broker, backend, running
):
    from sqlite_utils import Database

    from storage import batch_import
    from storage.migrations import migrations

    box = write_box(
        tmp_path,
        keyset,
        extra=f'[sync]\nenabled = true\nbroker = "{broker.url}"\nrequest_retry = "10m"\n',
    )
    # The database as the release before m006 leaves it: the outbox a table that the
    # ledger_to_outbox trigger fills, acks deleting from it, 2 and 4 acked by id.
    old = connect(box.database)
    migrations.apply(Database(old), stop_before="m006_outbox_from_the_ledger")
    for data in (keyset.cards_batch(1), keyset.issue_batch(BOX_CODES, seq=2)):
        batch_import.apply(old, batch.open_file(data, keyset.roots), merchant="demo", now=CREATED)
    # Five redemptions as that release's engine wrote them: its 20 ledger columns (the
    # current Engine writes columns later migrations add, so it cannot write here).
    for i in range(1, 6):
        old.execute(
            "INSERT INTO ledger(seq, id, at_ms, box, merchant, store, digest, card_id, action, "
            "uses, uses_left, verdict, source, cache_seq) "
            "VALUES (?, ?, ?, 'box-1', 'demo', 'store-1', ?, 1, 'redeem', 1, 0, 'accepted', "
            "'counter', 2)",
            (i, uuid.uuid4().bytes, int(time.time() * 1000), keyset.digest(f"DEMO-{i:04d}")),
        )
    old.execute("DELETE FROM outbox WHERE seq IN (2, 4)")
    old.close()

    run = running(box)  # opens the database as the daemon does: m006 runs here
    assert run.depth() == 3
    assert run.scan("DEMO-0006").accepted
    run.start()
    wait_for(lambda: set(backend.seqs()) >= {1, 3, 5, 6}, "the old outbox's records sent")
    assert 2 not in backend.seqs() and 4 not in backend.seqs(), "acked before the upgrade"
    assert backend.seqs() == sorted(backend.seqs())
    ids = {r["seq"]: r["id"] for m in backend.events() for r in m}
    backend.ack(upto=1, ids=[ids[5]])
    wait_for(lambda: run.depth() == 2, "records 1 and 5 acknowledged")
    left = [r[0] for r in run.reader.execute("SELECT seq FROM outbox ORDER BY seq")]
    assert left == [3, 6]
    backend.ack(upto=6)
    wait_for(lambda: run.depth() == 0, "everything acknowledged")


def test_acks_for_unknown_ids_are_harmless(tmp_path, keyset, broker, backend, running):
    box = sync_box(tmp_path, keyset, broker, sync='request_retry = "10m"')
    run = running(box).start()
    for i in range(3):
        run.scan(f"DEMO-{i + 1:04d}")
    wait_for(lambda: len(backend.seqs()) >= 3, "three records sent")
    backend.ack(ids=[str(uuid.uuid4()), str(uuid.uuid4())])
    backend.ack(upto=0, ids=[])
    run.scan("DEMO-0009")
    wait_for(lambda: 4 in backend.seqs(), "sync still sending after unknown acks")
    assert run.depth() == 4
    assert run.state().refused == 0

    # An ack far ahead of what was sent only covers what this box has sent.
    backend.ack(upto=10**9)
    wait_for(lambda: run.depth() == 0, "acked up to what was sent")
    run.scan("DEMO-0010")
    wait_for(lambda: 5 in backend.seqs(), "record 5 sent")
    assert run.depth() == 1, "a record sent after the ack is still waiting"


def test_acl_refusing_the_events_topic_is_reported_and_records_stay(
    tmp_path,
    keyset,
    broker,
    running,
):
    broker.acl = (
        "topic read redeemd/v1/#\n"
        f"topic write {BOX}/status\n"
        f"topic write {BOX}/request\n"
        f"topic write {P}/manifest\n"
    )
    broker.restart()
    backend = Backend(broker.port)
    try:
        box = sync_box(tmp_path, keyset, broker)
        run = running(box)
        run.scan("DEMO-0001")
        run.scan("DEMO-0002")
        run.start()
        error = wait_for(lambda: run.state().publish_error, "the PUBACK failure in status")
        assert "0x87" in error and "events" in error
        assert run.depth() == 2
        published = wait_for(
            lambda: [s for s in backend.statuses() if s.get("publish_error")],
            "the refusal in the retained status message",
        )
        assert published[-1]["state"] == "online" and published[-1]["outbox_depth"] == 2
        assert backend.on(f"{BOX}/events") == []
        assert connected(run), "an ACL refusal does not break the connection"
    finally:
        backend.close()


# ---------------------------------------------------------------------- downstream


def publish_manifest(backend: Backend, keyset, latest_seq: int, created_at: int = CREATED) -> None:
    data = manifest.build(
        keyset.issuer_private,
        keyset.delegation,
        merchant="demo",
        latest_seq=latest_seq,
        created_at=created_at,
        expires_at=FAR,
    )
    backend.publish(f"{P}/manifest", data, retain=True)


def new_codes(n: int, prefix: str = "NEW") -> dict[str, int]:
    return {f"{prefix}-{i:04d}": 1 for i in range(n)}


def test_manifest_ahead_makes_the_box_request_the_exact_missing_range(
    tmp_path,
    keyset,
    broker,
    backend,
    running,
):
    box = sync_box(tmp_path, keyset, broker, sync='request_retry = "1s"')
    publish_manifest(backend, keyset, latest_seq=5)  # retained before the box connects
    run = running(box).start()
    wait_for(lambda: backend.requests(), "a resend request")
    assert backend.requests()[0] == {"v": 1, "from": 3, "to": 5}
    wait_for(lambda: len(backend.requests()) >= 2, "the request repeated while nothing comes")
    assert all(r == {"v": 1, "from": 3, "to": 5} for r in backend.requests())
    assert run.state().manifest_seq == 5


def test_chunked_batches_out_of_order_are_applied_and_change_verdicts(
    tmp_path,
    keyset,
    broker,
    backend,
    running,
):
    box = sync_box(tmp_path, keyset, broker, sync='request_retry = "1s"')
    run = running(box).start()
    wait_for(lambda: connected(run), "sync connected")
    assert run.engine.check("NEW-0001").reason.value == "unknown_code"
    assert run.engine.check("DEMO-0003").accepted

    issue = keyset.issue_batch(new_codes(60), seq=3, chunk_size=300)
    revoke = keyset.status_batch(Kind.REVOKE, ["DEMO-0003"], seq=4, chunk_size=300)
    chunks3, chunks4 = batch.split(issue), batch.split(revoke)
    assert len(chunks3) > 3
    random.Random(7).shuffle(chunks3)

    # Batch 4 first: it waits for 3, and the box asks for exactly 3.
    for chunk in chunks4:
        backend.publish(f"{P}/batches/4", chunk)
    wait_for(lambda: {"v": 1, "from": 3, "to": 3} in backend.requests(), "a request for 3..3")
    assert trust.state(run.reader, "demo").last_seq == 2

    for chunk in chunks3:  # answered on the box's own topic, shuffled
        backend.publish(f"{BOX}/batches/3", chunk)
    wait_for(lambda: trust.state(run.reader, "demo").last_seq == 4, "batches 3 and 4 applied")
    assert run.engine.check("NEW-0001").accepted
    assert run.engine.check("DEMO-0003").reason.value == "revoked"
    verdict = run.scan("NEW-0042")
    assert verdict.accepted and verdict.action.value == "redeem"
    status = wait_for(
        lambda: [s for s in backend.statuses() if s.get("cache_seq") == 4], "status with cache 4"
    )
    assert status[-1]["state"] == "online"
    assert run.state().refused == 0


def test_an_applied_batch_is_acknowledged_at_once_in_the_retained_status(
    tmp_path,
    keyset,
    broker,
    backend,
    running,
):
    # status_every is an hour: only the batch itself can make the box publish again.
    box = sync_box(tmp_path, keyset, broker)
    text = box.config_path.read_text()
    box.config_path.write_text(text.replace('status_every = "1s"', 'status_every = "1h"'))
    run = running(box).start()
    wait_for(lambda: [s for s in backend.statuses() if s.get("cache_seq") == 2], "first status")
    for chunk in batch.split(keyset.issue_batch(new_codes(3), seq=3)):
        backend.publish(f"{P}/batches/3", chunk)
    acked = wait_for(
        lambda: [s for s in backend.statuses() if s.get("cache_seq") == 3], "status with batch 3"
    )
    assert acked[-1]["state"] == "online"
    assert trust.state(run.reader, "demo").last_seq == 3


def test_forged_truncated_and_garbage_downstream_messages_are_refused_and_change_nothing(
    tmp_path,
    keyset,
    broker,
    backend,
    running,
):
    box = sync_box(tmp_path, keyset, broker, trust="max_batch_bytes = 4096")
    run = running(box).start()
    wait_for(lambda: connected(run), "sync connected")
    before = run.cache()
    stranger = make_keyset()
    good3 = batch.split(keyset.issue_batch(new_codes(5), seq=3))[0]
    flipped = bytearray(good3)
    flipped[-3] ^= 0x01
    forged_manifest = manifest.build(
        stranger.issuer_private, stranger.delegation, merchant="demo", latest_seq=9,
        created_at=CREATED, expires_at=FAR,
    )  # fmt: skip
    future_manifest = manifest.build(
        keyset.issuer_private, keyset.delegation, merchant="demo", latest_seq=9,
        created_at=int(time.time()) + 10 * 86400, expires_at=FAR,
    )  # fmt: skip
    bad = [
        (f"{P}/manifest", b"garbage"),
        (f"{P}/manifest", forged_manifest),
        (f"{P}/manifest", forged_manifest[:-5]),
        (f"{P}/manifest", future_manifest),
        (f"{P}/batches/3", batch.split(stranger.issue_batch(new_codes(5), seq=3))[0]),
        (f"{P}/batches/3", good3[: len(good3) // 2]),  # truncated
        (f"{P}/batches/3", bytes(flipped)),  # corrupted piece
        (f"{P}/batches/3", b"RDC1\xff\xff\xff\xff"),
        (f"{P}/batches/3", b"\x00" * 100),
        (f"{P}/batches/7", good3),  # header says 3
        (f"{BOX}/batches/3", batch.split(keyset.issue_batch(new_codes(200), seq=3))[0]),  # 8 KB
        (f"{P}/batches/2", batch.split(keyset.issue_batch(new_codes(5), seq=2))[0]),  # conflict
        (f"{BOX}/ack", b"\xff\xfe not json"),
        (f"{BOX}/ack", b'{"v":1,"upto":"all"}'),
        (f"{BOX}/ack", b'{"v":1,"ids":["not-a-uuid"]}'),
        (f"{BOX}/ack", b"[]"),
    ]
    for topic, payload in bad:
        backend.publish(topic, payload)
    wait_for(lambda: run.state().refused == len(bad), f"{len(bad)} refusals")
    assert run.cache() == before
    assert run.engine.check("NEW-0001").reason.value == "unknown_code"
    assert run.state().manifest_seq is None

    # A replay of an applied batch is ignored quietly; the real batch 3 still applies.
    backend.publish(f"{P}/batches/2", batch.split(keyset.issue_batch(BOX_CODES, seq=2))[0])
    backend.publish(f"{P}/batches/3", good3)
    wait_for(lambda: trust.state(run.reader, "demo").last_seq == 3, "the good batch applied")
    assert run.engine.check("NEW-0001").accepted
    assert run.state().refused == len(bad), "the replay was not a refusal"
    assert connected(run)


def test_a_conflicting_batch_over_mqtt_raises_the_key_compromise_alarm(
    tmp_path, keyset, broker, backend, running, caplog
):
    box = sync_box(tmp_path, keyset, broker)
    run = running(box).start()
    wait_for(lambda: connected(run), "sync connected")
    before = run.cache()
    # Batch 2 re-signed by the backend (same entries, a year's newer signature): a replay.
    resigned = batch.resign(
        keyset.issue_batch(BOX_CODES, seq=2), keyset.issuer_private, keyset.delegation,
        created_at=CREATED + 500, expires_at=FAR,
    )  # fmt: skip
    for chunk in batch.split(resigned):
        backend.publish(f"{P}/batches/2", chunk)
    # Another batch 2: only a broken backend or a stolen key makes one.
    conflicting = batch.split(keyset.issue_batch(new_codes(5), seq=2))[0]
    with caplog.at_level(logging.ERROR, logger="redeemd.sync"):
        backend.publish(f"{P}/batches/2", conflicting)
        wait_for(lambda: run.state().refused == 1, "the conflicting batch refused")
    state = run.state()
    assert state.alarm is not None and "a different batch demo/2 was already applied" in state.alarm
    assert "possible key compromise" in state.alarm and state.last_refused == state.alarm
    assert [r.getMessage() for r in caplog.records if "possible key compromise" in r.getMessage()]
    published = wait_for(
        lambda: [s for s in backend.statuses() if s.get("alarm")], "the alarm in the status message"
    )
    assert "possible key compromise" in published[-1]["alarm"]
    assert run.cache() == before


def test_a_manifest_signed_before_the_one_kept_is_ignored_and_counted(
    tmp_path, keyset, broker, backend, running
):
    box = sync_box(tmp_path, keyset, broker, sync='request_retry = "1h"')
    run = running(box).start()
    publish_manifest(backend, keyset, latest_seq=2, created_at=CREATED + 100)
    wait_for(lambda: run.state().manifest_seq == 2, "the manifest kept")
    publish_manifest(backend, keyset, latest_seq=9, created_at=CREATED + 50)
    wait_for(lambda: run.state().manifests_ignored == 1, "the older manifest counted")
    publish_manifest(backend, keyset, latest_seq=9, created_at=CREATED + 40)
    wait_for(lambda: run.state().manifests_ignored == 2, "the second one counted")
    assert run.state().manifest_seq == 2 and run.state().refused == 0
    assert backend.requests() == [], "an ignored manifest asks for nothing"
    wait_for(
        lambda: [s for s in backend.statuses() if s.get("manifests_ignored") == 2],
        "the count in the status message",
    )


# ---------------------------------------------------------------------- the real process


def start_daemon(box: Box) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "-c", str(box.config_path), "run", "--json"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_status_is_retained_online_and_the_last_will_marks_a_killed_box_offline(
    tmp_path,
    keyset,
    broker,
    backend,
):
    box = sync_box(tmp_path, keyset, broker, sync='keepalive = "5s"')
    daemon = start_daemon(box)
    try:
        online = wait_for(
            lambda: [s for s in backend.statuses() if s["state"] == "online"], "online status"
        )[-1]
        assert online["box"] == "box-1" and online["cache_seq"] == 2 and online["version"]
        assert online["drivers"][0]["name"] == "stdin"

        daemon.stdin.write(b"DEMO-0001\n")
        daemon.stdin.flush()
        wait_for(lambda: backend.seqs() == [1], "the scan on the events topic")
        shown = json.loads(box.cli("status", "--json").stdout)
        wait_for(
            lambda: json.loads(box.cli("status", "--json").stdout)["sync"]["connected"],
            "redeemd status showing the sync connected",
        )
        assert shown["outbox_depth"] == 1

        # A subscriber arriving later gets the retained status at once.
        late = Backend(broker.port)
        try:
            wait_for(lambda: late.statuses(), "the retained status for a late subscriber")
            assert late.statuses()[-1]["state"] == "online"
        finally:
            late.close()

        daemon.send_signal(signal.SIGKILL)
        daemon.wait(WAIT)
        will = wait_for(
            lambda: [s for s in backend.statuses() if s["state"] == "offline"], "the last will"
        )
        assert will[-1] == {"v": 1, "box": "box-1", "state": "offline"}
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(WAIT)


def test_a_clean_stop_publishes_offline_status_itself(tmp_path, keyset, broker, backend):
    box = sync_box(tmp_path, keyset, broker)
    daemon = start_daemon(box)
    try:
        wait_for(lambda: [s for s in backend.statuses() if s["state"] == "online"], "online")
        daemon.stdin.close()  # the only scanner ends: the daemon stops cleanly
        assert daemon.wait(WAIT) == 0
        offline = wait_for(
            lambda: [s for s in backend.statuses() if s["state"] == "offline"], "offline status"
        )[-1]
        # The will carries only v, box and state; the box's own message has the details.
        assert offline["version"] and offline["outbox_depth"] == 0 and offline["cache_seq"] == 2
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(WAIT)


def test_sync_config_errors_name_the_key(tmp_path, keyset):
    from daemon.config import ConfigError

    box = write_box(
        tmp_path,
        keyset,
        extra='[sync]\nenabled = true\nbroker = "http://x"\npassword_file = "/nonexistent/pw"\n'
        'ca_file = "/nonexistent/ca.pem"\nmax_inflight = 0\n',
    )
    with pytest.raises(ConfigError) as caught:
        box.config  # noqa: B018
    text = "\n".join(caught.value.problems)
    for key in ("broker", "password_file", "ca_file", "max_inflight"):
        assert f"[sync] {key}" in text
    result = box.cli("check-config")
    assert result.returncode == 2 and b"password_file" in result.stderr


# ---------------------------------------------------------------------- stopping


def _sync_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in ("sync", "sync-network")]


def test_sync_stops_within_its_bound_while_the_broker_hangs(tmp_path, keyset, broker, running):
    run = running(sync_box(tmp_path, keyset, broker)).start()
    wait_for(lambda: connected(run), "connected")
    broker.process.send_signal(signal.SIGSTOP)  # connected, and never answers again
    try:
        run.scan("DEMO-0001")  # a record on its way, waiting for a PUBACK
        wait_for(lambda: run.state().in_flight, "the record in flight")
        # The offline status waits for its PUBACK at most 2 s, the network thread is
        # woken by the disconnect: both threads end within the bound.
        assert run.sync.stop(timeout=10) is True
    finally:
        broker.process.send_signal(signal.SIGCONT)
    assert _sync_threads() == []
    assert run.depth() == 1  # never acked: still in the outbox for the next run


def test_sync_stops_within_its_bound_while_the_broker_is_down(tmp_path, keyset, broker, running):
    box = sync_box(tmp_path, keyset, broker)
    broker.stop()
    run = running(box).start()
    # Refused connections: the network thread waits in its backoff (up to 60 s).
    wait_for(lambda: "cannot connect" in (run.state().last_error or ""), "a failed connect")
    assert run.sync.stop(timeout=10) is True
    assert _sync_threads() == []
