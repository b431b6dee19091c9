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

    def require_signing(self) -> None:
        """Fail now, with the command that fixes it, if this directory cannot sign
        batches and manifests (issuer key and its delegation), rather than at the first
        one a running publisher or collector must sign."""
        self.private("issuer")
        self.delegation()

    def delegation(self) -> keys.Delegation:
        text = self._read("issuer.delegation.json", "run `redeemd-backend delegate`")
        roots = {keys.key_id(self.public("root")): self.public("root")}
        return keys.parse_delegation(json.loads(text), roots)
