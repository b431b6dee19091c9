"""A box back after its batches expired catches up by itself (issue 16.1, protocol.md 16.6).

The scenario is a year offline: the box applied batches 1 and 2 a year ago and went
dark; meanwhile batches 3..5 were issued (each valid for 30 days, long expired now)
and the issuer key they were signed with was replaced by a new one. The reference
backend re-signs what it hands out, so the real `redeemd run` process catches up over
MQTT from the real `redeemd-backend publish`, and a box fed by USB catches up from the
files of `redeemd-backend export`. Also here, without a broker: a box whose next batch
is refused again and again asks ever more slowly and says why.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backend_helpers import CliProcess
from broker import broker  # noqa: F401  (fixture)
from conftest import CREATED, DEMO_CARDS, FAR, KeySet, make_keyset, wait_for, write_box
from fleet import Daemon, FleetBox, backend_cli

from backend.keystore import Keystore
from backend.store import Store
from cards import batch, keys, manifest
from cards.batch import CodeStatus, Kind
from cards.digest import code_digest
from storage import batch_import, trust
from storage.database import open_database
from sync.intake import RETRY_BACKOFF_MAX, STUCK_BACKOFF_MAX, Intake

DAY = 86400
YEAR = 365 * DAY


@dataclass
class Offline:
    """A backend directory whose batches 3..5 expired while the box was away."""

    backend: Path
    box: FleetBox
    stored: dict[int, bytes]


def _issue_rows(code_key: bytes, codes: list[str], card: int) -> bytes:
    return batch.encode_issue(
        (code_digest(code_key, c), card, 0, 0, 0, 0, CodeStatus.ACTIVE) for c in codes
    )


def offline_for_a_year(tmp_path: Path, broker_url: str) -> Offline:
    directory = tmp_path / "backend"
    keystore = Keystore(directory)
    keystore.generate()
    now = int(time.time())
    then = now - YEAR
    # The key of a year ago: its delegation ended yesterday.
    keystore.save_delegation(
        keys.delegate(keystore.private("root"), keystore.public("issuer"), ("demo",), then - 3600,
                      now - DAY)
    )  # fmt: skip
    code_key = keystore.code_key()
    contents = {
        1: (Kind.CARDS, batch.encode_cards(DEMO_CARDS)),
        2: (Kind.ISSUE, _issue_rows(code_key, ["OLD-0001", "OLD-0002"], 1)),
        3: (Kind.ISSUE, _issue_rows(code_key, ["NEW-0001", "NEW-0002"], 1)),
        4: (Kind.REVOKE, batch.encode_digests([code_digest(code_key, "OLD-0002")])),
        5: (Kind.ISSUE, _issue_rows(code_key, ["LATE-0001"], 2)),
    }
    store = Store.open(directory)
    try:
        for seq, (kind, entries) in contents.items():
            signed_at = then + seq * 7 * DAY

            def sign(seq: int, kind=kind, entries=entries, signed_at=signed_at) -> bytes:
                return batch.build(
                    keystore.private("issuer"), keystore.delegation(), merchant="demo", seq=seq,
                    kind=kind, entries=entries, created_at=signed_at,
                    expires_at=signed_at + 30 * DAY, chunk_size=64,
                )  # fmt: skip

            store.issue("demo", kind, sign)
            store.mark_published("demo", seq)
        stored = {b.seq: b.data for b in store.batches("demo", 1, 5)}
    finally:
        store.close()

    box = FleetBox(tmp_path / "box", directory, "box-1", broker_url)
    conn = open_database(box.database)
    try:
        for seq in (1, 2):  # applied back then, while they were fresh
            parsed = batch.open_file(stored[seq], {_root_id(keystore): keystore.public("root")})
            batch_import.apply(conn, parsed, merchant="demo", now=parsed.header.created_at)
    finally:
        conn.close()

    # A year later the backend signs with a new issuer key.
    issuer = keys.new_private_key()
    (directory / "issuer.key").write_text(keys.b64(issuer) + "\n")
    (directory / "issuer.pub").write_text(keys.b64(keys.public_of(issuer)) + "\n")
    keystore.save_delegation(
        keys.delegate(keystore.private("root"), keys.public_of(issuer), ("demo",), now - 3600,
                      now + 30 * DAY)
    )  # fmt: skip
    return Offline(directory, box, stored)


def _root_id(keystore: Keystore) -> str:
    return keys.key_id(keystore.public("root"))


def verdict(box: FleetBox, code: str) -> str:
    result = box.cli("check", code)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[0]


def caught_up(box: FleetBox) -> None:
    """Batches 3..5 are applied with the entries the backend issued a year ago."""
    assert box.cache_seq() == 5
    assert verdict(box, "NEW-0001") == "accepted"
    assert verdict(box, "LATE-0001") == "accepted"
    assert verdict(box, "OLD-0001") == "accepted"
    assert box.cli("check", "OLD-0002").stdout.startswith("rejected: revoked")


def test_a_box_back_after_a_year_catches_up_over_mqtt_from_re_signed_batches(tmp_path, broker):
    offline = offline_for_a_year(tmp_path, broker.url)
    publisher = CliProcess(
        "publish", "--dir", str(offline.backend), "--broker", broker.url, "--poll", "0.1s"
    )
    daemon = None
    try:
        publisher.wait_line(lambda line: "manifest demo: latest_seq 5" in line, "manifest")
        daemon = Daemon(offline.box)
        wait_for(lambda: offline.box.cache_seq() == 5, "the box applying batches 3..5")
        resent = publisher.wait_line(lambda line: line.startswith("resent demo 3..5"), "resend")
        assert "re-signed 3..5" in resent
    finally:
        if daemon is not None:
            assert daemon.stop() == 0, offline.box.stderr()[-2000:]
        publisher.stop()
    caught_up(offline.box)
    # Same content as issued: the stored entries hash is the one backend.db holds.
    for seq in (3, 4, 5):
        header = batch.read_header(offline.stored[seq], batch.FILE_MAGIC, _roots(offline))[0]
        applied = offline.box.query(
            "SELECT entries_sha256, created_at FROM batches WHERE seq = ?", seq
        )[0]
        assert applied[0] == header.entries_sha256
        assert applied[1] > header.created_at + 300 * DAY, "applied the fresh signing"
    assert "refused" not in offline.box.stderr()


def _roots(offline: Offline) -> dict[str, bytes]:
    keystore = Keystore(offline.backend)
    return {_root_id(keystore): keystore.public("root")}


def test_a_box_back_after_a_year_catches_up_by_file_from_export(tmp_path, broker):
    offline = offline_for_a_year(tmp_path, broker.url)
    box = offline.box

    # What the technician had: the stored files, long expired and from the old key.
    old = box.dir / "old-0003.rdb"
    old.write_bytes(offline.stored[3])
    refused = box.cli("import", str(old))
    assert refused.returncode == 1
    assert "`redeemd-backend export 3 --merchant demo" in refused.stderr
    assert box.cache_seq() == 2
    gap = box.dir / "old-0005.rdb"
    gap.write_bytes(offline.stored[5])
    refused = box.cli("import", str(gap))
    assert "`redeemd-backend export 3-4 --merchant demo" in refused.stderr

    usb = tmp_path / "usb"
    exported = backend_cli("export", "--dir", str(offline.backend), "--out", str(usb), "3..5")
    assert "re-signed, the stored copy" in exported.stdout
    files = sorted(usb.glob("*.rdb"))
    assert [f.name for f in files] == ["demo-000003.rdb", "demo-000004.rdb", "demo-000005.rdb"]
    applied = box.cli("import", *map(str, files))
    assert applied.returncode == 0, applied.stderr
    caught_up(box)

    # Importing the same export again, or the batches as first signed, is a replay.
    again = box.cli("import", *map(str, files))
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 3


# ---------------------------------------------------------------------- no endless loop


@dataclass
class Waiting:
    """An intake on a box that holds batches 1 and 2 and has been told batch 3 exists:
    what it asks for is recorded at the time of `now`, which the test moves."""

    keyset: KeySet
    conn: sqlite3.Connection
    intake: Intake
    requests: list[float]
    now: float


@pytest.fixture
def waiting(loaded_box) -> Iterator[Waiting]:
    keyset = loaded_box.keyset
    conn = open_database(loaded_box.database)

    def publish(topic: str, payload: bytes) -> tuple[int, int]:
        state.requests.append(state.now)
        return (0, 0)

    intake = Intake(
        conn, merchant="demo", roots=keyset.roots, max_batch_bytes=1 << 20,
        request_topic="request", publish=publish, retry=30.0, clock=lambda: state.now,
    )  # fmt: skip
    state = Waiting(keyset, conn, intake, requests=[], now=float(time.time()))
    intake.on_manifest(
        "manifest",
        manifest.build(
            keyset.issuer_private, keyset.delegation, merchant="demo", latest_seq=3,
            created_at=CREATED, expires_at=FAR,
        ),
    )  # fmt: skip
    try:
        yield state
    finally:
        conn.close()


def test_a_refused_next_batch_is_asked_for_ever_more_slowly_and_the_box_says_why(waiting):
    keyset, intake, requests = waiting.keyset, waiting.intake, waiting.requests
    expired = keyset.issue_batch({"NEW-0001": 1}, seq=3, expires_at=CREATED + 60)
    # A backend that answers every request with the stored, expired batch.
    for _ in range(2 * DAY // 10):
        before = len(requests)
        intake.tick()
        if len(requests) > before:
            for chunk in batch.split(expired):
                intake.on_chunk("box/batches/3", 3, chunk)
        waiting.now += 10
    gaps = [b - a for a, b in zip(requests, requests[1:], strict=False)]
    assert max(gaps) >= STUCK_BACKOFF_MAX * 30 > RETRY_BACKOFF_MAX * 30
    assert len(requests) < 60, "two days of asking, most of them an hour apart"
    assert intake.stuck and "batch 3 refused" in intake.stuck and "expired" in intake.stuck
    assert trust.state(waiting.conn, "demo").last_seq == 2

    # The backend re-signs it: applied, and the box is no longer stuck.
    fresh = batch.resign(
        expired, keyset.issuer_private, keyset.delegation, created_at=CREATED + 100,
        expires_at=FAR,
    )  # fmt: skip
    for chunk in batch.split(fresh):
        intake.on_chunk("box/batches/3", 3, chunk)
    assert trust.state(waiting.conn, "demo").last_seq == 3
    assert intake.stuck is None


def test_a_box_whose_requests_go_unanswered_says_so_and_keeps_asking_at_the_usual_pace(waiting):
    intake, requests = waiting.intake, waiting.requests
    for _ in range(3 * 3600 // 10):
        intake.tick()
        waiting.now += 10
    assert intake.stuck and "batch 3 never arrived" in intake.stuck
    gaps = [b - a for a, b in zip(requests, requests[1:], strict=False)]
    assert max(gaps) == RETRY_BACKOFF_MAX * 30, "lost messages are asked for again soon"

    for chunk in batch.split(waiting.keyset.issue_batch({"NEW-0001": 1}, seq=3)):
        intake.on_chunk("box/batches/3", 3, chunk)
    assert trust.state(waiting.conn, "demo").last_seq == 3 and intake.stuck is None


@pytest.fixture
def loaded_box(tmp_path):
    box = write_box(tmp_path, make_keyset())
    conn = open_database(box.database)
    try:
        for data in (box.keyset.cards_batch(1), box.keyset.issue_batch({"OLD-0001": 1}, seq=2)):
            parsed = batch.open_file(data, box.keyset.roots)
            batch_import.apply(conn, parsed, merchant="demo", now=CREATED)
    finally:
        conn.close()
    return box
