"""The JSON messages on the wire match the schemas published in docs/schemas/.

A backend team validates against docs/schemas/*.schema.json (draft 2020-12) without
reading our code, so the schemas must describe what a real box and the reference
collector really send: here a real `redeemd run` process syncs through a real Mosquitto
with the real `redeemd-backend collect` (scans on stdin, a redemption and its reversal
through the local API), and every events, ack and status message seen
on the broker (the box's own offline status and the broker's last will included) is
validated.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import uuid
from pathlib import Path

import jsonschema
import pytest
from api_helpers import Client
from backend_helpers import FakeBox
from broker import broker  # noqa: F401  (fixture)
from conftest import ROOT, wait_for
from fleet import Fleet

SCHEMAS = ROOT / "docs" / "schemas"
TREE = "redeemd/v1/demo"


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problems(name: str, message: dict) -> list[str]:
    """What is wrong, where: for the status's oneOf (status or last will) the closest
    branch's error rather than 'not valid under any of the given schemas'."""
    found = []
    for error in validator(name).iter_errors(message):
        error = jsonschema.exceptions.best_match([error])
        found.append(f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}")
    return found


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def test_published_schemas_are_valid_draft_2020_12():
    for path in sorted(SCHEMAS.glob("*.schema.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", path.name
        jsonschema.Draft202012Validator.check_schema(schema)
    assert {p.name for p in SCHEMAS.glob("*.schema.json")} >= {
        "events.schema.json",
        "ack.schema.json",
        "status.schema.json",
    }


def test_status_schema_refuses_a_float_time_where_section_1_promises_integers():
    driver = {"name": "stdin", "kind": "stdin", "state": "connected", "message": "",
              "last_scan": 1780000000, "scans": 1, "restarts": 0}  # fmt: skip
    status = {"v": 1, "box": "box-1", "state": "online", "version": "0.1.0", "at": 1780000001,
              "cache_seq": 2, "cache_age_s": 5, "outbox_depth": 0, "outbox_oldest_age_s": None,
              "publish_error": None, "drivers": [driver], "alarm": None, "stuck": None,
              "manifests_ignored": 0, "box_key": None,
              "dispensing": {"grant_seq": None, "grants": []}}  # fmt: skip
    assert problems("status", status) == []
    floated = {**status, "drivers": [{**driver, "last_scan": 1780000000.25}]}
    assert problems("status", floated)
    assert problems("status", {**status, "at": 1780000001.5})


def test_real_events_acks_and_status_messages_match_the_published_schemas(fleet):
    listener = FakeBox(fleet.broker.port, "schema-listener", extra=(f"{TREE}/#",))
    try:
        collector = fleet.collector()
        collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
        socket_path = fleet.dir / "api.sock"
        box = fleet.box("box-1", extra=f'[api]\nsocket = "{socket_path}"\n')
        daemon = fleet.run(box)
        # Accepted, rejected (unknown code), rejected as malformed (no digest).
        daemon.scan("FLEET-0001", "FLEET-0002", "NOPE-0001", "AB\x07CD")
        verdicts = daemon.wait_verdicts(4)
        assert [v["verdict"] for v in verdicts] == ["accepted"] * 2 + ["rejected"] * 2
        # Through the local API: a redemption with an operator, and its reversal.
        wait_for(socket_path.exists, "the local API socket")
        pos = Client(socket_path)
        redeemed = pos.request(
            {"cmd": "redeem", "code": "FLEET-0003", "operator": "anna", "key": str(uuid.uuid4())}
        )
        record_id = redeemed["verdict"]["record_id"]
        reversed_ = pos.request({"cmd": "reverse", "record_id": record_id, "operator": "anna"})
        assert reversed_["verdict"]["action"] == "reverse"
        pos.close()
        wait_for(lambda: fleet.all_collected(box), "every record collected and acked")

        def statuses() -> list[dict]:
            return [
                json.loads(p) for _, p in listener.messages(lambda t: t.endswith("/status")) if p
            ]

        def scanned_status() -> list[dict]:
            return [
                s for s in statuses()
                if s.get("state") == "online" and s["drivers"] and s["drivers"][0]["last_scan"]
                and s["outbox_depth"] == 0
            ]  # fmt: skip

        wait_for(scanned_status, "a status with the scanner's last read and an empty outbox")
        assert daemon.stop() == 0
        wait_for(
            lambda: [s for s in statuses() if s.get("state") == "offline" and "drivers" in s],
            "the box's own offline status",
        )
        # The broker's last will, published when a box vanishes without a clean disconnect.
        before = len(statuses())
        again = fleet.run(box)
        wait_for(
            lambda: [s for s in statuses()[before:] if s.get("state") == "online"], "online again"
        )
        again.kill()
        wait_for(lambda: [s for s in statuses() if set(s) == {"v", "box", "state"}], "last will")

        seen = {"events": [], "ack": [], "status": []}
        for topic, payload in listener.messages(lambda t: t.startswith(f"{TREE}/box/box-1/")):
            kind = topic.rsplit("/", 1)[1]
            if kind in seen and payload:
                seen[kind].append(json.loads(payload))
        for kind, messages in seen.items():
            assert messages, f"no {kind} message seen"
            for message in messages:
                assert problems(kind, message) == [], (kind, message)

        # The box key the daemon made travels in its own status (section 18).
        assert all(s["box_key"]["key_id"] for s in seen["status"] if "drivers" in s)
        # A record not acked within request_retry (2 s here) is sent again, which a loaded
        # machine makes happen: a resent record must be the same record, then count once.
        sent = [r for m in seen["events"] for r in m["records"]]
        by_seq: dict[int, dict] = {}
        for record in sent:
            assert by_seq.setdefault(record["seq"], record) == record, "a resend differs"
        assert list(by_seq)[:6] == [1, 2, 3, 4, 5, 6]
        records = [by_seq[seq] for seq in range(1, 7)]
        assert records[3]["digest"] is None and records[3]["reason"] == "malformed"
        assert (records[4]["action"], records[4]["operator"], records[4]["source"]) == (
            "redeem", "anna", "api")  # fmt: skip
        assert records[5]["action"] == "reverse" and records[5]["reverses"] == record_id
        assert any(a["upto"] >= 6 for a in seen["ack"])
        assert any(a["upto"] >= 4 for a in seen["ack"])
        last_scan = scanned_status()[-1]["drivers"][0]["last_scan"]
        assert type(last_scan) is int
        # Seconds, like every time in the protocol (not milliseconds, not a float).
        assert records[0]["at_ms"] // 1000 - 60 <= last_scan <= records[3]["at_ms"] // 1000 + 60
    finally:
        listener.close()


def test_schemas_named_in_the_protocol_document_exist():
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    for name in ("events", "ack", "status"):
        assert f"schemas/{name}.schema.json" in text
        assert Path(SCHEMAS / f"{name}.schema.json").is_file()
