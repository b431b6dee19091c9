"""Dispensing grants and dispense records over MQTT, against a real Mosquitto.

The box side is the real `sync.worker.Sync` beside a real Engine, as in
test_sync_box.py; the "backend" is a plain paho client publishing grant sets
(cards/grant.py) retained on the box's `grants` topic and reading its events and
status, which are checked against the published JSON Schemas (docs/schemas/).
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import CREATED, make_keyset, wait_for
from test_message_schemas import problems
from test_sync_box import BOX, Backend, start_daemon, sync_box

from cards import grant, keys
from cards.grant import Grant
from cards.scan import Scan
from daemon import box_key as box_key_file
from daemon.box_key import BoxKey
from daemon.engine import Engine
from storage import dispensing
from storage.database import connect, open_database
from sync.worker import Sync

GRANTS = f"{BOX}/grants"
COFFEE = Grant("00000000000000aa", (1,), 5, CREATED - 10, 2_000_000_000)
TICKETS = Grant("00000000000000bb", (2, 3), 2, CREATED - 10, 2_000_000_000)


@pytest.fixture
def backend(broker):
    instance = Backend(broker.port)
    yield instance
    instance.close()


@pytest.fixture
def box_private() -> bytes:
    return keys.new_private_key()


def scan(code: str) -> Scan:
    return Scan(code=code.encode(), source="counter", at=time.time())


def grant_set(keyset, box_private: bytes, seq: int, *grants: Grant, **kw) -> bytes:
    return grant.build(
        keyset.issuer_private, keyset.delegation, merchant=kw.get("merchant", "demo"),
        box=kw.get("box", "box-1"), box_public=keys.public_of(box_private), seq=seq,
        created_at=CREATED + seq, grants=grants,
    )  # fmt: skip


class Running:
    """The box's real sync, given its box key as the daemon gives it, beside a real
    engine; a reader connection for the test's own looks."""

    def __init__(self, box, box_private: bytes):
        config = box.config
        self.box = box
        self.config = config
        self.public = keys.public_of(box_private)
        self.engine = Engine(open_database(box.database), config)
        self.reader = connect(box.database)
        self.sync = Sync(
            config.sync, box=config.box.id, merchant=config.box.merchant,
            database=config.box.database, roots=config.trust.root_keys,
            max_batch_bytes=config.trust.max_batch_bytes, box_key=self.public,
        )  # fmt: skip
        self.sync.start()

    def held_seq(self) -> int | None:
        return dispensing.held_seq(self.reader)

    def stop(self) -> None:
        assert self.sync.stop(timeout=10), "sync did not stop"
        self.engine.conn.close()
        self.reader.close()


@pytest.fixture
def running():
    started: list[Running] = []

    def make(box, box_private: bytes) -> Running:
        started.append(Running(box, box_private))
        return started[-1]

    yield make
    for instance in started:
        instance.stop()


def statuses_with(backend: Backend, what: str, check) -> dict:
    found = wait_for(lambda: [s for s in backend.statuses() if check(s)], what)
    return found[-1]


def grant_rows(status: dict) -> dict[str, dict]:
    return {g["id"]: g for g in status.get("dispensing", {}).get("grants", [])}


def test_a_retained_grant_set_published_before_the_box_connects_is_installed_and_shown(
    tmp_path, keyset, broker, backend, running, box_private
):
    box = sync_box(tmp_path, keyset, broker)
    backend.publish(GRANTS, grant_set(keyset, box_private, 3, COFFEE, TICKETS), retain=True)
    run = running(box, box_private)
    wait_for(lambda: run.held_seq() == 3, "the retained grant set installed")
    wait_for(lambda: run.sync.state().grant_seq == 3, "grant_seq in the sync state")
    held = dispensing.held_grants(run.reader, keyset.roots)
    assert [g.id for g in held.grants] == [COFFEE.id, TICKETS.id]

    status = statuses_with(
        backend, "a status with the grant set", lambda s: s.get("dispensing", {}).get("grant_seq")
    )
    assert problems("status", status) == []
    assert status["box_key"] == {
        "key_id": keys.key_id(run.public),
        "public_key": keys.b64(run.public),
    }
    assert grant_rows(status) == {
        COFFEE.id: {"id": COFFEE.id, "cards": [1], "quota": 5, "used": 0,
                    "not_after": COFFEE.not_after, "revoked": False},
        TICKETS.id: {"id": TICKETS.id, "cards": [2, 3], "quota": 2, "used": 0,
                     "not_after": TICKETS.not_after, "revoked": False},
    }  # fmt: skip
    assert run.sync.state().grants_refused == 0 and run.sync.state().last_grants_refused is None


def test_a_newer_set_replaces_the_held_one_and_a_revoked_grant_shows_revoked(
    tmp_path, keyset, broker, backend, running, box_private
):
    box = sync_box(tmp_path, keyset, broker)
    run = running(box, box_private)
    wait_for(lambda: run.sync.state().connected, "sync connected")
    backend.publish(GRANTS, grant_set(keyset, box_private, 1, COFFEE, TICKETS), retain=True)
    wait_for(lambda: run.held_seq() == 1, "set 1 installed")
    backend.publish(
        GRANTS, grant_set(keyset, box_private, 2, replace(COFFEE, revoked=True), TICKETS),
        retain=True,
    )  # fmt: skip
    wait_for(lambda: run.held_seq() == 2, "set 2 installed")
    held = dispensing.held_grants(run.reader, keyset.roots)
    assert held.find(COFFEE.id).revoked and not held.find(TICKETS.id).revoked
    status = statuses_with(
        backend, "a status with set 2", lambda s: s.get("dispensing", {}).get("grant_seq") == 2
    )
    assert problems("status", status) == []
    rows = grant_rows(status)
    assert rows[COFFEE.id]["revoked"] is True and rows[TICKETS.id]["revoked"] is False
    assert run.sync.grants.installed == 2


def test_an_older_a_forged_and_another_boxs_set_are_refused_logged_once_and_sync_goes_on(
    tmp_path, keyset, broker, backend, running, box_private, caplog
):
    box = sync_box(tmp_path, keyset, broker, sync='request_retry = "1h"')
    run = running(box, box_private)
    current = grant_set(keyset, box_private, 5, COFFEE)
    backend.publish(GRANTS, current, retain=True)
    wait_for(lambda: run.held_seq() == 5, "set 5 installed")
    stored = run.reader.execute("SELECT raw FROM grant_set").fetchone()[0]

    stranger = make_keyset()
    refused = {
        "older": grant_set(keyset, box_private, 4, TICKETS),
        "forged": grant_set(stranger, box_private, 9, TICKETS),
        "another box key": grant_set(keyset, keys.new_private_key(), 9, TICKETS),
        "another box": grant_set(keyset, box_private, 9, TICKETS, box="box-2"),
        "garbage": b"RDG1\x00\x00\x00\x05{}",
    }
    with caplog.at_level(logging.WARNING, logger="redeemd.sync"):
        for payload in refused.values():
            backend.publish(GRANTS, payload)
        wait_for(lambda: run.sync.state().grants_refused == len(refused), "five refusals")
        # The same bytes again (a retained set redelivered): neither logged nor counted.
        backend.publish(GRANTS, refused["older"])
        backend.publish(GRANTS, refused["forged"])
        sent_before = run.sync.state().events_messages or 0
        assert run.engine.handle(scan("DEMO-0002")).accepted
        wait_for(
            lambda: (run.sync.state().events_messages or 0) > sent_before,
            "events still sent after the refusals",
        )
    warnings = [r.getMessage() for r in caplog.records if "refused the grant set" in r.getMessage()]
    assert len(warnings) == len(refused), warnings
    assert any("older than the set held" in w for w in warnings)
    assert any("box key" in w and "redeemd box-key" in w for w in warnings)
    assert any("box 'box-2'" in w for w in warnings)
    assert run.sync.state().grants_refused == len(refused)
    assert run.held_seq() == 5
    assert run.reader.execute("SELECT raw FROM grant_set").fetchone()[0] == stored
    assert run.sync.state().connected and run.sync.thread.is_alive()

    # A reconnection redelivers the retained set held: a no-op, logged no more.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="redeemd.sync"):
        backend.close()
        broker.restart()
        wait_for(lambda: run.sync.session.connects >= 2, "sync connected again")
        backend.connect()
        backend.publish(GRANTS, current)  # and once more, for certain
        wait_for(lambda: run.sync.state().last_grants_refused is None, "the held set seen again")
    assert run.sync.grants.installed == 1
    assert not [r for r in caplog.records if "grant set" in r.getMessage()]


def test_dispense_records_go_up_with_their_grant_and_counter(
    tmp_path, keyset, broker, backend, running, box_private
):
    box = sync_box(tmp_path, keyset, broker)
    run = running(box, box_private)
    backend.publish(GRANTS, grant_set(keyset, box_private, 1, COFFEE, TICKETS), retain=True)
    wait_for(lambda: run.held_seq() == 1, "set 1 installed")
    box_key = BoxKey(box_private, run.public, keys.key_id(run.public))
    # Three asked for under a quota of two: two codes and a refusal, each a record.
    dispensed = run.engine.dispense(2, 3, box_key)
    assert [(c.grant_id, c.counter) for c in dispensed.claims] == [(TICKETS.id, 1), (TICKETS.id, 2)]
    assert dispensed.refused is not None and dispensed.refused.reason.value == "quota_exhausted"
    assert run.engine.handle(scan("DEMO-0001")).accepted
    wait_for(lambda: len(backend.seqs()) >= 4, "four records on the events topic")
    for message in backend.on(f"{BOX}/events"):
        assert problems("events", json.loads(message)) == []
    records = [r for m in backend.events() for r in m]
    assert [(r["action"], r.get("grant_id"), r.get("counter")) for r in records] == [
        ("dispense", TICKETS.id, 1),
        ("dispense", TICKETS.id, 2),
        ("reject", None, None),
        ("redeem", None, None),
    ]
    assert "grant_id" not in records[3] and "counter" not in records[3]
    status = statuses_with(
        backend, "a status counting the dispensed codes",
        lambda s: grant_rows(s).get(TICKETS.id, {}).get("used") == 2,
    )  # fmt: skip
    assert grant_rows(status)[COFFEE.id]["used"] == 0
    assert problems("status", status) == []


def test_the_events_schema_holds_grant_and_counter_to_dispense_records():
    record = {
        "seq": 1, "id": "0196f3a0-0000-7000-8000-000000000000", "at_ms": 1, "box": "box-1",
        "merchant": "demo", "store": "store-1", "digest": "00" * 16, "card_id": 1,
        "action": "dispense", "uses": None, "amount": None, "uses_left": None,
        "balance": None, "verdict": "accepted", "reason": None, "source": "api",
        "symbology": None, "operator": None, "cache_seq": 2, "reverses": None,
        "grant_id": COFFEE.id, "counter": 1,
    }  # fmt: skip

    def events(r: dict) -> dict:
        return {"v": 1, "box": "box-1", "records": [r]}

    assert problems("events", events(record)) == []
    bare = {k: v for k, v in record.items() if k not in ("grant_id", "counter")}
    assert problems("events", events(bare)), "a dispense record names its grant and counter"
    assert problems("events", events({**record, "counter": 0}))
    assert problems("events", events({**record, "grant_id": "XYZ"}))
    assert problems("events", events({**record, "action": "redeem"})), "only dispense has them"
    assert problems("events", events({**bare, "action": "redeem"})) == []


def test_a_box_without_a_key_refuses_grant_sets_until_it_is_given_one(
    tmp_path, keyset, broker, backend, box_private
):
    box = sync_box(tmp_path, keyset, broker)
    config = box.config
    sync = Sync(
        config.sync, box="box-1", merchant="demo", database=config.box.database,
        roots=config.trust.root_keys, max_batch_bytes=config.trust.max_batch_bytes,
    )  # fmt: skip
    backend.publish(GRANTS, grant_set(keyset, box_private, 1, COFFEE), retain=True)
    sync.start()
    try:
        wait_for(lambda: sync.state().grants_refused == 1, "the set refused")
        assert "no box key" in sync.state().last_grants_refused
        status = statuses_with(backend, "a status", lambda s: s.get("state") == "online")
        assert status["box_key"] is None
        assert status["dispensing"] == {"grant_seq": None, "grants": []}
        assert problems("status", status) == []
        # The key given later (a reload): the set refused for want of it is taken at
        # once, without waiting for the broker to deliver it again.
        public = keys.public_of(box_private)
        sync.update_box_key(public)
        reader = connect(box.database)
        try:
            wait_for(lambda: dispensing.held_seq(reader) == 1, "the set installed")
        finally:
            reader.close()
        status = statuses_with(
            backend, "a status with the key and the set",
            lambda s: s.get("box_key") and s["dispensing"]["grant_seq"] == 1,
        )  # fmt: skip
        assert status["box_key"]["key_id"] == keys.key_id(public)
        assert sync.state().last_grants_refused is None
    finally:
        assert sync.stop(timeout=10)


def test_a_running_box_shows_its_key_and_takes_its_grants_from_the_retained_message(
    tmp_path, keyset, broker, backend
):
    """The real `redeemd run`: its retained status names the key the daemon made, a
    backend grants that key, and the box holds the set and says so in its status."""
    box = sync_box(tmp_path, keyset, broker)
    daemon = start_daemon(box)
    try:
        first = statuses_with(
            backend, "the running box's status with its key", lambda s: s.get("box_key")
        )
        assert problems("status", first) == []
        made = box_key_file.load(box.config.box.state_dir)
        assert made is not None, "the daemon made the box key"
        assert first["box_key"] == {"key_id": made.key_id, "public_key": made.public_b64}
        backend.publish(GRANTS, grant_set(keyset, made.private, 7, COFFEE), retain=True)
        status = statuses_with(
            backend, "the grant set in the status",
            lambda s: s.get("dispensing", {}).get("grant_seq") == 7,
        )  # fmt: skip
        assert problems("status", status) == []
        assert [g["id"] for g in status["dispensing"]["grants"]] == [COFFEE.id]

        def local() -> dict:
            return json.loads(box.cli("status", "--json").stdout)["sync"]

        wait_for(lambda: local()["grant_seq"] == 7, "redeemd status showing the grant set")
        assert local()["last_grants_refused"] is None
    finally:
        daemon.terminate()
        daemon.communicate(timeout=60)
