"""Accounts, transfers, top-ups and offline limits on the box (issue 13, protocol.md 19).

Formats (cards.batch, cards.card), applying the five batch kinds (storage.batch_import),
the pure decisions (cards.evaluate, cards.rules) and the engine on a real database.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib

import pytest
from conftest import CREATED, FAR, make_keyset, write_box
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

from cards import batch
from cards.batch import BatchError, CodeStatus, Kind
from cards.card import Card, CardError, CardKind, Limit, limit_for, parse_limit, parse_limits
from cards.rules import CodeState, Context, decide, within_limit
from cards.scan import Scan
from cards.verdict import Action, Outcome, Reason
from daemon.engine import Engine
from storage import batch_import, codes, ledger, outbox, trust
from storage.database import connect, open_database
from storage.migrations import migrations
from sync import acks

FAMILY = bytes(range(128, 144))
GROUP = bytes(range(144, 160))


# ---------------------------------------------------------------- formats


def test_new_kinds_have_their_documented_entry_sizes():
    assert batch.ENTRY_SIZES[Kind.ACCOUNTS] == 41
    assert batch.ENTRY_SIZES[Kind.LINK] == 32
    assert batch.ENTRY_SIZES[Kind.TRANSFER] == 48
    assert batch.ENTRY_SIZES[Kind.TOPUP] == 40
    assert batch.ENTRY_SIZES[Kind.LIMITS] == 0
    assert CodeStatus.TRANSFERRED == 4


def test_each_new_kind_round_trips_through_a_signed_file():
    ks = make_keyset()
    a, b = ks.digest("A"), ks.digest("B")
    made = {
        Kind.ACCOUNTS: batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 100, 0)]),
        Kind.LINK: batch.encode_links([(b, FAMILY), (a, GROUP)]),
        Kind.TRANSFER: batch.encode_transfers([(b"t" * 16, a, b)]),
        Kind.TOPUP: batch.encode_topups([(b"u" * 16, FAMILY, 250)]),
        Kind.LIMITS: batch.encode_limits(
            [{"card": 5, "box": "*", "per_redemption": 10, "per_account": None}]
        ),
    }
    opened = {k: batch.open_file(ks.build(k, e, seq=3), ks.roots) for k, e in made.items()}
    assert list(opened[Kind.ACCOUNTS].account_entries()) == [(FAMILY, 5, 0, 0, 0, 100, 0)]
    # Links are sorted by digest, transfers and top-ups stay in file order.
    assert list(opened[Kind.LINK].link_entries()) == sorted([(b, FAMILY), (a, GROUP)])
    assert list(opened[Kind.TRANSFER].transfer_entries()) == [(b"t" * 16, a, b)]
    assert list(opened[Kind.TOPUP].topup_entries()) == [(b"u" * 16, FAMILY, 250)]
    assert opened[Kind.LIMITS].limits() == [Limit(5, "*", 10, None)]
    assert opened[Kind.LIMITS].header.count == 1


def test_encoders_refuse_what_a_box_would_refuse():
    with pytest.raises(BatchError, match="amount 0"):
        batch.encode_topups([(b"u" * 16, FAMILY, 0)])
    with pytest.raises(BatchError, match="status 1"):
        batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 0, CodeStatus.CONSUMED)])
    with pytest.raises(BatchError, match="status 4"):
        batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 0, CodeStatus.TRANSFERRED)])
    with pytest.raises(BatchError, match="16 bytes"):
        batch.encode_links([(b"short", FAMILY)])
    with pytest.raises(BatchError, match="two limits"):
        batch.encode_limits([{"card": 5, "box": "*", "per_redemption": 1, "per_account": 1}] * 2)


def _forged(ks, kind: Kind, entries: bytes) -> bytes:
    """A batch of `kind` carrying `entries` that no encoder would write, signed properly:
    what a buggy or compromised backend could send."""
    size = batch.ENTRY_SIZES[kind]
    payload = zlib.compress(entries)
    body = {
        "v": 1, "merchant": "demo", "seq": 3, "kind": kind.value, "created_at": CREATED,
        "expires_at": FAR, "count": len(entries) // size if size else 1, "entry_size": size,
        "entries_size": len(entries), "entries_sha256": hashlib.sha256(entries).hexdigest(),
        "compression": "zlib", "payload_size": len(payload),
        "chunk_size": batch.DEFAULT_CHUNK_SIZE, "chunks": [hashlib.sha256(payload).hexdigest()],
        "key_id": ks.delegation.key_id, "issuer": ks.delegation.to_json(),
    }  # fmt: skip
    from cards import envelope

    return envelope.seal(batch.FILE_MAGIC, batch.DOMAIN, body, ks.issuer_private) + payload


def test_signed_batches_that_say_what_the_format_forbids_are_refused():
    ks = make_keyset()
    cases = [
        (Kind.TOPUP, batch.TOPUP_ENTRY.pack(b"u" * 16, FAMILY, 0), "must be above 0"),
        (Kind.TOPUP, batch.TOPUP_ENTRY.pack(b"u" * 16, FAMILY, -5), "must be above 0"),
        (Kind.ACCOUNTS, batch.ACCOUNT_ENTRY.pack(FAMILY, 5, 0, 0, 0, 0, 4), "status 4"),
        (Kind.ACCOUNTS, batch.ACCOUNT_ENTRY.pack(FAMILY, 5, 0, 0, 0, -1, 0), "negative"),
        (Kind.LIMITS, b'[{"card":5,"box":"*","per_redemption":-1,"per_account":null}]', "0..2"),
        (Kind.LIMITS, b'[{"card":5,"box":"a b","per_redemption":1,"per_account":null}]', "box"),
        (Kind.LIMITS, b'[{"card":5,"box":"*","per_redemption":1}]', "exactly"),
        (Kind.LIMITS, b'{"card":5}', "JSON array"),
    ]
    for kind, entries, message in cases:
        with pytest.raises(BatchError, match=message):
            batch.open_file(_forged(ks, kind, entries), ks.roots)


@pytest.mark.parametrize("kind", [Kind.ACCOUNTS, Kind.LINK, Kind.TRANSFER, Kind.TOPUP])
def test_truncated_new_kind_batches_are_refused(kind):
    ks = make_keyset()
    size = batch.ENTRY_SIZES[kind]
    good = _forged(ks, kind, bytes(size))
    # The entries not a whole number of entries, though the header's count says so.
    with pytest.raises(BatchError):
        batch.open_file(_forged(ks, kind, bytes(size - 1)), ks.roots)
    with pytest.raises(BatchError, match="truncated"):
        batch.open_file(good[:-1], ks.roots)
    (header_len,) = struct.unpack_from(">I", good, 4)
    with pytest.raises(BatchError):
        batch.open_file(good[: 8 + header_len + 10], ks.roots)


def test_limits_parse_strictly_and_the_box_named_wins_over_every_box():
    limits = parse_limits(
        [
            {"card": 5, "box": "*", "per_redemption": 5000, "per_account": 8000},
            {"card": 5, "box": "box-1", "per_redemption": None, "per_account": 3000},
            {"card": 3, "box": "*", "per_redemption": 2, "per_account": None},
        ]
    )
    assert limit_for(limits, 5, "box-1") == Limit(5, "box-1", None, 3000)
    assert limit_for(limits, 5, "box-2") == Limit(5, "*", 5000, 8000)
    assert limit_for(limits, 3, "box-1") == Limit(3, "*", 2, None)
    assert limit_for(limits, 1, "box-1") is None
    for bad in (
        {"card": 5, "box": "*", "per_redemption": True, "per_account": None},
        {"card": 2**32, "box": "*", "per_redemption": 1, "per_account": None},
        {"card": 5, "box": "", "per_redemption": 1, "per_account": None},
        {"card": 5, "box": "*", "per_redemption": 1, "per_account": None, "extra": 1},
    ):
        with pytest.raises(CardError):
            parse_limit(bad)


# ---------------------------------------------------------------- on a real box


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(loaded_box):
    """An engine without debounce on `loaded_box` (demo cards; DEMO-0001..0010 on card 1,
    GIFT-0001 on the gift card 5 with balance 5000, LUNCH-0001 on the groupon card 3)."""
    write_box(loaded_box.dir, loaded_box.keyset, debounce="0s")
    engine = Engine(
        open_database(loaded_box.database), loaded_box.config, clock=Clock(CREATED + 60)
    )
    engine.box = loaded_box  # the tests apply batches to it
    engine.seq = 3
    return engine


def apply(engine, kind: Kind, entries: bytes, seq: int | None = None):
    """Build, verify and apply one batch through the engine's own connection."""
    ks = engine.box.keyset
    if seq is None:
        seq, engine.seq = engine.seq, engine.seq + 1
    parsed = batch.open_file(ks.build(kind, entries, seq), engine.box.config.trust.root_keys)
    result = batch_import.apply(engine.conn, parsed, merchant="demo", now=CREATED)
    engine.reload()
    return result


def family(engine, balance: int = 10_000, codes=("PHONE-1", "PHONE-2", "GIFT-0001")) -> None:
    """A family account on the gift card (5) with `balance`, linked to `codes`."""
    ks = engine.box.keyset
    apply(engine, Kind.ACCOUNTS, batch.encode_accounts([(FAMILY, 5, 0, 0, 0, balance, 0)]))
    apply(engine, Kind.LINK, batch.encode_links((ks.digest(c), FAMILY) for c in codes))


def account_row(engine, account: bytes = FAMILY) -> tuple:
    return engine.conn.execute(codes.ACCOUNT_LOOKUP, (account,)).fetchone()


def spent(conn, account: bytes | None, digest: bytes) -> int:
    """This box's unacknowledged spend on `account`, or on the code `digest` without one,
    as the engine reads it (storage/codes.py, SCAN_LOOKUP's last columns)."""
    if account is not None:
        row = conn.execute("SELECT spent FROM accounts WHERE account = ?", (account,)).fetchone()
    else:
        row = conn.execute("SELECT spent FROM codes WHERE digest = ?", (digest,)).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def code_row(engine, code: str) -> tuple | None:
    return engine.conn.execute(codes.LOOKUP, (engine.box.keyset.digest(code),)).fetchone()


def limits(engine, *objects: dict) -> None:
    apply(engine, Kind.LIMITS, batch.encode_limits(list(objects)))


def ack_all(engine) -> None:
    last = ledger.last_seq(engine.conn)
    acks.apply(engine.conn, acks.Ack(last, ()), sent_upto=last)


def test_a_family_account_is_spent_through_any_of_its_codes(engine):
    family(engine)
    gift_before = code_row(engine, "GIFT-0001")
    first = engine.redeem("PHONE-1", "pos", amount=3000)
    second = engine.redeem("PHONE-2", "pos", amount=5000)
    third = engine.redeem("GIFT-0001", "pos", amount=2500)
    assert first.accepted and first.balance == 7000 and first.card_id == 5
    assert second.accepted and second.balance == 2000
    assert third.reason is Reason.INSUFFICIENT_BALANCE and third.balance == 2000
    assert account_row(engine)[4] == 2000
    # The codes' own rows are untouched: the account holds the value.
    assert code_row(engine, "GIFT-0001") == gift_before
    records = list(ledger.records(engine.conn))
    assert [r.account for r in records] == [FAMILY] * 3
    assert records[0].to_json()["account"] == FAMILY.hex()
    plain = engine.handle(Scan(b"DEMO-0001", "front"))
    assert plain.accepted
    assert "account" not in list(ledger.records(engine.conn))[-1].to_json()


def test_a_code_linked_to_an_account_the_box_lacks_is_refused_and_nothing_changes(engine):
    # Batches never link to an unknown account (see the refusal test below); a database
    # edited by hand or restored half can. The engine must still tell "no account" from
    # "a plain code" and change nothing.
    digest = engine.box.keyset.digest("DEMO-0002")
    with engine.conn:
        engine.conn.execute("UPDATE codes SET account = ? WHERE digest = ?", (GROUP, digest))
    before = code_row(engine, "DEMO-0002")
    verdict = engine.handle(Scan(b"DEMO-0002", "front"))
    assert verdict.reason is Reason.UNKNOWN_CODE
    assert verdict.detail == "the code's account is not in the cache"
    assert code_row(engine, "DEMO-0002") == before
    assert engine.handle(Scan(b"DEMO-0003", "front")).accepted


def test_a_use_counted_account_is_spent_by_scans_and_refilled_by_a_reversal(engine):
    ks = engine.box.keyset
    apply(engine, Kind.ACCOUNTS, batch.encode_accounts([(GROUP, 3, 0, 0, 2, 0, 0)]))
    apply(engine, Kind.LINK, batch.encode_links([(ks.digest("LUNCH-0001"), GROUP)]))
    first = engine.handle(Scan(b"LUNCH-0001", "front"))
    second = engine.handle(Scan(b"LUNCH-0001", "front"))
    third = engine.handle(Scan(b"LUNCH-0001", "front"))
    assert (first.uses_left, second.uses_left) == (1, 0)
    assert third.reason is Reason.ALREADY_REDEEMED
    assert account_row(engine, GROUP)[3] == 0
    # The groupon card has no reversal window; the gift card (5) has one: reverse there.
    family(engine, codes=("PHONE-1",))
    redeemed = engine.redeem("PHONE-1", "pos", amount=4000)
    back = engine.reverse(redeemed.record_id, "pos")
    assert back.accepted and back.balance == 10_000
    assert account_row(engine)[4] == 10_000
    assert list(ledger.records(engine.conn))[-1].account == FAMILY


def test_account_status_and_code_status_both_count(engine):
    family(engine)
    ks = engine.box.keyset
    apply(engine, Kind.REVOKE, batch.encode_digests([ks.digest("PHONE-2")]))
    assert engine.redeem("PHONE-2", "pos", amount=1).reason is Reason.REVOKED
    assert engine.redeem("PHONE-1", "pos", amount=1).accepted
    # Re-sending the account blocked: every code of it is blocked, its balance kept.
    apply(engine, Kind.ACCOUNTS, batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 10_000, 3)]))
    assert engine.redeem("PHONE-1", "pos", amount=1).reason is Reason.BLOCKED
    assert account_row(engine)[4] == 9999


def test_per_redemption_limit_and_the_box_named_wins(engine):
    family(engine)
    limits(
        engine,
        {"card": 5, "box": "*", "per_redemption": 100, "per_account": None},
        {"card": 5, "box": "box-1", "per_redemption": 4000, "per_account": None},
    )
    over = engine.redeem("PHONE-1", "pos", amount=4001)
    assert over.reason is Reason.OFFLINE_LIMIT and "4000 per redemption" in over.detail
    assert over.balance == 10_000 and account_row(engine)[4] == 10_000
    assert engine.redeem("PHONE-1", "pos", amount=4000).accepted
    # A check is never limited.
    assert engine.check("PHONE-1").accepted


def test_cumulative_limit_counts_unacknowledged_spend_and_resets_after_an_ack(engine):
    family(engine)
    limits(engine, {"card": 5, "box": "*", "per_redemption": None, "per_account": 6000})
    assert engine.redeem("PHONE-1", "pos", amount=3000).accepted
    assert engine.redeem("PHONE-2", "pos", amount=2500).accepted
    refused = engine.redeem("GIFT-0001", "pos", amount=1000)
    assert refused.reason is Reason.OFFLINE_LIMIT
    assert "5500" in refused.detail and "6000 per account" in refused.detail
    assert spent(engine.conn, FAMILY, b"") == 5500
    ack_all(engine)
    assert spent(engine.conn, FAMILY, b"") == 0
    assert engine.redeem("GIFT-0001", "pos", amount=1000).accepted
    # Acks by id lower it too.
    record = engine.redeem("PHONE-1", "pos", amount=500)
    assert spent(engine.conn, FAMILY, b"") == 1500
    acks.apply(
        engine.conn,
        acks.Ack(0, (uuid.UUID(record.record_id).bytes,)),
        sent_upto=ledger.last_seq(engine.conn),
    )
    assert spent(engine.conn, FAMILY, b"") == 1000


def test_a_code_without_an_account_is_its_own_account_for_the_limit(engine):
    ks = engine.box.keyset
    assert engine.redeem("GIFT-0001", "pos", amount=1500).accepted  # before any limit
    # The limit arrives with the box's earlier, unacknowledged spend already counted.
    limits(engine, {"card": 5, "box": "*", "per_redemption": None, "per_account": 2000})
    assert spent(engine.conn, None, ks.digest("GIFT-0001")) == 1500
    assert engine.redeem("GIFT-0001", "pos", amount=600).reason is Reason.OFFLINE_LIMIT
    assert engine.redeem("GIFT-0001", "pos", amount=500).accepted
    # Removing the limits removes the spend kept for them.
    limits(engine)
    assert spent(engine.conn, None, ks.digest("GIFT-0001")) == 0
    assert engine.redeem("GIFT-0001", "pos", amount=3000).accepted


def test_use_counted_limits_count_uses(engine):
    ks = engine.box.keyset
    apply(engine, Kind.ACCOUNTS, batch.encode_accounts([(GROUP, 3, 0, 0, 10, 0, 0)]))
    apply(engine, Kind.LINK, batch.encode_links([(ks.digest("LUNCH-0001"), GROUP)]))
    limits(engine, {"card": 3, "box": "*", "per_redemption": 2, "per_account": 3})
    assert engine.redeem("LUNCH-0001", "pos", uses=3).reason is Reason.OFFLINE_LIMIT
    assert engine.redeem("LUNCH-0001", "pos", uses=2).accepted
    assert engine.redeem("LUNCH-0001", "pos", uses=2).reason is Reason.OFFLINE_LIMIT
    assert engine.handle(Scan(b"LUNCH-0001", "front")).accepted
    assert account_row(engine, GROUP)[3] == 7


def test_a_transfer_retires_the_old_code_and_the_new_one_has_its_value(engine):
    ks = engine.box.keyset
    assert engine.redeem("GIFT-0001", "pos", amount=1000).accepted
    moved = batch.encode_transfers([(b"T" * 16, ks.digest("GIFT-0001"), ks.digest("FRIEND-1"))])
    apply(engine, Kind.TRANSFER, moved)
    old = engine.redeem("GIFT-0001", "pos", amount=1)
    assert old.reason is Reason.TRANSFERRED
    assert code_row(engine, "GIFT-0001")[5] == CodeStatus.TRANSFERRED
    new = engine.redeem("FRIEND-1", "pos", amount=4000)
    assert new.accepted and new.balance == 0 and new.card_id == 5
    # The same transfer id again, in another batch: nothing moves back or again.
    apply(engine, Kind.TRANSFER, moved)
    assert code_row(engine, "FRIEND-1")[4] == 0
    assert engine.redeem("FRIEND-1", "pos", amount=1).reason is Reason.INSUFFICIENT_BALANCE


def test_a_linked_code_transferred_takes_its_account_link(engine):
    family(engine)
    ks = engine.box.keyset
    transfer = [(b"T" * 16, ks.digest("PHONE-1"), ks.digest("PHONE-NEW"))]
    apply(engine, Kind.TRANSFER, batch.encode_transfers(transfer))
    assert engine.redeem("PHONE-1", "pos", amount=1).reason is Reason.TRANSFERRED
    new = engine.redeem("PHONE-NEW", "pos", amount=100)
    assert new.accepted and new.balance == 9900
    assert list(ledger.records(engine.conn))[-1].account == FAMILY


def test_a_transfer_batch_is_applied_whole_or_not_at_all(engine):
    ks = engine.box.keyset
    before = engine.conn.execute("SELECT * FROM codes ORDER BY digest").fetchall()
    entries = batch.encode_transfers(
        [
            (b"A" * 16, ks.digest("GIFT-0001"), ks.digest("FRIEND-1")),
            (b"B" * 16, ks.digest("DEMO-0001"), ks.digest("DEMO-0001")),  # refused
        ]
    )
    with pytest.raises(batch_import.ImportRefused, match="same code"):
        apply(engine, Kind.TRANSFER, entries)
    assert engine.conn.execute("SELECT * FROM codes ORDER BY digest").fetchall() == before
    assert engine.conn.execute("SELECT COUNT(*) FROM transfers_applied").fetchone()[0] == 0
    assert engine.redeem("GIFT-0001", "pos", amount=10).accepted


def test_a_top_up_is_applied_once_whatever_repeats_it(engine):
    family(engine)
    once = batch.encode_topups([(b"U" * 16, FAMILY, 2500)])
    result = apply(engine, Kind.TOPUP, once)
    assert account_row(engine)[4] == 12_500
    # The same batch again (a replay of its sequence) and another batch repeating it.
    again = apply(engine, Kind.TOPUP, once, seq=result.seq)
    assert again.replay
    apply(
        engine, Kind.TOPUP, batch.encode_topups([(b"U" * 16, FAMILY, 2500), (b"V" * 16, FAMILY, 1)])
    )
    assert account_row(engine)[4] == 12_501
    # A top-up adds to what was spent here, never overwrites it.
    assert engine.redeem("PHONE-1", "pos", amount=12_000).accepted
    apply(engine, Kind.TOPUP, batch.encode_topups([(b"W" * 16, FAMILY, 100)]))
    assert account_row(engine)[4] == 601
    # Re-sending the account does not give the spent value back.
    apply(engine, Kind.ACCOUNTS, batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 10_000, 0)]))
    assert account_row(engine)[4] == 601


def test_a_top_up_of_a_use_counted_account_adds_uses(engine):
    ks = engine.box.keyset
    apply(engine, Kind.ACCOUNTS, batch.encode_accounts([(GROUP, 3, 0, 0, 1, 0, 0)]))
    apply(engine, Kind.LINK, batch.encode_links([(ks.digest("LUNCH-0001"), GROUP)]))
    assert engine.handle(Scan(b"LUNCH-0001", "front")).accepted
    assert engine.handle(Scan(b"LUNCH-0001", "front")).reason is Reason.ALREADY_REDEEMED
    apply(engine, Kind.TOPUP, batch.encode_topups([(b"U" * 16, GROUP, 5)]))
    assert engine.handle(Scan(b"LUNCH-0001", "front")).uses_left == 4


def test_batches_naming_an_unknown_account_are_refused_with_nothing_applied(engine):
    family(engine, codes=("PHONE-1",))
    ks = engine.box.keyset
    before = engine.conn.execute("SELECT * FROM codes ORDER BY digest").fetchall()
    links = batch.encode_links([(ks.digest("PHONE-9"), FAMILY), (ks.digest("DEMO-0002"), GROUP)])
    with pytest.raises(batch_import.ImportRefused, match="accounts batch"):
        apply(engine, Kind.LINK, links, seq=engine.seq)
    topups = batch.encode_topups([(b"U" * 16, FAMILY, 5), (b"V" * 16, GROUP, 5)])
    with pytest.raises(batch_import.ImportRefused, match="accounts batch"):
        apply(engine, Kind.TOPUP, topups, seq=engine.seq)
    assert engine.conn.execute("SELECT * FROM codes ORDER BY digest").fetchall() == before
    assert account_row(engine)[4] == 10_000
    assert engine.conn.execute("SELECT COUNT(*) FROM topups_applied").fetchone()[0] == 0
    assert trust.state(engine.conn, "demo").last_seq == engine.seq - 1


def test_forged_and_truncated_account_batches_change_nothing(engine):
    family(engine)
    ks = engine.box.keyset
    before = engine.conn.execute("SELECT * FROM accounts").fetchall()
    good = ks.build(Kind.TOPUP, batch.encode_topups([(b"U" * 16, FAMILY, 5)]), engine.seq)
    forged = _forged(make_keyset(), Kind.TOPUP, batch.TOPUP_ENTRY.pack(b"U" * 16, FAMILY, 5))
    for data in (
        good[:-3],
        forged,
        _forged(ks, Kind.TOPUP, batch.TOPUP_ENTRY.pack(b"U" * 16, FAMILY, -5)),
    ):
        with pytest.raises(BatchError):
            batch.open_file(data, engine.box.config.trust.root_keys)
    assert engine.conn.execute("SELECT * FROM accounts").fetchall() == before


def test_consumed_elsewhere_spends_the_account_of_a_linked_code(engine):
    family(engine)
    ks = engine.box.keyset
    entry = (ks.digest("PHONE-2"), uuid.uuid4().bytes, 0, 4000)
    apply(engine, Kind.CONSUMED, batch.encode_consumed([entry]))
    assert account_row(engine)[4] == 6000
    assert engine.redeem("PHONE-1", "pos", amount=6001).reason is Reason.INSUFFICIENT_BALANCE


def test_a_snapshot_keeps_accounts_and_the_links_of_the_codes_it_lists(engine):
    family(engine)
    assert engine.redeem("GIFT-0001", "pos", amount=1000).accepted
    ks = engine.box.keyset
    rows = [(ks.digest("GIFT-0001"), 5, 0, 0, 0, 0, CodeStatus.ACTIVE)]
    apply(engine, Kind.SNAPSHOT, batch.encode_issue(rows))
    assert code_row(engine, "GIFT-0001")[6] == FAMILY
    # The unacknowledged redemption was not replayed onto the code: the account has it.
    assert code_row(engine, "GIFT-0001")[4] is None
    assert account_row(engine)[4] == 9000


def test_a_snapshot_keeps_a_code_that_only_a_link_made(engine):
    """PHONE-1 was never issued: the link made it. A snapshot of the issued codes does
    not list it, and the family's phone must still spend the account afterwards, while a
    linked code the backend revoked stays revoked."""
    family(engine, codes=("PHONE-1", "PHONE-2", "GIFT-0001"))
    ks = engine.box.keyset
    apply(engine, Kind.REVOKE, batch.encode_digests([ks.digest("PHONE-2")]))
    rows = [(ks.digest("GIFT-0001"), 5, 0, 0, 0, 0, CodeStatus.ACTIVE)]
    apply(engine, Kind.SNAPSHOT, batch.encode_issue(rows))
    assert code_row(engine, "PHONE-1")[6] == FAMILY
    assert engine.redeem("PHONE-1", "pos", amount=700).accepted
    assert account_row(engine)[4] == 9300
    assert engine.redeem("PHONE-2", "pos", amount=1).reason is Reason.REVOKED
    # A code that is neither listed nor linked is gone, as a snapshot says.
    assert code_row(engine, "DEMO-0001") is None


# ---------------------------------------------------------------- migration


def test_migration_keeps_every_code_and_record_of_the_previous_release(tmp_path, keyset):
    """A database made by the release before m009, with codes in every state and
    records waiting: after the upgrade every code keeps its state, none has an
    account, the records are unchanged, and the box redeems as before."""
    path = tmp_path / "redeemd.db"
    old = connect(path)
    migrations.apply(Database(old), stop_before="m009_accounts")
    box = write_box(tmp_path, keyset, debounce="0s")
    config = box.config
    for data in (
        keyset.cards_batch(1),
        keyset.issue_batch({"DEMO-0001": 1, "DEMO-0002": 1, "GIFT-0001": 5, "LUNCH-0001": 3}),
    ):
        batch_import.apply(
            old, batch.open_file(data, config.trust.root_keys), merchant="demo", now=CREATED
        )
    old.execute(
        "UPDATE codes SET status = 1, uses_left = 0 WHERE digest = ?", (keyset.digest("DEMO-0002"),)
    )
    old.execute("UPDATE codes SET balance = 1234 WHERE digest = ?", (keyset.digest("GIFT-0001"),))
    old.execute("UPDATE codes SET uses_left = 2 WHERE digest = ?", (keyset.digest("LUNCH-0001"),))
    old.execute(
        "INSERT INTO ledger(seq, id, at_ms, box, merchant, store, digest, card_id, action, "
        "verdict, source, cache_seq) VALUES (1, ?, 1, 'box-1', 'demo', 'store-1', ?, 1, "
        "'redeem', 'accepted', 'front', 2)",
        (uuid.uuid4().bytes, keyset.digest("DEMO-0002")),
    )
    before_codes = old.execute("SELECT * FROM codes ORDER BY digest").fetchall()
    before_ledger = old.execute("SELECT * FROM ledger").fetchall()
    old.close()

    conn = open_database(path)
    assert conn.execute("SELECT * FROM codes ORDER BY digest").fetchall() == [
        (*row, None, None) for row in before_codes
    ]
    assert conn.execute("SELECT * FROM ledger").fetchall() == [(*r, None) for r in before_ledger]
    assert conn.execute("SELECT COUNT(*) FROM accounts").fetchone()[0] == 0
    engine = Engine(conn, config, clock=Clock(CREATED + 60))
    assert engine.handle(Scan(b"DEMO-0002", "front")).reason is Reason.ALREADY_REDEEMED
    assert engine.handle(Scan(b"LUNCH-0001", "front")).uses_left == 1
    assert engine.redeem("GIFT-0001", "pos", amount=1234).accepted
    assert engine.handle(Scan(b"DEMO-0001", "front")).accepted
    assert [r.account for r in ledger.records(conn)] == [None] * 5
    assert outbox.depth(conn) == 5


def test_storage_reads_an_account_and_its_codes(engine):
    family(engine, codes=("PHONE-1", "GIFT-0001"))
    ks = engine.box.keyset
    assert codes.account(engine.conn, FAMILY) == codes.AccountRow(5, None, None, None, 10_000, 0)
    assert codes.account(engine.conn, GROUP) is None
    assert codes.linked_codes(engine.conn, FAMILY) == sorted(
        [ks.digest("PHONE-1"), ks.digest("GIFT-0001")]
    )
    assert codes.lookup(engine.conn, ks.digest("PHONE-1")).account == FAMILY
    # The accounts table is keyed like codes: one B-tree, no rowid.
    sql = engine.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'accounts'").fetchone()
    assert "WITHOUT ROWID" in sql[0]


# ---------------------------------------------------------------- the limit, as a property


@settings(max_examples=300, deadline=None)
@given(
    balance_card=st.booleans(),
    left=st.one_of(st.none(), st.integers(0, 50)),
    asked=st.integers(1, 60),
    per_redemption=st.one_of(st.none(), st.integers(0, 60)),
    per_account=st.one_of(st.none(), st.integers(0, 120)),
    spent=st.integers(0, 100),
)
def test_within_limit_accepts_exactly_what_the_caps_allow_and_refusals_change_nothing(
    balance_card, left, asked, per_redemption, per_account, spent
):
    card = Card(5, "demo", CardKind.GIFT if balance_card else CardKind.GROUPON, uses=3)
    code = CodeState(
        uses_left=None if balance_card else left, balance=(left or 0) if balance_card else None
    )
    ctx = Context(CREATED, 1, 600, "store-1", Action.REDEEM, asked if balance_card else None, asked)
    before = decide(card, code, ctx)
    limit = Limit(5, "*", per_redemption, per_account)
    after = within_limit(card, before, ctx.amount, ctx.uses, limit, spent)
    allowed = (per_redemption is None or asked <= per_redemption) and (
        per_account is None or spent + asked <= per_account
    )
    if before.outcome is not Outcome.ACCEPTED or allowed:
        assert after is before
        return
    assert after.reason is Reason.OFFLINE_LIMIT and not after.changed
    assert (after.uses_left, after.balance) == (code.uses_left, code.balance)
