"""The console watching a real fleet (issue 15): a real `redeemd run` box, a real
Mosquitto, the real collector and the real console process, in Debian's Chromium. The
box's daemon is killed with SIGKILL: the broker publishes its last will, the collector
stores it, and the fleet table shows the box offline without a reload; restarted, it is
online again. Waits are for what the page shows, never for a time."""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

from pathlib import Path

import pytest
from broker import broker  # noqa: F401  (fixture)
from browser import add_user, artifacts, chromium, serve_console, shot, sign_in
from fleet import Fleet

PASSWORD = "correct horse battery staple"
WAIT = 90_000  # ms: generous, reaching it means something hangs


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def test_a_killed_daemon_goes_offline_in_the_fleet_table_and_comes_back(
    fleet: Fleet, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    box = fleet.box("box-a")
    daemon = fleet.run(box)
    add_user(fleet.backend, "ana", "viewer", PASSWORD)
    shots = artifacts(tmp_path, "console-e2e")
    with serve_console(fleet.backend) as (url, _console), chromium() as browser:
        page = browser.new_page()
        sign_in(page, url, "ana", PASSWORD)
        row = page.locator('#fleet-rows tr[data-box="box-a"]')
        expect(row).to_contain_text("online", timeout=WAIT)
        expect(row).to_contain_text("2/2")  # cards and codes batches applied, none behind
        shot(page, shots, "fleet-box-online")
        page.evaluate("window.stillThisPage = true")

        daemon.kill()
        expect(row).to_contain_text("offline", timeout=WAIT)
        shot(page, shots, "fleet-box-killed")

        fleet.run(box)
        expect(row).to_contain_text("online", timeout=WAIT)
        assert page.evaluate("window.stillThisPage === true"), "the page reloaded"
        shot(page, shots, "fleet-box-back")
    collector.wait_line(lambda line: "box demo/box-a offline: its last will" in line, "the will")
