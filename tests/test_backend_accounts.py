"""Card accounts on the backend (issue 13): the commands' signed batches, reconciliation of
what boxes spent (overspends, the block policy), transfer races, and codes never at rest.

Every test runs on both stores (SQLite backend.db and a real PostgreSQL); the commands run
as the operator runs them (`redeemd-backend ...`), batches are opened as a box opens them
(cards.batch.open_file, every signature checked), and one test runs the real collector
against a real Mosquitto with plain paho clients as the boxes.
"""

# ruff: noqa: F811  (the broker and boxes fixtures are imported, then named as parameters)
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backend_helpers import (
    boxes,  # noqa: F401  (fixture)
    make_backend,
    record,
    roots,
    wait_until,
)
from broker import broker  # noqa: F401  (fixture)

from backend import accounts
from backend.cli import main
from backend.collect import Collector
from backend.engines import open_engine
from backend.events import EventError, parse_message
from backend.export import export
from backend.keystore import Keystore
from backend.store import DATABASE_ENV, STEPS, Store
from cards import batch, signed_code
from cards.batch import Kind
from cards.digest import code_digest

GIFT_CARD = 5  # a balance card (minor units)


@pytest.fixture
def backend_dir(tmp_path, each_store):
    directory = tmp_path / "backend"
    make_backend(directory, boxes=("box-1", "box-2"))
    return directory


def run(directory: Path, *argv: str, stdin: str = "") -> str:
    """`redeemd-backend ARGV --dir DIRECTORY` in this process: its standard output.
    `stdin` is what the operator types for a `-` argument."""
    out, err = io.StringIO(), io.StringIO()
    where = 2 if argv[0] in ("account", "limits") else 1
    args = [*argv[:where], "--dir", str(directory), *argv[where:]]
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        _stdin(stdin),
    ):
        code = main(args)
    assert code == 0, f"redeemd-backend {' '.join(args)} exited {code}: {err.getvalue()}"
    return out.getvalue()


@contextlib.contextmanager
def _stdin(text: str):
    before = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = before


def issued(directory: Path, output: str) -> batch.Batch:
    """The batch a command said it stored, opened and verified as a box opens it."""
    found = re.search(r"(\w+) batch demo/(\d+) stored", output)
    assert found, output
    store = Store.open(directory)
    try:
        (stored,) = store.batches("demo", int(found[2]), int(found[2]))
    finally:
        store.close()
    opened = batch.open_file(stored.data, roots(Keystore(directory)))
    assert opened.header.kind == Kind(found[1])
    return opened


def digest(directory: Path, code: str) -> bytes:
    return code_digest(Keystore(directory).code_key(), code)


def create_account(directory: Path, *extra: str) -> str:
    out = run(directory, "account", "create", "--merchant", "demo", *extra)
    return re.search(r"account ([0-9a-f]{32})", out)[1]


def spend(seq: int, box: str, code: bytes, account: str, amount: int, **fields) -> dict:
    """An accepted redemption of a linked balance code, as a box sends it (protocol 19.6)."""
    r = record(seq, box, action="redeem", digest=code)
    r.update(card_id=GIFT_CARD, amount=amount, balance=0, account=account, **fields)
    return r


def store_records(directory: Path, box: str, records: list[dict], *, sign: bool = True) -> None:
    """Records into the store through the collector's store path (its consumed-elsewhere
    signer given when `sign`: a collector that signs)."""
    keystore = Keystore(directory)

    def sign_consumed(merchant: str, seq: int, entries: bytes) -> bytes:
        now = int(time.time())
        return batch.build(
            keystore.private("issuer"), keystore.delegation(), merchant=merchant, seq=seq,
            kind=Kind.CONSUMED, entries=entries, created_at=now, expires_at=now + 86400,
        )  # fmt: skip

    events = parse_message(
        json.dumps({"v": 1, "box": box, "records": records}).encode(), merchant="demo", box=box
    )
    store = Store.open(directory)
    try:
        store.store_events("demo", box, events, sign_consumed if sign else None)
    finally:
        store.close()


def stored_kinds(directory: Path) -> list[str]:
    store = Store.open(directory)
    try:
        return [b.kind.value for b in store.batches("demo", 1, 1 << 40)]
    finally:
        store.close()


# ------------------------------------------------------------------ commands


def test_each_command_issues_a_signed_batch_holding_its_entries(backend_dir, tmp_path):
    code_key = Keystore(backend_dir).code_key()
    out = run(
        backend_dir, "account", "create", "--merchant", "demo", "--card", "5",
        "--balance", "10000", "--out", str(tmp_path / "account.rdb"),
    )  # fmt: skip
    family = re.search(r"account ([0-9a-f]{32})", out)[1]
    opened = issued(backend_dir, out)
    assert list(opened.account_entries()) == [(bytes.fromhex(family), 5, 0, 0, 0, 10000, 0)]
    written = batch.open_file((tmp_path / "account.rdb").read_bytes(), roots(Keystore(backend_dir)))
    assert written.header.raw == opened.header.raw, "--out writes the batch the store keeps"

    # A code typed on standard input (kept out of shell history), with its AIM prefix.
    out = run(backend_dir, "account", "link", "--account", family, "--code", "-",
              stdin="]Q1FAMILY-PHONE-1\n")  # fmt: skip
    assert list(issued(backend_dir, out).link_entries()) == [
        (code_digest(code_key, "FAMILY-PHONE-1"), bytes.fromhex(family))
    ]
    run(backend_dir, "account", "link", "--account", family, "--code", "FAMILY-PHONE-2")

    out = run(backend_dir, "topup", "--account", family, "--amount", "2500")
    topup_id = re.search(r"top-up ([0-9a-f]{32})", out)[1]
    assert "now 12500 (minor units)" in out
    assert list(issued(backend_dir, out).topup_entries()) == [
        (bytes.fromhex(topup_id), bytes.fromhex(family), 2500)
    ]

    run(backend_dir, "limits", "set", "--merchant", "demo", "--card", "5", "--per-account", "20000")
    out = run(
        backend_dir, "limits", "set", "--card", "5", "--box", "box-1", "--per-redemption", "1000"
    )
    # Each limits batch carries the merchant's whole set: it replaces what a box held.
    assert json.loads(issued(backend_dir, out).entries) == [
        {"card": 5, "box": "*", "per_redemption": None, "per_account": 20000},
        {"card": 5, "box": "box-1", "per_redemption": 1000, "per_account": None},
    ]
    listed = json.loads(run(backend_dir, "limits", "list", "--json"))
    assert [(r["box"], r["per_redemption"], r["per_account"]) for r in listed] == [
        ("*", None, 20000), ("box-1", 1000, None),
    ]  # fmt: skip

    out = run(backend_dir, "transfer", "--code", "GIFT-50", "--to", "GIFT-50-FRIEND")
    transfer_id = re.search(r"transfer ([0-9a-f]{32})", out)[1]
    assert list(issued(backend_dir, out).transfer_entries()) == [
        (
            bytes.fromhex(transfer_id),
            code_digest(code_key, "GIFT-50"),
            code_digest(code_key, "GIFT-50-FRIEND"),
        )
    ]

    # A gift of a linked code as a signed code: its card is the account's, the batch names
    # the printed code's digest, and the receiver's code spends the same account.
    out = run(backend_dir, "transfer", "--code", "FAMILY-PHONE-1", "--signed")
    code = out.strip().splitlines()[-1]
    parsed = signed_code.parse(code)
    assert signed_code.verify(parsed, Keystore(backend_dir).public("issuer"))
    assert parsed.card_id == 5
    ((_, old, new),) = issued(backend_dir, out).transfer_entries()
    assert (old, new) == (code_digest(code_key, "FAMILY-PHONE-1"), code_digest(code_key, code))
    store = Store.open(backend_dir)
    try:
        assert accounts.linked(store, "demo", family) == sorted(
            [code_digest(code_key, "FAMILY-PHONE-2").hex(), new.hex()]
        )
    finally:
        store.close()
    assert stored_kinds(backend_dir) == [
        "accounts", "link", "link", "topup", "limits", "limits", "transfer", "transfer",
    ]  # fmt: skip


def test_an_account_on_a_known_card_takes_the_cards_value_and_unit(backend_dir, tmp_path):
    cards = tmp_path / "cards.json"
    cards.write_text(json.dumps([{"id": 3, "kind": "groupon", "uses": 4}]))
    run(backend_dir, "issue", "--merchant", "demo", "--kind", "cards", "--input", str(cards),
        "--out", str(tmp_path / "cards.rdb"))  # fmt: skip
    out = run(backend_dir, "account", "create", "--merchant", "demo", "--card", "3")
    group = re.search(r"account ([0-9a-f]{32})", out)[1]
    assert "card 3, 4 uses" in out
    assert list(issued(backend_dir, out).account_entries()) == [
        (bytes.fromhex(group), 3, 0, 0, 4, 0, 0)
    ]
    with pytest.raises(AssertionError, match="counted in uses: give --uses"):
        run(backend_dir, "account", "create", "--card", "3", "--balance", "100")
    with pytest.raises(AssertionError, match="say what the account holds"):
        run(backend_dir, "account", "create", "--card", "77")


def test_a_topup_issued_twice_is_two_topups_and_a_resent_batch_the_same_one(backend_dir, tmp_path):
    family = create_account(backend_dir, "--card", "5", "--balance", "1000")
    first = run(backend_dir, "topup", "--account", family, "--amount", "500")
    second = run(backend_dir, "topup", "--account", family, "--amount", "500")
    one, two = issued(backend_dir, first), issued(backend_dir, second)
    (first_entry,), (second_entry,) = list(one.topup_entries()), list(two.topup_entries())
    # Two commands are two top-ups: two ids, both applied by every box.
    assert first_entry[0] != second_entry[0]
    assert (first_entry[1:], second_entry[1:]) == ((bytes.fromhex(family), 500),) * 2
    assert "now 2000 (minor units)" in second
    # The same batch sent again (publish's resend, an export re-signed after expiry)
    # carries the same top-up id, which a box applies once.
    store = Store.open(backend_dir)
    try:
        assert {b.seq for b in store.unpublished()} >= {one.header.seq, two.header.seq}
        (written,) = export(
            store, Keystore(backend_dir), "demo", [one.header.seq], tmp_path / "usb"
        )
    finally:
        store.close()
    again = batch.open_file(written.path.read_bytes(), roots(Keystore(backend_dir)))
    assert list(again.topup_entries()) == [first_entry]
    assert again.header.seq == one.header.seq


# ------------------------------------------------------------------ reconciliation


def test_an_account_overspent_on_two_boxes_is_reported_and_blocked_by_the_collector(
    backend_dir, broker, boxes
):
    family = create_account(backend_dir, "--card", "5", "--balance", "10000")
    phone_1, phone_2 = digest(backend_dir, "PHONE-1"), digest(backend_dir, "PHONE-2")
    run(backend_dir, "account", "link", "--account", family, "--code", "PHONE-1")
    run(backend_dir, "account", "link", "--account", family, "--code", "PHONE-2")
    run(backend_dir, "topup", "--account", family, "--amount", "1000")
    assert "blocked by batch" in run(
        backend_dir, "account", "policy", "--merchant", "demo", "--block-overspent"
    )
    lines: list[str] = []
    collector = Collector(backend_dir, broker.url, say=lines.append)
    collector.start()
    try:
        wait_until(collector.link.connected.is_set, "collector connected")
        # Two boxes offline, each within what it knew: 11000 in all, 7000 + 6000 spent.
        first = [spend(1, "box-1", phone_1, family, 4000), spend(2, "box-1", phone_1, family, 3000)]
        second = [spend(1, "box-2", phone_2, family, 6000)]
        box_1, box_2 = boxes("box-1"), boxes("box-2")
        box_1.send(first)
        wait_until(lambda: box_1.acks(), "box-1 acked")
        assert json.loads(run(backend_dir, "overspends", "--json"))["overspends"] == []
        box_2.send(second)
        wait_until(lambda: box_2.acks(), "box-2 acked")
    finally:
        collector.stop()

    (found,) = json.loads(run(backend_dir, "overspends", "--json"))["overspends"]
    block_seq = found.pop("blocked_seq")
    assert {k: found[k] for k in ("account", "amount_over", "spent", "value", "unit", "boxes")} == {
        "account": family, "amount_over": 2000, "spent": 13000, "value": 11000,
        "unit": "balance", "boxes": ["box-1", "box-2"],
    }  # fmt: skip
    assert sorted(found["records"]) == sorted(r["id"] for r in first + second)
    # The policy's block batch: every code of the account, waiting for `publish`.
    store = Store.open(backend_dir)
    try:
        (blocked,) = store.batches("demo", block_seq, block_seq)
        assert blocked in store.unpublished()
    finally:
        store.close()
    opened = batch.open_file(blocked.data, roots(Keystore(backend_dir)))
    assert opened.header.kind is Kind.BLOCK
    assert [d for (d,) in opened.digest_entries()] == sorted([phone_1, phone_2])
    assert f"blocked by batch {block_seq}" in run(backend_dir, "overspends")

    # Settled: the backend unblocks the codes it knows by digest; the overspend stays listed.
    out = run(backend_dir, "account", "unblock", "--account", family)
    unblocked = issued(backend_dir, out)
    assert [d for (d,) in unblocked.digest_entries()] == sorted([phone_1, phone_2])
    assert "not blocked" in run(backend_dir, "overspends")


def test_without_the_policy_an_overspend_is_reported_and_nothing_blocked(backend_dir):
    family = create_account(backend_dir, "--card", "5", "--balance", "5000")
    phone = digest(backend_dir, "PHONE-1")
    run(backend_dir, "account", "link", "--account", family, "--code", "PHONE-1")
    kinds = stored_kinds(backend_dir)
    # Spends up to the value exactly are no overspend; a reversed one counts for nothing.
    store_records(backend_dir, "box-1", [spend(1, "box-1", phone, family, 3000)])
    store_records(backend_dir, "box-2", [spend(1, "box-2", phone, family, 2000)])
    assert json.loads(run(backend_dir, "overspends", "--json"))["overspends"] == []
    late = spend(2, "box-2", phone, family, 900)
    undo = record(3, "box-2", action="reverse", digest=phone)
    undo.update(card_id=GIFT_CARD, amount=900, reverses=late["id"])
    store_records(backend_dir, "box-2", [late, undo])
    assert json.loads(run(backend_dir, "overspends", "--json"))["overspends"] == []
    store_records(backend_dir, "box-1", [spend(2, "box-1", phone, family, 700)])
    (found,) = json.loads(run(backend_dir, "overspends", "--json"))["overspends"]
    assert (found["amount_over"], found["blocked_seq"]) == (700, None)
    assert late["id"] not in found["records"]
    assert stored_kinds(backend_dir) == kinds, "no batch without the policy"
    assert "an overspent account is reported" in run(backend_dir, "account", "policy")


def test_a_transferred_code_redeemed_on_a_box_behind_the_transfer_is_a_conflict(backend_dir):
    old = digest(backend_dir, "GIFT-50")
    before = record(1, "box-1", action="redeem", digest=old, uses=1, uses_left=2)
    # Known to the backend before the gift: no race.
    store_records(backend_dir, "box-1", [before])
    out = run(backend_dir, "transfer", "--code", "GIFT-50", "--to", "GIFT-50-FRIEND")
    transfer_id = re.search(r"transfer ([0-9a-f]{32})", out)[1]
    seq = issued(backend_dir, out).header.seq
    behind = record(1, "box-2", action="redeem", digest=old, uses=1, uses_left=1)
    behind["cache_seq"] = seq - 1
    refused = record(2, "box-2", action="redeem", digest=old)
    refused.update(verdict="rejected", reason="transferred", cache_seq=seq)
    store_records(backend_dir, "box-2", [behind, refused])
    store_records(backend_dir, "box-2", [behind])  # resent: still one conflict

    (conflict,) = json.loads(run(backend_dir, "overspends", "--json"))["conflicts"]
    assert conflict == {
        "kind": "transfer", "merchant": "demo", "transfer": transfer_id, "digest": old.hex(),
        "record": behind["id"], "box": "box-2", "cache_seq": seq - 1, "transfer_seq": seq,
        "detected_at": conflict["detected_at"],
    }  # fmt: skip
    assert f"CONFLICT transfer demo: code {old.hex()} redeemed on box-2" in run(
        backend_dir, "overspends"
    )
    with pytest.raises(AssertionError, match="was transferred before"):
        run(backend_dir, "transfer", "--code", "GIFT-50", "--to", "GIFT-50-AGAIN")


# ------------------------------------------------------------------ codes at rest


def test_codes_given_to_the_commands_are_never_stored_in_plaintext(
    backend_dir, each_store, request
):
    codes = ["FAMILY-SECRET-7731", "GIFT-SECRET-4410", "FRIEND-SECRET-9902"]
    family = create_account(backend_dir, "--card", "5", "--balance", "5000")
    run(backend_dir, "account", "link", "--account", family, "--code", codes[0])
    run(backend_dir, "transfer", "--code", "-", "--to", codes[2], stdin=codes[1] + "\n")
    out = run(backend_dir, "transfer", "--code", codes[0], "--signed")
    codes.append(out.strip().splitlines()[-1])
    assert signed_code.looks_signed(codes[-1])

    if each_store == "sqlite":
        at_rest = b"".join(
            p.read_bytes() for p in backend_dir.glob("backend.db*") if not p.name.endswith("lock")
        )
    else:
        server = request.getfixturevalue("postgresql")
        dump = subprocess.run(
            [str(server.bin / "pg_dump"), "--dbname", _database_url()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        at_rest = dump.stdout
    assert at_rest
    for code in codes:
        assert code.encode() not in at_rest, f"{code} is stored in plaintext"
        assert code.encode().hex().encode() not in at_rest
        assert digest(backend_dir, code).hex().encode() in at_rest, "the digest is what is kept"


def _database_url() -> str:
    return os.environ[DATABASE_ENV]


# ------------------------------------------------------------------ schema


def test_a_database_before_m006_gains_the_account_tables_keeping_its_records(tmp_path, each_store):
    directory = tmp_path / "backend"
    make_backend(directory)
    names = [name for name, _ in STEPS]
    before = [step for step in STEPS if step[0] != "m006_accounts"]
    engine = open_engine(directory, os.environ.get(DATABASE_ENV), before)
    old = record(1, "box-1", action="redeem", digest=b"\x01" * 16, uses=1, uses_left=0)
    with engine.transaction():
        engine.execute(
            "INSERT INTO events(id, merchant, box, seq, at_ms, digest, action, verdict, raw, "
            "stored_at) VALUES (?, 'demo', 'box-1', 1, ?, ?, 'redeem', 'accepted', ?, 0)",
            (old["id"], old["at_ms"], old["digest"], json.dumps(old)),
        )
    engine.close()

    store = Store.open(directory)
    try:
        table = store.engine.migrations_table
        applied = {r[0] for r in store.engine.execute(f"SELECT name FROM {table}")}
        assert applied == set(names)
        assert store.engine.execute("SELECT id, account FROM events").fetchall() == [
            (old["id"], None)
        ]
    finally:
        store.close()
    # The migrated store takes accounts at once.
    family = create_account(directory, "--card", "5", "--balance", "100")
    assert "100 (minor units)" in run(directory, "account", "list")
    assert family in run(directory, "account", "list")


# ------------------------------------------------------------------ events


def test_a_record_with_a_malformed_account_is_refused():
    good = record(1, "box-1", action="redeem")
    good["account"] = "AB" * 16
    (event,) = parse_message(
        json.dumps({"v": 1, "box": "box-1", "records": [good]}).encode(),
        merchant="demo",
        box="box-1",
    )
    assert (event.account, event.cache_seq) == ("ab" * 16, 1)
    for bad in ("ab" * 15, 7, "zz" * 16):
        message = json.dumps({"v": 1, "box": "box-1", "records": [{**good, "account": bad}]})
        with pytest.raises(EventError, match="account must be 32 hex digits"):
            parse_message(message.encode(), merchant="demo", box="box-1")
