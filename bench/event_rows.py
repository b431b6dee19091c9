"""What one stored ledger record costs the backend on PostgreSQL: bytes on disk (table,
TOAST and indexes), WAL bytes, and records per commit, for docs/operations.md's sizing.

Usage (from the repo root):

    .venv/bin/python bench/event_rows.py                    # 100,000 records
    .venv/bin/python bench/event_rows.py --records 20000 --boxes 50

Records go through `backend.store.Store.store_messages` as the collector stores them:
messages of --per-message records (the box's `[sync] max_records`, default 200), up to
--per-commit messages in one commit (the collector takes up to 64 waiting messages),
each record shaped as a box writes it (docs/protocol.md 16.3: a redemption with its
digest, every member present). PostgreSQL is a private server started for the run
(tests/postgres.py), so the sizes are those of a fresh, never-vacuumed table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from boxes import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from postgres import PostgreSQL  # noqa: E402

from backend.events import parse_message  # noqa: E402
from backend.store import Store  # noqa: E402
from storage.ledger import new_id  # noqa: E402

MERCHANT = "demo"


def message(box: str, first_seq: int, count: int, at_ms: int) -> bytes:
    """One events message of `count` redemptions, as a box sends it."""
    records = [
        {
            "seq": seq,
            "id": new_id()[1],
            "at_ms": at_ms + seq,
            "box": box,
            "merchant": MERCHANT,
            "store": "store-0042",
            "digest": os.urandom(16).hex(),
            "card_id": 1,
            "action": "redeem",
            "uses": 1,
            "amount": None,
            "uses_left": 0,
            "balance": None,
            "verdict": "accepted",
            "reason": None,
            "source": "front",
            "symbology": "]Q1",
            "operator": None,
            "cache_seq": 12,
            "reverses": None,
        }  # fmt: skip
        for seq in range(first_seq, first_seq + count)
    ]
    return json.dumps({"v": 1, "box": box, "records": records}, separators=(",", ":")).encode()


def relation_sizes(store: Store) -> dict[str, int]:
    sql = (
        "SELECT pg_relation_size('events'), pg_table_size('events'), "
        "pg_indexes_size('events'), pg_total_relation_size('events'), "
        "pg_total_relation_size('boxes'), pg_current_wal_lsn() - '0/0'::pg_lsn"
    )
    row = store.engine.execute(sql).fetchone()
    keys = ("heap", "table", "indexes", "total", "boxes", "wal")
    return dict(zip(keys, (int(v) for v in row), strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--per-message", type=int, default=200, help="[sync] max_records")
    parser.add_argument("--per-commit", type=int, default=64, help="messages per commit")
    args = parser.parse_args()

    server = PostgreSQL().start()
    try:
        url = server.create_database()
        with tempfile.TemporaryDirectory(prefix="redeemd-bench-") as scratch:
            store = Store.open(Path(scratch), url)
            try:
                boxes = [f"box-{n:05d}" for n in range(args.boxes)]
                store.add_boxes(MERCHANT, boxes)
                server_version = store.engine.execute("SHOW server_version").fetchone()[0]
                before = relation_sizes(store)
                per_box = args.records // args.boxes
                at_ms = int(time.time() * 1000)
                pending: list[tuple[str, str, list]] = []
                commits = stored = 0
                started = time.perf_counter()
                for first in range(1, per_box + 1, args.per_message):
                    count = min(args.per_message, per_box - first + 1)
                    for box in boxes:
                        body = message(box, first, count, at_ms)
                        events = parse_message(body, merchant=MERCHANT, box=box)
                        pending.append((MERCHANT, box, events))
                        if len(pending) == args.per_commit:
                            stored += sum(s.new for s in store.store_messages(pending))
                            commits += 1
                            pending = []
                if pending:
                    stored += sum(s.new for s in store.store_messages(pending))
                    commits += 1
                seconds = time.perf_counter() - started
                store.engine.execute("ANALYZE events")
                after = relation_sizes(store)
                rows = store.engine.execute("SELECT count(*) FROM events").fetchone()[0]
                raw = store.engine.execute("SELECT avg(length(raw)) FROM events").fetchone()[0]
                indexes = store.engine.execute(
                    "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
                    "WHERE relname = 'events' ORDER BY indexrelname"
                ).fetchall()
            finally:
                store.close()
    finally:
        server.cleanup()

    grew = {k: after[k] - before[k] for k in after}
    print(f"PostgreSQL {server_version}, events table as backend/store.py creates it")
    print(
        f"stored {stored:,} records ({rows:,} rows) from {args.boxes} boxes in {commits:,} "
        f"commits of up to {args.per_commit} messages x {args.per_message} records, "
        f"{seconds:.1f} s ({stored / seconds:,.0f} records/s, one process)"
    )
    print(f"raw JSON per record: {raw:.0f} bytes")
    for key, label in (
        ("heap", "heap"),
        ("table", "table (heap + TOAST + FSM/VM)"),
        ("indexes", "indexes (primary key, box/seq, digest)"),
        ("total", "events total"),
        ("boxes", "boxes table total"),
        ("wal", "WAL written"),
    ):
        print(f"  {label:40s} {grew[key]:>14,} bytes  {grew[key] / rows:8.0f} bytes/record")
    for name, size in indexes:
        print(f"    index {name:34s} {size:>14,} bytes  {size / rows:8.0f} bytes/record")
    print(f"  records per commit: {stored / commits:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
