"""What the technician reads in journald: one line per event, with its syslog priority
when stderr is the journal ($JOURNAL_STREAM), and never a plaintext code."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def run_daemon(box, stdin: bytes, *args: str, journal: bool) -> str:
    """`redeemd run` with stderr on a pipe; with `journal`, $JOURNAL_STREAM names that
    pipe exactly as systemd names the journal's stream."""
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if journal:
        st = os.fstat(write_end)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "-c", str(box.config_path), *args, "run"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=write_end, cwd=ROOT, env=env,
    )  # fmt: skip
    os.close(write_end)
    process.communicate(stdin, timeout=60)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def test_under_journald_each_line_carries_its_priority(loaded_box):
    text = run_daemon(loaded_box, b"DEMO-0001\n", journal=True)
    lines = text.splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), text
    assert any(line.startswith("<6>redeemd: ready") for line in lines)


def test_in_a_terminal_the_level_is_spelled_out(loaded_box):
    text = run_daemon(loaded_box, b"DEMO-0001\n", journal=False)
    assert any(line.startswith("INFO redeemd: ready") for line in text.splitlines()), text
    assert "<6>" not in text


def test_no_plaintext_code_in_the_log_even_at_debug_level(loaded_box):
    scans = b"DEMO-0001\nGIFT-0001\nNOPE-424242\nju\x01nk\n"
    text = run_daemon(loaded_box, scans, "-v", journal=True)
    for code in ("DEMO-0001", "GIFT-0001", "NOPE-424242"):
        assert code not in text, f"{code} in the log:\n{text}"
