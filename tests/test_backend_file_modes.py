"""The backend's database is as private as its keys (issue 17.5): `backend.db` holds
every box's ledger and every batch, and was created 0644 while the keys are 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from backend.store import FILENAME, Store


@pytest.fixture
def usual_umask():
    """The umask most shells and services run with, which left backend.db 0644."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_backend_db_and_its_wal_and_shm_are_created_0600(tmp_path, usual_umask):
    store = Store.open(tmp_path)
    try:
        path = tmp_path / FILENAME
        store.conn.execute("CREATE TABLE probe (x)")  # a write: the -wal file has content
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        store.close()


def test_a_backend_db_an_older_release_made_0644_is_narrowed_to_0600(tmp_path, usual_umask):
    Store.open(tmp_path).close()
    path = tmp_path / FILENAME
    for name in tmp_path.glob(f"{FILENAME}*"):
        name.chmod(0o644)
    store = Store.open(tmp_path)
    try:
        assert mode(path) == 0o600
        assert store.latest_seq("demo") == 0  # still the same, usable database
    finally:
        store.close()
