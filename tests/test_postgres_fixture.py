"""The test PostgreSQL is real: it stores rows, survives a clean restart and a SIGKILL of
the whole server with every committed row intact, and gives each test its own database."""

from __future__ import annotations

import psycopg
import pytest
from postgres import PostgreSQL


def _rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT id, note FROM t ORDER BY id").fetchall()


def test_a_committed_row_survives_kill_and_restart(own_postgresql: PostgreSQL):
    url = own_postgresql.create_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT)")
        conn.execute("INSERT INTO t VALUES (1, 'before restart')")
    own_postgresql.restart()
    assert _rows(url) == [(1, "before restart")]

    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO t VALUES (2, 'committed')")
        conn.commit()
        conn.execute("INSERT INTO t VALUES (3, 'never committed')")
        pid = own_postgresql.pid
        own_postgresql.kill()
        assert own_postgresql.pid is None
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")  # the server is gone, not merely paused
    own_postgresql.start()
    assert own_postgresql.pid not in (None, pid)
    assert _rows(url) == [(1, "before restart"), (2, "committed")]


def test_each_test_gets_an_empty_database_of_its_own(postgresql, postgresql_url):
    with psycopg.connect(postgresql_url) as conn:
        (name,) = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert postgresql_url.endswith(f"/{name}") and name != "postgres"
    assert tables == (0,)
    assert postgresql.create_database() != postgresql_url
