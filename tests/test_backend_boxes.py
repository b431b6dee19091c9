"""`redeemd-backend box ...`: the register of boxes the collector takes records from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from backend_helpers import make_backend, record
from conftest import ROOT

from backend.events import parse_message
from backend.store import Store


def box_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", "box", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.fixture
def backend(tmp_path) -> Path:
    directory = tmp_path / "backend"
    make_backend(directory, merchants=("acme", "bistro"))
    return directory


def test_a_box_id_belongs_to_one_merchant(backend):
    assert box_cli("add", "--dir", str(backend), "--merchant", "acme", "box-1").returncode == 0
    again = box_cli("add", "--dir", str(backend), "--merchant", "acme", "box-1")
    assert again.returncode == 0 and "already registered for acme: box-1" in again.stdout
    moved = box_cli("add", "--dir", str(backend), "--merchant", "bistro", "box-1", "box-2")
    assert moved.returncode == 1
    assert "box box-1 is registered for merchant acme, not bistro" in moved.stderr
    assert "box remove box-1" in moved.stderr
    store = Store.open(backend)
    try:
        assert store.fleet() == {"box-1": "acme"}, "nothing of a refused add is kept"
    finally:
        store.close()


def test_a_merchant_the_issuer_key_may_not_sign_for_is_refused_with_the_fix(backend):
    result = box_cli("add", "--dir", str(backend), "--merchant", "cafe", "box-9")
    assert result.returncode == 1
    assert "not delegated for merchant cafe" in result.stderr
    assert "redeemd-backend delegate" in result.stderr and "--merchant cafe" in result.stderr


def test_a_name_that_cannot_be_one_topic_level_is_refused(backend):
    for name in ("a/b", "box+", "#", "with space", ""):
        result = box_cli("add", "--dir", str(backend), "--merchant", "acme", name)
        assert result.returncode != 0, name
        assert "is not allowed: 1 to 64 of A-Z a-z 0-9 _ . -" in result.stderr, name


def test_list_names_boxes_that_sent_records_before_they_were_registered(backend):
    # Before the register existed, any box's records were stored.
    body = json.dumps({"v": 1, "box": "old-box", "records": [{**record(1, "old-box"),
                       "merchant": "acme"}]})  # fmt: skip
    store = Store.open(backend)
    try:
        store.store_events(
            "acme", "old-box", parse_message(body.encode(), merchant="acme", box="old-box")
        )
    finally:
        store.close()
    box_cli("add", "--dir", str(backend), "--merchant", "acme", "box-1")
    listed = box_cli("list", "--dir", str(backend))
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == [
        "acme\tbox-1",
        "acme\told-box\tNOT REGISTERED (sent events before; its new ones are refused)",
    ]


def test_remove_unregisters_keeps_the_records_and_says_what_it_did_not_know(backend):
    box_cli("add", "--dir", str(backend), "--merchant", "acme", "box-1", "box-2")
    result = box_cli("remove", "--dir", str(backend), "box-2", "box-7")
    assert result.returncode == 1
    assert "removed box-2" in result.stdout and "not registered: box-7" in result.stdout
    acl = box_cli("acl", "--dir", str(backend))
    assert "user box-1\n" in acl.stdout and "box-2" not in acl.stdout


def test_acl_refuses_a_backend_user_that_is_also_a_box(backend):
    box_cli("add", "--dir", str(backend), "--merchant", "acme", "box-1")
    result = box_cli("acl", "--dir", str(backend), "--backend-user", "box-1")
    assert result.returncode == 1
    assert "box-1 is both a box and a backend user" in result.stderr
