"""Signed batches v1: how issuance, revocations and card templates reach a box.

A batch is a signed header plus compact entries. The header (canonical JSON) names the
merchant, a sequence number, its kind and expiry, the issuer's delegation, and the
SHA-256 of the entries and of every transport chunk; an Ed25519 signature by the issuer
key covers `redeemd-batch-v1\\0` + header bytes. Because each chunk's hash is in the
signed header, a chunk arriving over MQTT is checked before it is kept, and a batch is
fully verified before a single row is written.

File form:    "RDB1" | u32 header_len | header | signature(64) | payload
Chunk form:   "RDC1" | u32 header_len | header | signature(64) | u32 index | chunk
The payload is the zlib-compressed entries, cut into `chunk_size` pieces for transport.
docs/protocol.md specifies every byte, with test vectors in tests/vectors/.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cards import envelope, keys
from cards.card import CardError, Limit, parse_limits

FILE_MAGIC = b"RDB1"
CHUNK_MAGIC = b"RDC1"
DOMAIN = b"redeemd-batch-v1\x00"
MAX_HEADER_SIZE = 1 << 20
DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_MAX_ENTRIES_SIZE = 512 << 20
_U32 = struct.Struct(">I")
# Sequences start at 1 and stay below 2^63 (SQLite's INTEGER on the box).
MAX_SEQ = (1 << 63) - 1
MAX_BALANCE = (1 << 63) - 1


class Kind(StrEnum):
    CARDS = "cards"
    ISSUE = "issue"
    SNAPSHOT = "snapshot"
    REVOKE = "revoke"
    BLOCK = "block"
    UNBLOCK = "unblock"
    CONSUMED = "consumed"
    # Accounts (issue 13, docs/protocol.md 19).
    ACCOUNTS = "accounts"
    LINK = "link"
    TRANSFER = "transfer"
    TOPUP = "topup"
    LIMITS = "limits"


class CodeStatus:
    """Per-code state as stored and as carried by issue/snapshot entries."""

    ACTIVE = 0
    CONSUMED = 1
    REVOKED = 2
    BLOCKED = 3
    TRANSFERRED = 4
    """Its value was moved to another code by a `transfer` batch (codes only)."""


ACCOUNT_STATUSES = frozenset({CodeStatus.ACTIVE, CodeStatus.REVOKED, CodeStatus.BLOCKED})


UNLIMITED = 0xFFFFFFFF

# issue / snapshot: digest, card id, not_before, not_after (0 = the card's window),
# uses (0 = the card's default, 0xFFFFFFFF = unlimited), balance in minor units
# (0 = the card's default), status.
ISSUE_ENTRY = struct.Struct(">16sIIIIqB")
# revoke / block / unblock: digest only.
DIGEST_ENTRY = struct.Struct(">16s")
# consumed elsewhere: digest, the other box's record id (UUID bytes), uses, amount.
CONSUMED_ENTRY = struct.Struct(">16s16sIq")
# accounts: the issue entry's layout keyed by the account id (16 opaque bytes).
ACCOUNT_ENTRY = ISSUE_ENTRY
# link: digest, account id: the code spends that account from now on.
LINK_ENTRY = struct.Struct(">16s16s")
# transfer: transfer id, old digest, new digest.
TRANSFER_ENTRY = struct.Struct(">16s16s16s")
# topup: topup id, account id, amount (> 0) added to the account's balance or uses.
TOPUP_ENTRY = struct.Struct(">16s16sq")

ENTRY_SIZES = {
    Kind.CARDS: 0,
    Kind.ISSUE: ISSUE_ENTRY.size,
    Kind.SNAPSHOT: ISSUE_ENTRY.size,
    Kind.REVOKE: DIGEST_ENTRY.size,
    Kind.BLOCK: DIGEST_ENTRY.size,
    Kind.UNBLOCK: DIGEST_ENTRY.size,
    Kind.CONSUMED: CONSUMED_ENTRY.size,
    Kind.ACCOUNTS: ACCOUNT_ENTRY.size,
    Kind.LINK: LINK_ENTRY.size,
    Kind.TRANSFER: TRANSFER_ENTRY.size,
    Kind.TOPUP: TOPUP_ENTRY.size,
    Kind.LIMITS: 0,
}
JSON_KINDS = frozenset({Kind.CARDS, Kind.LIMITS})


class BatchError(ValueError):
    """A batch (or chunk) is refused. Nothing from it has been written."""


@dataclass(frozen=True)
class Header:
    merchant: str
    seq: int
    kind: Kind
    created_at: int
    expires_at: int
    count: int
    entries_size: int
    entries_sha256: str
    payload_size: int
    chunk_size: int
    chunks: tuple[str, ...]
    issuer: keys.Delegation
    raw: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        """Identity of the batch: the hash of its signed header."""
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class Batch:
    """A batch whose signature, trust chain, hashes and sizes have all been checked."""

    header: Header
    entries: bytes = field(repr=False)

    def issue_entries(self) -> Iterator[tuple[bytes, int, int, int, int, int, int]]:
        return ISSUE_ENTRY.iter_unpack(self.entries)

    def digest_entries(self) -> Iterator[tuple[bytes]]:
        return DIGEST_ENTRY.iter_unpack(self.entries)

    def consumed_entries(self) -> Iterator[tuple[bytes, bytes, int, int]]:
        return CONSUMED_ENTRY.iter_unpack(self.entries)

    def account_entries(self) -> Iterator[tuple[bytes, int, int, int, int, int, int]]:
        """(account id, card id, not_before, not_after, uses, balance, status)."""
        return ACCOUNT_ENTRY.iter_unpack(self.entries)

    def link_entries(self) -> Iterator[tuple[bytes, bytes]]:
        """(digest, account id)."""
        return LINK_ENTRY.iter_unpack(self.entries)

    def transfer_entries(self) -> Iterator[tuple[bytes, bytes, bytes]]:
        """(transfer id, old digest, new digest), in file order."""
        return TRANSFER_ENTRY.iter_unpack(self.entries)

    def topup_entries(self) -> Iterator[tuple[bytes, bytes, int]]:
        """(topup id, account id, amount), in file order."""
        return TOPUP_ENTRY.iter_unpack(self.entries)

    def card_templates(self) -> list[dict[str, Any]]:
        return _json_objects(self.entries, "cards")

    def limits(self) -> list[Limit]:
        """The offline limits of a `limits` batch, parsed strictly (cards.card.parse_limit)."""
        try:
            return parse_limits(_json_objects(self.entries, "limits"))
        except CardError as exc:
            raise BatchError(f"limits batch {self.header.seq}: {exc}") from None


def _json_objects(entries: bytes, kind: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(entries)
    # ValueError: integers over Python's 4300-digit limit; RecursionError: deep nesting.
    except (ValueError, RecursionError) as exc:
        raise BatchError(f"{kind} batch entries are not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise BatchError(f"{kind} batch entries must be a JSON array of objects")
    return value


# ---------------------------------------------------------------- building (backend)


def encode_issue(rows: Iterable[tuple[bytes, int, int, int, int, int, int]]) -> bytes:
    """Entries for an issue or snapshot batch, sorted by digest (dense B-tree pages).

    Raises BatchError for a field that does not fit its entry (u32 card id, times and
    uses; i64 balance).
    """
    try:
        return b"".join(ISSUE_ENTRY.pack(*row) for row in sorted(rows, key=lambda r: r[0]))
    except struct.error as exc:
        raise BatchError(
            f"an issue entry has a field out of range ({exc}); card id, not_before, "
            f"not_after and uses must be 0..{UNLIMITED}, balance 0..{MAX_BALANCE}"
        ) from None


def encode_digests(digests: Iterable[bytes]) -> bytes:
    return b"".join(DIGEST_ENTRY.pack(d) for d in sorted(set(digests)))


def encode_consumed(rows: Iterable[tuple[bytes, bytes, int, int]]) -> bytes:
    return b"".join(CONSUMED_ENTRY.pack(*row) for row in rows)


def encode_cards(templates: list[dict[str, Any]]) -> bytes:
    return keys.canonical_json(templates)


def encode_accounts(rows: Iterable[tuple[bytes, int, int, int, int, int, int]]) -> bytes:
    """Entries for an `accounts` batch: (account id, card id, not_before, not_after, uses,
    balance, status) as in an issue entry, sorted by account id.

    Raises BatchError for a field out of range or a status other than active (0),
    revoked (2) or blocked (3).
    """
    rows = list(rows)
    for row in rows:
        _check_account(row)
    return encode_issue(rows)


def encode_links(rows: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Entries for a `link` batch: (digest, account id), sorted by digest."""
    return _pack(LINK_ENTRY, sorted(rows), "link")


def encode_transfers(rows: Iterable[tuple[bytes, bytes, bytes]]) -> bytes:
    """Entries for a `transfer` batch: (transfer id, old digest, new digest), kept in the
    given order (a box applies them in file order: A -> B then B -> C)."""
    return _pack(TRANSFER_ENTRY, rows, "transfer")


def encode_topups(rows: Iterable[tuple[bytes, bytes, int]]) -> bytes:
    """Entries for a `topup` batch: (topup id, account id, amount > 0), in the given order."""
    rows = list(rows)
    for topup_id, _, amount in rows:
        if not 0 < amount <= MAX_BALANCE:
            raise BatchError(
                f"top-up {topup_id.hex()}: amount {amount} must be 1..{MAX_BALANCE} "
                "(minor units or uses added)"
            )
    return _pack(TOPUP_ENTRY, rows, "topup")


def encode_limits(limits: Iterable[dict[str, Any]]) -> bytes:
    """Entries for a `limits` batch: canonical JSON of the limit objects, sorted by card
    and box. Each is checked as a box parses it (cards.card.parse_limit)."""
    values = list(limits)
    try:
        parse_limits(values)
    except CardError as exc:
        raise BatchError(str(exc)) from None
    return keys.canonical_json(sorted(values, key=lambda v: (v["card"], v["box"])))


def _pack(entry: struct.Struct, rows: Iterable[tuple[Any, ...]], kind: str) -> bytes:
    out = []
    for row in rows:
        # struct pads a short bytes field with zeros: an id cut short must not pass.
        if any(isinstance(f, bytes) and len(f) != 16 for f in row):
            raise BatchError(f"a {kind} entry has an id or digest that is not 16 bytes")
        try:
            out.append(entry.pack(*row))
        except struct.error as exc:
            raise BatchError(f"a {kind} entry does not fit its layout: {exc}") from None
    return b"".join(out)


def _check_account(row: tuple[bytes, int, int, int, int, int, int]) -> None:
    account, status, balance = row[0], row[6], row[5]
    if len(account) != 16:
        raise BatchError(f"an account id must be 16 bytes, got {len(account)}")
    if status not in ACCOUNT_STATUSES:
        raise BatchError(
            f"account {account.hex()}: status {status} is not active (0), revoked (2) or "
            "blocked (3)"
        )
    if balance < 0:
        raise BatchError(f"account {account.hex()}: balance {balance} is negative")


def build(
    issuer_private: bytes,
    delegation: keys.Delegation,
    *,
    merchant: str,
    seq: int,
    kind: Kind,
    entries: bytes,
    created_at: int,
    expires_at: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """A signed batch in file form. `entries` comes from one of the encode_* helpers.

    Raises BatchError for a sequence or chunk size every box would refuse.
    """
    if not 1 <= seq <= MAX_SEQ:
        raise BatchError(f"sequence {seq} is out of range: allowed 1..{MAX_SEQ}")
    if chunk_size < 1:
        raise BatchError(f"chunk size {chunk_size} is out of range: allowed 1 or more bytes")
    size = ENTRY_SIZES[kind]
    if size:
        if len(entries) % size:
            raise BatchError(f"{kind} entries must be a multiple of {size} bytes")
        count = len(entries) // size
    else:
        count = len(json.loads(entries))
    _check_entries(kind, entries)
    payload = zlib.compress(entries, 6)
    chunks = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)] or [b""]
    body = {
        "v": 1,
        "merchant": merchant,
        "seq": seq,
        "kind": kind.value,
        "created_at": created_at,
        "expires_at": expires_at,
        "count": count,
        "entry_size": size,
        "entries_size": len(entries),
        "entries_sha256": hashlib.sha256(entries).hexdigest(),
        "compression": "zlib",
        "payload_size": len(payload),
        "chunk_size": chunk_size,
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
        "key_id": delegation.key_id,
        "issuer": delegation.to_json(),
    }
    return envelope.seal(FILE_MAGIC, DOMAIN, body, issuer_private) + payload


def resign(
    batch_file: bytes,
    issuer_private: bytes,
    delegation: keys.Delegation,
    *,
    created_at: int,
    expires_at: int,
) -> bytes:
    """The same batch (merchant, seq, kind, entries, chunks) signed again, now.

    For a backend answering a box that was offline past the batch's expiry: only the
    members saying who signed it and when (created_at, expires_at, key_id, issuer)
    change, the payload bytes are kept, so a box that applied the first signing sees
    this one as a replay (docs/protocol.md 16.6). `batch_file` is the backend's own.
    """
    head_len = 8 + _U32.unpack_from(batch_file, 4)[0]
    body = json.loads(batch_file[8:head_len])
    body.update(
        created_at=created_at,
        expires_at=expires_at,
        key_id=delegation.key_id,
        issuer=delegation.to_json(),
    )
    return envelope.seal(FILE_MAGIC, DOMAIN, body, issuer_private) + batch_file[head_len + 64 :]


def split(batch_file: bytes) -> list[bytes]:
    """Chunk messages for transport, each carrying the signed header."""
    head_len = 8 + _U32.unpack_from(batch_file, 4)[0] + 64
    prefix = CHUNK_MAGIC + batch_file[4:head_len]
    header = json.loads(batch_file[8 : head_len - 64])
    payload = batch_file[head_len:]
    size = header["chunk_size"]
    return [
        prefix + _U32.pack(i) + payload[i * size : (i + 1) * size]
        for i in range(len(header["chunks"]))
    ]


# ---------------------------------------------------------------- verifying (box)


def read_header(data: bytes, magic: bytes, roots: dict[str, bytes]) -> tuple[Header, int]:
    """Parse and verify the signed header at the start of `data`.

    Returns the header and the offset where the payload (or chunk index) starts.
    Checks: magic, sizes, JSON shape, the issuer delegation against `roots`, the
    batch signature, the issuer's merchant scope and validity at `created_at`.
    """
    what = "batch file" if magic == FILE_MAGIC else "batch chunk"
    try:
        sealed = envelope.open_signed(data, magic, DOMAIN, roots, what)
    except envelope.EnvelopeError as exc:
        raise BatchError(str(exc)) from None
    body, delegation, raw, signature = sealed.body, sealed.delegation, sealed.raw, sealed.signature
    end = sealed.end - 64

    header = _typed_header(body, delegation, raw, signature)
    if not delegation.allows(header.merchant, header.created_at):
        raise BatchError(delegation.refusal(header.merchant, header.created_at))
    return header, end + 64


def _typed_header(
    body: dict[str, Any], delegation: keys.Delegation, raw: bytes, sig: bytes
) -> Header:
    def need(name: str, kind: type) -> Any:
        value = body.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BatchError(f"header field '{name}' must be {kind.__name__}, got {value!r}")
        return value

    kind_text = need("kind", str)
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise BatchError(f"unknown batch kind {kind_text!r}") from None
    if body.get("compression") != "zlib":
        raise BatchError(f"compression {body.get('compression')!r} is not supported (zlib)")
    chunks = need("chunks", list)
    if not chunks or not all(isinstance(c, str) and len(c) == 64 for c in chunks):
        raise BatchError("header field 'chunks' must list SHA-256 hex digests")
    header = Header(
        merchant=need("merchant", str),
        seq=need("seq", int),
        kind=kind,
        created_at=need("created_at", int),
        expires_at=need("expires_at", int),
        count=need("count", int),
        entries_size=need("entries_size", int),
        entries_sha256=need("entries_sha256", str),
        payload_size=need("payload_size", int),
        chunk_size=need("chunk_size", int),
        chunks=tuple(chunks),
        issuer=delegation,
        raw=raw,
        signature=sig,
    )
    if header.seq < 1 or header.count < 0 or header.entries_size < 0 or header.chunk_size < 1:
        raise BatchError("header has a negative or zero size or sequence")
    if need("entry_size", int) != ENTRY_SIZES[kind]:
        raise BatchError(f"entry_size for {kind} batches must be {ENTRY_SIZES[kind]}")
    if ENTRY_SIZES[kind] and header.count * ENTRY_SIZES[kind] != header.entries_size:
        raise BatchError("count x entry_size does not equal entries_size")
    if -(-header.payload_size // header.chunk_size) != max(len(chunks), 1) and header.payload_size:
        raise BatchError("chunk list does not match payload_size / chunk_size")
    return header


def open_file(
    data: bytes,
    roots: dict[str, bytes],
    *,
    max_entries_size: int = DEFAULT_MAX_ENTRIES_SIZE,
) -> Batch:
    """Verify a batch in file form completely and return its entries."""
    header, offset = read_header(data, FILE_MAGIC, roots)
    payload = data[offset:]
    if len(payload) != header.payload_size:
        raise BatchError(
            f"truncated or padded: payload is {len(payload)} bytes, header says "
            f"{header.payload_size}"
        )
    for index, expected in enumerate(header.chunks):
        piece = payload[index * header.chunk_size : (index + 1) * header.chunk_size]
        if hashlib.sha256(piece).hexdigest() != expected:
            raise BatchError(f"chunk {index} does not match the signed header (corrupted)")
    return _decode(header, payload, max_entries_size)


def _decode(header: Header, payload: bytes, max_entries_size: int) -> Batch:
    if header.entries_size > max_entries_size:
        raise BatchError(
            f"entries of {header.entries_size} bytes exceed max_batch_bytes ({max_entries_size})"
        )
    inflater = zlib.decompressobj()
    try:
        # Never inflate more than the signed size: a decompression bomb stops here.
        # +1 because a max_length of 0 means "no limit" to zlib.
        entries = inflater.decompress(payload, header.entries_size + 1)
    except zlib.error as exc:
        raise BatchError(f"payload does not decompress: {exc}") from None
    if (
        len(entries) != header.entries_size
        or inflater.unconsumed_tail
        or inflater.unused_data
        or not inflater.eof
    ):
        raise BatchError("payload inflates to a different size than the header says")
    if hashlib.sha256(entries).hexdigest() != header.entries_sha256:
        raise BatchError("entries do not match entries_sha256 in the signed header")
    batch = Batch(header=header, entries=entries)
    if header.kind is Kind.CARDS and len(batch.card_templates()) != header.count:
        raise BatchError("cards batch count does not match its templates")
    if header.kind is Kind.LIMITS and len(batch.limits()) != header.count:
        raise BatchError("limits batch count does not match its limits")
    _check_entries(header.kind, entries)
    return batch


def _check_entries(kind: Kind, entries: bytes) -> None:
    """What a signed batch of the accounts kinds may not say, whoever signed it: a
    top-up that takes value away, an account with a code-only status or a negative
    balance (docs/protocol.md 19.1). Raises BatchError naming the entry."""
    if kind is Kind.TOPUP:
        for topup_id, _, amount in TOPUP_ENTRY.iter_unpack(entries):
            if amount <= 0:
                raise BatchError(f"top-up {topup_id.hex()}: amount {amount} must be above 0")
    elif kind is Kind.ACCOUNTS:
        for row in ACCOUNT_ENTRY.iter_unpack(entries):
            _check_account(row)


class VerifiedHeaders:
    """The signed headers of the last few batches, by their signed bytes.

    Every chunk of a batch carries the same signed header, and a box verified it (two
    Ed25519 signatures, the delegation and the header) for every chunk, twice: a
    100,000-code batch is about 60 chunks, and a batch a box already holds arrives again
    whenever the backend publishes it to every box. The same bytes under the same roots
    verify the same way, so a header found here is as good as one checked again; the
    chunk's own bytes are still checked against the header's hashes.
    """

    def __init__(self, roots: dict[str, bytes], keep: int = 4):
        self.roots = roots
        self.keep = keep
        self._kept: dict[bytes, tuple[Header, int]] = {}  # oldest first

    def read(self, data: bytes, magic: bytes) -> tuple[Header, int]:
        """`read_header(data, magic, roots)`, once per signed header."""
        if len(data) >= 8 and data[:4] == magic:
            end = 8 + _U32.unpack_from(data, 4)[0] + 64
            if end <= len(data) and end - 72 <= MAX_HEADER_SIZE:
                found = self._kept.get(data[:end])
                if found is not None:
                    return found
        header, offset = read_header(data, magic, self.roots)
        self._kept[data[:offset]] = (header, offset)
        if len(self._kept) > self.keep:
            del self._kept[next(iter(self._kept))]
        return header, offset


class ChunkAssembler:
    """Collects the chunks of one batch as they arrive, in any order.

    Every chunk is checked against the signed header before it is kept, so a forged
    or corrupted chunk is refused at once and never waits in memory.
    """

    def __init__(
        self,
        roots: dict[str, bytes],
        max_entries_size: int = DEFAULT_MAX_ENTRIES_SIZE,
        headers: VerifiedHeaders | None = None,
    ):
        self.max_entries_size = max_entries_size
        self.headers = headers if headers is not None else VerifiedHeaders(roots)
        self.header: Header | None = None
        self.pieces: dict[int, bytes] = {}

    def add(self, message: bytes) -> Batch | None:
        """Add one chunk message; return the verified batch once it is complete."""
        header, offset = self.headers.read(message, CHUNK_MAGIC)
        if self.header is not None and header.raw != self.header.raw:
            raise BatchError("chunk belongs to a different batch header")
        if len(message) < offset + 4:
            raise BatchError("truncated chunk: no chunk index")
        (index,) = _U32.unpack_from(message, offset)
        if index >= len(header.chunks):
            raise BatchError(f"chunk index {index} is outside 0..{len(header.chunks) - 1}")
        piece = message[offset + 4 :]
        if hashlib.sha256(piece).hexdigest() != header.chunks[index]:
            raise BatchError(f"chunk {index} does not match the signed header (corrupted)")
        self.header = header
        self.pieces[index] = piece
        if len(self.pieces) < len(header.chunks):
            return None
        payload = b"".join(self.pieces[i] for i in range(len(header.chunks)))
        if len(payload) != header.payload_size:
            raise BatchError("reassembled payload size does not match the header")
        return _decode(header, payload, self.max_entries_size)
