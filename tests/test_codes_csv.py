"""CSV input of `redeemd-backend issue` (backend/codes_csv.py): every refusal names the
file's own line, header included, and what to do; nothing the protocol forbids passes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.codes_csv import CsvError, entries
from cards import batch
from cards.batch import Kind
from cards.digest import code_digest

KEY = b"k" * 32
ISSUE_SIZE = batch.ENTRY_SIZES[Kind.ISSUE]


def refusal(text: str, kind: Kind = Kind.ISSUE) -> str:
    with pytest.raises(CsvError) as caught:
        entries(text, kind, KEY)
    return str(caught.value)


def test_an_error_names_the_files_line_counting_the_header():
    assert (
        refusal("code,card_id\nGOOD-1,1\nBAD-1,one\n") == "line 3: card_id 'one' is not an integer"
    )
    assert refusal("GOOD-1,1\nBAD-1,one\n").startswith("line 2: ")


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("id,card", Kind.ISSUE),
        ("card_id,code", Kind.ISSUE),
        ("Code;Card_ID", Kind.ISSUE),
        ("code,card_id,uses", Kind.ISSUE),  # skips not_before, not_after
        ("code", Kind.ISSUE),  # no card_id
        ("code,card_id,not_before,not_after,uses,balance,note", Kind.ISSUE),
        ("barcode", Kind.REVOKE),
    ],
)
def test_a_wrong_header_is_refused_with_the_header_that_works(header, kind):
    message = refusal(f"{header}\nDEMO-0001,1\n", kind)
    assert message.startswith(f"line 1: the header {header!r} is not one this command reads")
    assert "code,card_id,not_before,not_after,uses,balance, comma-separated, in this order" in (
        message
    )


def test_a_header_is_only_read_on_line_1():
    assert refusal("DEMO-1,1\ncode,card_id\n") == (
        "line 2: card_id 'card_id' is not an integer; a header is only read on line 1"
    )


@pytest.mark.parametrize("line", [",1", " \t,1"])
def test_an_empty_code_is_refused(line):
    assert refusal(f"code,card_id\nGOOD-1,1\n{line}\n") == (
        "line 3: the code is empty: fill it in or remove the line"
    )


def test_a_line_without_card_id_is_refused_in_an_issue_batch():
    assert refusal("code,card_id\nGOOD-1,1\nGOOD-2\n").startswith("line 3: the card_id is missing")


def test_a_repeated_code_is_refused_even_written_differently():
    # ]Q1 (an AIM prefix) and surrounding spaces are removed by normalisation: one digest.
    message = refusal("code,card_id\nDEMO-1,1\nDEMO-2,1\nDEMO-3,1\n]Q1DEMO-1,2\n DEMO-2 ,1\n")
    assert message.startswith(
        "the same code is on more than one line: line 5 repeats line 2, line 6 repeats line 3;"
    )
    assert "remove the repeated lines" in message
    assert "DEMO" not in message  # codes are not printed: stderr ends up in logs


def test_repeats_in_a_revoke_batch_are_refused_too():
    assert "line 3 repeats line 2" in refusal("code\nDEMO-1\nDEMO-1\n", Kind.REVOKE)


def test_many_repeats_are_counted_not_all_listed():
    text = "code,card_id\n" + "DEMO-1,1\n" * 10
    assert "line 7 repeats line 2 (and 4 more)" in refusal(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("code,card_id\nX,1,5\n", "line 2: 3 fields, but the header names 2 (code,card_id)"),
        ("X,1,0,0,0,0,0\n", "line 1: 7 fields, but a line has at most 6"),
        ('code,card_id\nX,"1\n', "line 2: unexpected end of data; check the quotes"),
    ],
    ids=["more-than-the-header", "more-than-six", "unbalanced-quote"],
)
def test_a_line_that_does_not_fit_the_columns_is_refused(text, expected):
    assert refusal(text).startswith(expected)


def test_blank_lines_spreadsheet_padding_and_a_bom_are_accepted():
    text = "\ufeffcode,card_id,not_before,not_after,uses,balance\r\nA-1,1,,,,\r\n\r\n,,,,,\r\nA-2,1\r\n"
    assert len(entries(text, Kind.ISSUE, KEY)) == 2 * ISSUE_SIZE


def test_the_file_that_issued_codes_can_revoke_them():
    text = "code,card_id,not_before\nA-1,1,0\nA-2,1,0\n"
    assert entries(text, Kind.REVOKE, KEY) == batch.encode_digests(
        [code_digest(KEY, "A-1"), code_digest(KEY, "A-2")]
    )


def test_a_csv_cannot_make_a_consumed_batch():
    assert "made by the collector" in refusal("A-1\n", Kind.CONSUMED)


_row = st.tuples(
    st.sampled_from(["plain", "quoted-over-two-lines", "blank", "padding"]),
    st.integers(min_value=0, max_value=99),
)


@settings(max_examples=200, deadline=None)
@given(header=st.booleans(), before=st.lists(_row, max_size=15), after=st.lists(_row, max_size=5))
def test_the_line_named_is_the_files_line_however_the_file_is_laid_out(header, before, after):
    """Headers, blank lines, spreadsheet padding and quoted fields spanning two lines
    before a bad line: the error names the line an editor shows it on."""
    lines = ["code,card_id"] if header else []
    for serial, (kind, card) in enumerate([*before, ("bad", 0), *after]):
        if kind == "bad":
            bad_line = len(lines) + 1
            lines.append(f"BAD-{serial},not-a-number")
        elif kind == "plain":
            lines.append(f"CODE-{serial},{card}")
        elif kind == "quoted-over-two-lines":
            lines += [f'CODE-{serial},"{card}', '"']
        elif kind == "blank":
            lines.append("")
        else:
            lines.append(",,,")
    assert (
        refusal("\n".join(lines) + "\n")
        == f"line {bad_line}: card_id 'not-a-number' is not an integer"
    )
