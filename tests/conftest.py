"""Shared fixtures: a backend key set, a box configured to trust it, batch builders.

Everything is real: real Ed25519 keys, real batch files, a real SQLite database in a
temporary directory, the real `redeemd` CLI when a test needs the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# One PostgreSQL for the whole session, shared by every module that asks (tests/postgres.py);
# registered here, since a fixture imported into a module is that module's own.
from postgres import own_postgresql, postgresql, postgresql_url  # noqa: F401

from cards import batch, keys
from cards.batch import CodeStatus, Kind
from cards.digest import code_digest
from daemon import config as config_mod
from daemon.config import Config
from storage.database import open_database

ROOT = Path(__file__).resolve().parent.parent
CREATED = 1_790_000_000  # a fixed signed time (2026-09-21), before the real clock: like production
FAR = 2_100_000_000

DEMO_CARDS = [
    {"id": 1, "merchant": "demo", "kind": "coupon", "title": "Free coffee", "reversal_window": 600},
    {"id": 2, "merchant": "demo", "kind": "ticket", "title": "Entry"},
    {"id": 3, "merchant": "demo", "kind": "groupon", "uses": 3},
    {"id": 4, "merchant": "demo", "kind": "member"},
    {"id": 5, "merchant": "demo", "kind": "gift", "balance": 5000, "reversal_window": 600},
]


@dataclass
class KeySet:
    root_private: bytes
    issuer_private: bytes
    delegation: keys.Delegation
    code_key: bytes

    @property
    def roots(self) -> dict[str, bytes]:
        public = keys.public_of(self.root_private)
        return {keys.key_id(public): public}

    def digest(self, code: str) -> bytes:
        return code_digest(self.code_key, code)

    def build(
        self,
        kind: Kind,
        entries: bytes,
        seq: int,
        merchant: str = "demo",
        created_at: int = CREATED,
        expires_at: int = FAR,
        chunk_size: int = batch.DEFAULT_CHUNK_SIZE,
    ) -> bytes:
        return batch.build(
            self.issuer_private, self.delegation, merchant=merchant, seq=seq, kind=kind,
            entries=entries, created_at=created_at, expires_at=expires_at, chunk_size=chunk_size,
        )  # fmt: skip

    def cards_batch(self, seq: int = 1, cards: list[dict] | None = None, **kw) -> bytes:
        return self.build(Kind.CARDS, batch.encode_cards(cards or DEMO_CARDS), seq, **kw)

    def issue_batch(self, codes: dict[str, int], seq: int = 2, **kw) -> bytes:
        """codes: text -> card id, all with the card's defaults."""
        rows = [(self.digest(c), card, 0, 0, 0, 0, CodeStatus.ACTIVE) for c, card in codes.items()]
        return self.build(Kind.ISSUE, batch.encode_issue(rows), seq, **kw)

    def status_batch(self, kind: Kind, codes: list[str], seq: int, **kw) -> bytes:
        return self.build(kind, batch.encode_digests(self.digest(c) for c in codes), seq, **kw)


def make_keyset(
    merchants: tuple[str, ...] = ("demo",), not_before: int = 0, not_after: int = FAR
) -> KeySet:
    root = keys.new_private_key()
    issuer = keys.new_private_key()
    delegation = keys.delegate(root, keys.public_of(issuer), merchants, not_before, not_after)
    return KeySet(root, issuer, delegation, b"c" * 32)


@pytest.fixture(autouse=True)
def own_runtime_directory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own {runtime_dir}: a box whose config keeps the default local API
    socket would otherwise find another test's daemon there when tests run in parallel
    (pytest -n). Short, under /tmp: a Unix socket path must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="rd-run-", ignore_cleanup_errors=True) as directory:
        monkeypatch.setenv("RUNTIME_DIRECTORY", directory)
        yield Path(directory)


@pytest.fixture(scope="session")
def keyset() -> KeySet:
    return make_keyset()


@dataclass
class Box:
    """A configured box in a temporary directory: config file, keys, database path."""

    dir: Path
    config_path: Path
    keyset: KeySet

    @property
    def config(self) -> Config:
        return config_mod.load(str(self.config_path))

    @property
    def database(self) -> Path:
        return self.dir / "redeemd.db"

    def write_batch(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def cli(
        self, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run the real `redeemd` CLI against this box."""
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "-c", str(self.config_path), *args],
            input=input, capture_output=True, timeout=timeout, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip


def write_box(directory: Path, keyset: KeySet, extra: str = "", debounce: str = "2s") -> Box:
    keys_dir = directory / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    public = keys.public_of(keyset.root_private)
    (keys_dir / "root.pub").write_text(keys.b64(public) + "\n")
    (keys_dir / "code.key").write_text(keys.b64(keyset.code_key) + "\n")
    config_path = directory / "config.toml"
    config_path.write_text(
        f"""
[box]
id = "box-1"
merchant = "demo"
store = "store-1"
state_dir = "{directory}"
timezone = "UTC"

[trust]
root_key_files = ["{keys_dir}/root.pub"]
code_key_file = "{keys_dir}/code.key"

[scan]
debounce = "{debounce}"
{extra}
"""
    )
    return Box(directory, config_path, keyset)


@pytest.fixture
def box(tmp_path: Path, keyset: KeySet) -> Box:
    """A box that trusts `keyset`, with the demo cards and no codes yet applied."""
    return write_box(tmp_path, keyset)


@pytest.fixture
def loaded_box(box: Box) -> Box:
    """`box` with the demo cards (seq 1) and codes DEMO-0001..0010, GIFT-0001 (seq 2)."""
    from storage import batch_import

    conn = open_database(box.database)
    try:
        config = box.config
        for data in (
            box.keyset.cards_batch(1),
            box.keyset.issue_batch({**{f"DEMO-{i:04d}": 1 for i in range(1, 11)}, "GIFT-0001": 5,
                                    "LUNCH-0001": 3, "MEMBER-0001": 4}, seq=2),
        ):  # fmt: skip
            parsed = batch.open_file(data, config.trust.root_keys)
            batch_import.apply(conn, parsed, merchant="demo", now=CREATED)
    finally:
        conn.close()
    return box


def wait_for(
    condition: Callable[[], object], what: str, timeout: float = 120.0, every: float = 0.05
) -> object:
    """Poll `condition` until it returns something truthy and return that; fail naming
    `what` after `timeout` (generous: reaching it means something hangs, not slowness)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_json_lines(text: bytes | str) -> list[dict]:
    if isinstance(text, bytes):
        text = text.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(params=["sqlite", "postgresql"])
def each_store(request, monkeypatch) -> str:
    """Run the test once on each backend store: backend.db, then a fresh PostgreSQL
    database, chosen as an operator chooses it ($REDEEMD_BACKEND_DATABASE), so the
    backend's processes a test starts inherit it."""
    if request.param == "postgresql":
        from backend.store import DATABASE_ENV

        monkeypatch.setenv(DATABASE_ENV, request.getfixturevalue("postgresql_url"))
    return request.param
