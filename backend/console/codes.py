"""The batches and codes page: the batches issued and how many boxes applied each, a
code's history looked up from the code an operator types, and revoking or blocking it.

A typed code is normalised and digested here with the merchant's code key, as
`redeemd-backend issue` digests a CSV's codes; the text is dropped at once and never
stored, logged or put on a page. What the page shows is a digest prefix, and what its
revoke and block buttons send is an opaque reference to the digest, kept in memory
for a few minutes (`Lookups`), so not even the whole digest is on a page.

A revoke or block is a signed `revoke`/`block` batch listing the digest, allocated and
stored by `Store.issue` exactly as `redeemd-backend issue --kind revoke` does; the
running `publish` sends it like any other.

    >>> digest = digest_of(Keystore(keys_dir), "DEMO-0001")
    >>> history(store, "demo", digest)
    >>> issue(store, Keystore(keys_dir), "demo", Kind.REVOKE, [digest])
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

from backend.console.records import prefix
from backend.keystore import Keystore
from backend.store import IssuedBatch, Store
from cards import batch
from cards.batch import Kind
from cards.digest import code_digest
from cards.normalize import MalformedCode, normalize

EXPIRES_DAYS = 30
"""A revoke or block batch's expiry, as `redeemd-backend issue`'s --expires-days default."""
ACTIONS = {"revoke": Kind.REVOKE, "block": Kind.BLOCK}


class CodeError(ValueError):
    """The typed code cannot be used; the message says why (never the code)."""


@dataclass(frozen=True)
class BatchLine:
    merchant: str
    seq: int
    kind: str
    count: int
    created_at: int
    expires_at: int
    published_at: int | None
    applied: int
    """Registered boxes of the merchant whose status says cache_seq >= seq."""
    boxes: int
    """Registered boxes of the merchant that reported a cache sequence."""


def batches(store: Store, limit: int = 200) -> list[BatchLine]:
    """The newest batches of every merchant, with how many boxes applied each."""
    seqs: dict[str, list[int]] = {}
    for row in store.box_rows():
        if row.status is not None and row.status.cache_seq is not None:
            seqs.setdefault(row.merchant, []).append(row.status.cache_seq)
    rows = store.engine.execute(
        "SELECT merchant, seq, kind, count, created_at, expires_at, published_at FROM batches "
        "ORDER BY issued_at DESC, merchant, seq DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        BatchLine(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            applied=sum(1 for s in seqs.get(r[0], []) if s >= r[1]),
            boxes=len(seqs.get(r[0], [])),
        )
        for r in rows
    ]


def digest_of(keystore: Keystore, text: str) -> bytes:
    """The keyed digest of a typed code (normalised as a box reads it)."""
    try:
        canonical = normalize(text.strip().encode("utf-8")).text
    except MalformedCode as exc:
        raise CodeError(f"not a usable code: {exc}") from None
    return code_digest(keystore.code_key(), canonical)


@dataclass(frozen=True)
class Seen:
    box: str
    at_ms: int
    action: str
    verdict: str
    reason: str | None
    card_id: int | None


def history(store: Store, merchant: str, digest: bytes, limit: int = 500) -> list[Seen]:
    """The stored records of the code, newest first."""
    from backend.console.records import _reason

    rows = store.engine.execute(
        "SELECT box, at_ms, action, verdict, raw, card_id FROM events "
        "WHERE merchant = ? AND digest = ? ORDER BY at_ms DESC, box LIMIT ?",
        (merchant, digest.hex(), limit),
    ).fetchall()
    return [Seen(r[0], r[1], r[2], r[3], _reason(r[4]), r[5]) for r in rows]


def issue(
    store: Store, keystore: Keystore, merchant: str, kind: Kind, digests: list[bytes]
) -> IssuedBatch:
    """Sign and store a `revoke` or `block` batch of `digests` (the next sequence)."""
    if kind not in ACTIONS.values():
        raise ValueError(f"the console issues revoke and block batches, not {kind}")
    now = int(time.time())
    private, delegation = keystore.signer(merchant, now)
    expires = min(now + EXPIRES_DAYS * 86400, delegation.not_after)
    entries = batch.encode_digests(digests)

    def sign(seq: int) -> bytes:
        return batch.build(
            private,
            delegation,
            merchant=merchant,
            seq=seq,
            kind=kind,
            entries=entries,
            created_at=now,
            expires_at=expires,
        )

    return store.issue(merchant, kind, sign)


@dataclass(frozen=True)
class Found:
    """A looked-up code: its merchant and digest, and who looked it up."""

    merchant: str
    digest: bytes
    user: str
    at: float

    @property
    def shown(self) -> str:
        return prefix(self.digest.hex())


class Lookups:
    """Opaque references to looked-up digests, per user, for a few minutes: what the
    revoke and block forms carry instead of the code or its digest."""

    def __init__(self, ttl: float = 15 * 60, most: int = 10_000):
        self.ttl, self.most = ttl, most
        self._found: dict[str, Found] = {}
        self._lock = threading.Lock()

    def keep(self, found: Found) -> str:
        ref = secrets.token_urlsafe(18)
        with self._lock:
            self._drop_old(found.at)
            if len(self._found) >= self.most:
                self._found.pop(next(iter(self._found)))
            self._found[ref] = found
        return ref

    def get(self, ref: str, user: str, now: float) -> Found | None:
        with self._lock:
            self._drop_old(now)
            found = self._found.get(ref)
        return found if found is not None and found.user == user else None

    def _drop_old(self, now: float) -> None:
        for ref in [r for r, f in self._found.items() if now - f.at > self.ttl]:
            del self._found[ref]
