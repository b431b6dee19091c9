"""Outbox drain over MQTT against plain paho publishing to the same broker.

Usage (from the repo root):

    .venv/bin/python bench/sync.py                   # 100,000 records, 2 rounds
    .venv/bin/python bench/sync.py --records 20000 --rounds 1
    .venv/bin/python bench/sync.py --quick           # 10,000 records, 1 round

Ours: a box database whose outbox holds N ledger records (accepted redemptions, as the
engine writes them; they are inserted in one transaction here because the scan path
is bench/scan_path.py's business), the real `redeemd run` process with `[sync]` on, and
the real `redeemd-backend collect` process storing into backend.db, both on a Mosquitto
started for this run on a free loopback port. Timed from the box's first retained
"online" status (it is connected and the pump has started) to the collector's ack that
covers record N; the box's outbox is then checked to be empty. The daemon's resident
memory is sampled from /proc every 50 ms during the drain.

Floor: one plain paho client (MQTT v5, default settings) publishing N QoS 1 messages,
each the size of one record as the box sends a single record, to the same broker, timed
until the last PUBACK. No subscriber, no storage, no acks: the least a
one-message-per-record design could cost. Rounds alternate which runs first.

Targets: our records per second >= the floor's messages per second; 100,000 records
drained in under 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import boxes
import paho.mqtt.client as mqtt
from boxes import ROOT, Scratch, status_kib

from backend.keystore import Keystore
from backend.store import Store
from cards import keys
from storage import ledger
from storage.database import open_database

PREFIX = "redeemd/v1"
BOX = "bench-box"
TARGET_SECONDS = 30.0
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(directory: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        sys.exit("bench/sync.py needs mosquitto: run 'sudo apt-get install mosquitto'")
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"log_dest none\nuser {os.environ.get('USER') or 'root'}\n"
    )
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    sys.exit("mosquitto did not start")


def make_backend(directory: Path) -> Path:
    store = Keystore(directory)
    store.generate()
    now = int(time.time())
    store.save_delegation(
        keys.delegate(
            store.private("root"), store.public("issuer"), ("demo",), now - 60, now + 86400
        )
    )
    # The collector takes events only from registered boxes (redeemd-backend box add).
    backend = Store.open(directory)
    backend.add_boxes("demo", [BOX])
    backend.close()
    return directory


def make_box(directory: Path, backend: Path, port: int, records: int, args) -> Path:
    """A box configured to sync, with `records` waiting in its outbox."""
    box = directory / "box"
    box.mkdir()
    config = box / "config.toml"
    config.write_text(
        f"""
[box]
id = "{BOX}"
merchant = "demo"
store = "store-1"
state_dir = "{box}"
timezone = "UTC"

[trust]
root_key_files = ["{backend}/root.pub"]
code_key_file = "{backend}/code.key"

[sync]
enabled = true
broker = "mqtt://127.0.0.1:{port}"
max_inflight = {args.max_inflight}
max_records = {args.max_records}
"""
    )
    conn = open_database(box / "redeemd.db")
    now_ms = int(time.time() * 1000)
    rows = (record(seq, now_ms).row() for seq in range(1, records + 1))
    with conn:
        conn.executemany(ledger.INSERT, rows)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return config


def record(seq: int, now_ms: int) -> ledger.Redemption:
    return ledger.Redemption(
        seq=seq, id=ledger.new_id()[0], at_ms=now_ms - 10_000_000 + seq, box=BOX,
        merchant="demo", store="store-1", digest=os.urandom(16), card_id=1, action="redeem",
        uses=1, amount=None, uses_left=0, balance=None, verdict="accepted", reason=None,
        source="counter", symbology="QR", operator=None, cache_seq=2,
    )  # fmt: skip


def one_record_message_size() -> int:
    body = {"v": 1, "box": BOX, "records": [record(123_456, int(time.time() * 1000)).to_json()]}
    return len(json.dumps(body, separators=(",", ":")).encode())


class Observer:
    """A paho client that notes when the box comes online and when the last ack arrives."""

    def __init__(self, port: int, records: int):
        self.records = records
        self.online_at: float | None = None
        self.acked_at: float | None = None
        self.acks = 0
        ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="bench-observer", protocol=mqtt.MQTTv5
        )
        base = f"{PREFIX}/demo/box/{BOX}"
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(f"{base}/status", 1), (f"{base}/ack", 1)]
        )
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            sys.exit("observer could not subscribe")

    def _message(self, client, userdata, message) -> None:
        now = time.perf_counter()
        body = json.loads(message.payload) if message.payload else {}
        if message.topic.endswith("/status") and body.get("state") == "online":
            self.online_at = self.online_at or now
        elif message.topic.endswith("/ack"):
            self.acks += 1
            if body.get("upto", 0) >= self.records and self.acked_at is None:
                self.acked_at = now

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_ours(directory: Path, port: int, records: int, args) -> dict[str, float]:
    backend = make_backend(directory / "backend")
    config = make_box(directory, backend, port, records, args)
    collector = subprocess.Popen(
        [sys.executable, "-u", "-m", "backend.cli", "collect", "--dir", str(backend),
         "--broker", f"mqtt://127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV,
    )  # fmt: skip
    for line in collector.stdout:
        if line.startswith("connected"):
            break
    threading.Thread(target=lambda: collector.stdout.read(), daemon=True).start()
    observer = Observer(port, records)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "-c", str(config), "run"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=ROOT, env=ENV,
    )  # fmt: skip
    rss: list[int] = []
    collector_rss: list[int] = []
    deadline = time.monotonic() + 600
    try:
        while observer.acked_at is None and time.monotonic() < deadline:
            if daemon.poll() is not None:
                sys.exit(f"redeemd run exited with {daemon.returncode}")
            if observer.online_at is not None:
                rss.append(status_kib("VmRSS", str(daemon.pid)))
                collector_rss.append(status_kib("VmRSS", str(collector.pid)))
            time.sleep(0.05)
        hwm = status_kib("VmHWM", str(daemon.pid))
        conn = sqlite3.connect(config.parent / "redeemd.db", timeout=30)
        for _ in range(200):
            left = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            if left == 0:
                break
            time.sleep(0.05)
        conn.close()
        if observer.acked_at is None or observer.online_at is None or left:
            sys.exit(f"the drain did not finish: {left} records still in the outbox")
        stored = (
            sqlite3.connect(backend / "backend.db")
            .execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM events")
            .fetchone()
        )
        if stored != (records, 1, records):
            sys.exit(f"the collector stored {stored}, not records 1..{records}")
    finally:
        daemon.terminate()
        daemon.wait(30)
        collector.terminate()
        collector.wait(30)
        observer.close()
    return {
        "seconds": observer.acked_at - observer.online_at,
        "messages": observer.acks,
        "rss_start": rss[0] / 1024 if rss else 0.0,
        "rss_peak": max(rss, default=0) / 1024,
        "hwm": hwm / 1024,
        "collector_peak": max(collector_rss, default=0) / 1024,
    }


def run_floor(port: int, messages: int, size: int) -> float:
    done = threading.Event()
    acked = 0

    # paho's message ids are 16 bits: with more than 65,535 messages queued at once
    # they collide and PUBACKs go missing. A plain publisher keeps a bounded backlog;
    # 1000 is far above paho's in-flight window (20), so the link never waits for us.
    backlog = threading.Semaphore(1000)

    def on_publish(client, userdata, mid, reason_code, properties) -> None:
        nonlocal acked
        acked += 1
        backlog.release()
        if acked == messages:
            done.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="bench-floor", protocol=mqtt.MQTTv5
    )
    client.on_publish = on_publish
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    # Publishing before the CONNACK leaves paho to resend its whole queue on connect,
    # which is not what a plain publisher does (and stalled here with 100k messages).
    if not connected.wait(10):
        sys.exit("floor: no CONNACK from the broker")
    payload = os.urandom(size // 2).hex().encode()[:size].ljust(size, b"0")
    topic = f"{PREFIX}/demo/box/floor/events"
    started = time.perf_counter()
    for _ in range(messages):
        backlog.acquire()
        client.publish(topic, payload, qos=1)
    if not done.wait(600):
        sys.exit(f"floor: only {acked} of {messages} PUBACKs arrived")
    seconds = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours + floor")
    parser.add_argument("--max-records", type=int, default=200, help="[sync] max_records")
    parser.add_argument("--max-inflight", type=int, default=8, help="[sync] max_inflight")
    parser.add_argument("--quick", action="store_true", help="10,000 records, 1 round")
    parser.add_argument("--dir", default=None, help="where to put the databases (default /tmp)")
    args = parser.parse_args()
    records, rounds = (10_000, 1) if args.quick else (args.records, args.rounds)
    size = one_record_message_size()
    ours: list[dict[str, float]] = []
    floors: list[float] = []
    with Scratch(args.dir) as scratch:
        broker, port = start_broker(scratch)
        try:
            print(
                f"sync: drain {records:,} records (max_records {args.max_records}, "
                f"max_inflight {args.max_inflight}), {rounds} rounds, mosquitto on loopback; "
                f"database on {boxes.filesystem(scratch)}"
            )
            for n in range(rounds):
                order = ["floor", "ours"] if n % 2 == 0 else ["ours", "floor"]
                for which in order:
                    if which == "floor":
                        floors.append(run_floor(port, records, size))
                    else:
                        round_dir = scratch / f"round-{n}"
                        round_dir.mkdir()
                        ours.append(run_ours(round_dir, port, records, args))
                print(
                    f"  round {n + 1}: ours {ours[-1]['seconds']:.2f} s, floor {floors[-1]:.2f} s"
                )
        finally:
            broker.terminate()
            broker.wait(10)
    ours_s = statistics.median(o["seconds"] for o in ours)
    floor_s = statistics.median(floors)
    ours_rate, floor_rate = records / ours_s, records / floor_s
    last = ours[-1]
    print(
        f"floor  plain paho, {records:,} QoS 1 messages of {size} B to PUBACK: "
        f"{floor_s:.2f} s = {floor_rate:,.0f} msg/s"
    )
    print(
        f"ours   outbox -> redeemd run -> broker -> collect -> backend.db -> ack: "
        f"{ours_s:.2f} s = {ours_rate:,.0f} records/s in {last['messages']:.0f} messages "
        f"= {ours_rate / floor_rate:.2f}x the floor"
    )
    print(
        f"memory redeemd run RSS during the drain: {last['rss_start']:.1f} MiB at start, "
        f"peak {last['rss_peak']:.1f} MiB (VmHWM {last['hwm']:.1f} MiB); "
        f"collector peak {last['collector_peak']:.1f} MiB"
    )
    met_rate = ours_rate >= floor_rate
    met_time = records < 100_000 or ours_s * 100_000 / records < TARGET_SECONDS
    print(
        f"target throughput >= floor: {'met' if met_rate else 'NOT met'}; "
        f"100k drained in < {TARGET_SECONDS:.0f} s: "
        f"{'met' if met_time else 'NOT met'} ({ours_s * 100_000 / records:.1f} s per 100k)"
    )
    return 0 if met_rate and met_time else 1


if __name__ == "__main__":
    sys.exit(main())
