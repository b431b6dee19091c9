"""Accounts on the box: the offline limits and the unacknowledged spend.

An account (docs/protocol.md 19) holds the uses or balance its linked codes spend; the
engine reads it with the code (`codes.SCAN_LOOKUP`) and writes its new state in the
redemption's transaction. The offline limits are the backend's `limits` batch, as
stored. The unacknowledged spend is what this box accepted per account (a code without
one: per code) in records still in the outbox, kept in the `spent` column of the
account's row (or the code's) and only for cards with a per_account limit ("tracked"
cards):

- a redemption of a tracked card adds to it (`SPEND_ACCOUNT`, `SPEND_CODE`) in the
  statement that writes the row's new state, so it costs no WAL page or statement of its
  own; the engine reads it with the code (`codes.SCAN_LOOKUP`);
- an ack lowers it by the records it moves past (`release`, from storage/outbox.py);
- a `limits` batch, and a snapshot (which replaces the codes), recompute it from the
  outbox (`rebuild_spend`), because the set of tracked cards or the rows changed.

So the limit check reads one row the redemption is about to write, however long the
outbox is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from cards.card import Limit

# A tracked redemption's new state and its spend in one statement: codes.UPDATE_ACCOUNT
# and codes.UPSERT_STATE, each with the spend added.
SPEND_ACCOUNT = (
    "UPDATE accounts SET uses_left = ?, balance = ?, spent = COALESCE(spent, 0) + ? "
    "WHERE account = ?"
)
SPEND_CODE = (
    "INSERT INTO codes(digest, card_id, uses_left, balance, status, spent) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(digest) DO UPDATE SET uses_left = excluded.uses_left, "
    "balance = excluded.balance, status = excluded.status, "
    "spent = COALESCE(codes.spent, 0) + excluded.spent"
)
# The spend a record counts for: its account (or, without one, its code), the amount for
# balance cards or the uses for the others; only accepted redemptions of tracked cards.
# Reversals do not lower it: the backend's ack does (protocol.md 19.5).
_SPEND_OF = (
    "SELECT account, CASE WHEN account IS NULL THEN digest END AS code, "
    "SUM(COALESCE(amount, uses, 0)) FROM ledger "
    "WHERE {where} AND verdict = 'accepted' AND action = 'redeem' AND digest IS NOT NULL "
    "AND card_id IN (SELECT card_id FROM limits WHERE per_account IS NOT NULL) "
    "GROUP BY account, code"
)
_WAITING = (
    "seq > (SELECT seq FROM ledger_marks WHERE name = 'acked') "
    "AND seq NOT IN (SELECT seq FROM outbox_acked)"
)
_LOWER_ACCOUNT = (
    "UPDATE accounts SET spent = NULLIF(MAX(COALESCE(spent, 0) - ?, 0), 0) WHERE account = ?"
)
_LOWER_CODE = "UPDATE codes SET spent = NULLIF(MAX(COALESCE(spent, 0) - ?, 0), 0) WHERE digest = ?"


def limits(conn: sqlite3.Connection) -> list[Limit]:
    """Every offline limit the box holds (for every box: cards.card.limit_for picks)."""
    rows = conn.execute(
        "SELECT card_id, box, per_redemption, per_account FROM limits ORDER BY card_id, box"
    )
    return [Limit(*row) for row in rows]


def tracked_cards(held: Iterable[Limit]) -> frozenset[int]:
    """Cards whose redemptions count in the spend: those with a per_account limit for any
    box. The same set as _SPEND_OF's, so what is added is what acks take away."""
    return frozenset(limit.card_id for limit in held if limit.per_account is not None)


def replace_limits(conn: sqlite3.Connection, held: Iterable[Limit]) -> None:
    """Store `held` instead of every limit before, and recompute the spend for the cards
    now tracked. The caller owns the transaction."""
    conn.execute("DELETE FROM limits")
    conn.executemany(
        "INSERT INTO limits(card_id, box, per_redemption, per_account) VALUES (?, ?, ?, ?)",
        ((lim.card_id, lim.box, lim.per_redemption, lim.per_account) for lim in held),
    )
    rebuild_spend(conn)


def rebuild_spend(conn: sqlite3.Connection) -> None:
    """The spend from the records waiting in the outbox. Only rows a waiting record names
    can hold one (the rest were lowered to nothing by acks), so the codes table is not
    walked. The caller owns the transaction."""
    conn.execute("UPDATE accounts SET spent = NULL WHERE spent IS NOT NULL")
    conn.execute(
        "UPDATE codes SET spent = NULL WHERE digest IN (SELECT digest FROM ledger WHERE "
        + _WAITING
        + " AND account IS NULL AND digest IS NOT NULL) AND spent IS NOT NULL"
    )
    for account, code, amount in conn.execute(_SPEND_OF.format(where=_WAITING)).fetchall():
        if account is not None:
            conn.execute("UPDATE accounts SET spent = ? WHERE account = ?", (amount, account))
        else:
            conn.execute("UPDATE codes SET spent = ? WHERE digest = ?", (amount, code))


def release(conn: sqlite3.Connection, where: str, params: tuple[object, ...]) -> None:
    """Lower the spend by the records selected by `where` (an SQL condition on the ledger
    with `params`), which an ack is about to mark delivered: call it before the mark
    moves. Nothing is read when no card is tracked (a box without per_account limits),
    so an ack costs what it did. The caller owns the transaction."""
    tracked = "SELECT 1 FROM limits WHERE per_account IS NOT NULL LIMIT 1"
    if conn.execute(tracked).fetchone() is None:
        return
    for account, code, amount in conn.execute(_SPEND_OF.format(where=where), params).fetchall():
        if account is not None:
            conn.execute(_LOWER_ACCOUNT, (amount, account))
        else:
            conn.execute(_LOWER_CODE, (amount, code))
