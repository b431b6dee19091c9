"""Idempotency keys of local API requests (table `api_requests`, migration m003).

A key is stored by the engine in the same transaction as the ledger row its request
wrote; `verdict` is that request's answer as sent (digest prefix only, never a code).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestKey:
    """A client's idempotency key and the keyed fingerprint of the request it named."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Recorded:
    fingerprint: str
    seq: int
    verdict: dict[str, Any]


def lookup(conn: sqlite3.Connection, key: str) -> Recorded | None:
    row = conn.execute(
        "SELECT fingerprint, seq, verdict FROM api_requests WHERE key = ?", (key,)
    ).fetchone()
    return Recorded(row[0], row[1], json.loads(row[2])) if row else None


def record(
    conn: sqlite3.Connection, request: RequestKey, seq: int, verdict: dict[str, Any]
) -> None:
    """Insert the key; the caller owns the transaction (the ledger row's)."""
    conn.execute(
        "INSERT INTO api_requests(key, fingerprint, seq, verdict) VALUES (?, ?, ?, ?)",
        (request.key, request.fingerprint, seq, json.dumps(verdict, separators=(",", ":"))),
    )


KEEP_MS = 30 * 86_400_000
"""How long a key is remembered: far beyond any retry, bounded so the table stays small."""


def prune(conn: sqlite3.Connection, now_ms: int, keep_ms: int = KEEP_MS) -> int:
    """Forget keys whose redemption is older than `keep_ms`; returns how many. The walk
    is over the keys (few: one per API redemption), each joined to its ledger row."""
    with conn:
        return conn.execute(
            "DELETE FROM api_requests WHERE seq IN (SELECT a.seq FROM api_requests a "
            "JOIN ledger l ON l.seq = a.seq WHERE l.at_ms < ?)",
            (now_ms - keep_ms,),
        ).rowcount
