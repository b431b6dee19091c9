"""Card accounts on the backend side (issue 13): accounts, code links, transfers, top-ups,
offline spending limits, and the reconciliation of what boxes spent.

An account holds the uses or the balance that every code linked to it spends (a family's
phones, a plastic card and a phone). Every change travels to the boxes in a signed batch
of its own kind (docs/protocol.md 19): `accounts`, `link`, `transfer`, `topup`, `limits`.
Each change is recorded in the same transaction that takes the batch's sequence and
stores the batch (`Store.issue`: the rows are written by the `make` it calls), so a row
never names a batch that was not stored, and a stored batch always has its rows.

Codes are known here only by their keyed digests (cards/digest.py): the operator's
code is digested by the command, and the signed code a transfer gives the receiver is
printed once and never stored.

Reconciliation. Boxes spend offline, each bounded by its limits; the backend adds up.
`reconcile` runs in the collector's transaction (Store.store_messages), after the
records are stored: for each account a new accepted redemption spent from, the spends
of all boxes (less accepted reversals) against the account's value (created value +
top-ups); past it, an overspend row (amount over, boxes, records), and under the
merchant's policy (`set_policy`) a `block` batch of the account's codes. A redemption
of a transferred code's old digest on a box that had not applied the transfer batch
yet (the record's cache_seq below the batch's seq) is a transfer conflict.

    >>> sign = signer(Keystore(Path("keys/")))
    >>> made = create_account(store, sign, merchant="acme", card_id=7, unit="balance",
    ...                       value=5000, now=now)
    >>> topup(store, sign, account_id=made.account.id, amount=2000, now=now).batch.seq
    12
    >>> overspends(store)
    [Overspend(merchant='acme', account='9f1c...', amount_over=300, ...)]
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from backend.events import Event
from backend.keystore import Keystore
from backend.store import IssuedBatch, Store, StoreError, _allocator
from cards import batch
from cards.batch import UNLIMITED, CodeStatus, Kind
from cards.card import Card, parse_card

Signer = Callable[[str, int, Kind, bytes], bytes]
"""(merchant, seq, kind, entries) -> the signed batch file."""

DEFAULT_EXPIRES = 30 * 86400
ID_SIZE = 16
UNITS = ("uses", "balance")
# Serials of the signed codes transfers give receivers, per card id: above the claim
# service's range (backend/claims.py, from 2^62) by 2^61, below 2^63 (both databases'
# signed 64-bit integers), never reached by `mint --serial` given by people.
TRANSFER_SERIAL_BASE = (1 << 62) + (1 << 61)
_SPENDING = ("redeem", "reverse")


class AccountsError(StoreError):
    """An account change is refused; nothing was written or signed. The message says why
    and what to do."""


@dataclass(frozen=True)
class Account:
    id: str
    merchant: str
    card_id: int
    unit: str
    """"uses" (use-counted card) or "balance" (minor units)."""
    created_value: int | None
    """What the account was created with; None: unlimited uses."""
    status: int
    batch_seq: int
    created_at: int
    topped_up: int = 0

    @property
    def value(self) -> int | None:
        """What the account may spend in all: created value + top-ups (None: unlimited)."""
        return None if self.created_value is None else self.created_value + self.topped_up

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "merchant": self.merchant,
            "card": self.card_id,
            "unit": self.unit,
            "created_value": self.created_value,
            "topped_up": self.topped_up,
            "value": self.value,
            "status": self.status,
            "batch_seq": self.batch_seq,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Made:
    """What one command committed: its batch, and the account / transfer / top-up id."""

    batch: IssuedBatch
    id: str
    account: Account | None = None
    code: str | None = None
    """The receiver's signed code (transfer --signed): to print once, never stored."""


@dataclass(frozen=True)
class Limit:
    merchant: str
    card_id: int
    box: str
    """A box id, or "*" for every box of the merchant."""
    per_redemption: int | None
    per_account: int | None

    def to_json(self) -> dict[str, object]:
        """The object a `limits` batch carries (docs/protocol.md 19)."""
        return {
            "card": self.card_id,
            "box": self.box,
            "per_redemption": self.per_redemption,
            "per_account": self.per_account,
        }


@dataclass(frozen=True)
class Overspend:
    merchant: str
    account: str
    amount_over: int
    spent: int
    value: int
    unit: str
    boxes: tuple[str, ...]
    records: tuple[str, ...]
    detected_at: int
    updated_at: int
    blocked_seq: int | None

    def to_json(self) -> dict[str, object]:
        return {
            "merchant": self.merchant,
            "account": self.account,
            "amount_over": self.amount_over,
            "spent": self.spent,
            "value": self.value,
            "unit": self.unit,
            "boxes": list(self.boxes),
            "records": list(self.records),
            "detected_at": self.detected_at,
            "updated_at": self.updated_at,
            "blocked_seq": self.blocked_seq,
        }


@dataclass(frozen=True)
class TransferConflict:
    """A transferred code's old digest redeemed on a box that had not applied the transfer."""

    merchant: str
    transfer_id: str
    digest: str
    record_id: str
    box: str
    cache_seq: int | None
    transfer_seq: int
    detected_at: int

    def to_json(self) -> dict[str, object]:
        return {
            "kind": "transfer",
            "merchant": self.merchant,
            "transfer": self.transfer_id,
            "digest": self.digest,
            "record": self.record_id,
            "box": self.box,
            "cache_seq": self.cache_seq,
            "transfer_seq": self.transfer_seq,
            "detected_at": self.detected_at,
        }


def new_id() -> bytes:
    """A fresh opaque id (account, transfer, top-up): 16 random bytes."""
    return secrets.token_bytes(ID_SIZE)


def signer(
    keystore: Keystore,
    *,
    expires_in: int = DEFAULT_EXPIRES,
    chunk_size: int = batch.DEFAULT_CHUNK_SIZE,
) -> Signer:
    """Sign batches with the directory's issuer key, created now, expiring `expires_in`
    seconds later. The delegation is checked at each signing (KeystoreError)."""

    def sign(merchant: str, seq: int, kind: Kind, entries: bytes) -> bytes:
        now = int(time.time())
        private, delegation = keystore.signer(merchant, now)
        return batch.build(
            private,
            delegation,
            merchant=merchant,
            seq=seq,
            kind=kind,
            entries=entries,
            created_at=now,
            expires_at=now + expires_in,
            chunk_size=chunk_size,
        )

    return sign


# ------------------------------------------------------------------ accounts


def create_account(
    store: Store,
    sign: Signer,
    *,
    merchant: str,
    card_id: int,
    unit: str,
    value: int | None,
    now: int,
    status: int = CodeStatus.ACTIVE,
) -> Made:
    """A new account for `card_id` holding `value` uses or minor units (per `unit`;
    None: unlimited uses), and the `accounts` batch that creates it on the boxes."""
    if unit not in UNITS:
        raise AccountsError(f"unit {unit!r} is not one of {', '.join(UNITS)}")
    if unit == "balance" and value is None:
        raise AccountsError("a balance account needs a balance (minor units)")
    limit = UNLIMITED - 1 if unit == "uses" else batch.MAX_BALANCE
    # 0 in an account entry stands for the card's own value (docs/protocol.md 19): an
    # account is created with a value of its own, at least 1; top-ups add from there.
    if value is not None and not 1 <= value <= limit:
        raise AccountsError(
            f"{unit} {value} is out of range: allowed 1..{limit} (0 would mean the card's "
            "own value on a box; create with 1 and top up, or give the card's value)"
        )
    account_id = new_id()
    uses = (UNLIMITED if value is None else value) if unit == "uses" else 0
    balance = value if unit == "balance" and value is not None else 0
    entries = batch.encode_accounts([(account_id, card_id, 0, 0, uses, balance, status)])

    def make(seq: int) -> bytes:
        store.engine.execute(
            "INSERT INTO accounts(id, merchant, card_id, unit, created_value, status, "
            "batch_seq, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (account_id.hex(), merchant, card_id, unit, value, status, seq, now),
        )
        return sign(merchant, seq, Kind.ACCOUNTS, entries)

    issued = store.issue(merchant, Kind.ACCOUNTS, make)
    made = account(store, account_id.hex())
    return Made(batch=issued, id=account_id.hex(), account=made)


def card_template(
    store: Store, roots: dict[str, bytes], merchant: str, card_id: int
) -> Card | None:
    """Card `card_id` of `merchant` as the newest `cards` batch that has it says, or None
    when no stored `cards` batch has it (issued elsewhere, or not yet)."""
    rows = store.engine.execute(
        "SELECT data FROM batches WHERE merchant = ? AND kind = ? ORDER BY seq DESC",
        (merchant, Kind.CARDS.value),
    )
    for (data,) in rows:
        for template in batch.open_file(bytes(data), roots).card_templates():
            if template.get("id") == card_id:
                return parse_card(template)
    return None


def account(store: Store, account_id: str) -> Account:
    """The account `account_id` (32 hex digits) with its top-ups; AccountsError if none."""
    account_id = _account_id(account_id)
    row = store.engine.execute(
        "SELECT a.id, a.merchant, a.card_id, a.unit, a.created_value, a.status, a.batch_seq, "
        "a.created_at, (SELECT COALESCE(SUM(t.amount), 0) FROM topups t "
        "WHERE t.merchant = a.merchant AND t.account = a.id) FROM accounts a WHERE a.id = ?",
        (account_id,),
    ).fetchone()
    if row is None:
        raise AccountsError(
            f"no account {account_id} in the backend's database: `redeemd-backend account "
            "create` makes one, `account list` shows them"
        )
    return _account(row)


def accounts(store: Store, merchant: str | None = None) -> list[Account]:
    """Every account (of `merchant`), oldest first."""
    where, params = _where_merchant(merchant, "a.merchant")
    rows = store.engine.execute(
        "SELECT a.id, a.merchant, a.card_id, a.unit, a.created_value, a.status, a.batch_seq, "
        "a.created_at, (SELECT COALESCE(SUM(t.amount), 0) FROM topups t "
        "WHERE t.merchant = a.merchant AND t.account = a.id) FROM accounts a "
        f"{where} ORDER BY a.created_at, a.id",
        params,
    ).fetchall()
    return [_account(r) for r in rows]


def _account(row: Any) -> Account:
    id_, merchant, card_id, unit, created_value, status, batch_seq, created_at, topped_up = row
    return Account(
        id=id_,
        merchant=merchant,
        card_id=card_id,
        unit=unit,
        created_value=created_value,
        status=status,
        batch_seq=batch_seq,
        created_at=created_at,
        topped_up=int(topped_up),
    )


def link(store: Store, sign: Signer, *, account_id: str, digest: bytes, now: int) -> Made:
    """Link the code `digest` to an account (moving it from any other), by a `link` batch."""
    target = account(store, account_id)
    entries = batch.encode_links([(digest, bytes.fromhex(target.id))])

    def make(seq: int) -> bytes:
        _set_link(store, target.merchant, digest.hex(), target.id, seq, now)
        return sign(target.merchant, seq, Kind.LINK, entries)

    issued = store.issue(target.merchant, Kind.LINK, make)
    return Made(batch=issued, id=target.id, account=target)


def linked(store: Store, merchant: str, account_id: str) -> list[str]:
    """The digests linked to an account now (a transferred code's old digest is not)."""
    rows = store.engine.execute(
        "SELECT digest FROM account_links l WHERE merchant = ? AND account = ? AND NOT EXISTS "
        "(SELECT 1 FROM transfers t WHERE t.merchant = l.merchant AND t.old_digest = l.digest) "
        "ORDER BY digest",
        (merchant, account_id),
    )
    return [r[0] for r in rows]


def _set_link(
    store: Store, merchant: str, digest: str, account_id: str, seq: int, now: int
) -> None:
    store.engine.execute(
        "INSERT INTO account_links(merchant, digest, account, batch_seq, linked_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (merchant, digest) DO UPDATE SET "
        "account = excluded.account, batch_seq = excluded.batch_seq, "
        "linked_at = excluded.linked_at",
        (merchant, digest, account_id, seq, now),
    )


def unblock(store: Store, sign: Signer, *, account_id: str) -> Made:
    """An `unblock` batch of the account's codes (after an overspend was settled): the
    backend knows them by digest, the operator need not have them. Its overspend stays
    on record; blocked_seq is cleared, so a new overspend blocks again by the policy."""
    target = account(store, account_id)
    digests = linked(store, target.merchant, target.id)
    if not digests:
        raise AccountsError(f"account {target.id} has no codes linked: nothing to unblock")
    entries = batch.encode_digests(bytes.fromhex(d) for d in digests)

    def make(seq: int) -> bytes:
        store.engine.execute(
            "UPDATE overspends SET blocked_seq = NULL WHERE merchant = ? AND account = ?",
            (target.merchant, target.id),
        )
        return sign(target.merchant, seq, Kind.UNBLOCK, entries)

    issued = store.issue(target.merchant, Kind.UNBLOCK, make)
    return Made(batch=issued, id=target.id, account=target)


# ------------------------------------------------------------------ transfers


@dataclass(frozen=True)
class Receiver:
    """The receiver of a transfer: a code the operator gave (`digest`), or a signed code
    minted in the transfer's transaction (`mint(serial)` -> code, `digest_of(code)`)."""

    digest: bytes | None = None
    card_id: int | None = None
    mint: Callable[[int], str] | None = None
    digest_of: Callable[[str], bytes] | None = None


def card_of(store: Store, merchant: str, digest: bytes) -> int | None:
    """The card a code belongs to as far as the backend knows: its account's card, else
    the card of the newest record of it a box sent; None when neither says."""
    row = store.engine.execute(
        "SELECT a.card_id FROM account_links l JOIN accounts a ON a.id = l.account "
        "WHERE l.merchant = ? AND l.digest = ?",
        (merchant, digest.hex()),
    ).fetchone()
    if row is None:
        row = store.engine.execute(
            "SELECT card_id FROM events WHERE merchant = ? AND digest = ? AND card_id IS NOT NULL "
            "ORDER BY at_ms DESC LIMIT 1",
            (merchant, digest.hex()),
        ).fetchone()
    return None if row is None else int(row[0])


def transfer(
    store: Store, sign: Signer, *, merchant: str, old: bytes, receiver: Receiver, now: int
) -> Made:
    """Move the code `old`'s value (uses, balance, account link) to the receiver's code and
    retire `old` (status transferred on every box), by a `transfer` batch.

    With a signed receiver, its serial is allocated and the code minted inside the
    transaction that stores the batch, so the batch names its digest; the code itself
    is returned (Made.code) for the caller to show once."""
    before = store.engine.execute(
        "SELECT id, new_digest FROM transfers WHERE merchant = ? AND old_digest = ?",
        (merchant, old.hex()),
    ).fetchone()
    if before is not None:
        raise AccountsError(
            f"this code was transferred before (transfer {before[0]}, to the code with digest "
            f"{before[1][:12]}...): its value is no longer its own; transfer the receiver's "
            "code instead"
        )
    if receiver.digest == old:
        raise AccountsError("the code and the receiver's code are the same code")
    transfer_id = new_id()
    account_row = store.engine.execute(
        "SELECT account FROM account_links WHERE merchant = ? AND digest = ?",
        (merchant, old.hex()),
    ).fetchone()
    minted: list[str] = []

    def make(seq: int) -> bytes:
        serial = None
        new = receiver.digest
        if receiver.mint is not None and receiver.digest_of is not None:
            # Under the card's lock: two transfers never mint one serial (the unique
            # index on (card_id, serial) backs it).
            store.engine.lock([("transfer-serial", str(receiver.card_id))])
            top = store.engine.execute(
                "SELECT MAX(serial) FROM transfers WHERE card_id = ?", (receiver.card_id,)
            ).fetchone()[0]
            serial = TRANSFER_SERIAL_BASE if top is None else top + 1
            code = receiver.mint(serial)
            minted.append(code)
            new = receiver.digest_of(code)
        if new is None:
            raise AccountsError("a transfer needs the receiver's code or a signed one")
        if new == old:
            raise AccountsError("the code and the receiver's code are the same code")
        store.engine.execute(
            "INSERT INTO transfers(id, merchant, old_digest, new_digest, card_id, serial, "
            "batch_seq, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (transfer_id.hex(), merchant, old.hex(), new.hex(), receiver.card_id, serial, seq, now),
        )
        if account_row is not None:
            # The receiver's code spends the same account, as the box does it.
            _set_link(store, merchant, new.hex(), account_row[0], seq, now)
        entries = batch.encode_transfers([(transfer_id, old, new)])
        return sign(merchant, seq, Kind.TRANSFER, entries)

    issued = store.issue(merchant, Kind.TRANSFER, make)
    return Made(batch=issued, id=transfer_id.hex(), code=minted[0] if minted else None)


# ------------------------------------------------------------------ top-ups


def topup(store: Store, sign: Signer, *, account_id: str, amount: int, now: int) -> Made:
    """Add `amount` (uses or minor units, as the account counts) to an account, by a
    `topup` batch with a fresh top-up id: a box applies each id once, however often the
    batch reaches it; two top-ups are two ids."""
    target = account(store, account_id)
    if not 0 < amount <= batch.MAX_BALANCE:
        raise AccountsError(f"amount {amount} is out of range: allowed 1..{batch.MAX_BALANCE}")
    if target.created_value is None:
        raise AccountsError(f"account {target.id} has unlimited uses: a top-up adds nothing")
    topup_id = new_id()
    entries = batch.encode_topups([(topup_id, bytes.fromhex(target.id), amount)])

    def make(seq: int) -> bytes:
        store.engine.execute(
            "INSERT INTO topups(id, merchant, account, amount, batch_seq, issued_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (topup_id.hex(), target.merchant, target.id, amount, seq, now),
        )
        return sign(target.merchant, seq, Kind.TOPUP, entries)

    issued = store.issue(target.merchant, Kind.TOPUP, make)
    return Made(batch=issued, id=topup_id.hex(), account=account(store, target.id))


# ------------------------------------------------------------------ limits


def limits(store: Store, merchant: str | None = None) -> list[Limit]:
    """The offline spending limits (of `merchant`), by merchant, card and box."""
    where, params = _where_merchant(merchant)
    rows = store.engine.execute(
        "SELECT merchant, card_id, box, per_redemption, per_account FROM spending_limits "
        f"{where} ORDER BY merchant, card_id, box",
        params,
    )
    return [Limit(*r) for r in rows]


def set_limit(store: Store, sign: Signer, limit: Limit, *, now: int) -> Made:
    """Set one limit (replacing the one for its card and box) and send the merchant's
    whole set in a `limits` batch, which replaces every limit a box holds."""
    if limit.per_redemption is None and limit.per_account is None:
        raise AccountsError(
            "a limit needs --per-redemption or --per-account (or both); "
            "`limits remove` takes a limit away"
        )
    for name, cap in (("per_redemption", limit.per_redemption), ("per_account", limit.per_account)):
        if cap is not None and not 0 <= cap <= batch.MAX_BALANCE:
            raise AccountsError(f"{name} {cap} is out of range: allowed 0..{batch.MAX_BALANCE}")
    if limit.box != "*" and store.merchant_of(limit.box) != limit.merchant:
        raise AccountsError(
            f"box {limit.box} is not registered for merchant {limit.merchant}: "
            f"name a registered box (redeemd-backend box list) or '*' for every box"
        )

    def change() -> None:
        store.engine.execute(
            "INSERT INTO spending_limits(merchant, card_id, box, per_redemption, per_account, "
            "set_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (merchant, card_id, box) DO UPDATE "
            "SET per_redemption = excluded.per_redemption, per_account = excluded.per_account, "
            "set_at = excluded.set_at",
            (
                limit.merchant,
                limit.card_id,
                limit.box,
                limit.per_redemption,
                limit.per_account,
                now,
            ),
        )

    return _limits_batch(store, sign, limit.merchant, change)


def remove_limit(
    store: Store, sign: Signer, *, merchant: str, card_id: int, box: str, now: int
) -> Made:
    """Take one limit away and send the merchant's remaining set in a `limits` batch."""
    found = store.engine.execute(
        "SELECT 1 FROM spending_limits WHERE merchant = ? AND card_id = ? AND box = ?",
        (merchant, card_id, box),
    ).fetchone()
    if found is None:
        raise AccountsError(f"no limit for card {card_id} on box {box} of merchant {merchant}")

    def change() -> None:
        store.engine.execute(
            "DELETE FROM spending_limits WHERE merchant = ? AND card_id = ? AND box = ?",
            (merchant, card_id, box),
        )

    return _limits_batch(store, sign, merchant, change)


def _limits_batch(store: Store, sign: Signer, merchant: str, change: Callable[[], None]) -> Made:
    def make(seq: int) -> bytes:
        change()
        entries = batch.encode_limits(limit.to_json() for limit in limits(store, merchant))
        return sign(merchant, seq, Kind.LIMITS, entries)

    issued = store.issue(merchant, Kind.LIMITS, make)
    return Made(batch=issued, id=f"{merchant}/{issued.seq}")


# ------------------------------------------------------------------ policy


def set_policy(store: Store, merchant: str, *, block_overspent: bool, now: int) -> None:
    """The merchant's policy for an overspent account: block its codes by batch, or
    only report it. Kept in the database, so every collector applies the same one."""
    store.engine.execute(
        "INSERT INTO account_policy(merchant, block_overspent, set_at) VALUES (?, ?, ?) "
        "ON CONFLICT (merchant) DO UPDATE SET block_overspent = excluded.block_overspent, "
        "set_at = excluded.set_at",
        (merchant, int(block_overspent), now),
    )


def blocks_overspent(store: Store, merchant: str) -> bool:
    row = store.engine.execute(
        "SELECT block_overspent FROM account_policy WHERE merchant = ?", (merchant,)
    ).fetchone()
    return bool(row and row[0])


# ------------------------------------------------------------------ reconciliation


def lock_keys(messages: Iterable[tuple[str, str, list[Event]]]) -> list[tuple[str, ...]]:
    """The locks `reconcile` needs, for Store.store_messages to take with its others, up
    front and in one order: one per account a record spent from. On PostgreSQL two
    collectors storing two boxes' spends of one account side by side would each see
    only its own records and find no overspend."""
    return sorted(
        {
            ("account", merchant, e.account)
            for merchant, _, events in messages
            for e in events
            if e.account is not None
        }
    )


def reconcile(
    store: Store,
    messages: list[tuple[str, str, list[Event]]],
    fresh: list[list[Event]],
    sign_consumed: object | None,
    now: int,
) -> None:
    """Inside Store.store_messages' transaction, after the messages' new records
    (`fresh`, per message) are stored: flag transfer conflicts and overspent accounts; under the merchant's
    policy, block an overspent account's codes. Blocking signs a batch, which only a
    collector that signs (`sign_consumed` given) can do; the publisher sends it."""
    spenders: dict[tuple[str, str], None] = {}
    redeemed: dict[str, list[Event]] = {}
    for (merchant, _, _), events in zip(messages, fresh, strict=True):
        for e in events:
            if e.action != "redeem" or e.verdict != "accepted":
                continue
            if e.account is not None:
                spenders[merchant, e.account] = None
            if e.digest is not None:
                redeemed.setdefault(merchant, []).append(e)
    for merchant, events in redeemed.items():
        _transfer_conflicts(store, merchant, events, now)
    for merchant, account_id in spenders:
        _overspend(store, merchant, account_id, sign_consumed is not None, now)


def _transfer_conflicts(store: Store, merchant: str, events: list[Event], now: int) -> None:
    digests = sorted({e.digest for e in events if e.digest is not None})
    transfers: dict[str, tuple[str, int]] = {}
    for i in range(0, len(digests), 500):
        part = digests[i : i + 500]
        rows = store.engine.execute(
            "SELECT old_digest, id, batch_seq FROM transfers WHERE merchant = ? AND old_digest "
            f"IN ({','.join('?' * len(part))})",
            (merchant, *part),
        )
        transfers.update({digest: (tid, seq) for digest, tid, seq in rows})
    conflicts = [
        (merchant, tid, e.digest, e.id, e.box, e.cache_seq, seq, now)
        for e in events
        if e.digest in transfers
        for tid, seq in [transfers[e.digest]]
        # A record that does not say what it had applied is the box's word against none.
        if e.cache_seq is None or e.cache_seq < seq
    ]
    store.engine.executemany(
        "INSERT INTO transfer_conflicts(merchant, transfer_id, digest, record_id, box, "
        "cache_seq, transfer_seq, detected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        conflicts,
    )


def _overspend(store: Store, merchant: str, account_id: str, can_sign: bool, now: int) -> None:
    row = store.engine.execute(
        "SELECT a.unit, a.created_value, (SELECT COALESCE(SUM(t.amount), 0) FROM topups t "
        "WHERE t.merchant = a.merchant AND t.account = a.id) FROM accounts a "
        "WHERE a.merchant = ? AND a.id = ?",
        (merchant, account_id),
    ).fetchone()
    if row is None or row[1] is None:
        return  # an account this backend did not make, or unlimited uses
    unit, value = row[0], int(row[1]) + int(row[2])
    # A reversal counts whether or not its record names the account: it undoes one of
    # the account's redemptions.
    rows = store.engine.execute(
        "SELECT e.id, e.box, e.action, e.uses, e.amount, e.reverses FROM events e "
        "WHERE e.merchant = ? AND e.verdict = 'accepted' AND ((e.account = ? AND "
        "e.action = 'redeem') OR (e.action = 'reverse' AND e.reverses IN (SELECT r.id FROM "
        "events r WHERE r.merchant = ? AND r.account = ? AND r.action = 'redeem'))) "
        "ORDER BY e.at_ms, e.id",
        (merchant, account_id, merchant, account_id),
    ).fetchall()
    spent = 0
    undone = {r[5] for r in rows if r[2] == "reverse"}
    spends: list[tuple[str, str]] = []
    for record_id, box, action, uses, amount, _ in rows:
        part = (amount if unit == "balance" else uses) or 0
        if action == "redeem":
            spent += part
            if record_id not in undone:
                spends.append((record_id, box))
        else:
            spent -= part
    over = spent - value
    if over <= 0:
        return
    boxes = json.dumps(sorted({box for _, box in spends}))
    records = json.dumps([record_id for record_id, _ in spends])
    store.engine.execute(
        "INSERT INTO overspends(merchant, account, amount_over, spent, account_value, boxes, "
        "records, detected_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (merchant, account) DO UPDATE SET amount_over = excluded.amount_over, "
        "spent = excluded.spent, account_value = excluded.account_value, "
        "boxes = excluded.boxes, records = excluded.records, updated_at = excluded.updated_at",
        (merchant, account_id, over, spent, value, boxes, records, now, now),
    )
    blocked = store.engine.execute(
        "SELECT blocked_seq FROM overspends WHERE merchant = ? AND account = ?",
        (merchant, account_id),
    ).fetchone()[0]
    if blocked is None and can_sign and blocks_overspent(store, merchant):
        seq = _block(store, merchant, account_id)
        if seq is not None:
            store.engine.execute(
                "UPDATE overspends SET blocked_seq = ? WHERE merchant = ? AND account = ?",
                (seq, merchant, account_id),
            )


def _block(store: Store, merchant: str, account_id: str) -> int | None:
    """A `block` batch of the account's codes, allocated and stored as the collector's
    consumed-elsewhere batch is (inside the events transaction); the publisher sends it."""
    digests = linked(store, merchant, account_id)
    if not digests:
        return None
    entries = batch.encode_digests(bytes.fromhex(d) for d in digests)
    store.engine.lock([_allocator(merchant)])
    seq = max(store.latest_seq(merchant), store._legacy_last_seq(merchant)) + 1
    sign = signer(Keystore(store.dir))
    issued = IssuedBatch.from_file(sign(merchant, seq, Kind.BLOCK, entries))
    store.record_issued(issued)
    return seq


# ------------------------------------------------------------------ reading back


def overspends(store: Store, merchant: str | None = None) -> list[Overspend]:
    where, params = _where_merchant(merchant, "o.merchant")
    rows = store.engine.execute(
        "SELECT o.merchant, o.account, o.amount_over, o.spent, o.account_value, a.unit, "
        "o.boxes, o.records, o.detected_at, o.updated_at, o.blocked_seq FROM overspends o "
        f"LEFT JOIN accounts a ON a.id = o.account {where} ORDER BY o.detected_at, o.account",
        params,
    )
    return [
        Overspend(
            merchant=r[0],
            account=r[1],
            amount_over=r[2],
            spent=r[3],
            value=r[4],
            unit=r[5] or "",
            boxes=tuple(json.loads(r[6])),
            records=tuple(json.loads(r[7])),
            detected_at=r[8],
            updated_at=r[9],
            blocked_seq=r[10],
        )
        for r in rows
    ]


def transfer_conflicts(store: Store, merchant: str | None = None) -> list[TransferConflict]:
    where, params = _where_merchant(merchant)
    rows = store.engine.execute(
        "SELECT merchant, transfer_id, digest, record_id, box, cache_seq, transfer_seq, "
        f"detected_at FROM transfer_conflicts {where} ORDER BY detected_at, transfer_id, record_id",
        params,
    )
    return [TransferConflict(*r) for r in rows]


def _account_id(text: str) -> str:
    try:
        if len(bytes.fromhex(text)) == ID_SIZE:
            return text.lower()
    except ValueError:
        pass
    raise AccountsError(f"{text!r} is not an account id (32 hex digits, as `account create` said)")


def _where_merchant(merchant: str | None, column: str = "merchant") -> tuple[str, tuple[str, ...]]:
    # Built here rather than `? IS NULL OR ...`: PostgreSQL cannot type a bare NULL.
    return ("", ()) if merchant is None else (f"WHERE {column} = ?", (merchant,))
