"""Accounts on the box: their rows, the offline limits, and the unacknowledged spend.

An account (docs/protocol.md 19) holds the uses or balance its linked codes spend; the
engine probes it by id (`codes.ACCOUNT_LOOKUP`) and writes its new state in the
redemption's transaction. The offline limits are the backend's `limits` batch, as
stored. The unacknowledged spend is what this box accepted per account (a code without
one is keyed by its digest) in records still in the outbox, kept in `account_spend`
only for cards with a per_account limit ("tracked" cards):

- a redemption of a tracked card adds to it in its own transaction (`ADD_SPEND`);
- an ack lowers it by the records it moves past (`release`, from storage/outbox.py);
- a `limits` batch recomputes it from the outbox (`rebuild_spend`), because the set of
  tracked cards may have changed.

So `spent` is one primary-key probe, however long the outbox is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from cards.card import Limit

SPENT = "SELECT spent FROM account_spend WHERE key = ?"
ADD_SPEND = (
    "INSERT INTO account_spend(key, spent) VALUES (?, ?) "
    "ON CONFLICT(key) DO UPDATE SET spent = spent + excluded.spent"
)
# The spend a record counts for: its account (or its code), the amount for balance cards
# or the uses for the others; only accepted redemptions of tracked cards. Reversals do
# not lower it: the backend's ack does (protocol.md 19.5).
_SPEND_OF = (
    "SELECT COALESCE(account, digest), SUM(COALESCE(amount, uses, 0)) FROM ledger "
    "WHERE {where} AND verdict = 'accepted' AND action = 'redeem' "
    "AND card_id IN (SELECT card_id FROM limits WHERE per_account IS NOT NULL) "
    "GROUP BY 1"
)
_WAITING = (
    "seq > (SELECT seq FROM ledger_marks WHERE name = 'acked') "
    "AND seq NOT IN (SELECT seq FROM outbox_acked)"
)


def limits(conn: sqlite3.Connection) -> list[Limit]:
    """Every offline limit the box holds (for every box: cards.card.limit_for picks)."""
    rows = conn.execute(
        "SELECT card_id, box, per_redemption, per_account FROM limits ORDER BY card_id, box"
    )
    return [Limit(*row) for row in rows]


def tracked_cards(held: Iterable[Limit]) -> frozenset[int]:
    """Cards whose redemptions count in account_spend: those with a per_account limit for
    any box. The same set as _SPEND_OF's, so what is added is what acks take away."""
    return frozenset(limit.card_id for limit in held if limit.per_account is not None)


def spent(conn: sqlite3.Connection, key: bytes) -> int:
    """This box's unacknowledged accepted spend for an account id (or a code's digest)."""
    row = conn.execute(SPENT, (key,)).fetchone()
    return 0 if row is None else int(row[0])


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
    """account_spend from the records waiting in the outbox. The caller owns the
    transaction."""
    conn.execute("DELETE FROM account_spend")
    conn.execute("INSERT INTO account_spend(key, spent) " + _SPEND_OF.format(where=_WAITING))
    conn.execute("DELETE FROM account_spend WHERE spent <= 0")


def release(conn: sqlite3.Connection, where: str, params: tuple[object, ...]) -> None:
    """Lower account_spend by the records selected by `where` (an SQL condition on the
    ledger with `params`), which an ack is about to mark delivered: call it before the
    mark moves. Nothing is read when no spend is held (a box without per_account
    limits), so an ack costs what it did. The caller owns the transaction."""
    if conn.execute("SELECT 1 FROM account_spend LIMIT 1").fetchone() is None:
        return
    found = conn.execute(_SPEND_OF.format(where=where), params).fetchall()
    conn.executemany(
        "UPDATE account_spend SET spent = spent - ? WHERE key = ?",
        ((amount, key) for key, amount in found),
    )
    conn.execute("DELETE FROM account_spend WHERE spent <= 0")
