"""protocol.md sections 12 and 16.1 as built: what an accepted manifest does to the time
floor, when a box refuses one, and what a `latest_seq` below the applied sequence does.

The box side is the real sync intake on a real SQLite database (the one `loaded_box`
filled with batches 1 and 2, signed at CREATED, so the floor starts at CREATED). The
wall clock is a value, so the box can be plausible (clock at or past its floor) or
without a real-time clock (booted in 1970, behind its floor).
"""

from __future__ import annotations

from conftest import CREATED, FAR

from cards import manifest
from storage import trust
from storage.database import open_database
from sync.intake import Intake

DAY = 86_400


def intake_at(box, wall: int, sent: list | None = None) -> Intake:
    conn = open_database(box.database)
    return Intake(
        conn, merchant="demo", roots=box.keyset.roots, max_batch_bytes=1 << 20,
        request_topic="request",
        publish=lambda topic, payload: (sent.append(payload) if sent is not None else None)
        or (0, 0),
        retry=30.0, clock=lambda: wall,
    )  # fmt: skip


def signed(box, created_at: int, latest_seq: int = 2, expires_at: int = FAR) -> bytes:
    return manifest.build(
        box.keyset.issuer_private, box.keyset.delegation, merchant="demo",
        latest_seq=latest_seq, created_at=created_at, expires_at=expires_at,
    )  # fmt: skip


def floor_on_disk(box) -> int:
    conn = open_database(box.database)
    try:
        return trust.time_floor(conn)
    finally:
        conn.close()


def test_an_accepted_manifest_raises_the_time_floor_on_disk_without_any_batch(loaded_box):
    assert floor_on_disk(loaded_box) == CREATED
    intake = intake_at(loaded_box, wall=CREATED + 1000)
    intake.on_manifest("manifest", signed(loaded_box, CREATED + 500))
    assert intake.refused == 0 and intake.manifest is not None
    assert floor_on_disk(loaded_box) == CREATED + 500
    assert trust.state(intake.conn, "demo").last_seq == 2  # a manifest applies nothing
    intake.conn.close()


def test_a_manifest_signed_more_than_a_day_ahead_of_a_plausible_clock_is_refused(loaded_box):
    wall = CREATED + 1000
    intake = intake_at(loaded_box, wall=wall)
    intake.on_manifest("manifest", signed(loaded_box, wall + DAY + 1, latest_seq=9))
    assert intake.refused == 1 and "ahead" in intake.last_refused
    assert intake.manifest is None and intake.want_to == 0
    assert floor_on_disk(loaded_box) == CREATED
    # Exactly a day ahead is still plausible (a backend clock a little fast).
    intake.on_manifest("manifest", signed(loaded_box, wall + DAY))
    assert intake.refused == 1 and floor_on_disk(loaded_box) == wall + DAY
    intake.conn.close()


def test_a_box_behind_its_floor_cannot_judge_and_accepts_a_manifest_far_ahead(loaded_box):
    intake = intake_at(loaded_box, wall=0)  # no RTC: booted in 1970
    intake.on_manifest("manifest", signed(loaded_box, CREATED + 30 * DAY))
    assert intake.refused == 0
    assert floor_on_disk(loaded_box) == CREATED + 30 * DAY
    intake.conn.close()


def test_staleness_is_judged_by_the_floored_clock(loaded_box):
    # The wall clock (1970) is long before expires_at, but the floor is not.
    intake = intake_at(loaded_box, wall=0)
    intake.on_manifest("manifest", signed(loaded_box, CREATED - 100, expires_at=CREATED - 1))
    assert intake.refused == 1 and "stale" in intake.last_refused
    assert floor_on_disk(loaded_box) == CREATED
    intake.conn.close()


def test_a_latest_seq_below_the_applied_sequence_is_accepted_and_requests_nothing(loaded_box):
    sent: list[bytes] = []
    wall = CREATED + 1000
    intake = intake_at(loaded_box, wall=wall, sent=sent)
    intake.on_manifest("manifest", signed(loaded_box, CREATED + 600, latest_seq=1))
    intake.tick()
    assert intake.refused == 0 and sent == []
    assert intake.manifest is not None and intake.manifest.latest_seq == 1
    # The box counts as up to date: its cache age follows this manifest (16.1, 16.5).
    assert intake.cache_age(wall) == 400
    intake.conn.close()
