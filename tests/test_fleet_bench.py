"""The fleet bench (bench/fleet.py, issue 14 item 4) in its quick mode: 200 boxes running
the real box code against a real Mosquitto, a real PostgreSQL and two real collectors.

Only its correctness lines are asserted, never its timings: every record of every box's
ledger stored once, every box drained after the broker restart, every box at the new
batch after the fan-out.
"""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

BOXES = 200


def test_fleet_bench_quick_loses_nothing_and_reaches_every_box():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--boxes", str(BOXES), "--quick"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert re.search(r"^check: [\d,]+ ledger records on 200 boxes", out, re.M), out
    assert "lost 0, stored twice 0, wrong box or seq 0, not in any ledger 0" in out, out
    assert f"boxes with an empty outbox: {BOXES} of {BOXES}" in out, out
    # herd: every box drained its 100 records after the broker came back
    assert f"check  boxes drained: {BOXES} of {BOXES}" in out, out
    # fan-out: every box's status shows the new batch
    assert f"check  boxes at the new cache_seq: {BOXES} of {BOXES}" in out, out
