"""Accounts end to end (issue 13): real `redeemd run` boxes, a real Mosquitto, the
reference backend's real `publish` and `collect` processes (tests/fleet.py).

The backend's account changes are made as an operator makes them, with the
`redeemd-backend account`, `limits`, `transfer` and `topup` commands (codes typed on
standard input, never on the command line), and reach the boxes only through the
broker: the publisher sends each batch, the boxes apply it. Nothing waits for a fixed
time.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json
import re

import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import wait_for
from fleet import Fleet, FleetBox, backend_cli

GROUPON = 3  # use-counted (the demo cards, backend/demo/cards.json)
GIFT = 5
# The same code scanned again at once is another customer's phone, not a double read.
NO_DEBOUNCE = '[scan]\ndebounce = "0s"\n'


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def operator(fleet: Fleet, command: str, *options: str, stdin: str = "") -> str:
    """`redeemd-backend COMMAND --dir <the fleet's backend> OPTIONS`: what it printed."""
    return backend_cli(*command.split(), "--dir", str(fleet.backend), *options, stdin=stdin).stdout


def batch_seq(printed: str) -> int:
    """The sequence of the batch a command says it stored."""
    found = re.search(r"batch demo/(\d+) stored", printed)
    assert found, printed
    return int(found.group(1))


def new_account(fleet: Fleet, card: int, value: str, *codes: str) -> str:
    """`account create` (`value`: "--uses N" or "--balance N"), then `account link` for
    each code; the account's id."""
    made = operator(fleet, "account create", "--merchant", "demo", "--card", str(card),
                    *value.split())  # fmt: skip
    found = re.match(r"account ([0-9a-f]{32}):", made)
    assert found, made
    for code in codes:
        operator(fleet, "account link", "--account", found.group(1), "--code", "-",
                 stdin=code + "\n")  # fmt: skip
    return found.group(1)


def online(box: FleetBox) -> bool:
    return json.loads(box.cli("status", "--json").stdout).get("broker_connected", False)


def reasons(verdicts: list[dict]) -> list[str]:
    return [v.get("reason", v["verdict"]) for v in verdicts]


def test_a_family_account_on_two_offline_boxes_holds_to_the_limits_and_is_reconciled(fleet):
    collector, _ = fleet.collector(), fleet.publisher()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    a, b = fleet.box("box-a", extra=NO_DEBOUNCE), fleet.box("box-b", extra=NO_DEBOUNCE)
    # 5 uses for the family, at most 2 per redemption and 3 unacknowledged per box.
    family = new_account(fleet, GROUPON, "--uses 5", "FAM-1", "FAM-2")
    operator(fleet, "limits set", "--merchant", "demo", "--card", str(GROUPON),
             "--per-redemption", "2", "--per-account", "3")  # fmt: skip
    operator(fleet, "account policy", "--merchant", "demo", "--block-overspent")
    latest = fleet.latest_seq()
    run_a, run_b = fleet.run(a), fleet.run(b)
    for box in (a, b):
        wait_for(lambda box=box: box.cache_seq() == latest, f"{box.id} applied the account")

    fleet.broker.stop()
    wait_for(lambda: not online(a) and not online(b), "both boxes offline")
    # Offline: each box holds the account's 5 uses but accepts only 3 before an ack.
    run_a.scan("FAM-1", "FAM-2", "FAM-1", "FAM-1")
    run_b.scan("FAM-2", "FAM-2", "FAM-2", "FAM-1")
    got_a, got_b = run_a.wait_verdicts(4), run_b.wait_verdicts(4)
    assert reasons(got_a) == ["accepted"] * 3 + ["offline_limit"]
    assert reasons(got_b) == ["accepted"] * 3 + ["offline_limit"]
    assert got_a[2]["uses_left"] == 2
    assert all(row == (bytes.fromhex(family),) for row in a.query("SELECT account FROM ledger"))

    # Online again: the backend stores both boxes' 6 uses of 5, reports the overspend and,
    # by the merchant's policy, blocks the account's codes on every box.
    fleet.broker.start()
    over = wait_for(
        lambda: fleet.query(
            "SELECT account, amount_over, boxes, blocked_seq FROM overspends "
            "WHERE blocked_seq IS NOT NULL"
        ),
        "the overspend reported and blocked",
    )
    (account, amount_over, boxes, blocked), *more = over
    assert (account, amount_over, sorted(json.loads(boxes)), more) == (
        family,
        1,
        ["box-a", "box-b"],
        [],
    )
    for box in (a, b):
        wait_for(lambda box=box: fleet.all_collected(box), f"{box.id} records acked")
    for box in (a, b):
        wait_for(lambda box=box: box.cache_seq() >= blocked, f"{box.id} applied the block")
    run_a.scan("FAM-1")
    assert reasons(run_a.wait_verdicts(5))[-1] == "blocked"


def test_a_gift_transferred_while_the_old_code_is_scanned_offline_elsewhere(fleet):
    collector, _ = fleet.collector(), fleet.publisher()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    # box-b scans the old code again once it has caught up, maybe within a debounce window.
    a, b = fleet.box("box-a"), fleet.box("box-b", extra=NO_DEBOUNCE)
    run_a, run_b = fleet.run(a), fleet.run(b)
    for box in (a, b):
        wait_for(lambda box=box: online(box), f"{box.id} online")
    assert run_b.stop() == 0  # box-b is away while the gift is made

    given = operator(fleet, "transfer", "--merchant", "demo", "--code", "-", "--to", "-",
                     stdin="FLEET-0005\nFRIEND-0005\n")  # fmt: skip
    transfer_seq = batch_seq(given)
    assert "FLEET-0005" not in given and "FRIEND-0005" not in given, given
    wait_for(lambda: a.cache_seq() == transfer_seq, "box-a applied the transfer")

    fleet.broker.stop()
    run_b = fleet.run(b)
    run_b.scan("FLEET-0005")  # box-b has not heard of the gift
    assert reasons(run_b.wait_verdicts(1)) == ["accepted"]
    run_a.scan("FLEET-0005", "FRIEND-0005")
    assert reasons(run_a.wait_verdicts(2)) == ["transferred", "accepted"]

    fleet.broker.start()
    conflict = wait_for(
        lambda: fleet.query("SELECT box, cache_seq, transfer_seq FROM transfer_conflicts"),
        "the transfer conflict flagged",
    )
    assert conflict == [("box-b", 2, transfer_seq)]
    wait_for(lambda: b.cache_seq() >= transfer_seq, "box-b applied the transfer")
    run_b.scan("FLEET-0005", "FRIEND-0005")
    # The old code is retired on box-b too. The one use box-b took from it offline moved
    # with the transfer (the new code gets the old one's state on this box), so the
    # coupon's single use is not given out a third time: the conflict is the backend's.
    assert reasons(run_b.wait_verdicts(3))[1:] == ["transferred", "already_redeemed"]


def test_a_top_up_is_applied_once_despite_resends(fleet):
    collector, publisher = fleet.collector(), fleet.publisher()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    a, b = fleet.box("box-a"), fleet.box("box-b")
    run_a = fleet.run(a)
    family = new_account(fleet, GIFT, "--balance 1000", "TOP-1")
    topup_seq = batch_seq(operator(fleet, "topup", "--account", family, "--amount", "500"))
    wait_for(lambda: a.cache_seq() == topup_seq, "box-a applied the top-up")
    balance = "SELECT balance FROM accounts"
    assert a.query(balance) == [(1500,)]

    # box-b, away all along, asks for what it missed (a resend, 16.2) and applies it once.
    fleet.run(b)
    wait_for(lambda: b.cache_seq() == topup_seq, "box-b caught up")
    publisher.wait_line(lambda line: "resent demo" in line and "box-b" in line, "the resend")
    assert b.query(balance) == [(1500,)]

    # The same batch again by file on box-a, and box-a restarted (the publisher's
    # retained manifest and batches reach it again): still one top-up.
    export = fleet.dir / "export"
    export.mkdir()
    operator(fleet, "export", "--merchant", "demo", "--out", str(export), str(topup_seq))
    assert run_a.stop() == 0
    imported = a.cli("import", *sorted(str(p) for p in export.iterdir()))
    assert imported.returncode == 0 and "already applied" in imported.stdout, imported
    run_a = fleet.run(a)
    wait_for(lambda: online(a), "box-a online again")
    run_a.scan("TOP-1")  # a gift card's scan is a check: it shows the balance
    (verdict,) = run_a.wait_verdicts(1)
    assert (verdict["verdict"], verdict["balance"]) == ("accepted", 1500)
    assert a.query(balance) == b.query(balance) == [(1500,)]
