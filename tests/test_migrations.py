"""Schema migrations and connection settings: what every redeemd database must have."""

from __future__ import annotations

import sqlite3

import pytest
from sqlite_utils import Database

from storage.database import StorageError, connect, open_database
from storage.migrations import migrations

TABLES = {
    "codes", "cards", "issuer_keys", "trust", "batches", "ledger", "outbox", "consumed_seen",
    "api_requests",
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
        reader.execute("INSERT INTO outbox(seq) VALUES (1)")


def test_damaged_file_is_refused_with_a_message(tmp_path):
    path = tmp_path / "box.db"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(StorageError, match=str(path)):
        open_database(path)


def test_every_ledger_row_enters_the_outbox_through_the_trigger(tmp_path):
    from storage.database import open_database

    conn = open_database(tmp_path / "t.db")
    conn.execute(
        "INSERT INTO ledger(seq, id, at_ms, box, merchant, store, action, verdict, source, "
        "cache_seq) VALUES (1, x'00', 0, 'b', 'm', 's', 'reject', 'rejected', 'x', 0)"
    )
    assert conn.execute("SELECT seq FROM outbox").fetchall() == [(1,)]
