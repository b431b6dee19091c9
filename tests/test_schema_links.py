"""A backend team finds the message schemas from where they start reading: the
README's "Read on" line for building a backend, and docs/backend.md."""

from __future__ import annotations

import re

from conftest import ROOT

SCHEMAS = ("events", "ack", "status")


def test_readme_building_a_backend_line_links_the_schemas_directory():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    read_on = text.split("## Read on", 1)[1]
    line = next(li for li in read_on.splitlines() if li.startswith("- Building a backend"))
    targets = re.findall(r"\]\(([^)]+)\)", line)
    assert "docs/schemas/" in targets, line
    for name in SCHEMAS:
        assert (ROOT / "docs" / "schemas" / f"{name}.schema.json").is_file(), name


def test_backend_page_points_to_the_schemas():
    text = (ROOT / "docs" / "backend.md").read_text(encoding="utf-8")
    assert "docs/schemas/" in text
