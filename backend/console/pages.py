"""The console's HTML, rendered on the server: every value goes through `esc` here and
nowhere else builds markup. No template engine: a few pages of plain HTML read well as
f-strings, and the live fleet table re-uses `fleet_rows` for its updates, so the page
and its refresh cannot drift apart.

Accessibility: a skip link first, every input with a <label>, sortable headers as links
with aria-sort, the live update's time in a polite status region, tables with captions.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from backend import boxes_view
from backend.accounts import Overspend, TransferConflict
from backend.console.activity import BY as ACTIVITY_BY
from backend.console.activity import Activity
from backend.console.audit import Entry
from backend.console.auth import Session
from backend.console.codes import BatchLine, Found, Seen
from backend.console.fleet import Counts, Page, Query
from backend.console.records import ConflictRow, GapRow, GrantLine, Record

CURRENT = ' aria-current="page"'


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def utc(ts: int | float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def when(ts: int | float | None, now: int) -> str:
    """A time as "12m ago", with the exact UTC time on hover and for screen readers."""
    if ts is None:
        return "-"
    iso = datetime.fromtimestamp(ts, UTC).isoformat()
    return (
        f'<time datetime="{esc(iso)}" title="{esc(utc(ts))}">{boxes_view.ago(now - ts)} ago</time>'
    )


def layout(title: str, body: str, session: Session | None, *, current: str = "") -> str:
    nav = ""
    if session is not None:
        links = "".join(
            f'<li><a href="{href}"{CURRENT if href == current else ""}>{label}</a></li>'
            for href, label in (
                ("/", "Fleet"),
                ("/activity", "Activity"),
                ("/conflicts", "Conflicts"),
                ("/codes", "Batches and codes"),
                ("/audit", "Audit log"),
            )
        )
        nav = (
            f'<nav aria-label="Main"><ul>{links}</ul>'
            f'<form method="post" action="/logout" class="signout">'
            f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
            f"<span>{esc(session.user.name)} ({esc(session.user.role)})</span> "
            f'<button type="submit">Sign out</button></form></nav>'
        )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · redeemd console</title>"
        '<link rel="stylesheet" href="/static/console.css">'
        '<script src="/static/console.js" defer></script></head><body>'
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><p class="brand">redeemd console</p>{nav}</header>'
        f'<main id="main" tabindex="-1"><h1>{esc(title)}</h1>{body}</main></body></html>'
    )


def message_page(title: str, text: str, session: Session | None) -> str:
    return layout(
        title, f'<p role="alert">{esc(text)}</p><p><a href="/">Back to the fleet</a></p>', session
    )


def login_page(csrf: str, error: str = "", name: str = "") -> str:
    alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = (
        f"{alert}"
        '<form method="post" action="/login" class="login">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<p><label for="name">User name</label>'
        f'<input id="name" name="name" autocomplete="username" required autofocus value="{esc(name)}"></p>'
        '<p><label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required></p>'
        '<p><button type="submit">Sign in</button></p></form>'
    )
    return layout("Sign in", body, None)


# ------------------------------------------------------------------ fleet


def _state_cell(e: dict[str, Any], now: int) -> str:
    state = "never seen" if e["state"] == boxes_view.NEVER_SEEN else e["state"]
    since = f'<time datetime="{esc(datetime.fromtimestamp(e["since"], UTC).isoformat())}" title="since {esc(utc(e["since"]))}">{boxes_view.ago(e["for_s"])}</time>'
    return f'<span class="state {esc(e["state"])}">{esc(state)}</span> for {since}'


def _cache_cell(e: dict[str, Any]) -> str:
    if e["cache_seq"] is None:
        return f"-/{esc(e['latest_seq'])}"
    text = f"{esc(e['cache_seq'])}/{esc(e['latest_seq'])}"
    if e["behind"]:
        text += f' <strong class="behind">{esc(e["behind"])} behind</strong>'
    return text


def _outbox_cell(e: dict[str, Any], now: int) -> str:
    if e["outbox_depth"] is None:
        return "-"
    if e["outbox_depth"] and e["outbox_oldest_at"] is not None:
        return (
            f'<strong class="holding">{esc(e["outbox_depth"])}</strong>'
            f" (oldest {boxes_view.ago(now - e['outbox_oldest_at'])})"
        )
    return esc(e["outbox_depth"])


def _scanners_cell(e: dict[str, Any]) -> str:
    if not e["drivers"]:
        return "-"
    return "<br>".join(
        f'{esc(d["name"])}: <span class="driver {esc(d["state"])}">{esc(d["state"])}</span>'
        for d in e["drivers"]
    )


def _problems_cell(e: dict[str, Any]) -> str:
    return "<br>".join(
        f"<strong>{label}</strong>: {esc(e[key])}"
        for label, key in (("Alarm", "alarm"), ("Stuck", "stuck"), ("Publish", "publish_error"))
        if e[key]
    )


def fleet_rows(page: Page, now: int) -> str:
    """The table body: also what the live update sends, rendered by the same code."""
    if not page.rows:
        return '<tr><td colspan="9">No box matches.</td></tr>'
    rows = []
    for e in page.rows:
        rows.append(
            f'<tr data-box="{esc(e["box"])}">'
            f'<th scope="row"><a href="/box/{esc(e["box"])}">{esc(e["box"])}</a></th>'
            f"<td>{esc(e['merchant'])}</td>"
            f"<td>{_state_cell(e, now)}</td>"
            f"<td>{when(e['last_seen'], now)}</td>"
            f"<td>{_cache_cell(e)}</td>"
            f"<td>{_outbox_cell(e, now)}</td>"
            f"<td>{_scanners_cell(e)}</td>"
            f"<td>{esc(e['version'] or '-')}</td>"
            f"<td>{_problems_cell(e)}</td></tr>"
        )
    return "".join(rows)


def fleet_summary(c: Counts) -> str:
    return (
        f"{c.total} {'box' if c.total == 1 else 'boxes'}: <strong>{c.online}</strong> online, "
        f"<strong>{c.offline}</strong> offline, {c.never_seen} never seen; "
        f"{c.behind} behind on batches, {c.holding} holding records. "
        f"{c.matching} match the filters."
    )


def _href(params: dict[str, str], path: str = "/") -> str:
    return esc(f"{path}?{urlencode(params)}" if params else path)


def _header(query: Query, sort: str, label: str) -> str:
    if query.sort == sort:
        aria = "descending" if query.desc else "ascending"
        params = query.params(desc=not query.desc, after=None)
        arrow = " ▼" if query.desc else " ▲"
        return (
            f'<th scope="col" aria-sort="{aria}"><a href="{_href(params)}">{esc(label)}'
            f'<span aria-hidden="true">{arrow}</span></a></th>'
        )
    params = query.params(sort=sort, desc=False, after=None)
    return f'<th scope="col"><a href="{_href(params)}">{esc(label)}</a></th>'


def fleet_page(
    page: Page, query: Query, now: int, session: Session, *, notice: str = "", error: str = ""
) -> str:
    checks = "".join(
        f'<input type="checkbox" id="f-{name}" name="{name}" value="1"'
        f'{" checked" if getattr(query, name) else ""}><label for="f-{name}">{label}</label> '
        for name, label in (
            ("offline", "Offline over 1 h"),
            ("behind", "Behind on batches"),
            ("holding", "Holding records"),
        )
    )
    keep = "".join(
        f'<input type="hidden" name="{k}" value="{esc(v)}">'
        for k, v in query.params(
            after=None, offline=False, behind=False, holding=False, q=""
        ).items()
    )
    filters = (
        '<form method="get" action="/" role="search" class="filters">'
        f'<label for="q">Search boxes</label> <input id="q" name="q" type="search" value="{esc(query.q)}" '
        'placeholder="box, merchant or version"> '
        f'{checks}{keep}<button type="submit">Apply</button> '
        '<a href="/">Clear</a></form>'
    )
    headers = (
        "".join(
            _header(query, sort, label)
            for sort, label in (
                ("box", "Box"),
                ("merchant", "Merchant"),
                ("state", "State"),
                ("last_seen", "Last seen"),
                ("behind", "Cache / latest"),
                ("outbox", "Outbox"),
            )
        )
        + '<th scope="col">Scanners</th>'
        + _header(query, "version", "Version")
        + '<th scope="col">Problems</th>'
    )
    live = _href(query.params(), "/fleet/rows")
    more = ""
    if page.next_after is not None:
        more = f'<p><a href="{_href(query.params(after=page.next_after))}" rel="next">Next {query.limit} boxes</a></p>'
    if query.after is not None:
        more += f'<p><a href="{_href(query.params(after=None))}">Back to the first page</a></p>'
    register = ""
    if session.user.may_act:
        register = (
            "<details><summary>Register a box</summary>"
            '<form method="post" action="/boxes" class="register">'
            f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
            '<p><label for="r-merchant">Merchant</label> <input id="r-merchant" name="merchant" required> '
            '<label for="r-box">Box id</label> <input id="r-box" name="box" required> '
            '<button type="submit">Register</button></p>'
            "<p>The collector stores events only from registered boxes (as "
            "<code>redeemd-backend box add</code>).</p></form></details>"
        )
    flash = f'<p class="notice" role="status">{esc(notice)}</p>' if notice else ""
    flash += f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = (
        f'{flash}<p id="summary">{fleet_summary(page.counts)}</p>{filters}'
        f'<p class="live" role="status" aria-live="polite" id="live-status">'
        f"Updated {esc(utc(now))}</p>"
        f'<table id="fleet" data-live="{live}"><caption>Boxes'
        f"{' matching the filters' if query.offline or query.behind or query.holding or query.q else ''}"
        f"</caption><thead><tr>{headers}</tr></thead>"
        f'<tbody id="fleet-rows">{fleet_rows(page, now)}</tbody></table>{more}{register}'
    )
    return layout("Fleet", body, session, current="/")


# ------------------------------------------------------------------ audit, conflicts


def audit_page(entries: list[Entry], session: Session, next_before: int | None) -> str:
    rows = (
        "".join(
            f"<tr><td>{esc(utc(e.at_ms / 1000))}</td><td>{esc(e.actor or '-')}</td>"
            f"<td>{esc(e.action)}</td><td>{esc(e.target or '')}</td><td>{esc(e.client or '')}</td>"
            f"<td>{esc(e.outcome)}</td></tr>"
            for e in entries
        )
        or '<tr><td colspan="6">Nothing yet.</td></tr>'
    )
    more = ""
    if next_before is not None:
        more = f'<p><a href="/audit?before={next_before}" rel="next">Older entries</a></p>'
    body = (
        "<table><caption>Newest first</caption><thead><tr>"
        + "".join(
            f'<th scope="col">{h}</th>'
            for h in ("When", "Who", "Action", "Target", "From", "Outcome")
        )
        + f"</tr></thead><tbody>{rows}</tbody></table>{more}"
    )
    return layout("Audit log", body, session, current="/audit")


def _table(caption: str, headers: tuple[str, ...], rows: list[str], empty: str) -> str:
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join(rows) or f'<tr><td colspan="{len(headers)}">{esc(empty)}</td></tr>'
    return f"<table><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _conflict_rows(found: list[ConflictRow]) -> list[str]:
    return [
        f"<tr><td>{esc(utc(c.detected_at))}</td><td>{esc(c.merchant)}</td>"
        f"<td><code>{esc(c.digest)}</code></td>"
        f'<td><a href="/box/{esc(c.first_box)}">{esc(c.first_box)}</a><br><code>{esc(c.first_id)}</code></td>'
        f'<td><a href="/box/{esc(c.second_box)}">{esc(c.second_box)}</a><br><code>{esc(c.second_id)}</code></td>'
        f"<td>{esc('batch ' + str(c.consumed_seq) + ' (consumed elsewhere)' if c.consumed_seq is not None else 'none signed yet')}</td></tr>"
        for c in found
    ]


_CONFLICT_HEADERS = (
    "Found",
    "Merchant",
    "Code digest",
    "First (box, record)",
    "Second (box, record)",
    "Done",
)


def _shown(ids: tuple[str, ...], most: int = 4) -> str:
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return "<br>".join(f"<code>{esc(i)}</code>" for i in ids[:most]) + esc(more)


def _box_links(boxes: tuple[str, ...]) -> str:
    return ", ".join(f'<a href="/box/{esc(b)}">{esc(b)}</a>' for b in boxes)


def _overspend_rows(found: list[Overspend]) -> list[str]:
    return [
        f"<tr><td>{esc(utc(o.detected_at))}</td><td>{esc(o.merchant)}</td>"
        f"<td><code>{esc(o.account)}</code></td>"
        f"<td>{o.amount_over} {esc(o.unit)} over ({o.spent} spent of {o.value})</td>"
        f"<td>{_box_links(o.boxes)}</td>"
        f"<td>{_shown(o.records)}</td>"
        f"<td>{esc(f'blocked by batch {o.blocked_seq}' if o.blocked_seq is not None else 'reported, not blocked (merchant policy)')}</td></tr>"
        for o in found
    ]


def _transfer_rows(found: list[TransferConflict]) -> list[str]:
    return [
        f"<tr><td>{esc(utc(t.detected_at))}</td><td>{esc(t.merchant)}</td>"
        f"<td><code>{esc(t.digest[:12])}</code></td>"
        f'<td><a href="/box/{esc(t.box)}">{esc(t.box)}</a><br><code>{esc(t.record_id)}</code></td>'
        f"<td>{esc(str(t.cache_seq) if t.cache_seq is not None else 'unknown')} &lt; "
        f"{t.transfer_seq}</td></tr>"
        for t in found
    ]


def conflicts_page(
    found: list[ConflictRow],
    overspent: list[Overspend],
    raced: list[TransferConflict],
    session: Session,
) -> str:
    body = (
        "<p>The same single-use code accepted on two boxes (found by the collector). "
        "The consumed-elsewhere batch tells every box of the merchant that the code is used.</p>"
        + _table(
            "Double redemptions, newest first",
            _CONFLICT_HEADERS,
            _conflict_rows(found),
            "None found.",
        )
        + "<p>Accounts spent past their value by boxes offline at the same time, and what "
        "the merchant's policy did (redeemd-backend account policy).</p>"
        + _table(
            "Offline overspends",
            ("Found", "Merchant", "Account", "Over", "Boxes", "Records", "Done"),
            _overspend_rows(overspent),
            "None found.",
        )
        + "<p>A gifted code's old code redeemed by a box that had not applied the "
        "transfer yet (its cache sequence below the transfer's batch).</p>"
        + _table(
            "Transfers raced by a redemption",
            ("Found", "Merchant", "Old code digest", "Box, record", "Box cache < transfer batch"),
            _transfer_rows(raced),
            "None found.",
        )
    )
    return layout("Conflicts", body, session, current="/conflicts")


def _grant_row(g: GrantLine, now: int) -> str:
    if g.revoked:
        state = "revoked"
    elif now > g.not_after:
        state = "ended"
    elif now < g.not_before:
        state = "not started"
    else:
        state = "active"
    unknown = "not reported"
    return (
        f"<tr><td><code>{esc(g.id)}</code></td><td>{esc(', '.join(map(str, g.cards)))}</td>"
        f"<td>{g.quota}</td><td>{esc(unknown if g.used is None else g.used)}</td>"
        f"<td>{esc('-' if g.left is None else g.left)}</td><td>{esc(utc(g.not_before))}</td>"
        f"<td>{esc(utc(g.not_after))}</td><td>{state}</td></tr>"
    )


def box_page(
    entry: dict[str, Any],
    records: list[Record],
    reasons: list[tuple[str, str, int]],
    gaps: list[GapRow],
    found: list[ConflictRow],
    granted: list[GrantLine],
    history: list[tuple],
    now: int,
    session: Session,
) -> str:
    e = entry
    facts = (
        ("Merchant", esc(e["merchant"])),
        ("State", _state_cell(e, now)),
        ("Last seen", when(e["last_seen"], now)),
        ("Cache / latest batch", _cache_cell(e)),
        ("Outbox", _outbox_cell(e, now)),
        ("Scanners", _scanners_cell(e)),
        ("Version", esc(e["version"] or "-")),
        ("Problems", _problems_cell(e) or "none"),
    )
    summary = (
        '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    )
    record_rows = [
        f"<tr><td>{esc(r.seq)}</td><td>{esc(utc(r.at_ms / 1000))}</td><td>{esc(r.action)}</td>"
        f"<td>{esc(r.verdict)}</td><td>{esc(r.reason or '-')}</td><td><code>{esc(r.digest)}</code></td>"
        f"<td>{esc(r.card_id if r.card_id is not None else '-')}</td></tr>"
        for r in records
    ]
    reason_rows = [
        f"<tr><td>{esc(v)}</td><td>{esc(reason)}</td><td>{n}</td></tr>" for v, reason, n in reasons
    ]
    gap_rows = [
        f"<tr><td>{g.first}–{g.last}</td><td>{esc(utc(g.detected_at))}</td>"
        f"<td>{esc(utc(g.filled_at)) if g.filled_at is not None else '<strong>open</strong>'}</td></tr>"
        for g in gaps
    ]
    body = (
        summary
        + _table(
            "Status history, newest first (changes of state, cache or problems)",
            ("When", "State", "Cache seq", "Outbox", "Problem"),
            [
                f"<tr><td>{esc(utc(at))}</td><td>{esc(state)}</td>"
                f"<td>{esc(seq if seq is not None else '-')}</td>"
                f"<td>{esc(depth if depth is not None else '-')}</td>"
                f"<td>{esc(problem or '-')}</td></tr>"
                for at, state, seq, depth, problem in history
            ],
            "No status received yet.",
        )
        + _table(
            f"Verdicts of its last {len(records)} records, by reason",
            ("Verdict", "Reason", "Records"),
            reason_rows,
            "No records stored.",
        )
        + _table(
            "Recent records, newest first (code digests shortened)",
            ("Seq", "At", "Action", "Verdict", "Reason", "Code digest", "Card"),
            record_rows,
            "No records stored.",
        )
        + _table(
            "Dispensing: its grants, newest first (used: as the box last said)",
            ("Grant", "Cards", "Quota", "Used", "Left", "From", "Until", "State"),
            [_grant_row(g, now) for g in granted],
            "No grants (redeemd-backend grant add).",
        )
        + _table("Gaps in its sequence", ("Seqs", "Found", "Filled"), gap_rows, "No gaps.")
        + _table(
            "Double redemptions it took part in", _CONFLICT_HEADERS, _conflict_rows(found), "None."
        )
    )
    return layout(f"Box {e['box']}", body, session)


# ------------------------------------------------------------------ activity


def _chart(url: str, alt: str) -> str:
    return f'<figure><img class="chart" src="{esc(url)}" alt="{esc(alt)}"></figure>'


def activity_page(
    found: Activity, charts: dict[str, str], session: Session, *, error: str = ""
) -> str:
    f = found.filters
    by_options = "".join(
        f'<option value="{b}"{" selected" if b == f.by else ""}>{b}</option>' for b in ACTIVITY_BY
    )
    fields = "".join(
        f'<label for="a-{name}">{label}</label> <input id="a-{name}" name="{name}"'
        f'{extra} value="{esc(value)}"> '
        for name, label, extra, value in (
            ("since", "From day", ' type="date"', f.since.isoformat()),
            ("until", "To day", ' type="date"', f.until.isoformat()),
            ("merchant", "Merchant", "", f.merchant),
            ("store", "Store", "", f.store),
            ("box", "Box", "", f.box),
            ("card", "Card", ' inputmode="numeric"', "" if f.card is None else f.card),
        )
    )
    form = (
        '<form method="get" action="/activity" class="filters" aria-label="Activity filters">'
        f'<label for="a-by">Per</label> <select id="a-by" name="by">{by_options}</select> '
        f'{fields}<button type="submit">Show</button> <a href="/activity">Clear</a></form>'
    )
    alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    csv_href = _href(f.params(), "/activity.csv")
    lines = [
        f'<tr><th scope="row">{esc(x.key)}</th><td>{x.redeemed}</td><td>{x.refused}</td>'
        f"<td>{x.dispensed}</td></tr>"
        for x in found.lines
        if x.redeemed or x.refused or x.dispensed or f.by != "day"
    ]
    reasons = [f"<tr><td>{esc(r)}</td><td>{n}</td></tr>" for r, n in found.reasons.items()]
    funnel = [
        f"<tr><td>{esc(x.merchant)}</td><td>{esc(x.key)}</td><td>{x.dispensed}</td>"
        f"<td>{x.claimed}</td><td>{x.redeemed}</td></tr>"
        for x in found.funnel
    ]
    total = sum(x.redeemed for x in found.lines)
    refused = sum(x.refused for x in found.lines)
    body = (
        f"{alert}{form}"
        f'<p id="activity-summary">{f.since} to {f.until} (UTC): <strong>{total}</strong> '
        f"redeemed, <strong>{refused}</strong> refused. "
        f'<a href="{csv_href}" download>Download as CSV</a> (the same filters).</p>'
        + _chart(charts["redemptions"], f"Bar chart: redemptions and refusals per {f.by}")
        + _table(
            f"Redemptions, refusals and dispensing per {f.by}"
            + (" (days without any left out)" if f.by == "day" else ""),
            (f.by.capitalize(), "Redeemed", "Refused", "Dispensed"),
            lines,
            "No records in this range.",
        )
        + _chart(charts["reasons"], "Bar chart: refusals by reason")
        + _table("Refusals by reason", ("Reason", "Refused"), reasons, "No refusals.")
    )
    if "funnel" in charts:
        body += _chart(charts["funnel"], f"Bar chart: dispensed, claimed, redeemed per {f.by}")
    span = "each step on its day" if f.by == "day" else "all time"
    body += _table(
        f"Dispensed → claimed → redeemed per {f.by} ({span})",
        ("Merchant", f.by.capitalize(), "Dispensed", "Claimed", "Redeemed"),
        funnel,
        "No claim codes dispensed.",
    )
    return layout("Activity", body, session, current="/activity")


# ------------------------------------------------------------------ batches and codes


def _lookup_form(session: Session, merchants: list[str]) -> str:
    choose = ""
    if len(merchants) > 1:
        options = "".join(f'<option value="{esc(m)}">{esc(m)}</option>' for m in merchants)
        choose = (
            f'<label for="c-merchant">Merchant</label> '
            f'<select id="c-merchant" name="merchant">{options}</select> '
        )
    elif merchants:
        choose = f'<input type="hidden" name="merchant" value="{esc(merchants[0])}">'
    return (
        '<form method="post" action="/codes/lookup" class="filters" autocomplete="off">'
        f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">{choose}'
        '<label for="c-code">Code</label> <input id="c-code" name="code" required '
        'autocomplete="off" spellcheck="false"> '
        '<button type="submit">Look up</button></form>'
        "<p>The code is digested on the server with the merchant's code key and not kept; "
        "only a prefix of its digest is shown.</p>"
    )


def codes_page(
    lines: list[BatchLine],
    merchants: list[str],
    session: Session,
    *,
    found: Found | None = None,
    seen: list[Seen] | None = None,
    ref: str = "",
    notice: str = "",
    error: str = "",
) -> str:
    flash = f'<p class="notice" role="status">{esc(notice)}</p>' if notice else ""
    flash += f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    result = ""
    if found is not None and seen is not None:
        rows = [
            f"<tr><td>{esc(utc(s.at_ms / 1000))}</td>"
            f'<td><a href="/box/{esc(s.box)}">{esc(s.box)}</a></td><td>{esc(s.action)}</td>'
            f"<td>{esc(s.verdict)}</td><td>{esc(s.reason or '-')}</td>"
            f"<td>{esc('-' if s.card_id is None else s.card_id)}</td></tr>"
            for s in seen
        ]
        act = ""
        if session.user.may_act:
            act = (
                '<form method="post" action="/codes/act" class="filters">'
                f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
                f'<input type="hidden" name="ref" value="{esc(ref)}">'
                '<button type="submit" name="action" value="revoke">Revoke this code</button> '
                '<button type="submit" name="action" value="block">Block this code</button>'
                "</form><p>Revoke ends the code for good; block stops it until an unblock "
                "batch. Either is a signed batch the running <code>publish</code> sends to "
                "every box of the merchant.</p>"
            )
        result = (
            f'<section aria-labelledby="code-h"><h2 id="code-h">Code <code>{esc(found.shown)}</code>'
            f" of {esc(found.merchant)}</h2>"
            + _table(
                "Its stored records, newest first",
                ("At", "Box", "Action", "Verdict", "Reason", "Card"),
                rows,
                "No box has sent a record of this code.",
            )
            + act
            + "</section>"
        )
    batch_rows = [
        f"<tr><td>{esc(b.merchant)}</td><td>{b.seq}</td><td>{esc(b.kind)}</td><td>{b.count}</td>"
        f"<td>{esc(utc(b.created_at))}</td><td>{esc(utc(b.expires_at))}</td>"
        f"<td>{esc(utc(b.published_at)) if b.published_at is not None else '<strong>not yet</strong>'}</td>"
        f"<td>{b.applied} of {b.boxes}</td></tr>"
        for b in lines
    ]
    body = (
        flash
        + '<h2 id="lookup-h">Look up a code</h2>'
        + _lookup_form(session, merchants)
        + result
        + '<h2 id="batches-h">Batches</h2>'
        + _table(
            "Batches issued, newest first (applied: boxes whose last status reports this "
            "sequence or later, of those reporting one)",
            ("Merchant", "Seq", "Kind", "Entries", "Created", "Expires", "Published", "Applied"),
            batch_rows,
            "No batches issued.",
        )
    )
    return layout("Batches and codes", body, session, current="/codes")
