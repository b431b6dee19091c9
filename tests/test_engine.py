"""The redemption engine on a real database: verdicts, recording, time floor, storage errors."""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest
from conftest import CREATED, DEMO_CARDS, FAR, Box, make_keyset, write_box

from cards import batch, keys, signed_code
from cards.batch import UNLIMITED, CodeStatus, Kind
from cards.digest import code_digest
from cards.normalize import OVERSIZED
from cards.scan import Scan, scanned
from cards.verdict import Action, Outcome, Reason, Verdict
from daemon.debounce import Repeat
from daemon.engine import Engine, PaymentCode
from storage import batch_import, codes, ledger, outbox
from storage.api_requests import RequestKey
from storage.database import open_database


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(CREATED + 60)


@pytest.fixture
def ticks() -> Clock:
    """The monotonic clock that times the debounce window."""
    return Clock(1000.0)


@pytest.fixture
def engine(loaded_box, clock) -> Engine:
    """An engine with no debounce, so repeats in a test are separate scans."""
    write_box(loaded_box.dir, loaded_box.keyset, debounce="0s")
    return Engine(open_database(loaded_box.database), loaded_box.config, clock=clock)


@pytest.fixture
def debounced(loaded_box, clock, ticks) -> Engine:
    """An engine with a 2 s debounce window on a monotonic clock the test moves by hand
    (it stands still unless the test moves it)."""
    write_box(loaded_box.dir, loaded_box.keyset, debounce="2s")
    return Engine(
        open_database(loaded_box.database), loaded_box.config, clock=clock, monotonic=ticks
    )


def scan(code: str | bytes, source: str = "front") -> Scan:
    return Scan(code=code.encode() if isinstance(code, str) else code, source=source)


def reason(result) -> str | None:
    assert isinstance(result, Verdict), result
    return result.reason.value if result.reason else None


def ledger_rows(engine: Engine) -> list[ledger.Redemption]:
    return list(ledger.records(engine.conn))


def apply(box, data: bytes, now: int = CREATED) -> None:
    conn = open_database(box.database)
    try:
        parsed = batch.open_file(data, box.config.trust.root_keys)
        batch_import.apply(conn, parsed, merchant="demo", now=now)
    finally:
        conn.close()


def issue_window(box, code: str, not_before: int, not_after: int, seq: int = 3) -> None:
    ks = box.keyset
    rows = [(ks.digest(code), 1, not_before, not_after, 0, 0, CodeStatus.ACTIVE)]
    apply(box, ks.build(Kind.ISSUE, batch.encode_issue(rows), seq))


# ---------------------------------------------------------------- plain verdicts


def test_first_scan_is_accepted_and_second_is_already_redeemed(engine):
    first = engine.handle(scan("DEMO-0001"))
    second = engine.handle(scan("DEMO-0001"))
    assert first.accepted and first.action is Action.REDEEM and first.card_id == 1
    assert first.record_id and first.box_seq == 1
    assert reason(second) == "already_redeemed" and second.box_seq == 2
    rows = ledger_rows(engine)
    assert [(r.verdict, r.reason) for r in rows] == [
        ("accepted", None),
        ("rejected", "already_redeemed"),
    ]
    assert rows[0].digest == code_digest(engine.config.trust.code_key, "DEMO-0001")
    row = codes.lookup(engine.conn, rows[0].digest)
    assert row.status == CodeStatus.CONSUMED and row.uses_left == 0


def test_unknown_code_is_rejected_and_recorded(engine):
    result = engine.handle(scan("NOPE-1234"))
    assert reason(result) == "unknown_code"
    assert result.box_seq == 1
    assert ledger_rows(engine)[0].reason == "unknown_code"


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfeDEMO", b"DEMO\x01-0001", b"A" * 600],
    ids=["invalid-utf8", "control-char", "oversized"],
)
def test_malformed_input_is_rejected_recorded_without_digest(engine, raw):
    result = engine.handle(scan(raw))
    assert reason(result) == "malformed"
    assert result.box_seq == 1
    (row,) = ledger_rows(engine)
    assert row.reason == "malformed" and row.action == "reject" and row.digest is None


# ---------------------------------------------------------------- debounce


def test_same_code_from_same_scanner_inside_window_is_one_scan(debounced):
    first = debounced.handle(scan("DEMO-0001"))
    repeat = debounced.handle(scan("DEMO-0001"))
    assert first.accepted
    assert repeat == Repeat(accepted=True, age=0.0)
    assert len(ledger_rows(debounced)) == 1


def test_same_malformed_read_inside_window_is_one_scan(debounced):
    assert reason(debounced.handle(scan(b"ju\x01nk"))) == "malformed"
    assert debounced.handle(scan(b"ju\x01nk")) == Repeat(accepted=False, age=0.0)
    assert len(ledger_rows(debounced)) == 1


def test_every_over_long_read_inside_the_window_is_recorded(debounced):
    # Each over-long read was discarded by its driver and arrives as the same marker:
    # the marker says nothing about which read it was, so none is a repeat of another.
    # The cashier hears a bad beep for each, and the backend counts each.
    verdicts = [debounced.handle(scan(OVERSIZED)) for _ in range(3)]
    assert [reason(v) for v in verdicts] == ["malformed"] * 3
    assert [v.box_seq for v in verdicts] == [1, 2, 3]
    rows = ledger_rows(debounced)
    assert [(r.reason, r.source, r.digest) for r in rows] == [("malformed", "front", None)] * 3
    # ... and they leave the debounce of real reads alone.
    assert debounced.handle(scan(b"ju\x01nk")).box_seq == 4
    assert isinstance(debounced.handle(scan(b"ju\x01nk")), Repeat)


def test_same_code_from_another_scanner_is_not_debounced(debounced):
    first = debounced.handle(scan("DEMO-0001", source="front"))
    other = debounced.handle(scan("DEMO-0001", source="back"))
    assert first.accepted
    assert reason(other) == "already_redeemed"
    assert len(ledger_rows(debounced)) == 2


def test_debounce_does_not_swallow_a_different_code(debounced):
    assert debounced.handle(scan("DEMO-0001")).accepted
    assert debounced.handle(scan("DEMO-0002")).accepted


def test_a_repeat_is_answered_as_the_read_it_repeats_not_as_the_last_read(debounced):
    # A, B, A, B inside the window: the scanner's beep for each repeat must be its own
    # read's verdict (a host-ACK scanner waits for an answer to every read).
    assert debounced.handle(scan("DEMO-0001")).accepted
    assert reason(debounced.handle(scan("NOPE-1234"))) == "unknown_code"
    assert debounced.handle(scan("DEMO-0001")) == Repeat(accepted=True, age=0.0)
    assert debounced.handle(scan("NOPE-1234")) == Repeat(accepted=False, age=0.0)


def test_a_repeat_says_how_long_ago_its_read_was(debounced, ticks):
    assert debounced.handle(scan("DEMO-0001")).accepted
    ticks.now += 1.5
    assert debounced.handle(scan("DEMO-0001")) == Repeat(accepted=True, age=1.5)


def test_a_scanner_held_over_a_code_stays_one_read_while_it_keeps_reading(debounced, ticks):
    # Each repeat restarts the window: a code held under the scanner is one read
    # however long it is held, as long as the reads keep coming.
    assert debounced.handle(scan("DEMO-0001")).accepted
    for _ in range(5):
        ticks.now += 1.9
        assert isinstance(debounced.handle(scan("DEMO-0001")), Repeat)
    assert len(ledger_rows(debounced)) == 1


def test_the_same_code_after_the_window_is_a_new_scan(debounced, ticks):
    assert debounced.handle(scan("DEMO-0001")).accepted
    ticks.now += 2.0
    again = debounced.handle(scan("DEMO-0001"))
    assert reason(again) == "already_redeemed" and again.box_seq == 2
    assert len(ledger_rows(debounced)) == 2


# ---------------------------------------------------------------- uses and balances


def test_multi_use_card_counts_down_then_refuses(engine):
    results = [engine.handle(scan("LUNCH-0001")) for _ in range(4)]
    assert [r.uses_left for r in results[:3]] == [2, 1, 0]
    assert all(r.accepted for r in results[:3])
    assert reason(results[3]) == "already_redeemed"


def test_unlimited_member_card_is_accepted_every_time(engine):
    results = [engine.handle(scan("MEMBER-0001")) for _ in range(5)]
    assert all(r.accepted for r in results)
    assert all(r.uses_left is None for r in results)


def test_code_issued_with_unlimited_uses_overrides_a_single_use_card(loaded_box, engine):
    ks = loaded_box.keyset
    rows = [(ks.digest("FOREVER-1"), 1, 0, 0, UNLIMITED, 0, CodeStatus.ACTIVE)]
    apply(loaded_box, ks.build(Kind.ISSUE, batch.encode_issue(rows), 3))
    assert all(engine.handle(scan("FOREVER-1")).accepted for _ in range(3))


def test_gift_card_scan_only_checks_and_records_a_check(engine):
    result = engine.handle(scan("GIFT-0001"))
    assert result.accepted and result.action is Action.CHECK
    assert result.balance == 5000
    (row,) = ledger_rows(engine)
    assert row.action == "check"
    assert engine.check("GIFT-0001").balance == 5000  # a check spends nothing


def test_gift_card_redeem_with_amount_decreases_the_balance(engine):
    first = engine.redeem("GIFT-0001", "pos", amount=1200)
    second = engine.redeem("GIFT-0001", "pos", amount=800)
    assert first.accepted and first.balance == 3800 and first.amount == 1200
    assert second.balance == 3000
    assert engine.check("GIFT-0001").balance == 3000
    assert [r.amount for r in ledger_rows(engine)] == [1200, 800]


def test_gift_card_redeem_beyond_balance_is_insufficient_balance(engine):
    result = engine.redeem("GIFT-0001", "pos", amount=5001)
    assert reason(result) == "insufficient_balance"
    assert engine.check("GIFT-0001").balance == 5000


@pytest.mark.parametrize("amount", [None, 0])
def test_gift_card_redeem_without_amount_is_amount_required(engine, amount):
    result = engine.redeem("GIFT-0001", "pos", amount=amount)
    assert reason(result) == "amount_required"
    assert engine.check("GIFT-0001").balance == 5000


# ---------------------------------------------------------------- reversal


def test_reverse_within_window_restores_the_code(engine, clock):
    redeemed = engine.handle(scan("DEMO-0001"))
    clock.now += 300
    reversed_ = engine.reverse(redeemed.record_id, "pos", operator="alice")
    assert reversed_.accepted and reversed_.action is Action.REVERSE
    assert engine.check("DEMO-0001").accepted
    row = ledger.by_id(engine.conn, uuid.UUID(reversed_.record_id).bytes)
    assert row.reverses == uuid.UUID(redeemed.record_id).bytes
    assert row.operator == "alice"
    assert engine.handle(scan("DEMO-0001")).accepted  # usable again


def test_reverse_of_a_gift_redemption_restores_the_balance(engine, clock):
    redeemed = engine.redeem("GIFT-0001", "pos", amount=2000)
    clock.now += 10
    result = engine.reverse(redeemed.record_id, "pos")
    assert result.accepted and result.balance == 5000
    assert engine.check("GIFT-0001").balance == 5000


def test_reverse_after_the_window_is_refused(engine, clock):
    redeemed = engine.handle(scan("DEMO-0001"))
    clock.now += 601
    result = engine.reverse(redeemed.record_id, "pos")
    assert reason(result) == "reversal_window_passed"
    assert reason(engine.check("DEMO-0001")) == "already_redeemed"


def test_reverse_twice_is_refused(engine, clock):
    redeemed = engine.handle(scan("DEMO-0001"))
    assert engine.reverse(redeemed.record_id, "pos").accepted
    assert engine.handle(scan("DEMO-0001")).accepted  # redeemed again after the reversal
    second = engine.reverse(redeemed.record_id, "pos")
    assert reason(second) == "already_reversed"
    assert reason(engine.check("DEMO-0001")) == "already_redeemed"


def test_reverse_of_a_card_without_window_is_refused(engine):
    redeemed = engine.handle(scan("LUNCH-0001"))  # card 3 has no reversal window
    assert reason(engine.reverse(redeemed.record_id, "pos")) == "not_reversible"
    assert engine.check("LUNCH-0001").uses_left == 2


def test_reverse_of_a_rejection_or_unknown_id_is_refused(engine):
    rejected = engine.handle(scan("NOPE-1"))
    assert reason(engine.reverse(rejected.record_id, "pos")) == "not_reversible"
    assert reason(engine.reverse(str(uuid.uuid4()), "pos")) == "not_reversible"
    assert reason(engine.reverse("not-a-uuid", "pos")) == "malformed"


# ---------------------------------------------------------------- signed codes


def mint(box, card: int = 1, serial: int = 1, private: bytes | None = None) -> str:
    return signed_code.mint(
        private or box.keyset.issuer_private, card, serial, CREATED - 100, CREATED + 86400
    )


def test_signed_code_is_accepted_offline_then_already_redeemed(loaded_box, engine):
    code = mint(loaded_box)
    assert codes.lookup(engine.conn, loaded_box.keyset.digest(code)) is None  # never listed
    first = engine.handle(scan(code))
    second = engine.handle(scan(code))
    assert first.accepted and first.card_id == 1
    assert reason(second) == "already_redeemed"
    assert engine.handle(scan(mint(loaded_box, serial=2))).accepted  # another serial


def test_signed_code_from_an_unknown_key_is_bad_signature(loaded_box, engine):
    result = engine.handle(scan(mint(loaded_box, private=keys.new_private_key())))
    assert reason(result) == "bad_signature"


def test_signed_code_with_a_forged_signature_is_bad_signature(loaded_box, engine):
    code = mint(loaded_box)
    index = 100  # inside the signature, away from the padding bits of the last character
    forged = code[:index] + ("A" if code[index] != "A" else "B") + code[index + 1 :]
    result = engine.handle(scan(forged))
    assert reason(result) == "bad_signature"
    assert engine.handle(scan(code)).accepted  # the genuine one is still unused


def test_signed_code_for_an_unknown_card_is_unknown_card(loaded_box, engine):
    assert reason(engine.handle(scan(mint(loaded_box, card=99)))) == "unknown_card"


def test_revoked_signed_code_is_revoked(loaded_box, engine):
    code = mint(loaded_box)
    apply(loaded_box, loaded_box.keyset.status_batch(Kind.REVOKE, [code], seq=3))
    assert reason(engine.handle(scan(code))) == "revoked"


def test_signed_code_outside_its_window_is_refused(loaded_box, engine, clock):
    code = signed_code.mint(loaded_box.keyset.issuer_private, 1, 5, CREATED, CREATED + 100)
    clock.now = CREATED + 101
    assert reason(engine.handle(scan(code))) == "expired"


# A delegation that starts before CREATED and ends a day after it.
DELEGATED_FROM = CREATED - 1000
DELEGATED_UNTIL = CREATED + 86400


@pytest.fixture
def delegated(tmp_path, clock) -> tuple[Box, Engine]:
    """A box whose issuer key is delegated for [DELEGATED_FROM, DELEGATED_UNTIL], with
    card 1 unbounded, card 6 valid from an hour after CREATED and card 7 valid for
    ever (valid_until far past the delegation)."""
    keyset = make_keyset(not_before=DELEGATED_FROM, not_after=DELEGATED_UNTIL)
    box = write_box(tmp_path, keyset, debounce="0s")
    cards = [
        *DEMO_CARDS,
        {"id": 6, "merchant": "demo", "kind": "coupon", "valid_from": CREATED + 3600},
        {"id": 7, "merchant": "demo", "kind": "coupon", "valid_until": FAR},
    ]
    apply(box, keyset.cards_batch(1, cards=cards))
    return box, Engine(open_database(box.database), box.config, clock=clock)


def test_signed_code_without_an_end_expires_with_its_issuer_delegation(delegated, clock):
    box, engine = delegated
    code = signed_code.mint(box.keyset.issuer_private, 1, 1, CREATED - 10, 0)
    assert engine.check(code).accepted
    clock.now = DELEGATED_UNTIL + 1
    result = engine.handle(scan(code))
    assert reason(result) == "expired" and str(DELEGATED_UNTIL) in result.detail


def test_signed_code_using_the_card_end_is_clipped_to_its_issuer_delegation(delegated, clock):
    box, engine = delegated
    code = signed_code.mint(box.keyset.issuer_private, 7, 1, CREATED - 10, 0)
    clock.now = DELEGATED_UNTIL
    assert engine.check(code).accepted
    clock.now = DELEGATED_UNTIL + 1
    assert reason(engine.handle(scan(code))) == "expired"


def test_signed_code_without_a_start_is_accepted_inside_its_issuer_delegation(delegated):
    box, engine = delegated
    code = signed_code.mint(box.keyset.issuer_private, 1, 1, 0, CREATED + 600)
    result = engine.handle(scan(code))
    assert result.accepted and result.card_id == 1


def test_signed_code_without_a_start_uses_the_card_start(delegated, clock):
    box, engine = delegated
    code = signed_code.mint(box.keyset.issuer_private, 6, 1, 0, CREATED + 7200)
    assert reason(engine.handle(scan(code))) == "not_yet_valid"
    clock.now = CREATED + 3600
    assert engine.handle(scan(code)).accepted


def test_signed_code_with_both_times_zero_is_valid_only_while_delegated(delegated, clock):
    box, engine = delegated
    code = signed_code.mint(box.keyset.issuer_private, 1, 1, 0, 0)
    assert engine.check(code).accepted
    clock.now = DELEGATED_UNTIL + 1
    assert reason(engine.check(code)) == "expired"


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [(DELEGATED_FROM - 1, 0), (0, DELEGATED_UNTIL + 1), (DELEGATED_FROM, DELEGATED_UNTIL + 1)],
    ids=["starts-before", "ends-after", "both-set-ends-after"],
)
def test_signed_code_naming_a_time_outside_its_delegation_is_bad_signature(
    delegated, not_before, not_after
):
    box, engine = delegated
    code = signed_code.mint(box.keyset.issuer_private, 1, 1, not_before, not_after)
    result = engine.handle(scan(code))
    assert reason(result) == "bad_signature" and "delegation" in result.detail


# ---------------------------------------------------------------- payment codes


@pytest.mark.parametrize(
    ("code", "scheme"),
    [("134567890123456789", "wechat"), ("281234567890123456", "alipay")],
)
def test_payment_code_is_passed_on_and_not_recorded(engine, code, scheme):
    result = engine.handle(scan(code))
    assert isinstance(result, PaymentCode)
    assert result.scheme == scheme and result.code == code and result.source == "front"
    assert "code" not in result.to_json()  # the event itself never carries the number
    assert ledger_rows(engine) == []
    assert outbox.depth(engine.conn) == 0


@pytest.fixture
def rejecting(loaded_box, clock) -> Engine:
    """An engine configured with `[scan] payment_codes = "reject"`."""
    write_box(loaded_box.dir, loaded_box.keyset, extra='payment_codes = "reject"', debounce="0s")
    return Engine(open_database(loaded_box.database), loaded_box.config, clock=clock)


def test_rejected_payment_code_is_recorded_without_its_digest(loaded_box, rejecting):
    code = "134567890123456789"
    result = rejecting.handle(scan(code))
    assert reason(result) == "payment_code" and result.box_seq == 1
    digest = code_digest(rejecting.config.trust.code_key, code)
    assert digest.hex()[:8] not in json.dumps(result.to_json())
    (row,) = ledger_rows(rejecting)
    assert row.reason == "payment_code" and row.action == "reject"
    assert row.digest is None and row.card_id is None
    assert outbox.depth(rejecting.conn) == 1  # the refusal itself still syncs
    blobs = b"".join(
        path.read_bytes() for path in loaded_box.dir.iterdir() if path.name.startswith("redeemd.db")
    )
    assert digest not in blobs and code.encode() not in blobs


def test_checked_payment_code_verdict_carries_no_digest(rejecting):
    code = "134567890123456789"
    result = rejecting.check(code)
    digest = code_digest(rejecting.config.trust.code_key, code)
    assert reason(result) == "payment_code"
    assert digest.hex()[:8] not in json.dumps(result.to_json())
    assert ledger_rows(rejecting) == []


# ---------------------------------------------------------------- clock and time floor


def test_clock_in_1970_is_floored_so_a_code_valid_around_created_is_accepted(loaded_box):
    issue_window(loaded_box, "WINDOW-1", CREATED - 10, CREATED + 10)
    engine = Engine(open_database(loaded_box.database), loaded_box.config, clock=lambda: 0.0)
    assert engine.now() == CREATED
    result = engine.handle(scan("WINDOW-1"))
    assert result.accepted
    assert ledger_rows(engine)[0].at_ms == CREATED * 1000


def test_clock_in_1970_cannot_revive_a_code_expired_by_the_floor(loaded_box):
    issue_window(loaded_box, "OLD-1", CREATED - 1000, CREATED - 500)
    engine = Engine(open_database(loaded_box.database), loaded_box.config, clock=lambda: 0.0)
    assert reason(engine.handle(scan("OLD-1"))) == "expired"


def test_engine_sees_a_batch_applied_by_another_connection(loaded_box, engine):
    assert reason(engine.handle(scan("LATE-1"))) == "unknown_code"
    apply(loaded_box, loaded_box.keyset.issue_batch({"LATE-1": 1}, seq=3, created_at=CREATED + 5))
    assert engine.handle(scan("LATE-1")).accepted
    assert engine.floor == CREATED + 5


# ---------------------------------------------------------------- storage errors


def _table_state(conn: sqlite3.Connection) -> tuple:
    return (
        conn.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM ledger").fetchone(),
        outbox.depth(conn),
        conn.execute("SELECT * FROM codes ORDER BY digest").fetchall(),
    )


def test_locked_database_rejects_as_storage_error_and_recovers_without_gap(loaded_box, engine):
    assert engine.handle(scan("DEMO-0001")).accepted
    engine.conn.execute("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(loaded_box.database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        before = _table_state(blocker)
        result = engine.handle(scan("DEMO-0002"))
        assert reason(result) == "storage_error"
        assert result.record_id is None and result.box_seq is None
        assert engine.alarm and "cannot write the ledger" in engine.alarm
        assert _table_state(blocker) == before
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    retry = engine.handle(scan("DEMO-0002"))
    assert retry.accepted and retry.box_seq == 2
    assert engine.alarm is None
    assert [r.seq for r in ledger_rows(engine)] == [1, 2]


def test_a_rescan_after_a_storage_error_is_tried_again_not_debounced(loaded_box, debounced):
    debounced.conn.execute("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(loaded_box.database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        assert reason(debounced.handle(scan("DEMO-0002"))) == "storage_error"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The cashier scans again at once: nothing was recorded, so this is a new try.
    assert debounced.handle(scan("DEMO-0002")).accepted
    assert debounced.handle(scan("DEMO-0002")) == Repeat(accepted=True, age=0.0)  # and now a repeat


def test_a_row_rolled_back_after_it_was_counted_leaves_no_gap_in_the_sequence(engine):
    # The engine counts a row before its COMMIT; a failure after that (here the request
    # key's own INSERT: a key stored twice breaks its UNIQUE constraint) rolls the row
    # back and the next record must still take the next number.
    key = RequestKey("pos-1", "f" * 64)
    assert engine.redeem("DEMO-0001", "api", request=key).box_seq == 1
    again = engine.redeem("DEMO-0002", "api", request=key)
    assert reason(again) == "storage_error" and again.box_seq is None
    assert engine.handle(scan("DEMO-0003")).box_seq == 2
    assert [r.seq for r in ledger_rows(engine)] == [1, 2]


def test_full_database_rejects_as_storage_error_and_recovers_without_gap(engine):
    conn = engine.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    failed = None
    for i in range(5000):  # fill the free space in the last pages, then hit the cap
        result = engine.handle(scan(f"FILLER-{i:05d}-" + "x" * 100))
        if reason(result) == "storage_error":
            failed = result
            break
    assert failed is not None, "the page cap was never reached"
    assert failed.box_seq is None and failed.record_id is None
    assert engine.alarm and "full" in engine.alarm
    recorded = ledger_rows(engine)
    assert [r.seq for r in recorded] == list(range(1, len(recorded) + 1))
    assert outbox.depth(conn) == len(recorded)
    assert conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0] == 13
    # Disk space comes back.
    conn.execute(f"PRAGMA max_page_count = {pages * 100}")
    accepted = engine.handle(scan("DEMO-0003"))
    assert accepted.accepted and accepted.box_seq == len(recorded) + 1
    assert engine.alarm is None


def test_storage_error_on_a_redemption_leaves_the_code_unredeemed(loaded_box, engine):
    engine.conn.execute("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(loaded_box.database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        assert reason(engine.redeem("GIFT-0001", "pos", amount=100)) == "storage_error"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert engine.check("GIFT-0001").balance == 5000
    assert ledger_rows(engine) == []


# ---------------------------------------------------------------- the ledger record


def test_ledger_box_sequence_is_gap_free_with_uuid7_ids(engine):
    inputs = ["DEMO-0001", "DEMO-0001", "NOPE", b"\xff", "LUNCH-0001", "GIFT-0001"]
    results = [engine.handle(scan(code)) for code in inputs]
    results.append(engine.redeem("GIFT-0001", "pos", amount=10))
    rows = ledger_rows(engine)
    assert [r.seq for r in rows] == list(range(1, len(inputs) + 2))
    assert [r.box_seq for r in results] == [r.seq for r in rows]
    ids = [uuid.UUID(bytes=r.id) for r in rows]
    assert all(i.version == 7 for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # time-ordered
    assert outbox.seqs_waiting(engine.conn, range(1, 101)) == [r.seq for r in rows]
    first = rows[0]
    assert (first.box, first.merchant, first.store, first.cache_seq) == (
        "box-1",
        "demo",
        "store-1",
        2,
    )


def test_verdict_record_id_is_the_stored_uuid7_id(engine):
    results = [engine.handle(scan(code)) for code in ("DEMO-0001", "DEMO-0001", "NOPE", b"\xff")]
    rows = ledger_rows(engine)
    assert [r.record_id for r in results] == [str(uuid.UUID(bytes=r.id)) for r in rows]
    assert all(uuid.UUID(r.record_id).variant == uuid.RFC_4122 for r in results)


@pytest.mark.parametrize("make", [ledger.new_id, ledger.RecordIds()], ids=["shared", "engine's"])
def test_record_ids_made_in_one_millisecond_still_increase(make):
    made = [make() for _ in range(2000)]  # past the end of the random pool many times
    while len({int.from_bytes(m[0]) >> 80 for m in made}) < 5:  # five milliseconds at least
        made.append(make())
    raw = [m[0] for m in made]
    assert raw == sorted(raw) and len(set(raw)) == len(raw)
    # The first id of each millisecond shows its random bits (later ones may be the last
    # plus one): fresh ones each time, not the same slice of the pool.
    first: dict[int, int] = {}
    for value in map(int.from_bytes, raw):
        first.setdefault(value >> 80, value & ((1 << 80) - 1))
    assert len(set(first.values())) == len(first)
    for value, text in made:
        parsed = uuid.UUID(text)
        assert (parsed.bytes, parsed.version, parsed.variant) == (value, 7, uuid.RFC_4122)


def test_a_new_engine_continues_the_box_sequence(loaded_box, engine, clock):
    engine.handle(scan("DEMO-0001"))
    engine.handle(scan("DEMO-0002"))
    again = Engine(open_database(loaded_box.database), loaded_box.config, clock=clock)
    assert again.handle(scan("DEMO-0003")).box_seq == 3


def test_no_plaintext_code_reaches_the_database_files(loaded_box, engine):
    texts = ["DEMO-0001", "NOPE-SECRET-42", "GIFT-0001", "134567890123456789"]
    for text in texts:
        engine.handle(scan(text))
    engine.redeem("GIFT-0001", "pos", amount=5)
    engine.check("DEMO-0002")
    blobs = b"".join(
        path.read_bytes() for path in loaded_box.dir.iterdir() if path.name.startswith("redeemd.db")
    )
    assert len(ledger_rows(engine)) == 4  # the payment code is never recorded
    for text in [*texts, "DEMO-0002"]:
        assert text.encode() not in blobs, text
    assert Outcome.ACCEPTED.value.encode() in blobs  # the scan found real ledger bytes


def test_check_records_nothing(engine):
    result = engine.check("DEMO-0001")
    assert result.accepted and result.action is Action.CHECK
    assert result.record_id is None
    assert ledger_rows(engine) == []
    assert reason(engine.check("NOPE")) == Reason.UNKNOWN_CODE


def test_the_ledger_records_the_aim_identifier_a_scanner_sent_or_the_camera_named(engine):
    engine.handle(scanned(b"]Q1DEMO-0001", "front", 0.0))  # as a serial or wedge driver does
    engine.handle(Scan(code=b"DEMO-0002", source="cam", symbology="]Q1"))  # camera
    engine.handle(scanned(b"DEMO-0003", "front", 0.0))
    assert [row.symbology for row in ledger_rows(engine)] == ["]Q1", "]Q1", None]
