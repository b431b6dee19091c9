"""A box that has used a database refuses to start on a missing or empty one (its
ledger and anti-rollback state would vanish and old batches could be applied again),
until the database is restored or `redeemd init` says to start over (issue 16.8)."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from conftest import Box

from storage.database import marker_path


def lose(box: Box, how: str) -> None:
    for path in box.dir.glob("redeemd.db*"):
        path.unlink()
    if how == "empty":
        box.database.write_bytes(b"")


def refusal(result) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, (result.stdout.decode(), err)
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    return line


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_a_box_whose_database_was_lost_refuses_to_start_and_says_what_to_do(loaded_box, how):
    first = loaded_box.cli("run", "--json", input=b"DEMO-0001\n")
    assert first.returncode == 0, first.stderr.decode()
    assert marker_path(loaded_box.database).exists()
    lose(loaded_box, how)

    for command in (["run", "--json"], ["status"], ["check", "DEMO-0001"], ["ledger"]):
        line = refusal(loaded_box.cli(*command, input=b"DEMO-0001\n"))
        assert f"database {loaded_box.database} is" in line
        assert ("missing" if how == "missing" else "empty (0 bytes)") in line
        assert "anti-rollback" in line and "Restore the database from backup" in line
        assert "redeemd init" in line
    # Nothing was started over behind the refusal.
    assert not loaded_box.database.exists() or loaded_box.database.stat().st_size == 0

    imported = loaded_box.cli(
        "import", str(loaded_box.write_batch("c.rdb", loaded_box.keyset.cards_batch(1)))
    )
    assert "redeemd init" in refusal(imported)


def test_redeemd_init_starts_a_lost_box_over_and_it_runs_again(loaded_box):
    loaded_box.cli("run", input=b"DEMO-0001\n")
    lose(loaded_box, "empty")
    init = loaded_box.cli("init")
    out = init.stdout.decode()
    assert init.returncode == 0, init.stderr.decode()
    assert f"initialised an empty database at {loaded_box.database}" in out
    assert "starts over" in out and "sequence 1" in out
    batches = [
        loaded_box.write_batch("1.rdb", loaded_box.keyset.cards_batch(1)),
        loaded_box.write_batch("2.rdb", loaded_box.keyset.issue_batch({"DEMO-0001": 1})),
    ]
    assert loaded_box.cli("import", *map(str, batches)).returncode == 0
    run = loaded_box.cli("run", "--json", input=b"DEMO-0001\n")
    assert run.returncode == 0, run.stderr.decode()
    assert b'"verdict": "accepted"' in run.stdout


def test_redeemd_init_never_overwrites_a_database(loaded_box):
    before = loaded_box.database.read_bytes()
    line = refusal(loaded_box.cli("init"))
    assert "already holds a database" in line and "never overwrites" in line
    assert loaded_box.database.read_bytes() == before


def test_a_new_box_starts_on_its_first_run_without_init_and_is_marked(box):
    assert not marker_path(box.database).exists()
    run = box.cli("run", "--json", input=b"DEMO-0001\n")
    assert run.returncode == 0, run.stderr.decode()
    assert box.database.stat().st_size > 0
    assert "redeemd init" in marker_path(box.database).read_text()


def test_a_database_from_before_markers_is_marked_on_its_next_start(loaded_box):
    marker_path(loaded_box.database).unlink()
    assert loaded_box.cli("status").returncode == 0
    assert marker_path(loaded_box.database).exists()


def test_a_restored_backup_starts_as_operations_md_says(loaded_box, tmp_path):
    loaded_box.cli("run", input=b"DEMO-0001\n")
    backup = tmp_path / "backup.db"
    assert loaded_box.cli("backup", str(backup)).returncode == 0
    damaged = loaded_box.dir / "damaged"
    damaged.mkdir()
    for path in loaded_box.dir.glob("redeemd.db*"):
        path.rename(damaged / path.name)
    assert "redeemd init" in refusal(loaded_box.cli("run", input=b""))
    shutil.copyfile(backup, loaded_box.database)
    run = loaded_box.cli("run", "--json", input=b"DEMO-0001\n")
    assert run.returncode == 0, run.stderr.decode()
    assert b"already_redeemed" in run.stdout
    conn = sqlite3.connect(loaded_box.database)
    assert conn.execute("SELECT MAX(seq) FROM ledger").fetchone() == (2,)
