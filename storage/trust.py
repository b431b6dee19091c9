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
    return conn.execute("SELECT COALESCE(MAX(time_floor), 0) FROM trust").fetchone()[0]


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
    return conn.execute("SELECT COALESCE(MAX(last_seq), 0) FROM trust").fetchone()[0]


def newest_batch_time(conn: sqlite3.Connection, merchant: str) -> int | None:
    """created_at of the newest applied batch: how fresh the cache is."""
    return conn.execute(
        "SELECT MAX(created_at) FROM batches WHERE merchant = ?", (merchant,)
    ).fetchone()[0]
