"""Dispensing: the local API's `dispense` to its answer, against the floor of what it must do.

Usage (from the repo root):

    .venv/bin/python bench/dispense.py                 # 2,000 dispenses, 2 rounds
    .venv/bin/python bench/dispense.py --quick         # 300 dispenses, 1 round

Ours: the real `redeemd run` process, holding a grant set for its own key, asked over its
local API socket for one claim code at a time (`{"cmd":"dispense","card":1}`); timed from
the request's send to its answer's last byte. The answer comes after the `dispense`
record is committed (synchronous=FULL) and carries the claim URL's QR code as SVG, PNG
and terminal text.

Floor, in the same run, on the same filesystem, as the issue defines it: one plain
`sqlite3` connection (WAL, synchronous=FULL) committing one INSERT of a ledger-sized row,
then segno encoding a claim URL of the same length (the QR encoded by the library
alone). For context, a second line adds segno rendering the SVG and PNG our answer
carries. Rounds alternate which runs first.

Target (issue 12): our p50 <= 1.5x the floor's p50.

The claim service's claims per second on one core, beside a plain Starlette endpoint on
the same server, is printed when `redeemd-backend claim` is available (--claims N).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boxes
import segno
from boxes import ROOT, BenchKeys, percentile

from cards import grant as grants
from cards import keys
from daemon import box_key
from storage import dispensing
from storage.database import open_database

TARGET = 1.5
CARD = 1
CLAIM_URL = "https://claim.example.com/c/"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def make_box(directory: Path) -> tuple[Path, Path]:
    """A box with the coupon card, a grant set for its own key, and its API socket; the
    config path and the socket path."""
    bench_keys = BenchKeys.new()
    built = boxes.build_cache(directory, 10, 1, bench_keys=bench_keys)
    config = built.config
    state_dir = Path(config.box.state_dir)
    socket_path = directory / "api.sock"
    config_path = state_dir / "config.toml"
    with config_path.open("a") as f:
        f.write(f'\n[api]\nsocket = "{socket_path}"\n\n[dispense]\nclaim_url = "{CLAIM_URL}"\n')
    key = box_key.load_or_create(state_dir)
    now = int(time.time())
    data = grants.build(
        bench_keys.issuer_private,
        bench_keys.delegation,
        merchant=boxes.MERCHANT,
        box="bench-box",
        box_public=keys.public_of(key.private),
        seq=1,
        created_at=now,
        grants=(grants.Grant("00000000000000b1", (CARD,), 0xFFFFFFFF, now - 60, boxes.FAR),),
    )
    conn = open_database(config.box.database)
    try:
        dispensing.install_grants(
            conn, data, config.trust.root_keys, merchant=boxes.MERCHANT, box="bench-box",
            box_key_id=key.key_id,
        )  # fmt: skip
    finally:
        conn.close()
    return config_path, socket_path


class Api:
    """One JSON-lines connection to the daemon's socket."""

    def __init__(self, path: Path):
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    sys.exit(f"redeemd did not open its API socket {path} within 30 s")
                time.sleep(0.05)
        self.reader = self.sock.makefile("rb")

    def ask(self, request: bytes) -> dict:
        self.sock.sendall(request)
        while True:
            line = json.loads(self.reader.readline())
            if "event" not in line:
                return line

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def run_ours(config_path: Path, socket_path: Path, count: int) -> list[float]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "-c", str(config_path), "run"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=ROOT, env=ENV,
    )  # fmt: skip
    try:
        api = Api(socket_path)
        request = json.dumps({"cmd": "dispense", "card": CARD}).encode() + b"\n"
        for _ in range(20):  # warm up: imports, first statements, segno's tables
            api.ask(request)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            answer = api.ask(request)
            samples.append(time.perf_counter() - started)
            if not answer.get("ok") or not answer["dispensed"][0].get("qr_png_b64"):
                sys.exit(f"dispense failed: {json.dumps(answer)[:300]}")
        api.close()
        return samples
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()


def claim_url_like() -> str:
    # A claim URL of the real length: the prefix and a 151-character RC1 text.
    return CLAIM_URL + "RC1" + "A" * 148


def run_floor(directory: Path, count: int) -> tuple[list[float], list[float]]:
    """(insert + commit + encode, the same + SVG and PNG rendered), per dispense."""
    path = directory / "floor.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS ledger (seq INTEGER PRIMARY KEY, id BLOB, at_ms INTEGER, "
        "digest BLOB, card_id INTEGER, action TEXT, grant_id TEXT, counter INTEGER, verdict TEXT)"
    )
    url = claim_url_like()
    encode, full = [], []
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]
    for _ in range(count):
        seq += 1
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, os.urandom(16), int(time.time() * 1000), os.urandom(16), CARD, "dispense",
             "00000000000000b1", seq, "accepted"),
        )  # fmt: skip
        conn.execute("COMMIT")
        qr = segno.make(url, error="m", micro=False)
        encode.append(time.perf_counter() - started)
        svg, png = io.BytesIO(), io.BytesIO()
        qr.save(svg, kind="svg")
        qr.save(png, kind="png")
        full.append(time.perf_counter() - started)
    conn.close()
    return encode, full


def line(name: str, samples: list[float]) -> str:
    return (
        f"{name:<44} p50 {percentile(samples, 50) * 1000:7.3f} ms   "
        f"p99 {percentile(samples, 99) * 1000:7.3f} ms   ({len(samples)} samples)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="300 dispenses, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.count, args.rounds = 300, 1
    ours: list[float] = []
    floor: list[float] = []
    rendered: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-dispense-", dir=ROOT) as scratch:
        directory = Path(scratch)
        config_path, socket_path = make_box(directory / "box")
        for round_ in range(args.rounds):
            if round_ % 2 == 0:
                ours += run_ours(config_path, socket_path, args.count)
                f, r = run_floor(directory, args.count)
            else:
                f, r = run_floor(directory, args.count)
                ours += run_ours(config_path, socket_path, args.count)
            floor += f
            rendered += r
        print(f"bench/dispense.py: {args.count} dispenses x {args.rounds} round(s), "
              f"filesystem {boxes.filesystem(directory)}")  # fmt: skip
        print(line("ours: API dispense -> answer (record + QR)", ours))
        print(line("floor: insert + commit + segno encode", floor))
        print(line("  (floor + segno rendering SVG and PNG)", rendered))
        ratio = percentile(ours, 50) / percentile(floor, 50)
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"p50 ratio {ratio:.2f}x the floor (target <= {TARGET}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
