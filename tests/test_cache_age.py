"""How old the box's cache is (protocol.md 16.1), as `stale_policy = "reject"` judges
it and as the status message shows it (16.5, by the floored clock of section 12).

The cache is known current as of the `created_at` of the newest manifest whose
`latest_seq` the box has applied, or of its newest applied batch if that is later. The
manifest is accepted by the real sync intake (or the real sync thread over a real
Mosquitto) and kept in the database; the engine reads it from there on its own
connection, so it holds after a restart and with sync stopped. The box's batches 1 and
2 are signed at CREATED and the box's clock is eight days later: over the default
`max_staleness` of seven days, so without a fresh manifest every scan is `stale_cache`.
"""

# ruff: noqa: F811  (the broker and backend fixtures are imported, then named as parameters)
from __future__ import annotations

import json
import time

from broker import broker  # noqa: F401  (fixture)
from conftest import CREATED, FAR, Box, wait_for
from test_sync_box import backend, new_codes, publish_manifest, sync_box  # noqa: F401

from cards import manifest
from cards.scan import Scan
from cards.verdict import Outcome, Reason, Verdict
from daemon.engine import Engine
from storage.database import open_database
from sync.intake import Intake
from sync.worker import Sync

HOUR = 3600
DAY = 24 * HOUR
NOW = CREATED + 8 * DAY


def rejecting(box: Box) -> Box:
    """The box with `[trust] stale_policy = "reject"` (max_staleness stays 7 days)."""
    text = box.config_path.read_text()
    box.config_path.write_text(text.replace("[trust]\n", '[trust]\nstale_policy = "reject"\n'))
    assert box.config.trust.stale_policy == "reject"
    return box


def accept_manifest(box: Box, latest_seq: int, created_at: int, clock: int = NOW) -> None:
    """The real sync intake accepts one manifest at `clock`, then goes away (a restart)."""
    conn = open_database(box.database)
    try:
        intake = Intake(
            conn, merchant="demo", roots=box.keyset.roots, max_batch_bytes=1 << 20,
            request_topic="request", publish=lambda topic, payload: (0, 0), retry=30.0,
            clock=lambda: clock,
        )  # fmt: skip
        intake.on_manifest(
            "manifest",
            manifest.build(
                box.keyset.issuer_private, box.keyset.delegation, merchant="demo",
                latest_seq=latest_seq, created_at=created_at, expires_at=FAR,
            ),
        )  # fmt: skip
        assert intake.refused == 0 and intake.manifest is not None, intake.last_refused
    finally:
        conn.close()


def engine_at(box: Box, now: int = NOW) -> Engine:
    """A freshly started engine on its own connection: it knows only the database."""
    return Engine(open_database(box.database), box.config, clock=lambda: now)


def verdict(engine: Engine, code: str) -> Verdict:
    result = engine.handle(Scan(code=code.encode(), source="front"))
    assert isinstance(result, Verdict), result
    return result


def test_a_rejecting_box_with_batches_8_days_old_and_no_manifest_is_stale(loaded_box):
    engine = engine_at(rejecting(loaded_box))
    result = verdict(engine, "DEMO-0001")
    assert result.reason is Reason.STALE_CACHE and "192 h ago" in result.detail
    # The same box a day earlier is within max_staleness: the setup is not stale by itself.
    assert verdict(engine_at(loaded_box, CREATED + 6 * DAY), "DEMO-0002").accepted


def test_an_applied_manifest_an_hour_old_keeps_a_rejecting_box_accepting(loaded_box):
    box = rejecting(loaded_box)
    accept_manifest(box, latest_seq=2, created_at=NOW - HOUR)
    engine = engine_at(box)
    assert verdict(engine, "DEMO-0001").outcome is Outcome.ACCEPTED
    assert verdict(engine, "DEMO-0002").outcome is Outcome.ACCEPTED


def test_a_rejecting_box_whose_manifest_is_old_too_rejects_as_stale_cache(loaded_box):
    box = rejecting(loaded_box)
    accept_manifest(box, latest_seq=2, created_at=NOW - 7 * DAY - HOUR)
    assert verdict(engine_at(box), "DEMO-0001").reason is Reason.STALE_CACHE


def test_a_fresh_manifest_naming_a_batch_not_applied_counts_once_it_is_imported(loaded_box):
    box = rejecting(loaded_box)
    accept_manifest(box, latest_seq=3, created_at=NOW - HOUR)
    engine = engine_at(box)
    # Batch 3 exists and is not here: the manifest does not vouch for this cache.
    assert verdict(engine, "DEMO-0001").reason is Reason.STALE_CACHE
    # Batch 3, itself 7.5 days old, arrives by file (sync or not): now the manifest counts.
    path = box.write_batch(
        "3.rdb", box.keyset.issue_batch(new_codes(1), seq=3, created_at=CREATED + 12 * HOUR)
    )
    result = box.cli("import", str(path))
    assert result.returncode == 0, result.stderr.decode()
    assert verdict(engine, "DEMO-0002").outcome is Outcome.ACCEPTED


def test_an_applied_manifest_still_counts_after_a_newer_one_names_a_missing_batch(loaded_box):
    box = rejecting(loaded_box)
    accept_manifest(box, latest_seq=2, created_at=NOW - 2 * HOUR)
    accept_manifest(box, latest_seq=3, created_at=NOW - HOUR)
    # Two hours ago the cache was current; the newer manifest only says batch 3 exists.
    assert verdict(engine_at(box), "DEMO-0001").outcome is Outcome.ACCEPTED


def statuses(backend) -> list[dict]:
    return [s for s in backend.statuses() if s.get("state") == "online"]


def running_from(start: int):
    """A wall clock that starts at `start` and runs: the sync thread schedules its
    status messages by it."""
    began = time.monotonic()
    return lambda: start + (time.monotonic() - began)


def test_the_sync_threads_manifest_keeps_the_running_engine_accepting(
    tmp_path, keyset, broker, backend
):
    box = sync_box(tmp_path, keyset, broker, trust='stale_policy = "reject"')
    config = box.config
    engine = engine_at(box)
    sync = Sync(
        config.sync, box=config.box.id, merchant="demo", database=config.box.database,
        roots=config.trust.root_keys, max_batch_bytes=config.trust.max_batch_bytes,
        clock=running_from(NOW),
    )  # fmt: skip
    sync.start()
    try:
        wait_for(lambda: statuses(backend), "the box's status")
        assert 8 * DAY <= statuses(backend)[-1]["cache_age_s"] < 8 * DAY + HOUR
        assert verdict(engine, "DEMO-0001").reason is Reason.STALE_CACHE
        publish_manifest(backend, keyset, latest_seq=2, created_at=NOW - HOUR)
        wait_for(
            lambda: [s for s in statuses(backend) if s["cache_age_s"] < 2 * HOUR],
            "a status with the manifest's age",
        )
        assert verdict(engine, "DEMO-0002").outcome is Outcome.ACCEPTED
    finally:
        assert sync.stop(timeout=10), "sync did not stop"
        engine.conn.close()


def test_status_at_and_cache_age_use_the_floored_clock_on_a_box_without_a_clock(
    tmp_path, keyset, broker, backend
):
    box = sync_box(tmp_path, keyset, broker)
    config = box.config
    engine = Engine(open_database(box.database), config, clock=lambda: 0)
    assert verdict(engine, "DEMO-0001").accepted  # recorded at the floor, CREATED
    sync = Sync(
        config.sync, box=config.box.id, merchant="demo", database=config.box.database,
        roots=config.trust.root_keys, max_batch_bytes=config.trust.max_batch_bytes,
        clock=running_from(0),  # booted in 1970
    )  # fmt: skip
    sync.start()
    try:
        status = wait_for(lambda: statuses(backend), "the box's status")[-1]
        # The floor is the batches' signed time: now = max(wall clock, floor) = CREATED.
        assert status["at"] == CREATED
        assert status["cache_age_s"] == 0 and status["outbox_oldest_age_s"] == 0
        publish_manifest(backend, keyset, latest_seq=2, created_at=CREATED + HOUR)
        moved = wait_for(
            lambda: [s for s in statuses(backend) if s["at"] == CREATED + HOUR],
            "a status at the manifest's signed time",
        )[-1]
        assert moved["cache_age_s"] == 0 and moved["outbox_oldest_age_s"] == HOUR
    finally:
        assert sync.stop(timeout=10), "sync did not stop"
        engine.conn.close()


def test_redeemd_status_judges_staleness_by_the_manifest_kept_in_the_database(loaded_box):
    # `redeemd status` reads only the database, with the daemon and its sync stopped.
    wall = int(time.time())
    accept_manifest(loaded_box, latest_seq=2, created_at=wall - HOUR, clock=wall)
    result = loaded_box.cli("status", "--json")
    assert result.returncode == 0, result.stderr.decode()
    info = json.loads(result.stdout)
    assert info["cache_seq"] == 2 and info["stale"] is False
    assert HOUR <= info["cache_age_s"] < 2 * HOUR  # not the batches' age, CREATED
