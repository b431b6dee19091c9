"""`redeemd-backend boxes`: which boxes are offline, behind on batches, holding records.

What the collector keeps of every registered box's retained status (backend/box_status.py)
is turned here into the operator's view: one entry per box, filtered, as a table or as
JSON. Times are the backend's clock: `since` is when the backend saw the state begin,
`last_seen` when the box itself last spoke. A registered box that never sent a status
is "never seen", since it was registered.

    >>> entries = select(view(store.box_rows(), now), now, offline=3600)
    >>> print(table(entries, now))
"""

from __future__ import annotations

from typing import Any

from backend.store import BoxRow, BoxStatus

NEVER_SEEN = "never_seen"

_NOTHING_SAID = BoxStatus(state=NEVER_SEEN, raw="")
"""A box that never sent a status: its state is "never seen" and nothing else is known."""


def view(rows: list[BoxRow], now: int) -> list[dict[str, Any]]:
    """One JSON-ready entry per box (docs/backend.md, "Boxes: online, behind, holding")."""
    entries = []
    for row in rows:
        said = row.status or _NOTHING_SAID
        since = row.since if row.status is not None and row.since is not None else row.added_at
        behind = None if said.cache_seq is None else max(row.latest_seq - said.cache_seq, 0)
        oldest_at = None
        if said.outbox_oldest_age_s is not None and row.last_seen is not None:
            oldest_at = row.last_seen - said.outbox_oldest_age_s
        entries.append(
            {
                "box": row.box,
                "merchant": row.merchant,
                "state": said.state,
                "since": since,
                "for_s": max(now - since, 0),
                "last_seen": row.last_seen,
                "version": said.version,
                "cache_seq": said.cache_seq,
                "latest_seq": row.latest_seq,
                "behind": behind,
                "cache_age_s": said.cache_age_s,
                "outbox_depth": said.outbox_depth,
                "outbox_oldest_age_s": said.outbox_oldest_age_s,
                "outbox_oldest_at": oldest_at,
                "drivers": [
                    {k: d.get(k) for k in ("name", "kind", "state", "message")}
                    for d in said.drivers
                ],
                "stuck": said.stuck,
                "alarm": said.alarm,
                "publish_error": said.publish_error,
            }
        )
    return entries


def select(
    entries: list[dict[str, Any]],
    *,
    offline: float | None = None,
    behind: bool = False,
    holding: bool = False,
    merchant: str | None = None,
) -> list[dict[str, Any]]:
    """The entries every given filter keeps (the filters narrow together).

    offline: not online (offline or never seen) for at least this many seconds;
    behind: cache_seq below the merchant's latest batch; holding: records not yet acked.
    A never-seen box counts as offline, never as behind or holding: nothing is known."""
    kept = []
    for e in entries:
        if merchant is not None and e["merchant"] != merchant:
            continue
        if offline is not None and (e["state"] == "online" or e["for_s"] < offline):
            continue
        if behind and not e["behind"]:
            continue
        if holding and not e["outbox_depth"]:
            continue
        kept.append(e)
    return kept


def ago(seconds: float) -> str:
    """A duration as an operator reads it: 45s, 12m, 3h05m, 2d04h.

    >>> ago(45), ago(720), ago(11100), ago(187200)
    ('45s', '12m', '3h05m', '2d04h')
    """
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


HEADER = ("BOX", "MERCHANT", "STATE", "LAST SEEN", "CACHE", "OUTBOX", "SCANNERS", "PROBLEMS")


def _cells(e: dict[str, Any], now: int) -> tuple[str, ...]:
    state = "never seen" if e["state"] == NEVER_SEEN else e["state"]
    state = f"{state} {ago(e['for_s'])}"
    seen = "-" if e["last_seen"] is None else f"{ago(now - e['last_seen'])} ago"
    if e["cache_seq"] is None:
        cache = f"-/{e['latest_seq']}"
    else:
        cache = f"{e['cache_seq']}/{e['latest_seq']}"
        if e["behind"]:
            cache += f" (-{e['behind']})"
    if e["outbox_depth"] is None:
        outbox = "-"
    elif e["outbox_oldest_at"] is not None and e["outbox_depth"]:
        outbox = f"{e['outbox_depth']} (oldest {ago(now - e['outbox_oldest_at'])})"
    else:
        outbox = str(e["outbox_depth"])
    scanners = ", ".join(f"{d['name']}:{d['state']}" for d in e["drivers"]) or "-"
    problems = [
        f"{label}: {e[key]}"
        for label, key in (("ALARM", "alarm"), ("STUCK", "stuck"), ("PUBLISH", "publish_error"))
        if e[key]
    ]
    return (e["box"], e["merchant"], state, seen, cache, outbox, scanners, "; ".join(problems))


def table(entries: list[dict[str, Any]], now: int) -> str:
    """The entries as aligned columns under a header (the last column is not padded)."""
    rows = [HEADER, *(_cells(e, now) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for r in rows:
        padded = [cell.ljust(w) for cell, w in zip(r, widths, strict=False)]
        lines.append("  ".join([*padded, r[-1]]).rstrip())
    return "\n".join(lines)
