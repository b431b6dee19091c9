"""Batch import throughput (verify + apply) against a raw executemany floor.

Usage (from the repo root):

    .venv/bin/python bench/import.py                 # a 1M-code issue batch, 5 rounds
    .venv/bin/python bench/import.py --codes 2000000 --rounds 9
    .venv/bin/python bench/import.py --quick         # 100k codes, 1 round

Ours: `cards.batch.open_file` (header signature, trust chain, chunk hashes, zlib,
entries hash) then `storage.batch_import.apply` (sequence checks, one transaction of
INSERT ... ON CONFLICT for every entry, trust state, COMMIT) on a fresh box database.

Floor: plain `executemany` of the same rows as a plain INSERT in one transaction into
the same `codes` table (a fresh database opened the same way, WAL, synchronous=FULL).
The rows come straight from `struct.iter_unpack` over the already-inflated entries,
the cheapest way to get them (faster than a prebuilt list of 1M tuples, whose scattered
objects miss the CPU cache); zeros are stored as 0, which takes the same record bytes
as the NULL that apply stores. Rounds alternate which of the two runs first.

Target: ours >= 60% of the floor's codes per second.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import time

import boxes
from boxes import MERCHANT, BenchKeys, Scratch, issue_entries, write_config

from cards import batch
from cards.batch import ISSUE_ENTRY, Kind
from storage import batch_import
from storage.database import open_database

TARGET = 0.60
FLOOR_INSERT = (
    "INSERT INTO codes(digest, card_id, not_before, not_after, uses_left, balance, status) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, default=1_000_000, help="codes in the batch")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of ours + floor")
    parser.add_argument("--quick", action="store_true", help="100k codes, 1 round")
    parser.add_argument("--dir", default=None, help="where to put the databases (default /tmp)")
    args = parser.parse_args()
    count, rounds = (100_000, 1) if args.quick else (args.codes, args.rounds)

    bench_keys = BenchKeys.new()
    started = time.perf_counter()
    entries = issue_entries(count, 0)
    data = bench_keys.build(Kind.ISSUE, entries, 1)
    print(
        f"import: {count:,}-code issue batch, {len(data) / 1e6:.1f} MB signed file "
        f"(built in {time.perf_counter() - started:.1f} s), {rounds} rounds"
    )

    ours: list[tuple[float, float]] = []
    floor: list[float] = []
    with Scratch(args.dir) as scratch:
        print(f"  databases under {scratch} on {boxes.filesystem(scratch)}")
        for index in range(rounds):
            steps = (_floor_once, _ours_once) if index % 2 else (_ours_once, _floor_once)
            for step in steps:
                box_dir = scratch / f"round-{index}-{step.__name__}"
                if step is _ours_once:
                    ours.append(_ours_once(box_dir, bench_keys, data, count))
                else:
                    floor.append(_floor_once(box_dir, bench_keys, entries))

    verify = statistics.median(v for v, _ in ours)
    apply = statistics.median(a for _, a in ours)
    total = statistics.median(v + a for v, a in ours)
    raw = statistics.median(floor)
    ratio = raw / total
    print(
        f"  ours   verify {count / verify:>12,.0f} codes/s ({verify:.2f} s)  "
        f"apply {count / apply:>12,.0f} codes/s ({apply:.2f} s)"
    )
    print(f"  ours   verify + apply  {count / total:>12,.0f} codes/s ({total:.2f} s, median)")
    print(f"  floor  raw executemany {count / raw:>12,.0f} codes/s ({raw:.2f} s, median)")
    print(
        f"  ratio  {ratio:.0%} of floor (target >= {TARGET:.0%})  "
        f"{'PASS' if ratio >= TARGET else 'MISS'}"
    )
    return 0


def _ours_once(box_dir, bench_keys: BenchKeys, data: bytes, count: int) -> tuple[float, float]:
    config = write_config(box_dir.parent, bench_keys, box_dir.name)
    conn = open_database(config.box.database)
    try:
        gc.collect()
        t0 = time.perf_counter()
        parsed = batch.open_file(
            data, config.trust.root_keys, max_entries_size=config.trust.max_batch_bytes
        )
        t1 = time.perf_counter()
        result = batch_import.apply(conn, parsed, merchant=MERCHANT, now=int(time.time()))
        t2 = time.perf_counter()
    finally:
        conn.close()
    if result.count != count or result.replay:
        raise SystemExit(f"import did not apply {count} codes: {result.describe()}")
    _remove(box_dir)
    return t1 - t0, t2 - t1


def _floor_once(box_dir, bench_keys: BenchKeys, entries: bytes) -> float:
    config = write_config(box_dir.parent, bench_keys, box_dir.name)
    conn = open_database(config.box.database)  # same schema and pragmas, nothing else
    try:
        gc.collect()
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany(FLOOR_INSERT, ISSUE_ENTRY.iter_unpack(entries))
        conn.execute("COMMIT")
        t1 = time.perf_counter()
    finally:
        conn.close()
    _remove(box_dir)
    return t1 - t0


def _remove(box_dir) -> None:
    shutil.rmtree(box_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
