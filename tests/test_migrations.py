"""Schema migrations and connection settings: what every redeemd database must have."""

from __future__ import annotations

import sqlite3

import pytest
from sqlite_utils import Database

from storage.database import StorageError, connect, open_database
from storage.migrations import migrations

TABLES = {
    "codes", "cards", "issuer_keys", "trust", "batches", "ledger", "consumed_seen",
    "api_requests", "ledger_marks", "outbox_acked", "ledger_ids", "grant_set",
    "accounts", "topups_applied", "transfers_applied", "limits",
}  # fmt: skip


def registered() -> list[str]:
    return [m.name for m in migrations._migrations]


def recorded(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return conn.execute("SELECT migration_set, name FROM _sqlite_migrations ORDER BY id").fetchall()


def test_fresh_database_records_every_migration(tmp_path):
    conn = open_database(tmp_path / "new.db")
    assert registered(), "no migrations are registered"
    assert recorded(conn) == [("redeemd", name) for name in registered()]
    assert migrations.pending(Database(conn)) == []
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables >= TABLES
    views = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
    assert views == {"outbox"}


def test_opening_twice_is_idempotent_and_keeps_data(tmp_path):
    path = tmp_path / "box.db"
    conn = open_database(path)
    conn.execute("INSERT INTO cards(card_id, merchant, body) VALUES (1, 'demo', '{}')")
    first = recorded(conn)
    conn.close()
    again = open_database(path)
    assert recorded(again) == first
    assert again.execute("SELECT card_id FROM cards").fetchall() == [(1,)]
    again.close()
    third = open_database(path)
    assert len(recorded(third)) == len(registered())


def test_each_migration_applies_on_the_database_made_by_the_steps_before_it(tmp_path):
    path = tmp_path / "stepwise.db"
    names = registered()
    for index, name in enumerate(names):
        conn = connect(path)
        db = Database(conn)
        migrations.apply(db, stop_before=names[index + 1] if index + 1 < len(names) else None)
        assert [m.name for m in migrations.applied(db)] == names[: index + 1], name
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
    assert recorded(open_database(path)) == [("redeemd", name) for name in names]


def test_codes_table_has_no_rowid(tmp_path):
    conn = open_database(tmp_path / "box.db")
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'codes'").fetchone()[0]
    assert "WITHOUT ROWID" in sql.upper()
    with pytest.raises(sqlite3.OperationalError, match="rowid"):
        conn.execute("SELECT rowid FROM codes")
    # The digest is the key: one B-tree probe, no separate index.
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT card_id FROM codes WHERE digest = ?", (b"x" * 16,)
    ).fetchall()
    assert any("PRIMARY KEY" in row[-1] for row in plan)


@pytest.mark.parametrize("opener", ["connect", "open_database"])
def test_connections_use_wal_and_synchronous_full(tmp_path, opener):
    path = tmp_path / "box.db"
    conn = connect(path) if opener == "connect" else open_database(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.isolation_level is None  # autocommit: transactions are explicit
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_read_only_connection_also_uses_synchronous_full_and_cannot_write(tmp_path):
    path = tmp_path / "box.db"
    open_database(path).close()
    reader = connect(path, readonly=True)
    assert reader.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("INSERT INTO cards(card_id, merchant, body) VALUES (1, 'demo', '{}')")


def test_damaged_file_is_refused_with_a_message(tmp_path):
    path = tmp_path / "box.db"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(StorageError, match=str(path)):
        open_database(path)


def test_every_ledger_row_waits_in_the_outbox_without_an_outbox_row(tmp_path):
    conn = open_database(tmp_path / "t.db")
    for seq in (1, 2):
        _insert_ledger_row(conn, seq)
    assert conn.execute("SELECT seq FROM outbox").fetchall() == [(1,), (2,)]
    assert conn.execute("SELECT COUNT(*) FROM outbox_acked").fetchone()[0] == 0


def test_ledger_has_no_index_written_by_a_redemption(tmp_path):
    # Each index on the ledger is one more WAL page for every scan (issue 10): only the
    # partial indexes of reversals and of dispensed counters, which a redemption's NULL
    # `reverses` and `grant_id` do not enter.
    conn = open_database(tmp_path / "t.db")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'ledger' "
        "ORDER BY name"
    ).fetchall()
    assert [name for name, _ in indexes] == ["ledger_dispensed", "ledger_reverses"]
    assert "WHERE grant_id IS NOT NULL" in indexes[0][1]
    assert "WHERE reverses IS NOT NULL" in indexes[1][1]
    triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    assert triggers == []


def test_api_requests_are_found_by_key_with_no_second_index(tmp_path):
    # Every redemption through the local API writes its key: an index on its ledger
    # row as well was one more page each time, for a lookup nobody makes.
    conn = open_database(tmp_path / "t.db")
    indexes = conn.execute("PRAGMA index_list(api_requests)").fetchall()
    assert [(origin, unique) for _, _, unique, origin, _ in indexes] == [("pk", 1)]


def test_api_requests_keep_their_keys_through_m007(tmp_path):
    path = tmp_path / "old.db"
    old = connect(path)
    migrations.apply(Database(old), stop_before="m007_api_requests_without_seq_index")
    _insert_ledger_row(old, 1)
    old.execute("INSERT INTO api_requests VALUES ('key-1', 'fp', 1, '{\"ok\":true}')")
    old.close()
    conn = open_database(path)
    assert conn.execute("SELECT * FROM api_requests").fetchall() == [
        ("key-1", "fp", 1, '{"ok":true}')
    ]


def _insert_ledger_row(conn: sqlite3.Connection, seq: int, record_id: bytes | None = None) -> None:
    conn.execute(
        "INSERT INTO ledger(seq, id, at_ms, box, merchant, store, action, verdict, source, "
        "cache_seq) VALUES (?, ?, ?, 'b', 'm', 's', 'reject', 'rejected', 'x', 0)",
        (seq, record_id or seq.to_bytes(16, "big"), seq * 1000),
    )


def _database_of_the_previous_release(path) -> sqlite3.Connection:
    """A database as the release before m006 left it: the outbox a table filled by the
    ledger_to_outbox trigger, rows deleted from it by acks (out of order too)."""
    conn = connect(path)
    migrations.apply(Database(conn), stop_before="m006_outbox_from_the_ledger")
    for seq in range(1, 9):
        _insert_ledger_row(conn, seq)
    # Acked: 1-2 by upto, then 4 and 7 by id; waiting: 3, 5, 6, 8.
    conn.execute("DELETE FROM outbox WHERE seq IN (1, 2, 4, 7)")
    return conn


def test_records_waiting_in_the_old_outbox_still_wait_after_the_upgrade(tmp_path):
    from storage import ledger, outbox

    path = tmp_path / "old.db"
    _database_of_the_previous_release(path).close()
    conn = open_database(path)
    assert outbox.seqs_waiting(conn, range(1, 101)) == [3, 5, 6, 8]
    assert outbox.depth(conn) == 4
    assert outbox.acked_upto(conn) == 2
    assert [r.seq for r in outbox.records(conn, 0, 100)] == [3, 5, 6, 8]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # The ids of the old rows are indexed; a row written after the upgrade is found too.
    assert ledger.by_id(conn, (4).to_bytes(16, "big")).seq == 4
    _insert_ledger_row(conn, 9)
    assert ledger.by_id(conn, (9).to_bytes(16, "big")).seq == 9
    assert outbox.seqs_waiting(conn, range(1, 101)) == [3, 5, 6, 8, 9]
    # Acks after the upgrade remove them, out of order as before.
    conn.execute("BEGIN IMMEDIATE")
    assert outbox.ack(conn, [6, 4]) == 1
    assert outbox.ack_upto(conn, 5) == 2
    conn.execute("COMMIT")
    assert outbox.seqs_waiting(conn, range(1, 101)) == [8, 9]
    assert outbox.acked_upto(conn) == 7


def test_depth_reads_a_database_of_the_previous_release_without_migrating_it(tmp_path):
    from storage import outbox

    path = tmp_path / "old.db"
    _database_of_the_previous_release(path).close()
    reader = connect(path, readonly=True)  # as doctor and `redeemd status` read it
    assert outbox.depth(reader) == 4


def test_an_empty_old_outbox_leaves_every_record_acked(tmp_path):
    from storage import outbox

    path = tmp_path / "old.db"
    old = _database_of_the_previous_release(path)
    old.execute("DELETE FROM outbox")
    old.close()
    conn = open_database(path)
    assert outbox.depth(conn) == 0
    assert outbox.acked_upto(conn) == 8
    _insert_ledger_row(conn, 9)
    assert outbox.seqs_waiting(conn, range(1, 101)) == [9]
