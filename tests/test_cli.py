"""The `redeemd` and `redeemd-backend` command lines, run as real processes."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CREATED, ROOT, read_json_lines

from backend import cli as backend_cli
from daemon import cli as daemon_cli
from storage import ledger
from storage.database import open_database

DEMO = ROOT / "backend" / "demo"


def ledger_count(box) -> int:
    conn = open_database(box.database)
    try:
        return conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    finally:
        conn.close()


def run(module: str, *args: str, cwd: Path, env: dict[str, str], input: str | None = None):
    environment = {k: v for k, v in os.environ.items() if k != "REDEEMD_CONFIG"}
    environment.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=environment,
        input=input,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error output of a failed command, asserted to be one line and no traceback."""
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
    assert result.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- redeemd check / ledger / status


def test_check_shows_the_verdict_without_writing_a_ledger_row(loaded_box):
    result = loaded_box.cli("check", "DEMO-0001")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.startswith("accepted  checked coupon card=1")
    assert "DEMO-0001" not in out
    assert ledger_count(loaded_box) == 0
    again = loaded_box.cli("check", "DEMO-0001")
    assert again.stdout.decode().startswith("accepted")  # checking twice redeems nothing


def test_check_of_an_unknown_code_says_so(loaded_box):
    result = loaded_box.cli("check", "NOPE-0001")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("rejected: unknown_code")
    assert ledger_count(loaded_box) == 0


def test_ledger_jsonl_and_csv_carry_digests_not_codes(loaded_box, keyset):
    ran = loaded_box.cli("run", "--json", input=b"DEMO-0001\nNOPE-0042\n")
    assert ran.returncode == 0, ran.stderr.decode()

    jsonl = loaded_box.cli("ledger")
    assert jsonl.returncode == 0, jsonl.stderr.decode()
    rows = read_json_lines(jsonl.stdout)
    assert [r["seq"] for r in rows] == [1, 2]
    assert rows[0]["digest"] == keyset.digest("DEMO-0001").hex()
    assert rows[1]["digest"] == keyset.digest("NOPE-0042").hex()
    assert (rows[0]["verdict"], rows[1]["reason"]) == ("accepted", "unknown_code")
    assert set(rows[0]) == set(ledger.COLUMNS)

    as_csv = loaded_box.cli("ledger", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr.decode()
    table = list(csv.DictReader(io.StringIO(as_csv.stdout.decode())))
    assert tuple(table[0]) == ledger.COLUMNS
    assert [r["digest"] for r in table] == [r["digest"] for r in rows]

    for output in (jsonl.stdout, as_csv.stdout):
        assert b"DEMO-0001" not in output and b"NOPE-0042" not in output


def test_ledger_after_skips_earlier_records(loaded_box):
    loaded_box.cli("run", "--json", input=b"DEMO-0001\nDEMO-0002\nDEMO-0003\n")
    result = loaded_box.cli("ledger", "--after", "2")
    assert [r["seq"] for r in read_json_lines(result.stdout)] == [3]


def test_status_json_reports_cache_outbox_codes_and_floor(loaded_box):
    loaded_box.cli("run", "--json", input=b"DEMO-0001\nDEMO-0002\n")
    result = loaded_box.cli("status", "--json")
    assert result.returncode == 0, result.stderr.decode()
    info = json.loads(result.stdout)
    assert info["cache_seq"] == 2
    assert info["outbox_depth"] == 2
    assert info["codes"] == 13
    assert info["cards"] == 5
    assert info["time_floor"] == CREATED
    assert info["ledger_seq"] == 2
    assert info["clock_behind_floor"] is False  # the real clock is past CREATED
    assert (info["box"], info["merchant"], info["store"]) == ("box-1", "demo", "store-1")


def test_status_text_lists_the_same_fields(loaded_box):
    result = loaded_box.cli("status")
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "cache_seq: 2" in out and "codes: 13" in out and f"time_floor: {CREATED}" in out


def test_status_without_a_database_says_what_to_do(box):
    line = one_line_error(box.cli("status"))
    assert "no database" in line and "redeemd import" in line


# ---------------------------------------------------------------- --help everywhere


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


@pytest.mark.parametrize(
    ("module", "parser", "expected"),
    [
        (
            "daemon.cli",
            daemon_cli._parser,
            {"run", "check-config", "import", "check", "ledger", "status", "doctor", "backup"},
        ),
        (
            "backend.cli",
            backend_cli._parser,
            {"keygen", "delegate", "issue", "mint", "publish", "collect"},
        ),
    ],
    ids=["redeemd", "redeemd-backend"],
)
def test_every_subcommand_has_help_with_an_example(module, parser, expected, tmp_path):
    names = _subcommands(parser())
    assert expected <= set(names)
    top = run(module, "--help", cwd=tmp_path, env={})
    assert top.returncode == 0 and "example" in top.stdout
    for name in names:
        result = run(module, name, "--help", cwd=tmp_path, env={})
        assert result.returncode == 0, (name, result.stderr)
        assert "example" in result.stdout, name
        assert name in result.stdout.split("example", 1)[1], name  # the example uses it


# ---------------------------------------------------------------- backend -> box, all by CLI


def test_backend_keys_batches_and_minted_codes_are_accepted_by_a_box(tmp_path):
    backend_dir = tmp_path / "backend"
    state = tmp_path / "state"
    etc = tmp_path / "etc"  # the keys' place: {config_dir}/keys, /etc/redeemd on a box
    env = {"STATE_DIRECTORY": str(state), "CONFIGURATION_DIRECTORY": str(etc)}

    def backend(*args: str, input: str | None = None) -> str:
        result = run(
            "backend.cli", *args, "--dir", str(backend_dir), cwd=tmp_path, env=env, input=input
        )
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    def box(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        result = run("daemon.cli", *args, cwd=tmp_path, env=env, input=input)
        assert result.returncode == 0, (args, result.stderr)
        return result

    assert not Path(daemon_cli.config_mod.DEFAULT_PATH).exists(), "a system config would be used"
    backend("keygen")
    backend("delegate", "--merchant", "demo", "--days", "30")
    backend(
        "issue",
        "--merchant",
        "demo",
        "--kind",
        "cards",
        "--input",
        str(DEMO / "cards.json"),
        "--out",
        str(tmp_path / "0001.rdb"),
    )
    backend(
        "issue",
        "--merchant",
        "demo",
        "--input",
        str(DEMO / "codes.csv"),
        "--out",
        str(tmp_path / "0002.rdb"),
    )
    backend(
        "issue",
        "--merchant",
        "demo",
        "--kind",
        "revoke",
        "--input",
        "-",
        "--out",
        str(tmp_path / "0003.rdb"),
        input="code\nDEMO-0002\n",
    )
    minted = backend("mint", "--card", "1", "--serial", "100", "--count", "2").split()
    assert len(minted) == 2 and all(code.startswith("RD1") for code in minted)

    # The technician copies the public root key and the code key onto the box.
    (etc / "keys").mkdir(parents=True)
    shutil.copy(backend_dir / "root.pub", etc / "keys" / "root.pub")
    shutil.copy(backend_dir / "code.key", etc / "keys" / "code.key")

    assert "ok" in box("check-config").stdout
    imported = box("import", *(str(tmp_path / f"000{i}.rdb") for i in (3, 1, 2))).stdout
    assert "applied cards batch demo/1" in imported
    assert "applied revoke batch demo/3: 1 entries" in imported

    scans = "\n".join(["DEMO-0001", "DEMO-0002", minted[0], minted[1], ""])
    verdicts = read_json_lines(box("run", "--json", input=scans).stdout)
    assert [(v["verdict"], v.get("reason")) for v in verdicts] == [
        ("accepted", None),
        ("rejected", "revoked"),
        ("accepted", None),
        ("accepted", None),
    ]
    again = read_json_lines(box("run", "--json", input=minted[0] + "\n").stdout)
    assert [v.get("reason") for v in again] == ["already_redeemed"]
    status = json.loads(box("status", "--json").stdout)
    assert status["cache_seq"] == 3
    assert status["ledger_seq"] == 5
    assert status["config"].startswith("built-in defaults")
    assert status["database"] == str(state / "redeemd.db")


# ---------------------------------------------------------------- errors: one line, non-zero


def test_import_of_a_missing_file_is_one_clear_line(box):
    line = one_line_error(box.cli("import", str(box.dir / "absent.rdb")))
    assert line == f"redeemd: cannot read {box.dir / 'absent.rdb'}: No such file or directory"


def test_import_of_a_corrupt_batch_is_one_clear_line_and_applies_nothing(box, keyset):
    data = bytearray(keyset.cards_batch(1))
    data[-5] ^= 0xFF
    path = box.write_batch("corrupt.rdb", bytes(data))
    line = one_line_error(box.cli("import", str(path)))
    assert line.startswith(f"redeemd: {path}: refused, nothing applied:")
    assert "corrupted" in line


def test_import_of_a_file_that_is_not_a_batch_is_one_clear_line(box):
    path = box.write_batch("notes.txt", b"hello\n")
    line = one_line_error(box.cli("import", str(path)))
    assert "does not start with RDB1" in line


def test_import_stops_before_anything_when_one_file_is_corrupt(box, keyset):
    good = box.write_batch("0001.rdb", keyset.cards_batch(1))
    bad = box.write_batch("0002.rdb", keyset.issue_batch({"X-1": 1}, seq=2)[:-3])
    one_line_error(box.cli("import", str(good), str(bad)))
    conn = open_database(box.database)
    assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


def test_backend_issue_from_a_bad_csv_is_one_clear_line(tmp_path):
    env: dict[str, str] = {}
    keys_dir = str(tmp_path / "k")
    assert run("backend.cli", "keygen", "--dir", keys_dir, cwd=tmp_path, env=env).returncode == 0
    assert (
        run(
            "backend.cli",
            "delegate",
            "--dir",
            keys_dir,
            "--merchant",
            "demo",
            cwd=tmp_path,
            env=env,
        ).returncode
        == 0
    )
    out = tmp_path / "x.rdb"
    result = run(
        "backend.cli",
        "issue",
        "--dir",
        keys_dir,
        "--merchant",
        "demo",
        "--input",
        "-",
        "--out",
        str(out),
        cwd=tmp_path,
        env=env,
        input="code,card_id\nGOOD-1,1\nBAD-1,one\n",
    )
    line = one_line_error(result)
    assert line == "redeemd-backend: standard input: line 3: card_id 'one' is not an integer"
    assert not out.exists()


def test_backend_without_keys_says_which_command_makes_them(tmp_path):
    result = run(
        "backend.cli",
        "mint",
        "--dir",
        str(tmp_path / "none"),
        "--card",
        "1",
        "--serial",
        "1",
        cwd=tmp_path,
        env={},
    )
    line = one_line_error(result)
    assert "does not exist" in line and "redeemd-backend keygen" in line


def test_backend_keygen_refuses_to_overwrite_keys(tmp_path):
    keys_dir = str(tmp_path / "k")
    assert run("backend.cli", "keygen", "--dir", keys_dir, cwd=tmp_path, env={}).returncode == 0
    root = (tmp_path / "k" / "root.key").read_text()
    line = one_line_error(run("backend.cli", "keygen", "--dir", keys_dir, cwd=tmp_path, env={}))
    assert "--force" in line
    assert (tmp_path / "k" / "root.key").read_text() == root


@pytest.mark.parametrize("command", [["doctor"], ["status"], ["run"], ["check-config"]])
@pytest.mark.parametrize("key", ["root.pub", "code.key"])
def test_a_key_file_that_is_not_text_is_one_clear_line_naming_it(loaded_box, command, key):
    path = loaded_box.dir / "keys" / key
    path.write_bytes(b"\xff\xfe\x00binary garbage\x81\n")
    result = loaded_box.cli(*command, input=b"")
    err = result.stderr.decode() + result.stdout.decode()
    assert result.returncode in (1, 2), err
    assert "Traceback" not in err
    assert str(path) in err and "byte 0xff at offset 0" in err, err
    assert f"copy {key} again from the backend" in err, err


def test_a_batch_outside_its_issuer_delegation_is_refused_with_dates_not_epoch_seconds(tmp_path):
    from conftest import make_keyset, write_box

    keyset = make_keyset(not_before=CREATED, not_after=CREATED + 86_400)
    box = write_box(tmp_path, keyset)
    early = box.write_batch("early.rdb", keyset.cards_batch(1, created_at=CREATED - 60))
    line = one_line_error(box.cli("import", str(early)))
    assert (
        "issuer key" in line and "may not sign for merchant 'demo' at 2026-09-21T14:12:20Z" in line
    )
    assert "delegated from 2026-09-21T14:13:20Z to 2026-09-22T14:13:20Z" in line
    assert str(CREATED) not in line

    other = make_keyset(merchants=("other",))
    box = write_box(tmp_path / "other", other)
    line = one_line_error(box.cli("import", str(box.write_batch("b.rdb", other.cards_batch(1)))))
    assert (
        "may not sign for merchant 'demo'" in line
        and "delegated for merchant(s) 'other' only" in line
    )


def test_config_is_accepted_before_or_after_every_subcommand(loaded_box):
    parser = daemon_cli._parser()
    needs = {"import": ["x.rdb"], "check": ["DEMO-0001"], "backup": ["x.db"], "decode": ["x.png"],
             "dispense": ["--card", "1"], "grant": ["install", "x.rdg"]}  # fmt: skip
    for name in _subcommands(parser):
        rest = needs.get(name, [])
        before = parser.parse_args(["-c", "A.toml", name, *rest])
        after = parser.parse_args([name, *rest, "-c", "B.toml", "-v"])
        assert (before.config, after.config, after.verbose) == ("A.toml", "B.toml", True), name
        assert parser.parse_args([name, *rest]).config is None, name
    # And through the real command line: the file after the command is the one used.
    config = str(loaded_box.config_path)
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "check-config", "-c", config],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok (box box-1")
