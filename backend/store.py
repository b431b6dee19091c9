"""The backend's own database: issued batches, box events, gaps, conflicts, the fleet.

It lives in `{dir}/backend.db` (SQLite, the embedded default for one small merchant and
the quick start) or, given a postgresql:// URL, in PostgreSQL, which several hosts can
share. The logic below is written once for both; backend/engines.py holds what differs
(placeholders, the write lock, column types, migrations).

It is the single allocator of batch sequence numbers: `issue`, the collector's
consumed-elsewhere batches and anything else that signs a batch take the next sequence
inside one transaction together with storing the batch, holding the merchant's
allocation lock (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: an advisory lock), so two
processes can never sign two different batches with the same sequence (a box would
refuse the second one as a conflict, docs/protocol.md section 11).

Events are stored idempotently by record id; per box the store keeps the contiguous
high-water mark (every seq <= upto is stored) that the collector acks, the gaps it has
seen and the double redemptions (conflicts) it has found.

    >>> store = Store.open(Path("keys/"))                        # keys/backend.db
    >>> store = Store.open(Path("keys/"), "postgresql://redeemd@db.example/redeemd")
    >>> issued = store.issue("acme", Kind.REVOKE, lambda seq: batch.build(..., seq=seq, ...))
    >>> issued.seq, store.latest_seq("acme")
    (3, 3)

Several processes (publish, one or more collectors, `issue`) open the same database. On
SQLite, WAL lets readers run beside the one writer, and synchronous=FULL makes every
commit durable before the collector acks it; PostgreSQL's commits are durable as it is
configured (synchronous_commit on, its default).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.console.schema import M_CONSOLE

# FILENAME: re-exported, the SQLite store's file name is the store's to tell.
from backend.engines import FILENAME as FILENAME
from backend.engines import Engine, EngineError, Step, open_engine, redact
from backend.events import Event
from cards import batch
from cards.batch import Kind

LEGACY_SEQUENCES = "sequence.json"
DATABASE_ENV = "REDEEMD_BACKEND_DATABASE"
"""The database URL when none is given: how every backend process of one deployment
(publish, collect, issue, box ...) finds the same PostgreSQL without repeating it."""

# The schema's steps, in order, each applied once per database. Written as SQLite DDL;
# backend/engines.py gives PostgreSQL the same steps (BIGINT, BYTEA) under the same names.
M001_INITIAL = """
        -- Every batch ever signed, in file form: publish sends it, resends answer
        -- requests from it. (merchant, seq) is the allocator's uniqueness guarantee.
        CREATE TABLE batches (
            merchant TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            count INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            data BLOB NOT NULL,
            issued_at INTEGER NOT NULL,
            published_at INTEGER,
            PRIMARY KEY (merchant, seq)
        );

        -- Box ledger records; the record id is the idempotency key.
        CREATE TABLE events (
            id TEXT PRIMARY KEY,
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            seq INTEGER NOT NULL,
            at_ms INTEGER NOT NULL,
            digest TEXT,
            card_id INTEGER,
            action TEXT NOT NULL,
            verdict TEXT NOT NULL,
            uses INTEGER,
            amount INTEGER,
            uses_left INTEGER,
            balance INTEGER,
            reverses TEXT,
            raw TEXT NOT NULL,
            stored_at INTEGER NOT NULL,
            -- the consumed-elsewhere batch that told the other boxes about this record
            consumed_seq INTEGER
        ) WITHOUT ROWID;
        CREATE INDEX events_box_seq ON events(merchant, box, seq);
        CREATE INDEX events_digest ON events(merchant, digest) WHERE digest IS NOT NULL;
        CREATE INDEX events_reverses ON events(reverses) WHERE reverses IS NOT NULL;

        -- Per box: every seq <= upto is stored (what the collector acks as upto).
        CREATE TABLE boxes (
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            upto INTEGER NOT NULL DEFAULT 0,
            max_seq INTEGER NOT NULL DEFAULT 0,
            last_stored_at INTEGER,
            PRIMARY KEY (merchant, box)
        );

        -- Missing ranges of a box's sequence, as first detected; filled_at when complete.
        CREATE TABLE gaps (
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            first INTEGER NOT NULL,
            last INTEGER NOT NULL,
            detected_at INTEGER NOT NULL,
            filled_at INTEGER,
            PRIMARY KEY (merchant, box, first, last)
        );

        -- The same single-use code redeemed on two boxes (a pair of accepted records).
        CREATE TABLE conflicts (
            merchant TEXT NOT NULL,
            digest TEXT NOT NULL,
            first_id TEXT NOT NULL,
            first_box TEXT NOT NULL,
            second_id TEXT NOT NULL,
            second_box TEXT NOT NULL,
            detected_at INTEGER NOT NULL,
            consumed_seq INTEGER,
            PRIMARY KEY (first_id, second_id)
        );
"""

M002_FLEET = """
        -- The boxes the backend was set up for (`redeemd-backend box add`): the collector
        -- stores events only from these, each under its own merchant, and `box acl`
        -- writes the broker ACL from them. A box id is its MQTT username and client id,
        -- so it is unique across merchants.
        CREATE TABLE fleet (
            box TEXT PRIMARY KEY,
            merchant TEXT NOT NULL,
            added_at INTEGER NOT NULL
        );
"""

M003_BOX_STATUS = """
        -- Each box's latest retained status (docs/protocol.md 16.5), as the collector last
        -- received it: `redeemd-backend boxes` answers "which boxes are offline, behind on
        -- batches, holding unsent records" from here. Times without `box_` are the
        -- backend's clock (when it learned), box_at is the box's own (floored) clock.
        CREATE TABLE box_status (
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            state TEXT NOT NULL,
            -- when the backend first saw this state (online/offline) after another one
            since INTEGER NOT NULL,
            -- when the box itself last spoke (a status; its last will is the broker's)
            last_seen INTEGER,
            box_at INTEGER,
            version TEXT,
            cache_seq INTEGER,
            cache_age_s INTEGER,
            outbox_depth INTEGER,
            outbox_oldest_age_s INTEGER,
            publish_error TEXT,
            drivers TEXT,
            stuck TEXT,
            alarm TEXT,
            -- the message as received: a redelivered retained copy is recognised by it
            raw TEXT NOT NULL,
            received_at INTEGER NOT NULL,
            PRIMARY KEY (merchant, box)
        );
"""

M004_DISPENSING = """
        -- Dispensing (issue 12): each grant the backend made (backend/grants.py): a box
        -- key's right to mint claim codes for cards, up to quota, in [not_before,
        -- not_after]; revoked_at once revoked. box_key is the public key, base64.
        CREATE TABLE grants (
            id TEXT PRIMARY KEY,
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            box_key_id TEXT NOT NULL,
            box_key TEXT NOT NULL,
            cards TEXT NOT NULL,
            quota INTEGER NOT NULL,
            not_before INTEGER NOT NULL,
            not_after INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            revoked_at INTEGER
        );
        CREATE INDEX grants_box ON grants(merchant, box, box_key_id);

        -- Every grant set signed for a box, as published; (merchant, box, seq) is the
        -- set allocator's uniqueness guarantee, as (merchant, seq) is for batches.
        CREATE TABLE grant_sets (
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            seq INTEGER NOT NULL,
            box_key_id TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            data BLOB NOT NULL,
            published_at INTEGER,
            PRIMARY KEY (merchant, box, seq)
        );

        -- Each claim code accepted once (the primary key), the signed code it gave by
        -- its keyed digest (never its text) and serial (backend/claims.py), and the
        -- claim code's own digest, for support.
        CREATE TABLE claims (
            grant_id TEXT NOT NULL,
            counter INTEGER NOT NULL,
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            card_id INTEGER NOT NULL,
            serial INTEGER NOT NULL,
            claimed_at INTEGER NOT NULL,
            claim_digest TEXT NOT NULL,
            code_digest TEXT NOT NULL,
            PRIMARY KEY (grant_id, counter)
        );
        CREATE UNIQUE INDEX claims_serial ON claims(card_id, serial);
        CREATE INDEX claims_code_digest ON claims(merchant, code_digest);

        -- The funnel reads the boxes' dispense records.
        CREATE INDEX events_dispense ON events(merchant, box) WHERE action = 'dispense';
"""

M006_ACCOUNTS = """
        -- Card accounts (issue 13, backend/accounts.py): an account holds the uses or the
        -- balance that every code linked to it spends. Ids are 16 random bytes in hex,
        -- opaque (never a person). created_value is what `account create` gave it (uses
        -- or minor units, per unit; NULL: unlimited uses); top-ups add to it.
        CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            merchant TEXT NOT NULL,
            card_id INTEGER NOT NULL,
            unit TEXT NOT NULL,
            created_value INTEGER,
            status INTEGER NOT NULL,
            batch_seq INTEGER NOT NULL,
            created_at INTEGER NOT NULL
        );

        -- Which account a code spends: its keyed digest (never the code) -> account, as
        -- the newest `link` (or transfer) batch said.
        CREATE TABLE account_links (
            merchant TEXT NOT NULL,
            digest TEXT NOT NULL,
            account TEXT NOT NULL,
            batch_seq INTEGER NOT NULL,
            linked_at INTEGER NOT NULL,
            PRIMARY KEY (merchant, digest)
        );
        CREATE INDEX account_links_account ON account_links(merchant, account);

        -- A code's value moved to a new code (a gift); serial: the receiver's signed code's.
        CREATE TABLE transfers (
            id TEXT PRIMARY KEY,
            merchant TEXT NOT NULL,
            old_digest TEXT NOT NULL,
            new_digest TEXT NOT NULL,
            card_id INTEGER,
            serial INTEGER,
            batch_seq INTEGER NOT NULL,
            issued_at INTEGER NOT NULL
        );
        CREATE INDEX transfers_old ON transfers(merchant, old_digest);
        CREATE UNIQUE INDEX transfers_serial ON transfers(card_id, serial)
            WHERE serial IS NOT NULL;

        -- Value added to an account; a box applies each id once, whatever repeats it.
        CREATE TABLE topups (
            id TEXT PRIMARY KEY,
            merchant TEXT NOT NULL,
            account TEXT NOT NULL,
            amount INTEGER NOT NULL,
            batch_seq INTEGER NOT NULL,
            issued_at INTEGER NOT NULL
        );
        CREATE INDEX topups_account ON topups(merchant, account);

        -- Offline spending limits per card and box ('*': every box); each `limits`
        -- batch carries all of a merchant's rows.
        CREATE TABLE spending_limits (
            merchant TEXT NOT NULL,
            card_id INTEGER NOT NULL,
            box TEXT NOT NULL,
            per_redemption INTEGER,
            per_account INTEGER,
            set_at INTEGER NOT NULL,
            PRIMARY KEY (merchant, card_id, box)
        );

        -- The merchant's policy for an overspent account: block its codes by batch.
        CREATE TABLE account_policy (
            merchant TEXT PRIMARY KEY,
            block_overspent INTEGER NOT NULL,
            set_at INTEGER NOT NULL
        );

        -- An account whose accepted spends (several boxes offline) passed its value:
        -- the largest excess seen, the boxes and records (JSON arrays) that spent it,
        -- and the block batch that answered it under the policy.
        CREATE TABLE overspends (
            merchant TEXT NOT NULL,
            account TEXT NOT NULL,
            amount_over INTEGER NOT NULL,
            spent INTEGER NOT NULL,
            account_value INTEGER NOT NULL,
            boxes TEXT NOT NULL,
            records TEXT NOT NULL,
            detected_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            blocked_seq INTEGER,
            PRIMARY KEY (merchant, account)
        );

        -- A transferred code's old digest redeemed on a box that had not applied the
        -- transfer batch (its record's cache_seq below the batch's seq).
        CREATE TABLE transfer_conflicts (
            merchant TEXT NOT NULL,
            transfer_id TEXT NOT NULL,
            digest TEXT NOT NULL,
            record_id TEXT NOT NULL,
            box TEXT NOT NULL,
            cache_seq INTEGER,
            transfer_seq INTEGER NOT NULL,
            detected_at INTEGER NOT NULL,
            PRIMARY KEY (transfer_id, record_id)
        );

        -- The account a record spent from (the event's "account").
        ALTER TABLE events ADD COLUMN account TEXT;
        CREATE INDEX events_account ON events(merchant, account) WHERE account IS NOT NULL;
"""

M007_STATUS_HISTORY = """
        -- Each box's statuses over time, for the console's box page: a row when the state,
        -- the cache sequence or a problem (alarm, stuck, publish error) changed, not for
        -- every periodic status; kept HISTORY_DAYS (Store.record_status trims it).
        CREATE TABLE box_status_history (
            merchant TEXT NOT NULL,
            box TEXT NOT NULL,
            at INTEGER NOT NULL,
            state TEXT NOT NULL,
            cache_seq INTEGER,
            outbox_depth INTEGER,
            problem TEXT
        );
        CREATE INDEX box_status_history_box ON box_status_history(merchant, box, at);
"""

HISTORY_DAYS = 90

STEPS: list[Step] = [
    ("m001_initial", M001_INITIAL),
    ("m002_fleet", M002_FLEET),
    ("m003_box_status", M003_BOX_STATUS),
    ("m004_dispensing", M004_DISPENSING),
    # Steps are recorded by name, not by position: a database that took m005/m006 before
    # m004 was registered gets m004 next time it is opened.
    ("m005_console", M_CONSOLE),
    ("m006_accounts", M006_ACCOUNTS),
    ("m007_status_history", M007_STATUS_HISTORY),
]


class StoreError(RuntimeError):
    """The backend database refuses an operation; the message says why."""


@dataclass(frozen=True)
class IssuedBatch:
    merchant: str
    seq: int
    kind: Kind
    count: int
    created_at: int
    expires_at: int
    sha256: str
    data: bytes

    def chunks(self) -> list[bytes]:
        """The batch's chunk messages (RDC1), as published over MQTT."""
        return batch.split(self.data)

    @classmethod
    def from_file(cls, data: bytes) -> IssuedBatch:
        """A batch file this backend signed itself (its header is not verified again)."""
        return _issued(data)


@dataclass(frozen=True)
class Gap:
    merchant: str
    box: str
    first: int
    last: int


@dataclass(frozen=True)
class Conflict:
    merchant: str
    digest: str
    first_box: str
    first_id: str
    second_box: str
    second_id: str


@dataclass(frozen=True)
class Stored:
    """What one `store_events` call committed, and what the collector must say and ack."""

    merchant: str
    box: str
    new: int
    duplicates: int
    upto: int
    ids: tuple[str, ...]
    """Ids of this message's records above `upto` (stored, but not yet contiguous)."""
    gaps: tuple[Gap, ...]
    filled: tuple[Gap, ...]
    conflicts: tuple[Conflict, ...]
    consumed: IssuedBatch | None


@dataclass(frozen=True)
class BoxStatus:
    """One status message of a box, parsed (backend/box_status.py). A last will carries
    only `state` ("offline"); everything else is None, and the store keeps what the
    box said last."""

    state: str
    raw: str
    will: bool = False
    box_at: int | None = None
    version: str | None = None
    cache_seq: int | None = None
    cache_age_s: int | None = None
    outbox_depth: int | None = None
    outbox_oldest_age_s: int | None = None
    publish_error: str | None = None
    drivers: tuple[dict[str, Any], ...] = ()
    stuck: str | None = None
    alarm: str | None = None


@dataclass(frozen=True)
class BoxRow:
    """A registered box and its status as `record_status` keeps it: `status` is None for
    a box that never sent one (after a last will, its state is "offline" and the rest is
    what the box said last); `since`, `last_seen` and `received_at` are the backend's
    clock, which no status message carries."""

    merchant: str
    box: str
    added_at: int
    latest_seq: int
    status: BoxStatus | None = None
    since: int | None = None
    last_seen: int | None = None
    received_at: int | None = None


SignConsumed = Callable[[str, int, bytes], bytes]
"""(merchant, seq, consumed entries) -> signed batch file."""

_COLUMNS = "merchant, seq, kind, count, created_at, expires_at, sha256, data"


class Store:
    def __init__(self, engine: Engine, directory: Path):
        self.engine = engine
        self.conn: Any = engine.conn
        """The driver's connection (sqlite3 or psycopg): tests look inside with it."""
        self.dir = directory
        self._sql = engine.execute
        self.errors: tuple[type[Exception], ...] = (StoreError, *engine.errors)
        """What a failed statement or a lost database raises, on either engine."""

    @property
    def broken(self) -> bool:
        """The database connection is gone (PostgreSQL restarted): reopen the store."""
        return self.engine.broken

    @classmethod
    def open(cls, directory: Path, database: str | None = None) -> Store:
        """Open (creating and migrating if needed) the backend's database: with a
        postgresql://user@host:port/name URL (`database`, else $REDEEMD_BACKEND_DATABASE),
        that PostgreSQL database; with neither, the SQLite file `{directory}/backend.db`.
        `directory` still holds the keys (and a legacy sequence.json) either way."""
        directory.mkdir(parents=True, exist_ok=True)
        if database is None:
            database = os.environ.get(DATABASE_ENV) or None
        try:
            engine = open_engine(directory, database, STEPS)
        except EngineError as exc:
            raise StoreError(str(exc)) from None
        return cls(engine, directory)

    @staticmethod
    def describe(directory: Path, database: str | None = None) -> str:
        """Which database `open` opens, as a person reads it (never with a password)."""
        database = database or os.environ.get(DATABASE_ENV) or None
        return str(directory / FILENAME) if database is None else redact(database)

    def close(self) -> None:
        self.engine.close()

    def _transaction(self):
        return self.engine.transaction()

    # ------------------------------------------------------------ batches

    def _legacy_last_seq(self, merchant: str) -> int:
        # Before backend.db, `issue` kept the last sequence per merchant in sequence.json.
        # Those batches are not in the store (they cannot be resent), but their sequences
        # are taken: the allocator continues after them.
        path = self.dir / LEGACY_SEQUENCES
        try:
            return int(json.loads(path.read_text()).get(merchant, 0))
        except (FileNotFoundError, ValueError, AttributeError):
            return 0

    def issue(
        self,
        merchant: str,
        kind: Kind,
        make: Callable[[int], bytes],
        seq: int | None = None,
    ) -> IssuedBatch:
        """Allocate the next sequence, call `make(seq)` for the signed batch file, store it.

        With `seq` given, that sequence is used if no batch has it yet. The allocation
        and the insert are one transaction, so the sequence is never handed out twice.
        """
        with self._transaction():
            self.engine.lock([_allocator(merchant)])
            if seq is None:
                seq = max(self.latest_seq(merchant), self._legacy_last_seq(merchant)) + 1
            elif self._sql(
                "SELECT 1 FROM batches WHERE merchant = ? AND seq = ?", (merchant, seq)
            ).fetchone():
                raise StoreError(
                    f"batch {merchant}/{seq} was already issued; boxes would refuse a different "
                    "batch with the same sequence (leave out --seq to take the next one)"
                )
            issued = _issued(make(seq))
            if (issued.merchant, issued.seq, issued.kind) != (merchant, seq, kind):
                raise StoreError("the batch built does not carry the allocated merchant/seq/kind")
            self.record_issued(issued)
        return issued

    def record_issued(self, issued: IssuedBatch) -> None:
        """The row of a batch this backend just signed, in the caller's transaction, which
        allocated its sequence (`issue`, a consumed-elsewhere or a block batch)."""
        self._sql(
            f"INSERT INTO batches({_COLUMNS}, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                issued.merchant,
                issued.seq,
                issued.kind.value,
                issued.count,
                issued.created_at,
                issued.expires_at,
                issued.sha256,
                issued.data,
                int(time.time()),
            ),
        )

    def latest_seq(self, merchant: str) -> int:
        row = self._sql(
            "SELECT COALESCE(MAX(seq), 0) FROM batches WHERE merchant = ?", (merchant,)
        ).fetchone()
        return row[0]

    def merchants(self) -> list[str]:
        return [r[0] for r in self._sql("SELECT DISTINCT merchant FROM batches ORDER BY 1")]

    def batches(self, merchant: str, first: int, last: int) -> list[IssuedBatch]:
        """The stored batches of `merchant` with first <= seq <= last, in order."""
        rows = self._sql(
            f"SELECT {_COLUMNS} FROM batches WHERE merchant = ? AND seq BETWEEN ? AND ? "
            "ORDER BY seq",
            (merchant, first, last),
        )
        return [_row_batch(r) for r in rows]

    def unpublished(self, merchants: Iterable[str] | None = None) -> list[IssuedBatch]:
        rows = self._sql(
            f"SELECT {_COLUMNS} FROM batches WHERE published_at IS NULL ORDER BY merchant, seq"
        )
        wanted = None if merchants is None else set(merchants)
        return [_row_batch(r) for r in rows if wanted is None or r[0] in wanted]

    def mark_published(self, merchant: str, seq: int) -> None:
        self._sql(
            "UPDATE batches SET published_at = ? WHERE merchant = ? AND seq = ?",
            (int(time.time()), merchant, seq),
        )

    # ------------------------------------------------------------ events

    def store_events(
        self,
        merchant: str,
        box: str,
        events: list[Event],
        sign_consumed: SignConsumed | None = None,
    ) -> Stored:
        """Store one message's records in one transaction; duplicates are ignored."""
        return self.store_messages([(merchant, box, events)], sign_consumed)[0]

    def store_messages(
        self,
        messages: list[tuple[str, str, list[Event]]],
        sign_consumed: SignConsumed | None = None,
    ) -> list[Stored]:
        """Store several messages' records, (merchant, box, events) each, in ONE commit.

        One commit is one fsync, which costs more than storing a few hundred records:
        the collector takes every message already waiting and commits them together
        (group commit), then acks each. Per message this also advances the box's
        high-water mark, records new and filled gaps, flags conflicts among the new
        records and, with `sign_consumed`, issues the consumed-elsewhere batch for
        them, all in the same commit.
        """
        now = int(time.time())
        with self._transaction():
            # Where writers run side by side (PostgreSQL), a box's high-water mark and
            # gaps, and the conflict check of a digest, are each one writer's at a time;
            # all taken up front, in one order, so two collectors cannot deadlock.
            self.engine.lock(
                [("box", merchant, box) for merchant, box, _ in messages]
                + [
                    ("digest", merchant, e.digest)
                    for merchant, _, events in messages
                    for e in events
                    if e.digest is not None and _consumes_last_use(e)
                ]
                + accounts.lock_keys(messages)
            )
            # Which records are new, across the whole group: one look-up for every id,
            # then one bulk insert (the records of a box resent within the group, or
            # already stored, are duplicates).
            seen = self._existing_ids([e.id for _, _, events in messages for e in events])
            fresh: list[list[Event]] = []
            for _, _, events in messages:
                new: list[Event] = []
                for event in events:
                    if event.id not in seen:
                        seen.add(event.id)
                        new.append(event)
                fresh.append(new)
            self.engine.insert_new(
                "events",
                _EVENT_COLUMNS,
                [
                    (
                        e.id,
                        merchant,
                        box,
                        e.seq,
                        e.at_ms,
                        e.digest,
                        e.card_id,
                        e.action,
                        e.verdict,
                        e.uses,
                        e.amount,
                        e.uses_left,
                        e.balance,
                        e.reverses,
                        e.raw,
                        now,
                        e.account,
                    )
                    for (merchant, box, _), new in zip(messages, fresh, strict=True)
                    for e in new
                ],
            )
            # Each message is then judged as if the ones after it were not stored yet,
            # as when they were stored one by one: a double redemption within the group
            # is one conflict, found by the later record, not one from each side.
            later = {e.id for new in fresh for e in new}
            last_uses = self._last_uses(
                [(m, new) for (m, _, _), new in zip(messages, fresh, strict=True)]
            )
            advanced = self._advance([(m, b) for m, b, _ in messages], now)
            told: set[tuple[str, str]] = set()
            results = []
            for (merchant, box, events), new in zip(messages, fresh, strict=True):
                later.difference_update(e.id for e in new)
                # A box's new and filled gaps are told once, with its first message.
                upto, gaps, filled = advanced[merchant, box]
                if (merchant, box) in told:
                    gaps, filled = (), ()
                told.add((merchant, box))
                results.append(
                    self._store(
                        merchant,
                        box,
                        events,
                        new,
                        (upto, gaps, filled),
                        last_uses,
                        later,
                        sign_consumed,
                        now,
                    )
                )
            accounts.reconcile(self, messages, fresh, sign_consumed, now)
            return results

    def _store(
        self,
        merchant: str,
        box: str,
        events: list[Event],
        new: list[Event],
        advanced: tuple[int, tuple[Gap, ...], tuple[Gap, ...]],
        last_uses: dict[str, list[tuple[str, str]]],
        later: set[str],
        sign_consumed: SignConsumed | None,
        now: int,
    ) -> Stored:
        upto, gaps, filled = advanced
        conflicts = self._conflicts(merchant, new, last_uses, later, now)
        consumed = None
        if conflicts and sign_consumed is not None:
            consumed = self._consumed_batch(merchant, conflicts, sign_consumed)
        return Stored(
            merchant=merchant,
            box=box,
            new=len(new),
            duplicates=len(events) - len(new),
            upto=upto,
            ids=tuple(e.id for e in events if e.seq > upto),
            gaps=gaps,
            filled=filled,
            conflicts=conflicts,
            consumed=consumed,
        )

    def _existing_ids(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            rows = self._sql(f"SELECT id FROM events WHERE id IN ({marks})", part)
            found.update(r[0] for r in rows)
        return found

    def _advance(
        self, boxes: list[tuple[str, str]], now: int
    ) -> dict[tuple[str, str], tuple[int, tuple[Gap, ...], tuple[Gap, ...]]]:
        """Raise each box's high-water mark over its stored records and record the gaps
        opened and filled: (upto, new gaps, filled gaps) per (merchant, box). A handful of
        statements for the whole group, whatever the number of boxes in it: per box,
        these were most of a one-record message's cost."""
        boxes = sorted(set(boxes))
        self.engine.executemany(
            "INSERT INTO boxes(merchant, box) VALUES (?, ?) ON CONFLICT DO NOTHING", boxes
        )
        marks: dict[tuple[str, str], int] = {}
        above: dict[tuple[str, str], list[int]] = {b: [] for b in boxes}
        open_gaps: dict[tuple[str, str], list[tuple[int, int]]] = {b: [] for b in boxes}
        for merchant in sorted({m for m, _ in boxes}):
            names = [b for m, b in boxes if m == merchant]
            for i in range(0, len(names), 500):
                part = names[i : i + 500]
                marks_sql = ",".join("?" * len(part))
                for box, upto in self._sql(
                    f"SELECT box, upto FROM boxes WHERE merchant = ? AND box IN ({marks_sql})",
                    (merchant, *part),
                ):
                    marks[merchant, box] = upto
                # Every stored seq above each box's old mark, in order.
                for box, seq in self._sql(
                    "SELECT e.box, e.seq FROM boxes b JOIN events e ON e.merchant = b.merchant "
                    "AND e.box = b.box AND e.seq > b.upto "
                    f"WHERE b.merchant = ? AND b.box IN ({marks_sql}) ORDER BY e.box, e.seq",
                    (merchant, *part),
                ):
                    above[merchant, box].append(seq)
                for box, first, last in self._sql(
                    "SELECT box, first, last FROM gaps WHERE merchant = ? "
                    f"AND box IN ({marks_sql}) AND filled_at IS NULL",
                    (merchant, *part),
                ):
                    open_gaps[merchant, box].append((first, last))
        results = {}
        updates, fills, detections = [], [], []
        for key in boxes:
            merchant, box = key
            upto = marks[key]
            # The contiguous run raises the mark, whatever lies beyond a hole is "above".
            rest: list[int] = []
            for seq in above[key]:
                if not rest and seq <= upto + 1:
                    upto = seq
                else:
                    rest.append(seq)
            top = rest[-1] if rest else upto
            updates.append((upto, top, top, now, merchant, box))
            missing = []
            previous = upto
            for seq in rest:
                if seq > previous + 1:
                    missing.append((previous + 1, seq - 1))
                previous = seq
            filled = []
            for first, last in open_gaps[key]:
                if not any(a <= last and b >= first for a, b in missing):
                    fills.append((now, merchant, box, first, last))
                    filled.append(Gap(merchant, box, first, last))
            detected = []
            for a, b in missing:
                if not any(first <= a and b <= last for first, last in open_gaps[key]):
                    detections.append((merchant, box, a, b, now))
                    detected.append(Gap(merchant, box, a, b))
            results[key] = (upto, tuple(detected), tuple(filled))
        self.engine.executemany(
            "UPDATE boxes SET upto = ?, max_seq = CASE WHEN max_seq > ? THEN max_seq ELSE ? END, "
            "last_stored_at = ? WHERE merchant = ? AND box = ?",
            updates,
        )
        self.engine.executemany(
            "UPDATE gaps SET filled_at = ? WHERE merchant = ? AND box = ? AND first = ? "
            "AND last = ?",
            fills,
        )
        self.engine.executemany(
            "INSERT INTO gaps(merchant, box, first, last, detected_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (merchant, box, first, last) "
            "DO UPDATE SET detected_at = excluded.detected_at, filled_at = NULL",
            detections,
        )
        return results

    def _last_uses(
        self, messages: list[tuple[str, list[Event]]]
    ) -> dict[str, list[tuple[str, str]]]:
        """Every stored record that consumed the last use of a digest one of the new
        records consumed the last use of, by digest: (id, box) in redemption order.
        One query per 500 digests for the whole group: per message, this look-up was
        most of the collector's time."""
        by_digest: dict[str, list[tuple[str, str]]] = {}
        for merchant in sorted({m for m, _ in messages}):
            digests = sorted(
                {
                    e.digest
                    for m, new in messages
                    if m == merchant
                    for e in new
                    if e.digest is not None and _consumes_last_use(e)
                }
            )
            for i in range(0, len(digests), 500):
                part = digests[i : i + 500]
                rows = self._sql(
                    "SELECT digest, id, box FROM events e WHERE merchant = ? AND digest IN "
                    f"({','.join('?' * len(part))}) AND action = 'redeem' AND verdict = "
                    "'accepted' AND uses_left = 0 AND balance IS NULL AND NOT EXISTS (SELECT 1 "
                    "FROM events r WHERE r.reverses = e.id AND r.action = 'reverse' AND "
                    "r.verdict = 'accepted') ORDER BY at_ms, id",
                    (merchant, *part),
                )
                for digest, other_id, other_box in rows:
                    by_digest.setdefault(f"{merchant}/{digest}", []).append((other_id, other_box))
        return by_digest

    def _conflicts(
        self,
        merchant: str,
        new: list[Event],
        by_digest: dict[str, list[tuple[str, str]]],
        later: set[str],
        now: int,
    ) -> tuple[Conflict, ...]:
        # A single-use code: the redemption left no uses (uses_left 0) on a use-counted
        # card. Two boxes that each consumed the last use, offline, is a double redemption.
        # A redemption undone by an accepted reversal does not count.
        candidates = [e for e in new if _consumes_last_use(e)]
        found = []
        for event in candidates:
            digest = event.digest
            if digest is None:
                continue
            for other_id, other_box in by_digest.get(f"{merchant}/{digest}", ()):
                if other_box == event.box or other_id in later:
                    continue
                cursor = self._sql(
                    "INSERT INTO conflicts(merchant, digest, first_id, first_box, "
                    "second_id, second_box, detected_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (merchant, digest, other_id, other_box, event.id, event.box, now),
                )
                if cursor.rowcount == 1:
                    found.append(
                        Conflict(merchant, digest, other_box, other_id, event.box, event.id)
                    )
        return tuple(found)

    def _consumed_batch(
        self, merchant: str, conflicts: tuple[Conflict, ...], sign: SignConsumed
    ) -> IssuedBatch:
        # Both sides of every conflict go in: each box ignores its own record id
        # (section 11) and learns the other's; every other box learns both.
        ids = []
        for c in conflicts:
            ids += [c.first_id, c.second_id]
        marks = ",".join("?" * len(ids))
        rows = self._sql(
            f"SELECT id, digest, uses, amount FROM events WHERE id IN ({marks}) "
            "AND consumed_seq IS NULL ORDER BY at_ms, id",
            ids,
        ).fetchall()
        entries = batch.encode_consumed(
            (bytes.fromhex(digest), uuid.UUID(record_id).bytes, uses or 0, amount or 0)
            for record_id, digest, uses, amount in rows
        )
        # Already inside the events transaction: allocate exactly like issue() does.
        self.engine.lock([_allocator(merchant)])
        seq = max(self.latest_seq(merchant), self._legacy_last_seq(merchant)) + 1
        issued = _issued(sign(merchant, seq, entries))
        self.record_issued(issued)
        self.engine.executemany(
            "UPDATE events SET consumed_seq = ? WHERE id = ?", [(seq, r[0]) for r in rows]
        )
        self.engine.executemany(
            "UPDATE conflicts SET consumed_seq = ? WHERE first_id = ? AND second_id = ?",
            [(seq, c.first_id, c.second_id) for c in conflicts],
        )
        return issued

    # ------------------------------------------------------------ reading back

    def high_water(self, merchant: str, box: str) -> int:
        row = self._sql(
            "SELECT upto FROM boxes WHERE merchant = ? AND box = ?", (merchant, box)
        ).fetchone()
        return row[0] if row else 0

    def open_gaps(self) -> list[Gap]:
        rows = self._sql(
            "SELECT merchant, box, first, last FROM gaps WHERE filled_at IS NULL "
            "ORDER BY merchant, box, first"
        )
        return [Gap(*r) for r in rows]

    def conflicts(self) -> list[Conflict]:
        rows = self._sql(
            "SELECT merchant, digest, first_box, first_id, second_box, second_id FROM conflicts "
            "ORDER BY detected_at, first_id, second_id"
        )
        return [Conflict(*r) for r in rows]

    # ------------------------------------------------------------ fleet

    def add_boxes(self, merchant: str, boxes: Iterable[str]) -> list[str]:
        """Register `boxes` for `merchant`; returns the ones that were new.

        A box already registered for another merchant is refused (StoreError), since its
        id is its broker username: one box id, one merchant, one ledger.
        """
        added = []
        with self._transaction():
            for box in boxes:
                row = self._sql("SELECT merchant FROM fleet WHERE box = ?", (box,))
                known = row.fetchone()
                if known is None:
                    self._sql(
                        "INSERT INTO fleet(box, merchant, added_at) VALUES (?, ?, ?)",
                        (box, merchant, int(time.time())),
                    )
                    added.append(box)
                elif known[0] != merchant:
                    raise StoreError(
                        f"box {box} is registered for merchant {known[0]}, not {merchant}; "
                        "a box id names one box of one merchant: give this box another id, or "
                        f"`box remove {box}` first if it really moved"
                    )
        return added

    def remove_boxes(self, boxes: Iterable[str]) -> list[str]:
        """Unregister `boxes`; returns the ones that were registered. Their stored events
        stay; the collector refuses their new ones."""
        removed = []
        with self._transaction():
            for box in boxes:
                if self._sql("DELETE FROM fleet WHERE box = ?", (box,)).rowcount:
                    removed.append(box)
        return removed

    def fleet(self) -> dict[str, str]:
        """Every registered box and its merchant, {box: merchant}, in box order."""
        rows = self._sql("SELECT box, merchant FROM fleet ORDER BY merchant, box")
        return dict(rows.fetchall())

    def merchant_of(self, box: str) -> str | None:
        """The merchant `box` is registered for, or None for a box the backend does not know."""
        row = self._sql("SELECT merchant FROM fleet WHERE box = ?", (box,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------ box status

    def record_status(self, merchant: str, box: str, status: BoxStatus, now: int) -> bool:
        """Keep `status` as `box`'s latest; False if nothing changed.

        The same message again (the broker redelivers the retained status to every new
        subscription, so on each collector's reconnect, and to every collector) changes
        nothing, not even the times. `since` moves only when the state does. A last will
        marks the box offline and keeps what the box itself said last (cache_seq,
        outbox ...), which is still the best knowledge of it.
        """
        with self._transaction():
            # Several collectors receive every status: one writer per box at a time.
            self.engine.lock([("status", merchant, box)])
            row = self._sql(
                "SELECT state, since, raw, cache_seq, alarm, stuck, publish_error FROM box_status "
                "WHERE merchant = ? AND box = ?",
                (merchant, box),
            ).fetchone()
            if row is not None and row[2] == status.raw:
                return False
            since = row[1] if row is not None and row[0] == status.state else now
            self._history(merchant, box, status, row, now)
            if status.will:
                if row is None:
                    self._sql(
                        "INSERT INTO box_status(merchant, box, state, since, raw, received_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (merchant, box, status.state, since, status.raw, now),
                    )
                else:
                    self._sql(
                        "UPDATE box_status SET state = ?, since = ?, raw = ?, received_at = ? "
                        "WHERE merchant = ? AND box = ?",
                        (status.state, since, status.raw, now, merchant, box),
                    )
                return True
            values = (
                status.state,
                since,
                now,
                status.box_at,
                status.version,
                status.cache_seq,
                status.cache_age_s,
                status.outbox_depth,
                status.outbox_oldest_age_s,
                status.publish_error,
                json.dumps(list(status.drivers)),
                status.stuck,
                status.alarm,
                status.raw,
                now,
            )
            self._sql(
                "INSERT INTO box_status(merchant, box, state, since, last_seen, box_at, version, "
                "cache_seq, cache_age_s, outbox_depth, outbox_oldest_age_s, publish_error, "
                "drivers, stuck, alarm, raw, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (merchant, box) DO UPDATE SET state = excluded.state, "
                "since = excluded.since, last_seen = excluded.last_seen, "
                "box_at = excluded.box_at, version = excluded.version, "
                "cache_seq = excluded.cache_seq, cache_age_s = excluded.cache_age_s, "
                "outbox_depth = excluded.outbox_depth, "
                "outbox_oldest_age_s = excluded.outbox_oldest_age_s, "
                "publish_error = excluded.publish_error, drivers = excluded.drivers, "
                "stuck = excluded.stuck, alarm = excluded.alarm, raw = excluded.raw, "
                "received_at = excluded.received_at",
                (merchant, box, *values),
            )
        return True

    def _history(
        self, merchant: str, box: str, status: BoxStatus, row: tuple | None, now: int
    ) -> None:
        """A history row when what an operator follows changed: the state, the cache
        sequence (a last will keeps the last one the box said) or a problem."""
        problem = "; ".join(p for p in (status.alarm, status.stuck, status.publish_error) if p)
        cache_seq = row[3] if status.will and row is not None else status.cache_seq
        if row is not None:
            before = "; ".join(p for p in (row[4], row[5], row[6]) if p)
            if (row[0], row[3], before) == (status.state, cache_seq, problem):
                return
        self._sql(
            "INSERT INTO box_status_history(merchant, box, at, state, cache_seq, outbox_depth, "
            "problem) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                merchant,
                box,
                now,
                status.state,
                cache_seq,
                None if status.will else status.outbox_depth,
                problem or None,
            ),
        )
        self._sql(
            "DELETE FROM box_status_history WHERE merchant = ? AND box = ? AND at < ?",
            (merchant, box, now - HISTORY_DAYS * 86400),
        )

    def status_history(self, merchant: str, box: str, limit: int = 50) -> list[tuple]:
        """(at, state, cache_seq, outbox_depth, problem) of `box`, newest first."""
        return list(
            self._sql(
                "SELECT at, state, cache_seq, outbox_depth, problem FROM box_status_history "
                "WHERE merchant = ? AND box = ? ORDER BY at DESC LIMIT ?",
                (merchant, box, limit),
            ).fetchall()
        )

    def box_rows(self) -> list[BoxRow]:
        """Every registered box with its latest status (or none yet) and its merchant's
        latest batch sequence, in merchant and box order. A status kept for a box since
        unregistered is left out, as the collector leaves out its messages."""
        latest: dict[str, int] = {}
        rows = self._sql(
            "SELECT f.merchant, f.box, f.added_at, s.since, s.last_seen, s.received_at, "
            "s.state, s.raw, s.box_at, s.version, s.cache_seq, s.cache_age_s, s.outbox_depth, "
            "s.outbox_oldest_age_s, s.publish_error, s.drivers, s.stuck, s.alarm FROM fleet f "
            "LEFT JOIN box_status s ON s.merchant = f.merchant AND s.box = f.box "
            "ORDER BY f.merchant, f.box"
        ).fetchall()
        result = []
        for merchant, box, added_at, since, last_seen, received_at, *said in rows:
            if merchant not in latest:
                latest[merchant] = max(self.latest_seq(merchant), self._legacy_last_seq(merchant))
            (
                state,
                raw,
                box_at,
                version,
                cache_seq,
                cache_age_s,
                depth,
                oldest,
                publish_error,
                drivers,
                stuck,
                alarm,
            ) = said
            status = None
            if state is not None:
                status = BoxStatus(
                    state=state,
                    raw=raw,
                    box_at=box_at,
                    version=version,
                    cache_seq=cache_seq,
                    cache_age_s=cache_age_s,
                    outbox_depth=depth,
                    outbox_oldest_age_s=oldest,
                    publish_error=publish_error,
                    drivers=tuple(json.loads(drivers)) if drivers else (),
                    stuck=stuck,
                    alarm=alarm,
                )
            result.append(
                BoxRow(
                    merchant=merchant,
                    box=box,
                    added_at=added_at,
                    latest_seq=latest[merchant],
                    status=status,
                    since=since,
                    last_seen=last_seen,
                    received_at=received_at,
                )
            )
        return result

    def seen_unregistered(self) -> list[tuple[str, str]]:
        """(merchant, box) with stored events but no such registration: after an upgrade,
        the boxes to `box add` before the collector takes their events again (and any
        records a box once wrote under another merchant, before the collector checked)."""
        rows = self._sql(
            "SELECT merchant, box FROM boxes b WHERE NOT EXISTS (SELECT 1 FROM fleet f "
            "WHERE f.box = b.box AND f.merchant = b.merchant) ORDER BY merchant, box"
        )
        return rows.fetchall()


_EVENT_COLUMNS = (
    "id",
    "merchant",
    "box",
    "seq",
    "at_ms",
    "digest",
    "card_id",
    "action",
    "verdict",
    "uses",
    "amount",
    "uses_left",
    "balance",
    "reverses",
    "raw",
    "stored_at",
    "account",
)


def _consumes_last_use(event: Event) -> bool:
    return (
        event.action == "redeem"
        and event.verdict == "accepted"
        and event.digest is not None
        and event.uses_left == 0
        and event.balance is None
    )


def _allocator(merchant: str) -> tuple[str, str]:
    """The lock a transaction holds while it takes `merchant`'s next batch sequence."""
    return ("batches", merchant)


def _issued(data: bytes) -> IssuedBatch:
    # Our own freshly built batch: read the header without verifying it again.
    (length,) = struct.unpack_from(">I", data, 4)
    raw = data[8 : 8 + length]
    header = json.loads(raw)
    return IssuedBatch(
        merchant=header["merchant"],
        seq=header["seq"],
        kind=Kind(header["kind"]),
        count=header["count"],
        created_at=header["created_at"],
        expires_at=header["expires_at"],
        sha256=hashlib.sha256(raw).hexdigest(),
        data=data,
    )


def _row_batch(row: tuple) -> IssuedBatch:
    merchant, seq, kind, count, created_at, expires_at, sha256, data = row
    return IssuedBatch(merchant, seq, Kind(kind), count, created_at, expires_at, sha256, data)


# Last: backend/accounts.py builds on the Store above, and store_messages calls it.
from backend import accounts  # noqa: E402
