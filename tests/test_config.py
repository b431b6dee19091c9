"""Configuration: parsed once into typed objects; every problem named, with what is allowed."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_box

from cards import keys
from daemon import config as config_mod
from daemon.config import ConfigError


@pytest.fixture
def key_dir(tmp_path: Path, keyset) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / "root.pub").write_text(keys.b64(keys.public_of(keyset.root_private)) + "\n")
    (directory / "code.key").write_text(keys.b64(keyset.code_key) + "\n")
    return directory


def base(tmp_path: Path, key_dir: Path) -> dict:
    """The smallest valid configuration as parsed TOML."""
    return {
        "box": {"state_dir": str(tmp_path)},
        "trust": {
            "root_key_files": [str(key_dir / "root.pub")],
            "code_key_file": str(key_dir / "code.key"),
        },
    }


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_mod.parse(data, source="test.toml")
    return caught.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("REDEEMD_CONFIG",)}
    environment.update(env or {}, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=environment,
    )


# ---------------------------------------------------------------- a good file


def test_full_good_file_is_parsed_into_typed_values(tmp_path, key_dir, keyset):
    inline_root = keys.public_of(keys.new_private_key())
    path = write(
        tmp_path / "config.toml",
        f"""
[box]
id = "till-07"
merchant = "acme"
store = "north.1"
state_dir = "{tmp_path}"
database = "{{state_dir}}/db/cache.db"
timezone = "Asia/Shanghai"

[trust]
root_keys = ["{keys.b64(inline_root)}"]
root_key_files = ["{key_dir}/root.pub"]
code_key_file = "{key_dir}/code.key"
max_staleness = "12h"
stale_policy = "reject"
max_batch_bytes = 1048576

[scan]
debounce = "1500ms"
max_code_length = 256
payment_codes = "reject"

[sync]
enabled = true

[[scanner]]
type = "stdin"
name = "counter"

[[scanner]]
type = "stdin"
name = "door"
""",
    )
    config = config_mod.load(str(path))
    assert config.source == str(path)
    assert (config.box.id, config.box.merchant, config.box.store) == ("till-07", "acme", "north.1")
    assert config.box.state_dir == tmp_path
    assert config.box.database == tmp_path / "db" / "cache.db"
    assert config.box.timezone == "Asia/Shanghai"
    root_public = keys.public_of(keyset.root_private)
    assert config.trust.root_keys == {
        keys.key_id(inline_root): inline_root,
        keys.key_id(root_public): root_public,
    }
    assert config.trust.code_key == keyset.code_key
    assert config.trust.max_staleness == 12 * 3600.0
    assert config.trust.stale_policy == "reject"
    assert config.trust.max_batch_bytes == 1 << 20
    assert config.scan.debounce == pytest.approx(1.5)
    assert config.scan.max_code_length == 256
    assert config.scan.payment_codes == "reject"
    assert [(s.type, s.name) for s in config.scanners] == [("stdin", "counter"), ("stdin", "door")]


def test_defaults_fill_everything_not_given(tmp_path, key_dir):
    config = config_mod.parse(base(tmp_path, key_dir), source="test.toml")
    assert (config.box.id, config.box.merchant, config.box.store) == (
        "demo-box",
        "demo",
        "demo-store",
    )
    assert config.box.database == tmp_path / "redeemd.db"
    assert config.box.timezone == "local"
    assert config.trust.max_staleness == 7 * 86400
    assert config.trust.stale_policy == "accept"
    assert config.scan.debounce == 2.0
    assert config.scan.max_code_length == 512
    assert [(s.type, s.name) for s in config.scanners] == [("stdin", "stdin")]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(2, 2.0), (0.25, 0.25), ("100ms", 0.1), ("3s", 3.0), ("15m", 900.0), ("7d", 604800.0)],
)
def test_durations_accept_numbers_and_units(tmp_path, key_dir, text, seconds):
    data = base(tmp_path, key_dir)
    data["scan"] = {"debounce": text}
    assert config_mod.parse(data, "t").scan.debounce == pytest.approx(seconds)


# ---------------------------------------------------------------- wrong values


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("box", "id", 5, "1-64 characters"),
        ("box", "merchant", "has space", "1-64 characters"),
        ("box", "store", "", "1-64 characters"),
        ("box", "timezone", "Mars/Olympus", 'IANA zone such as "Asia/Shanghai"'),
        ("box", "state_dir", 3, "a non-empty string"),
        ("trust", "root_keys", "not-a-list", "a list of strings"),
        ("trust", "max_staleness", "a week", "a duration such as"),
        ("trust", "stale_policy", "maybe", "one of 'accept', 'reject'"),
        ("trust", "max_batch_bytes", 0, "a positive integer"),
        ("trust", "max_batch_bytes", True, "a positive integer"),
        ("scan", "debounce", "2 fortnights", "a duration such as"),
        ("scan", "debounce", -1, "a duration such as"),
        ("scan", "max_code_length", "512", "a positive integer"),
        ("scan", "payment_codes", "keep", "one of 'pass', 'reject'"),
        ("sync", "enabled", "yes", "true or false"),
    ],
)
def test_wrong_value_names_key_value_and_what_is_allowed(
    tmp_path, key_dir, section, key, value, allowed
):
    data = base(tmp_path, key_dir)
    data.setdefault(section, {})[key] = value
    problems = problems_of(data)
    (problem,) = [p for p in problems if p.startswith(f"[{section}] {key} ")]
    assert repr(value) in problem
    assert allowed in problem
    assert "must be" in problem


def test_every_problem_is_reported_at_once(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["box"].update(id="a b", timezone="Nowhere/Town")
    data["scan"] = {"debounce": "soon", "colour": "red"}
    data["extras"] = {}
    problems = problems_of(data)
    assert len(problems) == 5
    joined = "\n".join(problems)
    for fragment in ("[box] id", "[box] timezone", "[scan] debounce", "[scan] colour", "[extras]"):
        assert fragment in joined


def test_unknown_key_is_named_with_the_allowed_keys(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["box"]["shop"] = "x"
    (problem,) = problems_of(data)
    assert problem.startswith("[box] shop: unknown key")
    assert "id, merchant, store" in problem


def test_unknown_section_is_named_with_the_allowed_sections(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["mqtt"] = {"host": "x"}
    (problem,) = problems_of(data)
    assert problem.startswith("[mqtt]: unknown section")
    allowed = set(problem.split("allowed: ")[1].split(", "))
    assert {"api", "box", "scan", "scanner", "sync", "trust"} <= allowed


def test_a_key_above_every_section_is_named_as_such_with_the_section_it_belongs_to(
    tmp_path, key_dir
):
    data = {**base(tmp_path, key_dir), "debounce": "1s", "shop": 3}  # as TOML parses them
    debounce, shop = problems_of(data)
    assert debounce == (
        'debounce = "1s": a key outside any section; it belongs under [scan]: move the '
        "line below the [scan] line"
    )
    assert shop.startswith("shop = 3: a key outside any section; no section has this key")
    assert "unknown section" not in debounce + shop


def test_what_the_loader_reads_from_files_cannot_be_written_inline(tmp_path, key_dir):
    """The code key and the MQTT password come only from their files (mode 0640, root's),
    never from the config file itself, which is copied around and shown."""
    data = base(tmp_path, key_dir)
    data["trust"]["code_key"] = "c2VjcmV0"
    data["sync"] = {"password": "hunter2"}
    trust, sync = problems_of(data)
    assert trust.startswith("[trust] code_key: unknown key; allowed: root_keys, root_key_files")
    assert sync.startswith("[sync] password: unknown key; allowed: enabled, broker")
    assert "password_file" in sync and "hunter2" not in sync and "c2VjcmV0" not in trust


def test_section_that_is_not_a_table_is_refused(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["scan"] = "fast"
    assert any(p.startswith("[scan]: must be a table") for p in problems_of(data))


def test_missing_root_key_file_says_where_to_get_it(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["trust"]["root_key_files"] = [str(tmp_path / "nowhere" / "root.pub")]
    (problem,) = problems_of(data)
    assert str(tmp_path / "nowhere" / "root.pub") in problem
    assert "does not exist" in problem
    assert "redeemd-backend keygen writes root.pub" in problem


def test_missing_code_key_file_says_where_to_get_it(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["trust"]["code_key_file"] = str(tmp_path / "code.key")
    (problem,) = problems_of(data)
    assert str(tmp_path / "code.key") in problem
    assert "copy code.key from the backend" in problem


def test_root_key_that_is_not_base64_is_refused(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["trust"]["root_keys"] = ["%%%"]
    (problem,) = problems_of(data)
    assert "'%%%'" in problem and "base64 of a 32-byte Ed25519 key" in problem


def test_short_code_key_is_refused(tmp_path, key_dir):
    (key_dir / "code.key").write_text(keys.b64(b"short") + "\n")
    (problem,) = problems_of(base(tmp_path, key_dir))
    assert "need at least 16" in problem


def test_no_root_key_at_all_is_refused(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["trust"]["root_key_files"] = []
    (problem,) = problems_of(data)
    assert "no root key configured" in problem


def test_duplicate_scanner_names_are_refused(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["scanner"] = [{"type": "stdin", "name": "front"}, {"type": "stdin", "name": "front"}]
    (problem,) = problems_of(data)
    assert "'front'" in problem and "names must be unique" in problem


def test_a_name_used_twice_is_named_also_beside_other_problems_of_the_block(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["scanner"] = [{"type": "serial", "name": "front"}, {"type": "stdin", "name": "front"}]
    assert problems_of(data) == [
        "[[scanner]] #1 port: missing; it is required",
        "[[scanner]] name = 'front': used twice; names must be unique",
    ]


def test_scanner_needs_known_type_and_a_name(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["scanner"] = [{"type": "laser", "name": "a"}, {"type": "stdin"}]
    problems = problems_of(data)
    assert any("[[scanner]] #1 type = 'laser'" in p and "'stdin'" in p for p in problems)
    assert any("[[scanner]] #2 name: missing" in p for p in problems)


def test_file_that_is_not_toml_is_refused(tmp_path):
    path = write(tmp_path / "config.toml", "[box\nid = ")
    with pytest.raises(ConfigError) as caught:
        config_mod.load(str(path))
    (problem,) = caught.value.problems
    assert problem.startswith("not valid TOML")
    assert caught.value.source == str(path)


def test_missing_config_file_is_refused_with_a_hint(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config_mod.load(str(tmp_path / "absent.toml"))
    assert "does not exist" in caught.value.problems[0]
    assert "REDEEMD_CONFIG" in caught.value.problems[0]


def test_scanner_key_problems_name_the_block_key_value_and_what_is_allowed(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["scanner"] = [
        {"type": "serial", "name": "a", "parity": "weird", "stopbits": True, "baud": 19200},
        {"type": "hid", "name": "b", "gap": "soon"},
    ]
    problems = problems_of(data)
    assert (
        "[[scanner]] #1 parity = 'weird': must be one of 'none', 'even', 'odd', 'mark', 'space'"
        in problems
    )
    assert "[[scanner]] #1 stopbits = True: must be one of 1, 1.5, 2" in problems
    (unknown,) = [p for p in problems if p.startswith("[[scanner]] #1 baud:")]
    assert unknown.startswith(
        "[[scanner]] #1 baud: unknown key; allowed: type, name, port, baudrate"
    )
    assert "[[scanner]] #1 port: missing; it is required" in problems
    assert "[[scanner]] #2 device: missing; it is required" in problems
    assert any(
        p.startswith("[[scanner]] #2 gap = 'soon': must be a duration such as") for p in problems
    )
    assert len(problems) == 6


def test_sync_problems_are_all_named_at_once(tmp_path, key_dir):
    data = base(tmp_path, key_dir)
    data["sync"] = {
        "broker": "mqtt://box:secret@broker.example",
        "cert_file": str(key_dir / "code.key"),
        "keepalive": "2s",
    }
    problems = problems_of(data)
    assert sorted(problems) == [
        "[sync] broker: do not put a password in the URL (it shows in logs and status); "
        "use password_file",
        "[sync] ca_file / cert_file / key_file: TLS files need an mqtts:// broker URL",
        "[sync] cert_file and key_file: give both (a client certificate and its key)",
        "[sync] keepalive = '2s': must be a duration between \"5s\" and 65535 s (0 for none)",
    ]


def test_scanner_settings_reach_the_driver_as_the_typed_model(tmp_path, key_dir):
    from drivers.serial import SerialScanner
    from drivers.settings import SerialSettings

    data = base(tmp_path, key_dir)
    data["scanner"] = [
        {"type": "serial", "name": "counter", "port": "/dev/ttyS9", "baudrate": 19200,
         "idle_gap": "20ms", "feedback": "raw", "good_read": "07"},
    ]  # fmt: skip
    (scanner,) = config_mod.parse(data, "t").scanners
    assert isinstance(scanner.settings, SerialSettings)
    assert scanner.settings.idle_gap == pytest.approx(0.02)
    driver = SerialScanner(scanner.name, scanner.settings)
    assert driver.settings is scanner.settings
    assert (driver.line, driver.settings.idle_gap, driver.commands.good) == (
        "19200 8N1",
        0.02,
        b"\x07",
    )


def test_a_driver_built_by_hand_gets_the_models_defaults_and_refuses_a_misspelt_key():
    from pydantic import ValidationError

    from drivers.serial import SerialScanner
    from drivers.settings import SerialSettings
    from drivers.stdin import StreamScanner

    driver = SerialScanner("counter", {"port": "/dev/ttyS9"})
    assert driver.settings == SerialSettings(port="/dev/ttyS9")
    assert (driver.line, driver.settings.terminator, driver.settings.idle_gap) == (
        "9600 8N1",
        "auto",
        0.05,
    )
    assert StreamScanner("stdin", {}).settings.path == "-"
    with pytest.raises(ValidationError, match="baudrat"):
        SerialScanner("counter", {"port": "/dev/ttyS9", "baudrat": 19200})


def test_the_hid_layouts_the_config_allows_are_the_ones_the_keymap_maps():
    # drivers/keymap.py needs libxkbcommon, so the model cannot import its table; this holds
    # the two together.
    from typing import get_args

    from drivers import keymap
    from drivers.settings import HidSettings, Layout

    assert set(get_args(Layout)) == set(keymap.LAYOUTS)
    assert (keymap.GAP, keymap.MIN_LENGTH) == (0.1, 3)
    assert HidSettings.of({"device": "0c2e:0b61"}).gap == keymap.KeyDecoder("us").gap == 0.1


def test_the_serial_parities_the_config_allows_are_the_ones_the_driver_maps():
    from typing import get_args

    from drivers import serial
    from drivers.settings import SerialSettings

    assert set(get_args(SerialSettings.model_fields["parity"].annotation)) == set(serial._PARITY)


def test_defaults_are_the_same_with_or_without_a_loaded_file(tmp_path, key_dir, monkeypatch):
    """A section's default is its model's, also where a section is made without the
    loader (the old dataclasses had their own: /run/redeemd/api.sock beside
    {runtime_dir}/api.sock)."""
    from daemon.api_commands import Commands
    from daemon.config_model import Api, Sync

    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    config = config_mod.parse(base(tmp_path, key_dir), "t")
    assert config.api == Api() and config.api.socket == tmp_path / "api.sock"
    assert config.sync == Sync() and (config.sync.host, config.sync.port) == ("127.0.0.1", 1883)
    # The local API's commands, made without the config (tests, tools), confirm as long.
    confirm = inspect.signature(Commands).parameters["confirm_within"].default
    assert confirm == config.api.confirm_within == 600.0


# ---------------------------------------------------------------- where the file comes from


def test_builtin_default_uses_state_directory(tmp_path, keyset, monkeypatch):
    write_box(tmp_path, keyset)  # writes keys/root.pub and keys/code.key under tmp_path
    monkeypatch.delenv("REDEEMD_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", tmp_path / "no-such-config.toml")
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}:/var/lib/other")
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))  # keys: {config_dir}/keys
    config = config_mod.load(None)
    assert "built-in defaults" in config.source
    assert config.box.state_dir == tmp_path
    assert config.box.database == tmp_path / "redeemd.db"
    assert config.trust.code_key == keyset.code_key
    assert [s.type for s in config.scanners] == ["stdin"]


def test_builtin_default_without_keys_names_the_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("REDEEMD_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", tmp_path / "no-such-config.toml")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        config_mod.load(None)
    joined = "\n".join(caught.value.problems)
    assert str(tmp_path / "keys" / "root.pub") in joined
    assert str(tmp_path / "keys" / "code.key") in joined


def test_redeemd_config_env_is_used_and_explicit_path_wins(tmp_path, keyset, monkeypatch):
    box = write_box(tmp_path, keyset)
    monkeypatch.setenv("REDEEMD_CONFIG", str(box.config_path))
    assert config_mod.load(None).source == str(box.config_path)
    assert config_mod.resolve_path(str(tmp_path / "other.toml")) == tmp_path / "other.toml"


# ---------------------------------------------------------------- redeemd check-config


def test_check_config_exits_zero_on_a_good_file(box):
    result = box.cli("check-config")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.startswith(f"{box.config_path}: ok")
    assert "box box-1, merchant demo, store store-1, 1 root key(s)" in out


def test_check_config_lists_each_problem_on_its_own_line(box):
    text = box.config_path.read_text()
    text = text.replace('id = "box-1"', 'id = "box 1"').replace('timezone = "UTC"', "timezone = 3")
    text += '\nshop = "x"\n[mqtt]\nhost = "x"\n'
    box.config_path.write_text(text)
    result = box.cli("check-config")
    assert result.returncode != 0
    lines = result.stderr.decode().splitlines()
    assert lines[0] == f"redeemd: configuration {box.config_path} is not usable:"
    problems = [line.strip() for line in lines[1:]]
    assert len(problems) == 4
    assert any(p.startswith("[box] id = 'box 1': must be") for p in problems)
    assert any(p.startswith("[box] timezone = 3: must be") for p in problems)
    assert any(p.startswith("[scan] shop: unknown key") for p in problems)
    assert any(p.startswith("[mqtt]: unknown section") for p in problems)
    assert "Traceback" not in result.stderr.decode()


def test_check_config_on_a_file_that_is_not_toml_fails(box):
    box.config_path.write_text("this is = = not toml")
    result = box.cli("check-config")
    assert result.returncode != 0
    assert "not valid TOML" in result.stderr.decode()


def test_check_config_honours_redeemd_config_env(box):
    result = run_cli("check-config", env={"REDEEMD_CONFIG": str(box.config_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{box.config_path}: ok")


def test_check_config_with_env_pointing_at_a_missing_file_fails(tmp_path):
    missing = tmp_path / "gone.toml"
    result = run_cli("check-config", env={"REDEEMD_CONFIG": str(missing)})
    assert result.returncode != 0
    assert str(missing) in result.stderr and "does not exist" in result.stderr
