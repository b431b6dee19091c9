"""Durable before shown, under `kill -9`.

The real `redeemd run --json` process gets a stream of scans (fresh single-use codes,
repeats, unknown codes, junk) and is killed with SIGKILL at a random instant: during
start-up, after a random number of verdicts, or after a random delay. After every kill
a fresh SQLite connection checks that everything the process printed is on disk, that
no code was redeemed twice or without a record, and that the box sequence has no gaps;
the next round (a restart) must continue from there.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
from conftest import CREATED, ROOT, Box, read_json_lines, write_box

from cards import batch
from cards.batch import CodeStatus
from cards.digest import short
from storage import batch_import
from storage.database import open_database

ROUNDS = 25
CODES = 5000
SCANS_PER_ROUND = 400
# Generous bound for a round that should have been killed long before; reaching it
# means the daemon stopped answering, which the checks then report.
ROUND_LIMIT_S = 60.0


@dataclass
class Scan:
    line: bytes
    kind: str  # "code" (one of the issued codes), "unknown" or "junk"
    code: str | None = None


@dataclass
class Round:
    number: int
    scans: list[Scan]
    printed: list[dict] = field(default_factory=list)
    returncode: int | None = None
    stderr: str = ""
    how: str = ""


def _load_codes(box: Box) -> dict[bytes, str]:
    codes = {f"CRASH-{i:05d}": 1 for i in range(1, CODES + 1)}
    conn = open_database(box.database)
    try:
        config = box.config
        for data in (box.keyset.cards_batch(1), box.keyset.issue_batch(codes, seq=2)):
            parsed = batch.open_file(data, config.trust.root_keys)
            batch_import.apply(conn, parsed, merchant="demo", now=CREATED)
    finally:
        conn.close()
    return {box.keyset.digest(code): code for code in codes}


def _plan_scans(rng: random.Random, fresh: list[str], sent: list[str], n: int) -> list[Scan]:
    """Fresh codes, repeats of codes sent before (in this round or earlier), unknown
    codes and junk with control characters, shuffled together."""
    scans: list[Scan] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.5 and fresh:
            code = fresh.pop()
            sent.append(code)
            scans.append(Scan(code.encode(), "code", code))
        elif roll < 0.7 and sent:
            code = rng.choice(sent)
            scans.append(Scan(code.encode(), "code", code))
        elif roll < 0.85:
            scans.append(Scan(f"NOPE-{rng.randrange(10**6):06d}".encode(), "unknown"))
        else:
            junk = rng.choice([b"ju\x01nk", b"\x07bell", b"esc\x1b[0m", b"tab\x00nul"])
            scans.append(Scan(junk + str(rng.randrange(1000)).encode(), "junk"))
    return scans


def _run_and_kill(box: Box, rng: random.Random, rnd: Round) -> None:
    """Start the daemon, feed it `rnd.scans` from a thread, SIGKILL it at a random point
    and collect every line it printed (including what was still in the pipe)."""
    mode = rng.choice(["verdicts", "verdicts", "delay", "startup"])
    kill_after = rng.randrange(1, len(rnd.scans)) if mode == "verdicts" else None
    delay = {
        "verdicts": ROUND_LIMIT_S,
        "delay": rng.uniform(0.25, 1.2),
        "startup": rng.uniform(0.0, 0.4),
    }[mode]
    rnd.how = f"{mode}, kill_after={kill_after}, delay={delay:.3f}s"
    stderr_path = box.dir / f"stderr-{rnd.number}.txt"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "-c", str(box.config_path), "run", "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT, bufsize=0,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    enough = threading.Event()
    out = bytearray()
    # The writer's own generator: how far it got depends on the kill, and the main one
    # must stay reproducible from the seed.
    pace = random.Random(rng.random())

    def write() -> None:
        # Bursts with pauses, so kills land both while the daemon is busy and while it
        # waits for input. stdin stays open: the daemon must not stop by itself.
        try:
            i = 0
            while i < len(rnd.scans):
                burst = rnd.scans[i : i + pace.randint(1, 40)]
                data = memoryview(b"".join(s.line + b"\n" for s in burst))
                while data:
                    data = data[proc.stdin.write(data) :]
                i += len(burst)
                time.sleep(pace.choice([0, 0, 0.001, 0.01]))
        except (BrokenPipeError, ValueError, OSError):
            pass  # killed while we were writing

    def read() -> None:
        # os.read, not readline: the lines already in the pipe when the process dies
        # were shown to the outside world and must be checked too.
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            out.extend(chunk)
            if not enough.is_set() and kill_after and out.count(b"\n") >= kill_after:
                proc.send_signal(signal.SIGKILL)
                enough.set()

    writer = threading.Thread(target=write, daemon=True)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    writer.start()
    enough.wait(timeout=delay)
    proc.send_signal(signal.SIGKILL)
    rnd.returncode = proc.wait(timeout=30)
    reader.join(timeout=30)
    writer.join(timeout=30)
    proc.stdin.close()
    proc.stdout.close()
    rnd.stderr = stderr_path.read_text(errors="replace")
    text, _, _torn = bytes(out).rpartition(b"\n")  # a line cut by the kill was not shown
    rnd.printed = read_json_lines(text)


def _check_database(
    box: Box, digests: dict[bytes, str], rounds: list[Round]
) -> tuple[int, set[str]]:
    """Every invariant that must hold after a kill; returns (last seq, redeemed codes)."""
    conn = sqlite3.connect(box.database)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = {
            r[0]: r
            for r in conn.execute("SELECT seq, id, digest, verdict, action, reason FROM ledger")
        }
        outbox = {r[0] for r in conn.execute("SELECT seq FROM outbox")}
        consumed = {
            r[0]
            for r in conn.execute(
                "SELECT digest FROM codes WHERE status = ? OR uses_left = 0",
                (CodeStatus.CONSUMED,),
            )
        }
        doubles = conn.execute(
            "SELECT hex(digest), COUNT(*) FROM ledger WHERE verdict = 'accepted' "
            "AND action = 'redeem' GROUP BY digest HAVING COUNT(*) > 1"
        ).fetchall()
    finally:
        conn.close()

    last = max(rows, default=0)
    assert sorted(rows) == list(range(1, last + 1)), "box sequence has gaps"
    assert outbox == set(rows), "a ledger row is missing from the outbox (nothing was acked)"
    assert doubles == [], "a single-use code was accepted twice"

    for rnd in rounds:
        for verdict in rnd.printed:
            seq = verdict.get("box_seq")
            assert seq is not None, f"round {rnd.number}: printed an unrecorded verdict {verdict}"
            row = rows.get(seq)
            assert row is not None, f"round {rnd.number}: printed seq {seq} has no ledger row"
            _, rid, digest, outcome, action, reason = row
            assert str(uuid.UUID(bytes=rid)) == verdict["record_id"]
            assert outcome == verdict["verdict"]
            assert action == verdict["action"]
            assert reason == verdict.get("reason")
            assert short(digest) == verdict["digest_prefix"]

    redeemed = {
        digest
        for _, _, digest, outcome, action, _ in rows.values()
        if outcome == "accepted" and action == "redeem"
    }
    # Atomicity both ways: a code is used up exactly when an accepted row records it.
    assert consumed == redeemed, "code state and ledger disagree"
    assert redeemed <= set(digests)
    return last, {digests[d] for d in redeemed}


def _expected(scans: list[Scan], redeemed_before: set[str]) -> list[tuple[str, str | None]]:
    """The verdict each scan must get, in order (debounce is off, one scan one line)."""
    redeemed = set(redeemed_before)
    expected = []
    for scan in scans:
        if scan.kind == "junk":
            expected.append(("rejected", "malformed"))
        elif scan.kind == "unknown":
            expected.append(("rejected", "unknown_code"))
        elif scan.code in redeemed:
            expected.append(("rejected", "already_redeemed"))
        else:
            redeemed.add(scan.code)
            expected.append(("accepted", None))
    return expected


@pytest.mark.slow
def test_kill_9_at_any_instant_loses_no_accepted_redemption(tmp_path, keyset):
    seed = int(os.environ.get("REDEEMD_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"crash test seed {seed} (rerun with REDEEMD_CRASH_SEED={seed})")
    box = write_box(tmp_path, keyset, debounce="0s")
    digests = _load_codes(box)
    fresh = sorted(digests.values(), reverse=True)
    sent: list[str] = []
    rounds: list[Round] = []
    redeemed: set[str] = set()
    printed_accepted: set[str] = set()
    last_seq = 0

    for number in range(1, ROUNDS + 1):
        # Codes redeemed before the kill come first, so the restart is seen refusing them.
        again = rng.sample(sorted(redeemed), min(5, len(redeemed)))
        repeats = [Scan(code.encode(), "code", code) for code in again]
        scans = repeats + _plan_scans(rng, fresh, sent, SCANS_PER_ROUND)
        rnd = Round(number, scans)
        _run_and_kill(box, rng, rnd)
        rounds.append(rnd)
        context = f"seed {seed}, round {number} ({rnd.how}); daemon stderr:\n{rnd.stderr}"
        assert rnd.returncode == -signal.SIGKILL, f"daemon exited by itself; {context}"
        try:
            new_last, now_redeemed = _check_database(box, digests, rounds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {context}") from exc

        # The restart continued the sequence, and each printed verdict is the right one.
        printed = rnd.printed
        assert len(printed) <= len(scans), context
        if printed:
            assert printed[0]["box_seq"] == last_seq + 1, context
        assert [v["box_seq"] for v in printed] == list(
            range(last_seq + 1, last_seq + 1 + len(printed))
        ), context
        want = _expected(scans, redeemed)[: len(printed)]
        got = [(v["verdict"], v.get("reason")) for v in printed]
        assert got == want, context
        # What the restart can see redeemed includes everything printed as accepted
        # (it may include more: committed, then killed before the line went out).
        printed_accepted |= {
            s.code for s, v in zip(scans, printed, strict=False) if v["verdict"] == "accepted"
        }
        assert printed_accepted <= now_redeemed, context
        assert now_redeemed >= redeemed, context
        print(
            f"round {number}: {rnd.how}: {len(printed)} verdicts printed, "
            f"{new_last - last_seq} recorded"
        )
        redeemed, last_seq = now_redeemed, new_last

    # A clean run after the last kill: every code ever printed as accepted is refused,
    # and the sequence carries on from the last committed row.
    assert printed_accepted, f"seed {seed}: no round got as far as an acceptance"
    codes = sorted(printed_accepted)
    result = box.cli("run", "--json", input="".join(c + "\n" for c in codes).encode())
    assert result.returncode == 0, result.stderr.decode()
    final = read_json_lines(result.stdout)
    assert [(v["verdict"], v.get("reason")) for v in final] == [
        ("rejected", "already_redeemed")
    ] * len(codes), f"seed {seed}"
    assert [v["box_seq"] for v in final] == list(range(last_seq + 1, last_seq + 1 + len(codes)))
    _check_database(box, digests, [])
