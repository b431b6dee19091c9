"""Benchmark the console's fleet page and its live update with 1,000 boxes in the store.

    .venv/bin/python bench/console.py [--boxes 1000] [--requests 300]
        [--database postgresql://...]

Fills a fresh store (SQLite in a temporary directory, or the given PostgreSQL database,
which should be empty) with N registered boxes and their statuses (a third offline, a
fifth holding records, some behind), opens a session, starts the real
`redeemd-backend console` process and asks it, round-robin so every kind of request
sees the same conditions:

  fleet page        GET /                 (100 rows, the default sort)
  fleet, all rows   GET /?limit=1000
  live update       GET /fleet/rows       (the page's poll, a changed answer: 200)
  live, unchanged   GET /fleet/rows       with If-None-Match (304)
  activity page     GET /activity         (30 days per day: 2 pygal charts, the table)
  activity CSV      GET /activity.csv?by=box
  batches and codes GET /codes
  static file       GET /static/console.js (the floor: the same server, no store)

The store also holds --events redemption records (one in ten refused) spread over the
last 30 days and the boxes, for the activity page.

It prints p50/p99 of the server's own time (its Server-Timing header: the app from
request to response start) and of the client's round trip (one keep-alive connection
on loopback).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from boxes import percentile  # noqa: E402

from backend.console import auth  # noqa: E402
from backend.events import parse_message  # noqa: E402
from backend.store import DATABASE_ENV, BoxStatus, Store  # noqa: E402

COOKIE = "redeemd-console"  # --insecure-cookies: plain http on loopback


def records(names: list[str], events: int, now: int) -> list[tuple[str, str, list]]:
    """`events` redeem records over 30 days, round-robin on the boxes, as messages."""
    per_box: dict[str, list[dict]] = {}
    for i in range(events):
        box = names[i % len(names)]
        rows = per_box.setdefault(box, [])
        rows.append({
            "seq": len(rows) + 1, "id": str(uuid.uuid4()),
            "at_ms": (now - (i * 2_591_000 // max(events, 1))) * 1000, "box": box,
            "merchant": "acme", "store": f"store-{i % 17}", "digest": os.urandom(16).hex(),
            "card_id": 1 + i % 5, "action": "redeem", "uses": 1, "amount": None,
            "uses_left": 3, "balance": None,
            "verdict": "refused" if i % 10 == 0 else "accepted",
            "reason": "expired" if i % 10 == 0 else None, "source": "stdin",
            "symbology": None, "operator": None, "cache_seq": 1, "reverses": None,
        })  # fmt: skip
    return [
        ("acme", box, parse_message(
            json.dumps({"v": 1, "box": box, "records": rows}).encode(), merchant="acme", box=box
        ))
        for box, rows in per_box.items()
    ]  # fmt: skip


def fill(directory: Path, boxes: int, events: int = 0) -> str:
    """N boxes with statuses and an operator's session; returns the session token."""
    store = Store.open(directory)
    try:
        names = [f"box-{i:05d}" for i in range(boxes)]
        store.add_boxes("acme", names)
        now = int(time.time())
        if events:
            store.store_messages(records(names, events, now))
        for i, box in enumerate(names):
            if i % 3 == 0:
                status = BoxStatus(state="offline", raw=f'{{"will":{i}}}', will=True)
            else:
                status = BoxStatus(
                    state="online", raw=f"status {i}", box_at=now, version=f"1.{i % 4}.0",
                    cache_seq=i % 7, cache_age_s=60, outbox_depth=3 if i % 5 == 0 else 0,
                    outbox_oldest_age_s=120 if i % 5 == 0 else None,
                    drivers=({"name": "hid0", "kind": "hid", "state": "ready"},
                             {"name": "cam0", "kind": "camera", "state": "ready"}),
                )  # fmt: skip
            store.record_status("acme", box, status, now - i)
        user = auth.add_user(store, "bench", "viewer", "bench passphrase long")
        token, _ = auth.open_session(store, user)
        return token
    finally:
        store.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300, help="per kind of request")
    parser.add_argument("--events", type=int, default=20_000, help="redeem records stored")
    parser.add_argument("--database", help="a PostgreSQL URL (default: SQLite in a temp dir)")
    args = parser.parse_args()
    if args.database:
        os.environ[DATABASE_ENV] = args.database
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "keys"
        token = fill(directory, args.boxes, args.events)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "console", "--dir", str(directory),
             "--listen", f"127.0.0.1:{port}", "--insecure-cookies"],
            cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            return run(port, token, args)
        finally:
            server.terminate()
            server.wait(20)


def run(port: int, token: str, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health")
            conn.getresponse().read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    cookie = {"Cookie": f"{COOKIE}={token}"}

    def get(path: str, headers: dict[str, str]) -> tuple[int, float, float, bytes, str]:
        start = time.perf_counter()
        conn.request("GET", path, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
        took = time.perf_counter() - start
        timing = re.search(r"dur=([\d.]+)", answer.headers.get("server-timing", ""))
        server = float(timing[1]) / 1000 if timing else float("nan")
        return answer.status, server, took, body, answer.headers.get("etag", "")

    etag = {"If-None-Match": ""}  # the previous live update's, as the page's script sends
    kinds = {
        "fleet page (100 rows)": ("/", cookie, 200),
        f"fleet page ({args.boxes} rows)": (f"/?limit={min(args.boxes, 1000)}", cookie, 200),
        "live update (200)": ("/fleet/rows", cookie, 200),
        # 304 unless a relative time ("for 45s") ticked since the update before it.
        "live update, unchanged (304)": ("/fleet/rows", etag, 304),
        "activity page (30 days)": ("/activity", cookie, 200),
        "activity CSV (by box)": ("/activity.csv?by=box", cookie, 200),
        "batches and codes": ("/codes", cookie, 200),
        "static file": ("/static/console.js", {}, 200),  # sent the cookie too: ignored
    }
    samples: dict[str, tuple[list[float], list[float], int]] = {k: ([], [], 0) for k in kinds}
    for _ in range(3):  # warm up
        for path, headers, _status in kinds.values():
            get(path, {**cookie, **headers})
    not_modified = 0
    for _ in range(args.requests):
        for name, (path, headers, expected) in kinds.items():
            status, server, took, body, tag = get(path, {**cookie, **headers})
            if path == "/fleet/rows" and headers is not etag:
                etag["If-None-Match"] = tag
            if status != expected and not (expected == 304 and status == 200):
                raise SystemExit(f"{name}: HTTP {status}, expected {expected}: {body[:200]!r}")
            not_modified += status == 304
            servers, rounds, _size = samples[name]
            servers.append(server)
            rounds.append(took)
            samples[name] = (servers, rounds, len(body))
    store = "PostgreSQL" if args.database else "SQLite"
    print(f"console, {args.boxes} boxes on {store}, {args.requests} requests of each kind, "
          "one keep-alive connection on loopback")  # fmt: skip
    print(
        f"{'request':32} {'bytes':>8} {'server p50':>11} {'p99':>8} {'round trip p50':>15} {'p99':>8}"
    )
    for name, (servers, rounds, size) in samples.items():
        print(
            f"{name:32} {size:>8} {percentile(servers, 50) * 1000:>9.2f}ms "
            f"{percentile(servers, 99) * 1000:>6.2f}ms {percentile(rounds, 50) * 1000:>13.2f}ms "
            f"{percentile(rounds, 99) * 1000:>6.2f}ms"
        )
    print(f"({not_modified} of {args.requests} unchanged polls were answered 304)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
