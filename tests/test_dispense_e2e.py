"""Dispensing end to end (issue 12), every part real: a `redeemd run` box with a receipt
printer on a pty, its local API, Mosquitto, the reference backend's collector and
publisher, `redeemd-backend grant` and the claim service over HTTP, and a second box.

Box A is granted card 1 (6 claim codes) for its own key over MQTT; it dispenses 3 codes
through the API and 2 by a rule after redemptions, printed (the test parses the ESC/POS
bytes and takes the QR payload the printer got). 4 are claimed over HTTP; the signed
codes they give are accepted once at box B, offline from the backend's point of view
(no batch lists them). Then: a double claim, a forged claim code, quota exhaustion on
the box, a revoked grant refused both on the box and at the claim service, and the
backend's funnel dispensed -> claimed -> redeemed. (`kill -9` between the ledger commit
and the answer is tests/test_dispense_box.py's crash test, on the same daemon.)
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import json

import pytest
from api_helpers import Client
from broker import broker  # noqa: F401  (fixture)
from conftest import wait_for
from escpos import CUT, PtyPrinter, parse
from fleet import Fleet, backend_cli
from test_claim_service import Service

from cards import claim_code, signed_code


@pytest.fixture
def fleet(tmp_path, broker):
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def claim_text(url: str) -> str:
    text = url.rsplit("/", 1)[1]
    assert claim_code.looks_like_claim(text), url
    return text


def test_dispense_print_claim_and_redeem_elsewhere(fleet, tmp_path):
    collector = fleet.collector()
    collector.wait_line(lambda line: line.startswith("connected"), "collector connected")
    fleet.publisher()
    service = Service(fleet.backend)
    printer = PtyPrinter(tmp_path / "printer")
    api_socket = tmp_path / "a.sock"
    box_a = fleet.box(
        "box-a",
        extra=f'[api]\nsocket = "{api_socket}"\n'
        f'[dispense]\nclaim_url = "{service.base}/c/"\n'
        "[[dispense.rules]]\nafter_card = 1\ncard = 1\ncount = 1\n"
        f'[printer]\nkind = "serial"\ndevice = "{printer.path}"\n',
    )
    key = json.loads(box_a.cli("box-key", "--json").stdout)
    daemon_a = fleet.run(box_a)

    # The merchant grants box A's key card 1, 6 claim codes; the set arrives by MQTT.
    granted = backend_cli(
        "grant", "add", "--dir", str(fleet.backend), "--box", "box-a", "--card", "1",
        "--quota", "6", "--days", "30", "--box-key", key["box_public_key"],
        "--broker", fleet.broker.url,
    ).stdout  # fmt: skip
    grant_id = granted.split()[1].rstrip(":")

    def status() -> dict:
        return json.loads(box_a.cli("status", "--json").stdout)

    wait_for(lambda: (status().get("sync") or {}).get("grant_seq") == 1, "box A's grant set")
    pos = wait_for(lambda: _connect(api_socket), "box A's local API")

    # 3 through the API, each answered with its claim URL and QR renderings.
    answer = pos.request({"cmd": "dispense", "card": 1, "count": 3})
    assert answer["ok"], answer
    urls = [c["claim_url"] for c in answer["dispensed"]]
    assert [c["counter"] for c in answer["dispensed"]] == [1, 2, 3]
    assert all(c["qr_svg"] and c["qr_png_b64"] and c["qr_text"] for c in answer["dispensed"])

    # 2 by the rule after two coffees are redeemed, printed on the receipt printer.
    daemon_a.scan("FLEET-0001", "FLEET-0002")
    wait_for(lambda: printer.received.count(CUT) >= 2, "two claim receipts printed")
    printed = [r.qr_codes[0].payload.decode() for r in parse(printer.received).receipts[:2]]
    assert all(url.startswith(service.base + "/c/RC1") for url in printed)
    urls += printed
    assert len(set(urls)) == 5

    # 4 claimed over HTTP: each gives a signed code for card 1, once.
    claimed = []
    for url in urls[:4]:
        status_code, body = service.claim(claim_text(url))
        assert status_code == 200 and body["result"] == "claimed", body
        assert signed_code.looks_signed(body["code"]) and body["card_id"] == 1
        claimed.append(body["code"])
    again, body = service.claim(claim_text(urls[0]))
    assert again == 409 and body["reason"] == "already_claimed", body
    forged = claim_text(urls[4])
    forged = forged[:-2] + ("A" if forged[-2] != "A" else "B") + forged[-1]
    status_code, body = service.claim(forged)
    assert status_code in (400, 403) and body["result"] == "refused", body

    # Box B accepts the claimed codes at once (no batch lists them), each once.
    box_b = fleet.box("box-b", extra='[scan]\ndebounce = "0s"\n')  # a repeat is a scan
    daemon_b = fleet.run(box_b)
    daemon_b.scan(*claimed, claimed[0])
    verdicts = daemon_b.wait_verdicts(5)
    assert [v["verdict"] for v in verdicts[:4]] == ["accepted"] * 4, verdicts
    assert verdicts[4].get("reason") == "already_redeemed"

    # The quota: one code left, then quota_exhausted, recorded.
    last = pos.request({"cmd": "dispense", "card": 1, "count": 2})
    assert [c["counter"] for c in last["dispensed"]] == [6]
    assert last["refused"]["reason"] == "quota_exhausted"

    # Revoked: the box stops dispensing, and the unclaimed code is refused when claimed.
    backend_cli(
        "grant", "revoke", "--dir", str(fleet.backend), grant_id, "--broker", fleet.broker.url
    )
    wait_for(lambda: (status().get("sync") or {}).get("grant_seq") == 2, "the revoking set")
    refused = pos.request({"cmd": "dispense", "card": 1})
    assert refused["dispensed"] == [] and refused["refused"]["reason"] == "grant_revoked"
    status_code, body = service.claim(claim_text(urls[4]))
    assert body["reason"] == "grant_revoked", body

    # The backend knows dispensed -> claimed -> redeemed for the card.
    def funnel() -> dict:
        rows = json.loads(backend_cli("dispensing", "--dir", str(fleet.backend), "--json").stdout)
        return next((r for r in rows["rows"] if r["card"] == 1), {})

    wait_for(lambda: fleet.all_collected(box_a) and fleet.all_collected(box_b), "all collected")
    wait_for(
        lambda: (
            (funnel().get("dispensed"), funnel().get("claimed"), funnel().get("redeemed"))
            == (6, 4, 4)
        ),
        "the funnel 6 -> 4 -> 4",
    )
    pos.close()
    output = service.stop()
    assert "RC1" not in output and "RD1" not in output, "no code in the claim service's log"
    for box in (box_a, box_b):
        assert "RC1" not in box.stderr() and "RD1" not in box.stderr()


def _connect(path) -> Client | None:
    try:
        client = Client(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    return client
