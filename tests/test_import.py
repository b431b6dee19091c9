"""Applying signed batches: all or nothing, never backwards, through the API and the CLI."""

from __future__ import annotations

import sqlite3
import uuid

import pytest
from conftest import CREATED, DEMO_CARDS, FAR, KeySet, make_keyset, write_box
from sqlite_utils import Database

from cards import batch, signed_code
from cards.batch import CodeStatus, Kind
from cards.scan import Scan
from daemon.engine import Engine
from storage import batch_import, codes, ledger, trust
from storage.batch_import import BatchConflict, ImportRefused, SequenceGap
from storage.database import connect, open_database
from storage.migrations import migrations
from sync import acks

DEMO_CODES = {
    **{f"DEMO-{i:04d}": 1 for i in range(1, 11)},
    "GIFT-0001": 5,
    "LUNCH-0001": 3,
    "MEMBER-0001": 4,
}


def _apply(conn, box, data: bytes, now: int = CREATED, merchant: str = "demo"):
    parsed = batch.open_file(data, box.config.trust.root_keys)
    return batch_import.apply(conn, parsed, merchant=merchant, now=now)


def _dump(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    """Everything a batch may touch, in a comparable form."""
    tables = ("codes", "trust", "batches", "cards", "issuer_keys", "consumed_seen")
    return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def _engine(box, now: float = CREATED + 1) -> tuple[sqlite3.Connection, Engine]:
    """A connection for importing and an engine on its own connection, as in the daemon
    (the engine notices other connections' commits through PRAGMA data_version)."""
    engine = Engine(open_database(box.database), box.config, clock=lambda: now)
    return open_database(box.database), engine


def _reason(verdict) -> str:
    return verdict.reason.value if verdict.reason else verdict.outcome.value


@pytest.fixture
def conn(loaded_box):
    connection = open_database(loaded_box.database)
    yield connection
    connection.close()


# ---------------------------------------------------------------- applying through the API


def test_cards_and_issue_batches_fill_the_cache_and_trust_state(box, keyset):
    conn = open_database(box.database)
    first = _apply(conn, box, keyset.cards_batch(1))
    second = _apply(conn, box, keyset.issue_batch(DEMO_CODES, seq=2))
    assert (first.kind, first.count, first.replay) == (Kind.CARDS, 5, False)
    assert (second.kind, second.count) == (Kind.ISSUE, 13)
    assert "applied issue batch demo/2: 13 entries" in second.describe()
    assert codes.count(conn) == 13
    assert sorted(trust.cards(conn)) == [1, 2, 3, 4, 5]
    row = codes.lookup(conn, keyset.digest("LUNCH-0001"))
    assert row is not None and row.card_id == 3 and row.status == CodeStatus.ACTIVE
    assert trust.state(conn, "demo").last_seq == 2
    assert [r[0] for r in conn.execute("SELECT seq FROM batches ORDER BY seq")] == [1, 2]


def test_replayed_batch_is_a_noop_and_says_so(loaded_box, keyset, conn):
    before = _dump(conn)
    result = _apply(conn, loaded_box, keyset.issue_batch(DEMO_CODES, seq=2))
    assert result.replay is True
    assert "already applied; nothing to do" in result.describe()
    assert _dump(conn) == before


def test_replayed_issue_batch_does_not_restore_a_redeemed_code(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    assert engine.redeem("DEMO-0001", "pos").accepted
    _apply(conn, loaded_box, keyset.issue_batch(DEMO_CODES, seq=2))
    assert _reason(engine.check("DEMO-0001")) == "already_redeemed"


def test_older_sequence_is_refused_as_rollback(loaded_box, keyset, conn):
    # A snapshot may jump ahead; the skipped sequence numbers are then in the past.
    _apply(conn, loaded_box, keyset.build(Kind.SNAPSHOT, batch.encode_issue([]), seq=5))
    before = _dump(conn)
    with pytest.raises(ImportRefused, match=r"older than the applied sequence 5.*rollback"):
        _apply(conn, loaded_box, keyset.issue_batch({"LATE-0001": 1}, seq=3))
    assert _dump(conn) == before


def test_different_batch_with_an_applied_sequence_is_refused(loaded_box, keyset, conn):
    before = _dump(conn)
    forged = keyset.issue_batch({"EVIL-0001": 1}, seq=2)
    with pytest.raises(ImportRefused, match="a different batch demo/2 was already applied"):
        _apply(conn, loaded_box, forged)
    assert _dump(conn) == before
    assert codes.lookup(conn, keyset.digest("EVIL-0001")) is None


def resigned(keyset: KeySet, data: bytes, created_at: int = CREATED + 500) -> bytes:
    """The same batch signed again later, as a backend does for a box back from offline."""
    return batch.resign(
        data, keyset.issuer_private, keyset.delegation, created_at=created_at, expires_at=FAR
    )


def test_a_resigned_batch_with_an_applied_sequence_is_a_replay_not_a_conflict(
    loaded_box, keyset, conn
):
    again = resigned(keyset, keyset.issue_batch(DEMO_CODES, seq=2))
    assert batch.open_file(again, keyset.roots).header.created_at == CREATED + 500
    before = _dump(conn)
    result = _apply(conn, loaded_box, again, now=CREATED + 600)
    assert result.replay
    assert _dump(conn) == before


def test_same_sequence_and_entries_but_another_kind_is_a_conflict(loaded_box, keyset, conn):
    _apply(conn, loaded_box, keyset.status_batch(Kind.REVOKE, ["DEMO-0001"], seq=3))
    before = _dump(conn)
    with pytest.raises(BatchConflict, match="possible key compromise"):
        _apply(conn, loaded_box, keyset.status_batch(Kind.BLOCK, ["DEMO-0001"], seq=3))
    assert _dump(conn) == before


def test_a_batch_applied_before_entries_hashes_were_kept_is_still_a_replay_when_resigned(
    tmp_path, keyset
):
    # A database made by the version before migration m004: batches 1 and 2 recorded
    # without entries_sha256, exactly as that version inserted them.
    box = write_box(tmp_path, keyset)
    conn = connect(box.database)
    migrations.apply(Database(conn), stop_before="m004_batch_entries_sha256")
    cards, codes_batch = (
        batch.open_file(keyset.cards_batch(1), keyset.roots),
        batch.open_file(keyset.issue_batch(DEMO_CODES, seq=2), keyset.roots),
    )
    for parsed in (cards, codes_batch):
        h = parsed.header
        conn.execute(
            "INSERT INTO batches(merchant, seq, kind, sha256, count, created_at, applied_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (h.merchant, h.seq, h.kind.value, h.sha256, h.count, h.created_at, CREATED),
        )
    trust.save_state(conn, "demo", 2, CREATED, CREATED)
    conn.close()

    conn = open_database(box.database)  # runs m004
    assert conn.execute("SELECT seq, entries_sha256 FROM batches ORDER BY seq").fetchall() == [
        (1, None),
        (2, None),
    ]
    again = resigned(keyset, keyset.issue_batch(DEMO_CODES, seq=2))
    assert _apply(conn, box, again, now=CREATED + 600).replay
    with pytest.raises(BatchConflict):
        _apply(conn, box, keyset.status_batch(Kind.REVOKE, ["DEMO-0001"], seq=2))
    # Batches applied from now on keep their entries hash.
    _apply(conn, box, keyset.issue_batch({"NEW-0001": 1}, seq=3))
    stored = conn.execute("SELECT entries_sha256 FROM batches WHERE seq = 3").fetchone()[0]
    assert (
        stored
        == batch.open_file(
            keyset.issue_batch({"NEW-0001": 1}, seq=3), keyset.roots
        ).header.entries_sha256
    )
    conn.close()


def test_sequence_gap_is_refused_naming_the_missing_range(loaded_box, keyset, conn):
    before = _dump(conn)
    with pytest.raises(SequenceGap) as caught:
        _apply(conn, loaded_box, keyset.issue_batch({"NEW-0001": 1}, seq=6))
    assert (caught.value.first_missing, caught.value.last_missing) == (3, 5)
    assert "batches 3..5" in str(caught.value)
    assert _dump(conn) == before


def test_expired_batch_is_refused(loaded_box, keyset, conn):
    before = _dump(conn)
    stale = keyset.issue_batch(
        {"NEW-0001": 1}, seq=3, created_at=CREATED - 100, expires_at=CREATED - 1
    )
    with pytest.raises(ImportRefused, match="expired"):
        _apply(conn, loaded_box, stale)
    assert _dump(conn) == before


def test_batch_expired_by_the_time_floor_is_refused_even_with_an_early_clock(
    loaded_box, keyset, conn
):
    # The caller's clock says 1970, but the box has verified CREATED already.
    stale = keyset.issue_batch(
        {"NEW-0001": 1}, seq=3, created_at=CREATED - 100, expires_at=CREATED - 1
    )
    with pytest.raises(ImportRefused, match="expired"):
        _apply(conn, loaded_box, stale, now=0)


def test_batch_for_another_merchant_is_refused(tmp_path):
    keyset = make_keyset(("demo", "other"))
    box = write_box(tmp_path, keyset)
    conn = open_database(box.database)
    _apply(conn, box, keyset.cards_batch(1))
    before = _dump(conn)
    other = keyset.issue_batch({"OTHER-0001": 1}, seq=2, merchant="other")
    with pytest.raises(ImportRefused, match="merchant 'other' but this box serves 'demo'"):
        _apply(conn, box, other)
    assert _dump(conn) == before


def test_cards_batch_with_a_card_of_another_merchant_changes_nothing(tmp_path):
    keyset = make_keyset(("demo",))
    box = write_box(tmp_path, keyset)
    conn = open_database(box.database)
    bad = keyset.cards_batch(
        1,
        cards=[
            {"id": 1, "merchant": "demo", "kind": "coupon"},
            {"id": 2, "merchant": "other", "kind": "coupon"},
        ],
    )
    before = _dump(conn)
    with pytest.raises(ImportRefused, match="card 2 belongs to another merchant"):
        _apply(conn, box, bad)
    assert _dump(conn) == before


# ---------------------------------------------------------------- status batches and verdicts


def test_revoke_batch_makes_the_code_revoked(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    assert engine.check("DEMO-0001").accepted
    _apply(conn, loaded_box, keyset.status_batch(Kind.REVOKE, ["DEMO-0001"], seq=3))
    assert _reason(engine.check("DEMO-0001")) == "revoked"
    assert engine.check("DEMO-0002").accepted


def test_a_scan_sees_a_card_and_codes_another_connection_just_imported(loaded_box, keyset):
    # The scan path checks PRAGMA data_version inline (daemon/engine.py, _look_up): a new
    # card must be known to the very next scan, not only to checks.
    conn, engine = _engine(loaded_box)
    assert _reason(engine.handle(Scan(b"NEW-0001", "front"))) == "unknown_code"
    cards = [*DEMO_CARDS, {"id": 6, "merchant": "demo", "kind": "coupon", "title": "Tea"}]
    _apply(conn, loaded_box, keyset.cards_batch(3, cards))
    _apply(conn, loaded_box, keyset.issue_batch({"NEW-0001": 6}, seq=4))
    verdict = engine.handle(Scan(b"NEW-0001", "back"))  # another scanner: no debounce
    assert verdict.accepted and verdict.card_id == 6


def test_block_then_unblock_batches_toggle_the_verdict(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    _apply(conn, loaded_box, keyset.status_batch(Kind.BLOCK, ["DEMO-0003"], seq=3))
    assert _reason(engine.check("DEMO-0003")) == "blocked"
    _apply(conn, loaded_box, keyset.status_batch(Kind.UNBLOCK, ["DEMO-0003"], seq=4))
    assert engine.check("DEMO-0003").accepted


def test_unblock_does_not_reactivate_a_revoked_code(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    _apply(conn, loaded_box, keyset.status_batch(Kind.REVOKE, ["DEMO-0004"], seq=3))
    _apply(conn, loaded_box, keyset.status_batch(Kind.UNBLOCK, ["DEMO-0004"], seq=4))
    assert _reason(engine.check("DEMO-0004")) == "revoked"


def _consumed(keyset: KeySet, rows: list[tuple[str, bytes, int, int]], seq: int) -> bytes:
    entries = batch.encode_consumed(
        (keyset.digest(c), rid, uses, amount) for c, rid, uses, amount in rows
    )
    return keyset.build(Kind.CONSUMED, entries, seq)


def test_consumed_elsewhere_batch_uses_up_codes_and_balances(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    rows = [
        ("DEMO-0005", uuid.uuid4().bytes, 1, 0),
        ("LUNCH-0001", uuid.uuid4().bytes, 1, 0),
        ("GIFT-0001", uuid.uuid4().bytes, 0, 1500),
    ]
    _apply(conn, loaded_box, _consumed(keyset, rows, seq=3))
    assert _reason(engine.check("DEMO-0005")) == "already_redeemed"
    lunch = engine.check("LUNCH-0001")
    assert lunch.accepted and lunch.uses_left == 2
    gift = engine.check("GIFT-0001")
    assert gift.accepted and gift.balance == 3500


def test_consumed_elsewhere_for_this_boxs_own_record_is_skipped(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    own = engine.redeem("LUNCH-0001", "pos")
    assert own.accepted and own.uses_left == 2
    own_id = uuid.UUID(own.record_id).bytes
    _apply(conn, loaded_box, _consumed(keyset, [("LUNCH-0001", own_id, 1, 0)], seq=3))
    assert engine.check("LUNCH-0001").uses_left == 2


def test_consumed_elsewhere_record_applied_twice_counts_once(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    other = uuid.uuid4().bytes
    _apply(conn, loaded_box, _consumed(keyset, [("LUNCH-0001", other, 1, 0)], seq=3))
    # The same record again, in a later batch (the backend resent it).
    _apply(conn, loaded_box, _consumed(keyset, [("LUNCH-0001", other, 1, 0)], seq=4))
    assert engine.check("LUNCH-0001").uses_left == 2
    # And the very same batch replayed is a no-op too.
    result = _apply(conn, loaded_box, _consumed(keyset, [("LUNCH-0001", other, 1, 0)], seq=4))
    assert result.replay
    assert engine.check("LUNCH-0001").uses_left == 2


# ---------------------------------------------------------------- snapshots


def test_snapshot_replaces_the_cache_but_keeps_local_unacked_redemptions(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    assert engine.redeem("DEMO-0001", "pos").accepted
    assert engine.redeem("LUNCH-0001", "pos").uses_left == 2
    assert engine.redeem("GIFT-0001", "pos", amount=1000).balance == 4000
    rows = [
        (keyset.digest(code), card, 0, 0, 0, 0, CodeStatus.ACTIVE)
        for code, card in {"DEMO-0001": 1, "LUNCH-0001": 3, "GIFT-0001": 5, "NEW-0001": 1}.items()
    ]
    result = _apply(conn, loaded_box, keyset.build(Kind.SNAPSHOT, batch.encode_issue(rows), seq=3))
    assert result.kind is Kind.SNAPSHOT
    assert codes.count(conn) == 4
    assert _reason(engine.check("DEMO-0002")) == "unknown_code"  # not in the snapshot
    assert engine.check("NEW-0001").accepted
    # The backend has not acknowledged these three, so the box keeps what it did.
    assert _reason(engine.check("DEMO-0001")) == "already_redeemed"
    assert engine.check("LUNCH-0001").uses_left == 2
    assert engine.check("GIFT-0001").balance == 4000


def test_snapshot_after_ack_takes_the_backends_view(loaded_box, keyset):
    conn, engine = _engine(loaded_box)
    assert engine.redeem("LUNCH-0001", "pos").accepted
    everything = ledger.last_seq(conn)  # the backend acknowledged everything
    acks.apply(conn, acks.Ack(everything, ()), sent_upto=everything)
    rows = [(keyset.digest("LUNCH-0001"), 3, 0, 0, 1, 0, CodeStatus.ACTIVE)]
    _apply(conn, loaded_box, keyset.build(Kind.SNAPSHOT, batch.encode_issue(rows), seq=3))
    assert engine.check("LUNCH-0001").uses_left == 1


def test_snapshot_may_skip_ahead_of_a_gap(loaded_box, keyset, conn):
    _apply(conn, loaded_box, keyset.build(Kind.SNAPSHOT, batch.encode_issue([]), seq=9))
    assert trust.state(conn, "demo").last_seq == 9
    assert codes.count(conn) == 0


# ---------------------------------------------------------------- time floor and issuers


def test_time_floor_rises_to_created_at_and_never_goes_down(loaded_box, keyset, conn):
    assert trust.time_floor(conn) == CREATED
    _apply(conn, loaded_box, keyset.issue_batch({"A-1": 1}, seq=3, created_at=CREATED + 500))
    assert trust.time_floor(conn) == CREATED + 500
    # A newer sequence signed earlier (clock skew on the backend) does not lower it.
    _apply(conn, loaded_box, keyset.issue_batch({"A-2": 1}, seq=4, created_at=CREATED + 100))
    assert trust.time_floor(conn) == CREATED + 500
    assert trust.state(conn, "demo").last_seq == 4
    engine = Engine(conn, loaded_box.config, clock=lambda: 0.0)
    assert engine.now() == CREATED + 500


def test_issuer_delegation_is_remembered_so_signed_codes_verify(box, keyset):
    conn, engine = _engine(box)
    code = signed_code.mint(keyset.issuer_private, 1, 77, CREATED - 100, CREATED + 1000)
    assert _reason(engine.check(code)) == "bad_signature"  # issuer not known yet
    _apply(conn, box, keyset.cards_batch(1))
    stored = conn.execute("SELECT key_id FROM issuer_keys").fetchall()
    assert stored == [(keyset.delegation.key_id,)]
    assert keyset.delegation.key_id in trust.issuers(conn, box.config.trust.root_keys)
    assert engine.check(code).accepted
    # A fresh engine (a restart) still knows the issuer from the database.
    assert Engine(conn, box.config, clock=lambda: CREATED + 1).check(code).accepted


# ---------------------------------------------------------------- the real CLI


def test_cli_import_applies_cards_and_issue(box, keyset):
    files = [
        box.write_batch("0002.rdb", keyset.issue_batch(DEMO_CODES, seq=2)),
        box.write_batch("0001.rdb", keyset.cards_batch(1)),
    ]
    # Given out of order: the CLI applies them in sequence order.
    result = box.cli("import", *map(str, files))
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "applied cards batch demo/1: 5 entries" in out
    assert "applied issue batch demo/2: 13 entries" in out
    conn = open_database(box.database)
    assert codes.count(conn) == 13


def test_cli_import_of_a_replayed_batch_says_nothing_to_do(loaded_box, keyset):
    path = loaded_box.write_batch("0002.rdb", keyset.issue_batch(DEMO_CODES, seq=2))
    conn = open_database(loaded_box.database)
    before = _dump(conn)
    result = loaded_box.cli("import", str(path))
    assert result.returncode == 0, result.stderr.decode()
    assert "already applied; nothing to do" in result.stdout.decode()
    assert _dump(conn) == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda ks: ks.issue_batch({"NEW-0001": 1}, seq=5),
            "batches 3..4 for merchant 'demo' are missing; apply them first: on the backend, "
            "`redeemd-backend export 3-4 --merchant demo",
        ),
        (
            lambda ks: ks.issue_batch({"EVIL-0001": 1}, seq=2),
            "a different batch demo/2 was already applied; refusing the conflicting one "
            "(possible key compromise",
        ),
        (
            lambda ks: ks.issue_batch(
                {"NEW-0001": 1}, seq=3, created_at=CREATED - 100, expires_at=CREATED - 1
            ),
            "expired at 2026-09-21 14:13:19 UTC (1789999999); `redeemd-backend export 3 "
            "--merchant demo",
        ),
    ],
    ids=["gap", "conflicting-seq", "expired"],
)
def test_cli_import_refuses_and_changes_nothing(loaded_box, keyset, make, message):
    path = loaded_box.write_batch("bad.rdb", make(keyset))
    conn = open_database(loaded_box.database)
    before = _dump(conn)
    result = loaded_box.cli("import", str(path))
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "refused, nothing applied" in err and message in err
    assert "Traceback" not in err
    assert _dump(conn) == before


def test_cli_import_refuses_a_batch_for_another_merchant(tmp_path):
    keyset = make_keyset(("demo", "other"))
    box = write_box(tmp_path, keyset)
    path = box.write_batch(
        "other.rdb",
        keyset.cards_batch(
            1, merchant="other", cards=[{"id": 1, "merchant": "other", "kind": "coupon"}]
        ),
    )
    result = box.cli("import", str(path))
    assert result.returncode != 0
    assert "this box serves 'demo'" in result.stderr.decode()
    conn = open_database(box.database)
    assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


def test_cli_import_of_revoke_changes_the_cli_verdict(loaded_box, keyset):
    path = loaded_box.write_batch("0003.rdb", keyset.status_batch(Kind.REVOKE, ["DEMO-0009"], 3))
    assert loaded_box.cli("import", str(path)).returncode == 0
    result = loaded_box.cli("check", "DEMO-0009")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("rejected: revoked")


def test_cli_import_of_several_files_records_times_on_the_raised_floor(box, keyset):
    # The real clock is earlier than CREATED: once batch 1 is verified, the box's time
    # is floored there, so batch 2 is recorded as applied no earlier than that.
    files = [
        box.write_batch("0001.rdb", keyset.cards_batch(1, created_at=CREATED)),
        box.write_batch("0002.rdb", keyset.issue_batch(DEMO_CODES, seq=2, created_at=CREATED)),
    ]
    result = box.cli("import", *map(str, files))
    assert result.returncode == 0, result.stderr.decode()
    conn = open_database(box.database)
    applied = dict(conn.execute("SELECT seq, applied_at FROM batches").fetchall())
    assert applied[2] >= CREATED
    assert conn.execute("SELECT updated_at FROM trust").fetchone()[0] >= CREATED


def test_batch_that_does_not_fit_on_disk_changes_nothing_and_keeps_its_error(
    loaded_box, keyset, conn
):
    big = keyset.issue_batch({f"BULK-{i:06d}": 1 for i in range(5000)}, seq=3)
    before = _dump(conn)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        _apply(conn, loaded_box, big)
    assert not conn.in_transaction
    assert _dump(conn) == before
    conn.execute(f"PRAGMA max_page_count = {pages * 1000}")
    assert _apply(conn, loaded_box, big).count == 5000
    assert codes.count(conn) == 13 + 5000
