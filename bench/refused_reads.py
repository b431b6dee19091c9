"""What a scanner stuck sending junk costs a box per hour: ledger rows and bytes.

Usage (from the repo root):

    .venv/bin/python bench/refused_reads.py              # 3000 reads of each kind
    .venv/bin/python bench/refused_reads.py --reads 500

Every refused read is a ledger row (docs/decisions.md, "Every over-long read is
recorded"), and ledger rows are never deleted, so a scanner that keeps sending junk
costs disk for as long as nobody fixes it. Three kinds of junk go through a real Engine
on a real box database (default 2 s debounce, synchronous=FULL), one kind after the
other, from one scanner:

- over-long reads (a scanner whose terminator does not match, or one stuck in a loop):
  each arrives as `cards.normalize.OVERSIZED` and is recorded. A driver makes at most one
  per 4097 bytes received, so the line rate bounds them: the report gives rows and bytes
  per hour at 9600 baud (the default), 115200 baud, and at the engine's own ceiling (what
  a USB CDC port, which has no baud rate, could reach);
- the same junk bytes again and again (a damaged label in a presentation scanner):
  a repeat inside the debounce window is the same read, one row per streak;
- different junk every time (line noise at a wrong baud rate): each is recorded, as it
  always was; the engine's rate is the ceiling.

Bytes per row: the growth of the ledger table and its indexes (dbstat), divided by the
rows added (the outbox has been a view of the ledger since migration m006: no bytes of
its own). The ledger row stays after the backend acknowledges it. Also shown: the JSON size of one record on the wire.
"""

from __future__ import annotations

import argparse
import json
import time

import boxes
from boxes import Scratch, build_cache

from cards.normalize import OVERSIZED
from cards.scan import Scan
from daemon.engine import Engine
from storage import ledger
from storage.database import open_database

LINE_BYTES_PER_SECOND = {
    # The likely fault: a presentation scanner re-reading a label in view 10 times a
    # second (an EAN-13 and its TAB, 14 bytes), with a terminator the box does not take.
    "a label re-read 10 times a second": 140,
    "9600 baud, the line full": 960,
    "115200 baud, the line full": 11_520,
    # What a broken USB CDC device could push (USB full speed, bulk transfers).
    "USB full speed, about 1 MB/s": 1_000_000,
}
OVERSIZED_BYTES = 4097  # the least a driver must receive to hand on one OVERSIZED read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=3000, help="reads of each kind")
    parser.add_argument("--dir", default=None, help="where to put the database (default /tmp)")
    args = parser.parse_args()
    with Scratch(args.dir) as scratch:
        cache = build_cache(scratch, 1000, 0)
        conn = open_database(cache.path)
        engine = Engine(conn, cache.config)
        print(
            f"refused reads: {args.reads} of each kind, debounce {cache.config.scan.debounce:g} s"
        )
        print(f"  database under {scratch} on {boxes.filesystem(scratch)}")
        kinds = {
            "over-long reads": lambda i: OVERSIZED,
            "the same junk again": lambda i: b"\x01JUNK",
            "different junk each time": lambda i: b"\x01JUNK-%d" % i,
        }
        for label, make in kinds.items():
            rows, size, seconds = _run(engine, conn, args.reads, make)
            rate = args.reads / seconds
            per_row = size / rows if rows else 0
            print(f"  {label}: {rows} row(s) for {args.reads} reads")
            if rows == 1:
                print("    one row per streak of repeats, however long it lasts")
                continue
            print(f"    {per_row:.0f} bytes/row (ledger and its indexes)")
            print(f"    engine ceiling {rate:,.0f} reads/s = {_hourly(rows / seconds, per_row)}")
            if make(0) == OVERSIZED:
                for line, speed in LINE_BYTES_PER_SECOND.items():
                    limit = speed / OVERSIZED_BYTES
                    print(f"    at {line}: {_hourly(limit, per_row)}")
        record = ledger.by_id(conn, conn.execute("SELECT id FROM ledger LIMIT 1").fetchone()[0])
        assert record is not None
        wire = len(json.dumps(record.to_json(), separators=(",", ":")))
        print(f"  one refused record on the wire: {wire} bytes of JSON")
        conn.close()
    return 0


def _run(engine: Engine, conn, reads: int, make) -> tuple[int, int, float]:
    rows_before, bytes_before = _ledger_size(conn)
    started = time.perf_counter()
    for index in range(reads):
        engine.handle(Scan(make(index), "stuck"))
    seconds = time.perf_counter() - started
    rows_after, bytes_after = _ledger_size(conn)
    return rows_after - rows_before, bytes_after - bytes_before, seconds


def _ledger_size(conn) -> tuple[int, int]:
    """Ledger rows, and the bytes of the ledger and its indexes."""
    rows = conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    names = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE tbl_name IN ('ledger', 'outbox')"
        )
    ]
    marks = ", ".join("?" * len(names))
    size = conn.execute(f"SELECT SUM(pgsize) FROM dbstat WHERE name IN ({marks})", names)
    return rows, size.fetchone()[0] or 0


def _hourly(per_second: float, bytes_per_row: float) -> str:
    rows = per_second * 3600
    size = rows * bytes_per_row
    shown = f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:,.0f} kB"
    return f"{rows:,.0f} rows/hour, {shown}/hour"


if __name__ == "__main__":
    raise SystemExit(main())
