"""Collectors that scale out (issue 14.2): several `redeemd-backend collect` processes on
one shared subscription and one PostgreSQL, killed and restarted, and the database itself
killed, while real boxes keep redeeming. Nothing may be lost, stored twice or acked before
it was committed; two publishers may never sign two batches with one sequence.

Everything is real: a Mosquitto and a PostgreSQL started for the test, `redeemd run`
boxes, the backend's CLI processes. The store is chosen the way an operator chooses it,
with $REDEEMD_BACKEND_DATABASE, which every process here inherits.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import subprocess
import sys

import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import ROOT, wait_for
from fleet import Fleet
from postgres import PostgreSQL

from backend.store import DATABASE_ENV, IssuedBatch, Store


@pytest.fixture
def on_postgresql(own_postgresql: PostgreSQL, monkeypatch) -> PostgreSQL:
    monkeypatch.setenv(DATABASE_ENV, own_postgresql.create_database("fleet"))
    return own_postgresql


@pytest.fixture
def fleet(tmp_path, broker, on_postgresql):  # noqa: F811
    instance = Fleet(tmp_path, broker)
    yield instance
    instance.close()


def lost(collector) -> bool:
    """The collector said it lost the database and has not said it is back since."""
    said = [
        line for line in collector.lines if "lost the database" in line or "reachable again" in line
    ]
    return bool(said) and "lost the database" in said[-1]


def codes(first: int, last: int) -> list[str]:
    return [f"FLEET-{i:04d}" for i in range(first, last + 1)]


def test_collectors_and_postgresql_killed_mid_run_lose_nothing_and_store_nothing_twice(
    fleet: Fleet, on_postgresql: PostgreSQL
):
    collectors = [fleet.collector(), fleet.collector()]
    everyone = list(collectors)
    for c in collectors:
        c.wait_line(lambda line: "connected to" in line, "collector connected")
    boxes = [fleet.box(f"box-{n}") for n in "abc"]
    daemons = [fleet.run(box) for box in boxes]
    per_box = 120
    rounds = 4
    step = per_box // rounds
    for r in range(rounds):
        for n, daemon in enumerate(daemons):
            first = 1 + n * per_box + r * step
            daemon.scan(*codes(first, first + step - 1))
        # A fault while this round's records are on their way.
        if r == 0:
            collectors[0].kill()  # its taken, uncommitted messages were never acked
            collectors[0] = fleet.collector()
            everyone.append(collectors[0])
        elif r == 1:
            on_postgresql.kill()  # kill -9 of the postmaster and every backend process
            on_postgresql.start()
        elif r == 2:
            collectors[1].kill()
            collectors[1] = fleet.collector()
            everyone.append(collectors[1])
        for daemon in daemons:
            daemon.wait_verdicts((r + 1) * step)
        for box in boxes:
            wait_for(lambda box=box: fleet.all_collected(box), f"{box.id} collected, round {r}")
        for c in collectors:  # a collector that lost the database has it back
            wait_for(lambda c=c: not lost(c), "the collectors reconnected to the database")
    for daemon in daemons:
        assert all(v["verdict"] == "accepted" for v in daemon.verdicts), daemon.verdicts

    for box in boxes:
        wait_for(lambda box=box: fleet.all_collected(box), f"{box.id} collected and acked")
        # Each record once (the events table's key is the record id), in full.
        assert fleet.collected(box) == box.ledger()
        assert fleet.query("SELECT upto, max_seq FROM boxes WHERE box = ?", box.id) == [
            (per_box, per_box)
        ]
    assert fleet.query("SELECT COUNT(*) FROM events") == [(3 * per_box,)]
    assert fleet.query("SELECT COUNT(*) FROM gaps WHERE filled_at IS NULL") == [(0,)]
    assert fleet.query("SELECT COUNT(*) FROM conflicts") == [(0,)]
    # The collectors that lived through the database's death said so and came back.
    said = [line for c in everyone for line in c.lines]
    assert any(line.startswith("lost the database") for line in said), said
    assert any(" is reachable again after " in line for line in said), said
    assert not any("postgres:" in line and "@" in line for line in said)


def test_two_publishers_issuing_at_once_never_sign_two_batches_with_one_sequence(
    fleet: Fleet, tmp_path
):
    source = tmp_path / "codes.csv"
    source.write_text("code,card_id\n" + "".join(f"MORE-{i:04d},1\n" for i in range(50)))
    before = fleet.latest_seq()

    def issue(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "issue", "--dir", str(fleet.backend),
             "--merchant", "demo", "--kind", "issue", "--input", str(source),
             "--out", str(tmp_path / f"{name}.rdb")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    runs = [issue(f"batch-{i}") for i in range(8)]
    outputs = [(run.wait(120), run.stdout.read() if run.stdout else "") for run in runs]
    assert all(code == 0 for code, _ in outputs), outputs
    signed = [IssuedBatch.from_file((tmp_path / f"batch-{i}.rdb").read_bytes()) for i in range(8)]
    assert sorted(b.seq for b in signed) == list(range(before + 1, before + 9))
    store = Store.open(fleet.backend)
    try:
        stored = {b.seq: b.sha256 for b in store.batches("demo", before + 1, before + 8)}
    finally:
        store.close()
    # Each sequence is the batch its file holds: none was signed twice with other content.
    assert stored == {b.seq: b.sha256 for b in signed}
