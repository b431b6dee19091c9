"""Dependencies whose new major version could change bytes a backend reproduces.

biip holds the box's GS1 AI table: a new major version that changed an AI's pattern or
separator rule would change the canonical text, and so the digest, of codes already
issued (protocol.md section 2 step 10; tests/test_vectors.py checks the installed
table). pyproject.toml therefore admits only the major version that check passed with.
"""

from __future__ import annotations

import tomllib
from importlib import metadata

from conftest import ROOT
from packaging.requirements import Requirement


def requirement(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    assert len(found) == 1, f"{name} is not one dependency in pyproject.toml"
    return found[0]


def test_biip_is_pinned_to_the_major_version_its_gs1_table_was_checked_with():
    allowed = requirement("biip").specifier
    installed = metadata.version("biip")
    assert allowed.contains(installed), installed
    major = int(installed.split(".")[0])
    assert not allowed.contains(f"{major + 1}.0"), f"biip {major + 1} would be installed"
    assert not allowed.contains(f"{major - 1}.99"), f"biip {major - 1} would be installed"
