"""bench/scan_path.py (issues 10 and 13) on a small cache: it runs, every one of its scans
is an accepted redemption (the bench refuses to report otherwise), and what a scan
writes stays what issue 10 brought it to. Its timings are never asserted; WAL pages are
a count, the same on every machine for the same schema.
"""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_scan_path_bench_runs_and_a_scan_writes_about_two_pages(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scan_path.py"), "--codes", "20000",
         "--scans", "100", "--dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    for sampler in ("engine ", "floor ", "account", "limited", "where "):
        assert re.search(rf"20,000 codes: {sampler}", out), out
    pages = re.search(
        r"engine ([\d.]+), floor ([\d.]+), replay ([\d.]+); .*a local API redeem ([\d.]+); "
        r"a linked code ([\d.]+), with a limit ([\d.]+)",
        out,
    )
    assert pages, out
    engine, floor, replay, api, linked, limited = map(float, pages.groups())
    # The ledger row and the code's (or the account's) state, plus the ledger's growth:
    # an outbox row, an index entry or a separate spend row back on the scan path would
    # each add a page to every scan.
    assert 2.0 <= engine <= 2.1 and 2.0 <= linked <= 2.1 and 2.0 <= limited <= 2.1, out
    assert abs(replay - engine) <= 0.03 and 1.0 <= floor <= 1.05, out
    assert api <= 4.0, out  # a scan's two pages, the request's key and its growth
    rows = re.search(
        r"pages holding rows: engine ([\d.]+), floor ([\d.]+), linked ([\d.]+), "
        r"limited ([\d.]+) \(target <= 2\) (PASS|MISS); .* engine ([\d.]+), floor ([\d.]+)",
        out,
    )
    assert rows, out
    engine_rows, floor_rows, linked_rows, limited_rows, growth, floor_growth = map(
        float, rows.group(1, 2, 3, 4, 6, 7)
    )
    # Read from the WAL's frames: every scan changes exactly the ledger's last leaf and
    # the page holding the code's (or the account's) row; all else is the ledger's own
    # growth, one new leaf every few dozen rows, as the floor's table grows too. The
    # bench's coupon keeps its row's size (uses_left 1 -> 0 and status 0 -> 1 are both
    # stored in no bytes); a limited account's row grows by a byte when its spend
    # reaches 2, which could split a full leaf now and then: hence the 0.02.
    assert engine_rows == 2.0 and floor_rows == 1.0, out
    assert rows.group(5) == ("PASS" if max(linked_rows, limited_rows) <= 2.0 else "MISS"), out
    assert 2.0 <= linked_rows <= 2.02 and 2.0 <= limited_rows <= 2.02, out
    assert abs(engine - (engine_rows + growth)) < 0.01 and 0 < growth < 0.1, out
    assert 0 < floor_growth < growth, out
