"""Bad input to `redeemd-backend issue` / `mint` and `redeemd check`, run as real processes:
each is one line on stderr naming the value and what is allowed, a non-zero exit, no
traceback, and nothing written."""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from backend.keystore import Keystore
from cards import keys


def backend(*args: str, keys_dir: Path, input: bytes = b"") -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "REDEEMD_CONFIG"}
    environment["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args, "--dir", str(keys_dir)],
        input=input, capture_output=True, timeout=60, cwd=keys_dir.parent, env=environment,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def delegated_keys(tmp_path_factory) -> Path:
    """A backend key directory with keys and a delegation for merchant demo."""
    keys_dir = tmp_path_factory.mktemp("template") / "keys"
    assert backend("keygen", keys_dir=keys_dir).returncode == 0
    assert backend("delegate", "--merchant", "demo", keys_dir=keys_dir).returncode == 0
    return keys_dir


@pytest.fixture
def keys_dir(delegated_keys, tmp_path) -> Path:
    """A fresh copy of the delegated keys, with its own backend.db."""
    return Path(shutil.copytree(delegated_keys, tmp_path / "keys"))


def issued_batches(keys_dir: Path) -> list[tuple[str, int]]:
    path = keys_dir / "backend.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT merchant, seq FROM batches ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # no table yet: nothing was ever issued
        return []
    finally:
        conn.close()


def issue(keys_dir: Path, *extra: str, input: bytes) -> subprocess.CompletedProcess:
    out = keys_dir.parent / "out.rdb"
    return backend(
        "issue", "--merchant", "demo", "--input", "-", "--out", str(out), *extra,
        keys_dir=keys_dir, input=input,
    )  # fmt: skip


def assert_nothing_issued(keys_dir: Path) -> None:
    assert not (keys_dir.parent / "out.rdb").exists()
    assert issued_batches(keys_dir) == []


# ---------------------------------------------------------------- issue --kind cards


@pytest.mark.parametrize(
    ("cards", "element"),
    [(b"[1]", "element 1 is 1"), (b'[{"id": 1, "kind": "coupon"}, "x"]', 'element 2 is "x"')],
    ids=["number", "string-after-a-card"],
)
def test_cards_array_element_that_is_not_an_object_is_one_clear_line(keys_dir, cards, element):
    line = one_line_error(issue(keys_dir, "--kind", "cards", input=cards))
    assert element in line and "must be a JSON object" in line
    assert_nothing_issued(keys_dir)


@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        (
            b'[{"id": 1, "kind": "coupon", "merchant": "acme"}]',
            "element 1 (card 1) is for merchant 'acme', not --merchant 'demo'",
        ),
        (
            b'[{"id": 1, "kind": "coupon"}, {"id": 2, "kind": "coupon"}, {"id": 1, "kind": "gift"}]',
            "elements 1 and 3 both have id 1",
        ),
    ],
    ids=["another-merchant", "repeated-id"],
)
def test_cards_every_box_would_refuse_or_lose_are_not_issued(keys_dir, cards, expected):
    line = one_line_error(issue(keys_dir, "--kind", "cards", input=cards))
    assert expected in line, line
    assert_nothing_issued(keys_dir)


# ---------------------------------------------------------------- issue from CSV


@pytest.mark.parametrize("card_id", ["99999999999", "-1"])
def test_csv_card_id_outside_u32_is_one_clear_line(keys_dir, card_id):
    line = one_line_error(
        issue(keys_dir, input=f"code,card_id\nGOOD-1,1\nBAD-1,{card_id}\n".encode())
    )
    # Line 3 of the file: the header is line 1.
    assert line == (
        f"redeemd-backend: standard input: line 3: card_id {card_id} is out of range: "
        "allowed 0..4294967295"
    )
    assert_nothing_issued(keys_dir)


@pytest.mark.parametrize(
    ("row", "field"),
    [("X,1,4294967296", "not_before"), ("X,1,0,-3", "not_after"), ("X,1,0,0,1,-5", "balance")],
)
def test_csv_time_or_balance_out_of_range_is_one_clear_line(keys_dir, row, field):
    line = one_line_error(issue(keys_dir, input=f"{row}\n".encode()))
    assert f"line 1: {field} " in line and "allowed 0.." in line
    assert_nothing_issued(keys_dir)


def test_csv_error_names_the_input_file_and_the_line_an_editor_shows(keys_dir):
    codes = keys_dir.parent / "codes.csv"
    codes.write_text("code,card_id\n\nGOOD-1,1\nBAD-1,one\n")
    out = keys_dir.parent / "out.rdb"
    result = backend(
        "issue", "--merchant", "demo", "--input", str(codes), "--out", str(out), keys_dir=keys_dir
    )
    assert one_line_error(result) == (
        f"redeemd-backend: {codes}: line 4: card_id 'one' is not an integer"
    )
    assert_nothing_issued(keys_dir)


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("code,card\nGOOD-1,1\n", "line 1: the header 'code,card' is not one this command reads"),
        ("code,card_id\nGOOD-1,1\n,1\n", "line 3: the code is empty"),
        ("code,card_id\nGOOD-1,1\n]Q1GOOD-1,1\n", "line 3 repeats line 2"),
    ],
    ids=["wrong-header", "empty-code", "repeated-code"],
)
def test_csv_that_no_box_should_get_is_refused_and_nothing_issued(keys_dir, csv_text, expected):
    line = one_line_error(issue(keys_dir, input=csv_text.encode()))
    assert line.startswith("redeemd-backend: standard input: ") and expected in line, line
    assert_nothing_issued(keys_dir)


def test_invalid_utf8_on_stdin_is_one_clear_line(keys_dir):
    line = one_line_error(issue(keys_dir, input=b"GOOD-1,1\nBA\xffD-1,1\n"))
    assert line == (
        "redeemd-backend: standard input is not valid UTF-8: byte 0xff at offset 11; "
        "save the file as UTF-8"
    )
    assert_nothing_issued(keys_dir)


def test_zero_chunk_size_is_one_clear_line(keys_dir):
    line = one_line_error(issue(keys_dir, "--chunk-size", "0", input=b"GOOD-1,1\n"))
    assert line == "redeemd-backend: --chunk-size 0 is out of range: allowed 1 or more bytes"
    assert_nothing_issued(keys_dir)


@pytest.mark.parametrize("seq", ["0", "-4", str(1 << 63)])
def test_sequence_every_box_refuses_is_not_issued(keys_dir, seq):
    line = one_line_error(issue(keys_dir, "--seq", seq, input=b"GOOD-1,1\n"))
    assert line == f"redeemd-backend: --seq {seq} is out of range: allowed 1..{(1 << 63) - 1}"
    assert_nothing_issued(keys_dir)


def test_refused_input_burns_no_sequence(keys_dir):
    one_line_error(issue(keys_dir, input=b"BAD-1,-1\n"))
    assert issue(keys_dir, input=b"GOOD-1,1\n").returncode == 0
    assert issued_batches(keys_dir) == [("demo", 1)]


# ---------------------------------------------------------------- issuer delegation


def delegate_for(keys_dir: Path, merchants: tuple[str, ...], not_before: int, not_after: int):
    store = Keystore(keys_dir)
    store.save_delegation(
        keys.delegate(
            store.private("root"), store.public("issuer"), merchants, not_before, not_after
        )
    )


def test_issue_for_a_merchant_the_key_is_not_delegated_for_is_refused(keys_dir):
    delegate_for(keys_dir, ("demo", "shop 2"), int(time.time()) - 60, int(time.time()) + 86400)
    out = keys_dir.parent / "out.rdb"
    result = backend(
        "issue", "--merchant", "acme", "--input", "-", "--out", str(out),
        keys_dir=keys_dir, input=b"GOOD-1,1\n",
    )  # fmt: skip
    line = one_line_error(result)
    assert "is not delegated for merchant 'acme', only for demo, shop 2" in line
    # The command that fixes it keeps the merchants the key already signs for.
    command = (
        f"redeemd-backend delegate --dir {shlex.quote(str(keys_dir))} --merchant demo "
        "--merchant 'shop 2' --merchant acme --days 365"
    )
    assert line.endswith(command), line
    assert_nothing_issued(keys_dir)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (-30 * 86400, -86400, "delegation for demo ended at "),
        (86400, 30 * 86400, "only starts at "),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_issue_and_mint_with_a_delegation_outside_its_window_are_refused(
    keys_dir, start, end, expected
):
    now = int(time.time())
    delegate_for(keys_dir, ("demo",), now + start, now + end)
    fix = f"redeemd-backend delegate --dir {shlex.quote(str(keys_dir))} --merchant demo --days 365"
    line = one_line_error(issue(keys_dir, input=b"GOOD-1,1\n"))
    assert expected in line and " UTC" in line and line.endswith(fix), line
    assert_nothing_issued(keys_dir)
    minted = backend("mint", "--card", "1", "--serial", "1", keys_dir=keys_dir)
    assert expected in one_line_error(minted)
    assert minted.stdout == b""


def test_issue_outliving_its_delegation_notes_when_boxes_stop_taking_it(keys_dir):
    now = int(time.time())
    delegate_for(keys_dir, ("demo",), now - 60, now + 86400)
    result = issue(keys_dir, "--expires-days", "30", input=b"GOOD-1,1\n")
    assert result.returncode == 0, result.stderr
    assert "note: boxes refuse this batch from " in result.stderr.decode()
    assert issued_batches(keys_dir) == [("demo", 1)]


# ---------------------------------------------------------------- mint


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--card", "99999999999", "--serial", "1"], "card id 99999999999 is out of range: allowed 0..4294967295"),
        (["--card", "-1", "--serial", "1"], "card id -1 is out of range: allowed 0..4294967295"),
        (["--card", "1", "--serial", "-1"], f"serial -1 is out of range: allowed 0..{(1 << 64) - 1}"),
        (["--card", "1", "--serial", str((1 << 64) - 1), "--count", "2"],
         f"ends at serial {1 << 64}: allowed 0..{(1 << 62) - 1} (serials from 2^62 up"),
        (["--card", "1", "--serial", str((1 << 62) - 1), "--count", "2"],
         f"ends at serial {1 << 62}: allowed 0..{(1 << 62) - 1} (serials from 2^62 up"),
        (["--card", "1", "--serial", "1", "--count", "0"], "--count 0 is out of range: allowed 1 or more"),
    ],
    ids=["card-too-big", "card-negative", "serial-negative", "serial-overflows",
         "serial-claim-range", "count-zero"],
)  # fmt: skip
def test_mint_field_outside_the_code_format_is_one_clear_line(keys_dir, args, expected):
    result = backend("mint", *args, keys_dir=keys_dir)
    assert expected in one_line_error(result)
    assert result.stdout == b""  # not one code was handed out


# ---------------------------------------------------------------- redeemd check


def test_check_of_an_undecodable_argument_is_one_clear_line(loaded_box):
    result = loaded_box.cli("check", os.fsdecode(b"DEMO-\xff"))
    line = one_line_error(result)
    assert line.startswith("redeemd: the code is not valid UTF-8: byte 0xff at position 5")
