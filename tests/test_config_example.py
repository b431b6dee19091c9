"""config.example.toml is the technician's reference: it must parse and name every key."""

from pathlib import Path

from conftest import ROOT, write_box

from daemon import config as config_mod


def test_example_config_parses_and_documents_every_key(tmp_path: Path, keyset):
    write_box(tmp_path, keyset)  # creates keys/root.pub and keys/code.key
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
