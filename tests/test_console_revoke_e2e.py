"""The console acting on a real fleet (issue 15): a real `redeemd run` box, a real
Mosquitto, the real collector and `publish`, and the real console process in Debian's
Chromium. A code scanned on the box shows in the activity chart once collected; the
operator looks up another code, revokes it in the page, `publish` sends the signed
batch, the box applies it, and the box then refuses the code as revoked. Waits are for
what the page or the box shows, never for a time."""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import base64
from pathlib import Path

import pytest
from broker import broker  # noqa: F401  (fixture)
from browser import add_user, artifacts, chromium, serve_console, shot, sign_in
from conftest import wait_for
from fleet import Fleet

PASSWORD = "correct horse battery staple"
WAIT = 90_000  # ms: generous, reaching it means something hangs


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def test_a_code_revoked_in_the_console_is_refused_by_the_real_box(
    fleet: Fleet, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    fleet.publisher()
    box = fleet.box("box-a")
    daemon = fleet.run(box)
    add_user(fleet.backend, "ana", "operator", PASSWORD)
    daemon.scan("FLEET-0001")
    assert daemon.wait_verdicts(1)[0]["verdict"] == "accepted"
    wait_for(lambda: fleet.all_collected(box), "the redemption collected")
    shots = artifacts(tmp_path, "console-revoke-e2e")
    with serve_console(fleet.backend) as (url, _console), chromium() as browser:
        page = browser.new_page()
        sign_in(page, url, "ana", PASSWORD)
        page.get_by_role("link", name="Activity").click()
        expect(page.locator("#activity-summary")).to_contain_text("1 redeemed")
        src = page.locator('img[alt^="Bar chart: redemptions"]').get_attribute("src") or ""
        svg = base64.b64decode(src.split(",", 1)[1]).decode()
        assert "redeemed" in svg and '<desc class="value">1</desc>' in svg
        shot(page, shots, "activity-after-a-scan")

        page.get_by_role("link", name="Batches and codes").click()
        page.get_by_label("Code").fill("FLEET-0002")
        page.get_by_role("button", name="Look up").click()
        expect(page.locator("section table")).to_contain_text("No box has sent a record")
        page.get_by_role("button", name="Revoke this code").click()
        expect(page.get_by_role("status")).to_contain_text("revoke batch demo/3 issued")
        assert "FLEET-0002" not in page.content()
        # publish sends it; the box applies it and says so in its status.
        wait_for(lambda: box.cache_seq() == 3, "the box applying the revoke batch")
        # ... and the backend knowing it from the box's status (the page does not poll).
        wait_for(
            lambda: fleet.query("SELECT cache_seq FROM box_status WHERE box = ?", box.id) == [(3,)],
            "the box's status saying cache_seq 3",
        )
        page.goto(f"{url}/codes")
        batches = page.locator("table").last
        expect(batches.locator("tr", has_text="revoke")).to_contain_text("1 of 1", timeout=WAIT)
        shot(page, shots, "codes-revoked-applied")

    daemon.scan("FLEET-0002", "FLEET-0003")
    verdicts = daemon.wait_verdicts(3)[1:]
    assert [v.get("reason", v["verdict"]) for v in verdicts] == ["revoked", "accepted"]
