"""`redeemd-backend export`: stored batches as files, for boxes fed by USB stick.

A box without a network applies batches with `redeemd import` and refuses a batch after
a gap ("batches 4..6 are missing"). Any batch backend.db holds, whoever issued it
(`issue` or the collector's consumed-elsewhere batches), can be written out again; one
that expired meanwhile is re-signed first (backend/resign.py), as a resend over MQTT
would be. Every requested sequence is checked before a file is written, and each file
appears whole (written aside, then renamed) or not at all.

    >>> parse_seqs(["4-6", "9"])
    [4, 5, 6, 9]
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from backend import resign
from backend.keystore import Keystore
from backend.publish import ranges
from backend.store import IssuedBatch, Store
from cards.batch import MAX_SEQ

MAX_EXPORT = 100_000
"""At most this many sequences in one export: a typo like 1-999999999 fails fast."""


class ExportError(ValueError):
    """The export was refused before anything was written; the message says why."""


@dataclass(frozen=True)
class Exported:
    path: Path
    batch: IssuedBatch
    resigned: str | None
    """Why it was re-signed (expired ...), or None for the stored signing."""


def parse_seqs(specs: list[str]) -> list[int]:
    """`4`, `4-6` and `4..6` (as a box names missing batches), in order, without repeats."""
    seqs: set[int] = set()
    for spec in specs:
        match = re.fullmatch(r"\s*(\d+)\s*(?:(?:-|\.\.)\s*(\d+)\s*)?", spec)
        if not match:
            raise ExportError(f"{spec!r} is not a sequence or a range (like 4, 4-6 or 4..6)")
        first = int(match[1])
        last = int(match[2]) if match[2] else first
        if not 1 <= first <= last <= MAX_SEQ:
            raise ExportError(f"{spec!r}: sequences run from 1 upwards, first to last")
        if last - first + len(seqs) >= MAX_EXPORT:
            raise ExportError(f"{spec!r}: more than {MAX_EXPORT} batches in one export")
        seqs.update(range(first, last + 1))
    return sorted(seqs)


def pick_merchant(store: Store, merchant: str | None) -> str:
    """The merchant asked for, or the only one backend.db has batches for."""
    merchants = store.merchants()
    if merchant is not None:
        if merchant not in merchants:
            raise ExportError(
                f"the backend's database has no batches for merchant {merchant!r}"
                + (f" (it has {', '.join(merchants)})" if merchants else "")
            )
        return merchant
    if len(merchants) == 1:
        return merchants[0]
    if not merchants:
        raise ExportError("the backend's database holds no batches yet; issue some first")
    raise ExportError(
        f"the backend's database has batches for {', '.join(merchants)}: choose with --merchant"
    )


def export(
    store: Store, keystore: Keystore, merchant: str, seqs: list[int], out: Path
) -> list[Exported]:
    """Write batch files `{merchant}-{seq:06d}.rdb` into `out` (created if needed)."""
    found = {b.seq: b for first, last in _runs(seqs) for b in store.batches(merchant, first, last)}
    missing = [s for s in seqs if s not in found]
    if missing:
        latest = store.latest_seq(merchant)
        why = []
        if missing[-1] > latest:
            why.append(f"the newest batch of {merchant} is {latest}")
        if missing[0] <= latest:
            why.append("older ones were issued before backend.db existed: issue a snapshot")
        raise ExportError(
            f"batches {ranges(missing)} of {merchant} are not in the backend's database "
            f"({'; '.join(why)}); nothing written"
        )
    now = int(time.time())
    # Re-sign everything first: a key problem stops the export before any file exists.
    ready = [(resign.current(found[s], keystore, now), resign.due(found[s], now)) for s in seqs]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for issued, resigned in ready:
        path = out / f"{merchant}-{issued.seq:06d}.rdb"
        aside = path.with_name(f".{path.name}.part")
        with open(aside, "wb") as f:
            f.write(issued.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(aside, path)
        written.append(Exported(path, issued, resigned))
    return written


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted sequences as (first, last) runs, so no unrequested batch is read."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs
