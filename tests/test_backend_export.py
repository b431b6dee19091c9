"""`redeemd-backend export`: any stored batch as a file a box fed by USB stick imports.

Real processes: the backend CLI writes the files, the box's `redeemd import` applies them.
The collector's consumed-elsewhere batch is made by the real Store path the collector
uses (two boxes redeeming the same single-use code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backend_helpers import make_backend, record
from conftest import DEMO_CARDS, ROOT
from fleet import FleetBox, backend_cli

from backend.events import parse_message
from backend.export import ExportError, parse_seqs
from backend.keystore import Keystore
from backend.store import Store
from cards import batch, keys
from cards.batch import CodeStatus, Kind
from cards.digest import code_digest

DAY = 86400


def _issue(store: Store, keystore: Keystore, kind: Kind, entries: bytes, signed_at: int) -> int:
    def sign(seq: int) -> bytes:
        return batch.build(
            keystore.private("issuer"), keystore.delegation(), merchant="demo", seq=seq,
            kind=kind, entries=entries, created_at=signed_at, expires_at=signed_at + 30 * DAY,
        )  # fmt: skip

    return store.issue("demo", kind, sign).seq


@pytest.fixture
def backend_dir(tmp_path: Path, each_store: str) -> Path:
    """Batches 1 cards, 2 codes, 3 consumed elsewhere (by the collector's path), and
    4 a revocation issued 40 days ago, expired since."""
    directory = tmp_path / "backend"
    keystore = make_backend(directory)
    now = int(time.time())
    keystore.save_delegation(
        keys.delegate(keystore.private("root"), keystore.public("issuer"), ("demo",),
                      now - 50 * DAY, now + 30 * DAY)
    )  # fmt: skip
    code_key = keystore.code_key()
    store = Store.open(directory)
    try:
        _issue(store, keystore, Kind.CARDS, batch.encode_cards(DEMO_CARDS), now - 60)
        rows = [
            (code_digest(code_key, c), 1, 0, 0, 0, 0, CodeStatus.ACTIVE)
            for c in ("ONCE-0001", "ONCE-0002", "ONCE-0003")
        ]
        _issue(store, keystore, Kind.ISSUE, batch.encode_issue(rows), now - 60)
        digest = code_digest(code_key, "ONCE-0001")
        for box in ("box-1", "box-2"):  # the same single-use code redeemed on two boxes
            body = {"v": 1, "box": box, "records": [
                record(1, box, action="redeem", digest=digest, uses=1, uses_left=0)
            ]}  # fmt: skip
            events = parse_message(json.dumps(body).encode(), merchant="demo", box=box)

            def sign_consumed(merchant: str, seq: int, entries: bytes) -> bytes:
                return batch.build(
                    keystore.private("issuer"), keystore.delegation(), merchant=merchant,
                    seq=seq, kind=Kind.CONSUMED, entries=entries, created_at=now - 60,
                    expires_at=now + DAY,
                )  # fmt: skip

            store.store_events("demo", box, events, sign_consumed)
        assert store.latest_seq("demo") == 3
        revoke = batch.encode_digests([code_digest(code_key, "ONCE-0002")])
        _issue(store, keystore, Kind.REVOKE, revoke, now - 40 * DAY)
    finally:
        store.close()
    return directory


def stored(directory: Path) -> dict[int, bytes]:
    store = Store.open(directory)
    try:
        return {b.seq: b.data for b in store.batches("demo", 1, 100)}
    finally:
        store.close()


def test_every_stored_batch_exports_as_a_file_a_box_imports(tmp_path, backend_dir):
    usb = tmp_path / "usb"
    result = backend_cli("export", "--dir", str(backend_dir), "--out", str(usb), "1-2", "3..4")
    files = sorted(usb.glob("*.rdb"))
    assert [f.name for f in files] == [f"demo-00000{i}.rdb" for i in (1, 2, 3, 4)]
    assert "consumed batch demo/3, 2 entries" in result.stdout
    assert "revoke batch demo/4, 1 entries; re-signed, the stored copy expired at" in result.stdout
    assert "redeemd import" in result.stdout
    original = stored(backend_dir)
    # What is still valid goes out byte for byte as issued; the expired one re-signed.
    for seq in (1, 2, 3):
        assert files[seq - 1].read_bytes() == original[seq]
    roots = {
        keys.key_id(Keystore(backend_dir).public("root")): Keystore(backend_dir).public("root")
    }
    fresh = batch.open_file(files[3].read_bytes(), roots)
    old = batch.read_header(original[4], batch.FILE_MAGIC, roots)[0]
    assert (fresh.header.seq, fresh.header.kind, fresh.header.entries_sha256) == (
        4, Kind.REVOKE, old.entries_sha256,
    )  # fmt: skip
    assert fresh.header.expires_at > time.time() > old.expires_at
    assert [p.name for p in usb.iterdir() if p.name.startswith(".")] == [], "no partial files"

    box = FleetBox(tmp_path / "box", backend_dir, "box-9", "mqtt://127.0.0.1:1")
    imported = box.cli("import", *map(str, files))
    assert imported.returncode == 0, imported.stderr
    assert box.cache_seq() == 4
    # The consumed-elsewhere batch used up the code redeemed on the two other boxes.
    assert box.cli("check", "ONCE-0001").stdout.startswith("rejected: ")
    assert box.cli("check", "ONCE-0002").stdout.startswith("rejected: revoked")
    assert box.cli("check", "ONCE-0003").stdout.startswith("accepted")


def test_export_of_sequences_not_held_is_refused_and_writes_nothing(tmp_path, backend_dir):
    usb = tmp_path / "usb"
    result = backend_cli_fails("export", "--dir", str(backend_dir), "--out", str(usb), "3-9")
    assert (
        "batches 5..9 of demo are not in the backend's database (the newest batch of demo is 4)"
        in result
    )
    assert "nothing written" in result
    assert not usb.exists()


def test_export_with_several_merchants_asks_which(tmp_path):
    directory = tmp_path / "backend"
    keystore = make_backend(directory, merchants=("demo", "acme"))
    store = Store.open(directory)
    try:
        for merchant in ("demo", "acme"):
            entries = batch.encode_digests([b"x" * 16])
            store.issue(merchant, Kind.REVOKE, lambda seq, m=merchant, e=entries: batch.build(
                keystore.private("issuer"), keystore.delegation(), merchant=m, seq=seq,
                kind=Kind.REVOKE, entries=e, created_at=int(time.time()),
                expires_at=int(time.time()) + DAY,
            ))  # fmt: skip
    finally:
        store.close()
    out = tmp_path / "usb"
    assert "choose with --merchant" in backend_cli_fails(
        "export", "--dir", str(directory), "--out", str(out), "1"
    )
    done = backend_cli(
        "export", "--dir", str(directory), "--out", str(out), "--merchant", "acme", "1"
    )
    assert "revoke batch acme/1" in done.stdout and (out / "acme-000001.rdb").exists()


@pytest.mark.parametrize(
    ("specs", "seqs"),
    [(["4"], [4]), (["4-6"], [4, 5, 6]), (["4..6", "5", "9"], [4, 5, 6, 9]), (["7", "2"], [2, 7])],
)
def test_sequences_and_ranges_are_read_as_a_box_names_them(specs, seqs):
    assert parse_seqs(specs) == seqs


@pytest.mark.parametrize("spec", ["x", "6-4", "0", "4-", "-3", "1-99999999999"])
def test_a_bad_sequence_is_refused_naming_it(spec):
    with pytest.raises(ExportError, match=spec.replace("-", r"\-").replace(".", r"\.")):
        parse_seqs([spec])


def backend_cli_fails(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", *args], capture_output=True, text=True, cwd=ROOT,
        timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    return result.stderr
