"""A fleet against a real broker that fails: nothing lost, nothing counted twice.

Everything here is the real thing: a Mosquitto started for the test (stopped, restarted
without persistence, with a small `max_queued_messages`), `redeemd run` daemon processes
fed scans on stdin, and the reference backend's `redeemd-backend publish` and `collect`
processes on one backend directory, which also issued every batch the boxes hold. A
small TCP proxy (tests/tcp_proxy.py) sits between a box and the broker where a test
cuts the line. The checks read the boxes' databases and backend.db directly.
Nothing waits for a fixed time: every check waits for a condition, generously.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import random
import time
import uuid

import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import wait_for
from fleet import CODES, Fleet, FleetBox
from tcp_proxy import TcpProxy

WAIT = 120.0
CODES = 1200


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def codes(first: int, last: int) -> list[str]:
    return [f"FLEET-{i:04d}" for i in range(first, last + 1)]


# ---------------------------------------------------------------------- scenarios


def test_scans_on_two_boxes_reach_the_collector_acked_and_both_outboxes_empty(fleet):
    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    a, b = fleet.box("box-a"), fleet.box("box-b")
    run_a, run_b = fleet.run(a), fleet.run(b)
    run_a.scan(*codes(1, 10), "NOPE-0001")
    run_b.scan(*codes(11, 20))
    verdicts_a, verdicts_b = run_a.wait_verdicts(11), run_b.wait_verdicts(10)
    assert [v["verdict"] for v in verdicts_a] == ["accepted"] * 10 + ["rejected"]
    assert all(v["verdict"] == "accepted" for v in verdicts_b)

    for box in (a, b):
        wait_for(lambda box=box: fleet.all_collected(box), f"{box.id} collected and acked")
    assert [seq for seq, _ in fleet.collected(a)] == list(range(1, 12))
    assert [seq for seq, _ in fleet.collected(b)] == list(range(1, 11))
    printed = {v["record_id"] for v in verdicts_a + verdicts_b}
    stored = {rid for box in (a, b) for _, rid in fleet.collected(box)}
    assert printed == stored
    assert fleet.query("SELECT COUNT(*) FROM gaps") == [(0,)]
    wait_for(
        lambda: any(f"stored demo/{b.id}" in line for line in collector.lines),
        "the collector saying what it stored",
    )


def test_a_thousand_scans_while_the_broker_is_down_all_arrive_once_and_in_order(fleet):
    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    # The box reaches the broker through a proxy so that, when the broker comes back, the
    # box is let in only after the collector has subscribed again: the collector's session
    # may have expired while the broker was down (its expiry is 30 s, and 1000 scans on a
    # loaded machine take longer), and what a box publishes before anyone subscribes is
    # dropped by the broker and comes back only with the box's rewind, above a gap.
    proxy = TcpProxy(fleet.broker.port).start()
    try:
        box = fleet.box("box-a", broker_url=proxy.url)
        daemon = fleet.run(box)
        wait_for(lambda: fleet.query("SELECT COUNT(*) FROM boxes") == [(0,)], "backend up")
        wait_for(proxy.open_connections, "the box connecting through the proxy")
        proxy.hold()
        fleet.broker.stop()
        rng = random.Random(4)
        scans = codes(1, 600) + [f"NOPE-{i:04d}" for i in range(400)]
        rng.shuffle(scans)
        daemon.scan(*scans)
        verdicts = daemon.wait_verdicts(1000)
        assert sum(v["verdict"] == "accepted" for v in verdicts) == 600
        assert box.outbox() == 1000, "the outbox keeps every record while the broker is down"

        connects = sum("connected to" in line for line in collector.lines)
        fleet.broker.start()
        wait_for(
            lambda: sum("connected to" in line for line in collector.lines) > connects,
            "the collector connected again",
        )
        proxy.release()
        wait_for(lambda: fleet.all_collected(box), "all 1000 records collected and acked")
    finally:
        proxy.stop()
    assert [seq for seq, _ in fleet.collected(box)] == list(range(1, 1001))
    # The collector opens a gap whenever a record arrives above a hole: none means every
    # record came in box-sequence order.
    assert fleet.query("SELECT COUNT(*) FROM gaps") == [(0,)]
    assert fleet.query("SELECT upto, max_seq FROM boxes WHERE box = 'box-a'") == [(1000, 1000)]


def test_cut_connections_a_broker_restart_without_persistence_and_kill_9_lose_nothing(fleet):
    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    proxy = TcpProxy(fleet.broker.port).start()
    try:
        box = fleet.box("box-a", broker_url=proxy.url)
        daemon = fleet.run(box)
        printed: list[dict] = []
        stream = iter(codes(1, CODES))
        rng = random.Random(9)

        def scan_burst(n: int) -> None:
            daemon.scan(*(next(stream) for _ in range(n)))
            time.sleep(rng.uniform(0.05, 0.3))

        # Connections cut again and again while scans stream and records go up.
        for _ in range(8):
            wait_for(proxy.open_connections, "the box connecting through the proxy")
            scan_burst(15)
            proxy.cut()
        scan_burst(60)
        daemon.wait_verdicts(180)
        # The broker restarted without persistence in the middle of the stream: whatever
        # it held for the collector is gone; the outbox still has it.
        scan_burst(20)
        fleet.broker.restart(persistence=False)
        scan_burst(20)
        daemon.wait_verdicts(220)
        # kill -9 while the pump is publishing: a burst, then the kill at once.
        scan_burst(40)
        daemon.kill()
        printed += daemon.verdicts
        daemon = fleet.run(box)
        scan_burst(30)
        daemon.wait_verdicts(30)
        printed += daemon.verdicts

        wait_for(lambda: fleet.all_collected(box), "every ledger record collected after it all")
        ledger = box.ledger()
        assert [seq for seq, _ in ledger] == list(range(1, len(ledger) + 1)), "no gaps"
        assert len(ledger) >= 250
        stored = {rid for _, rid in fleet.collected(box)}
        accepted = {v["record_id"] for v in printed if v["verdict"] == "accepted"}
        assert accepted <= stored, "every accepted verdict shown reached the backend"
        assert fleet.query("SELECT COUNT(*) FROM events WHERE box = 'box-a'") == [(len(ledger),)], (
            "each record stored once"
        )
        assert fleet.query("SELECT COUNT(*) FROM gaps WHERE filled_at IS NULL") == [(0,)]
        assert proxy.cuts >= 8
    finally:
        proxy.stop()


def test_a_box_offline_while_three_batches_are_issued_catches_up_through_the_manifest(fleet):
    # The broker would queue at most 2 messages for a client that is away; the three
    # batches are 3 x several chunks. The box must pull them, not wait to be sent them.
    fleet.broker.max_queued = 2
    fleet.broker.restart()
    publisher = fleet.publisher()
    publisher.wait_line(lambda line: "manifest demo: latest_seq 2" in line, "manifest 2")
    box = fleet.box("box-a")
    daemon = fleet.run(box)
    wait_for(
        lambda: json.loads(box.cli("status", "--json").stdout)["broker_connected"], "the box online"
    )
    assert daemon.stop() == 0

    revoke, block = fleet.dir / "revoke.csv", fleet.dir / "block.csv"
    revoke.write_text("code\nFLEET-0001\n")
    block.write_text("code\nFLEET-0002\n")
    fresh = fleet.dir / "fresh.csv"
    fresh.write_text("code,card_id\n" + "".join(f"FRESH-{i:04d},1\n" for i in range(300)))
    fleet.issue("revoke", revoke)
    fleet.issue("block", block)
    fleet.issue("issue", fresh, "--chunk-size", "2048")
    publisher.wait_line(lambda line: "manifest demo: latest_seq 5" in line, "manifest 5")

    daemon = fleet.run(box)
    wait_for(lambda: box.cache_seq() == 5, "the box catching up to batch 5")
    publisher.wait_line(lambda line: "resent demo 3..5 to box-a" in line, "the resend")
    daemon.scan("FLEET-0001", "FLEET-0002", "FRESH-0123", "FLEET-0003")
    verdicts = daemon.wait_verdicts(4)
    assert [v.get("reason", v["verdict"]) for v in verdicts] == [
        "revoked",
        "blocked",
        "accepted",
        "accepted",
    ]


def test_one_code_redeemed_on_two_offline_boxes_is_flagged_and_every_box_learns_it(fleet):
    collector, publisher = fleet.collector(), fleet.publisher()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    publisher.wait_line(lambda line: "manifest demo: latest_seq 2" in line, "manifest 2")
    fleet.broker.stop()
    a, b, c = fleet.box("box-a"), fleet.box("box-b"), fleet.box("box-c")
    run_a, run_b, run_c = fleet.run(a), fleet.run(b), fleet.run(c)
    run_a.scan("FLEET-0007")
    run_b.scan("FLEET-0007")
    first_a, first_b = run_a.wait_verdicts(1)[0], run_b.wait_verdicts(1)[0]
    assert first_a["verdict"] == first_b["verdict"] == "accepted", "offline, both accept"

    fleet.broker.start()
    conflict = wait_for(
        lambda: fleet.query("SELECT first_box, second_box, consumed_seq FROM conflicts"),
        "the conflict flagged",
    )[0]
    assert sorted(conflict[:2]) == ["box-a", "box-b"]
    collector.wait_line(lambda line: line.startswith("CONFLICT demo"), "the CONFLICT line")
    for box in (a, b, c):
        wait_for(lambda box=box: box.cache_seq() == conflict[2], f"{box.id} applied the batch")

    # Each of the two boxes has recorded the other's redemption; the third box refuses it.
    def seen(box: FleetBox) -> set[str]:
        return {str(uuid.UUID(bytes=r)) for (r,) in box.query("SELECT * FROM consumed_seen")}

    assert first_b["record_id"] in seen(a) and first_a["record_id"] in seen(b)
    run_c.scan("FLEET-0007")
    assert run_c.wait_verdicts(1)[0]["reason"] == "already_redeemed"
    for box in (a, b):
        wait_for(lambda box=box: fleet.all_collected(box), f"{box.id} records acked")
