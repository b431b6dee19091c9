"""The box's own Ed25519 key: it signs the claim codes this box dispenses.

Made on the box, the first time anything needs it, and kept in the state directory
(`{state_dir}/box.key`, mode 0600, one line of base64 like code.key). The private half
never leaves the box: it is not logged, not in status, not synced. The backend grants
the public half the right to dispense (cards/grant.py), so a technician enrols a box by
handing its public key to the backend: `redeemd box-key` prints it.

A new key (the file lost, a box replaced) holds no grant until the backend grants it:
the box then refuses to dispense with `no_grant` and tells which key to grant, which is
why the file is kept beside the database and backed up with it.

    key = load_or_create(config.box.state_dir)
    key.key_id, key.public_b64      # what `redeemd box-key` prints and status shows
    claim_code.mint(key.private, ...)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cards import keys

FILE_NAME = "box.key"


class BoxKeyError(RuntimeError):
    """The box key cannot be read or made; the message says what to do."""


@dataclass(frozen=True)
class BoxKey:
    private: bytes = field(repr=False)
    public: bytes
    key_id: str

    @property
    def public_b64(self) -> str:
        return keys.b64(self.public)

    def describe(self) -> dict[str, str]:
        """The public part, as `redeemd box-key --json` and the box's status give it."""
        return {"box_key_id": self.key_id, "box_public_key": self.public_b64}


def path_in(state_dir: Path) -> Path:
    return Path(state_dir) / FILE_NAME


def load(state_dir: Path) -> BoxKey | None:
    """The box key in `state_dir`, or None if none was made yet."""
    path = path_in(state_dir)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BoxKeyError(
            f"cannot read the box key {path} ({exc.strerror or exc}); it must be readable by "
            "redeemd's user only (chown redeemd, chmod 0600)"
        ) from None
    try:
        private = keys.unb64(text, f"box key {path}", 32)
    except keys.TrustError as exc:
        raise BoxKeyError(
            f"{exc}: the file is damaged. Restore it from backup; only if there is none, move "
            "it aside: a new key is made, and the backend must grant it again "
            "(redeemd box-key shows it)"
        ) from None
    public = keys.public_of(private)
    return BoxKey(private, public, keys.key_id(public))


def load_or_create(state_dir: Path) -> BoxKey:
    """The box key, made now if this box has none. Two processes making it at once end
    with one key: the file appears whole, by a hard link that fails if it exists."""
    existing = load(state_dir)
    if existing is not None:
        return existing
    path = path_in(state_dir)
    private = keys.new_private_key()
    partial = path.with_name(f".{FILE_NAME}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (keys.b64(private) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _give_to_state_dir_owner(partial, path.parent)
        with contextlib.suppress(FileExistsError):  # another process made it first: use it
            os.link(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise BoxKeyError(
            f"cannot make the box key {path} ({exc.strerror or exc}); the state directory "
            "must be writable by redeemd's user"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
    made = load(state_dir)
    if made is None:  # pragma: no cover - the link above made it or found it
        raise BoxKeyError(f"the box key {path} vanished while it was made")
    return made


def _give_to_state_dir_owner(path: Path, state_dir: Path) -> None:
    """Made by root (`sudo redeemd box-key`), the key must still be the daemon's."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        owner = state_dir.stat()
        os.chown(path, owner.st_uid, owner.st_gid)
