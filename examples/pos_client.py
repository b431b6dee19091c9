#!/usr/bin/env python3
"""A minimal POS-side client for redeemd's local API (docs/local-api.md). Stdlib only.

Start from this: it subscribes to scans, shows every verdict, and confirms two-phase
cards (gift / stored value: the scan only checks) by redeeming an amount with an
idempotency key, retrying with the same key after a timeout or a lost connection, so
the card is never charged twice.

    python3 examples/pos_client.py                      # watch verdicts
    python3 examples/pos_client.py --amount 1250        # also confirm checked cards
    python3 examples/pos_client.py --status
    python3 examples/pos_client.py --manual DEMO-0003   # a code the cashier typed
    python3 examples/pos_client.py --socket .demo/api.sock --operator anna --amount 500

It prints one JSON line per verdict on stdout (a real POS shows it to the cashier).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import uuid

DEFAULT_SOCKET = os.path.join(os.environ.get("RUNTIME_DIRECTORY", "/run/redeemd"), "api.sock")


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
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)
        self.buffer = b""
        if self.subscribed:  # a new connection starts without a subscription
            self.request("subscribe")

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
        self.next_id += 1
        message = {"cmd": cmd, "id": self.next_id, **fields}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            line = self.read_line()
            if "event" in line:
                if self.on_event:
                    self.on_event(line)
            elif line.get("id") == self.next_id:
                return line

    def read_line(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redeemd closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def redeem(self, attempts: int = 5, **fields) -> dict:
        """Redeem with one idempotency key, retried until redeemd answers: a retry
        with the same key returns the first verdict instead of redeeming again."""
        key = str(uuid.uuid4())
        for attempt in range(attempts):
            try:
                answer = self.request("redeem", key=key, **fields)
            except (OSError, ConnectionError):
                time.sleep(min(2**attempt * 0.2, 3))
                self.close()
                with contextlib.suppress(OSError):
                    self.connect()
                continue
            if answer.get("error") in ("timeout", "busy"):
                time.sleep(min(2**attempt * 0.2, 3))
                continue
            return answer
        raise ConnectionError("redeemd did not answer; the same key may be retried later")


def show(what: str, body: dict) -> None:
    print(json.dumps({"what": what, **body}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="default: %(default)s")
    parser.add_argument("--amount", type=int, help="confirm checked cards for this amount")
    parser.add_argument("--operator", help="cashier id recorded with each redemption")
    parser.add_argument("--status", action="store_true", help="print status and exit")
    parser.add_argument("--manual", metavar="CODE", help="enter a code by hand and exit")
    parser.add_argument("--count", type=int, default=0, help="exit after N verdicts (tests)")
    args = parser.parse_args(argv)

    api = Redeemd(args.socket)
    try:
        api.connect()
    except OSError as exc:
        print(f"cannot connect to {args.socket}: {exc}; is redeemd running, and is this "
              "user in the socket's group?", file=sys.stderr)  # fmt: skip
        return 1
    if args.status:
        show("status", api.request("status"))
        return 0
    if args.manual:
        show("manual", api.request("manual", code=args.manual))
        return 0

    seen = 0
    extra = {"operator": args.operator} if args.operator else {}

    def on_event(event: dict) -> None:
        nonlocal seen
        kind = event["event"]
        if kind == "checked" and args.amount:
            # The customer's card was read and is valid: charge it (the real POS asks
            # for the total first). Answers come back through request() below.
            pending.append(event)
        show(kind, event)
        seen += 1

    pending: list[dict] = []
    api.on_event = on_event
    answer = api.subscribe()
    if not answer.get("ok"):
        show("error", answer)
        return 1
    print(f"subscribed to {args.socket}; scan a code", file=sys.stderr, flush=True)
    api.sock.settimeout(None)  # wait for scans as long as it takes
    while not args.count or seen < args.count:
        if pending:
            event = pending.pop(0)
            api.sock.settimeout(api.timeout)
            answer = api.redeem(check_id=event["check_id"], amount=args.amount, **extra)
            api.sock.settimeout(None)
            show("redeemed" if answer.get("ok") else "error", answer)
            seen += 1
            continue
        try:
            on_event(api.read_line())
        except ConnectionError as exc:
            print(f"redeemd went away: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
