"""Applying verified batches to the cache: all or nothing, never backwards.

`cards.batch` has already checked signatures, trust chain, hashes and sizes. Here the
sequence is checked against the trust state (a replay is a no-op, an older or
conflicting sequence is refused, a gap is reported with the missing range) and the
batch is applied in one transaction together with the new trust state, so a crash
leaves either the old cache or the new one, never half of each.

A batch is the same batch when its merchant, seq, kind and entries are the same, whoever
signed it and when: a backend re-signs a batch that expired before a box could apply it
(docs/protocol.md 16.6), and that must be a replay here, never a conflict.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from cards.batch import MAX_BALANCE, UNLIMITED, Batch, CodeStatus, Header, Kind
from cards.card import Card, CardError, parse_card
from cards.rules import UNLIMITED_USES, resolve
from storage import accounts, ledger, trust

INSERT_ISSUED = (
    "INSERT INTO codes(digest, card_id, not_before, not_after, uses_left, balance, status) "
    "VALUES (?1, ?2, NULLIF(?3, 0), NULLIF(?4, 0), "
    f"CASE ?5 WHEN 0 THEN NULL WHEN {UNLIMITED} THEN {UNLIMITED_USES} ELSE ?5 END, "
    "NULLIF(?6, 0), ?7) "
    # Re-issuing changes card and window but keeps what was redeemed here.
    "ON CONFLICT(digest) DO UPDATE SET card_id = excluded.card_id, "
    "not_before = excluded.not_before, not_after = excluded.not_after"
)
# An account entry is an issue entry keyed by the account id; re-sending an account
# changes its card, window and status but never the uses or balance spent here.
UPSERT_ACCOUNT = (
    "INSERT INTO accounts(account, card_id, not_before, not_after, uses_left, balance, status) "
    "VALUES (?1, ?2, NULLIF(?3, 0), NULLIF(?4, 0), "
    f"CASE ?5 WHEN 0 THEN NULL WHEN {UNLIMITED} THEN {UNLIMITED_USES} ELSE ?5 END, "
    "NULLIF(?6, 0), ?7) "
    "ON CONFLICT(account) DO UPDATE SET card_id = excluded.card_id, "
    "not_before = excluded.not_before, not_after = excluded.not_after, status = excluded.status"
)
SET_STATUS = (
    "INSERT INTO codes(digest, card_id, status) VALUES (?, 0, {status}) "
    "ON CONFLICT(digest) DO UPDATE SET status = {status}"
)


class ImportRefused(ValueError):
    """The batch is authentic but cannot be applied now; nothing was written."""


class SequenceGap(ImportRefused):
    def __init__(self, merchant: str, first_missing: int, last_missing: int):
        self.merchant = merchant
        self.first_missing = first_missing
        self.last_missing = last_missing
        span = f"{first_missing}-{last_missing}" if last_missing > first_missing else first_missing
        super().__init__(
            f"batches {first_missing}..{last_missing} for merchant {merchant!r} are missing; "
            f"apply them first: on the backend, `redeemd-backend export {span} --merchant "
            f"{merchant} --dir KEYS --out DIR` writes them as files (or let sync request them)"
        )


class BatchConflict(ImportRefused):
    """A different batch with an applied sequence: the backend or an issuer key is broken."""

    def __init__(self, merchant: str, seq: int):
        self.merchant = merchant
        self.seq = seq
        super().__init__(
            f"a different batch {merchant}/{seq} was already applied; refusing the "
            "conflicting one (possible key compromise: tell the backend team)"
        )


class BatchExpired(ImportRefused):
    """Authentic but too old to apply: only the backend can make it current again."""


@dataclass(frozen=True)
class ImportResult:
    merchant: str
    seq: int
    kind: str
    count: int
    replay: bool = False

    def describe(self) -> str:
        if self.replay:
            return f"batch {self.merchant}/{self.seq} was already applied; nothing to do"
        return f"applied {self.kind} batch {self.merchant}/{self.seq}: {self.count} entries"


# A signed time further ahead of a trusted wall clock than this is refused: one batch
# with a far-future created_at would otherwise raise the time floor for good and
# expire every code on the box.
MAX_CLOCK_AHEAD = 86400


def apply(
    conn: sqlite3.Connection,
    batch: Batch,
    *,
    merchant: str,
    now: int,
    wall: int | None = None,
) -> ImportResult:
    """Apply `batch` for this box's `merchant`, with `now` already floored.

    `wall` is the unfloored system clock; when it is at or past the time floor it is
    trusted enough to refuse batches signed implausibly far in the future.
    """
    header = batch.header
    if header.merchant != merchant:
        raise ImportRefused(
            f"batch is for merchant {header.merchant!r} but this box serves {merchant!r}"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = _apply_locked(conn, batch, now, wall)
        conn.execute("COMMIT")
    except BaseException:
        # A disk-full or I/O error may have rolled back already; keep its message.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def replayed(conn: sqlite3.Connection, header: Header) -> bool:
    """True if this batch was applied already (in this signing or another): nothing to do.

    False if its sequence is still to come. Raises BatchConflict for a different batch
    with an applied sequence and ImportRefused for any other sequence at or below the
    applied one (skipped by a snapshot: a rollback). Only the signed header is needed,
    so sync can decide this on the first chunk of a batch.
    """
    applied = conn.execute(
        "SELECT sha256, kind, count, entries_sha256 FROM batches WHERE merchant = ? AND seq = ?",
        (header.merchant, header.seq),
    ).fetchone()
    if applied:
        sha256, kind, count, entries_sha256 = applied
        if sha256 == header.sha256 or _same_content(header, kind, count, entries_sha256):
            return True
        raise BatchConflict(header.merchant, header.seq)
    last_seq = trust.state(conn, header.merchant).last_seq
    if header.seq <= last_seq:
        raise ImportRefused(
            f"batch {header.seq} is older than the applied sequence {last_seq} (rollback refused)"
        )
    return False


def _same_content(header: Header, kind: str, count: int, entries_sha256: str | None) -> bool:
    if entries_sha256 is None:
        # Applied before the box kept entries hashes (migration m004): kind and count
        # are all that is left to compare. Either way the batch is not applied again.
        return (kind, count) == (header.kind.value, header.count)
    return (kind, entries_sha256) == (header.kind.value, header.entries_sha256)


def _export_hint(header: Header, copy: str = "a re-signed copy") -> str:
    return (
        f"`redeemd-backend export {header.seq} --merchant {header.merchant} --dir KEYS "
        f"--out DIR` on the backend writes {copy} (sync asks for one by itself)"
    )


def _apply_locked(
    conn: sqlite3.Connection, batch: Batch, now: int, wall: int | None
) -> ImportResult:
    header = batch.header
    if replayed(conn, header):
        return ImportResult(header.merchant, header.seq, header.kind, header.count, replay=True)
    current = trust.state(conn, header.merchant)
    if header.seq > current.last_seq + 1 and header.kind is not Kind.SNAPSHOT:
        raise SequenceGap(header.merchant, current.last_seq + 1, header.seq - 1)
    if header.expires_at < max(now, current.time_floor):
        raise BatchExpired(
            f"batch {header.seq} expired at {_when(header.expires_at)}; {_export_hint(header)}"
        )

    if now > header.issuer.not_after:
        raise BatchExpired(
            f"batch {header.seq} is signed by issuer key {header.issuer.key_id}, delegated "
            f"until {_when(header.issuer.not_after)}; "
            f"{_export_hint(header, 'a copy re-signed with the current key')}"
        )
    if (
        wall is not None
        and wall >= current.time_floor
        and header.created_at > wall + MAX_CLOCK_AHEAD
    ):
        raise ImportRefused(
            f"batch {header.seq} claims to be made at {header.created_at}, more than a day "
            f"ahead of this box's clock ({wall}); check the backend's clock"
        )

    _APPLY[header.kind](conn, batch)
    trust.remember_issuer(conn, header.issuer)
    trust.save_state(conn, header.merchant, header.seq, header.created_at, now)
    conn.execute(
        "INSERT INTO batches(merchant, seq, kind, sha256, count, created_at, applied_at, "
        "entries_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            header.merchant,
            header.seq,
            header.kind.value,
            header.sha256,
            header.count,
            header.created_at,
            now,
            header.entries_sha256,
        ),
    )
    return ImportResult(header.merchant, header.seq, header.kind, header.count)


def _when(seconds: int) -> str:
    """Unix seconds as a person reads them, with the number for logs and tooling."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds)) + f" ({seconds})"


def _apply_cards(conn: sqlite3.Connection, batch: Batch) -> None:
    rows = []
    for body in batch.card_templates():
        try:
            card = parse_card(body)
        except CardError as exc:
            raise ImportRefused(f"cards batch {batch.header.seq}: {exc}") from None
        if card.merchant != batch.header.merchant:
            raise ImportRefused(f"card {card.card_id} belongs to another merchant")
        rows.append((card.card_id, card.merchant, json.dumps(body, sort_keys=True)))
    conn.executemany("INSERT OR REPLACE INTO cards(card_id, merchant, body) VALUES (?, ?, ?)", rows)


def _apply_issue(conn: sqlite3.Connection, batch: Batch) -> None:
    conn.executemany(INSERT_ISSUED, batch.issue_entries())


def _apply_snapshot(conn: sqlite3.Connection, batch: Batch) -> None:
    """Replace the cache with the backend's view, then replay what it has not seen yet.

    Accounts are not in a snapshot: they stay, and so do their codes. A linked code the
    snapshot lists takes the snapshot's row and keeps its account; one it does not list
    keeps its row as it was: a code born of a `link` (a signed code, a card number) is in
    no issue list a snapshot is made from, and removing a code from its account is a
    `revoke`, not an omission. Records of linked codes are not replayed: they spent the
    account, which nothing here replaced (docs/protocol.md 19.2)."""
    conn.execute("CREATE TEMP TABLE linked_codes AS SELECT * FROM codes WHERE account IS NOT NULL")
    try:
        conn.execute("DELETE FROM codes")
        conn.executemany(INSERT_ISSUED, batch.issue_entries())
        conn.execute(
            "UPDATE codes SET account = (SELECT account FROM linked_codes k WHERE k.digest = "
            "codes.digest) WHERE digest IN (SELECT digest FROM linked_codes)"
        )
        conn.execute("INSERT OR IGNORE INTO codes SELECT * FROM linked_codes")
    finally:
        conn.execute("DROP TABLE IF EXISTS temp.linked_codes")  # gone if SQLite rolled back
    cards = trust.cards(conn)
    unacked = conn.execute(
        "SELECT l.digest, l.action, COALESCE(l.uses, 1), COALESCE(l.amount, 0) FROM outbox o "
        "JOIN ledger l USING (seq) WHERE l.verdict = 'accepted' AND l.action IN "
        "('redeem', 'reverse') AND l.digest IS NOT NULL AND l.account IS NULL ORDER BY o.seq"
    ).fetchall()
    for digest, action, uses, amount in unacked:
        sign = 1 if action == "redeem" else -1
        _consume(conn, cards, digest, sign * uses, sign * amount)
    # The codes' unacknowledged spend (offline limits) went with their rows.
    accounts.rebuild_spend(conn)


def _apply_status(status: int) -> Callable[[sqlite3.Connection, Batch], None]:
    statement = SET_STATUS.format(status=status)

    def apply_status(conn: sqlite3.Connection, batch: Batch) -> None:
        conn.executemany(statement, batch.digest_entries())

    return apply_status


def _apply_unblock(conn: sqlite3.Connection, batch: Batch) -> None:
    conn.executemany(
        f"UPDATE codes SET status = {CodeStatus.ACTIVE} WHERE digest = ? AND status = "
        f"{CodeStatus.BLOCKED}",
        batch.digest_entries(),
    )


def _apply_consumed(conn: sqlite3.Connection, batch: Batch) -> None:
    cards = trust.cards(conn)
    ledger.index_ids(conn)  # the ledger has no index on id of its own (migration m006)
    for digest, record_id, uses, amount in batch.consumed_entries():
        own = ledger.by_id(conn, record_id) is not None
        seen = conn.execute(
            "INSERT OR IGNORE INTO consumed_seen(record_id) VALUES (?)", (record_id,)
        ).rowcount
        if own or not seen:
            continue
        _consume(conn, cards, digest, uses, amount)


def _consume(
    conn: sqlite3.Connection, cards: dict[int, Card], digest: bytes, uses: int, amount: int
) -> None:
    row = conn.execute(
        "SELECT card_id, not_before, not_after, uses_left, balance, status, account FROM codes "
        "WHERE digest = ?",
        (digest,),
    ).fetchone()
    if row is not None and row[6] is not None:
        _consume_account(conn, cards, row[6], uses, amount)
        return
    if row is None or row[0] not in cards:
        return
    card = cards[row[0]]
    state = resolve(card, row[5], row[1], row[2], row[3], row[4])
    uses_left = state.uses_left
    balance = state.balance
    if card.uses_balance:
        balance = max((balance or 0) - amount, 0)
    elif uses_left is not None:
        uses_left = max(uses_left - uses, 0)
    status = row[5]
    if status == CodeStatus.ACTIVE and uses_left == 0:
        status = CodeStatus.CONSUMED
    elif status == CodeStatus.CONSUMED and uses_left:
        status = CodeStatus.ACTIVE
    conn.execute(
        "UPDATE codes SET uses_left = ?, balance = ?, status = ? WHERE digest = ?",
        (UNLIMITED_USES if uses_left is None else uses_left, balance, status, digest),
    )


def _consume_account(
    conn: sqlite3.Connection, cards: dict[int, Card], account: bytes, uses: int, amount: int
) -> None:
    """A linked code's redemption elsewhere spent its account (protocol.md 19.2)."""
    row = conn.execute(
        "SELECT card_id, uses_left, balance, status FROM accounts WHERE account = ?", (account,)
    ).fetchone()
    if row is None or row[0] not in cards:
        return
    card = cards[row[0]]
    state = resolve(card, row[3], None, None, row[1], row[2])
    uses_left, balance = state.uses_left, state.balance
    if card.uses_balance:
        balance = max((balance or 0) - amount, 0)
    elif uses_left is not None:
        uses_left = max(uses_left - uses, 0)
    conn.execute(
        "UPDATE accounts SET uses_left = ?, balance = ? WHERE account = ?",
        (UNLIMITED_USES if uses_left is None else uses_left, balance, account),
    )


# ---------------------------------------------------------------- accounts (protocol.md 19)


def _apply_accounts(conn: sqlite3.Connection, batch: Batch) -> None:
    conn.executemany(UPSERT_ACCOUNT, batch.account_entries())


def _apply_link(conn: sqlite3.Connection, batch: Batch) -> None:
    """Link each code to its account; an account the box does not have refuses the
    whole batch. A code not listed yet is added as an active code of the account's card."""
    for digest, account in batch.link_entries():
        found = conn.execute(
            "SELECT card_id FROM accounts WHERE account = ?", (account,)
        ).fetchone()
        if found is None:
            raise ImportRefused(
                f"link batch {batch.header.seq} names account {account.hex()}, which this box "
                "does not have; publish the accounts batch that creates it first"
            )
        conn.execute(
            "INSERT INTO codes(digest, card_id, account) VALUES (?, ?, ?) "
            "ON CONFLICT(digest) DO UPDATE SET account = excluded.account",
            (digest, found[0], account),
        )


def _apply_transfer(conn: sqlite3.Connection, batch: Batch) -> None:
    """Move each old code's value to its new code and retire the old one, in file order;
    a transfer id applied before is a no-op (protocol.md 19.3)."""
    for transfer_id, old, new in batch.transfer_entries():
        if old == new:
            raise ImportRefused(
                f"transfer batch {batch.header.seq}: transfer {transfer_id.hex()} names the "
                "same code as old and new"
            )
        if not conn.execute(
            "INSERT OR IGNORE INTO transfers_applied(transfer_id) VALUES (?)", (transfer_id,)
        ).rowcount:
            continue
        row = conn.execute(
            "SELECT card_id, not_before, not_after, uses_left, balance, status, account "
            "FROM codes WHERE digest = ?",
            (old,),
        ).fetchone()
        if row is not None and row[5] == CodeStatus.TRANSFERRED:
            continue  # its value already went to another code
        if row is not None:
            conn.execute(
                "INSERT INTO codes(digest, card_id, not_before, not_after, uses_left, balance, "
                "status, account) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE "
                "SET card_id = excluded.card_id, not_before = excluded.not_before, "
                "not_after = excluded.not_after, uses_left = excluded.uses_left, "
                "balance = excluded.balance, status = excluded.status, "
                "account = excluded.account",
                (new, *row),
            )
        conn.execute(SET_STATUS.format(status=CodeStatus.TRANSFERRED), (old,))


def _apply_topup(conn: sqlite3.Connection, batch: Batch) -> None:
    """Add each top-up to its account's balance or uses, once per topup id ever."""
    cards = trust.cards(conn)
    for topup_id, account, amount in batch.topup_entries():
        row = conn.execute(
            "SELECT card_id, uses_left, balance, status FROM accounts WHERE account = ?",
            (account,),
        ).fetchone()
        if row is None:
            raise ImportRefused(
                f"topup batch {batch.header.seq} names account {account.hex()}, which this "
                "box does not have; publish the accounts batch that creates it first"
            )
        card = cards.get(row[0])
        if card is None:
            raise ImportRefused(
                f"topup batch {batch.header.seq}: account {account.hex()} has card {row[0]}, "
                "which is not in the cache; publish the cards batch first"
            )
        if not conn.execute(
            "INSERT OR IGNORE INTO topups_applied(topup_id) VALUES (?)", (topup_id,)
        ).rowcount:
            continue
        state = resolve(card, row[3], None, None, row[1], row[2])
        uses_left, balance = state.uses_left, state.balance
        if card.uses_balance:
            balance = (balance or 0) + amount
        elif uses_left is not None:
            uses_left += amount
        if max(balance or 0, uses_left or 0) > MAX_BALANCE:
            raise ImportRefused(
                f"topup batch {batch.header.seq}: top-up {topup_id.hex()} takes account "
                f"{account.hex()} over {MAX_BALANCE}"
            )
        conn.execute(
            "UPDATE accounts SET uses_left = ?, balance = ? WHERE account = ?",
            (UNLIMITED_USES if uses_left is None else uses_left, balance, account),
        )


def _apply_limits(conn: sqlite3.Connection, batch: Batch) -> None:
    accounts.replace_limits(conn, batch.limits())


_APPLY = {
    Kind.CARDS: _apply_cards,
    Kind.ISSUE: _apply_issue,
    Kind.SNAPSHOT: _apply_snapshot,
    Kind.REVOKE: _apply_status(CodeStatus.REVOKED),
    Kind.BLOCK: _apply_status(CodeStatus.BLOCKED),
    Kind.UNBLOCK: _apply_unblock,
    Kind.CONSUMED: _apply_consumed,
    Kind.ACCOUNTS: _apply_accounts,
    Kind.LINK: _apply_link,
    Kind.TRANSFER: _apply_transfer,
    Kind.TOPUP: _apply_topup,
    Kind.LIMITS: _apply_limits,
}
