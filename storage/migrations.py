"""Named schema migrations, run with sqlite-utils' `Migrations`.

Each step is a function registered in order; `apply` runs the pending ones inside a
transaction with the record of having run them. Never edit a released step: add one.
Every step is tested on a database created by the steps before it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("redeemd")

MIGRATION_TIMEOUT_S = 30 * 60
"""What the service asks systemd for (EXTEND_TIMEOUT_USEC) before migrating: a step
that copies a table (m006 copies the ledger, about 17 s per million records on a fast
disk, several times that on an SD card) can outlast the unit's 60 s start."""


def pending_on(path: str | Path) -> list[str]:
    """Names of the steps opening the database at `path` would run, read without
    writing; [] when there is no database yet (creating one is quick)."""
    if not Path(path).exists() or Path(path).stat().st_size == 0:
        return []
    conn = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        db = Database(conn, recursive_triggers=False, execute_plugins=False)
        return [m.name for m in migrations.pending(db)]
    finally:
        conn.close()


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        -- One B-tree probe per scan: the digest is the key, the row is the value.
        -- NULL columns mean "the card's default" and cost no bytes.
        CREATE TABLE codes (
            digest BLOB PRIMARY KEY,
            card_id INTEGER NOT NULL,
            not_before INTEGER,
            not_after INTEGER,
            uses_left INTEGER,
            balance INTEGER,
            status INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID;

        CREATE TABLE cards (
            card_id INTEGER PRIMARY KEY,
            merchant TEXT NOT NULL,
            body TEXT NOT NULL
        );

        CREATE TABLE issuer_keys (
            key_id TEXT PRIMARY KEY,
            public_key BLOB NOT NULL,
            delegation TEXT NOT NULL
        );

        -- Per merchant: the last applied sequence and the newest signed time seen,
        -- which is the floor under the box's clock.
        CREATE TABLE trust (
            merchant TEXT PRIMARY KEY,
            last_seq INTEGER NOT NULL,
            time_floor INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );

        CREATE TABLE batches (
            merchant TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            count INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            applied_at INTEGER NOT NULL,
            PRIMARY KEY (merchant, seq)
        );

        -- Every verdict. seq is the box sequence: INTEGER PRIMARY KEY without
        -- AUTOINCREMENT takes max+1, and rows are never deleted, so it has no gaps.
        CREATE TABLE ledger (
            seq INTEGER PRIMARY KEY,
            id BLOB NOT NULL UNIQUE,
            at_ms INTEGER NOT NULL,
            box TEXT NOT NULL,
            merchant TEXT NOT NULL,
            store TEXT NOT NULL,
            digest BLOB,
            card_id INTEGER,
            action TEXT NOT NULL,
            uses INTEGER,
            amount INTEGER,
            uses_left INTEGER,
            balance INTEGER,
            verdict TEXT NOT NULL,
            reason TEXT,
            source TEXT NOT NULL,
            symbology TEXT,
            operator TEXT,
            cache_seq INTEGER NOT NULL,
            reverses BLOB
        );
        CREATE INDEX ledger_reverses ON ledger(reverses) WHERE reverses IS NOT NULL;

        -- Ledger rows the backend has not acknowledged yet.
        CREATE TABLE outbox (seq INTEGER PRIMARY KEY);

        -- Other boxes' redemptions already applied (consumed-elsewhere batches).
        CREATE TABLE consumed_seen (record_id BLOB PRIMARY KEY) WITHOUT ROWID;
        """
    )


@migrations()
def m002_outbox_trigger(db: Database) -> None:
    # Every ledger row enters the outbox in the same statement: nobody can forget it,
    # and the scan path makes one call into SQLite fewer.
    db.execute(
        "CREATE TRIGGER ledger_to_outbox AFTER INSERT ON ledger "
        "BEGIN INSERT INTO outbox(seq) VALUES (new.seq); END"
    )


@migrations()
def m003_api_requests(db: Database) -> None:
    # Idempotency keys of local API requests that wrote a ledger row. The key is
    # inserted in the transaction of that row, so a crash leaves both or neither: a
    # retried `redeem` finds its key and gets the original verdict back instead of
    # redeeming twice. `fingerprint` (keyed, no plaintext code) tells a retry from a
    # different request that reused the key. Local only: it never syncs.
    db.execute(
        """
        CREATE TABLE api_requests (
            key TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            seq INTEGER NOT NULL UNIQUE REFERENCES ledger(seq),
            verdict TEXT NOT NULL
        ) WITHOUT ROWID
        """
    )


@migrations()
def m004_batch_entries_sha256(db: Database) -> None:
    # What an applied batch *says*, apart from who signed it when: a backend re-signs
    # an expired batch with the same merchant, seq, kind and entries (protocol.md
    # 16.6), and the box must tell that re-signing (a replay) from a different batch
    # with the same sequence (a conflict: possible key compromise). Batches applied
    # before this step keep NULL: their entries were never kept, so the hash cannot be
    # computed; storage.batch_import compares their kind and count instead.
    db.execute("ALTER TABLE batches ADD COLUMN entries_sha256 TEXT")


@migrations()
def m005_trust_manifest(db: Database) -> None:
    # The cache's age follows the signed manifest (protocol.md 16.1), and the engine's
    # stale_policy = "reject" judges by it, so what the manifest said must survive a
    # restart and be readable by the engine's own connection: the newest manifest kept
    # (its latest_seq and created_at), and current_at, the created_at of the newest
    # manifest whose latest_seq was already applied when a later manifest replaced it.
    # NULL until a manifest arrives; the cache's age then follows the batches alone.
    for column in ("manifest_seq", "manifest_at", "current_at"):
        db.execute(f"ALTER TABLE trust ADD COLUMN {column} INTEGER")


@migrations()
def m006_outbox_from_the_ledger(db: Database) -> None:
    # Issue 10, fewer writes per scan: every accepted scan wrote 4 WAL pages (the ledger
    # row, its entry in the UNIQUE index on ledger.id, an outbox row, the code's state)
    # where 2 must change. The outbox becomes a view of the ledger: the records after
    # the `acked` mark that are not in outbox_acked (acked by id, out of order, ahead of
    # the mark). A scan writes no outbox row; an ack moves the mark. Record ids are
    # indexed in ledger_ids, written in bulk off the scan path (storage.ledger.index_ids,
    # run by every ack and batch import) up to the `ids` mark; storage.ledger.by_id looks
    # up the index, then the few rows after the mark. So the ledger is rebuilt without
    # its UNIQUE(id) (SQLite cannot drop a constraint's index), once, as SQLite's ALTER
    # TABLE page says: new table, copy, drop, rename. Records waiting in the old outbox
    # stay waiting: the mark goes just before the first of them, and the acked ones
    # after it go to outbox_acked.
    db.executescript(
        """
        CREATE TABLE ledger_marks (
            name TEXT PRIMARY KEY,
            seq INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE outbox_acked (seq INTEGER PRIMARY KEY);
        CREATE TABLE ledger_ids (
            id BLOB PRIMARY KEY,
            seq INTEGER NOT NULL
        ) WITHOUT ROWID;

        INSERT INTO ledger_marks(name, seq) VALUES (
            'acked',
            COALESCE((SELECT MIN(seq) FROM outbox) - 1, (SELECT MAX(seq) FROM ledger), 0)
        );
        INSERT INTO outbox_acked(seq)
            SELECT seq FROM ledger
            WHERE seq > (SELECT seq FROM ledger_marks WHERE name = 'acked')
            AND seq NOT IN (SELECT seq FROM outbox);
        INSERT OR IGNORE INTO ledger_ids(id, seq) SELECT id, seq FROM ledger ORDER BY seq;
        INSERT INTO ledger_marks(name, seq)
            VALUES ('ids', (SELECT COALESCE(MAX(seq), 0) FROM ledger));

        CREATE TABLE ledger_new (
            seq INTEGER PRIMARY KEY,
            id BLOB NOT NULL,
            at_ms INTEGER NOT NULL,
            box TEXT NOT NULL,
            merchant TEXT NOT NULL,
            store TEXT NOT NULL,
            digest BLOB,
            card_id INTEGER,
            action TEXT NOT NULL,
            uses INTEGER,
            amount INTEGER,
            uses_left INTEGER,
            balance INTEGER,
            verdict TEXT NOT NULL,
            reason TEXT,
            source TEXT NOT NULL,
            symbology TEXT,
            operator TEXT,
            cache_seq INTEGER NOT NULL,
            reverses BLOB
        );
        INSERT INTO ledger_new(seq, id, at_ms, box, merchant, store, digest, card_id,
            action, uses, amount, uses_left, balance, verdict, reason, source, symbology,
            operator, cache_seq, reverses)
        SELECT seq, id, at_ms, box, merchant, store, digest, card_id, action, uses, amount,
            uses_left, balance, verdict, reason, source, symbology, operator, cache_seq,
            reverses
        FROM ledger ORDER BY seq;
        DROP TABLE outbox;
        DROP TABLE ledger;
        ALTER TABLE ledger_new RENAME TO ledger;
        CREATE INDEX ledger_reverses ON ledger(reverses) WHERE reverses IS NOT NULL;

        -- What the box still has to deliver: read by the pump, status and snapshot
        -- replays as the outbox table was, so their queries did not change.
        CREATE VIEW outbox AS
            SELECT seq FROM ledger
            WHERE seq > (SELECT seq FROM ledger_marks WHERE name = 'acked')
            AND seq NOT IN (SELECT seq FROM outbox_acked);
        """
    )


@migrations()
def m007_api_requests_without_seq_index(db: Database) -> None:
    # Issue 10: the UNIQUE on api_requests.seq was one more index page written by every
    # redemption through the local API (4.86 WAL pages against a scan's 2.06), and
    # nothing looks a key up by its ledger row: a retry finds it by key, and the prune
    # at start walks the few keys there are. Rebuilt without it, as m006 the ledger.
    db.executescript(
        """
        CREATE TABLE api_requests_new (
            key TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            seq INTEGER NOT NULL REFERENCES ledger(seq),
            verdict TEXT NOT NULL
        ) WITHOUT ROWID;
        INSERT INTO api_requests_new(key, fingerprint, seq, verdict)
            SELECT key, fingerprint, seq, verdict FROM api_requests;
        DROP TABLE api_requests;
        ALTER TABLE api_requests_new RENAME TO api_requests;
        """
    )


@migrations()
def m008_dispensing(db: Database) -> None:
    # Issue 12, dispensing. The box's grant set: one row, replaced whole by a newer one
    # (storage/dispensing.py); `raw` is the signed message, verified again when read.
    # The ledger names the grant and counter of each claim code it minted. Two nullable
    # columns added at the end cost no rewrite of the ledger (SQLite's ADD COLUMN only
    # edits the schema) and no byte in a scan's row. The UNIQUE partial index is both
    # the lookup of the highest counter per grant (MAX over an index is one probe) and
    # the database's own guarantee that a counter is never committed twice; a scan's
    # row has no grant_id, so it enters no index page.
    db.executescript(
        """
        CREATE TABLE grant_set (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            seq INTEGER NOT NULL,
            raw BLOB NOT NULL,
            applied_at INTEGER NOT NULL
        );
        ALTER TABLE ledger ADD COLUMN grant_id TEXT;
        ALTER TABLE ledger ADD COLUMN counter INTEGER;
        CREATE UNIQUE INDEX ledger_dispensed ON ledger(grant_id, counter)
            WHERE grant_id IS NOT NULL;
        """
    )


@migrations()
def m009_accounts(db: Database) -> None:
    # Issue 13, accounts (docs/protocol.md 19). An account holds the uses or balance that
    # its linked codes spend: keyed by its id for one B-tree probe, as codes by digest.
    # codes.account links a code (NULL for every code before this step and for every
    # code never linked, so nothing changes for them, and a NULL costs no byte). Top-up
    # and transfer ids are kept for good so each applies once whatever batch repeats it.
    # `limits` is the backend's offline limits, replaced whole by a `limits` batch.
    # `spent` (accounts and codes) is this box's unacknowledged accepted spend, only for
    # cards with a per_account limit: kept in the row the redemption writes anyway (the
    # account's, or the code's), so it costs no WAL page of its own, and lowered when
    # acks move past its records (storage/accounts.py). The ledger's `account` is added
    # nullable at the end like m008's columns: no rewrite, no byte in a plain record.
    db.executescript(
        """
        CREATE TABLE accounts (
            account BLOB PRIMARY KEY,
            card_id INTEGER NOT NULL,
            not_before INTEGER,
            not_after INTEGER,
            uses_left INTEGER,
            balance INTEGER,
            status INTEGER NOT NULL DEFAULT 0,
            spent INTEGER
        ) WITHOUT ROWID;
        ALTER TABLE codes ADD COLUMN account BLOB;
        ALTER TABLE codes ADD COLUMN spent INTEGER;
        CREATE TABLE topups_applied (topup_id BLOB PRIMARY KEY) WITHOUT ROWID;
        CREATE TABLE transfers_applied (transfer_id BLOB PRIMARY KEY) WITHOUT ROWID;
        CREATE TABLE limits (
            card_id INTEGER NOT NULL,
            box TEXT NOT NULL,
            per_redemption INTEGER,
            per_account INTEGER,
            PRIMARY KEY (card_id, box)
        ) WITHOUT ROWID;
        ALTER TABLE ledger ADD COLUMN account BLOB;
        """
    )
