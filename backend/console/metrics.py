"""`/metrics`: the fleet and the store in Prometheus text format (version 0.0.4).

Per box: online (1/0), batches behind, outbox depth and oldest unsent age, last seen;
per merchant: boxes by state, open gaps, conflicts found, records stored. The box
figures are boxes_view's entries (what the fleet page and `redeemd-backend boxes`
show). Records stored is the sum of every box's contiguous high-water mark
(`boxes.upto`), which only grows: `rate(redeemd_events_stored_total[5m])` is the
ingest rate, read from one small table instead of counting the events table at every
scrape.

    >>> text = render(store, int(time.time()))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from backend import boxes_view
from backend.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float | int]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{labels} {value}")


def render(store: Store, now: int) -> str:
    entries = boxes_view.view(store.box_rows(), now)
    merchants = sorted({e["merchant"] for e in entries})
    by_state = Counter((e["merchant"], e["state"]) for e in entries)
    sql = store.engine.execute
    gaps = dict(
        sql("SELECT merchant, COUNT(*) FROM gaps WHERE filled_at IS NULL GROUP BY merchant")
    )
    conflicts = dict(sql("SELECT merchant, COUNT(*) FROM conflicts GROUP BY merchant"))
    stored = dict(sql("SELECT merchant, SUM(upto) FROM boxes GROUP BY merchant"))
    every = sorted({*merchants, *gaps, *conflicts, *stored})

    def per_box(key: str, convert: Any = int) -> list[tuple[str, float | int]]:
        return [
            (_labels(merchant=e["merchant"], box=e["box"]), convert(e[key]))
            for e in entries
            if e[key] is not None
        ]

    out = _Text()
    out.family(
        "redeemd_boxes",
        "gauge",
        "Registered boxes by state (online, offline, never_seen).",
        [
            (_labels(merchant=m, state=s), by_state[(m, s)])
            for m in merchants
            for s in ("online", "offline", boxes_view.NEVER_SEEN)
        ],
    )
    out.family(
        "redeemd_box_online",
        "gauge",
        "1 if the box's retained status says online, else 0.",
        [
            (_labels(merchant=e["merchant"], box=e["box"]), int(e["state"] == "online"))
            for e in entries
        ],
    )
    out.family(
        "redeemd_box_state_since_seconds",
        "gauge",
        "When the backend saw the box's current state begin (Unix time).",
        per_box("since"),
    )
    out.family(
        "redeemd_box_last_seen_seconds",
        "gauge",
        "When the box itself last sent a status (Unix time).",
        per_box("last_seen"),
    )
    out.family(
        "redeemd_box_batches_behind",
        "gauge",
        "Batches issued for the merchant that the box's cache has not applied.",
        per_box("behind"),
    )
    out.family(
        "redeemd_box_outbox_depth",
        "gauge",
        "Records the box holds not yet acked.",
        per_box("outbox_depth"),
    )
    out.family(
        "redeemd_box_outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest unacked record when the box last said.",
        per_box("outbox_oldest_age_s"),
    )
    out.family(
        "redeemd_gaps_open",
        "gauge",
        "Missing ranges of box sequences not filled yet.",
        [(_labels(merchant=m), gaps.get(m, 0)) for m in every],
    )
    out.family(
        "redeemd_conflicts_total",
        "counter",
        "Double redemptions found (one code accepted on two boxes).",
        [(_labels(merchant=m), conflicts.get(m, 0)) for m in every],
    )
    out.family(
        "redeemd_events_stored_total",
        "counter",
        "Box records stored, counted to each box's contiguous high-water mark.",
        [(_labels(merchant=m), int(stored.get(m) or 0)) for m in every],
    )
    out.family(
        "redeemd_console_scrape_timestamp_seconds",
        "gauge",
        "When this text was made.",
        [("", now)],
    )
    return "\n".join(out.lines) + "\n"
