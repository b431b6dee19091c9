"""Trust state: applied sequences, the time floor, known issuer keys and cards."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from cards import keys
from cards.card import Card, CardError, parse_card


@dataclass(frozen=True)
class TrustState:
    merchant: str
    last_seq: int
    time_floor: int


def state(conn: sqlite3.Connection, merchant: str) -> TrustState:
    row = conn.execute(
        "SELECT last_seq, time_floor FROM trust WHERE merchant = ?", (merchant,)
    ).fetchone()
    return TrustState(merchant, *(row or (0, 0)))


def time_floor(conn: sqlite3.Connection) -> int:
    """The newest signed time this box has verified, over all merchants."""
    value: int = conn.execute("SELECT COALESCE(MAX(time_floor), 0) FROM trust").fetchone()[0]
    return value


def save_state(conn: sqlite3.Connection, merchant: str, seq: int, floor: int, now: int) -> None:
    conn.execute(
        "INSERT INTO trust(merchant, last_seq, time_floor, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(merchant) DO UPDATE SET last_seq = excluded.last_seq, "
        "time_floor = MAX(time_floor, excluded.time_floor), updated_at = excluded.updated_at",
        (merchant, seq, floor, now),
    )


def remember_issuer(conn: sqlite3.Connection, delegation: keys.Delegation) -> None:
    """Keep a verified delegation so signed codes by that key verify offline."""
    conn.execute(
        "INSERT OR REPLACE INTO issuer_keys(key_id, public_key, delegation) VALUES (?, ?, ?)",
        (delegation.key_id, delegation.public_key, json.dumps(delegation.to_json())),
    )


def issuers(conn: sqlite3.Connection, roots: dict[str, bytes]) -> dict[str, keys.Delegation]:
    """Issuer delegations still signed by a configured root (a removed root drops its keys)."""
    result = {}
    for key_id, text in conn.execute("SELECT key_id, delegation FROM issuer_keys"):
        try:
            result[key_id] = keys.parse_delegation(json.loads(text), roots)
        except (keys.TrustError, ValueError):
            continue
    return result


def cards(conn: sqlite3.Connection) -> dict[int, Card]:
    result = {}
    for card_id, body in conn.execute("SELECT card_id, body FROM cards"):
        try:
            result[card_id] = parse_card(json.loads(body))
        except (CardError, ValueError):
            continue
    return result


def cache_seq(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("SELECT COALESCE(MAX(last_seq), 0) FROM trust").fetchone()[0]
    return value


def newest_batch_time(conn: sqlite3.Connection, merchant: str) -> int | None:
    """created_at of the newest applied batch: how fresh the cache is."""
    newest: int | None = conn.execute(
        "SELECT MAX(created_at) FROM batches WHERE merchant = ?", (merchant,)
    ).fetchone()[0]
    return newest


def keep_manifest(
    conn: sqlite3.Connection, merchant: str, latest_seq: int, created_at: int, now: int
) -> None:
    """Keep an accepted manifest (protocol.md 16.1) and raise the time floor to its
    `created_at` (section 12), in the caller's write transaction.

    Kept on disk, not only in the sync thread's memory, because the cache's age follows
    it and the engine's `stale_policy = "reject"` judges by that age: it must survive a
    restart and be read by the engine's own connection, with sync running or not. A
    manifest signed before the one kept changes nothing. When a newer manifest replaces
    one whose `latest_seq` is applied, that one's time stays as `current_at`: the cache
    was known current then, whatever the newer one names that has not arrived yet.
    """
    row = conn.execute(
        "SELECT last_seq, manifest_seq, manifest_at, current_at FROM trust WHERE merchant = ?",
        (merchant,),
    ).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO trust(merchant, last_seq, time_floor, updated_at, manifest_seq, "
            "manifest_at) VALUES (?, 0, ?, ?, ?, ?)",
            (merchant, created_at, now, latest_seq, created_at),
        )
        return
    last_seq, kept_seq, kept_at, current_at = row
    if kept_at is not None and created_at < kept_at:
        return
    if kept_at is not None and kept_seq <= last_seq:
        current_at = kept_at if current_at is None else max(current_at, kept_at)
    conn.execute(
        "UPDATE trust SET manifest_seq = ?, manifest_at = ?, current_at = ?, "
        "time_floor = MAX(time_floor, ?), updated_at = ? WHERE merchant = ?",
        (latest_seq, created_at, current_at, created_at, now, merchant),
    )


def cache_time(conn: sqlite3.Connection, merchant: str) -> int | None:
    """The signed time as of which the cache is known current (protocol.md 16.1): the
    `created_at` of the newest manifest whose `latest_seq` is applied, or of the newest
    applied batch if that is later; None while there is neither. `now` minus this is
    the cache's age, for the status and for `stale_policy = "reject"`."""
    newest = newest_batch_time(conn, merchant)
    row = conn.execute(
        "SELECT last_seq, manifest_seq, manifest_at, current_at FROM trust WHERE merchant = ?",
        (merchant,),
    ).fetchone()
    if row is None:
        return newest
    last_seq, kept_seq, kept_at, current_at = row
    if kept_at is not None and kept_seq <= last_seq:
        current_at = kept_at if current_at is None else max(current_at, kept_at)
    known = [t for t in (newest, current_at) if t is not None]
    return max(known) if known else None
