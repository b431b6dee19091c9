"""Stored batches made current again before they go out (docs/protocol.md 16.6).

A box refuses a batch whose `expires_at` has passed or whose issuer delegation has
ended. A box that was offline for longer than that still needs the batch: it cannot
skip a sequence. So whenever the backend hands out a stored batch (a resend, a first
publish that waited, `export`), a batch that is expired, or will be within
RESIGN_MARGIN, is signed again with the current issuer key: same merchant, seq, kind
and entries, a fresh created_at and expires_at. The box applies it like the original
and, if it had applied the original, ignores it as a replay; seq order (rollback
protection) and expiry of what an attacker could replay (freeze protection) are
unchanged. backend.db keeps the original signing.

    >>> fresh = current(issued, Keystore(Path("keys/")))
    >>> fresh.expires_at > time.time()
    True
"""

from __future__ import annotations

import json
import struct
import time

from backend.keystore import Keystore
from backend.store import IssuedBatch
from cards import batch

RESIGN_MARGIN = 3600
"""Re-sign what expires within this: the box must still find it valid when it applies it
(after a request round trip, a slow download, a box clock a little ahead)."""
MIN_LIFETIME = 86400
"""A re-signed batch lives at least this long, however short the original's life was."""


def due(issued: IssuedBatch, now: int) -> str | None:
    """Why `issued` must be re-signed before a box gets it, or None if it is still good."""
    if issued.expires_at < now:
        return f"expired at {issued.expires_at}"
    if issued.expires_at < now + RESIGN_MARGIN:
        return f"expires at {issued.expires_at}"
    not_after = _delegation_end(issued.data)
    if not_after < now + RESIGN_MARGIN:
        return f"its issuer key's delegation ends at {not_after}"
    return None


def current(issued: IssuedBatch, keystore: Keystore, now: int | None = None) -> IssuedBatch:
    """`issued` as it can go out now: itself, or re-signed when `due` says so.

    Raises KeystoreError, with the `delegate` command that fixes it, when the current
    issuer delegation cannot sign for the merchant now either.
    """
    now = int(time.time()) if now is None else now
    if due(issued, now) is None:
        return issued
    private, delegation = keystore.signer(issued.merchant, now)
    lifetime = max(issued.expires_at - issued.created_at, MIN_LIFETIME)
    data = batch.resign(
        issued.data,
        private,
        delegation,
        created_at=now,
        expires_at=now + lifetime,
    )
    return IssuedBatch.from_file(data)


def _delegation_end(data: bytes) -> int:
    # The backend's own stored batch: its header is well-formed; no need to verify it.
    (length,) = struct.unpack_from(">I", data, 4)
    return int(json.loads(data[8 : 8 + length])["issuer"]["cert"]["not_after"])
