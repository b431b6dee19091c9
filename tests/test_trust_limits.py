"""Limits on what a valid signature can do: expired delegations, far-future signed
times, codes that outlive their issuer key, duplicate snapshot entries."""

from __future__ import annotations

import pytest
from conftest import CREATED, FAR, make_keyset, write_box

from cards import batch, signed_code
from cards.batch import CodeStatus, Kind
from daemon.engine import Engine
from storage import batch_import, codes, trust
from storage.batch_import import ImportRefused
from storage.database import open_database


def _apply(conn, box, data: bytes, now: int = CREATED, wall: int | None = None):
    parsed = batch.open_file(data, box.config.trust.root_keys)
    return batch_import.apply(conn, parsed, merchant="demo", now=now, wall=wall)


def test_batch_signed_while_delegated_is_refused_once_the_delegation_has_ended(tmp_path):
    keyset = make_keyset(not_after=CREATED + 100)
    box = write_box(tmp_path, keyset)
    conn = open_database(box.database)
    with pytest.raises(ImportRefused, match="delegated until"):
        _apply(conn, box, keyset.cards_batch(1), now=CREATED + 101)
    assert trust.state(conn, "demo").last_seq == 0


def test_far_future_batch_is_refused_when_the_clock_is_trusted(box, keyset):
    conn = open_database(box.database)
    future = keyset.cards_batch(1, created_at=CREATED + 10 * 86400)
    with pytest.raises(ImportRefused, match="ahead of this box's clock"):
        _apply(conn, box, future, now=CREATED, wall=CREATED)
    assert trust.time_floor(conn) == 0


def test_far_future_batch_is_accepted_when_the_clock_is_behind_the_floor(box, keyset):
    # A box without an RTC that booted in 1970 cannot judge "the future": it accepts.
    conn = open_database(box.database)
    _apply(conn, box, keyset.cards_batch(1), now=CREATED, wall=CREATED)
    later = keyset.issue_batch({"DEMO-0001": 1}, seq=2, created_at=CREATED + 90 * 86400)
    _apply(conn, box, later, now=CREATED, wall=0)
    assert trust.time_floor(conn) == CREATED + 90 * 86400


def test_snapshot_with_a_duplicate_digest_applies_instead_of_crashing(box, keyset):
    conn = open_database(box.database)
    _apply(conn, box, keyset.cards_batch(1))
    digest = keyset.digest("DEMO-0001")
    row = (digest, 1, 0, 0, 0, 0, CodeStatus.ACTIVE)
    entries = b"".join(batch.ISSUE_ENTRY.pack(*r) for r in (row, row))
    _apply(conn, box, keyset.build(Kind.SNAPSHOT, entries, seq=2))
    assert codes.count(conn) == 1


def test_signed_code_valid_beyond_its_issuer_delegation_is_refused(tmp_path):
    keyset = make_keyset(not_before=0, not_after=CREATED + 1000)
    box = write_box(tmp_path, keyset)
    conn = open_database(box.database)
    _apply(conn, box, keyset.cards_batch(1))
    engine = Engine(open_database(box.database), box.config, clock=lambda: CREATED + 1)
    inside = signed_code.mint(keyset.issuer_private, 1, 1, CREATED - 10, CREATED + 500)
    beyond = signed_code.mint(keyset.issuer_private, 1, 2, CREATED - 10, FAR)
    assert engine.check(inside).outcome.value == "accepted"
    verdict = engine.check(beyond)
    assert verdict.reason.value == "bad_signature"
    assert "delegation" in verdict.detail


def test_minted_codes_end_with_the_issuer_delegation(tmp_path, capsys):
    from backend.cli import main
    from backend.keystore import Keystore

    assert main(["keygen", "--dir", str(tmp_path)]) == 0
    assert main(["delegate", "--dir", str(tmp_path), "--merchant", "demo", "--days", "1"]) == 0
    capsys.readouterr()
    assert (
        main(["mint", "--dir", str(tmp_path), "--card", "1", "--serial", "1", "--days", "30"]) == 0
    )
    out = capsys.readouterr()
    code = signed_code.parse(out.out.strip())
    assert code.not_after == Keystore(tmp_path).delegation().not_after
    assert "delegation" in out.err
