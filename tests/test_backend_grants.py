"""Dispensing on the backend (issue 12): `redeemd-backend grant` signs each box a grant set
that cards/grant.py opens, allocates set sequences in the database (two processes never
sign one seq twice), publishes the newest set retained to a real Mosquitto; dispense
records are stored with their grant and counter; `dispensing` counts the funnel. Each
store-backed test runs on SQLite and on PostgreSQL."""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from backend_helpers import (
    PREFIX,
    CliProcess,
    boxes,  # noqa: F401  (fixture)
    make_backend,
    record,
    roots,
    wait_until,
)
from broker import Broker, broker  # noqa: F401  (fixture)
from conftest import ROOT
from test_systemd import tool

from backend import box_status, broker_acl, claims, grants
from backend.engines import open_engine
from backend.events import EventError, parse_message
from backend.keystore import Keystore
from backend.store import DATABASE_ENV, STEPS, Store
from cards import claim_code, grant, keys, signed_code
from cards.digest import code_digest

BOX_KEY = keys.new_private_key()
BOX_PUBLIC = keys.public_of(BOX_KEY)
TOPIC = f"{PREFIX}/demo/box/box-1/grants"


@pytest.fixture
def backend_dir(tmp_path, each_store):
    directory = tmp_path / "backend"
    make_backend(directory, boxes=("box-1", "box-2"))
    return directory


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def ok(*args: str) -> str:
    done = cli(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def add(directory, *extra: str, key: bytes | None = BOX_PUBLIC) -> str:
    flags = ["--box-key", keys.b64(key)] if key is not None else []
    return ok("grant", "add", "--dir", str(directory), "--box", "box-1", *flags, *extra)


def grant_id(output: str) -> str:
    return output.split("grant ", 1)[1][:16]


def test_grant_add_signs_a_set_the_box_opens_and_list_shows_it(backend_dir, tmp_path):
    out = tmp_path / "grants.rdg"
    printed = add(backend_dir, "--card", "1,2", "--quota", "5", "--from", "2026-12-24",
                  "--until", "2027-01-10T18:00", "--out", str(out))  # fmt: skip
    assert "not published" in printed and "redeemd grant install" in printed
    opened = grant.open_grants(out.read_bytes(), roots(Keystore(backend_dir)))
    assert (opened.merchant, opened.box, opened.seq) == ("demo", "box-1", 1)
    assert opened.box_key_id == keys.key_id(BOX_PUBLIC)
    assert (
        grant.refusal_for(opened, merchant="demo", box="box-1", box_key_id=keys.key_id(BOX_PUBLIC))
        is None
    )
    (held,) = opened.grants
    assert held.id == grant_id(printed) and held.cards == (1, 2) and held.quota == 5
    assert (held.not_before, held.not_after) == (1_798_070_400, 1_799_604_000)
    assert not held.revoked
    listed = json.loads(ok("grant", "list", "--dir", str(backend_dir), "--json"))
    assert [(g["id"], g["box"], g["cards"], g["revoked_at"]) for g in listed] == [
        (held.id, "box-1", [1, 2], None)
    ]
    table = ok("grant", "list", "--dir", str(backend_dir))
    assert held.id in table and "live" not in table  # starts on 2026-12-24


def test_revoke_signs_a_newer_set_with_the_grant_marked(backend_dir, tmp_path):
    first = grant_id(add(backend_dir, "--card", "1", "--quota", "3"))
    second = grant_id(add(backend_dir, "--card", "2", "--quota", "3"))
    out = tmp_path / "after.rdg"
    printed = ok("grant", "revoke", "--dir", str(backend_dir), first, "--out", str(out))
    assert "revoked" in printed
    opened = grant.open_grants(out.read_bytes(), roots(Keystore(backend_dir)))
    assert opened.seq == 3
    assert {g.id: g.revoked for g in opened.grants} == {first: True, second: False}
    again = cli("grant", "revoke", "--dir", str(backend_dir), first)
    assert again.returncode == 1 and "already revoked" in again.stderr
    unknown = cli("grant", "revoke", "--dir", str(backend_dir), "00" * 8)
    assert unknown.returncode == 1 and "grant list" in unknown.stderr


def status_payload(box: str, key: dict | None) -> bytes:
    return json.dumps({
        "v": 1, "box": box, "state": "online", "at": int(time.time()), "cache_seq": 1,
        "outbox_depth": 0, "box_key": key,
    }).encode()  # fmt: skip


def test_the_box_key_comes_from_the_status_else_the_newest_grant(backend_dir, tmp_path):
    missing = cli("grant", "add", "--dir", str(backend_dir), "--box", "box-1", "--card", "1",
                  "--quota", "1")  # fmt: skip
    assert missing.returncode == 1 and "redeemd box-key" in missing.stderr
    reported = {"key_id": keys.key_id(BOX_PUBLIC), "public_key": keys.b64(BOX_PUBLIC)}
    store = Store.open(backend_dir)
    try:
        status = box_status.parse_status(status_payload("box-1", reported), "box-1")
        store.record_status("demo", "box-1", status, int(time.time()))
    finally:
        store.close()
    out = tmp_path / "g.rdg"
    add(backend_dir, "--card", "1", "--quota", "1", "--out", str(out), key=None)
    opened = grant.open_grants(out.read_bytes(), roots(Keystore(backend_dir)))
    assert opened.box_key_id == keys.key_id(BOX_PUBLIC)
    # The box went away: its last will replaces the status; the newest grant's key is used.
    store = Store.open(backend_dir)
    try:
        will = box_status.parse_status(b'{"v":1,"box":"box-1","state":"offline"}', "box-1")
        store.record_status("demo", "box-1", will, int(time.time()))
    finally:
        store.close()
    add(backend_dir, "--card", "2", "--quota", "1", "--out", str(out), key=None)
    opened = grant.open_grants(out.read_bytes(), roots(Keystore(backend_dir)))
    assert opened.seq == 2 and opened.box_key_id == keys.key_id(BOX_PUBLIC)


def test_a_status_with_a_bad_box_key_is_refused():
    other = keys.public_of(keys.new_private_key())
    wrong_id = {"key_id": keys.key_id(other), "public_key": keys.b64(BOX_PUBLIC)}
    with pytest.raises(box_status.StatusError, match="not the key id"):
        box_status.parse_status(status_payload("b", wrong_id), "b")
    with pytest.raises(box_status.StatusError, match="box_key"):
        box_status.parse_status(status_payload("b", {"key_id": "x", "public_key": "!!"}), "b")
    assert box_status.parse_status(status_payload("b", None), "b").state == "online"
    good = {"key_id": keys.key_id(BOX_PUBLIC), "public_key": keys.b64(BOX_PUBLIC)}
    assert box_status.box_key_of(status_payload("b", good).decode()) == BOX_PUBLIC
    assert box_status.box_key_of('{"v":1,"box":"b","state":"offline"}') is None


def test_a_grant_for_an_unregistered_box_or_with_bad_fields_is_refused(backend_dir):
    unknown = cli("grant", "add", "--dir", str(backend_dir), "--box", "box-9", "--card", "1",
                  "--quota", "1", "--box-key", keys.b64(BOX_PUBLIC))  # fmt: skip
    assert unknown.returncode == 1 and "box add" in unknown.stderr
    for flags, words in (
        (["--quota", "0"], "--quota 0 is out of range"),
        (["--quota", "1", "--from", "2027-01-02", "--until", "2027-01-01"], "before it starts"),
        (["--quota", "1", "--box-key", "AAAA"], "must be 32 bytes"),
    ):
        done = cli("grant", "add", "--dir", str(backend_dir), "--box", "box-1", "--card", "1",
                   *(flags if "--box-key" in flags else [*flags, "--box-key", keys.b64(BOX_PUBLIC)]))  # fmt: skip
        assert done.returncode == 1 and words in done.stderr, done.stderr
    bad_card = cli("grant", "add", "--dir", str(backend_dir), "--box", "box-1", "--card", "x")
    assert bad_card.returncode == 2 and "card ids" in bad_card.stderr
    store = Store.open(backend_dir)
    try:
        assert grants.grants(store) == []
    finally:
        store.close()


def test_processes_granting_at_once_sign_distinct_sequences(backend_dir, tmp_path):
    count = 6
    outs = [tmp_path / f"g{i}.rdg" for i in range(count)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backend.cli",
                "grant",
                "add",
                "--dir",
                str(backend_dir),
                "--box",
                "box-1",
                "--card",
                str(i + 1),
                "--quota",
                "2",
                "--box-key",
                keys.b64(BOX_PUBLIC),
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i, out in enumerate(outs)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
    trusted = roots(Keystore(backend_dir))
    opened = [grant.open_grants(out.read_bytes(), trusted) for out in outs]
    assert sorted(s.seq for s in opened) == list(range(1, count + 1))
    # Each set holds every grant made before it: the allocation and the grant's insert
    # are one transaction, so seq n carries exactly n grants.
    assert sorted(len(s.grants) for s in opened) == list(range(1, count + 1))
    for s in opened:
        assert len(s.grants) == s.seq


class Subscriber:
    """A plain paho client subscribing to one topic, keeping (payload, retain) pairs;
    logged in as (user, password) if given."""

    def __init__(self, port: int, topic: str, login: tuple[str, str] | None = None):
        self.got: list[tuple[bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=login[0] if login else "",
            protocol=mqtt.MQTTv5,
        )
        if login is not None:
            self.client.username_pw_set(*login)
        self.client.on_message = self._message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, f"subscribed to {topic}")

    def _message(self, client, userdata, message) -> None:
        with self.lock:
            self.got.append((message.payload, message.retain))

    def publish(self, topic: str, payload: bytes) -> bool:
        """True if the broker took the message (its PUBACK carries no error)."""
        answered: list[object] = []
        self.client.on_publish = lambda c, u, mid, reason, p: answered.append(reason)
        self.client.publish(topic, payload, qos=1)
        wait_until(lambda: answered, f"the broker's answer to a publish on {topic}")
        return not answered[0].is_failure

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_the_newest_set_is_published_retained_and_reaches_a_subscriber(backend_dir, broker):
    trusted = roots(Keystore(backend_dir))
    first = grant_id(add(backend_dir, "--card", "1", "--quota", "3", "--broker", broker.url))
    # A box connecting later is handed the retained set by the broker.
    box = Subscriber(broker.port, TOPIC)
    try:
        payload, retained = wait_until(lambda: box.got and box.got[0], "the retained grant set")
        assert retained
        opened = grant.open_grants(payload, trusted)
        assert opened.seq == 1 and opened.grants[0].id == first
        printed = ok("grant", "revoke", "--dir", str(backend_dir), first, "--broker", broker.url)
        assert f"to {TOPIC} (retained)" in printed
        wait_until(lambda: len(box.got) >= 2, "the set after the revocation")
        assert grant.open_grants(box.got[1][0], trusted).grants[0].revoked
    finally:
        box.close()
    # Granted without --broker: `grant publish` sends it; --again resends the newest.
    add(backend_dir, "--card", "2", "--quota", "3")
    assert "seq 3" in ok("grant", "publish", "--dir", str(backend_dir), "--broker", broker.url)
    assert "nothing to publish" in ok(
        "grant", "publish", "--dir", str(backend_dir), "--broker", broker.url
    )
    assert "seq 3" in ok(
        "grant", "publish", "--dir", str(backend_dir), "--broker", broker.url, "--again"
    )
    late = Subscriber(broker.port, TOPIC)
    try:
        payload, retained = wait_until(lambda: late.got and late.got[0], "the newest set")
        opened = grant.open_grants(payload, trusted)
        assert retained and opened.seq == 3 and len(opened.grants) == 2
    finally:
        late.close()


def test_an_unreachable_broker_leaves_the_set_stored_for_grant_publish(backend_dir, broker):
    broker.stop()
    done = cli("grant", "add", "--dir", str(backend_dir), "--box", "box-1", "--card", "1",
               "--quota", "1", "--box-key", keys.b64(BOX_PUBLIC), "--broker", broker.url)  # fmt: skip
    assert done.returncode == 1 and "grant publish" in done.stderr
    store = Store.open(backend_dir)
    try:
        (pending,) = grants.newest_sets(store)
        assert pending.seq == 1 and pending.published_at is None
    finally:
        store.close()


def test_the_running_publisher_sends_a_set_the_broker_did_not_get(backend_dir, broker):
    """A set signed while the broker was away goes out with the publisher's next round,
    retained, and is marked published."""
    broker.stop()
    cli("grant", "add", "--dir", str(backend_dir), "--box", "box-1", "--card", "1",
        "--quota", "1", "--box-key", keys.b64(BOX_PUBLIC), "--broker", broker.url)  # fmt: skip
    broker.start()
    publisher = CliProcess(
        "publish", "--dir", str(backend_dir), "--broker", broker.url, "--poll", "0.2s"
    )
    try:
        publisher.wait_line(lambda line: line.startswith("published grant set 1"), "its line")
        box = Subscriber(broker.port, TOPIC)  # a box connecting later: the broker kept it
        try:
            payload, retained = wait_until(lambda: box.got and box.got[0], "the grant set")
            assert retained and grant.open_grants(payload, roots(Keystore(backend_dir))).seq == 1
        finally:
            box.close()
    finally:
        publisher.stop()


def test_the_acl_lets_a_box_read_its_grant_set_and_the_backend_write_it():
    text = broker_acl.render({"box-1": "demo"}, PREFIX, ["redeemd-publish"])
    assert f"topic read {TOPIC}" in text
    assert f"topic write {PREFIX}/+/box/+/grants" in text
    assert text.count("/grants") == 2


def dispense(seq: int, grant: str, counter: int, card: int = 1, box: str = "box-1") -> dict:
    row = record(seq, box, action="dispense", digest=os.urandom(16))
    row.update({"grant_id": grant, "counter": counter, "card_id": card})
    return row


def test_dispense_records_keep_their_grant_and_counter():
    (event,) = parse_message(
        json.dumps({"v": 1, "box": "b", "records": [dispense(1, "ab" * 8, 3, box="b")]}).encode(),
        merchant="demo", box="b",
    )  # fmt: skip
    assert (event.action, event.grant_id, event.counter) == ("dispense", "ab" * 8, 3)
    assert json.loads(event.raw)["grant_id"] == "ab" * 8
    for bad in ({"grant_id": "xyz"}, {"grant_id": 7}, {"counter": -1}, {"counter": True}):
        row = {**dispense(1, "ab" * 8, 3, box="b"), **bad}
        with pytest.raises(EventError):
            parse_message(json.dumps({"v": 1, "box": "b", "records": [row]}).encode(),
                          merchant="demo", box="b")  # fmt: skip


def test_the_funnel_counts_dispensed_claimed_and_redeemed(backend_dir):
    keystore = Keystore(backend_dir)
    code_key = keystore.code_key()
    issuer = keystore.private("issuer")
    store = Store.open(backend_dir)
    try:
        g = grants.add(
            store, keystore, box="box-1", cards=(1, 2), quota=10, not_before=0,
            not_after=int(time.time()) + 86400, box_key=BOX_PUBLIC,
        ).grant  # fmt: skip
        events = [dispense(i, g.id, i, card=1 if i <= 3 else 2) for i in range(1, 5)]
        store.store_events("demo", "box-1", parse_message(
            json.dumps({"v": 1, "box": "box-1", "records": events}).encode(),
            merchant="demo", box="box-1"))  # fmt: skip
        given = []
        for counter, card in ((1, 1), (2, 1), (4, 2)):
            text = claim_code.mint(BOX_KEY, g.id, counter, card, int(time.time()) + 3600)
            given.append(
                claims.record(
                    store,
                    code=claim_code.parse(text),
                    merchant="demo",
                    box="box-1",
                    claim_digest=code_digest(code_key, text).hex(),
                    code_key=code_key,
                    sign=lambda serial, card=card: signed_code.mint(issuer, card, serial, 0, 0),
                    now=int(time.time()),
                )  # fmt: skip
            )
        # Serials from 2^62 up, one after another per card, never a person's `mint --serial`.
        assert [c.serial for c in given] == [
            claims.CLAIM_SERIAL_BASE + 1, claims.CLAIM_SERIAL_BASE + 2,
            claims.CLAIM_SERIAL_BASE + 1,
        ]  # fmt: skip
        with pytest.raises(claims.AlreadyClaimed):
            claims.record(
                store, code=claim_code.parse(claim_code.mint(BOX_KEY, g.id, 1, 1, 2**31)),
                merchant="demo", box="box-1", claim_digest="00", code_key=code_key,
                sign=lambda serial: "unused", now=int(time.time()),
            )  # fmt: skip
        # The first claimed code is redeemed on box-2; the third is redeemed then reversed.
        redeemed = record(1, "box-2", action="redeem", digest=bytes.fromhex(given[0].code_digest))
        undone = record(2, "box-2", action="redeem", digest=bytes.fromhex(given[2].code_digest))
        reverse = record(3, "box-2", action="reverse")
        reverse["reverses"] = undone["id"]
        store.store_events("demo", "box-2", parse_message(
            json.dumps({"v": 1, "box": "box-2", "records": [redeemed, undone, reverse]}).encode(),
            merchant="demo", box="box-2"))  # fmt: skip
        # The plaintext signed code is nowhere in the database.
        stored = store.engine.execute("SELECT * FROM claims").fetchall()
        assert given[0].code not in json.dumps(stored, default=str)
    finally:
        store.close()
    by_card = json.loads(ok("dispensing", "--dir", str(backend_dir), "--json"))
    assert by_card["rows"] == [
        {"merchant": "demo", "card": 1, "dispensed": 3, "claimed": 2, "redeemed": 1},
        {"merchant": "demo", "card": 2, "dispensed": 1, "claimed": 1, "redeemed": 0},
    ]
    by_store = json.loads(ok("dispensing", "--dir", str(backend_dir), "--by", "store", "--json"))
    assert by_store["rows"] == [
        {"merchant": "demo", "store": "store-1", "dispensed": 4, "claimed": 3, "redeemed": 1}
    ]
    table = ok("dispensing", "--dir", str(backend_dir), "--by", "box")
    assert "box-1" in table and "DISPENSED" in table
    # Per day, each step on the day it happened: all of them today here.
    by_day = json.loads(ok("dispensing", "--dir", str(backend_dir), "--by", "day", "--json"))
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert by_day["rows"] == [
        {"merchant": "demo", "day": today, "dispensed": 4, "claimed": 3, "redeemed": 1}
    ]
    # Filtered (the console's activity page filters its per-day funnel by card, box or
    # store): only what the filter names counts, whatever the grouping.
    store = Store.open(backend_dir)
    try:
        card_2 = claims.funnel(store, "day", card=2)
        assert [(f.dispensed, f.claimed, f.redeemed) for f in card_2] == [(1, 1, 0)]
        assert claims.funnel(store, "day", box="box-2") == []
        assert claims.funnel(store, "day", sold_at="elsewhere") == []
        on_box_1 = claims.funnel(store, "card", box="box-1", sold_at="store-1")
        assert [(f.key, f.dispensed, f.claimed, f.redeemed) for f in on_box_1] == [
            (1, 3, 2, 1), (2, 1, 1, 0),
        ]  # fmt: skip
    finally:
        store.close()


def test_on_a_broker_with_the_acl_only_the_box_reads_its_grant_set(tmp_path, each_store):
    directory = tmp_path / "backend"
    make_backend(directory, boxes=("box-1", "box-2"))
    users = {name: f"pw-{os.urandom(4).hex()}" for name in ("box-1", "box-2", "redeemd-publish")}
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.touch()
    for user, password in users.items():
        subprocess.run(
            [tool("mosquitto_passwd", "mosquitto"), "-b", str(passwd), user, password], check=True
        )
    acl.write_text(broker_acl.render({"box-1": "demo", "box-2": "demo"}, PREFIX))
    server = Broker(tmp_path / "broker")
    server.anonymous = False
    server.options = [f"password_file {passwd}", f"acl_file {acl}"]
    server.start()
    try:
        url = f"mqtt://redeemd-publish:{users['redeemd-publish']}@127.0.0.1:{server.port}"
        add(directory, "--card", "1", "--quota", "1", "--broker", url)
        own = Subscriber(server.port, TOPIC, ("box-1", users["box-1"]))
        other = Subscriber(server.port, TOPIC, ("box-2", users["box-2"]))
        try:
            payload, _ = wait_until(lambda: own.got and own.got[0], "box-1's grant set")
            assert grant.open_grants(payload, roots(Keystore(directory))).box == "box-1"
            # box-2, subscribed all along, is delivered nothing of box-1's sets.
            add(directory, "--card", "2", "--quota", "1", "--broker", url)
            wait_until(lambda: len(own.got) >= 2, "box-1's second set")
            assert other.got == []
            # A box cannot write a grant set, its own or another's.
            assert not own.publish(TOPIC, b"forged") and not own.publish(
                f"{PREFIX}/demo/box/box-2/grants", b"forged"
            )
        finally:
            own.close()
            other.close()
    finally:
        server.stop()


def test_the_collector_stores_dispense_records_for_the_funnel(backend_dir, broker, boxes):
    process = CliProcess("collect", "--dir", str(backend_dir), "--broker", broker.url)
    try:
        process.wait_line(lambda line: line.startswith("connected to"), "connected")
        box = boxes("box-1")
        box.send([dispense(1, "ab" * 8, 1), dispense(2, "ab" * 8, 2), record(3, "box-1")])
        wait_until(lambda: {"v": 1, "upto": 3, "ids": []} in box.acks(), "ack upto 3")
    finally:
        assert process.stop() == 0
    store = Store.open(backend_dir)
    try:
        rows = store.engine.execute(
            "SELECT seq, action, raw FROM events WHERE box = 'box-1' ORDER BY seq"
        ).fetchall()
    finally:
        store.close()
    assert [(seq, action) for seq, action, _ in rows] == [
        (1, "dispense"), (2, "dispense"), (3, "check")
    ]  # fmt: skip
    assert [json.loads(raw).get("counter") for _, _, raw in rows] == [1, 2, None]
    funnel = json.loads(ok("dispensing", "--dir", str(backend_dir), "--by", "box", "--json"))
    assert funnel["rows"] == [
        {"merchant": "demo", "box": "box-1", "dispensed": 2, "claimed": 0, "redeemed": 0}
    ]


def test_a_database_at_m003_gains_the_dispensing_tables_keeping_its_data(tmp_path, each_store):
    directory = tmp_path / "backend"
    make_backend(directory)
    database = os.environ.get(DATABASE_ENV)
    names = [name for name, _ in STEPS]
    old = STEPS[: names.index("m003_box_status") + 1]
    engine = open_engine(directory, database, old)
    with engine.transaction():
        engine.execute(
            "INSERT INTO fleet(box, merchant, added_at) VALUES (?, ?, ?)", ["b", "demo", 5]
        )
    engine.close()
    store = Store.open(directory, database)
    try:
        assert store.fleet() == {"b": "demo"}
        made = grants.add(
            store, Keystore(directory), box="b", cards=(1,), quota=1, not_before=0,
            not_after=int(time.time()) + 60, box_key=BOX_PUBLIC,
        )  # fmt: skip
        assert made.signed is not None and made.signed.seq == 1
        table = store.engine.migrations_table
        applied = {r[0] for r in store.engine.execute(f"SELECT name FROM {table}")}
        assert "m004_dispensing" in applied and applied >= set(names)
    finally:
        store.close()
