"""`redeemd-backend collect` against a real Mosquitto, with plain paho clients as boxes."""

# ruff: noqa: F811  (the broker and boxes fixtures are imported, then named as parameters)
from __future__ import annotations

import os
import uuid

import pytest
from backend_helpers import (
    PREFIX,
    CliProcess,
    FakeBox,
    boxes,  # noqa: F401  (fixture)
    issue,
    make_backend,
    record,
    register,
    roots,
    wait_until,
)
from broker import broker  # noqa: F401  (fixture)
from tcp_proxy import TcpProxy

from backend.collect import Collector
from backend.store import Store
from cards import manifest
from cards.batch import ChunkAssembler, Kind


@pytest.fixture
def backend_dir(tmp_path, each_store):
    """A backend directory, its store on each engine: every test here runs on both."""
    directory = tmp_path / "backend"
    make_backend(directory, boxes=("box-1", "box-2", "box-3"))
    return directory


@pytest.fixture
def collector(backend_dir, broker):  # noqa: F811
    lines: list[str] = []
    instance = Collector(backend_dir, broker.url, say=lines.append)
    instance.lines = lines
    instance.start()
    wait_until(instance.link.connected.is_set, "collector connected")
    yield instance
    instance.stop()


def stored(backend_dir) -> list[tuple]:
    store = Store.open(backend_dir)
    try:
        rows = store.engine.execute("SELECT box, seq, id FROM events ORDER BY box, seq")
        return [tuple(row) for row in rows.fetchall()]
    finally:
        store.close()


def test_records_sent_twice_are_stored_once_and_acked_both_times(collector, boxes, backend_dir):
    box = boxes("box-1")
    records = [record(seq, "box-1") for seq in (1, 2, 3)]
    box.send(records)
    box.send(records)  # a lost ack: the box sends the same records again
    wait_until(lambda: len(box.acks()) == 2, "two acks")
    assert box.acks() == [{"v": 1, "upto": 3, "ids": []}] * 2
    assert stored(backend_dir) == [("box-1", r["seq"], r["id"]) for r in records]
    assert "stored demo/box-1 1..3: 3 new, 0 duplicate; acked upto 3" in collector.lines
    assert "stored demo/box-1 1..3: 0 new, 3 duplicate; acked upto 3" in collector.lines


def test_ack_comes_after_the_commit_with_contiguous_upto_and_out_of_order_ids(
    collector, boxes, backend_dir
):
    box = boxes("box-1")
    seen_at_ack: list[set[str]] = []
    # Read the database the moment each ack arrives: everything acked must be there.
    box.on_ack = lambda ack: seen_at_ack.append({row[2] for row in stored(backend_dir)})
    r = {seq: record(seq, "box-1") for seq in range(1, 6)}

    box.send([r[1], r[2]])
    wait_until(lambda: len(box.acks()) == 1, "first ack")
    box.send([r[5]])
    wait_until(lambda: len(box.acks()) == 2, "second ack")
    box.send([r[3], r[4]])
    wait_until(lambda: len(box.acks()) == 3, "third ack")

    assert box.acks() == [
        {"v": 1, "upto": 2, "ids": []},
        {"v": 1, "upto": 2, "ids": [r[5]["id"]]},
        {"v": 1, "upto": 5, "ids": []},
    ]
    assert {r[1]["id"], r[2]["id"]} <= seen_at_ack[0]
    assert r[5]["id"] in seen_at_ack[1]
    assert {r[n]["id"] for n in r} <= seen_at_ack[2]


def test_gap_in_a_box_sequence_is_detected_reported_and_closed_when_filled(
    collector, boxes, backend_dir
):
    box = boxes("box-1")
    r = {seq: record(seq, "box-1") for seq in range(1, 5)}
    box.send([r[1]])
    box.send([r[4]])
    wait_until(lambda: "gap demo/box-1: missing 2..3" in collector.lines, "gap line")
    store = Store.open(backend_dir)
    try:
        assert [(g.box, g.first, g.last) for g in store.open_gaps()] == [("box-1", 2, 3)]
        box.send([r[2], r[3]])
        wait_until(lambda: "gap filled demo/box-1: 2..3" in collector.lines, "gap filled")
        assert store.open_gaps() == []
        assert store.high_water("demo", "box-1") == 4
    finally:
        store.close()


def test_a_malformed_events_message_is_refused_and_not_acked(collector, boxes, backend_dir):
    box = boxes("box-1")
    box.client.publish(f"{box.own}/events", b"{not json", qos=1).wait_for_publish(10)
    spoofed = record(1, "box-2")  # a record claiming another box, on box-1's topic
    box.send([spoofed])
    box.send([record(1, "box-1")])  # then a good one: the collector carries on
    wait_until(lambda: box.acks(), "ack of the good message")
    refused = [line for line in collector.lines if line.startswith("refused events")]
    assert len(refused) == 2 and "not JSON" in refused[0] and "box-2" in refused[1]
    assert box.acks() == [{"v": 1, "upto": 1, "ids": []}]
    assert [row[0] for row in stored(backend_dir)] == ["box-1"]


def test_two_collectors_on_one_shared_subscription_split_the_load_and_store_each_record_once(
    backend_dir,
    broker,  # noqa: F811
    boxes,
):
    lines = {"a": [], "b": []}
    collectors = [
        Collector(backend_dir, broker.url, group="main", say=lines[name].append, client_id=name)
        for name in lines
    ]
    for c in collectors:
        c.start()
    try:
        for c in collectors:
            wait_until(c.link.connected.is_set, "both collectors connected")
        senders = [boxes("box-1"), boxes("box-2")]
        sent = {box.box: [record(seq, box.box) for seq in range(1, 101)] for box in senders}
        for box in senders:
            for i, rec in enumerate(sent[box.box]):
                box.send([rec])
                if i % 10 == 0:
                    box.send([rec])  # some duplicates, likely to land on the other collector
        wait_until(lambda: len(stored(backend_dir)) == 200, "200 records stored")
        for box in senders:
            wait_until(
                lambda box=box: any(a["upto"] == 100 for a in box.acks()), f"{box.box} acked"
            )
        assert sorted(stored(backend_dir)) == sorted(
            (name, r["seq"], r["id"]) for name, records in sent.items() for r in records
        )
        for name in lines:
            assert any(line.startswith("stored demo/") for line in lines[name]), name
    finally:
        for c in collectors:
            c.stop()


def test_a_collector_that_stopped_leaves_no_share_of_the_group_behind(
    backend_dir,
    broker,  # noqa: F811
    boxes,
):
    # A shared subscription hands each message to one session of the group, offline
    # ones included: a stopped collector whose session lived on would take every
    # other message into a queue nobody reads.
    gone = Collector(backend_dir, broker.url, group="main", say=lambda line: None, client_id="a")
    gone.start()
    wait_until(gone.link.connected.is_set, "the first collector connected")
    gone.stop()
    lines: list[str] = []
    live = Collector(backend_dir, broker.url, group="main", say=lines.append, client_id="b")
    live.start()
    try:
        wait_until(live.link.connected.is_set, "the second collector connected")
        box = boxes("box-1")
        for seq in range(1, 21):
            box.send([record(seq, "box-1")])
        # FakeBox never resends: everything must reach the live collector the first time.
        wait_until(lambda: any(a["upto"] == 20 for a in box.acks()), "all 20 records acked")
        assert len(stored(backend_dir)) == 20
    finally:
        live.stop()


def test_same_code_redeemed_on_two_boxes_is_flagged_and_a_consumed_batch_is_published(
    collector,
    boxes,
    backend_dir,
):
    keystore_roots = roots(collector.keystore)
    first = issue(backend_dir)  # seq 1 exists: the consumed batch must take seq 2
    watcher = boxes("box-3", extra=(f"{PREFIX}/demo/batches/+", f"{PREFIX}/demo/manifest"))
    box1, box2 = boxes("box-1"), boxes("box-2")
    digest = os.urandom(16)
    redeem1 = record(1, "box-1", action="redeem", digest=digest, uses=1, uses_left=0)
    redeem2 = record(1, "box-2", action="redeem", digest=digest, uses=1, uses_left=0)
    box1.send([redeem1])
    wait_until(box1.acks, "box-1 acked")
    box2.send([redeem2])
    wait_until(box2.acks, "box-2 acked")

    conflict = wait_until(
        lambda: next((x for x in collector.lines if x.startswith("CONFLICT")), None), "conflict"
    )
    assert digest.hex() in conflict and redeem1["id"] in conflict and redeem2["id"] in conflict
    store = Store.open(backend_dir)
    try:
        [flagged] = store.conflicts()
        assert (flagged.first_box, flagged.second_box) == ("box-1", "box-2")
    finally:
        store.close()

    seq = first.seq + 1
    chunks = wait_until(
        lambda: watcher.messages(lambda t: t == f"{PREFIX}/demo/batches/{seq}"), "consumed batch"
    )
    assembler = ChunkAssembler(keystore_roots)
    result = [assembler.add(payload) for _, payload in chunks][-1]
    assert result is not None and result.header.kind is Kind.CONSUMED
    assert sorted(result.consumed_entries()) == sorted(
        [
            (digest, uuid.UUID(redeem1["id"]).bytes, 1, 0),
            (digest, uuid.UUID(redeem2["id"]).bytes, 1, 0),
        ]
    )

    def manifest_at_seq():
        for _, payload in watcher.messages(lambda t: t.endswith("/manifest")):
            if manifest.open_manifest(payload, keystore_roots).latest_seq == seq:
                return True

    wait_until(manifest_at_seq, "manifest moved to the consumed batch")
    # A third redemption of an ordinary check does not count as a conflict.
    box1.send([record(2, "box-1", digest=digest)])
    wait_until(lambda: len(box1.acks()) == 2, "box-1 second ack")
    assert sum(line.startswith("CONFLICT") for line in collector.lines) == 1


def test_collect_cli_stores_and_acks_and_carries_on_after_a_broker_restart(
    backend_dir,
    broker,  # noqa: F811
    boxes,
):
    process = CliProcess("collect", "--dir", str(backend_dir), "--broker", broker.url)
    try:
        process.wait_line(lambda line: line.startswith("connected to"), "connected")
        box = boxes("box-1")
        box.send([record(1, "box-1"), record(2, "box-1")])
        wait_until(lambda: {"v": 1, "upto": 2, "ids": []} in box.acks(), "ack upto 2")

        broker.restart(persistence=False)
        process.wait_line(lambda line: line.startswith("reconnected to"), "collector reconnected")
        wait_until(box.client.is_connected, "box reconnected")
        wait_until(box.subscribed.is_set, "box subscribed")
        # The box resends until acked, as a real box does after a reconnect.
        third = record(3, "box-1")

        def acked_upto_3():
            box.send([third])
            return wait_for_ack(box, 3)

        wait_until(acked_upto_3, "ack upto 3 after the restart")
        assert [row[1] for row in stored(backend_dir)] == [1, 2, 3]
        assert any("stored demo/box-1 3..3: 1 new" in line for line in process.lines)
    finally:
        assert process.stop() == 0


def wait_for_ack(box: FakeBox, upto: int) -> bool:
    try:
        wait_until(lambda: any(a["upto"] == upto for a in box.acks()), "ack", timeout=2)
    except AssertionError:
        return False
    return True


def test_events_from_a_box_the_backend_does_not_know_are_refused_counted_and_never_acked(
    collector, boxes, backend_dir
):
    stranger = boxes("box-9")  # not registered
    stranger.send([record(1, "box-9")])
    stranger.send([record(2, "box-9")])
    known = boxes("box-1")
    known.send([record(1, "box-1")])  # a marker: the collector handled what came before
    wait_until(known.acks, "the registered box's ack")
    refused = [line for line in collector.lines if line.startswith("REFUSED events")]
    # Said once (not once per resend), with what to do; both messages counted.
    assert len(refused) == 1, collector.lines
    assert "box box-9 is not registered" in refused[0]
    assert "redeemd-backend box add" in refused[0] and "--merchant demo box-9" in refused[0]
    assert collector.refused["demo/box-9"] == 2
    assert stranger.acks() == []
    assert [row[0] for row in stored(backend_dir)] == ["box-1"]


def test_events_of_a_box_under_another_merchant_are_refused_and_never_acked(
    collector,
    broker,
    backend_dir,  # noqa: F811
):
    # box-1 belongs to demo; it writes "accepted" records into merchant other's ledger.
    forger = FakeBox(broker.port, "box-1", merchant="other")
    try:
        forged = {**record(1, "box-1"), "merchant": "other"}
        forger.send([forged])
        wait_until(lambda: collector.refused["other/box-1"] == 1, "the refusal counted")
        [line] = [x for x in collector.lines if x.startswith("REFUSED events from other/box-1")]
        assert "registered for merchant demo, not other" in line and "box acl" in line
        assert forger.acks() == []
        assert stored(backend_dir) == []
    finally:
        forger.close()


def test_a_box_registered_later_has_its_resent_records_stored(collector, boxes, backend_dir):
    late = boxes("box-7")
    records = [record(1, "box-7")]
    late.send(records)
    wait_until(lambda: collector.refused["demo/box-7"] == 1, "refused while unregistered")
    register(backend_dir, "demo", "box-7")
    late.send(records)  # the box resends what was not acked
    wait_until(late.acks, "acked once registered")
    assert late.acks() == [{"v": 1, "upto": 1, "ids": []}]
    assert stored(backend_dir) == [("box-7", 1, records[0]["id"])]


def test_records_sent_while_the_collector_line_is_cut_arrive_through_its_kept_session(
    backend_dir,
    broker,  # noqa: F811
    boxes,
):
    proxy = TcpProxy(broker.port).start()
    lines: list[str] = []
    collector = Collector(backend_dir, proxy.url, say=lines.append, client_id="kept")
    collector.start()
    try:
        wait_until(collector.link.connected.is_set, "collector connected")
        box = boxes("box-1")
        box.send([record(1, "box-1")])
        wait_until(lambda: any(a["upto"] == 1 for a in box.acks()), "record 1 acked")
        assert proxy.cut() == 1
        # FakeBox never resends: the broker keeps them for the collector's session.
        for seq in (2, 3, 4):
            box.send([record(seq, "box-1")])
        wait_until(lambda: any(a["upto"] == 4 for a in box.acks()), "records 2..4 acked")
        assert [seq for _, seq, _ in stored(backend_dir)] == [1, 2, 3, 4]
        assert any(line.startswith("reconnected to") for line in lines), lines
    finally:
        collector.stop()
        proxy.stop()
