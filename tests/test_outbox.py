"""The outbox as a view of the ledger (migration m006): what a scan writes, and how acks
by `upto` and by id, in any order, leave exactly the unacknowledged records waiting.
Real SQLite files in WAL mode, the real Engine, acks parsed as they arrive over MQTT."""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest
from conftest import CREATED, write_box

from cards import batch
from cards.scan import Scan
from daemon.engine import Engine
from storage import batch_import, ledger, outbox
from storage.database import open_database
from sync import acks

SCANS = 120


def _pages(conn: sqlite3.Connection) -> int:
    """Pages of every table and index (dbstat): what grew, not counting free pages."""
    return conn.execute("SELECT COUNT(*) FROM dbstat").fetchone()[0]


def _frames(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_an_accepted_redemption_writes_its_ledger_page_and_its_codes_page_only(tmp_path, keyset):
    # Issue 10: each scan wrote 4 WAL pages (ledger row, ledger id index, outbox row,
    # code state). Now 2, plus now and then the pages of a growing table (a new ledger
    # leaf, its parent, the header or free-list page it came from): at most 3 per page.
    box = write_box(tmp_path, keyset, debounce="0s")
    codes = {f"PAGE-{i:04d}": 1 for i in range(SCANS)}
    conn = open_database(box.database)
    for data in (keyset.cards_batch(1), keyset.issue_batch(codes, seq=2)):
        batch_import.apply(
            conn, batch.open_file(data, box.config.trust.root_keys), merchant="demo", now=CREATED
        )
    engine = Engine(conn, box.config)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    pages_before = _pages(conn)
    verdicts = [engine.handle(Scan(code.encode(), "counter")) for code in codes]
    assert all(v is not None and v.accepted for v in verdicts)
    added = _pages(conn) - pages_before
    assert added < SCANS / 10, "the ledger grows by a page every few dozen rows"
    assert _frames(conn) <= 2 * SCANS + 3 * added
    assert outbox.depth(conn) == SCANS, "every record still waits for the backend"


def _row(conn: sqlite3.Connection, seq: int) -> str:
    """A ledger row as the engine writes it; returns its id as the backend names it."""
    raw, text = ledger.new_id()
    conn.execute(
        "INSERT INTO ledger(seq, id, at_ms, box, merchant, store, action, verdict, source, "
        "cache_seq) VALUES (?, ?, ?, 'box-1', 'demo', 'store-1', 'check', 'rejected', "
        "'counter', 0)",
        (seq, raw, CREATED * 1000 + seq),
    )
    return text


@pytest.fixture
def conn(tmp_path):
    connection = open_database(tmp_path / "box.db")
    yield connection
    connection.close()


def _ack(conn: sqlite3.Connection, sent_upto: int, upto: int = 0, ids=()) -> int:
    message = json.dumps({"v": 1, "upto": upto, "ids": list(ids)}).encode()
    return acks.apply(conn, acks.parse(message), sent_upto=sent_upto)


def test_acks_by_id_out_of_order_and_by_upto_leave_exactly_the_unacked_records(conn):
    ids = {seq: _row(conn, seq) for seq in range(1, 11)}
    assert _ack(conn, 10, ids=[ids[7], ids[3], ids[4]]) == 3
    assert outbox.seqs_waiting(conn, range(1, 101)) == [1, 2, 5, 6, 8, 9, 10]
    assert outbox.depth(conn) == 7
    assert _ack(conn, 10, ids=[ids[3], str(uuid.uuid4())]) == 0, "acked twice, unknown: harmless"
    assert _ack(conn, 10, upto=2) == 2
    # 3 and 4 were acked by id: the mark moves over them to the next waiting record.
    assert outbox.acked_upto(conn) == 4
    assert outbox.first_seq(conn) == 5
    assert conn.execute("SELECT seq FROM outbox_acked").fetchall() == [(7,)]
    assert [r.seq for r in outbox.records(conn, 0, 3)] == [5, 6, 8]
    assert [r.seq for r in outbox.records(conn, 6, 100)] == [8, 9, 10]
    assert _ack(conn, 10, upto=9, ids=[ids[10]]) == 5
    assert outbox.depth(conn) == 0
    assert outbox.acked_upto(conn) == 10
    assert conn.execute("SELECT COUNT(*) FROM outbox_acked").fetchone()[0] == 0
    assert [r.seq for r in ledger.records(conn)] == list(range(1, 11)), "the ledger keeps all"


def test_oldest_waiting_record_and_depth_follow_the_acks(conn):
    ids = {seq: _row(conn, seq) for seq in range(1, 4)}
    assert outbox.oldest_ms(conn) == CREATED * 1000 + 1
    _ack(conn, 3, ids=[ids[1]])
    assert outbox.oldest_ms(conn) == CREATED * 1000 + 2
    _ack(conn, 3, upto=3)
    assert outbox.oldest_ms(conn) is None
    assert outbox.depth(conn) == 0


def test_an_ack_cannot_cover_records_not_sent_or_not_yet_written(conn):
    ids = {seq: _row(conn, seq) for seq in range(1, 6)}
    # Sent up to 3 (protocol 16.4): an ack of an earlier life of the box says upto 5.
    assert _ack(conn, 3, upto=5, ids=[ids[5]]) == 3
    assert outbox.seqs_waiting(conn, range(1, 101)) == [4, 5]
    # Even called directly, an upto beyond the ledger stops at its last record: rows
    # written later (a restored box writes its sequences again) wait for their own ack.
    conn.execute("BEGIN IMMEDIATE")
    assert outbox.ack_upto(conn, 1000) == 2
    conn.execute("COMMIT")
    _row(conn, 6)
    assert outbox.seqs_waiting(conn, range(1, 101)) == [6]
    assert outbox.acked_upto(conn) == 5


def test_ids_are_found_before_and_after_they_are_indexed(conn):
    ids = {seq: _row(conn, seq) for seq in range(1, 4)}
    assert conn.execute("SELECT COUNT(*) FROM ledger_ids").fetchone()[0] == 0
    assert ledger.by_id(conn, uuid.UUID(ids[2]).bytes).seq == 2, "found after the mark"
    conn.execute("BEGIN IMMEDIATE")
    assert ledger.index_ids(conn) == 3
    assert ledger.index_ids(conn) == 0
    conn.execute("COMMIT")
    ids[4] = _row(conn, 4)
    for seq, text in ids.items():
        assert ledger.by_id(conn, uuid.UUID(text).bytes).seq == seq
    assert ledger.by_id(conn, uuid.uuid4().bytes) is None
    # An ack indexes the ids written since the last one, in its own transaction.
    _ack(conn, 4, ids=[ids[4]])
    assert conn.execute("SELECT seq FROM ledger_marks WHERE name = 'ids'").fetchone()[0] == 4
