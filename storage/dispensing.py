"""What a box holds to dispense: its grant set, and the counters it committed.

The grant set (cards/grant.py) arrives by MQTT (the sync thread) or by file (`redeemd
grant install`); both call `install_grants`, which verifies it completely and replaces
the held set in one transaction, never with an older one. The set is stored as the
signed bytes and verified again when read (`held_grants`), so a row edited on disk
cannot widen a quota.

The counters are not kept apart from the ledger: a `dispense` record carries its grant
id and counter, and a UNIQUE partial index on (grant_id, counter) both answers "the
highest counter committed for this grant" in one probe and makes SQLite refuse a
counter committed twice. A restored backup therefore has counters that match its
ledger, which a separate counters table could not promise.

    installed = install_grants(conn, data, roots, merchant="demo", box="box-1",
                               box_key_id=box_key.key_id)
    installed.message   # "grant set seq 4 installed: 2 grants (1 revoked)"
    held_grants(conn, roots)          # the GrantSet, or None before the first one
    used_counters(conn)               # {"00000000000000aa": 17}
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cards import grant
from cards.grant import GrantError, GrantSet


class GrantsRefused(ValueError):
    """A grant set this box must not take; the set it holds is unchanged. The message
    tells the technician why and what to do."""


@dataclass(frozen=True)
class Installed:
    """What `install_grants` did: `applied` is False for the set already held."""

    applied: bool
    seq: int
    message: str


def held_seq(conn: sqlite3.Connection) -> int | None:
    """The held set's seq without verifying it: a cheap check whether it changed."""
    row = conn.execute("SELECT seq FROM grant_set WHERE one = 1").fetchone()
    return None if row is None else int(row[0])


def held_grants(conn: sqlite3.Connection, roots: dict[str, bytes]) -> GrantSet | None:
    """The grant set this box holds, verified again against `roots`; None if it holds
    none. GrantsRefused if the stored set no longer verifies (its root was removed
    from the configuration, or the row was altered): the box then dispenses nothing."""
    row = conn.execute("SELECT raw FROM grant_set WHERE one = 1").fetchone()
    if row is None:
        return None
    try:
        return grant.open_grants(bytes(row[0]), roots)
    except GrantError as exc:
        raise GrantsRefused(
            f"the grant set this box holds no longer verifies ({exc}); check [trust] "
            "root keys, then install the current set again (redeemd grant install FILE)"
        ) from None


def used_counters(
    conn: sqlite3.Connection, grant_ids: Iterable[str] | None = None
) -> dict[str, int]:
    """The highest counter committed per grant id (grants with none are absent). Given
    `grant_ids` (those of the held set), one index probe each; without, a walk over
    the dispense records' index entries."""
    if grant_ids is None:
        rows = conn.execute(
            "SELECT grant_id, MAX(counter) FROM ledger WHERE grant_id IS NOT NULL GROUP BY grant_id"
        ).fetchall()
        return {grant_id: int(used) for grant_id, used in rows if used is not None}
    used = {}
    for grant_id in grant_ids:
        value = conn.execute(
            "SELECT MAX(counter) FROM ledger WHERE grant_id = ?", (grant_id,)
        ).fetchone()[0]
        if value is not None:
            used[grant_id] = int(value)
    return used


def install_grants(
    conn: sqlite3.Connection,
    data: bytes,
    roots: dict[str, bytes],
    *,
    merchant: str,
    box: str,
    box_key_id: str,
    now: int | None = None,
) -> Installed:
    """Verify the signed grant set `data` and make it the one this box holds.

    Refused (GrantsRefused, the held set unchanged) when it does not verify, is for
    another merchant, box or box key, is older than the held set, or has the held
    set's seq with other contents. The same set again is a no-op (a retained MQTT
    message delivered on every reconnect). The check against the held seq and the
    replacement are one write transaction, so two installers cannot both win.
    """
    try:
        offered = grant.open_grants(data, roots)
    except GrantError as exc:
        raise GrantsRefused(f"grant set refused, nothing changed: {exc}") from None
    why = grant.refusal_for(offered, merchant=merchant, box=box, box_key_id=box_key_id)
    if why is not None:
        raise GrantsRefused(f"grant set refused, nothing changed: {why}")
    own = not conn.in_transaction
    conn.execute("BEGIN IMMEDIATE" if own else "SAVEPOINT install_grants")
    try:
        result = _replace(conn, offered, int(time.time()) if now is None else now)
    except BaseException:
        if own:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        else:
            conn.execute("ROLLBACK TO install_grants")
            conn.execute("RELEASE install_grants")
        raise
    conn.execute("COMMIT" if own else "RELEASE install_grants")
    return result


def _replace(conn: sqlite3.Connection, offered: GrantSet, now: int) -> Installed:
    row = conn.execute("SELECT seq, raw FROM grant_set WHERE one = 1").fetchone()
    if row is not None:
        held, raw = int(row[0]), bytes(row[1])
        if offered.seq < held:
            raise GrantsRefused(
                f"grant set seq {offered.seq} refused: older than the set held (seq {held}); "
                "a set never rolls back. Install the newest set from the backend"
            )
        if offered.seq == held:
            if offered.raw == raw:
                return Installed(False, held, f"grant set seq {held} is already installed")
            raise GrantsRefused(
                f"grant set seq {offered.seq} refused: the set held has the same seq and "
                "other contents. The backend must never sign two sets with one seq; tell "
                "its operator (a leaked issuer key could do this)"
            )
    conn.execute(
        "INSERT INTO grant_set(one, seq, raw, applied_at) VALUES (1, ?, ?, ?) "
        "ON CONFLICT(one) DO UPDATE SET seq = excluded.seq, raw = excluded.raw, "
        "applied_at = excluded.applied_at",
        (offered.seq, offered.raw, now),
    )
    revoked = sum(g.revoked for g in offered.grants)
    return Installed(
        True,
        offered.seq,
        f"grant set seq {offered.seq} installed: {len(offered.grants)} grant(s)"
        + (f" ({revoked} revoked)" if revoked else ""),
    )


def applied_at(conn: sqlite3.Connection) -> int | None:
    """When the held set was installed (Unix seconds), None if none is held."""
    row = conn.execute("SELECT applied_at FROM grant_set WHERE one = 1").fetchone()
    return None if row is None else int(row[0])
