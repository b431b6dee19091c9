"""storage.ledger.append: the one writer of ledger rows, which owns their column order."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from storage import ledger
from storage.database import open_database


def test_append_takes_its_values_in_the_ledgers_column_order():
    # The engine passes the values positionally; the names here must be the columns,
    # in order, so that a column added or moved cannot shift them silently.
    names = list(inspect.signature(ledger.append).parameters)[1:]
    assert [("id" if n == "record_id" else n) for n in names] == list(ledger.COLUMNS)
    assert [f.name for f in dataclasses.fields(ledger.Redemption)] == list(ledger.COLUMNS)


def test_an_appended_row_reads_back_as_the_record_it_was(tmp_path):
    conn = open_database(tmp_path / "box.db")
    record_id, _ = ledger.new_id()
    written = ledger.Redemption(
        seq=1, id=record_id, at_ms=1_800_000_000_123, box="box-1", merchant="demo",
        store="s1", digest=b"\x01" * 16, card_id=7, action="redeem", uses=2, amount=None,
        uses_left=3, balance=None, verdict="accepted", reason=None, source="front",
        symbology="]Q1", operator="alice", cache_seq=4, reverses=b"\x02" * 16,
    )  # fmt: skip
    conn.execute("BEGIN IMMEDIATE")
    ledger.append(conn, *dataclasses.astuple(written))
    conn.execute("COMMIT")
    assert list(ledger.records(conn)) == [written]
    assert ledger.by_id(conn, record_id) == written
    conn.close()


@pytest.mark.parametrize("account", [None, b"\x0a" * 16], ids=["plain", "linked"])
def test_a_record_without_the_rare_columns_reads_back_as_it_was(tmp_path, account):
    # A scanned code's record: no operator, reversal or dispense, and an account only for
    # a linked code, so append writes it with a shorter INSERT; every value must land in
    # its own column.
    conn = open_database(tmp_path / "box.db")
    record_id, _ = ledger.new_id()
    written = ledger.Redemption(
        seq=1, id=record_id, at_ms=1_800_000_000_123, box="box-1", merchant="demo",
        store="s1", digest=b"\x01" * 16, card_id=7, action="redeem", uses=None, amount=250,
        uses_left=None, balance=750, verdict="rejected", reason="expired", source="front",
        symbology="]Q1", operator=None, cache_seq=4, account=account,
    )  # fmt: skip
    conn.execute("BEGIN IMMEDIATE")
    ledger.append(conn, *dataclasses.astuple(written))
    conn.execute("COMMIT")
    assert list(ledger.records(conn)) == [written]
    conn.close()
