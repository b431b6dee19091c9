"""Signed batches v1 (cards.batch): every way a batch or chunk can be bad is refused.

Each refusal must be a BatchError (never another exception), because the importer and
the MQTT receiver report a BatchError and carry on; anything else would stop them.
"""

from __future__ import annotations

import hashlib
import random
import struct
import tracemalloc
import zlib

import pytest
from conftest import CREATED, FAR, KeySet, make_keyset

from cards import batch, keys
from cards.batch import BatchError, ChunkAssembler, CodeStatus, Kind

ISSUE_ROWS = 300


def _issue_entries(count: int = ISSUE_ROWS) -> bytes:
    rows = [
        (hashlib.sha256(b"code-%d" % i).digest()[:16], 1, 0, 0, 0, 0, CodeStatus.ACTIVE)
        for i in range(count)
    ]
    return batch.encode_issue(rows)


def _split_file(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header, signature, payload) of a batch in file form."""
    (length,) = struct.unpack_from(">I", data, 4)
    return data[8 : 8 + length], data[8 + length : 8 + length + 64], data[8 + length + 64 :]


def _header_body(ks: KeySet, entries: bytes, payload: bytes, **overrides) -> dict:
    """The header build() would write, with `overrides` applied, for hand-made batches."""
    body = {
        "v": 1,
        "merchant": "demo",
        "seq": 5,
        "kind": "revoke",
        "created_at": CREATED,
        "expires_at": FAR,
        "count": len(entries) // 16,
        "entry_size": 16,
        "entries_size": len(entries),
        "entries_sha256": hashlib.sha256(entries).hexdigest(),
        "compression": "zlib",
        "payload_size": len(payload),
        "chunk_size": batch.DEFAULT_CHUNK_SIZE,
        "chunks": [hashlib.sha256(payload).hexdigest()],
        "key_id": ks.delegation.key_id,
        "issuer": ks.delegation.to_json(),
    }
    body.update(overrides)
    return body


def _signed_file(ks: KeySet, body: dict, payload: bytes, private: bytes | None = None) -> bytes:
    header = keys.canonical_json(body)
    signature = keys.sign(private or ks.issuer_private, batch.DOMAIN, header)
    return batch.FILE_MAGIC + struct.pack(">I", len(header)) + header + signature + payload


def _revoke_entries(count: int = 4) -> bytes:
    return batch.encode_digests(hashlib.sha256(b"r%d" % i).digest()[:16] for i in range(count))


# ------------------------------------------------------------------ the good path


def test_valid_issue_batch_opens_with_its_entries(keyset):
    entries = _issue_entries()
    data = keyset.build(Kind.ISSUE, entries, seq=2)
    opened = batch.open_file(data, keyset.roots)
    assert opened.entries == entries
    assert opened.header.kind is Kind.ISSUE
    assert opened.header.count == ISSUE_ROWS
    assert opened.header.merchant == "demo"
    assert len(list(opened.issue_entries())) == ISSUE_ROWS


def test_valid_cards_batch_yields_its_templates(keyset):
    opened = batch.open_file(keyset.cards_batch(), keyset.roots)
    templates = opened.card_templates()
    assert [t["id"] for t in templates] == [1, 2, 3, 4, 5]


def test_empty_revoke_batch_opens(keyset):
    opened = batch.open_file(keyset.build(Kind.REVOKE, b"", seq=3), keyset.roots)
    assert opened.entries == b""
    assert opened.header.count == 0


def test_batch_identity_is_the_hash_of_its_signed_header(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=3)
    header, _, _ = _split_file(data)
    assert batch.open_file(data, keyset.roots).header.sha256 == hashlib.sha256(header).hexdigest()


# ------------------------------------------------------------------ trust


def test_forged_signature_by_undelegated_key_is_refused(keyset):
    intruder = keys.new_private_key()
    data = batch.build(
        intruder, keyset.delegation, merchant="demo", seq=2, kind=Kind.REVOKE,
        entries=_revoke_entries(), created_at=CREATED, expires_at=FAR,
    )  # fmt: skip
    with pytest.raises(BatchError, match="bad signature"):
        batch.open_file(data, keyset.roots)


def test_delegation_signed_by_unknown_root_is_refused(keyset):
    stranger = make_keyset()
    data = stranger.build(Kind.REVOKE, _revoke_entries(), seq=2)
    with pytest.raises(BatchError, match="not in this box"):
        batch.open_file(data, keyset.roots)


def test_delegation_with_forged_root_signature_is_refused(keyset):
    stranger = make_keyset()
    # The intruder names our root but signs the delegation with its own root.
    forged = keys.Delegation(
        **{
            **stranger.delegation.__dict__,
            "root_key_id": keyset.delegation.root_key_id,
        }
    )
    data = batch.build(
        stranger.issuer_private, forged, merchant="demo", seq=2, kind=Kind.REVOKE,
        entries=_revoke_entries(), created_at=CREATED, expires_at=FAR,
    )  # fmt: skip
    with pytest.raises(BatchError, match="bad root signature"):
        batch.open_file(data, keyset.roots)


def test_issuer_key_before_its_validity_window_is_refused():
    ks = make_keyset(not_before=CREATED, not_after=CREATED + 1000)
    data = ks.build(Kind.REVOKE, _revoke_entries(), seq=2, created_at=CREATED - 1)
    with pytest.raises(BatchError, match="may not sign"):
        batch.open_file(data, ks.roots)


def test_issuer_key_after_its_validity_window_is_refused():
    ks = make_keyset(not_before=CREATED, not_after=CREATED + 1000)
    data = ks.build(Kind.REVOKE, _revoke_entries(), seq=2, created_at=CREATED + 1001)
    with pytest.raises(BatchError, match="may not sign"):
        batch.open_file(data, ks.roots)


def test_issuer_key_at_the_edges_of_its_validity_window_is_accepted():
    ks = make_keyset(not_before=CREATED, not_after=CREATED + 1000)
    for created_at in (CREATED, CREATED + 1000):
        data = ks.build(Kind.REVOKE, _revoke_entries(), seq=2, created_at=created_at)
        assert batch.open_file(data, ks.roots).header.created_at == created_at


def test_issuer_key_for_another_merchant_is_refused():
    ks = make_keyset(merchants=("other",))
    data = ks.build(Kind.REVOKE, _revoke_entries(), seq=2, merchant="demo")
    with pytest.raises(BatchError, match="may not sign for merchant 'demo'"):
        batch.open_file(data, ks.roots)


def test_header_key_id_different_from_delegation_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, key_id="00" * 8)
    with pytest.raises(BatchError, match="key_id"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


# ------------------------------------------------------------------ damage in transit


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_truncated_file_is_refused(keyset, fraction):
    data = keyset.build(Kind.ISSUE, _issue_entries(), seq=2)
    cut = int(len(data) * fraction)
    with pytest.raises(BatchError):
        batch.open_file(data[:cut], keyset.roots)


def test_file_missing_its_last_byte_is_refused(keyset):
    data = keyset.build(Kind.ISSUE, _issue_entries(), seq=2)
    with pytest.raises(BatchError, match="truncated"):
        batch.open_file(data[:-1], keyset.roots)


def test_file_with_trailing_bytes_is_refused(keyset):
    data = keyset.build(Kind.ISSUE, _issue_entries(), seq=2)
    with pytest.raises(BatchError, match="padded"):
        batch.open_file(data + b"\x00", keyset.roots)


def _flip_each(data: bytes, start: int, end: int, step: int = 1):
    for position in range(start, end, step):
        for bit in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[position] ^= bit
            yield position, bytes(flipped)


def _assert_all_refused(flips, roots):
    for position, flipped in flips:
        try:
            batch.open_file(flipped, roots)
        except BatchError:
            continue
        pytest.fail(f"bit flip at byte {position} was accepted")


def test_bit_flipped_magic_or_length_is_refused(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=2)
    _assert_all_refused(_flip_each(data, 0, 8), keyset.roots)


def test_bit_flipped_header_is_refused(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=2)
    header, _, _ = _split_file(data)
    _assert_all_refused(_flip_each(data, 8, 8 + len(header)), keyset.roots)


def test_bit_flipped_signature_is_refused(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=2)
    header, _, _ = _split_file(data)
    start = 8 + len(header)
    _assert_all_refused(_flip_each(data, start, start + 64), keyset.roots)


def test_bit_flipped_payload_is_refused(keyset):
    data = keyset.build(Kind.ISSUE, _issue_entries(40), seq=2)
    header, _, payload = _split_file(data)
    start = 8 + len(header) + 64
    assert len(data) - start == len(payload)
    _assert_all_refused(_flip_each(data, start, len(data)), keyset.roots)


def test_file_with_chunk_magic_is_refused(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=2)
    with pytest.raises(BatchError, match="RDB1"):
        batch.open_file(batch.CHUNK_MAGIC + data[4:], keyset.roots)


def test_header_length_beyond_the_limit_is_refused(keyset):
    data = b"RDB1" + struct.pack(">I", batch.MAX_HEADER_SIZE + 1) + b"{}" + b"\x00" * 64
    with pytest.raises(BatchError, match="exceeds"):
        batch.open_file(data, keyset.roots)


@pytest.mark.parametrize(
    "header",
    [b"not json", b"[1, 2]", b"\xff\xfe{}", b"[" * 100_000, b'{"v":' + b"9" * 5000 + b"}"],
)
def test_header_that_is_not_a_json_object_is_refused(keyset, header):
    data = b"RDB1" + struct.pack(">I", len(header)) + header + b"\x00" * 64
    with pytest.raises(BatchError):
        batch.open_file(data, keyset.roots)


# ------------------------------------------------------------------ signed lies


def test_signed_header_with_wrong_entries_hash_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, entries_sha256="ab" * 32)
    data = _signed_file(keyset, body, payload)
    with pytest.raises(BatchError, match="entries_sha256"):
        batch.open_file(data, keyset.roots)


def test_signed_header_with_wrong_chunk_hash_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, chunks=["cd" * 32])
    with pytest.raises(BatchError, match="chunk 0"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


BOMB_SIZE = 64 << 20


def _peak_memory_opening(data: bytes, roots: dict[str, bytes]) -> int:
    """Peak bytes allocated while open_file refuses `data` (it must refuse it)."""
    tracemalloc.start()
    try:
        with pytest.raises(BatchError, match="different size"):
            batch.open_file(data, roots)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_decompression_bomb_stops_at_the_signed_entries_size(keyset):
    bomb_entries = b"\x00" * BOMB_SIZE
    payload = zlib.compress(bomb_entries, 9)
    small = _revoke_entries(2)
    body = _header_body(
        keyset, small, payload, entries_sha256=hashlib.sha256(bomb_entries).hexdigest()
    )
    del bomb_entries
    peak = _peak_memory_opening(_signed_file(keyset, body, payload), keyset.roots)
    assert peak < BOMB_SIZE // 8


def test_decompression_bomb_with_zero_entries_size_is_refused(keyset):
    # entries_size 0 must not turn into "no limit" when inflating.
    payload = zlib.compress(b"\x00" * BOMB_SIZE, 9)
    body = _header_body(keyset, b"", payload)
    peak = _peak_memory_opening(_signed_file(keyset, body, payload), keyset.roots)
    assert peak < BOMB_SIZE // 8


def test_entries_size_above_max_entries_size_is_refused_before_inflating(keyset):
    entries = _issue_entries()
    data = keyset.build(Kind.ISSUE, entries, seq=2)
    with pytest.raises(BatchError, match="max_batch_bytes"):
        batch.open_file(data, keyset.roots, max_entries_size=len(entries) - 1)
    assert batch.open_file(data, keyset.roots, max_entries_size=len(entries)).entries == entries


def test_payload_that_is_not_zlib_is_refused(keyset):
    entries = _revoke_entries()
    payload = b"this is not zlib data"
    body = _header_body(keyset, entries, payload)
    with pytest.raises(BatchError, match="decompress"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_payload_with_trailing_garbage_after_zlib_stream_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries) + b"extra"
    body = _header_body(keyset, entries, payload)
    with pytest.raises(BatchError):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unsupported_format_version_is_refused(keyset, version):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, v=version)
    with pytest.raises(BatchError, match="version"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_unknown_kind_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, kind="refund")
    with pytest.raises(BatchError, match="unknown batch kind 'refund'"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_unsupported_compression_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, compression="gzip")
    with pytest.raises(BatchError, match="compression"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_entry_size_not_matching_the_kind_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, entry_size=8)
    with pytest.raises(BatchError, match="entry_size"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_count_not_matching_entries_size_is_refused(keyset):
    entries = _revoke_entries(4)
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, count=5)
    with pytest.raises(BatchError, match="count"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", "5"), ("seq", True), ("created_at", 1.5), ("merchant", 7), ("chunks", "abc")],
)
def test_header_field_of_the_wrong_type_is_refused(keyset, field, value):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, **{field: value})
    with pytest.raises(BatchError, match=field):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


@pytest.mark.parametrize(("field", "value"), [("seq", 0), ("chunk_size", 0), ("count", -1)])
def test_zero_or_negative_sizes_are_refused(keyset, field, value):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, **{field: value})
    with pytest.raises(BatchError):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_missing_header_field_is_refused(keyset):
    entries = _revoke_entries()
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload)
    del body["expires_at"]
    with pytest.raises(BatchError, match="expires_at"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_cards_batch_whose_count_differs_from_its_templates_is_refused(keyset):
    entries = batch.encode_cards([{"id": 1, "merchant": "demo", "kind": "coupon"}])
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, kind="cards", entry_size=0, count=2)
    with pytest.raises(BatchError, match="count"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_cards_batch_that_is_not_a_json_list_is_refused(keyset):
    entries = b'{"id": 1}'
    payload = zlib.compress(entries)
    body = _header_body(keyset, entries, payload, kind="cards", entry_size=0, count=1)
    with pytest.raises(BatchError, match="JSON array"):
        batch.open_file(_signed_file(keyset, body, payload), keyset.roots)


def test_building_entries_of_the_wrong_size_is_refused(keyset):
    with pytest.raises(BatchError, match="multiple"):
        keyset.build(Kind.REVOKE, b"\x00" * 17, seq=2)


# ------------------------------------------------------------------ chunks


def _chunked(ks: KeySet, count: int = 2000, chunk_size: int = 1024) -> tuple[bytes, bytes]:
    entries = _issue_entries(count)
    return entries, ks.build(Kind.ISSUE, entries, seq=2, chunk_size=chunk_size)


def test_chunks_in_shuffled_order_give_the_same_entries_as_the_file(keyset):
    entries, data = _chunked(keyset)
    chunks = batch.split(data)
    assert len(chunks) > 5
    for seed in range(3):
        random.Random(seed).shuffle(chunks)
        assembler = ChunkAssembler(keyset.roots)
        results = [assembler.add(chunk) for chunk in chunks]
        assert results[:-1] == [None] * (len(chunks) - 1)
        assembled = results[-1]
        assert assembled is not None
        from_file = batch.open_file(data, keyset.roots)
        assert assembled.entries == from_file.entries == entries
        assert assembled.header.raw == from_file.header.raw


def test_a_batch_header_is_verified_once_for_all_its_chunks(keyset, monkeypatch):
    """Every chunk carries the same signed header: its two signatures (delegation and
    header) are checked for the first chunk only, the rest are still checked against
    the header's hashes, and a second assembly of the same batch checks nothing again."""
    _, data = _chunked(keyset)
    chunks = batch.split(data)
    calls = []
    real = keys.verify
    monkeypatch.setattr(keys, "verify", lambda *a: calls.append(1) or real(*a))
    headers = batch.VerifiedHeaders(keyset.roots)
    assert ChunkAssembler(keyset.roots, headers=headers).add(chunks[0]) is None
    assert len(calls) == 2
    assembler = ChunkAssembler(keyset.roots, headers=headers)
    assert [assembler.add(c) for c in chunks][-1] is not None
    assert len(calls) == 2
    damaged = bytearray(chunks[1])
    damaged[-1] ^= 0x01
    with pytest.raises(BatchError, match="corrupted"):
        ChunkAssembler(keyset.roots, headers=headers).add(bytes(damaged))


def test_a_header_with_another_signature_is_verified_again_and_refused(keyset):
    _, data = _chunked(keyset)
    chunks = batch.split(data)
    headers = batch.VerifiedHeaders(keyset.roots)
    assert ChunkAssembler(keyset.roots, headers=headers).add(chunks[0]) is None
    (length,) = struct.unpack_from(">I", chunks[1], 4)
    forged = bytearray(chunks[1])
    forged[8 + length] ^= 0x01  # the first byte of the header's signature
    with pytest.raises(BatchError, match="bad signature"):
        ChunkAssembler(keyset.roots, headers=headers).add(bytes(forged))


def test_single_chunk_batch_assembles_from_one_message(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=2)
    (chunk,) = batch.split(data)
    assembled = ChunkAssembler(keyset.roots).add(chunk)
    assert assembled is not None
    assert assembled.entries == _revoke_entries()


def test_duplicate_chunk_does_not_complete_the_batch(keyset):
    _, data = _chunked(keyset)
    chunks = batch.split(data)
    assembler = ChunkAssembler(keyset.roots)
    assert assembler.add(chunks[0]) is None
    assert assembler.add(chunks[0]) is None
    assert len(assembler.pieces) == 1


def test_corrupted_chunk_is_refused_and_not_kept(keyset):
    _, data = _chunked(keyset)
    chunks = batch.split(data)
    damaged = bytearray(chunks[1])
    damaged[-1] ^= 0x01
    assembler = ChunkAssembler(keyset.roots)
    with pytest.raises(BatchError, match="corrupted"):
        assembler.add(bytes(damaged))
    assert assembler.pieces == {}


def test_chunk_with_another_chunks_index_is_refused(keyset):
    _, data = _chunked(keyset)
    chunks = batch.split(data)
    (length,) = struct.unpack_from(">I", chunks[1], 4)
    at = 8 + length + 64
    relabelled = chunks[1][:at] + struct.pack(">I", 2) + chunks[1][at + 4 :]
    with pytest.raises(BatchError, match="corrupted"):
        ChunkAssembler(keyset.roots).add(relabelled)


def test_chunk_from_another_batch_is_refused(keyset):
    _, first = _chunked(keyset)
    other = keyset.build(Kind.ISSUE, _issue_entries(2100), seq=3, chunk_size=1024)
    assembler = ChunkAssembler(keyset.roots)
    assert assembler.add(batch.split(first)[0]) is None
    with pytest.raises(BatchError, match="different batch"):
        assembler.add(batch.split(other)[1])
    assert set(assembler.pieces) == {0}


def test_out_of_range_chunk_index_is_refused(keyset):
    _, data = _chunked(keyset)
    chunks = batch.split(data)
    (length,) = struct.unpack_from(">I", chunks[0], 4)
    at = 8 + length + 64
    for index in (len(chunks), len(chunks) + 1, 0xFFFFFFFF):
        message = chunks[0][:at] + struct.pack(">I", index) + chunks[0][at + 4 :]
        with pytest.raises(BatchError, match="outside"):
            ChunkAssembler(keyset.roots).add(message)


def test_chunk_without_an_index_is_refused(keyset):
    _, data = _chunked(keyset)
    chunk = batch.split(data)[0]
    (length,) = struct.unpack_from(">I", chunk, 4)
    with pytest.raises(BatchError, match="no chunk index"):
        ChunkAssembler(keyset.roots).add(chunk[: 8 + length + 64 + 2])


def test_file_form_is_refused_by_the_chunk_assembler(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=2)
    with pytest.raises(BatchError, match="RDC1"):
        ChunkAssembler(keyset.roots).add(data)


def test_chunk_signed_by_unknown_root_is_refused(keyset):
    stranger = make_keyset()
    chunk = batch.split(stranger.build(Kind.REVOKE, _revoke_entries(), seq=2))[0]
    with pytest.raises(BatchError, match="not in this box"):
        ChunkAssembler(keyset.roots).add(chunk)


def test_bit_flipped_chunk_header_is_refused(keyset):
    data = keyset.build(Kind.REVOKE, _revoke_entries(), seq=2)
    (chunk,) = batch.split(data)
    for position, flipped in _flip_each(chunk, 0, len(chunk), step=3):
        try:
            ChunkAssembler(keyset.roots).add(flipped)
        except BatchError:
            continue
        pytest.fail(f"bit flip at byte {position} of the chunk was accepted")


def test_chunk_assembler_refuses_bomb_above_max_entries_size(keyset):
    entries, data = _chunked(keyset)
    assembler = ChunkAssembler(keyset.roots, max_entries_size=len(entries) - 1)
    chunks = batch.split(data)
    with pytest.raises(BatchError, match="max_batch_bytes"):
        for chunk in chunks:
            assembler.add(chunk)
