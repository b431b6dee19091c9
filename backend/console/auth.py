"""Console accounts, sessions, CSRF tokens and login rate limiting.

Accounts are made from the CLI only (`redeemd-backend user add`), never from the web:
whoever can run the backend's commands already holds its keys. A password is kept as
its Argon2id hash (argon2-cffi's defaults, RFC 9106's second recommended option: 64 MiB,
3 passes), memory-hard so a stolen database costs an attacker GPU memory per guess.

A session is a random token in a cookie (Secure, HttpOnly, SameSite=Strict) whose
SHA-256 is the row in `console_sessions`; the row also holds the session's CSRF token,
which every POST form carries and the app compares in constant time. Sessions end
after SESSION_SECONDS, at sign-out, or when their user is removed.

    >>> add_user(store, "ana", "operator", "a long passphrase")
    >>> user = check_password(store, "ana", "a long passphrase")    # User, or None
    >>> token, session = open_session(store, user)
    >>> find_session(store, token).csrf == session.csrf
    True
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from backend.store import Store

ROLES = ("viewer", "operator")
"""viewer: reads every page; operator: also acts (the forms that change something)."""
MIN_PASSWORD = 12
MAX_KEYS = 10_000
"""Rate limiter keys kept before expired ones are swept (memory stays bounded)."""
SESSION_SECONDS = 12 * 3600
"""An operator's working day; then sign in again."""
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


class AuthError(ValueError):
    """An account cannot be made or changed; the message says why and what to do."""


@functools.cache
def _argon2() -> tuple[Any, tuple[type[Exception], ...], str]:
    """The Argon2id hasher, the errors a wrong password raises, and a dummy hash that is
    verified when the name is unknown (so an unknown name takes as long as a wrong
    password, and the timing does not tell which names exist). Made on first use: every
    `redeemd-backend` command imports this module, only the console's need argon2-cffi
    (the web extra), and hashing the dummy costs 64 MiB and tens of milliseconds."""
    try:
        from argon2 import PasswordHasher
        from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
    except ImportError:
        raise AuthError(
            "console accounts need argon2-cffi: install the web extra (pip install 'redeemd[web]')"
        ) from None
    hasher = PasswordHasher()
    wrong = (VerifyMismatchError, VerificationError, InvalidHashError)
    return hasher, wrong, hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True)
class User:
    name: str
    role: str
    created_at: int

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    expires_at: int


def hash_password(password: str) -> str:
    """The Argon2id hash string (parameters and salt inside) of `password`."""
    return str(_argon2()[0].hash(password))


def check_name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise AuthError(
            f"user name {name!r}: 1 to 64 letters, digits and . _ @ - (like ana or ana@acme)"
        )
    return name


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AuthError(
            f"the password has {len(password)} characters; give at least {MIN_PASSWORD} "
            "(a passphrase of a few words is easy to type and hard to guess)"
        )
    return password


def add_user(store: Store, name: str, role: str, password: str, now: float | None = None) -> User:
    """Make an account; AuthError if the name is taken, bad, or the password too short."""
    check_name(name)
    if role not in ROLES:
        raise AuthError(f"role {role!r}: give viewer (reads) or operator (also acts)")
    hashed = hash_password(check_new_password(password))
    created = int(time.time() if now is None else now)
    with store.engine.transaction():
        if store.engine.execute("SELECT 1 FROM console_users WHERE name = ?", (name,)).fetchone():
            raise AuthError(
                f"user {name} exists; `redeemd-backend user remove {name}` first to replace it"
            )
        store.engine.execute(
            "INSERT INTO console_users(name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
            (name, role, hashed, created),
        )
    return User(name, role, created)


def remove_user(store: Store, name: str) -> bool:
    """Delete the account and end its sessions; False if there was none."""
    with store.engine.transaction():
        store.engine.execute("DELETE FROM console_sessions WHERE name = ?", (name,))
        return bool(
            store.engine.execute("DELETE FROM console_users WHERE name = ?", (name,)).rowcount
        )


def users(store: Store) -> list[User]:
    rows = store.engine.execute(
        "SELECT name, role, created_at FROM console_users ORDER BY name"
    ).fetchall()
    return [User(*r) for r in rows]


def password_hash_of(store: Store, name: str) -> tuple[User, str] | None:
    row = store.engine.execute(
        "SELECT name, role, created_at, password_hash FROM console_users WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else (User(*row[:3]), row[3])


def verify(found: tuple[User, str] | None, password: str) -> User | None:
    """The user if `password` is theirs, else None. Slow by design (Argon2id): call it
    outside any lock on the store."""
    hasher, wrong, dummy = _argon2()
    try:
        if found is None:
            hasher.verify(dummy, password)
            return None
        hasher.verify(found[1], password)
    except wrong:
        return None
    return found[0]


def check_password(store: Store, name: str, password: str) -> User | None:
    return verify(password_hash_of(store, name), password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(store: Store, user: User, now: float | None = None) -> tuple[str, Session]:
    """A new session of `user`: (the cookie's token, the session)."""
    at = int(time.time() if now is None else now)
    token = secrets.token_urlsafe(32)
    session = Session(user, secrets.token_urlsafe(32), at + SESSION_SECONDS)
    with store.engine.transaction():
        # Expired sessions go as new ones come: no timer needed.
        store.engine.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (at,))
        store.engine.execute(
            "INSERT INTO console_sessions(token_hash, name, csrf, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (_token_hash(token), user.name, session.csrf, at, session.expires_at),
        )
    return token, session


def find_session(store: Store, token: str | None, now: float | None = None) -> Session | None:
    """The live session of the cookie's token, or None (none, expired, user removed)."""
    if not token or len(token) > 256:
        return None
    row = store.engine.execute(
        "SELECT u.name, u.role, u.created_at, s.csrf, s.expires_at FROM console_sessions s "
        "JOIN console_users u ON u.name = s.name WHERE s.token_hash = ?",
        (_token_hash(token),),
    ).fetchone()
    if row is None or row[4] <= (time.time() if now is None else now):
        return None
    return Session(User(*row[:3]), row[3], row[4])


def close_session(store: Store, token: str) -> None:
    store.engine.execute("DELETE FROM console_sessions WHERE token_hash = ?", (_token_hash(token),))


def same_token(expected: str, given: str | None) -> bool:
    """A CSRF token check in constant time."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


class RateLimiter:
    """Failed sign-ins per key (a user name, a client address) in a sliding window.

    Kept in the console process's memory: a restart forgets them, which only an
    attacker who can restart the console (and then holds the machine) could use.
    """

    def __init__(self, limit: int, window: float):
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _live(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, key: str, now: float) -> float:
        """0 if `key` may try now, else the seconds until its oldest failure expires."""
        times = self._live(key, now)
        if len(times) < self.limit:
            if not times:
                self._failures.pop(key, None)
            return 0.0
        return times[0] + self.window - now

    def failed(self, key: str, now: float) -> None:
        self._live(key, now).append(now)
        if len(self._failures) > MAX_KEYS:
            # Many names tried from many addresses: forget whatever has expired.
            for old in [k for k, t in self._failures.items() if t[-1] <= now - self.window]:
                del self._failures[old]

    def forgive(self, key: str, at: float) -> None:
        """Take back the failure counted at `at` (the attempt succeeded)."""
        times = self._failures.get(key)
        if times is not None and at in times:
            times.remove(at)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)
