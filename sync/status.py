"""The box's retained status message and last will (docs/protocol.md 16.5).

The broker keeps the newest status per box, so anyone subscribing later (a dashboard,
the backend) sees at once whether a box is online, how fresh its cache is and how much
is waiting in its outbox. The same topic carries the last will, which the broker
publishes when the box vanishes without a clean disconnect (power cut, kill -9, lost
network past the keepalive).

    >>> json.loads(will_payload("box-1"))
    {'v': 1, 'box': 'box-1', 'state': 'offline'}
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Mapping
from importlib import metadata

from cards import keys
from cards.grant import GrantSet
from storage import trust


@functools.cache
def version() -> str:
    """The installed package's version, read once: importlib.metadata walks sys.path
    and parses the package's metadata file on every call (a status is sent every
    minute and on each change; 1000 simulated boxes spent a core on it)."""
    try:
        return metadata.version("redeemd")
    except metadata.PackageNotFoundError:
        return "unknown"


# The members of one drivers[] entry, as protocol.md 16.5 and docs/schemas/status.schema.json
# list them: what the supervisor adds to its state for `redeemd status` reaches the wire
# only once the spec names it.
DRIVER_FIELDS = ("name", "kind", "state", "message", "last_scan", "scans", "restarts")


def driver_status(driver: dict[str, object]) -> dict[str, object]:
    """One drivers[] entry of the status message.

    `last_scan` goes out as whole Unix seconds: section 1 promises integer times in every
    message, and the supervisor keeps the float the scan carried.

    >>> driver_status({"name": "stdin", "kind": "stdin", "state": "connected",
    ...                "message": "", "last_scan": 1780000000.75, "scans": 1, "restarts": 0})
    {'name': 'stdin', 'kind': 'stdin', 'state': 'connected', 'message': '', 'last_scan': 1780000000, 'scans': 1, 'restarts': 0}
    """
    doc = {name: driver.get(name) for name in DRIVER_FIELDS}
    last_scan = doc["last_scan"]
    if isinstance(last_scan, int | float):
        doc["last_scan"] = int(last_scan)
    return doc


def clock(conn: sqlite3.Connection, merchant: str, wall: float) -> tuple[int, int | None]:
    """`at` and `cache_age_s` of the status message, both by the floored clock
    (protocol.md section 12: now = max(wall clock, time floor)) like every decision the
    box takes, so a box without a real-time clock (booted in 1970) shows the newest
    signed time it has verified and a cache age that is never negative. The cache's age
    is what `stale_policy = "reject"` judges by: the newest applied manifest or batch,
    as storage keeps them (protocol.md 16.1)."""
    now = max(int(wall), trust.time_floor(conn))
    known = trust.cache_time(conn, merchant)
    return now, None if known is None else now - known


def box_key_status(public_key: bytes | None) -> dict[str, object] | None:
    """The status's `box_key`: what a backend grants dispensing to, so it can learn a
    box's key from the retained status instead of asking a technician (section 18).

    >>> box_key_status(bytes(32))["key_id"]
    '66687aadf862bd77'
    """
    if public_key is None:
        return None
    return {"key_id": keys.key_id(public_key), "public_key": keys.b64(public_key)}


def dispensing_status(grants: GrantSet | None, used: Mapping[str, int]) -> dict[str, object]:
    """The status's `dispensing`: the grant set held and, per grant, the highest counter
    committed (`used`, 0 before the first), so the backend sees quota running out and
    revocations taking effect without waiting for the events."""
    if grants is None:
        return {"grant_seq": None, "grants": []}
    return {
        "grant_seq": grants.seq,
        "grants": [
            {
                "id": g.id,
                "cards": list(g.cards),
                "quota": g.quota,
                "used": used.get(g.id, 0),
                "not_after": g.not_after,
                "revoked": g.revoked,
            }
            for g in grants.grants
        ],
    }


def will_payload(box: str) -> bytes:
    return _dump({"v": 1, "box": box, "state": "offline"})


def status_payload(
    *,
    box: str,
    state: str,
    at: int,
    cache_seq: int,
    cache_age_s: int | None,
    outbox_depth: int,
    outbox_oldest_age_s: int | None,
    publish_error: str | None,
    drivers: list[dict[str, object]],
    alarm: str | None = None,
    stuck: str | None = None,
    manifests_ignored: int = 0,
    box_key: dict[str, object] | None = None,
    dispensing: dict[str, object] | None = None,
) -> bytes:
    return _dump(
        {
            "v": 1,
            "box": box,
            "state": state,
            "version": version(),
            "at": at,
            "cache_seq": cache_seq,
            "cache_age_s": cache_age_s,
            "outbox_depth": outbox_depth,
            "outbox_oldest_age_s": outbox_oldest_age_s,
            "publish_error": publish_error,
            "drivers": [driver_status(d) for d in drivers],
            "alarm": alarm,
            "stuck": stuck,
            "manifests_ignored": manifests_ignored,
            "box_key": box_key,
            "dispensing": dispensing or dispensing_status(None, {}),
        }
    )


def _dump(value: dict[str, object]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
