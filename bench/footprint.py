"""Disk bytes per cached code and resident memory of a running engine, against floors.

Usage (from the repo root):

    .venv/bin/python bench/footprint.py                  # 1M and 10M codes
    .venv/bin/python bench/footprint.py --codes 1000000
    .venv/bin/python bench/footprint.py --quick          # 100k codes

Disk: the box database after importing N codes through a signed issue batch, divided
by N (the file as a restarted box finds it, WAL checkpointed away). Also shown: the
codes table alone (dbstat) and the -wal file the import leaves behind while the
importing connection stays open, right after the import and after the next scan (the
write that may truncate it, see journal_size_limit in storage/database.py). Floor: a plain sqlite3 WITHOUT ROWID table holding
only the same 16-byte digests.

Memory: VmRSS of a fresh child process that opens the largest database the way the
daemon does (quick_check, migrations), builds an Engine and makes 1000 scans of
distinct cached codes. Floor: a fresh child with plain sqlite3 on the same file doing
1000 primary-key probes and 1000 committed INSERTs.

Targets: <= 48 bytes per cached code; <= 80 MB resident with an open Engine.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys

import boxes
from boxes import Scratch, build_cache

BYTES_TARGET = 48
RSS_TARGET_MB = 80
SCANS = 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--codes",
        default="1000000,10000000",
        help="comma-separated cache sizes (default 1000000,10000000)",
    )
    parser.add_argument("--quick", action="store_true", help="100k codes")
    parser.add_argument("--dir", default=None, help="where to put the databases (default /tmp)")
    args = parser.parse_args()
    counts = [100_000] if args.quick else boxes.parse_counts(args.codes)

    print(
        f"footprint: SQLite {sqlite3.sqlite_version}, caches of {', '.join(f'{c:,}' for c in counts)} codes"
    )
    with Scratch(args.dir) as scratch:
        print(f"  databases under {scratch} on {boxes.filesystem(scratch)}")
        largest = None
        for count in counts:
            cache = build_cache(scratch, count, SCANS, name=f"box-{count}")
            _disk(scratch, cache, count)
            if largest is None or count > largest[1]:
                largest = (cache, count)
        cache, count = largest
        _memory(cache, count)
    return 0


def _disk(scratch, cache: boxes.BuiltCache, count: int) -> None:
    size = cache.path.stat().st_size
    conn = sqlite3.connect(cache.path)
    table = conn.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'codes'").fetchone()[0]
    floor_path = scratch / f"floor-{count}.db"
    floor = sqlite3.connect(floor_path, isolation_level=None)
    floor.execute("CREATE TABLE digests (digest BLOB PRIMARY KEY) WITHOUT ROWID")
    floor.execute("ATTACH ? AS box", (f"file:{cache.path}?mode=ro",))
    floor.execute("BEGIN")
    floor.execute("INSERT INTO digests SELECT digest FROM box.codes ORDER BY digest")
    floor.execute("COMMIT")
    floor.execute("DETACH box")
    floor.execute("VACUUM")
    floor.close()
    conn.close()
    raw = floor_path.stat().st_size
    floor_path.unlink()
    per_code = size / count
    print(
        f"{count:>12,} codes: disk   {size / 1e6:8.1f} MB file  {per_code:5.1f} B/code "
        f"(codes table {table / count:.1f} B/code)  target <= {BYTES_TARGET} B  "
        f"{'PASS' if per_code <= BYTES_TARGET else 'MISS'}"
    )
    print(
        f"{count:>12,} codes: floor  {raw / 1e6:8.1f} MB file  {raw / count:5.1f} B/code "
        f"(digest-only WITHOUT ROWID table)  ratio {size / raw:.2f}x"
    )
    after, settled = cache.wal_bytes_after_apply, cache.wal_bytes_after_next_write
    print(
        f"{count:>12,} codes: wal    -wal file with the importing connection still open: "
        f"{after / 1e6:.1f} MB right after the import ({after / count:.1f} B/code more), "
        f"{settled / 1e6:.1f} MB after the next scan ({settled / count:.1f} B/code more)"
    )


def _memory(cache: boxes.BuiltCache, count: int) -> None:
    config_path = cache.path.parent / "config.toml"
    ours = _child(ENGINE_CHILD, str(config_path), str(SCANS))
    raw = _child(FLOOR_CHILD, str(cache.path), str(SCANS))
    mb = ours["rss_kib"] / 1024
    print(
        f"{count:>12,} codes: rss    engine {mb:.1f} MB after {SCANS} scans "
        f"(peak {ours['hwm_kib'] / 1024:.1f} MB; bare interpreter {ours['bare_kib'] / 1024:.1f} MB, "
        f"after imports {ours['imported_kib'] / 1024:.1f} MB)  target <= {RSS_TARGET_MB} MB  "
        f"{'PASS' if mb <= RSS_TARGET_MB else 'MISS'}"
    )
    print(
        f"{count:>12,} codes: floor  plain sqlite3 {raw['rss_kib'] / 1024:.1f} MB after "
        f"{SCANS} probes + committed INSERTs (bare interpreter {raw['bare_kib'] / 1024:.1f} MB)  "
        f"ratio {ours['rss_kib'] / raw['rss_kib']:.2f}x"
    )


def _child(program: str, *argv: str) -> dict:
    """Run `program` in a fresh interpreter (nothing of this process's memory in it)."""
    out = subprocess.run(
        [sys.executable, "-c", program, *argv],
        capture_output=True, text=True, check=False, cwd=boxes.ROOT,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"footprint child failed:\n{out.stderr}")
    return json.loads(out.stdout)


# Both children read /proc/self/status themselves; each imports only what it measures.
_STATUS = """
def kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
"""

ENGINE_CHILD = (
    _STATUS
    + """
bare = kib("VmRSS")
import json, sys
from cards.scan import Scan
from cards.verdict import Outcome, Verdict
from daemon import config as config_mod
from daemon.engine import Engine
from storage.database import open_database
imported = kib("VmRSS")
config = config_mod.load(sys.argv[1])
conn = open_database(config.box.database)  # as the daemon does: quick_check, migrations
engine = Engine(conn, config)
for i in range(int(sys.argv[2])):
    verdict = engine.handle(Scan(f"BENCH-{i:08d}".encode(), "bench-scanner"))
    if not isinstance(verdict, Verdict) or verdict.outcome is not Outcome.ACCEPTED:
        raise SystemExit(f"scan {i} was not accepted: {verdict}")
print(json.dumps({"bare_kib": bare, "imported_kib": imported, "rss_kib": kib("VmRSS"),
                  "hwm_kib": kib("VmHWM")}))
"""
)

FLOOR_CHILD = (
    _STATUS
    + """
bare = kib("VmRSS")
import hashlib, hmac, json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("PRAGMA synchronous = FULL")
conn.execute("CREATE TABLE floor_log (seq INTEGER PRIMARY KEY, digest BLOB NOT NULL)")
for i in range(int(sys.argv[2])):
    digest = hmac.new(b"c" * 32, f"BENCH-{i:08d}".encode(), hashlib.sha256).digest()[:16]
    if conn.execute("SELECT * FROM codes WHERE digest = ?", (digest,)).fetchone() is None:
        raise SystemExit(f"code {i} is not in the cache")
    conn.execute("INSERT INTO floor_log (digest) VALUES (?)", (digest,))
print(json.dumps({"bare_kib": bare, "rss_kib": kib("VmRSS"), "hwm_kib": kib("VmHWM")}))
"""
)


if __name__ == "__main__":
    raise SystemExit(main())
