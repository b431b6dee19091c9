"""Codes from a CSV file, for `redeemd-backend issue`: a file's rows -> batch entries.

The format (docs/backend.md, "Codes from a CSV file"):

    code,card_id,not_before,not_after,uses,balance
    DEMO-0001,1
    DEMO-0002,1,1767225600,1798761600,3

- One code a line, then its fields, comma-separated, in that order; only `code` and
  (for `issue` and `snapshot` batches) `card_id` are required, an empty field is 0.
  A negative `uses` means unlimited. `revoke`, `block` and `unblock` batches use only
  the `code` column, so the file that issued the codes can revoke them.
- The header is optional. A first line naming any column is a header, and must name
  the columns above in that order (a start of the list, like `code,card_id`).
- Blank lines (or lines of empty fields, as spreadsheets write) are skipped; a line with
  fields but no code is refused.
- Every code appears once: a batch lists each digest once (protocol.md section 9), and
  two spellings of one code (`]Q1DEMO-1` and `DEMO-1`) normalise to the same digest.

Every error names the file's own line number (the header is line 1) and what to do, so
the file can be fixed in an editor, and nothing is issued from a file with an error in it.
The codes themselves are never printed: stderr ends up in logs.

    >>> from cards.batch import Kind
    >>> len(entries("code,card_id\\nDEMO-1,1\\nDEMO-2,1\\n", Kind.ISSUE, b"k" * 32))
    82
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

from cards import batch
from cards.batch import UNLIMITED, CodeStatus, Kind
from cards.digest import code_digest
from cards.normalize import MalformedCode, normalize

COLUMNS = ("code", "card_id", "not_before", "not_after", "uses", "balance")
HEADER = ",".join(COLUMNS)
ISSUED = (Kind.ISSUE, Kind.SNAPSHOT)
SHOWN_DUPLICATES = 5
"""Repeated codes named in the error; the rest are counted."""

# What a header written with another separator or in another order is split on to be
# recognised as a header (and refused), rather than taken for a code.
_HEADER_WORDS = re.compile(r"[,;\t|]+")
_WORDS = re.compile(r"[a-z_ ]*[a-z][a-z_ ]*")
_IF_A_CODE = "; if line 1 is a code, not a header, put the header line 'code' above it"
_LARGEST = {
    "card_id": UNLIMITED,
    "not_before": UNLIMITED,
    "not_after": UNLIMITED,
    "uses": UNLIMITED,
    "balance": batch.MAX_BALANCE,
}


class CsvError(ValueError):
    """The file cannot be issued; the message names the line and what to do."""


def entries(text: str, kind: Kind, code_key: bytes) -> bytes:
    """The entries of a `kind` batch for the codes in `text` (see the module docstring).

    Raises CsvError for the first line that cannot be issued, or for codes that appear
    on more than one line.
    """
    if kind is Kind.CONSUMED:
        raise CsvError("consumed-elsewhere batches are made by the collector, not from a CSV")
    columns = len(COLUMNS)
    first_line: dict[bytes, int] = {}
    repeats: list[tuple[int, int]] = []
    issued: list[tuple[bytes, int, int, int, int, int, int]] = []
    for start, row in _records(text):
        cells = _trimmed(row)
        if not cells:
            continue
        if start == 1 and _names_a_column(cells):
            columns = _header(cells, kind)
            continue
        if len(cells) > columns:
            raise CsvError(
                f"line {start}: {len(cells)} fields, but {_allowed(columns)}; "
                "a code with a comma in it must be in double quotes"
            )
        if not cells[0].strip():
            raise CsvError(f"line {start}: the code is empty: fill it in or remove the line")
        try:
            canonical = normalize(cells[0].encode("utf-8")).text
        except MalformedCode as exc:
            raise CsvError(f"line {start}: the code is not usable: {exc}") from None
        digest = code_digest(code_key, canonical)
        if digest in first_line:
            repeats.append((first_line[digest], start))
            continue
        first_line[digest] = start
        if kind in ISSUED:
            issued.append((digest, *_fields(cells, start), CodeStatus.ACTIVE))
    if repeats:
        raise CsvError(_repeated(repeats))
    if kind in ISSUED:
        return batch.encode_issue(issued)
    return batch.encode_digests(first_line)


def _records(text: str) -> Iterator[tuple[int, list[str]]]:
    """(the file's line number where the record starts, its fields)."""
    # strict: an unbalanced quote is an error, not a field that runs to the end of the file.
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")), strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a field over csv's size limit, a stray quote
            raise CsvError(f"line {start}: {exc}; check the quotes") from None
        yield start, row
        # line_num counts the lines read so far: a quoted field may span several.
        start = reader.line_num + 1


def _trimmed(row: list[str]) -> list[str]:
    """The row without its trailing empty fields ("A,1,,," is "A,1"); [] for a blank line."""
    end = len(row)
    while end and not row[end - 1].strip():
        end -= 1
    return row[:end]


def _names_a_column(cells: list[str], words_only: bool = True) -> bool:
    """Whether line 1 is a header: it names a column (in any case, order or separator),
    or (`words_only`) it is only lower-case words (`barcode`, `coupon,card`), which no
    code generator writes and many headers are; a code like that is refused with the
    way out (_IF_A_CODE)."""
    words = {w.lower() for cell in cells for w in _HEADER_WORDS.split(cell.strip()) if w}
    if not words.isdisjoint(COLUMNS):
        return True
    return words_only and all(_WORDS.fullmatch(c.strip()) for c in cells)


def _header(cells: list[str], kind: Kind) -> int:
    """The number of columns a header names; CsvError unless it is a start of COLUMNS."""
    names = tuple(cell.strip().lower() for cell in cells)
    needed = 2 if kind in ISSUED else 1
    if names != COLUMNS[: len(names)] or len(names) < needed:
        required = "code,card_id" if kind in ISSUED else "code"
        raise CsvError(
            f"line 1: the header {','.join(cells)!r} is not one this command reads: the "
            f"columns are {HEADER}, comma-separated, in this order, and a header may stop "
            f"after any of them but must start with {required}; fix the header or remove it"
            + ("" if _names_a_column(cells, words_only=False) else _IF_A_CODE)
        )
    return len(names)


def _allowed(columns: int) -> str:
    if columns == len(COLUMNS):
        return f"a line has at most {columns} ({HEADER})"
    return f"the header names {columns} ({','.join(COLUMNS[:columns])})"


def _fields(cells: list[str], line: int) -> tuple[int, int, int, int, int]:
    """card_id, not_before, not_after, uses, balance of an issue line."""
    if len(cells) < 2 or not cells[1].strip():
        raise CsvError(
            f"line {line}: the card_id is missing: an issue batch needs code,card_id on every line"
        )
    values = []
    for name, cell in zip(COLUMNS[1:], [*cells[1:], *[""] * len(COLUMNS)], strict=False):
        try:
            value = int(cell) if cell.strip() else 0
        except ValueError:
            raise CsvError(
                f"line {line}: {name} {cell.strip()!r} is not an integer"
                + ("; a header is only read on line 1" if cell.strip() in COLUMNS else "")
            ) from None
        # A negative uses is the CSV's way to say unlimited (0xFFFFFFFF).
        if value > _LARGEST[name] or (value < 0 and name != "uses"):
            raise CsvError(
                f"line {line}: {name} {value} is out of range: allowed 0..{_LARGEST[name]}"
            )
        values.append(UNLIMITED if name == "uses" and value < 0 else value)
    card_id, not_before, not_after, uses, balance = values
    return card_id, not_before, not_after, uses, balance


def _repeated(repeats: list[tuple[int, int]]) -> str:
    shown = ", ".join(
        f"line {later} repeats line {first}" for first, later in repeats[:SHOWN_DUPLICATES]
    )
    more = len(repeats) - SHOWN_DUPLICATES
    return (
        f"the same code is on more than one line: {shown}"
        + (f" (and {more} more)" if more > 0 else "")
        + "; codes that differ only in what normalisation removes (an AIM prefix, spaces) "
        "are the same code. A batch lists each code once: remove the repeated lines"
    )
