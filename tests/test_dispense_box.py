"""Dispensing on the box (issue 12): the grant set it holds, claim codes committed before
they are shown, and the ways to dispense (local API, rules, `redeemd dispense`)."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import CREATED, FAR, KeySet

from cards import claim_code, grant, keys
from cards.grant import Grant
from storage import dispensing, ledger
from storage.database import open_database
from storage.dispensing import GrantsRefused

NOW = CREATED + 1000
LIVE = Grant("00000000000000aa", (1,), 3, CREATED, FAR)


def grant_set(
    keyset: KeySet,
    box_private: bytes,
    grants: tuple[Grant, ...] = (LIVE,),
    *,
    seq: int = 1,
    box: str = "box-1",
    merchant: str = "demo",
    created_at: int = CREATED,
) -> bytes:
    return grant.build(
        keyset.issuer_private, keyset.delegation, merchant=merchant, box=box,
        box_public=keys.public_of(box_private), seq=seq, created_at=created_at, grants=grants,
    )  # fmt: skip


@pytest.fixture
def box_private() -> bytes:
    return keys.new_private_key()


def install(conn, keyset, box_private, data, box="box-1"):
    return dispensing.install_grants(
        conn, data, keyset.roots, merchant="demo", box=box,
        box_key_id=keys.key_id(keys.public_of(box_private)),
    )  # fmt: skip


# ---------------------------------------------------------------------- storage


def test_a_grant_set_is_installed_once_and_never_rolled_back(tmp_path, keyset, box_private):
    conn = open_database(tmp_path / "box.db")
    assert dispensing.held_grants(conn, keyset.roots) is None
    second = grant_set(keyset, box_private, seq=2)
    installed = install(conn, keyset, box_private, second)
    assert (installed.applied, installed.seq) == (True, 2)
    held = dispensing.held_grants(conn, keyset.roots)
    assert held is not None and held.seq == 2 and held.grants == (LIVE,)

    again = install(conn, keyset, box_private, second)
    assert (again.applied, again.seq) == (False, 2), "the same set again is a no-op"

    with pytest.raises(GrantsRefused, match=r"older than the set held \(seq 2\)"):
        install(conn, keyset, box_private, grant_set(keyset, box_private, seq=1))
    other = grant_set(
        keyset, box_private, (LIVE, Grant("00000000000000bb", (2,), 9, 0, FAR)), seq=2
    )
    with pytest.raises(GrantsRefused, match="same seq and other contents"):
        install(conn, keyset, box_private, other)
    assert dispensing.held_grants(conn, keyset.roots).raw == second, "the held set is unchanged"


def test_a_grant_set_for_another_box_key_or_tampered_is_refused(tmp_path, keyset, box_private):
    conn = open_database(tmp_path / "box.db")
    with pytest.raises(GrantsRefused, match="for box 'box-2'"):
        install(conn, keyset, box_private, grant_set(keyset, box_private, box="box-2"))
    with pytest.raises(GrantsRefused, match="redeemd box-key"):
        install(conn, keyset, box_private, grant_set(keyset, keys.new_private_key()))
    good = bytearray(grant_set(keyset, box_private))
    good[-70] ^= 1
    with pytest.raises(GrantsRefused, match="nothing changed"):
        install(conn, keyset, box_private, bytes(good))
    assert dispensing.held_grants(conn, keyset.roots) is None


def _dispense_row(conn, seq: int, grant_id: str | None, counter: int | None) -> None:
    record_id, _ = ledger.new_id()
    ledger.append(
        conn, seq, record_id, NOW * 1000, "box-1", "demo", "s", b"\x01" * 16, 1, "dispense",
        1, None, None, None, "accepted", None, "api", None, None, 0, None, grant_id, counter,
    )  # fmt: skip


def test_a_counter_is_committed_once_per_grant_and_read_by_the_index(tmp_path):
    conn = open_database(tmp_path / "box.db")
    for seq, counter in enumerate((1, 2, 3), start=1):
        _dispense_row(conn, seq, "00000000000000aa", counter)
    _dispense_row(conn, 4, "00000000000000bb", 1)
    _dispense_row(conn, 5, None, None)  # a refusal uses no counter
    assert dispensing.used_counters(conn) == {"00000000000000aa": 3, "00000000000000bb": 1}
    assert dispensing.used_counters(conn, ["00000000000000aa", "00000000000000cc"]) == {
        "00000000000000aa": 3
    }
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        _dispense_row(conn, 6, "00000000000000aa", 2)
    plan = " ".join(
        row[-1]
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT MAX(counter) FROM ledger WHERE grant_id = ?", ("x",)
        )
    )
    assert "ledger_dispensed" in plan, plan
    record = list(ledger.records(conn))[0]
    assert (record.grant_id, record.counter) == ("00000000000000aa", 1)
    assert record.to_json()["counter"] == 1
    assert "grant_id" not in list(ledger.records(conn))[4].to_json()


# ---------------------------------------------------------------------- engine


def held_box(loaded_box, grants: tuple[Grant, ...] = (LIVE,), seq: int = 1):
    """The loaded box's engine, clock at NOW, holding `grants` for its own box key."""
    from daemon.box_key import load_or_create
    from daemon.engine import Engine

    key = load_or_create(loaded_box.dir)
    conn = open_database(loaded_box.database)
    data = grant_set(loaded_box.keyset, key.private, grants, seq=seq)
    dispensing.install_grants(
        conn, data, loaded_box.keyset.roots, merchant="demo", box="box-1", box_key_id=key.key_id
    )
    return Engine(conn, loaded_box.config, clock=lambda: NOW), key


def test_dispense_counts_up_to_the_quota_then_refuses_with_a_record(loaded_box):
    engine, key = held_box(loaded_box)
    first = engine.dispense(1, 2, key)
    assert [c.counter for c in first.claims] == [1, 2] and first.refused is None
    second = engine.dispense(1, 2, key)
    assert [c.counter for c in second.claims] == [3]
    assert second.refused is not None and second.refused.reason.value == "quota_exhausted"
    assert second.refused.box_seq == 4, "the refusal is a ledger record of its own"
    third = engine.dispense(1, 1, key)
    assert third.claims == () and third.refused.reason.value == "quota_exhausted"

    rows = list(ledger.records(engine.conn))
    assert [(r.action, r.verdict, r.grant_id, r.counter) for r in rows] == [
        ("dispense", "accepted", LIVE.id, 1),
        ("dispense", "accepted", LIVE.id, 2),
        ("dispense", "accepted", LIVE.id, 3),
        ("reject", "rejected", None, None),
        ("reject", "rejected", None, None),
    ]
    claims = [*first.claims, *second.claims]
    for claim, row in zip(claims, rows, strict=False):
        text = claim.url.removeprefix("https://claim.invalid/c/")
        code = claim_code.parse(text)
        assert claim_code.verify(code, key.public)
        assert (code.grant_id, code.counter, code.card_id) == (LIVE.id, claim.counter, 1)
        assert row.digest == loaded_box.keyset.digest(text), "the record holds the code's digest"
        assert code.claim_by == NOW + 30 * 86400
    assert rows[3].reason == "quota_exhausted" and rows[3].card_id == 1


def test_a_revoked_or_missing_grant_is_refused(loaded_box):
    from dataclasses import replace

    engine, key = held_box(loaded_box, (replace(LIVE, revoked=True),))
    refused = engine.dispense(1, 1, key).refused
    assert refused.reason.value == "grant_revoked" and refused.record_id is not None
    assert engine.dispense(2, 1, key).refused.reason.value == "no_grant"
