"""A fleet on one machine: N boxes running the real box code against a real Mosquitto, a
real PostgreSQL and two real collectors (issue 14 item 4).

Usage (from the repo root):

    .venv/bin/python bench/fleet.py                  # 1000 boxes
    .venv/bin/python bench/fleet.py --boxes 200 --quick

Each box is its own SQLite database (a copy of one template that already holds the demo
cards and every code the run scans, imported once with `redeemd import`), an `Engine`
that redeems scans and writes the ledger, and a `Sync` (session, outbox pump, batch
intake) to the broker: the code `redeemd run` runs, without the scanner drivers. The
boxes live in a few worker processes (a thread per Sync and per paho loop; one process
per core), so the Python interpreter is not the bottleneck of a 2-core machine.

The backend is what production runs: `redeemd-backend collect` twice (one shared
subscription) and `redeemd-backend publish`, with $REDEEMD_BACKEND_DATABASE naming a
PostgreSQL started for the run (tests/postgres.py), boxes registered with
`redeemd-backend box add`. The only instrument added: a column `bench_inserted_ms` on
the run's own events table, defaulting to clock_timestamp() at INSERT, for scan-to-commit
latency (the store's stored_at is in whole seconds).

Scenarios, in order (each prints its figures, the floor measured in this run, the target):
  steady   every box scans one code every --interval s (jittered); records/s stored,
           latency scan -> row inserted in PostgreSQL p50/p99. Floor: COPY of as many
           rows into a copy of the events table, and plain paho QoS 1 to PUBACK.
  fanout   one new issue batch of --fanout-codes codes; time until `redeemd-backend
           boxes --json` shows every box at its cache_seq.
  herd     the broker stops, every box scans 100 codes, the broker starts again: time
           until every record is stored and every outbox empty, peak connections/s
           (the broker log's "New client connected" lines per second).
  faults   steady scanning while one collector is killed (SIGKILL) and restarted, then
           PostgreSQL is killed (SIGKILL) and restarted; drained afterwards.
  check    every box's ledger against the events table: 0 lost, 0 stored twice.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

# The project before this folder: bench/drivers.py must not shadow the drivers package
# (boxes.py puts the root first only when $PYTHONPATH does not already hold it).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boxes as bench_boxes  # noqa: E402
from boxes import ROOT, Scratch, percentile  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import psycopg  # noqa: E402
from postgres import PostgreSQL  # noqa: E402

from backend.keystore import Keystore  # noqa: E402
from backend.store import DATABASE_ENV, Store  # noqa: E402
from cards import keys  # noqa: E402
from sync.worker import TICK  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MERCHANT = bench_boxes.MERCHANT
HERD_RECORDS = 100
# paho's network loop waits in select(), which takes no descriptor above 1023; a box
# holds about 8 (two SQLite connections with their -wal and -shm, the socket, paho's
# wake-up pipe), so 250 boxes in one process reconnected forever (found at 1000 boxes).
BOXES_PER_WORKER = 100
TARGET_HERD_S = 60.0
TARGET_FANOUT_S = 60.0
TARGET_INGEST = 0.5


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------- broker


class Broker:
    """Mosquitto on a fixed free port, logging connections, keeping retained messages
    across a restart as a production broker with persistence does."""

    def __init__(self, directory: Path):
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            sys.exit("bench/fleet.py needs mosquitto: run 'sudo apt-get install mosquitto'")
        self.port = bench_sync.free_port()
        self.log = directory / "mosquitto.log"
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {directory}/\n"
            f"log_dest file {self.log}\nlog_type notice\nlog_timestamp true\n"
            f"connection_messages true\nmax_queued_messages 10000\n"
            f"user {os.environ.get('USER') or 'root'}\n"
        )
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stderr=subprocess.DEVNULL
        )
        import socket

        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit("mosquitto did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def connects_per_second(self, since: float) -> list[int]:
        """Connections accepted per second from `since` (epoch s), from the log."""
        per: collections.Counter[int] = collections.Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            stamp, _, rest = line.partition(": ")
            new = rest.startswith("New client connected")
            if new and stamp.isdigit() and int(stamp) >= int(since):
                per[int(stamp)] += 1
        return [per[s] for s in sorted(per)]


def load_bench_sync():
    """bench/sync.py (its free_port and plain-paho floor), loaded under another name:
    `sync` is the project's package."""
    spec = importlib.util.spec_from_file_location("bench_sync", ROOT / "bench" / "sync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_sync = load_bench_sync()


# ---------------------------------------------------------------------- backend


def backend_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600,
    )  # fmt: skip
    if check and result.returncode != 0:
        sys.exit(f"redeemd-backend {args[0]} failed: {result.stderr[-2000:]}")
    return result


class Backend:
    """Keys, the store on PostgreSQL, the collectors and the publisher."""

    def __init__(self, directory: Path, broker: Broker, url: str):
        self.dir = directory
        self.broker = broker
        self.url = url
        store = Keystore(directory)
        store.generate()
        now = int(time.time())
        store.save_delegation(
            keys.delegate(
                store.private("root"), store.public("issuer"), (MERCHANT,), now - 60, now + 86400
            )
        )
        # Creates the schema; then the one instrument (see the module docstring).
        Store.open(directory).close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "ALTER TABLE events ADD COLUMN bench_inserted_ms BIGINT "
                "DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint"
            )
        self.collectors: list[subprocess.Popen | None] = [None, None]
        self.publisher: subprocess.Popen | None = None

    def issue(self, kind: str, source: Path) -> Path:
        out = self.dir / f"{kind}-{time.monotonic_ns()}.rdb"
        backend_cli(
            "issue", "--dir", str(self.dir), "--merchant", MERCHANT, "--kind", kind,
            "--input", str(source), "--out", str(out), "--expires-days", "30",
        )  # fmt: skip
        return out

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 (the child holds it)
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "backend.cli", *args, "--dir", str(self.dir),
             "--broker", self.broker.url],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV,
        )  # fmt: skip
        log.close()
        return process

    def start_collector(self, n: int) -> None:
        before = self._connected_lines(f"collect-{n}")
        self.collectors[n] = self._spawn(f"collect-{n}", "collect")
        wait(lambda: self._connected_lines(f"collect-{n}") > before, f"collector {n} connected")

    def kill_collector(self, n: int) -> None:
        process = self.collectors[n]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        self.collectors[n] = None

    def start_publisher(self) -> None:
        self.publisher = self._spawn("publish", "publish", "--poll", "0.5s")

    def _connected_lines(self, name: str) -> int:
        path = self.dir / f"{name}.log"
        if not path.exists():
            return 0
        return sum(line.startswith("connected") for line in path.read_text().splitlines())

    def stop(self) -> None:
        for process in [*self.collectors, self.publisher]:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(30)

    def query(self, sql: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, args).fetchall()

    def execute(self, sql: str, *args: object) -> None:
        with psycopg.connect(self.url) as conn:
            conn.execute(sql, args)

    def boxes_json(self) -> list[dict]:
        result = backend_cli("boxes", "--dir", str(self.dir), "--json", check=False)
        if result.returncode != 0:
            return []
        return json.loads(result.stdout)["boxes"]


def wait(
    condition, what: str, timeout: float = 300.0, every: float = 0.2, give_up: bool = True
) -> float:
    """Poll until `condition()`; the seconds it took. On timeout, exits the bench, or
    with give_up=False says so and returns the seconds waited."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            if give_up:
                sys.exit(f"timed out after {timeout:.0f} s waiting for {what}")
            say(f"  timed out after {timeout:.0f} s waiting for {what}")
            break
        time.sleep(every)
    return time.monotonic() - started


# ---------------------------------------------------------------------- CPU


class CpuMeter:
    """CPU seconds each part of the run used during a phase, from /proc/<pid>/stat: the
    measured reason when a fleet of 1000 boxes on 2 cores misses a target (who had the
    cores). A process killed during the phase takes its seconds with it."""

    def __init__(self, fleet: Fleet, backend: Backend, broker: Broker, server: PostgreSQL):
        self.fleet, self.backend, self.broker, self.server = fleet, backend, broker, server
        self.tick = os.sysconf("SC_CLK_TCK")

    def _groups(self) -> dict[str, list[int]]:
        postmaster = self.server.pid
        postgres = [postmaster] if postmaster else []
        if postmaster:
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and self._parent(int(entry.name)) == postmaster:
                    postgres.append(int(entry.name))
        broker = self.broker.process
        return {
            "boxes": [p.pid for p in self.fleet.processes if p.pid],
            "collectors": [p.pid for p in self.backend.collectors if p is not None],
            "publisher": [self.backend.publisher.pid] if self.backend.publisher else [],
            "PostgreSQL": postgres,
            "mosquitto": [broker.pid] if broker is not None else [],
        }

    @staticmethod
    def _parent(pid: int) -> int | None:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def _seconds(self, pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime

    def snapshot(self) -> tuple[float, dict[str, dict[int, float]]]:
        return time.monotonic(), {
            group: {pid: self._seconds(pid) for pid in pids}
            for group, pids in self._groups().items()
        }

    def say_since(self, before: tuple[float, dict[str, dict[int, float]]]) -> None:
        began, old = before
        now, new = self.snapshot()
        wall = now - began
        used = {
            group: sum(t - old.get(group, {}).get(pid, 0.0) for pid, t in pids.items())
            for group, pids in new.items()
        }
        parts = ", ".join(f"{group} {seconds:.0f}" for group, seconds in used.items())
        cores = os.cpu_count() or 1
        say(
            f"  cpu    CPU-s used: {parts}; {sum(used.values()):.0f} of the {wall * cores:.0f} "
            f"the {cores} cores had in {wall:.0f} s"
        )


# ---------------------------------------------------------------------- boxes


def code(box: int, n: int) -> str:
    """The n-th code box number `box` scans (each box its own: no double redemptions)."""
    return f"F{box:05d}-{n:04d}"


def box_id(box: int) -> str:
    return f"fleet-{box:05d}"


def _apply_one_box_at_a_time() -> None:
    """Batch applies in this worker take turns: a simulation measure, not a box's.

    A box applies a batch alone on its own CPU. A hundred boxes in one process applying
    a 100,000-code batch at once each run executemany, which gives the interpreter lock
    up around every row's sqlite3_step: a hundred threads handing it to each other per
    row spent 1,640 CPU-seconds, mostly in the kernel, and not one box finished in 900 s
    (measured). In turns, each apply runs at the speed it has on a box."""
    import threading

    import storage.batch_import as batch_import

    turns = threading.Lock()
    apply = batch_import.apply

    def apply_in_turn(*args, **kwargs):
        with turns:
            return apply(*args, **kwargs)

    batch_import.apply = apply_in_turn


def worker(pipe: Connection, assigned: list[tuple[int, str]], tick: float | None) -> None:
    """One worker process: the boxes `assigned` ((number, config path) each), each an
    Engine and a Sync, driven by commands from the bench over `pipe`. `tick` replaces
    the sync thread's idle poll period (sync.worker.TICK) when not the box's own."""
    logging.basicConfig(level=logging.ERROR)
    import sync.worker as sync_worker

    if tick is not None:
        sync_worker.TICK = tick
    _apply_one_box_at_a_time()
    from cards.scan import Scan
    from daemon import config as config_mod
    from daemon.engine import Engine
    from storage.database import open_database
    from sync.worker import Sync

    engines: dict[int, Engine] = {}
    syncs: dict[int, Sync] = {}
    counters: dict[int, int] = {}
    for number, path in assigned:
        config = config_mod.load(path)
        engines[number] = Engine(open_database(config.box.database), config)
        syncs[number] = Sync(
            config.sync, box=config.box.id, merchant=config.box.merchant,
            database=config.box.database, roots=config.trust.root_keys,
            max_batch_bytes=config.trust.max_batch_bytes,
        )  # fmt: skip
        counters[number] = 0

    def scan(number: int) -> None:
        counters[number] += 1
        engines[number].handle(Scan(code(number, counters[number]).encode(), "counter"))
        syncs[number].wake()  # as redeemd run does after each committed scan

    for sync in syncs.values():
        # A few ms apart, as boxes booting at different times: hundreds of connects in
        # one instant from one process starve each other's threads of the interpreter.
        sync.start()
        time.sleep(0.01)
    pipe.send("ready")
    while True:
        command, *args = pipe.recv()
        if command == "state":
            states = [s.state() for s in syncs.values()]
            pipe.send(
                {
                    "connected": sum(s.connected for s in states),
                    "depth": sum(s.outbox_depth or 0 for s in states),
                    "unknown_depth": sum(s.outbox_depth is None for s in states),
                    "min_cache_seq": min((s.cache_seq or 0) for s in states),
                    "empty": sum(s.outbox_depth == 0 for s in states),
                }
            )
        elif command == "burst":
            (per_box,) = args

            def scans(number: int, per_box: int = per_box) -> None:
                # The burst only fills the outboxes for the herd; the time it takes is
                # not measured, so its commits skip the fsync (synchronous=FULL per scan
                # would take a minute for 200 boxes on this disk).
                conn = engines[number].conn
                conn.execute("PRAGMA synchronous = OFF")
                for _ in range(per_box):
                    scan(number)
                conn.execute("PRAGMA synchronous = FULL")

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(scans, list(engines)))
            pipe.send(per_box * len(engines))
        elif command == "steady":
            seconds, interval = args
            pipe.send(steady(engines, scan, seconds, interval))
        elif command == "ledger":
            out = {}
            for number, engine in engines.items():
                rows = engine.conn.execute("SELECT seq, id FROM ledger ORDER BY seq").fetchall()
                out[box_id(number)] = [(seq, str(uuid.UUID(bytes=rid))) for seq, rid in rows]
            pipe.send(out)
        elif command == "stop":
            for sync in syncs.values():
                sync.thread.stopping.set()
            for sync in syncs.values():
                sync.stop()
            for engine in engines.values():
                engine.conn.close()
            pipe.send("stopped")
            return


def steady(engines: dict, scan, seconds: float, interval: float) -> dict[str, float]:
    """Every box scans once per `interval` s (each first at a random offset, then
    jittered by +-20%) for `seconds`; how many scans and how late the worst one was."""
    rng = random.Random(os.getpid())
    started = time.monotonic()
    due = sorted((started + rng.uniform(0, interval), n) for n in engines)
    import heapq

    heapq.heapify(due)
    scans, late = 0, 0.0
    while due:
        at, number = due[0]
        if at > started + seconds:
            break
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        heapq.heappop(due)
        late = max(late, time.monotonic() - at)
        scan(number)
        scans += 1
        heapq.heappush(due, (at + interval * rng.uniform(0.8, 1.2), number))
    return {"scans": scans, "late": late}


class Fleet:
    """The worker processes and what they report together."""

    def __init__(self, configs: list[tuple[int, str]], processes: int, tick: float | None):
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.processes = []
        for k in range(processes):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=worker, args=(child, configs[k::processes], tick), daemon=True
            )
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)
        for pipe in self.pipes:
            if pipe.recv() != "ready":
                sys.exit("a worker failed to start")

    def ask(self, *command: object) -> list:
        for pipe in self.pipes:
            pipe.send(command)
        return [pipe.recv() for pipe in self.pipes]

    def state(self) -> dict[str, int]:
        states = self.ask("state")
        return {
            "connected": sum(s["connected"] for s in states),
            "depth": sum(s["depth"] for s in states),
            "unknown_depth": sum(s["unknown_depth"] for s in states),
            "min_cache_seq": min(s["min_cache_seq"] for s in states),
            "empty": sum(s["empty"] for s in states),
        }

    def ledgers(self) -> dict[str, list[tuple[int, str]]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for part in self.ask("ledger"):
            out.update(part)
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("stop")
        for process in self.processes:
            process.join(30)


# ---------------------------------------------------------------------- scenarios


def floor_copy(backend: Backend, rows: int) -> float:
    """Rows/s of one COPY of `rows` event-like rows into a copy of the events table
    (same columns and indexes), one transaction: PostgreSQL's raw storage floor."""
    now_ms = int(time.time() * 1000)
    raw = json.dumps({"v": 1, "pad": "x" * 300})
    columns = (
        "id, merchant, box, seq, at_ms, digest, card_id, action, verdict, uses, raw, stored_at"
    )
    with psycopg.connect(backend.url) as conn:
        conn.execute("DROP TABLE IF EXISTS floor_events")
        conn.execute("CREATE TABLE floor_events (LIKE events INCLUDING ALL)")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY floor_events ({columns}) FROM STDIN") as copy:
            for n in range(rows):
                copy.write_row(
                    (str(uuid.uuid4()), MERCHANT, box_id(n % 1000), n, now_ms,
                     os.urandom(16).hex(), 1, "redeem", "accepted", 1, raw, now_ms // 1000)
                )  # fmt: skip
        conn.commit()
        seconds = time.perf_counter() - started
        conn.execute("DROP TABLE floor_events")
        conn.commit()
    return rows / seconds


def drained(fleet: Fleet, backend: Backend, expected: int):
    def done() -> bool:
        state = fleet.state()
        if state["depth"] or state["unknown_depth"]:
            return False
        return backend.query("SELECT COUNT(*) FROM events")[0][0] >= expected

    return done


def scenario_steady(
    fleet: Fleet, backend: Backend, args, stored_before: int, meter: CpuMeter
) -> float:
    say(f"steady: {args.boxes} boxes, one scan every {args.interval:g} s each, {args.steady:g} s")
    began_ms = int(time.time() * 1000)
    cpu = meter.snapshot()
    results = fleet.ask("steady", args.steady, args.interval)
    ended_ms = int(time.time() * 1000)
    scans = sum(r["scans"] for r in results)
    wait(drained(fleet, backend, stored_before + scans), "the steady-state records stored")
    meter.say_since(cpu)
    rows = backend.query(
        "SELECT at_ms, bench_inserted_ms FROM events WHERE at_ms >= %s AND at_ms <= %s",
        began_ms,
        ended_ms,
    )
    latencies = [(inserted - at) / 1000 for at, inserted in rows]
    in_window = backend.query(
        "SELECT COUNT(*) FROM events WHERE bench_inserted_ms BETWEEN %s AND %s", began_ms, ended_ms
    )[0][0]
    rate = in_window / ((ended_ms - began_ms) / 1000)
    offered = args.boxes / args.interval
    say(
        f"  ours   {scans:,} scans, {rate:,.0f} records/s stored (offered {offered:,.0f}/s); "
        f"latency scan -> row in PostgreSQL p50 {percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.0f} ms; workers' worst lateness "
        f"{max(r['late'] for r in results) * 1000:.0f} ms"
    )
    floor = floor_copy(backend, max(scans, 20_000))
    say(f"  floor  COPY of {max(scans, 20_000):,} event rows into PostgreSQL: {floor:,.0f} rows/s")
    size = bench_sync.one_record_message_size()
    messages = 10_000 if args.quick else 50_000
    seconds = bench_sync.run_floor(backend.broker.port, messages, size)
    say(
        f"  floor  plain paho, {messages:,} QoS 1 messages of {size} B: {messages / seconds:,.0f}/s"
    )
    say(
        f"  (steady ingest is the offered load, {offered / floor:.1%} of the COPY floor; the "
        "ingest target is judged on the herd's drain, where the boxes send all they can)"
    )
    return floor


def scenario_fanout(fleet: Fleet, backend: Backend, args, scratch: Path, meter: CpuMeter) -> None:
    codes = scratch / "fanout.csv"
    codes.write_text(
        "code,card_id\n" + "".join(f"FAN-{i:07d},1\n" for i in range(args.fanout_codes))
    )
    seq = backend.query("SELECT MAX(seq) FROM batches")[0][0] + 1
    say(f"fanout: one issue batch of {args.fanout_codes:,} codes (seq {seq}) to {args.boxes} boxes")
    started = time.monotonic()
    cpu = meter.snapshot()
    backend.issue("issue", codes)
    issued = time.monotonic() - started

    def every_box_at_seq() -> bool:
        rows = backend.boxes_json()
        return len(rows) == args.boxes and all((r.get("cache_seq") or 0) >= seq for r in rows)

    # Not the bench's usual exit on timeout: a fleet that takes longer still has figures
    # to give (how many boxes got there, and how fast they went).
    seconds = wait(
        every_box_at_seq, f"every box at cache_seq {seq}", timeout=args.fanout_timeout,
        every=1.0, give_up=False,
    )  # fmt: skip
    meter.say_since(cpu)
    at_seq = sum((r.get("cache_seq") or 0) >= seq for r in backend.boxes_json())
    state = fleet.state()
    met = "met" if seconds < TARGET_FANOUT_S else "NOT met"
    say(
        f"  ours   every box's status at cache_seq {seq} {seconds:.1f} s after the issue "
        f"command returned ({issued:.1f} s to sign it); boxes' own min cache_seq "
        f"{state['min_cache_seq']}"
    )
    say(f"  target < {TARGET_FANOUT_S:.0f} s: {met}")
    say(f"  check  boxes at the new cache_seq: {at_seq} of {args.boxes}")


def scenario_herd(
    fleet: Fleet, backend: Backend, broker: Broker, args, floor: float, meter: CpuMeter
) -> None:
    say(
        f"herd: collectors paused (SIGSTOP), {HERD_RECORDS} records scanned on each box, "
        "broker restarted, collectors resumed"
    )
    # Paused, not stopped: the records wait on the boxes (sent, never acked) while the
    # collectors stay the same processes, and the restart is a short one, as a broker
    # upgrade is. A broker down for the whole burst would measure how far the boxes'
    # backoff grew instead (up to its 60 s cap).
    before = backend.query("SELECT COUNT(*) FROM events")[0][0]
    paused = [p for p in backend.collectors if p is not None]
    for process in paused:
        process.send_signal(signal.SIGSTOP)
    burst_started = time.monotonic()
    fleet.ask("burst", HERD_RECORDS)
    burst = time.monotonic() - burst_started
    records = HERD_RECORDS * args.boxes
    broker.stop()
    restarted_at = time.time()
    broker.start()
    cpu = meter.snapshot()
    started = time.monotonic()
    for process in paused:
        process.send_signal(signal.SIGCONT)
    connected = wait(lambda: fleet.state()["connected"] == args.boxes, "every box reconnected")
    wait(drained(fleet, backend, before + records), "the herd drained")
    seconds = time.monotonic() - started
    meter.say_since(cpu)
    state = fleet.state()
    per_second = broker.connects_per_second(restarted_at)
    rate = records / seconds
    scaled = seconds * 100_000 / records
    met = "met" if scaled < TARGET_HERD_S else "NOT met"
    say(f"  (the {records:,} scans took {burst:.1f} s, committed without fsync)")
    say(
        f"  ours   {records:,} records drained in {seconds:.1f} s from the broker's start = "
        f"{rate:,.0f} records/s ({rate / floor:.1%} of the COPY floor); every box reconnected "
        f"after {connected:.1f} s; peak {max(per_second, default=0)} connections/s, "
        f"{sum(per_second)} connections"
    )
    say(f"  target 100,000 records < {TARGET_HERD_S:.0f} s: {met} ({scaled:.1f} s per 100,000)")
    say(
        f"  target ingest >= {TARGET_INGEST:.0%} of the COPY floor: "
        f"{'met' if rate >= TARGET_INGEST * floor else 'NOT met'} ({rate / floor:.1%})"
    )
    say(f"  check  boxes drained: {state['empty']} of {args.boxes}")


def scenario_faults(fleet: Fleet, backend: Backend, server: PostgreSQL, args) -> None:
    import threading

    say("faults: steady scanning while collector 1 and then PostgreSQL are killed and restarted")
    results: list = []
    runner = threading.Thread(
        target=lambda: results.append(fleet.ask("steady", args.faults, args.interval))
    )
    runner.start()
    time.sleep(args.faults / 5)
    backend.kill_collector(1)
    say("  collector 1 killed (SIGKILL)")
    time.sleep(args.faults / 10)
    backend.start_collector(1)
    say("  collector 1 restarted")
    time.sleep(args.faults / 10)
    server.kill()
    say("  PostgreSQL killed (SIGKILL to the postmaster and its backends)")
    time.sleep(args.faults / 10)
    server.start()
    say("  PostgreSQL restarted")
    runner.join()
    scans = sum(r["scans"] for r in results[0])
    total = sum(len(v) for v in fleet.ledgers().values())
    seconds = wait(drained(fleet, backend, total), "the records after the faults stored")
    say(f"  ours   {scans:,} scans during the faults; drained {seconds:.1f} s after the last")


def check(fleet: Fleet, backend: Backend, args) -> bool:
    ledgers = fleet.ledgers()
    stored = backend.query("SELECT box, seq, id FROM events")
    by_id: dict[str, tuple[str, int]] = {}
    twice = 0
    for box, seq, rid in stored:
        if rid in by_id:
            twice += 1
        by_id[rid] = (box, seq)
    per_box_seq = collections.Counter((box, seq) for box, seq, _ in stored)
    twice += sum(n - 1 for n in per_box_seq.values() if n > 1)
    lost = 0
    mismatched = 0
    for box, rows in ledgers.items():
        for seq, rid in rows:
            where = by_id.get(rid)
            if where is None:
                lost += 1
            elif where != (box, seq):
                mismatched += 1
    expected = sum(len(v) for v in ledgers.values())
    foreign = len(stored) - (expected - lost)
    state = fleet.state()
    say(
        f"check: {expected:,} ledger records on {len(ledgers)} boxes, {len(stored):,} rows in "
        f"PostgreSQL"
    )
    say(
        f"  lost {lost}, stored twice {twice}, wrong box or seq {mismatched}, not in any ledger {foreign}"
    )
    say(f"  boxes with an empty outbox: {state['empty']} of {args.boxes}")
    return (
        lost == 0 and twice == 0 and mismatched == 0 and foreign == 0
        and state["empty"] == args.boxes
    )  # fmt: skip


# ---------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="short phases, small batch")
    parser.add_argument(
        "--workers",
        type=int,
        help=f"worker processes (default: one per {BOXES_PER_WORKER} boxes, at least one per core)",
    )
    parser.add_argument("--interval", type=float, default=5.0, help="s between a box's scans")
    parser.add_argument("--steady", type=float, default=60.0, help="steady-state seconds")
    parser.add_argument("--faults", type=float, default=40.0, help="fault phase seconds")
    parser.add_argument("--fanout-codes", type=int, default=100_000)
    parser.add_argument(
        "--fanout-timeout", type=float, default=900.0, help="s to wait for every box at the new seq"
    )
    parser.add_argument(
        "--request-retry",
        default="30s",
        help="the boxes' [sync] request_retry: how long an unacked record waits before it "
        "is sent again (default 30s, the box's default; --quick: 5s)",
    )
    parser.add_argument(
        "--tick",
        type=float,
        default=None,
        help="the sync thread's idle poll period in s (sync.worker.TICK; default the "
        "box's own, 1 s: a box wakes its sync thread after each committed scan)",
    )
    parser.add_argument("--dir", default=None, help="where to put the databases (default /tmp)")
    args = parser.parse_args()
    if args.workers is None:
        args.workers = max(os.cpu_count() or 2, math.ceil(args.boxes / BOXES_PER_WORKER))
    if args.quick:
        args.steady, args.faults, args.fanout_codes = 10.0, 10.0, 10_000
        args.request_retry = "5s"
    per_box = int((args.steady + args.faults) / args.interval * 1.3) + HERD_RECORDS + 5
    started = time.monotonic()
    with Scratch(args.dir) as scratch:
        server = PostgreSQL().start()
        broker = Broker(scratch)
        broker.start()
        fleet: Fleet | None = None
        backend: Backend | None = None
        try:
            url = server.create_database("fleet")
            os.environ[DATABASE_ENV] = url
            ENV[DATABASE_ENV] = url
            backend = Backend(scratch / "backend", broker, url)
            say(
                f"fleet: {args.boxes} boxes in {args.workers} worker processes, mosquitto and "
                f"PostgreSQL on loopback, 2 collectors; boxes' request_retry {args.request_retry}, "
                f"sync tick {args.tick if args.tick is not None else TICK:g} s"
                " (woken after each scan); "
                f"{os.cpu_count()} cores; "
                f"databases on {bench_boxes.filesystem(scratch)}"
            )
            csv = scratch / "codes.csv"
            with csv.open("w") as out:
                out.write("code,card_id\n")
                for number in range(args.boxes):
                    out.writelines(f"{code(number, n)},1\n" for n in range(1, per_box + 1))
            cards = backend.issue("cards", ROOT / "backend/demo/cards.json")
            issue = backend.issue("issue", csv)
            # Each box: its own id and directory, the backend's keys, [sync] to the broker.
            sync = {"broker": broker.url, "request_retry": args.request_retry}
            template = bench_boxes.write_box_config(
                scratch / "template", backend.dir, box_id="template", sync=sync
            )
            done = subprocess.run(
                [sys.executable, "-m", "daemon.cli", "-c", str(template), "import",
                 str(cards), str(issue)],
                capture_output=True, text=True, cwd=ROOT, env=ENV,
            )  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"redeemd import failed: {done.stderr[-2000:]}")
            configs = []
            for number in range(args.boxes):
                directory = scratch / "boxes" / box_id(number)
                config = bench_boxes.write_box_config(
                    directory, backend.dir, box_id=box_id(number), sync=sync
                )
                configs.append((number, str(config)))
                shutil.copyfile(template.parent / "redeemd.db", directory / "redeemd.db")
            backend_cli(
                "box", "add", "--dir", str(backend.dir), "--merchant", MERCHANT,
                *(box_id(n) for n in range(args.boxes)),
            )  # fmt: skip
            say(
                f"  set up in {time.monotonic() - started:.1f} s: {args.boxes * per_box:,} codes "
                f"in each box's cache ({per_box} per box)"
            )
            # The boxes hold these two batches from the template (a fleet provisioned
            # from file); a publisher would otherwise send the issue batch, one chunk
            # per ~64 KiB of its codes, to every box, which drops it as already applied:
            # gigabytes through the broker at 1000 boxes, before anything is measured.
            backend.execute("UPDATE batches SET published_at = 1 WHERE merchant = %s", MERCHANT)
            fleet = Fleet(configs, args.workers, args.tick)
            backend.start_collector(0)
            backend.start_collector(1)
            backend.start_publisher()
            connected = wait(
                lambda: fleet.state()["connected"] == args.boxes, "every box connected"
            )
            say(f"  every box connected {connected:.1f} s after the workers were up")
            meter = CpuMeter(fleet, backend, broker, server)
            floor = scenario_steady(fleet, backend, args, 0, meter)
            scenario_fanout(fleet, backend, args, scratch, meter)
            scenario_herd(fleet, backend, broker, args, floor, meter)
            scenario_faults(fleet, backend, server, args)
            ok = check(fleet, backend, args)
            say(f"total {time.monotonic() - started:.0f} s")
            return 0 if ok else 1
        finally:
            if fleet is not None:
                fleet.stop()
            if backend is not None:
                backend.stop()
            broker.stop()
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
