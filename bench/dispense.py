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
carries. Ours and the floor take turns, 10 dispenses each.

Target (issue 12): our p50 <= 1.5x the floor's p50.

Claim service: `redeemd-backend claim` pinned to one core (taskset), SQLite store,
claimed by 4 client threads on the other core with POST /c/CODE?format=json (verify
the claim code, commit the claim, mint the signed code, render its QR as PNG); beside
it, in the same run, a plain Starlette endpoint (a constant JSON answer) served by the
same uvicorn on the same core. Printed as claims/s and requests/s (--claims N).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boxes
import segno
from boxes import ROOT, BenchKeys, percentile

from backend import grants as backend_grants
from backend.keystore import Keystore
from backend.store import Store
from cards import batch, claim_code, keys
from cards import grant as grants
from cards.batch import Kind
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


BLOCK = 10
"""Ours and the floor take turns, this many dispenses each, so that a machine whose load
shifts during the run weighs on both alike."""


class Floor:
    """One plain sqlite3 connection (WAL, synchronous=FULL) and segno, as the floor."""

    def __init__(self, directory: Path):
        self.conn = sqlite3.connect(directory / "floor.db", isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS ledger (seq INTEGER PRIMARY KEY, id BLOB, at_ms INTEGER, "
            "digest BLOB, card_id INTEGER, action TEXT, grant_id TEXT, counter INTEGER, "
            "verdict TEXT)"
        )
        self.seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]
        # A claim URL of the real length: the prefix and a 151-character RC1 text.
        self.url = CLAIM_URL + "RC1" + "A" * 148

    def once(self) -> tuple[float, float]:
        """(insert + commit + encode, the same + SVG and PNG rendered), in seconds."""
        self.seq += 1
        started = time.perf_counter()
        self.conn.execute("BEGIN")
        self.conn.execute(
            "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.seq, os.urandom(16), int(time.time() * 1000), os.urandom(16), CARD,
             "dispense", "00000000000000b1", self.seq, "accepted"),
        )  # fmt: skip
        self.conn.execute("COMMIT")
        qr = segno.make(self.url, error="m", micro=False)
        encoded = time.perf_counter() - started
        svg, png = io.BytesIO(), io.BytesIO()
        qr.save(svg, kind="svg")
        qr.save(png, kind="png")
        return encoded, time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


def run_round(
    config_path: Path, socket_path: Path, floor: Floor, count: int
) -> tuple[list[float], list[float], list[float]]:
    """One daemon's `count` dispenses and as many floor operations, in turns of BLOCK."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "-c", str(config_path), "run"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=ROOT, env=ENV,
    )  # fmt: skip
    ours: list[float] = []
    encoded: list[float] = []
    rendered: list[float] = []
    try:
        api = Api(socket_path)
        request = json.dumps({"cmd": "dispense", "card": CARD}).encode() + b"\n"
        for _ in range(20):  # warm up: imports, first statements, segno's tables
            api.ask(request)
            floor.once()
        while len(ours) < count:
            for _ in range(BLOCK):
                started = time.perf_counter()
                answer = api.ask(request)
                ours.append(time.perf_counter() - started)
                if not answer.get("ok") or not answer["dispensed"][0].get("qr_png_b64"):
                    sys.exit(f"dispense failed: {json.dumps(answer)[:300]}")
            for _ in range(BLOCK):
                e, r = floor.once()
                encoded.append(e)
                rendered.append(r)
        api.close()
        return ours, encoded, rendered
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()


PLAIN_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def plain(request):
    return JSONResponse({"result": "claimed", "code": "RD1"})

app = Starlette(routes=[Route("/c/{code}", plain, methods=["GET", "POST"])])
"""


def claim_backend(directory: Path, count: int) -> list[str]:
    """A backend directory (keys, the coupon card, a grant for a fresh box key with room
    for `count` claims) and `count` claim codes that box minted."""
    keystore = Keystore(directory)
    keystore.generate()
    now = int(time.time())
    keystore.save_delegation(keys.delegate(
        keystore.private("root"), keystore.public("issuer"), (boxes.MERCHANT,), now - 3600,
        now + 86400,
    ))  # fmt: skip
    box_private = keys.new_private_key()
    store = Store.open(directory)
    try:
        store.add_boxes(boxes.MERCHANT, ["bench-box"])
        entries = batch.encode_cards([boxes.COUPON])
        store.issue(boxes.MERCHANT, Kind.CARDS, lambda seq: batch.build(
            keystore.private("issuer"), keystore.delegation(), merchant=boxes.MERCHANT,
            seq=seq, kind=Kind.CARDS, entries=entries, created_at=now, expires_at=now + 86400,
        ))  # fmt: skip
        made = backend_grants.add(
            store, keystore, box="bench-box", cards=(CARD,), quota=count, not_before=now - 60,
            not_after=now + 86400, box_key=keys.public_of(box_private),
        )  # fmt: skip
    finally:
        store.close()
    return [
        claim_code.mint(box_private, made.grant.id, n, CARD, now + 3600)
        for n in range(1, count + 1)
    ]


def serve(command: list[str], port: int) -> subprocess.Popen:
    """`command` on core 0 (taskset), once it answers on `port`."""
    process = subprocess.Popen(
        ["taskset", "-c", "0", *command], cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    sys.exit(f"{command[:4]} did not listen on port {port} within 30 s")


def hammer(base: str, codes: list[str]) -> float:
    """POST every code from 4 threads (on core 1); requests per second."""
    os.sched_setaffinity(0, {1})

    def post(code: str) -> int:
        request = urllib.request.Request(f"{base}/c/{code}?format=json", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(post, codes))
    elapsed = time.perf_counter() - started
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    if any(status != 200 for status in statuses):
        sys.exit(f"claims refused: {sorted(set(statuses))}")
    return len(codes) / elapsed


def run_claims(directory: Path, count: int) -> tuple[float, float]:
    codes = claim_backend(directory / "backend", count)
    port = boxes_free_port()
    service = serve([sys.executable, "-m", "backend.cli", "claim", "--dir",
                     str(directory / "backend"), "--listen", f"127.0.0.1:{port}"], port)  # fmt: skip
    try:
        ours = hammer(f"http://127.0.0.1:{port}", codes)
    finally:
        service.terminate()
        service.wait(10)
    (directory / "plain_app.py").write_text(PLAIN_APP)
    port = boxes_free_port()
    plain = serve([sys.executable, "-m", "uvicorn", "--app-dir", str(directory), "--port",
                   str(port), "--log-level", "warning", "--no-access-log", "plain_app:app"], port)  # fmt: skip
    try:
        floor = hammer(f"http://127.0.0.1:{port}", [f"X{i}" for i in range(count)])
    finally:
        plain.terminate()
        plain.wait(10)
    return ours, floor


def boxes_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def line(name: str, samples: list[float]) -> str:
    return (
        f"{name:<44} p50 {percentile(samples, 50) * 1000:7.3f} ms   "
        f"p99 {percentile(samples, 99) * 1000:7.3f} ms   ({len(samples)} samples)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--claims", type=int, default=2000, help="claims for the service")
    parser.add_argument("--quick", action="store_true", help="300 dispenses, 1 round, 300 claims")
    args = parser.parse_args()
    if args.quick:
        args.count, args.rounds, args.claims = 300, 1, 300
    ours: list[float] = []
    floor: list[float] = []
    rendered: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-dispense-", dir=ROOT) as scratch:
        directory = Path(scratch)
        config_path, socket_path = make_box(directory / "box")
        floor_ops = Floor(directory)
        for _ in range(args.rounds):
            o, f, r = run_round(config_path, socket_path, floor_ops, args.count)
            ours += o
            floor += f
            rendered += r
        floor_ops.close()
        print(f"bench/dispense.py: {args.count} dispenses x {args.rounds} round(s), "
              f"filesystem {boxes.filesystem(directory)}")  # fmt: skip
        print(line("ours: API dispense -> answer (record + QR)", ours))
        print(line("floor: insert + commit + segno encode", floor))
        print(line("  (floor + segno rendering SVG and PNG)", rendered))
        ratio = percentile(ours, 50) / percentile(floor, 50)
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"p50 ratio {ratio:.2f}x the floor (target <= {TARGET}x): {verdict}")
        ours_claims, plain = run_claims(directory, args.claims)
        print(f"claim service on one core: {ours_claims:8.1f} claims/s "
              f"(verify, commit, sign, QR as PNG; SQLite store)")  # fmt: skip
        print(f"plain Starlette endpoint, same server and core: {plain:8.1f} requests/s "
              f"(ours {ours_claims / plain:.1%} of it)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
