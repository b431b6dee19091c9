"""`redeemd-backend publish` against a real Mosquitto, with plain paho clients as boxes."""

# ruff: noqa: F811  (the broker and boxes fixtures are imported, then named as parameters)
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from backend_helpers import (
    PREFIX,
    CliProcess,
    FakeBox,
    boxes,  # noqa: F401  (fixture)
    issue,
    make_backend,
    roots,
    wait_until,
)
from broker import broker  # noqa: F401  (fixture)
from conftest import ROOT

from backend.keystore import Keystore, KeystoreError
from backend.publish import Publisher
from backend.store import Store
from cards import batch, keys, manifest
from cards.batch import ChunkAssembler, Kind

MANIFEST = f"{PREFIX}/demo/manifest"
BATCHES = f"{PREFIX}/demo/batches/+"


@pytest.fixture
def backend_dir(tmp_path, each_store):
    """A backend directory, its store on each engine: every test here runs on both."""
    directory = tmp_path / "backend"
    make_backend(directory)
    return directory


@pytest.fixture
def publisher(backend_dir, broker):  # noqa: F811
    lines: list[str] = []
    started: list[Publisher] = []

    def start(**options) -> Publisher:
        instance = Publisher(backend_dir, broker.url, say=lines.append, poll=0.05, **options)
        instance.lines = lines
        instance.start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


def manifests(box: FakeBox, keystore_roots) -> list[manifest.Manifest]:
    return [
        manifest.open_manifest(p, keystore_roots) for _, p in box.messages(lambda t: t == MANIFEST)
    ]


def assembled(box: FakeBox, topic_prefix: str, keystore_roots) -> dict[int, batch.Batch]:
    """Every complete batch received under `topic_prefix`/{seq}, by seq."""
    out = {}
    by_seq: dict[int, list[bytes]] = {}
    for topic, payload in box.messages(lambda t: t.startswith(topic_prefix + "/")):
        by_seq.setdefault(int(topic.rsplit("/", 1)[1]), []).append(payload)
    for seq, payloads in by_seq.items():
        assembler = ChunkAssembler(keystore_roots)
        for payload in payloads:
            done = assembler.add(payload)
            if done is not None:
                out[seq] = done
    return out


def test_manifest_is_retained_and_verifies(publisher, backend_dir, boxes):
    issue(backend_dir)
    issue(backend_dir)
    running = publisher()
    wait_until(lambda: "manifest demo: latest_seq 2" in running.lines, "manifest published")
    late = boxes("box-1", extra=(MANIFEST,))  # subscribes after: gets the retained copy
    [signed] = wait_until(lambda: manifests(late, roots(running.keystore)), "retained manifest")
    assert (signed.merchant, signed.latest_seq) == ("demo", 2)
    assert signed.expires_at > signed.created_at


def test_batches_are_published_as_chunks_that_reassemble_to_the_issued_batch(
    publisher, backend_dir, boxes
):
    online = boxes("box-1", extra=(BATCHES,))
    small = issue(backend_dir, count=200, chunk_size=512)  # several chunks
    single = issue(backend_dir, count=1)
    running = publisher()
    keystore_roots = roots(running.keystore)
    got = wait_until(
        lambda: (
            (b := assembled(online, f"{PREFIX}/demo/batches", keystore_roots)) and len(b) == 2 and b
        ),
        "both batches reassembled",
    )
    assert len(small.chunks()) > 1
    for issued in (small, single):
        expected = batch.open_file(issued.data, keystore_roots)
        assert got[issued.seq].header.raw == expected.header.raw
        assert got[issued.seq].entries == expected.entries
    assert (
        f"published revoke batch demo/{small.seq} (200 entries, {len(small.chunks())} chunks)"
        in (running.lines)
    )


def test_a_request_gets_exactly_the_requested_range_on_the_box_own_topic(
    publisher, backend_dir, boxes
):
    issued = [issue(backend_dir, count=5, chunk_size=64) for _ in range(5)]
    running = publisher()
    wait_until(lambda: "manifest demo: latest_seq 5" in running.lines, "manifest")
    keystore_roots = roots(running.keystore)
    asking, other = boxes("box-2"), boxes("box-3")
    asking.request(2, 4)
    own = f"{PREFIX}/demo/box/box-2/batches"
    wait_until(lambda: len(assembled(asking, own, keystore_roots)) == 3, "batches 2..4")
    # A second request is answered after the first on the same connection: once its
    # batch is complete, nothing more from the first answer can still be on the way.
    asking.request(5, 5)
    got = wait_until(
        lambda: (b := assembled(asking, own, keystore_roots)) and 5 in b and b, "batch 5"
    )
    assert sorted(got) == [2, 3, 4, 5]
    for seq in (2, 3, 4):
        assert (
            got[seq].header.raw == batch.open_file(issued[seq - 1].data, keystore_roots).header.raw
        )
        chunk_count = len(issued[seq - 1].chunks())
        assert len(asking.messages(lambda t, seq=seq: t == f"{own}/{seq}")) == chunk_count
    assert all(t.startswith(f"{PREFIX}/demo/box/box-2/") for t, _ in asking.received)
    assert other.received == []
    assert "resent demo 2..4 to box-2 (3 batches, " in "\n".join(running.lines)


def test_an_expired_batch_goes_out_re_signed_with_the_same_content(publisher, backend_dir, boxes):
    keystore = Keystore(backend_dir)
    now = int(time.time())
    then = now - 10 * 86400
    keystore.save_delegation(
        keys.delegate(keystore.private("root"), keystore.public("issuer"), ("demo",),
                      then - 3600, now + 86400)
    )  # fmt: skip
    entries = batch.encode_digests(os.urandom(16) for _ in range(40))
    store = Store.open(backend_dir)
    try:
        old = store.issue("demo", Kind.REVOKE, lambda seq: batch.build(
            keystore.private("issuer"), keystore.delegation(), merchant="demo", seq=seq,
            kind=Kind.REVOKE, entries=entries, created_at=then, expires_at=then + 86400,
            chunk_size=128,
        ))  # fmt: skip
    finally:
        store.close()
    current = issue(backend_dir)
    online = boxes("box-1", extra=(BATCHES,))
    running = publisher()
    keystore_roots = roots(running.keystore)
    # Never published while fresh: its first publish is re-signed too.
    broadcast = wait_until(
        lambda: (b := assembled(online, f"{PREFIX}/demo/batches", keystore_roots)) and 1 in b and b,
        "batch 1 published",
    )
    assert broadcast[1].header.expires_at > now
    assert "published revoke batch demo/1 (40 entries, " in "\n".join(running.lines)
    assert "re-signed)" in next(x for x in running.lines if "batch demo/1 " in x)

    online.request(1, 2)
    own = f"{PREFIX}/demo/box/box-1/batches"
    got = wait_until(
        lambda: (b := assembled(online, own, keystore_roots)) and len(b) == 2 and b, "resend"
    )
    stored = batch.read_header(old.data, batch.FILE_MAGIC, keystore_roots)[0]
    fresh = got[1].header
    assert (fresh.merchant, fresh.seq, fresh.kind, fresh.entries_sha256, fresh.chunks) == (
        "demo", 1, Kind.REVOKE, stored.entries_sha256, stored.chunks,
    )  # fmt: skip
    assert got[1].entries == entries
    assert fresh.created_at >= now and fresh.expires_at - fresh.created_at == 86400
    # Still valid: sent as issued, byte for byte.
    assert got[2].header.raw == batch.open_file(current.data, keystore_roots).header.raw
    assert "resent demo 1..2 to box-1 (2 batches, " in "\n".join(running.lines)
    assert "re-signed 1: expired or expiring" in "\n".join(running.lines)


def test_a_malformed_request_is_refused_and_the_publisher_carries_on(publisher, backend_dir, boxes):
    issue(backend_dir)
    running = publisher()
    wait_until(lambda: "manifest demo: latest_seq 1" in running.lines, "manifest")
    box = boxes("box-1")
    box.client.publish(f"{box.own}/request", b'{"v":1,"from":3,"to":1}', qos=1).wait_for_publish(10)
    wait_until(
        lambda: any("refused request from demo/box-1" in x for x in running.lines), "refusal"
    )
    box.request(1, 1)
    wait_until(lambda: box.messages(lambda t: t.endswith("/box/box-1/batches/1")), "batch 1")


def test_a_batch_issued_by_the_cli_while_publishing_is_picked_up_and_the_manifest_moves(
    publisher, backend_dir, boxes, tmp_path
):
    issue(backend_dir, kind=Kind.BLOCK)
    online = boxes("box-1", extra=(BATCHES, MANIFEST))
    running = publisher()
    keystore_roots = roots(running.keystore)
    wait_until(lambda: any(m.latest_seq == 1 for m in manifests(online, keystore_roots)), "seq 1")
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", "issue", "--dir", str(backend_dir), "--merchant",
         "demo", "--kind", "revoke", "--input", "-", "--out", str(tmp_path / "0002.rdb")],
        input="code\nDEMO-0002\n", capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "revoke batch demo/2" in result.stdout
    got = wait_until(
        lambda: (b := assembled(online, f"{PREFIX}/demo/batches", keystore_roots)) and 2 in b and b,
        "batch 2 published",
    )
    assert (
        got[2].entries
        == batch.open_file((tmp_path / "0002.rdb").read_bytes(), keystore_roots).entries
    )
    wait_until(lambda: any(m.latest_seq == 2 for m in manifests(online, keystore_roots)), "seq 2")


def test_publisher_for_a_merchant_the_key_is_not_delegated_for_refuses_to_start(backend_dir):
    with pytest.raises(KeystoreError, match="not delegated for merchant 'acme', only for demo"):
        Publisher(backend_dir, "mqtt://127.0.0.1:1", merchants=["acme"])


def test_a_merchant_no_longer_delegated_gets_no_manifest_and_the_others_still_do(
    publisher, backend_dir, boxes
):
    keystore = Keystore(backend_dir)
    now = int(time.time())

    def delegate(*merchants: str) -> None:
        keystore.save_delegation(
            keys.delegate(
                keystore.private("root"),
                keystore.public("issuer"),
                merchants,
                now - 60,
                now + 86400,
            )
        )

    # acme's batch was issued while the key was delegated for it; then it was not.
    delegate("demo", "acme")
    store = Store.open(backend_dir)
    try:
        store.issue(
            "acme",
            Kind.REVOKE,
            lambda seq: batch.build(
                keystore.private("issuer"), keystore.delegation(), merchant="acme", seq=seq,
                kind=Kind.REVOKE, entries=b"", created_at=now, expires_at=now + 86400,
            ),
        )  # fmt: skip
    finally:
        store.close()
    issue(backend_dir)
    delegate("demo")
    acme = boxes("box-1", extra=(f"{PREFIX}/acme/manifest",))
    running = publisher(heartbeat=1)
    wait_until(lambda: "manifest demo: latest_seq 1" in running.lines, "demo's manifest")
    # Two heartbeats later: said once, and no manifest every acme box would refuse.
    wait_until(lambda: running.lines.count("manifest demo: latest_seq 1") >= 3, "heartbeats")
    refused = [line for line in running.lines if line.startswith("manifest acme not published:")]
    assert len(refused) == 1 and "not delegated for merchant 'acme'" in refused[0]
    assert acme.messages(lambda t: t.endswith("/acme/manifest")) == []


def test_manifest_is_resigned_every_heartbeat(publisher, backend_dir, boxes):
    issue(backend_dir)
    online = boxes("box-1", extra=(MANIFEST,))
    running = publisher(heartbeat=1)
    keystore_roots = roots(running.keystore)
    first = wait_until(lambda: manifests(online, keystore_roots), "first manifest")[0]
    wait_until(
        lambda: any(m.created_at > first.created_at for m in manifests(online, keystore_roots)),
        "a re-signed manifest",
    )


def test_publish_cli_republishes_after_a_broker_restart_and_answers_requests(
    backend_dir,
    broker,  # noqa: F811
    boxes,
):
    issue(backend_dir)
    issue(backend_dir)
    process = CliProcess("publish", "--dir", str(backend_dir), "--broker", broker.url)
    try:
        process.wait_line(lambda x: x == "manifest demo: latest_seq 2", "manifest")
        # Without persistence the restarted broker has lost the retained manifest.
        after = len(process.lines)  # before: the publisher may reconnect during restart()
        broker.restart(persistence=False)
        process.wait_line(lambda x: x.startswith("reconnected to"), "reconnected", after)
        process.wait_line(lambda x: x == "manifest demo: latest_seq 2", "manifest again", after)
        box = boxes("box-1", extra=(MANIFEST,))
        keystore_roots = roots(Keystore(backend_dir))
        wait_until(lambda: manifests(box, keystore_roots), "retained manifest after restart")

        box.request(1, 2)
        own = f"{PREFIX}/demo/box/box-1/batches"
        wait_until(lambda: len(assembled(box, own, keystore_roots)) == 2, "resent batches")
    finally:
        assert process.stop() == 0


def test_stop_returns_while_a_publish_waits_for_a_hung_broker(publisher, backend_dir, broker):
    issue(backend_dir)
    running = publisher()
    wait_until(lambda: "manifest demo: latest_seq 1" in running.lines, "first manifest")
    waiting = threading.Event()
    publish = running.link.publish

    def noted(*args, **kwargs):  # the real publish, noting that one has begun
        waiting.set()
        return publish(*args, **kwargs)

    running.link.publish = noted
    broker.process.send_signal(signal.SIGSTOP)  # up, connected, never answers again
    try:
        issue(backend_dir)
        assert waiting.wait(10), "the publisher did not try to publish the new batch"
        # The publish waits for a PUBACK that never comes (PUBLISH_TIMEOUT is 30 s):
        # stopping gives it up and joins the publisher's and the connection's threads.
        assert running.stop() is True
    finally:
        broker.process.send_signal(signal.SIGCONT)
    alive = {t.name for t in threading.enumerate()}
    assert "publish" not in alive and not any(name.startswith("mqtt-") for name in alive)
    assert not any(line.startswith("published revoke batch demo/2") for line in running.lines)


def test_a_refused_login_says_what_to_check_in_the_broker_url(publisher, broker):
    broker.anonymous = False  # and the URL names no user: the broker says no
    broker.restart()
    running = publisher()
    line = wait_until(
        lambda: next((x for x in running.lines if "refused the connection" in x), None),
        "the refusal said",
    )
    assert line.startswith(f"broker {broker.url} refused the connection: "), line
    assert "check the user and password in the broker URL" in line, line
    assert not running.link.connected.is_set()
