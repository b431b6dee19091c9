"""The console's tables, one migration step of the backend store (backend/store.py STEPS).

Written as SQLite DDL like the store's other steps; backend/engines.py gives PostgreSQL
the same with BIGINT for INTEGER. No autoincrement (the two engines spell it apart): an
audit entry's key is a random id, its order is its time.
"""

from __future__ import annotations

M_CONSOLE = """
        -- Console accounts (`redeemd-backend user add`): the password only as its Argon2id
        -- hash, the role viewer (reads) or operator (also acts).
        CREATE TABLE console_users (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );

        -- Signed-in browsers: the cookie's token only as its SHA-256, so a copy of the
        -- database opens no session; csrf is the token every POST form must carry.
        CREATE TABLE console_sessions (
            token_hash TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            csrf TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        );
        CREATE INDEX console_sessions_name ON console_sessions(name);

        -- What was done, by whom, when: sign-ins (refused ones too), account changes,
        -- operator actions. Never a code: targets are box ids, user names, digests.
        CREATE TABLE console_audit (
            id TEXT PRIMARY KEY,
            at_ms INTEGER NOT NULL,
            actor TEXT,
            action TEXT NOT NULL,
            target TEXT,
            client TEXT,
            outcome TEXT NOT NULL
        );
        CREATE INDEX console_audit_at ON console_audit(at_ms);
"""
