"""config.example.toml is the technician's reference: it must parse and name every key."""

import re
import tomllib
from pathlib import Path

from conftest import ROOT, write_box

from daemon import config as config_mod
from daemon.config_model import SECTIONS, Places, ScannerBlock, file_keys
from drivers.settings import SCANNER_SETTINGS


def test_example_config_parses_and_documents_every_key(tmp_path: Path, keyset, monkeypatch):
    write_box(tmp_path, keyset)  # creates keys/root.pub and keys/code.key
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))  # {config_dir}/keys
    text = (ROOT / "config.example.toml").read_text()
    path = tmp_path / "example.toml"
    path.write_text(text.replace('"/var/lib/redeemd"', f'"{tmp_path}"'))
    config = config_mod.load(str(path))
    assert config.box.database == tmp_path / "redeemd.db"
    assert len(config.trust.root_keys) == 1
    for section, model in SECTIONS.items():
        assert f"[{section}]" in text
        for key in file_keys(model):
            assert f"\n{key} = " in text, f"config.example.toml does not document [{section}] {key}"
    for key in ScannerBlock.model_fields:
        assert f"\n{key} = " in text
    for kind, model in SCANNER_SETTINGS.items():
        assert f'type = "{kind}"' in text, f"config.example.toml has no {kind} scanner example"
        for key in file_keys(model):
            assert f"\n{key} = " in text or f"\n# {key} = " in text, (
                f"config.example.toml does not document the {kind} scanner key {key}"
            )


def test_commented_scanner_examples_parse_when_uncommented(tmp_path: Path, keyset, monkeypatch):
    write_box(tmp_path, keyset)
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))  # {config_dir}/keys
    text = (ROOT / "config.example.toml").read_text().replace('"/var/lib/redeemd"', f'"{tmp_path}"')
    uncommented = re.sub(r"(?m)^# (\[\[scanner\]\]|[a-z_0-9]+ = .*)$", r"\1", text)
    path = tmp_path / "example.toml"
    path.write_text(uncommented)
    config = config_mod.load(str(path))
    assert [s.type for s in config.scanners] == ["stdin", "serial", "hid", "camera"]
    serial = config.scanners[1].settings
    assert serial.terminator == "auto" and serial.good_read == b""


def test_example_shows_the_default_the_model_gives_every_key():
    """'Every key is shown with its default': a default changed in daemon/config_model.py
    or drivers/settings.py, the one place defaults are written, must change here too."""
    text = (ROOT / "config.example.toml").read_text()
    data = tomllib.loads(re.sub(r"(?m)^# (\[\[scanner\]\]|[a-z_0-9]+ = .*)$", r"\1", text))
    context = {"places": Places("/etc/redeemd", "/var/lib/redeemd", "/run/redeemd")}
    for section, model in SECTIONS.items():
        shown = model.model_validate(data[section], context=context)
        default = model.model_validate({}, context=context)
        for key in file_keys(model):
            assert getattr(shown, key) == getattr(default, key), (
                f"config.example.toml shows [{section}] {key} = {data[section][key]!r}, "
                f"but its default is {getattr(default, key)!r}"
            )
    for block in data["scanner"]:
        model = SCANNER_SETTINGS[block["type"]]
        given = {k: v for k, v in block.items() if k not in ScannerBlock.model_fields}
        required = {k: v for k, v in given.items() if model.model_fields[k].is_required()}
        assert model.model_validate(given) == model.model_validate(required), (
            f"config.example.toml's {block['type']} scanner shows a value that is not its default"
        )
