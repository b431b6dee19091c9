"""The backend store behaves the same on SQLite and on PostgreSQL: one suite, run on both.

Every test takes `database` (None: the SQLite file backend.db; or a fresh database on
the test PostgreSQL) and opens the real Store on it, so what passes here holds for the
embedded default and for a fleet's shared PostgreSQL alike. The PostgreSQL server
starts only when a PostgreSQL case runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from backend_helpers import make_backend, record
from broker import free_port
from conftest import ROOT, KeySet
from postgres import PostgreSQL

from backend.box_status import parse_status
from backend.engines import open_engine
from backend.events import Event, parse_message
from backend.store import DATABASE_ENV, STEPS, Store, StoreError
from cards import batch
from cards.batch import Kind

D1 = bytes.fromhex("d1" * 16)
D2 = bytes.fromhex("d2" * 16)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """How Store.open is told its database: None for SQLite, a URL for PostgreSQL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgresql_url")


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "backend"


@pytest.fixture
def store(directory: Path, database: str | None) -> Iterator[Store]:
    opened = Store.open(directory, database)
    yield opened
    opened.close()


def events(box: str, *records: dict) -> list[Event]:
    """Records as the collector has them: parsed from the box's events message."""
    body = json.dumps({"v": 1, "box": box, "records": list(records)}).encode()
    return parse_message(body, merchant="demo", box=box)


def redeemed(seq: int, box: str, digest: bytes) -> dict:
    """A single-use code's last use, accepted on `box`."""
    return record(seq, box, action="redeem", digest=digest, uses=1, uses_left=0)


def count(store: Store, table: str) -> int:
    return store.engine.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def signer(keyset: KeySet):
    def sign(merchant: str, seq: int, entries: bytes) -> bytes:
        return keyset.build(Kind.CONSUMED, entries, seq, merchant=merchant)

    return sign


# ------------------------------------------------------------------ events


def test_the_same_record_sent_twice_is_stored_once(store: Store):
    first, second = record(1, "box-1"), record(2, "box-1")
    stored = store.store_events("demo", "box-1", events("box-1", first, second, first))
    assert (stored.new, stored.duplicates, stored.upto) == (2, 1, 2)
    again = store.store_events("demo", "box-1", events("box-1", second, first))
    assert (again.new, again.duplicates, again.upto) == (0, 2, 2)
    assert count(store, "events") == 2


def test_the_high_water_mark_stops_at_a_gap_which_is_reported_until_filled(store: Store):
    stored = store.store_events("demo", "box-1", events("box-1", record(1, "box-1"),
                                                        record(4, "box-1")))  # fmt: skip
    assert stored.upto == 1
    assert [(g.first, g.last) for g in stored.gaps] == [(2, 3)]
    assert len(stored.ids) == 1, "seq 4 is stored but above the mark"
    assert [(g.box, g.first, g.last) for g in store.open_gaps()] == [("box-1", 2, 3)]
    assert store.high_water("demo", "box-1") == 1

    filled = store.store_events(
        "demo", "box-1", events("box-1", record(2, "box-1"), record(3, "box-1"))
    )
    assert filled.upto == 4 and filled.ids == ()
    assert [(g.first, g.last) for g in filled.filled] == [(2, 3)]
    assert store.open_gaps() == []
    assert store.high_water("demo", "box-1") == 4
    assert store.high_water("demo", "box-2") == 0, "a box never heard of"


def test_a_code_used_up_on_two_boxes_is_one_conflict_and_one_consumed_batch(
    store: Store, keyset: KeySet
):
    first, second = redeemed(1, "box-1", D1), redeemed(1, "box-2", D1)
    store.store_events("demo", "box-1", events("box-1", first), signer(keyset))
    stored = store.store_events("demo", "box-2", events("box-2", second), signer(keyset))
    [conflict] = stored.conflicts
    assert (conflict.first_id, conflict.second_id) == (first["id"], second["id"])
    assert (conflict.digest, conflict.first_box, conflict.second_box) == (
        D1.hex(),
        "box-1",
        "box-2",
    )
    assert store.conflicts() == [conflict]
    consumed = stored.consumed
    assert consumed is not None and (consumed.seq, consumed.kind) == (1, Kind.CONSUMED)
    assert store.batches("demo", 1, 1) == [consumed], "stored as signed, bytes and all"
    assert store.unpublished() == [consumed]
    store.mark_published("demo", 1)
    assert store.unpublished() == []
    # Told once: the same records again are duplicates, not a second conflict or batch.
    again = store.store_events("demo", "box-2", events("box-2", second), signer(keyset))
    assert (again.new, again.conflicts, again.consumed) == (0, (), None)
    assert store.latest_seq("demo") == 1


def test_one_group_commit_stores_each_record_once_and_finds_a_double_redemption_once(
    store: Store, keyset: KeySet
):
    """The collector stores every message waiting in one commit (one bulk insert): a
    record resent within the group is a duplicate, two messages of one box close its gap,
    and the code used up on two boxes is one conflict, found by the later record."""
    first, second = redeemed(1, "box-1", D1), redeemed(1, "box-2", D1)
    later = record(2, "box-1")
    results = store.store_messages(
        [
            ("demo", "box-1", events("box-1", first)),
            ("demo", "box-2", events("box-2", second)),
            ("demo", "box-1", events("box-1", later, first)),
        ],
        signer(keyset),
    )
    assert [(r.new, r.duplicates) for r in results] == [(1, 0), (1, 0), (1, 1)]
    assert results[2].upto == 2 and store.open_gaps() == []
    assert results[0].conflicts == ()
    [conflict] = results[1].conflicts
    assert (conflict.first_id, conflict.second_id) == (first["id"], second["id"])
    assert store.conflicts() == [conflict] and count(store, "events") == 3


# ------------------------------------------------------------------ the allocator


def test_issue_takes_the_next_sequence_and_refuses_a_taken_one(store: Store, keyset: KeySet):
    def make(seq: int) -> bytes:
        return keyset.build(Kind.REVOKE, batch.encode_digests([D1]), seq)

    assert [store.issue("demo", Kind.REVOKE, make).seq for _ in range(3)] == [1, 2, 3]
    assert store.issue("demo", Kind.REVOKE, make, seq=7).seq == 7
    with pytest.raises(StoreError, match="already issued"):
        store.issue("demo", Kind.REVOKE, make, seq=2)
    assert store.latest_seq("demo") == 7 and store.merchants() == ["demo"]
    assert [b.seq for b in store.batches("demo", 2, 7)] == [2, 3, 7]


def racing(*works: Callable[[], None]) -> list[BaseException]:
    """Run `works` on threads released together; the errors they raised."""
    start = threading.Barrier(len(works))
    errors: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> None:
        start.wait()
        try:
            work()
        except BaseException as exc:  # the test asserts there were none
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(work,)) for work in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return errors


def test_two_connections_allocating_at_once_never_share_a_sequence(
    directory: Path, database: str | None, keyset: KeySet
):
    """`issue` on one connection and the collector's consumed-elsewhere batches on
    another, racing: every batch gets its own sequence, with none skipped."""
    rounds = 15
    issuer, collector = Store.open(directory, database), Store.open(directory, database)
    seqs: list[int] = []

    def make(seq: int) -> bytes:
        return keyset.build(Kind.REVOKE, batch.encode_digests([D2]), seq)

    def issuing() -> None:
        seqs.extend(issuer.issue("demo", Kind.REVOKE, make).seq for _ in range(rounds))

    def collecting() -> None:
        for n in range(rounds):
            digest = n.to_bytes(16, "big")
            for box in ("box-1", "box-2"):
                stored = collector.store_events(
                    "demo", box, events(box, redeemed(n + 1, box, digest)), signer(keyset)
                )
            assert stored.consumed is not None
            seqs.append(stored.consumed.seq)

    try:
        assert racing(issuing, collecting) == []
        assert sorted(seqs) == list(range(1, 2 * rounds + 1))
        assert [b.seq for b in issuer.batches("demo", 1, 2 * rounds)] == sorted(seqs)
    finally:
        issuer.close()
        collector.close()


def test_two_connections_storing_at_once_keep_marks_and_find_every_conflict(
    directory: Path, database: str | None
):
    """Two collectors, each with its own connection, commit at the same moment: one
    half of a box's records each, and each box's redemption of the same code. The
    high-water mark still ends at the top, with no gap left open, and every double
    redemption is found although neither commit saw the other's record when it began."""
    rounds = 30
    first, second = Store.open(directory, database), Store.open(directory, database)
    together = threading.Barrier(2)

    def collecting(store: Store, box: str, parity: int) -> Callable[[], None]:
        def work() -> None:
            for n in range(rounds):
                digest = n.to_bytes(16, "big")
                together.wait(60)  # both commits of a round start at once
                # The shared box's seqs 2n+1 and 2n+2: one to each collector.
                store.store_events(
                    "demo", "shared", events("shared", record(2 * n + parity, "shared"))
                )
                together.wait(60)
                store.store_events("demo", box, events(box, redeemed(n + 1, box, digest)))

        return work

    try:
        assert racing(collecting(first, "box-1", 1), collecting(second, "box-2", 2)) == []
        assert first.high_water("demo", "shared") == 2 * rounds
        assert first.open_gaps() == []
        assert len(first.conflicts()) == rounds
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------ fleet


def test_a_box_is_registered_for_one_merchant_and_removed_keeping_its_records(store: Store):
    assert store.add_boxes("acme", ["box-1", "box-2"]) == ["box-1", "box-2"]
    assert store.add_boxes("acme", ["box-2", "box-3"]) == ["box-3"]
    with pytest.raises(StoreError, match="registered for merchant acme"):
        store.add_boxes("other", ["box-9", "box-1"])
    assert store.fleet() == {"box-1": "acme", "box-2": "acme", "box-3": "acme"}, (
        "nothing of a refused add is kept"
    )
    assert store.merchant_of("box-2") == "acme" and store.merchant_of("box-9") is None

    store.store_events("demo", "box-2", events("box-2", record(1, "box-2")))
    assert store.remove_boxes(["box-2", "box-7"]) == ["box-2"]
    assert store.fleet() == {"box-1": "acme", "box-3": "acme"}
    assert store.seen_unregistered() == [("demo", "box-2")]
    assert count(store, "events") == 1


# ------------------------------------------------------------------ schema


def test_a_database_made_by_the_previous_version_is_migrated_keeping_its_data(
    directory: Path, database: str | None
):
    previous = STEPS[:-1]  # the previous release: every step but the newest
    engine = open_engine(directory, database, previous)
    with engine.transaction():
        engine.execute("INSERT INTO boxes(merchant, box, upto) VALUES (?, ?, ?)", ["demo", "b", 9])
    engine.close()

    store = Store.open(directory, database)
    try:
        assert store.high_water("demo", "b") == 9
        assert store.add_boxes("demo", ["b"]) == ["b"]
        assert store.seen_unregistered() == []
        table = store.engine.migrations_table
        names = [r[0] for r in store.engine.execute(f"SELECT name FROM {table} ORDER BY name")]
        assert names == [name for name, _ in STEPS]
    finally:
        store.close()


def test_processes_opening_a_new_database_together_migrate_it_once(
    directory: Path, database: str | None
):
    opened: list[Store] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def opening() -> None:
        start.wait()
        try:
            opened.append(Store.open(directory, database))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opening) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert errors == [] and len(opened) == 4
        table = opened[0].engine.migrations_table
        assert opened[0].engine.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == len(STEPS)
    finally:
        for each in opened:
            each.close()


def test_an_unknown_database_url_is_refused_with_the_forms_allowed(directory: Path):
    with pytest.raises(StoreError, match="postgresql://user@host:port/name") as refused:
        Store.open(directory, "mysql://root:secret@db/redeemd")
    assert "secret" not in str(refused.value)


# ------------------------------------------------------------------ PostgreSQL crashes


def test_postgresql_killed_mid_run_loses_no_committed_event(
    own_postgresql: PostgreSQL,
    tmp_path: Path,
):
    url = own_postgresql.create_database()
    store = Store.open(tmp_path, url)
    committed: list[int] = []
    failed: list[BaseException] = []
    enough = threading.Event()
    sent = [record(seq, "box-1") for seq in range(1, 10_001)]

    def storing() -> None:
        try:
            for message in sent:
                store.store_events("demo", "box-1", events("box-1", message))
                committed.append(message["seq"])
                if len(committed) == 20:
                    enough.set()
        except psycopg.OperationalError as exc:
            failed.append(exc)
        finally:
            enough.set()

    writer = threading.Thread(target=storing)
    writer.start()
    assert enough.wait(120)
    own_postgresql.kill()
    writer.join(120)
    assert failed, "the writer saw the server go"
    assert 20 <= len(committed) < len(sent)

    own_postgresql.start()
    store.close()
    store = Store.open(tmp_path, url)
    try:
        kept = [r[0] for r in store.engine.execute("SELECT seq FROM events ORDER BY seq")]
        assert kept[: len(committed)] == committed, "every committed event is there"
        assert len(kept) <= len(committed) + 1, "at most the one in flight besides"
        assert store.high_water("demo", "box-1") == len(kept)
        # The box resends what it has no ack for: stored once, the mark moves on.
        upto = len(kept) + 50
        resent = store.store_events("demo", "box-1", events("box-1", *sent[:upto]))
        assert (resent.upto, resent.new, resent.duplicates) == (upto, 50, len(kept))
    finally:
        store.close()


# ------------------------------------------------------------------ the CLI


def backend_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != DATABASE_ENV}
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**environment, "PYTHONPATH": str(ROOT), **(env or {})},
    )  # fmt: skip


def test_the_cli_keeps_its_records_in_the_postgresql_given_by_flag_or_environment(
    postgresql_url: str,
    tmp_path: Path,
):
    directory = tmp_path / "backend"
    make_backend(directory, merchants=("demo",))
    added = backend_cli("box", "add", "--dir", str(directory), "--merchant", "demo",
                        "--database", postgresql_url, "box-1")  # fmt: skip
    assert added.returncode == 0, added.stderr
    issued = backend_cli(
        "issue", "--dir", str(directory), "--merchant", "demo", "--out", str(tmp_path / "1.rdb"),
        "--input", str(ROOT / "backend/demo/codes.csv"), env={DATABASE_ENV: postgresql_url},
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    listed = backend_cli("box", "list", "--dir", str(directory), env={DATABASE_ENV: postgresql_url})
    assert listed.stdout.splitlines() == ["demo\tbox-1"], listed.stderr

    assert not (directory / "backend.db").exists(), "nothing went to the SQLite file"
    store = Store.open(directory, postgresql_url)
    try:
        assert store.fleet() == {"box-1": "demo"}
        assert store.latest_seq("demo") == 1
    finally:
        store.close()
    # Without flag or variable: the SQLite file, which knows none of it.
    sqlite = backend_cli("box", "list", "--dir", str(directory))
    assert sqlite.stdout.startswith("no boxes registered"), sqlite.stdout


def test_the_cli_says_which_database_it_cannot_reach(tmp_path: Path):
    directory = tmp_path / "backend"
    make_backend(directory, merchants=("demo",))
    url = f"postgresql://redeemd:secret@127.0.0.1:{free_port()}/redeemd"
    refused = backend_cli("box", "list", "--dir", str(directory), "--database", url)
    assert refused.returncode == 1
    assert refused.stderr.startswith("redeemd-backend: cannot connect to postgresql://redeemd:***@")
    assert "secret" not in refused.stderr


def test_a_postgresql_url_without_the_driver_names_the_extra_to_install(tmp_path: Path):
    # A box installs redeemd without the postgresql extra; a backend set up the same way
    # must say what to install rather than fail with an ImportError.
    script = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from pathlib import Path\n"
        "from backend.store import Store, StoreError\n"
        "try:\n"
        f"    Store.open(Path({str(tmp_path)!r}), 'postgresql://redeemd:hunter2@127.0.0.1:1/x')\n"
        "except StoreError as exc:\n"
        "    print(exc)\n"
    )
    said = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "pip install 'redeemd[postgresql]'" in said, said
    assert "hunter2" not in said and "redeemd:***@127.0.0.1:1" in said


# ------------------------------------------------------------------ box status


def status_message(box: str, state: str = "online", **members: object) -> bytes:
    """A box's own status message (protocol.md 16.5), as sync/status.py writes it."""
    doc: dict[str, object] = {
        "v": 1, "box": box, "state": state, "version": "0.1.0", "at": 1_780_000_000,
        "cache_seq": 2, "cache_age_s": 5, "outbox_depth": 0, "outbox_oldest_age_s": None,
        "publish_error": None, "drivers": [], "alarm": None, "stuck": None,
        "manifests_ignored": 0,
    }  # fmt: skip
    doc.update(members)
    return json.dumps(doc).encode()


def test_a_box_status_history_keeps_changes_of_state_cache_and_problems_only(store: Store):
    store.add_boxes("demo", ["box-1"])

    def status(cache_seq: int, depth: int = 0, at: int = 1_780_000_000, **more) -> object:
        message = status_message("box-1", cache_seq=cache_seq, outbox_depth=depth, at=at, **more)
        return parse_status(message, "box-1")

    store.record_status("demo", "box-1", status(3), now=1000)
    store.record_status("demo", "box-1", status(3, depth=5, at=1_780_000_060), now=1060)
    store.record_status("demo", "box-1", status(4, at=1_780_000_120), now=1120)
    store.record_status("demo", "box-1", status(4, at=1_780_000_180, alarm="disk full"), now=1180)
    will = parse_status(b'{"v":1,"box":"box-1","state":"offline"}', "box-1")
    store.record_status("demo", "box-1", will, now=1240)
    assert store.status_history("demo", "box-1") == [
        (1240, "offline", 4, None, None),
        (1180, "online", 4, 0, "disk full"),
        (1120, "online", 4, 0, None),
        (1000, "online", 3, 0, None),
    ], "the outbox alone changing is no history row; a last will keeps the cache seq"
    assert store.status_history("demo", "box-1", limit=1) == [(1240, "offline", 4, None, None)]
    # Rows older than HISTORY_DAYS go when the box next writes one.
    store.record_status("demo", "box-1", status(5, at=1_790_000_000), now=1000 + 91 * 86400)
    assert [row[2] for row in store.status_history("demo", "box-1")] == [5]


def test_a_box_status_is_kept_once_and_its_last_will_marks_it_offline_since_then(store: Store):
    store.add_boxes("demo", ["box-1", "box-2"])
    scanner = {"name": "front", "kind": "serial", "state": "disconnected", "message": "unplugged",
               "last_scan": None, "scans": 0, "restarts": 3}  # fmt: skip
    online = parse_status(
        status_message("box-1", cache_seq=3, outbox_depth=4, outbox_oldest_age_s=90,
                       drivers=[scanner], stuck="batch 4 refused"), "box-1"
    )  # fmt: skip
    assert store.record_status("demo", "box-1", online, now=1000) is True
    assert store.record_status("demo", "box-1", online, now=1100) is False, (
        "a retained status redelivered changes nothing"
    )
    later = parse_status(status_message("box-1", cache_seq=4, at=1_780_000_060), "box-1")
    assert store.record_status("demo", "box-1", later, now=1200) is True

    rows = {row.box: row for row in store.box_rows()}
    one = rows["box-1"]
    assert one.status is not None
    assert (one.status.state, one.since, one.last_seen, one.status.cache_seq) == (
        "online",
        1000,
        1200,
        4,
    ), "online since the first status, seen at the last"
    assert one.status.outbox_depth == 0
    assert rows["box-2"].status is None and rows["box-2"].last_seen is None, "never seen"
    assert one.latest_seq == store.latest_seq("demo") == 0

    will = parse_status(b'{"v":1,"box":"box-1","state":"offline"}', "box-1")
    assert store.record_status("demo", "box-1", will, now=1300) is True
    assert store.record_status("demo", "box-1", will, now=1400) is False
    one = store.box_rows()[0]
    assert one.status is not None
    assert (one.status.state, one.since, one.last_seen, one.received_at) == (
        "offline",
        1300,
        1200,
        1300,
    )
    assert one.status.cache_seq == 4, "the last will keeps what the box said last"

    assert store.record_status("demo", "box-1", online, now=1500) is True, "back online"
    back = store.box_rows()[0]
    assert back.status is not None
    assert (back.status.state, back.since, back.status.drivers) == ("online", 1500, (scanner,))
    assert (back.status.outbox_oldest_age_s, back.status.stuck) == (90, "batch 4 refused")
    assert back.status == online, "the status read back is the one recorded"


def test_a_status_kept_for_a_box_since_removed_is_not_listed(store: Store):
    store.add_boxes("demo", ["box-1"])
    store.record_status("demo", "box-1", parse_status(status_message("box-1"), "box-1"), now=1)
    store.remove_boxes(["box-1"])
    assert store.box_rows() == []


def test_a_database_at_m002_gains_the_status_table_keeping_its_data(
    directory: Path, database: str | None
):
    names = [name for name, _ in STEPS]
    engine = open_engine(directory, database, STEPS[: names.index("m002_fleet") + 1])
    with engine.transaction():
        engine.execute(
            "INSERT INTO fleet(box, merchant, added_at) VALUES (?, ?, ?)", ["b", "demo", 5]
        )
        engine.execute("INSERT INTO boxes(merchant, box, upto) VALUES (?, ?, ?)", ["demo", "b", 9])
    engine.close()

    store = Store.open(directory, database)
    try:
        assert store.fleet() == {"b": "demo"} and store.high_water("demo", "b") == 9
        [row] = store.box_rows()
        assert (row.box, row.added_at, row.status) == ("b", 5, None)
        status = parse_status(status_message("b", cache_seq=7), "b")
        assert store.record_status("demo", "b", status, now=10)
        kept = store.box_rows()[0].status
        assert kept is not None and kept.cache_seq == 7
        table = store.engine.migrations_table
        applied = [r[0] for r in store.engine.execute(f"SELECT name FROM {table} ORDER BY name")]
        assert applied == names and "m003_box_status" in applied
    finally:
        store.close()
