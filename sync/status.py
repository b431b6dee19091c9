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

import json
from importlib import metadata


def version() -> str:
    try:
        return metadata.version("redeemd")
    except metadata.PackageNotFoundError:
        return "unknown"


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
    drivers: list[dict],
    alarm: str | None = None,
    stuck: str | None = None,
    manifests_ignored: int = 0,
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
            "drivers": drivers,
            "alarm": alarm,
            "stuck": stuck,
            "manifests_ignored": manifests_ignored,
        }
    )


def _dump(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
