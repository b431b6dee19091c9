"""The activity page's numbers: redemptions, refusals by reason and dispensing per day,
store, box or card over a time range, from the stored events; the dispensed -> claimed
-> redeemed funnel (backend/claims.py); and the charts and CSV made of them.

The events table has no store or reason column: both are in each record's raw JSON
(docs/protocol.md 16.3), so they are read from it here, on either engine, with plain
SQL that both accept. Charts are SVG drawn on the server by pygal and shown as <img>
data: URLs: an image runs no script, so the page keeps its strict CSP, and the numbers
are also in a table beside each chart (for screen readers and for checking).

    >>> found = select(store, Filters.parse({"by": "day"}, now=time.time()))
    >>> csv_text(found)
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from backend import claims
from backend.store import Store

BY = ("day", "store", "box", "card")
MAX_DAYS = 366
DEFAULT_DAYS = 30
MAX_ROWS = 200_000
"""Events read for one page at most: a wider range is refused with what to narrow."""


class FilterError(ValueError):
    """A filter in the address cannot be used; the message says which and what is allowed."""


class ChartsMissing(RuntimeError):
    """pygal is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Filters:
    by: str = "day"
    since: date = date(1970, 1, 1)
    until: date = date(1970, 1, 1)
    """Inclusive, UTC days."""
    merchant: str = ""
    store: str = ""
    box: str = ""
    card: int | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str], now: float) -> Filters:
        by = params.get("by") or "day"
        if by not in BY:
            raise FilterError(f"by={by!r} is not one of {', '.join(BY)}")
        today = datetime.fromtimestamp(now, UTC).date()
        until = _day(params.get("until"), "until") or today
        since = _day(params.get("since"), "since") or until - timedelta(days=DEFAULT_DAYS - 1)
        if since > until:
            raise FilterError(f"since ({since}) is after until ({until})")
        if (until - since).days + 1 > MAX_DAYS:
            raise FilterError(f"the range is over {MAX_DAYS} days: narrow since/until")
        card_text = (params.get("card") or "").strip()
        if card_text and not card_text.isdigit():
            raise FilterError(f"card={card_text!r} is not a card number")
        return cls(
            by=by,
            since=since,
            until=until,
            merchant=(params.get("merchant") or "").strip()[:64],
            store=(params.get("store") or "").strip()[:64],
            box=(params.get("box") or "").strip()[:64],
            card=int(card_text) if card_text else None,
        )

    def params(self) -> dict[str, str]:
        """The filters as an address's query (what the CSV link and the form repeat)."""
        given = {
            "by": self.by,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "merchant": self.merchant,
            "store": self.store,
            "box": self.box,
            "card": "" if self.card is None else str(self.card),
        }
        return {k: v for k, v in given.items() if v}


def _day(text: str | None, name: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise FilterError(f"{name}={text!r} is not a day (YYYY-MM-DD)") from None


@dataclass
class Line:
    """One group (a day, store, box or card) of the selected events."""

    key: str
    redeemed: int = 0
    refused: int = 0
    dispensed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Activity:
    filters: Filters
    lines: list[Line]
    reasons: dict[str, int]
    """Refusals by reason over the whole selection, the most frequent first."""
    funnel: list[claims.FunnelRow]
    """Dispensed -> claimed -> redeemed by the page's `by`, filtered on
    merchant/box/card/store; per day within the page's days, else over all time."""


def _raw(text: str) -> dict[str, object]:
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def select(store: Store, filters: Filters) -> Activity:
    """The events of the range and filters, counted per group of `filters.by`."""
    start = int(datetime.combine(filters.since, datetime.min.time(), UTC).timestamp() * 1000)
    end = int(datetime.combine(filters.until, datetime.min.time(), UTC).timestamp() * 1000)
    end += 86_400_000
    where = ["at_ms >= ?", "at_ms < ?", "action IN ('redeem', 'dispense')"]
    args: list[object] = [start, end]
    for column, value in (("merchant", filters.merchant), ("box", filters.box)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if filters.card is not None:
        where.append("card_id = ?")
        args.append(filters.card)
    rows = store.engine.execute(
        "SELECT at_ms, box, card_id, action, verdict, raw FROM events WHERE "
        + " AND ".join(where)
        + " LIMIT ?",
        (*args, MAX_ROWS + 1),
    ).fetchall()
    if len(rows) > MAX_ROWS:
        raise FilterError(
            f"over {MAX_ROWS} records in this range: narrow the days, or filter on a box or card"
        )
    lines: dict[str, Line] = {}
    reasons: dict[str, int] = {}
    if filters.by == "day":  # every day of the range, so a quiet day shows as 0
        day = filters.since
        while day <= filters.until:
            lines[day.isoformat()] = Line(day.isoformat())
            day += timedelta(days=1)
    # The raw JSON is parsed only when the store or reason is needed: most of the time.
    by_store = bool(filters.store) or filters.by == "store"
    day_ms = 86_400_000
    for at_ms, box, card_id, action, verdict, raw in rows:
        doc = _raw(raw) if by_store or verdict != "accepted" else {}
        where_sold = doc.get("store") if isinstance(doc.get("store"), str) else "-"
        if filters.store and where_sold != filters.store:
            continue
        if filters.by == "day":
            key = (filters.since + timedelta(days=(at_ms - start) // day_ms)).isoformat()
        elif filters.by == "store":
            key = str(where_sold)
        elif filters.by == "box":
            key = box
        else:
            key = "-" if card_id is None else str(card_id)
        line = lines.setdefault(key, Line(key))
        if verdict == "accepted":
            if action == "redeem":
                line.redeemed += 1
            else:
                line.dispensed += 1
        elif action == "redeem":
            reason = doc.get("reason") if isinstance(doc.get("reason"), str) else verdict
            line.refused += 1
            line.reasons[str(reason)] = line.reasons.get(str(reason), 0) + 1
            reasons[str(reason)] = reasons.get(str(reason), 0) + 1
    ordered = list(lines.values())
    if filters.by == "card":
        ordered.sort(key=lambda x: (not x.key.isdigit(), int(x.key) if x.key.isdigit() else 0))
    elif filters.by != "day":
        ordered.sort(key=lambda x: x.key)
    funnel = [
        f
        for f in claims.funnel(
            store,
            filters.by,
            box=filters.box or None,
            card=filters.card,
            sold_at=filters.store or None,
        )
        if (not filters.merchant or f.merchant == filters.merchant)
        and (filters.by != "day" or str(f.key) in lines)
    ]
    ranked = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return Activity(filters, ordered, ranked, funnel)


# ------------------------------------------------------------------ CSV

_FORMULA = re.compile(r"^[=+\-@\t\r]")


def _cell(value: object) -> str:
    """A cell a spreadsheet will not run as a formula (a box or store name is the
    merchant's text)."""
    text = str(value)
    return "'" + text if _FORMULA.match(text) else text


def csv_text(found: Activity) -> str:
    """The table the charts show, one group a line; refusals also by reason, a column each."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    reasons = list(found.reasons)
    writer.writerow(
        [found.filters.by, "redeemed", "refused", "dispensed", *(f"refused:{r}" for r in reasons)]
    )
    for line in found.lines:
        writer.writerow(
            [
                _cell(line.key),
                line.redeemed,
                line.refused,
                line.dispensed,
                *(line.reasons.get(r, 0) for r in reasons),
            ]
        )
    return out.getvalue()


# ------------------------------------------------------------------ charts

_SCRIPT = re.compile(r"<script\b.*?</script>", re.S)


def _svg_url(chart: object) -> str:
    svg = chart.render(is_unicode=True)  # type: ignore[attr-defined]
    # pygal adds its tooltip configuration as a script: an <img> would not run it anyway.
    svg = _SCRIPT.sub("", svg)
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


GREEN, RED, BLUE, BROWN = "#1f6f3f", "#b00020", "#1f3a5f", "#8a4b00"


def _style(colors: tuple[str, ...]) -> object:
    from pygal.style import Style  # type: ignore[import-untyped]

    return Style(
        background="#ffffff",
        plot_background="#ffffff",
        foreground="#1a1a1a",
        foreground_strong="#1a1a1a",
        foreground_subtle="#555555",
        colors=colors,
        font_family="system-ui, sans-serif",
    )


def _bar(
    title: str,
    labels: list[str],
    series: list[tuple[str, list[int]]],
    colors: tuple[str, ...] = (GREEN, RED, BLUE),
) -> str:
    try:
        import pygal  # type: ignore[import-untyped]  # loaded with the first chart only
    except ImportError:
        raise ChartsMissing(
            "the activity charts need pygal: pip install 'redeemd[web]' (or pygal) where the "
            "console runs, then restart it; the CSV export works without it"
        ) from None

    chart = pygal.Bar(
        js=[],
        style=_style(colors),
        title=title,
        width=900,
        height=320,
        x_label_rotation=30 if len(labels) > 8 else 0,
        show_minor_x_labels=len(labels) <= 31,
        x_labels_major_every=max(1, len(labels) // 15),
        legend_at_bottom=True,
        print_values=len(labels) <= 12,
        no_data_text="No records",
    )
    chart.x_labels = labels
    # Whole numbers on the axis: these are counts of records.
    top = max((v for _, values in series for v in values), default=0)
    step = max(1, -(-top // 8))
    chart.y_labels = list(range(0, top + step + 1, step))
    for name, values in series:
        chart.add(name, values)
    return _svg_url(chart)


def charts(found: Activity) -> dict[str, str]:
    """{chart name: data: URL of its SVG}: redemptions and refusals per group, refusals
    by reason, and the funnel where it applies."""
    by = found.filters.by
    labels = [line.key for line in found.lines]
    made = {
        "redemptions": _bar(
            f"Redemptions and refusals per {by}",
            labels,
            [
                ("redeemed", [x.redeemed for x in found.lines]),
                ("refused", [x.refused for x in found.lines]),
                ("dispensed", [x.dispensed for x in found.lines]),
            ],
        ),
        "reasons": _bar(
            "Refusals by reason",
            list(found.reasons),
            [("refused", list(found.reasons.values()))],
            (RED,),
        ),
    }
    if found.funnel:
        made["funnel"] = _bar(
            f"Dispensed, claimed, redeemed per {by}",
            [f"{f.merchant}/{f.key}" for f in found.funnel],
            [
                ("dispensed", [f.dispensed for f in found.funnel]),
                ("claimed", [f.claimed for f in found.funnel]),
                ("redeemed", [f.redeemed for f in found.funnel]),
            ],
            (BLUE, BROWN, GREEN),
        )
    return made
