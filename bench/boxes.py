"""Benchmark boxes: keys, a configured box and a code cache of N codes, built fast.

The benchmarks in this folder are plain scripts (`.venv/bin/python bench/<name>.py`);
this module is what they share. A cache is built the way a box gets one: a signed
issue batch (`cards.batch.build`), verified (`cards.batch.open_file`) and applied
(`storage.batch_import.apply`). Only the entries are made faster than
`cards.batch.encode_issue` would: the `scan` codes we will read get their real HMAC
digests, the other N - scan codes get random 16-byte digests (indistinguishable from
HMAC output to the B-tree), and the packed bytes are joined in one C call instead of
packing 10M tuples one by one. The bytes are identical to what encode_issue produces.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cards import batch, keys  # noqa: E402
from cards.batch import ISSUE_ENTRY, CodeStatus, Kind  # noqa: E402
from cards.digest import DIGEST_SIZE, code_digest  # noqa: E402
from cards.scan import Scan  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.config import Config  # noqa: E402
from daemon.engine import Engine  # noqa: E402
from storage import batch_import  # noqa: E402
from storage.database import open_database  # noqa: E402

MERCHANT = "demo"
FAR = 2_100_000_000
COUPON = {"id": 1, "merchant": MERCHANT, "kind": "coupon", "title": "Free coffee"}
CODE_KEY = b"c" * 32


def scan_code(index: int) -> str:
    """Text of the index-th code the benchmarks scan (all of them are in the cache)."""
    return f"BENCH-{index:08d}"


@dataclass
class BenchKeys:
    root_private: bytes
    issuer_private: bytes
    delegation: keys.Delegation

    @classmethod
    def new(cls) -> BenchKeys:
        root = keys.new_private_key()
        issuer = keys.new_private_key()
        delegation = keys.delegate(root, keys.public_of(issuer), (MERCHANT,), 0, FAR)
        return cls(root, issuer, delegation)

    @property
    def roots(self) -> dict[str, bytes]:
        public = keys.public_of(self.root_private)
        return {keys.key_id(public): public}

    def build(self, kind: Kind, entries: bytes, seq: int) -> bytes:
        created = int(time.time()) - 60
        return batch.build(
            self.issuer_private, self.delegation, merchant=MERCHANT, seq=seq, kind=kind,
            entries=entries, created_at=created, expires_at=FAR,
        )  # fmt: skip


def write_box_config(
    directory: Path,
    keys_dir: Path,
    *,
    box_id: str = "bench-box",
    sync: Mapping[str, str | int | bool] | None = None,
) -> Path:
    """`directory`/config.toml for a box like the quick start's: defaults except its id,
    paths and time zone, trusting `keys_dir`/root.pub and `keys_dir`/code.key (the names
    `redeemd-backend keys` gives them); with `sync`, a [sync] section enabled and holding
    those keys (e.g. {"broker": "mqtt://127.0.0.1:1883", "max_records": 200})."""
    directory.mkdir(parents=True, exist_ok=True)
    text = f"""
[box]
id = "{box_id}"
merchant = "{MERCHANT}"
store = "store-1"
state_dir = "{directory}"
timezone = "UTC"

[trust]
root_key_files = ["{keys_dir}/root.pub"]
code_key_file = "{keys_dir}/code.key"
"""
    if sync is not None:
        text += "\n[sync]\nenabled = true\n"
        text += "".join(f"{key} = {_toml(value)}\n" for key, value in sync.items())
    path = directory / "config.toml"
    path.write_text(text)
    return path


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else json.dumps(value)


def write_config(directory: Path, bench_keys: BenchKeys, name: str = "box") -> Config:
    """A box configuration like the quick start's, with `bench_keys` written beside it."""
    box_dir = directory / name
    keys_dir = box_dir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    (keys_dir / "root.pub").write_text(keys.b64(keys.public_of(bench_keys.root_private)) + "\n")
    (keys_dir / "code.key").write_text(keys.b64(CODE_KEY) + "\n")
    return config_mod.load(str(write_box_config(box_dir, keys_dir)))


def issue_entries(count: int, scan: int) -> bytes:
    """Packed, digest-sorted issue entries for `count` codes of the coupon card, the
    first `scan` of them being scan_code(0..scan-1)."""
    if scan > count:
        raise ValueError(f"cannot scan {scan} distinct codes from a cache of {count}")
    filler = os.urandom((count - scan) * DIGEST_SIZE)
    digests = [filler[i : i + DIGEST_SIZE] for i in range(0, len(filler), DIGEST_SIZE)]
    digests += [code_digest(CODE_KEY, scan_code(i)) for i in range(scan)]
    digests.sort()
    tail = ISSUE_ENTRY.pack(bytes(DIGEST_SIZE), COUPON["id"], 0, 0, 0, 0, CodeStatus.ACTIVE)
    tail = tail[DIGEST_SIZE:]
    entries = tail.join(digests) + tail
    first = ISSUE_ENTRY.pack(digests[0], COUPON["id"], 0, 0, 0, 0, CodeStatus.ACTIVE)
    assert entries[: ISSUE_ENTRY.size] == first, "entry layout differs from cards.batch"
    return entries


@dataclass(frozen=True)
class BuiltCache:
    path: Path
    config: Config
    build_seconds: float
    verify_seconds: float
    apply_seconds: float
    wal_bytes_after_apply: int
    """Size of the -wal file right after the import committed, connection still open."""
    wal_bytes_after_next_write: int
    """... and after the next write transaction on that connection (one recorded scan)."""


def build_cache(
    directory: Path, count: int, scan: int, name: str = "box", bench_keys: BenchKeys | None = None
) -> BuiltCache:
    """A box database holding the coupon card and `count` codes, via the batch path."""
    bench_keys = bench_keys or BenchKeys.new()
    config = write_config(directory, bench_keys, name)
    started = time.perf_counter()
    entries = issue_entries(count, scan)
    cards_file = bench_keys.build(Kind.CARDS, batch.encode_cards([COUPON]), 1)
    issue_file = bench_keys.build(Kind.ISSUE, entries, 2)
    del entries
    built = time.perf_counter()
    conn = open_database(config.box.database)
    try:
        now = int(time.time())
        batch_import.apply(
            conn, batch.open_file(cards_file, config.trust.root_keys), merchant=MERCHANT, now=now
        )
        parsed = batch.open_file(
            issue_file, config.trust.root_keys, max_entries_size=config.trust.max_batch_bytes
        )
        del issue_file
        verified = time.perf_counter()
        batch_import.apply(conn, parsed, merchant=MERCHANT, now=now)
        applied = time.perf_counter()
        wal_bytes = _wal_size(config)
        # The box's next write (a scan of a code not in the cache, refused and recorded),
        # on the same connection, as a running daemon would make it.
        Engine(conn, config).handle(Scan(b"NOT-IN-THE-CACHE", "bench-setup"))
        wal_bytes_next = _wal_size(config)
        # Leave the file as a long-running box would find it after a restart.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return BuiltCache(
        config.box.database,
        config,
        built - started,
        verified - built,
        applied - verified,
        wal_bytes,
        wal_bytes_next,
    )


def _wal_size(config: Config) -> int:
    wal = config.box.database.with_name(config.box.database.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


class Scratch:
    """A temporary directory for databases, removed on exit even after an error."""

    def __init__(self, base: str | None = None):
        self.base = base

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="redeemd-bench-", dir=self.base))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def filesystem(path: Path) -> str:
    """Which device and filesystem `path` is on, for the report."""
    best = ("?", "?", "")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) >= len(best[2]):
                best = (device, fstype, mount)
    return f"{best[0]} ({best[1]}, mounted on {best[2]})"


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def status_kib(field: str, pid: str = "self") -> int:
    """A field (VmRSS, VmHWM ...) of /proc/<pid>/status, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def parse_counts(text: str) -> list[int]:
    """'1000000,10000000' or '1e6,1e7' -> [1000000, 10000000]."""
    return [int(float(part)) for part in text.split(",") if part.strip()]
