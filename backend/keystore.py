"""The backend's key directory: root, issuer and code keys, delegation.

Layout (all files one line of base64 or JSON):
  root.key / root.pub        root Ed25519 key; root.pub goes into every box's config
  issuer.key / issuer.pub    issuer Ed25519 key that signs batches and codes
  issuer.delegation.json     root's signature over the issuer key (from `delegate`)
  code.key                   HMAC key for code digests; copied to every box (secret)
  backend.db                 issued batches and box events (backend/store.py), which
                             also allocates batch sequences; an older sequence.json is
                             still read so sequences continue after it
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from cards import keys


class KeystoreError(RuntimeError):
    """The key directory is missing something; the message says which command makes it."""


class Keystore:
    def __init__(self, directory: Path):
        self.dir = directory

    def _read(self, name: str, hint: str) -> str:
        try:
            return (self.dir / name).read_text().strip()
        except FileNotFoundError:
            raise KeystoreError(f"{self.dir / name} does not exist; {hint}") from None

    def _write(self, name: str, text: str, secret: bool) -> None:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")

    def generate(self, force: bool = False) -> list[str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "root.key").exists() and not force:
            raise KeystoreError(f"keys already exist in {self.dir}; use --force to replace them")
        written = []
        for role in ("root", "issuer"):
            private = keys.new_private_key()
            self._write(f"{role}.key", keys.b64(private), secret=True)
            self._write(f"{role}.pub", keys.b64(keys.public_of(private)), secret=False)
            written += [f"{role}.key", f"{role}.pub"]
        self._write("code.key", keys.b64(secrets.token_bytes(32)), secret=True)
        return [*written, "code.key"]

    def private(self, role: str) -> bytes:
        return keys.unb64(
            self._read(f"{role}.key", "run `redeemd-backend keygen`"), f"{role}.key", 32
        )

    def public(self, role: str) -> bytes:
        return keys.unb64(
            self._read(f"{role}.pub", "run `redeemd-backend keygen`"), f"{role}.pub", 32
        )

    def code_key(self) -> bytes:
        return keys.unb64(self._read("code.key", "run `redeemd-backend keygen`"), "code.key")

    def save_delegation(self, delegation: keys.Delegation) -> None:
        self._write("issuer.delegation.json", json.dumps(delegation.to_json()), secret=False)

    def require_signing(self, merchants: Iterable[str] = ()) -> None:
        """Fail now, with the command that fixes it, if this directory cannot sign
        batches and manifests (issuer key and its delegation; for each of `merchants`,
        a delegation for it valid now), rather than at the first one a running
        publisher or collector must sign."""
        self.private("issuer")
        self.delegation()
        now = int(time.time())
        for merchant in merchants:
            self.signer(merchant, now)

    def signer(self, merchant: str | None, at: int) -> tuple[bytes, keys.Delegation]:
        """The issuer key and its delegation, to sign something for `merchant` (None:
        a signed code, which names none) created at `at`.

        Raises KeystoreError, saying what the delegation covers and the `delegate`
        command that fixes it, when every box would refuse what it signs: the merchant
        is not delegated, or `at` is outside the delegation (protocol.md section 6).
        Checked before signing, so nothing is written or published that no box takes.
        """
        private = self.private("issuer")  # first: a missing key is the first thing to fix
        delegation = self.delegation()
        self._check(delegation, merchant, at)
        return private, delegation

    def _check(self, delegation: keys.Delegation, merchant: str | None, at: int) -> None:
        covered = ", ".join(delegation.merchants)
        if merchant is not None and merchant not in delegation.merchants:
            raise KeystoreError(
                f"the issuer key {delegation.key_id} is not delegated for merchant "
                f"{merchant!r}, only for {covered}: every box of {merchant!r} would refuse "
                f"what it signs. Delegate it for all of them (a new delegation replaces the "
                f"old one): {self._delegate_command([*delegation.merchants, merchant])}"
            )
        if at < delegation.not_before:
            raise KeystoreError(
                f"the issuer key {delegation.key_id}'s delegation only starts at "
                f"{utc(delegation.not_before)} (this computer's clock says {utc(at)}): boxes "
                f"refuse what it signs before then. Check the clock, or delegate again: "
                f"{self._delegate_command(delegation.merchants)}"
            )
        if at > delegation.not_after:
            raise KeystoreError(
                f"the issuer key {delegation.key_id}'s delegation for {covered} ended at "
                f"{utc(delegation.not_after)}: boxes refuse what it signs after that. "
                f"Delegate it again: {self._delegate_command(delegation.merchants)}"
            )

    def _delegate_command(self, merchants: Iterable[str]) -> str:
        flags = " ".join(f"--merchant {shlex.quote(m)}" for m in dict.fromkeys(merchants))
        return f"redeemd-backend delegate --dir {shlex.quote(str(self.dir))} {flags} --days 365"

    def delegation(self) -> keys.Delegation:
        text = self._read("issuer.delegation.json", "run `redeemd-backend delegate`")
        roots = {keys.key_id(self.public("root")): self.public("root")}
        return keys.parse_delegation(json.loads(text), roots)


def utc(at: int) -> str:
    """A signed time as a person reads it: 2026-12-03 08:00 UTC."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")
