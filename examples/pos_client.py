#!/usr/bin/env python3
"""A minimal POS-side client for redeemd's local API (docs/local-api.md). Stdlib only.

Start from this: it subscribes to scans, shows every verdict, and confirms two-phase
cards (gift / stored value: the scan only checks) by redeeming an amount with an
idempotency key, retrying with the same key after a timeout or a lost connection, so
the card is never charged twice. When redeemd restarts (an update, a reboot, a crash)
it reconnects, with a growing pause between tries, and subscribes again.

    python3 examples/pos_client.py                      # watch verdicts
    python3 examples/pos_client.py --amount 1250        # also confirm checked cards
    python3 examples/pos_client.py --status
    python3 examples/pos_client.py --check DEMO-0003    # the verdict, nothing redeemed
    python3 examples/pos_client.py --redeem DEMO-0003   # redeem now (--amount for gift cards)
    python3 examples/pos_client.py --reverse 01a2...    # undo a redemption by its record_id
    python3 examples/pos_client.py --manual DEMO-0003   # a code the cashier typed
    python3 examples/pos_client.py --dispense 8 --codes 2   # hand out 2 claim codes for card 8
    python3 examples/pos_client.py --socket .demo/api.sock --operator anna --amount 500

It prints one JSON line per verdict or answer on stdout (a real POS shows it to the
cashier), and what happens to the connection on stderr. A claim code (dispensed by
--dispense, or by a rule after a redemption) is also drawn as a QR code on stderr, for
the customer to scan from the terminal; a real POS shows its `qr_svg` or `qr_png_b64`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import time
import uuid

DEFAULT_SOCKET = os.path.join(os.environ.get("RUNTIME_DIRECTORY", "/run/redeemd"), "api.sock")


def pause(attempt: int, longest: float = 5.0) -> float:
    """Seconds to wait before try number `attempt` (0, 1, ...): 0.2 s doubling up to
    `longest`, with jitter so that the tills of a shop do not all knock at once."""
    return min(0.2 * 2**attempt, longest) * random.uniform(0.5, 1.0)


class Redeemd:
    """One connection: requests get answers (matched by "id"); events in between are
    handed to `on_event`."""

    def __init__(self, path: str, on_event=None, timeout: float = 15.0):
        self.path, self.on_event, self.timeout = path, on_event, timeout
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.next_id = 0
        self.subscribed = False

    def connect(self) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock, self.buffer = sock, b""
        if self.subscribed:  # a new connection starts without a subscription
            self.request("subscribe")

    def reconnect(self, why: str, tries: int = 0) -> None:
        """Connect again, pausing longer after each failure; `tries` = 0 is forever.
        A daemon that restarts takes a second or two to serve its socket again."""
        self.close()
        print(f"redeemd went away ({why}); reconnecting", file=sys.stderr, flush=True)
        attempt = 0
        while True:
            try:
                self.connect()
            except OSError as exc:
                attempt += 1
                if tries and attempt >= tries:
                    raise ConnectionError(f"cannot reconnect to {self.path}: {exc}") from None
                time.sleep(pause(attempt))
                continue
            print(f"reconnected to {self.path}" + (" and subscribed again" if self.subscribed
                  else ""), file=sys.stderr, flush=True)  # fmt: skip
            return

    def subscribe(self) -> dict:
        answer = self.request("subscribe")
        self.subscribed = bool(answer.get("ok"))
        return answer

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, cmd: str, **fields) -> dict:
        """Send one request and wait for its answer, passing events on meanwhile."""
        if self.sock is None:
            raise ConnectionError("not connected")
        self.next_id += 1
        message = {"cmd": cmd, "id": self.next_id, **fields}
        self.sock.settimeout(self.timeout)
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = self.read_line()
            if "event" in line:
                if self.on_event:
                    self.on_event(line)
            elif line.get("id") == self.next_id:
                return line

    def next_event(self) -> dict:
        """Wait, as long as it takes, for the next event (a scan). ConnectionError when
        redeemd goes away."""
        self.sock.settimeout(None)
        while True:
            line = self.read_line()
            if "event" in line:
                return line

    def read_line(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redeemd closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def idempotent(self, cmd: str, attempts: int = 8, **fields) -> dict:
        """`redeem` or `reverse` with one idempotency key, retried until redeemd
        answers: a retry with the same key returns the first verdict instead of
        redeeming (or reversing) again, across reconnects and daemon restarts."""
        key = str(uuid.uuid4())
        for attempt in range(attempts):
            try:
                answer = self.request(cmd, key=key, **fields)
            except OSError as exc:  # ConnectionError and socket.timeout are OSErrors
                time.sleep(pause(attempt))
                with contextlib.suppress(ConnectionError):  # the next try says it again
                    self.reconnect(str(exc), tries=1)
                continue
            if answer.get("error") in ("timeout", "busy", "shutting_down"):
                time.sleep(pause(attempt))
                continue
            return answer
        raise ConnectionError(f"redeemd did not answer; key {key} may be retried later")

    def redeem(self, **fields) -> dict:
        return self.idempotent("redeem", **fields)

    def reverse(self, **fields) -> dict:
        return self.idempotent("reverse", **fields)

    def dispense(self, **fields) -> dict:
        """Claim codes for a card. The key makes a retry answer the codes the first try
        committed, so a lost answer never uses up quota for codes nobody saw."""
        return self.idempotent("dispense", **fields)


def show_claim(claim: dict) -> None:
    """The QR code for the customer (stderr here: stdout is for the JSON lines)."""
    print(claim["qr_text"], file=sys.stderr)
    print(f"claim by {claim['claim_by_iso']}: {claim['claim_url']}", file=sys.stderr, flush=True)


def show(what: str, body: dict) -> None:
    print(json.dumps({"what": what, **body}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="default: %(default)s")
    parser.add_argument("--amount", type=int,
                        help="minor units: confirm checked cards for this amount, or "
                        "what --redeem takes from a gift card")  # fmt: skip
    parser.add_argument("--uses", type=int, help="--redeem: uses of a multi-use card")
    parser.add_argument("--operator", help="cashier id recorded with each redemption")
    once = parser.add_mutually_exclusive_group()
    once.add_argument("--status", action="store_true", help="print status and exit")
    once.add_argument("--check", metavar="CODE", help="print a code's verdict, redeem nothing")
    once.add_argument("--redeem", metavar="CODE", help="redeem a code now and exit")
    once.add_argument("--reverse", metavar="RECORD_ID", help="undo a redemption and exit")
    once.add_argument("--manual", metavar="CODE", help="enter a code by hand and exit")
    once.add_argument("--dispense", metavar="CARD", type=int,
                      help="dispense claim codes for card CARD and exit")  # fmt: skip
    parser.add_argument("--codes", type=int, default=1, help="--dispense: how many (1-10)")
    parser.add_argument("--count", type=int, default=0, help="exit after N verdicts (tests)")
    args = parser.parse_args(argv)

    extra = {"operator": args.operator} if args.operator else {}
    api = Redeemd(args.socket)
    watching = not (args.status or args.check or args.redeem or args.reverse or args.manual
                    or args.dispense)  # fmt: skip
    try:
        api.connect()
    except OSError as exc:
        if not watching:
            print(f"cannot connect to {args.socket}: {exc}; is redeemd running, and is this "
                  "user in the socket's group?", file=sys.stderr)  # fmt: skip
            return 1
        api.reconnect(f"cannot connect: {exc}")  # a till may start before redeemd
    try:
        if args.status:
            show("status", api.request("status"))
        elif args.check:
            show("check", api.request("check", code=args.check))
        elif args.redeem:
            amount = {"amount": args.amount} if args.amount else {}
            uses = {"uses": args.uses} if args.uses else {}
            show("redeem", api.redeem(code=args.redeem, **amount, **uses, **extra))
        elif args.reverse:
            show("reverse", api.reverse(record_id=args.reverse, **extra))
        elif args.manual:
            show("manual", api.request("manual", code=args.manual))
        elif args.dispense:
            answer = api.dispense(card=args.dispense, count=args.codes, **extra)
            show("dispense", answer)
            for claim in answer.get("dispensed", []):
                show_claim(claim)
    except OSError as exc:
        print(f"redeemd did not answer: {exc}", file=sys.stderr)
        return 1
    if not watching:
        return 0

    seen = 0
    pending: list[dict] = []

    def on_event(event: dict) -> None:
        nonlocal seen
        kind = event["event"]
        if kind == "checked" and args.amount:
            # The customer's card was read and is valid: charge it (the real POS asks
            # for the total first). Answers come back through request() below.
            pending.append(event)
        show(kind, event)
        if kind == "dispensed":  # a rule dispensed it after a redemption
            show_claim(event)
        seen += 1

    api.on_event = on_event
    answer = api.subscribe()
    if not answer.get("ok"):
        show("error", answer)
        return 1
    print(f"subscribed to {args.socket}; scan a code", file=sys.stderr, flush=True)
    while not args.count or seen < args.count:
        if pending:
            event = pending.pop(0)
            answer = api.redeem(check_id=event["check_id"], amount=args.amount, **extra)
            show("redeemed" if answer.get("ok") else "error", answer)
            seen += 1
            continue
        try:
            on_event(api.next_event())
        except OSError as exc:
            # Checks waiting for confirmation were in the old daemon's memory only: the
            # card is scanned again. Every other verdict is in its ledger.
            api.reconnect(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
