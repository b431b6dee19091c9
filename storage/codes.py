"""The code cache: one row per code digest, keyed for a single B-tree probe."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

LOOKUP = (
    "SELECT card_id, not_before, not_after, uses_left, balance, status, account FROM codes "
    "WHERE digest = ?"
)
# An account by id (docs/protocol.md 19).
ACCOUNT_LOOKUP = (
    "SELECT card_id, not_before, not_after, uses_left, balance, status FROM accounts "
    "WHERE account = ?"
)
# The scan path's read (daemon/engine.py): the code's row, LOOKUP's columns (0-6), and for
# a linked code its account's, ACCOUNT_LOOKUP's (7-12; NULL for a plain code or an account
# the box lacks: accounts.card_id is NOT NULL, so column 7 tells); then the unacknowledged
# spend of the offline limits (storage/accounts.py), the code's (13) and the account's
# (14). One statement for what took three on a linked code with a limit
# (docs/decisions.md, "One read for a linked code").
SCAN_LOOKUP = (
    "SELECT c.card_id, c.not_before, c.not_after, c.uses_left, c.balance, c.status, "
    "c.account, a.card_id, a.not_before, a.not_after, a.uses_left, a.balance, a.status, "
    "c.spent, a.spent "
    "FROM codes c LEFT JOIN accounts a ON a.account = c.account WHERE c.digest = ?"
)
UPDATE_ACCOUNT = "UPDATE accounts SET uses_left = ?, balance = ? WHERE account = ?"
UPSERT_STATE = (
    "INSERT INTO codes(digest, card_id, uses_left, balance, status) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(digest) DO UPDATE SET uses_left = excluded.uses_left, "
    "balance = excluded.balance, status = excluded.status"
)


@dataclass(frozen=True)
class CodeRow:
    card_id: int
    not_before: int | None
    not_after: int | None
    uses_left: int | None
    balance: int | None
    status: int
    account: bytes | None = None


def lookup(conn: sqlite3.Connection, digest: bytes) -> CodeRow | None:
    row = conn.execute(LOOKUP, (digest,)).fetchone()
    return CodeRow(*row) if row else None


def count(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0]
    return value


@dataclass(frozen=True)
class AccountRow:
    """An account as stored (docs/protocol.md 19.1; NULL = the card's default,
    uses_left -1 = unlimited)."""

    card_id: int
    not_before: int | None
    not_after: int | None
    uses_left: int | None
    balance: int | None
    status: int


def account(conn: sqlite3.Connection, account_id: bytes) -> AccountRow | None:
    """The account with this id, or None when the box does not have it."""
    row = conn.execute(ACCOUNT_LOOKUP, (account_id,)).fetchone()
    return AccountRow(*row) if row else None


def linked_codes(conn: sqlite3.Connection, account_id: bytes) -> list[bytes]:
    """Digests of the codes linked to an account (a walk of the codes table: for tools
    and tests, never the scan path)."""
    rows = conn.execute("SELECT digest FROM codes WHERE account = ? ORDER BY digest", (account_id,))
    return [row[0] for row in rows]
