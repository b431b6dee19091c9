"""The console's audit log: who did what, when, from where, and how it ended.

Every sign-in (refused ones too), sign-out, account change from the CLI and operator
action is one row of `console_audit`. The log is the store's, so it is as durable as
the events and is kept on either engine. Targets never hold a code: box ids, user
names, or digest prefixes.

    >>> audit.record(store, "ana", "box add", "acme/box-0042", client="10.0.0.5")
    >>> [e.action for e in audit.recent(store)]
    ['box add']
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from backend.store import Store

OK = "ok"


@dataclass(frozen=True)
class Entry:
    at_ms: int
    actor: str | None
    action: str
    target: str | None
    client: str | None
    outcome: str


def record(
    store: Store,
    actor: str | None,
    action: str,
    target: str | None = None,
    *,
    client: str | None = None,
    outcome: str = OK,
    now: float | None = None,
) -> None:
    """Append one entry (its own statement, committed at once)."""
    at_ms = int((time.time() if now is None else now) * 1000)
    store.engine.execute(
        "INSERT INTO console_audit(id, at_ms, actor, action, target, client, outcome) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (str(uuid.uuid4()), at_ms, actor, action, target, client, outcome),
    )


def recent(store: Store, limit: int = 200, before_ms: int | None = None) -> list[Entry]:
    """The newest entries first; `before_ms` pages back (a keyset on the time)."""
    rows = store.engine.execute(
        "SELECT at_ms, actor, action, target, client, outcome FROM console_audit "
        "WHERE at_ms < ? ORDER BY at_ms DESC, id LIMIT ?",
        (before_ms if before_ms is not None else 2**62, limit),
    ).fetchall()
    return [Entry(*r) for r in rows]
