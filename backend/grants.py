"""Dispensing grants on the backend side: kept per box, signed into grant sets, published.

A grant (cards/grant.py) lets one box key mint claim codes for some cards, up to a quota,
in a window. The backend keeps every grant it made (table `grants`) and every grant set
it signed (table `grant_sets`, the data as published), and allocates each box's set
sequence the way the store allocates batch sequences (backend/store.py): inside the
transaction that stores the set, holding the box's allocation lock (SQLite: `BEGIN
IMMEDIATE`; PostgreSQL: an advisory lock), so two processes never sign two different
sets with one `seq` (a box keeps the first and ignores the other: its `seq` never rolls
back). The set for a box holds the grants made for the box key it is signed for,
revoked ones marked, until CLAIM_GRACE after their end (the claim service still
accepts codes minted in a grant's last minutes until then).

The newest set of a box is published retained, QoS 1, to `{p}/{merchant}/box/{box}/grants`
(a box subscribes to it; the broker hands it the retained set when it connects), or
written to a file for a box fed by USB stick.

    >>> made = add(store, keystore, box="box-1", cards=(7,), quota=100,
    ...            not_before=now, not_after=now + 30 * 86400, box_key=public, now=now)
    >>> made.grant.id, made.signed.seq
    ('3f0c9d1e2a4b5c6d', 1)
    >>> publish_latest(store, "mqtt://127.0.0.1:1883", "redeemd/v1", say=print)
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from backend import box_status
from backend.connection import Connection, default_client_id
from backend.keystore import Keystore
from backend.store import Store
from cards import grant, keys
from cards.claim_code import CLAIM_GRACE
from cards.grant import Grant, GrantError

CONNECT_TIMEOUT = 30.0
_GRANT_COLUMNS = (
    "id, merchant, box, box_key_id, box_key, cards, quota, not_before, not_after, "
    "created_at, revoked_at"
)
_SET_COLUMNS = "merchant, box, seq, box_key_id, created_at, data, published_at"


class GrantsError(ValueError):
    """A grant cannot be made, revoked, signed or published; the message says what to do."""


@dataclass(frozen=True)
class GrantRow:
    """A grant as the backend keeps it: the signed fields, whose box key, and when it was
    made and revoked."""

    id: str
    merchant: str
    box: str
    box_key_id: str
    box_key: bytes
    cards: tuple[int, ...]
    quota: int
    not_before: int
    not_after: int
    created_at: int
    revoked_at: int | None

    @property
    def grant(self) -> Grant:
        """The grant as a set carries it."""
        return Grant(self.id, self.cards, self.quota, self.not_before, self.not_after, self.revoked)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "merchant": self.merchant,
            "box": self.box,
            "box_key_id": self.box_key_id,
            "cards": list(self.cards),
            "quota": self.quota,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class SignedSet:
    """One grant set as signed and stored; `data` is what the box takes."""

    merchant: str
    box: str
    seq: int
    box_key_id: str
    created_at: int
    data: bytes
    published_at: int | None = None


@dataclass(frozen=True)
class Made:
    """What `add` or `revoke` did: the grant, and the set signed for its box (None when
    the grant's box key is no longer the one its box's sets are signed for)."""

    grant: GrantRow
    signed: SignedSet | None


def new_grant_id() -> str:
    """8 random bytes in hex: a grant id names one grant of the whole backend."""
    return secrets.token_bytes(8).hex()


def topic(prefix: str, merchant: str, box: str) -> str:
    """Where a box's grant set is published, retained."""
    return f"{prefix.rstrip('/')}/{merchant}/box/{box}/grants"


# ------------------------------------------------------------------ the box's key


def box_key(store: Store, box: str, given: str | None = None) -> bytes:
    """The public key to grant: `given` (base64, --box-key), else the `box_key` of the
    box's stored status (a box reports it: backend/box_status.py), else the key of the
    box's newest grant. GrantsError says how to give one when none is known."""
    merchant = _merchant(store, box)
    if given is not None:
        try:
            return keys.unb64(given, "--box-key", 32)
        except keys.TrustError as exc:
            raise GrantsError(
                f"{exc}: give the box's public key as `redeemd box-key` shows it"
            ) from None
    row = store.engine.execute(
        "SELECT raw FROM box_status WHERE merchant = ? AND box = ?", (merchant, box)
    ).fetchone()
    if row is not None:
        reported = box_status.box_key_of(row[0])
        if reported is not None:
            return reported
    row = store.engine.execute(
        "SELECT box_key FROM grants WHERE merchant = ? AND box = ? "
        "ORDER BY created_at DESC, id DESC LIMIT 1",
        (merchant, box),
    ).fetchone()
    if row is not None:
        return keys.unb64(row[0], "stored box key", 32)
    raise GrantsError(
        f"the backend does not know box {box}'s key: its status has not reported one yet "
        "(is the box online, with a release that makes a box key?) and it holds no grant. "
        "Give it: run `redeemd box-key` on the box and pass --box-key KEY"
    )


def _merchant(store: Store, box: str) -> str:
    merchant = store.merchant_of(box)
    if merchant is None:
        raise GrantsError(
            f"box {box} is not registered: redeemd-backend box add --merchant M {box} first"
        )
    return merchant


# ------------------------------------------------------------------ grants


def add(
    store: Store,
    keystore: Keystore,
    *,
    box: str,
    cards: Iterable[int],
    quota: int,
    not_before: int,
    not_after: int,
    box_key: bytes,
    now: int | None = None,
) -> Made:
    """Grant `box_key` of `box` the right to mint `quota` claim codes for `cards` in
    [not_before, not_after], and sign the box's new set, in one transaction."""
    now = int(time.time()) if now is None else now
    merchant = _merchant(store, box)
    row = GrantRow(
        id=new_grant_id(),
        merchant=merchant,
        box=box,
        box_key_id=keys.key_id(box_key),
        box_key=box_key,
        cards=tuple(dict.fromkeys(cards)),
        quota=quota,
        not_before=not_before,
        not_after=not_after,
        created_at=now,
        revoked_at=None,
    )
    try:
        # The fields' checks are the set's: refuse before anything is stored.
        grant.build(
            *keystore.signer(merchant, now),
            merchant=merchant,
            box=box,
            box_public=box_key,
            seq=1,
            created_at=now,
            grants=(row.grant,),
        )
    except GrantError as exc:
        raise GrantsError(str(exc)) from None
    if not_after + CLAIM_GRACE < now:
        raise GrantsError(f"the grant would have ended at {keys.iso(not_after)}, in the past")
    with store.engine.transaction():
        _lock(store, merchant, box)
        store.engine.execute(
            f"INSERT INTO grants({_GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                merchant,
                box,
                row.box_key_id,
                keys.b64(box_key),
                json.dumps(row.cards),
                quota,
                not_before,
                not_after,
                now,
                None,
            ),
        )
        signed = _sign(store, keystore, merchant, box, box_key, now)
    return Made(row, signed)


def revoke(store: Store, keystore: Keystore, grant_id: str, now: int | None = None) -> Made:
    """Mark the grant revoked and sign its box a new set that says so. A grant for a box
    key the box's newest set is no longer for (the box made a new key) is only marked:
    no box holds that key any more, and the claim service refuses its codes from now."""
    now = int(time.time()) if now is None else now
    found = find(store, grant_id)
    if found is None:
        raise GrantsError(f"no grant {grant_id}: `redeemd-backend grant list` shows them")
    if found.revoked:
        raise GrantsError(
            f"grant {grant_id} was already revoked at {keys.iso(found.revoked_at or 0)}"
        )
    keystore.signer(found.merchant, now)  # before anything is marked
    with store.engine.transaction():
        _lock(store, found.merchant, found.box)
        store.engine.execute(
            "UPDATE grants SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, grant_id)
        )
        newest = _newest(store, found.merchant, found.box)
        signed = None
        if newest is None or newest.box_key_id == found.box_key_id:
            signed = _sign(store, keystore, found.merchant, found.box, found.box_key, now)
    revoked = find(store, grant_id)
    assert revoked is not None
    return Made(revoked, signed)


def find(store: Store, grant_id: str) -> GrantRow | None:
    row = store.engine.execute(
        f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id = ?", (grant_id,)
    ).fetchone()
    return _grant_row(row) if row else None


def grants(store: Store, box: str | None = None) -> list[GrantRow]:
    """Every grant (of `box`), oldest first."""
    where, params = ("WHERE box = ? ", (box,)) if box is not None else ("", ())
    rows = store.engine.execute(
        f"SELECT {_GRANT_COLUMNS} FROM grants {where}ORDER BY merchant, box, created_at, id",
        params,
    )
    return [_grant_row(r) for r in rows.fetchall()]


def _grant_row(row: tuple) -> GrantRow:
    (
        grant_id,
        merchant,
        box,
        key_id,
        key,
        cards,
        quota,
        not_before,
        not_after,
        created_at,
        revoked_at,
    ) = row
    return GrantRow(
        grant_id,
        merchant,
        box,
        key_id,
        keys.unb64(key, "stored box key", 32),
        tuple(json.loads(cards)),
        quota,
        not_before,
        not_after,
        created_at,
        revoked_at,
    )


# ------------------------------------------------------------------ grant sets


def _lock(store: Store, merchant: str, box: str) -> None:
    """Held while a box's grants change and its next set sequence is taken."""
    store.engine.lock([("grants", merchant, box)])


def _sign(
    store: Store, keystore: Keystore, merchant: str, box: str, box_public: bytes, now: int
) -> SignedSet:
    # Inside the caller's transaction, holding the box's lock: allocate, sign, store.
    key_id = keys.key_id(box_public)
    rows = store.engine.execute(
        f"SELECT {_GRANT_COLUMNS} FROM grants WHERE merchant = ? AND box = ? AND box_key_id = ? "
        "AND not_after >= ? ORDER BY created_at, id",
        (merchant, box, key_id, now - CLAIM_GRACE),
    ).fetchall()
    held = tuple(_grant_row(r).grant for r in rows)
    if len(held) > grant.MAX_GRANTS:
        raise GrantsError(
            f"box {box} would hold {len(held)} grants, a set carries at most {grant.MAX_GRANTS}: "
            "revoke some, or wait until ended ones drop out"
        )
    (last,) = store.engine.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM grant_sets WHERE merchant = ? AND box = ?",
        (merchant, box),
    ).fetchone()
    seq = last + 1
    private, delegation = keystore.signer(merchant, now)
    try:
        data = grant.build(
            private,
            delegation,
            merchant=merchant,
            box=box,
            box_public=box_public,
            seq=seq,
            created_at=now,
            grants=held,
        )
    except GrantError as exc:
        raise GrantsError(str(exc)) from None
    store.engine.execute(
        f"INSERT INTO grant_sets({_SET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (merchant, box, seq, key_id, now, data, None),
    )
    return SignedSet(merchant, box, seq, key_id, now, data)


def _newest(store: Store, merchant: str, box: str) -> SignedSet | None:
    row = store.engine.execute(
        f"SELECT {_SET_COLUMNS} FROM grant_sets WHERE merchant = ? AND box = ? "
        "ORDER BY seq DESC LIMIT 1",
        (merchant, box),
    ).fetchone()
    return _set_row(row) if row else None


def newest_sets(store: Store, box: str | None = None) -> list[SignedSet]:
    """Each box's newest grant set (only `box`'s), the one to publish or hand over."""
    where, params = ("AND s.box = ? ", (box,)) if box is not None else ("", ())
    rows = store.engine.execute(
        f"SELECT s.{_SET_COLUMNS.replace(', ', ', s.')} FROM grant_sets s WHERE s.seq = "
        "(SELECT MAX(seq) FROM grant_sets t WHERE t.merchant = s.merchant AND t.box = s.box) "
        f"{where}ORDER BY s.merchant, s.box",
        params,
    )
    return [_set_row(r) for r in rows.fetchall()]


def _set_row(row: tuple) -> SignedSet:
    merchant, box, seq, key_id, created_at, data, published_at = row
    return SignedSet(merchant, box, seq, key_id, created_at, bytes(data), published_at)


def mark_published(store: Store, signed: SignedSet, now: int | None = None) -> None:
    store.engine.execute(
        "UPDATE grant_sets SET published_at = ? WHERE merchant = ? AND box = ? AND seq = ?",
        (int(time.time()) if now is None else now, signed.merchant, signed.box, signed.seq),
    )


# ------------------------------------------------------------------ publishing


def publish_pending(
    store: Store,
    link: Connection,
    prefix: str,
    boxes: Iterable[str] | None = None,
    *,
    merchants: Iterable[str] | None = None,
    again: bool = False,
) -> list[SignedSet]:
    """Publish each box's newest set not yet published (with `again`, every box's newest
    set: after a reconnect to a broker that may have lost its retained messages), of
    `boxes` and `merchants` if given, on a connected `link`, retained, and mark it; returns those the
    broker took, stopping at the first it did not. A set that is not the newest is never
    published: the retained message must be the newest (a box ignores older ones anyway).
    For a running publisher's round, or a command."""
    wanted = None if boxes is None else set(boxes)
    of = None if merchants is None else set(merchants)
    done = []
    for signed in newest_sets(store):
        if wanted is not None and signed.box not in wanted:
            continue
        if of is not None and signed.merchant not in of:
            continue
        if signed.published_at is not None and not again:
            continue
        if not link.publish(topic(prefix, signed.merchant, signed.box), signed.data, retain=True):
            break
        mark_published(store, signed)
        done.append(signed)
    return done


def publish_latest(
    store: Store,
    broker: str,
    prefix: str,
    boxes: Iterable[str] | None = None,
    *,
    again: bool = False,
    say: Callable[[str], None] = print,
) -> list[SignedSet]:
    """Connect to `broker`, publish the newest set of each box (of `boxes`) not yet
    published (with `again`, every newest set), and disconnect. GrantsError if the
    broker cannot be reached or refuses: the sets stay stored, unpublished, for
    `grant publish`."""
    wanted = list(boxes) if boxes is not None else None
    link = Connection(broker, default_client_id("grant"), lambda line: None)
    link.start()
    try:
        if not link.connected.wait(CONNECT_TIMEOUT):
            raise GrantsError(
                f"could not reach the broker {link.url} in {CONNECT_TIMEOUT:.0f} s; the grant "
                "set is stored: publish it later with `redeemd-backend grant publish`"
            )
        published = publish_pending(store, link, prefix, wanted, again=again)
        # Another process may have signed a newer set meanwhile: go again until none is
        # pending, so the retained set is the newest.
        while True:
            pending = [
                s
                for s in newest_sets(store)
                if s.published_at is None and (wanted is None or s.box in wanted)
            ]
            if not pending:
                break
            done = publish_pending(store, link, prefix, wanted)
            if not done:
                raise GrantsError(
                    f"the broker {link.url} did not take the grant set of "
                    f"{pending[0].merchant}/{pending[0].box} (does the broker ACL let this "
                    "user write grant sets?); publish it later with `redeemd-backend grant "
                    "publish`"
                )
            published += done
        for signed in published:
            say(
                f"published grant set {signed.merchant}/{signed.box} seq {signed.seq} to "
                f"{topic(prefix, signed.merchant, signed.box)} (retained)"
            )
        return published
    finally:
        link.stop()
