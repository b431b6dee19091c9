"""Dispensing grants over MQTT: the box's retained `grants` topic -> the set it holds.

The backend keeps each box's current grant set (cards/grant.py) retained on
`{p}/{merchant}/box/{box}/grants` (docs/protocol.md 16 and 18), so a box gets it on
every connection, however long it was away, and a newer set (a revocation, more quota)
reaches it as soon as it is published. The set is installed with
storage.dispensing.install_grants on the sync thread's own connection, the one batches
are applied with (the engine notices a new set as it notices a new batch, by reading
the database), and every check is that function's: chain, signature, merchant, box,
box key, never an older set. A redelivered retained set is the set already held: a
no-op, not logged.

A refused set leaves the held set as it was and never stops the sync thread. The
broker delivers the same retained bytes again on every reconnection, so a refusal is
logged (a warning, with the reason for the technician) once per distinct payload, and
kept in `last_refused` for `redeemd status` until a set is installed. A set that could
not be written (the database busy or full) is not a refusal: it is tried again.

    >>> intake = GrantIntake(conn, merchant="demo", box="box-1", roots=roots,
    ...                      box_key=public_key)
    >>> intake.on_grants(topic, payload)     # True: a new set is held
    >>> intake.status()["grant_seq"]
    4
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections import OrderedDict

from cards import keys
from cards.envelope import MAX_HEADER_SIZE
from cards.grant import GrantSet
from storage import dispensing
from sync import status

log = logging.getLogger("redeemd.sync")

# A grant set is one envelope whose header is at most MAX_HEADER_SIZE; anything much
# bigger is not one and is refused before it is parsed.
MAX_GRANTS_MESSAGE = MAX_HEADER_SIZE + 4096
# Refused payloads remembered so a redelivery is not logged again (a retained set is
# redelivered on every reconnection; more than a few distinct ones is a backend bug).
REMEMBERED_REFUSALS = 16


class GrantIntake:
    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        merchant: str,
        box: str,
        roots: dict[str, bytes],
        box_key: bytes | None,
    ):
        self.conn = conn
        self.merchant = merchant
        self.box = box
        self.roots = roots
        self.box_key = box_key
        """The box's own Ed25519 public key (32 bytes), None while it has none."""
        self.installed = 0
        """Sets installed since the thread started (not counting redeliveries)."""
        self.refused = 0
        """Distinct grant-set payloads refused since the thread started."""
        self.last_refused: str | None = None
        """Why the newest set that arrived was refused; None once a set is installed."""
        self._refusals: OrderedDict[bytes, str] = OrderedDict()
        self._pending: bytes | None = None
        """The newest set that could not be written yet (database error): tried again."""
        self._held: GrantSet | None = None
        self._held_seq: int | None = None
        self._trust_changed = False
        self._refused_payload: bytes | None = None
        """The newest payload refused: tried again when the roots or the box key change."""

    # ------------------------------------------------------------------ messages

    def on_grants(self, topic: str, payload: bytes) -> bool:
        """Install the set in `payload`; True when the box now holds a different set."""
        if not payload:
            # The backend cleared the retained message: that takes nothing away (a
            # revocation is a newer set marking the grant revoked).
            log.debug("sync: %s is empty; the held grant set stays", topic)
            return False
        self._pending = None
        return self._install(topic, payload)

    def tick(self) -> bool:
        """Try again a set that could not be written; True when it now is."""
        payload, self._pending = self._pending, None
        if payload is None:
            return False
        return self._install("grants (again)", payload)

    def _install(self, topic: str, payload: bytes) -> bool:
        self._forget_if_trust_changed()
        digest = hashlib.sha256(payload).digest()
        known = self._refusals.get(digest)
        if known is not None:
            log.debug("sync: the grant set refused before arrived again on %s", topic)
            self.last_refused = known
            return False
        if len(payload) > MAX_GRANTS_MESSAGE:
            return self._refuse(
                topic, payload, digest, f"oversized grant set ({len(payload)} bytes)"
            )
        if self.box_key is None:
            return self._refuse(
                topic,
                payload,
                digest,
                "this box has no box key yet, so it cannot hold grants: start redeemd "
                "once to make it (`redeemd box-key` shows it), then grant that key",
            )
        try:
            installed = dispensing.install_grants(
                self.conn,
                payload,
                self.roots,
                merchant=self.merchant,
                box=self.box,
                box_key_id=keys.key_id(self.box_key),
            )
        except sqlite3.Error as exc:
            self._pending = payload
            log.warning("sync: cannot write the grant set from %s yet: %s", topic, exc)
            return False
        except ValueError as exc:  # dispensing.GrantsRefused and anything it lets through
            return self._refuse(topic, payload, digest, str(exc))
        self.last_refused = None
        self._refused_payload = None
        if not installed.applied:
            log.debug("sync: %s", installed.message)
            return False
        self.installed += 1
        log.info("sync: %s", installed.message)
        return True

    def _refuse(self, topic: str, payload: bytes, digest: bytes, why: str) -> bool:
        self.refused += 1
        self.last_refused = why
        self._refusals[digest] = why
        self._refused_payload = payload
        while len(self._refusals) > REMEMBERED_REFUSALS:
            self._refusals.popitem(last=False)
        log.warning("sync: refused the grant set on %s, kept the one held: %s", topic, why)
        return False

    def update_trust(self, roots: dict[str, bytes], box_key: bytes | None) -> None:
        """New root keys or box key after a reload (from another thread): the held set
        is verified again and a set refused before may be taken, from the next use on
        the sync thread."""
        self.roots = roots
        self.box_key = box_key
        self._trust_changed = True

    def _forget_if_trust_changed(self) -> None:
        if self._trust_changed:
            self._trust_changed = False
            self._held, self._held_seq = None, None
            self._refusals.clear()
            # The retained set is not delivered again before the next connection: try
            # the one refused under the old keys now (the reload may be what fixed it).
            if self._pending is None:
                self._pending, self._refused_payload = self._refused_payload, None

    # ------------------------------------------------------------------ status

    def held(self) -> GrantSet | None:
        """The set the box holds (installed by sync or by `redeemd grant install`),
        verified again only when its seq changed."""
        self._forget_if_trust_changed()
        seq = dispensing.held_seq(self.conn)
        if seq != self._held_seq or (seq is not None and self._held is None):
            self._held_seq = seq
            try:
                self._held = dispensing.held_grants(self.conn, self.roots)
            except ValueError as exc:  # no longer verifies: the box dispenses nothing
                self._held = None
                if self.last_refused != str(exc):
                    log.warning("sync: %s", exc)
                self.last_refused = str(exc)
        return self._held

    @property
    def held_seq(self) -> int | None:
        held = self.held()
        return None if held is None else held.seq

    def status(self) -> dict[str, object]:
        """The status message's `dispensing` (protocol.md 16.5)."""
        held = self.held()
        if held is None:
            return status.dispensing_status(None, {})
        used = dispensing.used_counters(self.conn, [g.id for g in held.grants])
        return status.dispensing_status(held, used)
