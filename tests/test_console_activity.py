"""The console's activity page and its batches and codes page (issue 15, pages 3 and 5)
in a real browser against the real `redeemd-backend console` process, on each store:
a redemption stored as the collector stores it shows in the chart, its table and the
CSV export; a typed code's history shows its digest prefix only, never the code; a
viewer cannot revoke it (refused and audited), an operator can, and the revoke batch
stored for `publish` is signed and lists the code's digest."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from backend_helpers import record, roots
from browser import artifacts, chromium, shot, unlabelled
from test_console import (  # noqa: F401 (console: a fixture)
    VIEWER_PASSWORD,
    Console,
    console,
    sign_in,
)

from backend.console import activity, audit, codes
from backend.events import parse_message
from backend.keystore import Keystore
from backend.store import Store
from cards import batch
from cards.batch import Kind
from cards.digest import code_digest

CODE = "DEMO-7731"


def code_digest_of(directory: Path, text: str = CODE) -> bytes:
    return code_digest(Keystore(directory).code_key(), text)


def store_records(directory: Path, box: str, records: list[dict]) -> None:
    """What the collector does with one events message (backend/collect.py)."""
    store = Store.open(directory)
    try:
        body = json.dumps({"v": 1, "box": box, "records": records}).encode()
        store.store_messages([("demo", box, parse_message(body, merchant="demo", box=box))])
    finally:
        store.close()


def refused(seq: int, box: str, digest: bytes, reason: str) -> dict:
    made = record(seq, box, action="redeem", digest=digest, uses=1)
    made.update(verdict="refused", reason=reason, id=str(uuid.uuid4()))
    return made


def dispense(seq: int, box: str) -> dict:
    """A claim code the box printed (its grant and counter, docs/protocol.md 16.5)."""
    made = record(seq, box, action="dispense", digest=os.urandom(16))
    made.update(grant_id="ab" * 8, counter=1, card_id=1)
    return made


def chart_svg(page, alt: str) -> str:
    """The SVG of the chart image whose alt text starts with `alt`."""
    src = page.locator(f'img[alt^="{alt}"]').get_attribute("src")
    assert src and src.startswith("data:image/svg+xml;base64,"), src
    return base64.b64decode(src.split(",", 1)[1]).decode()


def test_a_stored_redemption_shows_in_the_activity_chart_and_csv(
    console: Console,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    shots = artifacts(tmp_path, f"console-activity-{console.store}")
    digest = code_digest_of(console.dir)
    store_records(
        console.dir,
        "box-0001",
        [
            record(1, "box-0001", action="redeem", digest=digest, uses=1, uses_left=0),
            refused(2, "box-0001", digest, "used_up"),
            refused(3, "box-0001", digest, "used_up"),
            dispense(4, "box-0001"),
        ],
    )
    today = datetime.now(UTC).date().isoformat()
    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, console)
        page.get_by_role("link", name="Activity").click()
        expect(page.get_by_role("heading", name="Activity")).to_be_visible()
        expect(page.locator("#activity-summary")).to_contain_text("1 redeemed, 2 refused")
        day = page.locator("tr", has=page.locator(f'th:text-is("{today}")'))
        expect(day).to_contain_text("1")
        assert day.locator("td").all_inner_texts() == ["1", "2", "1"]
        svg = chart_svg(page, "Bar chart: redemptions and refusals")
        assert "<svg" in svg and "redeemed" in svg and "<script" not in svg
        values = svg.split('class="value"')
        assert len(values) > 2, "the chart draws the counts"
        reasons = chart_svg(page, "Bar chart: refusals by reason")
        assert "used_up" in reasons
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)"), (
            "a chart image does not render in Chromium"
        )
        assert unlabelled(page) == []
        # The funnel per day: each step on its day (one dispense today, nothing claimed).
        per_day = page.locator("table", has=page.locator("caption", has_text="Dispensed"))
        assert per_day.locator("tbody td").all_inner_texts() == ["demo", today, "1", "0", "0"]
        shot(page, shots, "activity")

        # The CSV export, with the same filters as the page, by box.
        page.get_by_label("Per").select_option("box")
        page.get_by_role("button", name="Show").click()
        expect(page.locator("#activity-summary")).to_contain_text("1 redeemed")
        funnel = page.locator("table", has=page.locator("caption", has_text="Dispensed"))
        assert funnel.locator("tbody td").all_inner_texts() == ["demo", "box-0001", "1", "0", "0"]
        assert "dispensed" in chart_svg(page, "Bar chart: dispensed, claimed, redeemed")
        shot(page, shots, "activity-by-box")
        href = page.get_by_role("link", name="Download as CSV").get_attribute("href")
        assert href and href.startswith("/activity.csv?") and "by=box" in href
        answer = page.request.get(console.url + href)
        assert answer.status == 200 and answer.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(answer.text())))
        assert rows[0] == ["box", "redeemed", "refused", "dispensed", "refused:used_up"]
        assert ["box-0001", "1", "2", "1", "2"] in rows
        assert digest.hex() not in answer.text()
        # Signed out: no export.
        fresh = browser.new_context().request.get(console.url + href)
        assert fresh.status == 401


def test_code_lookup_viewer_refused_operator_revokes(
    console: Console,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    shots = artifacts(tmp_path, f"console-codes-{console.store}")
    digest = code_digest_of(console.dir)
    store_records(
        console.dir,
        "box-0002",
        [record(1, "box-0002", action="redeem", digest=digest, uses=1, uses_left=2)],
    )
    with chromium() as browser:
        viewer = browser.new_context().new_page()
        sign_in(viewer, console, "vic", VIEWER_PASSWORD)
        viewer.get_by_role("link", name="Batches and codes").click()
        viewer.get_by_label("Code").fill(f" {CODE} ")  # spaces around a pasted code
        viewer.get_by_role("button", name="Look up").click()
        history = viewer.locator("section table")
        expect(history).to_contain_text("box-0002")
        expect(history).to_contain_text("accepted")
        html = viewer.content()
        assert digest.hex()[:12] in html, "the digest prefix is shown"
        assert digest.hex() not in html, "only a prefix of the digest is on the page"
        assert CODE not in html.upper(), "the typed code is not on the page"
        assert viewer.get_by_role("button", name="Revoke this code").count() == 0
        shot(viewer, shots, "lookup-viewer")
        # A viewer forging the operator's form is refused, and that is audited.
        csrf = viewer.locator('input[name="csrf"]').first.get_attribute("value")
        forged = viewer.request.post(
            f"{console.url}/codes/act",
            form={"csrf": csrf or "", "action": "revoke", "ref": "guess"},
        )
        assert forged.status == 403 and "may look but not act" in forged.text()

        operator = browser.new_context().new_page()
        sign_in(operator, console)
        operator.goto(f"{console.url}/codes")
        assert unlabelled(operator) == []
        operator.get_by_label("Code").fill(CODE)
        operator.get_by_role("button", name="Look up").click()
        expect(operator.locator("section table")).to_contain_text("box-0002")
        operator.get_by_role("button", name="Revoke this code").click()
        expect(operator.get_by_role("status")).to_contain_text("revoke batch demo/1 issued")
        assert CODE not in operator.content().upper()
        expect(operator.locator("table").last).to_contain_text("revoke")
        shot(operator, shots, "revoked")

    store = Store.open(console.dir)
    try:
        (issued,) = store.batches("demo", 1, 1)
        entries = audit.recent(store)
    finally:
        store.close()
    assert issued.kind is Kind.REVOKE
    opened = batch.open_file(issued.data, roots(Keystore(console.dir)))
    assert opened.header.merchant == "demo" and opened.header.seq == 1
    assert [d for (d,) in opened.digest_entries()] == [digest]
    said = [(e.actor, e.action, e.target, e.outcome) for e in entries]
    target = f"demo/{digest.hex()[:12]}…"
    assert ("ana", "code revoke", target, "ok: batch 1") in said
    assert ("vic", "code revoke/block", None, "refused: viewer") in said
    assert ("vic", "code look-up", target, "ok") in said
    assert all(CODE not in str(e).upper() and digest.hex() not in str(e) for e in entries)


def test_filters_refuse_what_they_cannot_use_and_csv_cells_are_not_formulas() -> None:
    now = datetime(2026, 12, 3, 12, tzinfo=UTC).timestamp()
    default = activity.Filters.parse({}, now)
    assert (default.by, default.since.isoformat(), default.until.isoformat()) == (
        "day", "2026-11-04", "2026-12-03",
    )  # fmt: skip
    for params, said in (
        ({"by": "week"}, "not one of day, store, box, card"),
        ({"since": "2026-13-01"}, "not a day"),
        ({"since": "2026-12-04"}, "is after until"),
        ({"since": "2024-01-01"}, "over 366 days"),
        ({"card": "1; DROP"}, "not a card number"),
    ):
        with pytest.raises(activity.FilterError, match=said):
            activity.Filters.parse(params, now)
    found = activity.Activity(default, [activity.Line("=HYPERLINK(1)", redeemed=1)], {}, [])
    assert "'=HYPERLINK(1),1,0,0" in activity.csv_text(found)


def test_a_lookup_reference_is_the_users_own_and_ends() -> None:
    lookups = codes.Lookups(ttl=60)
    ref = lookups.keep(codes.Found("demo", b"\x01" * 16, "ana", at=1000.0))
    assert lookups.get(ref, "ana", 1010.0) is not None
    assert lookups.get(ref, "vic", 1010.0) is None, "another user's look-up"
    assert lookups.get("guess", "ana", 1010.0) is None
    assert lookups.get(ref, "ana", 1061.0) is None, "older than its time to live"
