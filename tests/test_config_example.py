"""config.example.toml is the technician's reference: it must parse and name every key."""

from pathlib import Path

from conftest import ROOT, write_box

from daemon import config as config_mod


def test_example_config_parses_and_documents_every_key(tmp_path: Path, keyset, monkeypatch):
    write_box(tmp_path, keyset)  # creates keys/root.pub and keys/code.key
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))  # {config_dir}/keys
    text = (ROOT / "config.example.toml").read_text()
    path = tmp_path / "example.toml"
    path.write_text(text.replace('"/var/lib/redeemd"', f'"{tmp_path}"'))
    config = config_mod.load(str(path))
    assert config.box.database == tmp_path / "redeemd.db"
    assert len(config.trust.root_keys) == 1
    for section, keys in config_mod.SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text, f"config.example.toml does not document [{section}] {key}"
    for key in config_mod.SCANNER_SCHEMA:
        assert f"\n{key} = " in text
    for kind, keys in config_mod.SCANNER_SCHEMAS.items():
        assert f'type = "{kind}"' in text, f"config.example.toml has no {kind} scanner example"
        for key in keys:
            assert f"\n{key} = " in text or f"\n# {key} = " in text, (
                f"config.example.toml does not document the {kind} scanner key {key}"
            )


def test_commented_scanner_examples_parse_when_uncommented(tmp_path: Path, keyset, monkeypatch):
    import re

    write_box(tmp_path, keyset)
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))  # {config_dir}/keys
    text = (ROOT / "config.example.toml").read_text().replace('"/var/lib/redeemd"', f'"{tmp_path}"')
    uncommented = re.sub(r"(?m)^# (\[\[scanner\]\]|[a-z_0-9]+ = .*)$", r"\1", text)
    path = tmp_path / "example.toml"
    path.write_text(uncommented)
    config = config_mod.load(str(path))
    assert [s.type for s in config.scanners] == ["stdin", "serial", "hid", "camera"]
    serial = config.scanners[1].settings
    assert serial["terminator"] == "auto" and serial["good_read"] == b""
