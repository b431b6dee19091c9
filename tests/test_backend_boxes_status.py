"""Box liveness and lag as data: real boxes' retained statuses, through a real collector,
answered by `redeemd-backend boxes` (issue 14.3).

Everything is the real thing: a Mosquitto started for the test, `redeemd run` box
processes (status every 1 s, keepalive 5 s), the `redeemd-backend collect` process and
the `boxes` command run as the operator runs it. Waits are for conditions in backend.db,
never for a time.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from backend_helpers import FakeBox, make_backend, register
from broker import broker  # noqa: F401  (fixture)
from conftest import ROOT, wait_for
from fleet import Fleet, backend_cli

from backend.box_status import StatusError, parse_status


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def boxes(fleet: Fleet, *flags: str) -> dict[str, dict]:
    """`redeemd-backend boxes --json` with `flags`: {box: entry}."""
    out = backend_cli("boxes", "--dir", str(fleet.backend), "--json", *flags).stdout
    return {entry["box"]: entry for entry in json.loads(out)["boxes"]}


def status(fleet: Fleet, box: str) -> tuple | None:
    rows = fleet.query(
        "SELECT state, cache_seq, outbox_depth FROM box_status WHERE box = ?", box
    )  # fmt: skip
    return rows[0] if rows else None


def test_boxes_shows_who_is_online_behind_offline_and_holding_records(fleet):
    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    a, b = fleet.box("box-a"), fleet.box("box-b")
    backend_cli("box", "add", "--dir", str(fleet.backend), "--merchant", "demo", "box-never")
    run_a, run_b = fleet.run(a), fleet.run(b)

    # Both boxes' statuses land in the store: online, batches 1-2 applied, nothing waiting.
    for box in (a, b):
        wait_for(lambda box=box: status(fleet, box.id) == ("online", 2, 0), f"{box.id} online")
    listed = boxes(fleet)
    assert set(listed) == {"box-a", "box-b", "box-never"}
    assert {k: listed["box-a"][k] for k in ("state", "cache_seq", "latest_seq", "behind")} == {
        "state": "online", "cache_seq": 2, "latest_seq": 2, "behind": 0,
    }  # fmt: skip
    assert (listed["box-a"]["outbox_depth"], listed["box-a"]["last_seen"] is not None) == (0, True)
    assert listed["box-never"]["state"] == "never_seen"
    assert listed["box-never"]["cache_seq"] is None
    human = backend_cli("boxes", "--dir", str(fleet.backend)).stdout
    assert "never seen" in human and "2/2" in human, human

    # Junk on a registered box's status topic, and a status of a box nobody registered:
    # each refused with a line, and the collector carries on.
    stranger = FakeBox(fleet.broker.port, "box-x")
    try:
        stranger.client.publish(
            "redeemd/v1/demo/box/box-b/status", b"{not json", qos=1
        ).wait_for_publish(10)
        stranger.client.publish(
            "redeemd/v1/demo/box/box-x/status", b'{"v":1,"box":"box-x","state":"offline"}', qos=1
        ).wait_for_publish(10)
    finally:
        stranger.close()
    collector.wait_line(lambda line: "refused the status of demo/box-b: not JSON" in line, "junk")
    collector.wait_line(lambda line: "ignored the status of demo/box-x" in line, "stranger")
    assert fleet.query("SELECT count(*) FROM box_status WHERE box = 'box-x'") == [(0,)]

    # A batch issued that the boxes have not got (no publisher runs): both are behind.
    revoke = fleet.dir / "revoke.csv"
    revoke.write_text("code\nFLEET-0999\n")
    fleet.issue("revoke", revoke)
    behind = boxes(fleet, "--behind")
    assert sorted(behind) == ["box-a", "box-b"], "never seen is not known to be behind"
    assert behind["box-a"]["behind"] == 1 and behind["box-a"]["latest_seq"] == 3

    # kill -9: the broker publishes box-b's last will, the collector records it offline.
    run_b.kill()
    wait_for(lambda: status(fleet, "box-b") == ("offline", 2, 0), "box-b's last will stored")
    collector.wait_line(lambda line: "box demo/box-b offline: its last will" in line, "will line")
    offline = boxes(fleet, "--offline")
    assert sorted(offline) == ["box-b", "box-never"]
    assert offline["box-b"]["cache_seq"] == 2, "the will keeps what the box said last"
    assert boxes(fleet, "--offline", "1h") == {}, "nobody has been away an hour"

    # Records scanned while no collector runs stay in box-a's outbox; it stops cleanly
    # holding them, and the next collector learns that from its retained status.
    collector.stop()
    run_a.scan("FLEET-0001", "FLEET-0002", "FLEET-0003")
    assert [v["verdict"] for v in run_a.wait_verdicts(3)] == ["accepted"] * 3
    assert run_a.stop() == 0
    assert a.outbox() == 3
    fleet.collector()
    wait_for(lambda: status(fleet, "box-a") == ("offline", 2, 3), "box-a's stop status stored")
    holding = boxes(fleet, "--holding")
    assert list(holding) == ["box-a"]
    assert holding["box-a"]["outbox_depth"] == 3
    assert holding["box-a"]["outbox_oldest_age_s"] is not None
    assert list(boxes(fleet, "--holding", "--behind", "--merchant", "demo")) == ["box-a"]
    assert boxes(fleet, "--holding", "--merchant", "other") == {}
    human = backend_cli("boxes", "--dir", str(fleet.backend), "--holding").stdout
    assert "box-a" in human and "3 (oldest" in human and "box-b" not in human, human


GOOD = {
    "v": 1, "box": "box-1", "state": "online", "version": "0.1.0", "at": 1_780_000_000,
    "cache_seq": 2, "cache_age_s": 5, "outbox_depth": 0, "outbox_oldest_age_s": None,
    "publish_error": None, "drivers": [], "alarm": None, "stuck": None, "manifests_ignored": 0,
}  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (json.dumps({**GOOD, "v": 2}).encode(), "this backend reads v=1"),
        (json.dumps({**GOOD, "box": "box-2"}).encode(), "does not match the topic's box"),
        (json.dumps({**GOOD, "state": "asleep"}).encode(), "not online or offline"),
        (json.dumps({**GOOD, "cache_seq": "7"}).encode(), "cache_seq must be an integer"),
        (json.dumps({**GOOD, "outbox_depth": -1}).encode(), "outbox_depth must be an integer"),
        (json.dumps({**GOOD, "cache_age_s": 1.5}).encode(), "cache_age_s must be an integer"),
        (json.dumps({**GOOD, "stuck": 3}).encode(), "stuck must be a string"),
        (json.dumps({**GOOD, "drivers": [{"kind": "hid"}]}).encode(), "drivers must be"),
        (b'{"v":1,"box":"box-1","state":"online"}', "must be the last will"),
    ],
)
def test_a_bad_status_is_refused_saying_what_is_wrong(payload: bytes, why: str):
    with pytest.raises(StatusError, match=why):
        parse_status(payload, "box-1")


def test_a_status_with_members_this_backend_does_not_know_is_read():
    later = parse_status(json.dumps({**GOOD, "battery": 80}).encode(), "box-1")
    assert (later.state, later.cache_seq, later.will) == ("online", 2, False)


def test_boxes_tells_the_operator_when_nothing_is_registered_matches_or_a_merchant_is_unknown(
    tmp_path,
):
    directory = tmp_path / "backend"
    make_backend(directory)
    empty = backend_cli("boxes", "--dir", str(directory)).stdout
    assert "no boxes registered: redeemd-backend box add" in empty
    register(directory, "demo", "box-1")
    assert "none of the 1 registered box(es) match" in (
        backend_cli("boxes", "--dir", str(directory), "--holding").stdout
    )
    unknown = subprocess.run(
        [sys.executable, "-m", "backend.cli", "boxes", "--dir", str(directory), "--merchant", "acme"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert unknown.returncode == 1
    assert "no box is registered for merchant acme (merchants: demo)" in unknown.stderr
