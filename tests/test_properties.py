"""Property tests: the parsers that face untrusted bytes fail only in the documented way.

A scanner, a USB stick or an MQTT broker can hand the box any bytes at all. The engine
catches MalformedCode, the importer and receiver catch BatchError, the classifier
catches ValueError; any other exception would stop them, so none may escape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
import zlib

from conftest import make_keyset
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cards import batch, keys, signed_code
from cards.batch import BatchError, ChunkAssembler, CodeStatus, Kind
from cards.digest import CodeDigester, code_digest
from cards.normalize import (
    GS,
    OVERSIZED,
    MalformedCode,
    Normalized,
    normalize,
    normalize_full,
    normalize_text,
)
from drivers.dedupe import Deduper
from drivers.framing import LineFramer

KEYSET = make_keyset()
ENTRIES = batch.encode_issue(
    (hashlib.sha256(b"%d" % i).digest()[:16], 1, 0, 0, 0, 0, CodeStatus.ACTIVE) for i in range(40)
)
VALID_FILE = KEYSET.build(Kind.ISSUE, ENTRIES, seq=2, chunk_size=256)
VALID_CHUNKS = batch.split(VALID_FILE)
CARDS_FILE = KEYSET.cards_batch()

CONTROL_EXCEPT_GS = re.compile(r"[\x00-\x1c\x1e\x1f\x7f-\x9f]")
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that look like what scanners send: AIM prefixes, ECI escapes, framing, GS, UTF-8.
scanner_like = st.lists(
    st.sampled_from(
        [
            b"]Q1",
            b"]Q2",
            b"]C1",
            b"]d2",
            b"]E0",
            b"]Y",
            b"\\000026",
            b"\\000003",
            b"\\000029",
            b"\\\\",
            b"\\",
            b"\x1d",
            b"\r\n",
            b"\x02",
            b"\x03",
            b"\x00",
            b"01",
            b"10",
            b"17",
            b"0950110153000",
            b"ABC",
            b"\xe9",
            b"\xc3\xa9",
            b"\xe4\xb8\xad",
            b" ",
            b"\x1b",
            b"\x7f",
        ]
    )  # fmt: skip
    | st.binary(max_size=8),
    max_size=30,
).map(b"".join)


def _check_normalize(raw: bytes, max_length: int) -> None:
    try:
        result = normalize(raw, max_length=max_length)
    except MalformedCode:
        return
    assert isinstance(result, Normalized)
    assert result.text
    assert len(result.text) <= max_length
    assert not CONTROL_EXCEPT_GS.search(result.text)
    assert not result.text.endswith(GS)


@PROPERTY
@given(raw=st.binary(max_size=600), max_length=st.sampled_from([16, 64, 512]))
def test_normalize_of_any_bytes_returns_clean_text_or_malformed(raw, max_length):
    _check_normalize(raw, max_length)


@PROPERTY
@given(raw=scanner_like, max_length=st.sampled_from([16, 512]))
@example(raw=b"]C1]Q1", max_length=16)  # biip.parse once took `]Q1` for an identifier
@example(raw=b"]Y1ABC", max_length=16)
def test_normalize_of_scanner_like_bytes_returns_clean_text_or_malformed(raw, max_length):
    _check_normalize(raw, max_length)


@PROPERTY
@given(text=st.text(max_size=200))
def test_normalize_of_any_utf8_text_returns_clean_text_or_malformed(text):
    _check_normalize(text.encode("utf-8"), 512)


@PROPERTY
@given(text=st.text(alphabet="0123456789ABC\x1d", min_size=1, max_size=60))
def test_normalize_is_idempotent_on_its_own_output(text):
    try:
        first = normalize(text.encode())
    except MalformedCode:
        return
    assert normalize(first.text.encode()).text == first.text


def _outcome(call, raw: bytes, max_length: int) -> object:
    try:
        return call(raw, max_length)
    except MalformedCode as exc:
        return ("malformed", str(exc))


def _check_shortcut(raw: bytes, max_length: int) -> None:
    """normalize and normalize_text (plain-code shortcut) agree with normalize_full,
    down to the symbology, the GS1 elements and the malformed message."""
    full = _outcome(normalize_full, raw, max_length)
    assert _outcome(normalize, raw, max_length) == full
    text = _outcome(normalize_text, raw, max_length)
    assert text == (full.text if isinstance(full, Normalized) else full)


# Mostly printable ASCII, so that many examples take normalize's plain-code shortcut,
# with the bytes at its edges: `]`, `\`, space, framing, GS, DEL, non-ASCII.
mostly_plain = st.lists(
    st.sampled_from([b"]", b"\\", b" ", b"\t", b"\r\n", b"\x00", b"\x1d", b"\x7f", b"\xc3\xa9"])
    | st.sampled_from([b"\\000026", b"]Q1", b"]C1", b"0950110153000", b"DEMO-0001"])
    | st.binary(min_size=1, max_size=4).filter(lambda b: all(0x20 <= c < 0x7F for c in b)),
    max_size=12,
).map(b"".join)


@PROPERTY
@given(raw=mostly_plain, max_length=st.sampled_from([1, 4, 16, 512]))
@example(raw=b"A", max_length=1)
@example(raw=b"AB", max_length=1)
@example(raw=b"A B", max_length=16)
@example(raw=b"A ", max_length=16)
@example(raw=b"]", max_length=16)
@example(raw=b"\\000026A", max_length=16)
def test_plain_code_shortcut_gives_what_the_full_path_gives(raw, max_length):
    _check_shortcut(raw, max_length)


@PROPERTY
@given(raw=st.binary(max_size=40), max_length=st.sampled_from([8, 512]))
def test_plain_code_shortcut_gives_what_the_full_path_gives_for_any_bytes(raw, max_length):
    _check_shortcut(raw, max_length)


@PROPERTY
@given(key=st.binary(max_size=200), text=st.text(max_size=100))
@example(key=b"k" * 64, text="DEMO-0001")  # a key of exactly one SHA-256 block
@example(key=b"k" * 65, text="DEMO-0001")  # one byte more: the key is hashed first
def test_precomputed_digester_is_hmac_sha256_for_any_key_and_text(key, text):
    assert CodeDigester(key)(text) == code_digest(key, text)


def _only_batch_error(call, data: bytes) -> None:
    with contextlib.suppress(BatchError):
        call(data)


@PROPERTY
@given(data=st.binary(max_size=400))
def test_open_file_of_any_bytes_raises_only_batch_error(data):
    _only_batch_error(lambda d: batch.open_file(d, KEYSET.roots), data)
    _only_batch_error(lambda d: batch.open_file(batch.FILE_MAGIC + d, KEYSET.roots), data)


@PROPERTY
@given(data=st.binary(max_size=400))
def test_chunk_assembler_of_any_bytes_raises_only_batch_error(data):
    assembler = ChunkAssembler(KEYSET.roots)
    _only_batch_error(assembler.add, data)
    _only_batch_error(assembler.add, batch.CHUNK_MAGIC + data)


def _mutations(valid: bytes):
    """Byte flips, overwrites, insertions, deletions and cuts of a valid message."""
    position = st.integers(0, len(valid) - 1)
    flip = st.tuples(position, st.integers(1, 255)).map(
        lambda p: valid[: p[0]] + bytes([valid[p[0]] ^ p[1]]) + valid[p[0] + 1 :]
    )
    overwrite = st.tuples(position, st.binary(min_size=1, max_size=16)).map(
        lambda p: valid[: p[0]] + p[1] + valid[p[0] + len(p[1]) :]
    )
    insert = st.tuples(position, st.binary(min_size=1, max_size=16)).map(
        lambda p: valid[: p[0]] + p[1] + valid[p[0] :]
    )
    delete = st.tuples(position, st.integers(1, 16)).map(
        lambda p: valid[: p[0]] + valid[p[0] + p[1] :]
    )
    cut = position.map(lambda p: valid[:p])
    return st.one_of(flip, overwrite, insert, delete, cut).filter(lambda m: m != valid)


@PROPERTY
@given(data=_mutations(VALID_FILE))
def test_open_file_of_mutated_batch_raises_only_batch_error(data):
    _only_batch_error(lambda d: batch.open_file(d, KEYSET.roots), data)


@PROPERTY
@given(data=_mutations(CARDS_FILE))
def test_open_file_of_mutated_cards_batch_raises_only_batch_error(data):
    _only_batch_error(lambda d: batch.open_file(d, KEYSET.roots), data)


@PROPERTY
@given(index=st.integers(0, len(VALID_CHUNKS) - 1), data=st.data())
def test_chunk_assembler_of_mutated_chunk_raises_only_batch_error(index, data):
    mutated = data.draw(_mutations(VALID_CHUNKS[index]))
    assembler = ChunkAssembler(KEYSET.roots)
    # Feed every other chunk intact first, so the mutated one may complete the batch.
    for other, chunk in enumerate(VALID_CHUNKS):
        if other != index:
            assert assembler.add(chunk) is None
    try:
        result = assembler.add(mutated)
    except BatchError:
        return
    # A mutation the signed header does not notice cannot change the entries.
    assert result is None or result.entries == ENTRIES


@PROPERTY
@given(text=st.text(max_size=200))
def test_signed_code_parse_of_any_text_raises_only_value_error(text):
    with contextlib.suppress(ValueError):
        signed_code.parse(text)


@PROPERTY
@given(body=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=a1", min_size=148, max_size=148))
def test_signed_code_parse_of_prefixed_base32_like_text_raises_only_value_error(body):
    text = signed_code.PREFIX + body
    assert signed_code.looks_signed(text)
    try:
        code = signed_code.parse(text)
    except ValueError:
        return
    assert len(code.payload) == 28
    assert len(code.signature) == 64


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
HEADER_FIELDS = [
    "v", "merchant", "seq", "kind", "created_at", "expires_at", "count", "entry_size",
    "entries_size", "entries_sha256", "compression", "payload_size", "chunk_size", "chunks",
    "key_id", "issuer",
]  # fmt: skip


@PROPERTY
@given(
    overrides=st.dictionaries(st.sampled_from(HEADER_FIELDS), json_values, min_size=1, max_size=3),
    payload=st.sampled_from([b"", b"junk", batch.encode_digests([b"\x01" * 16])]),
)
def test_open_file_of_validly_signed_odd_header_raises_only_batch_error(overrides, payload):
    # The issuer signs whatever it is given, so a buggy or stolen key reaches the checks
    # after the signature: those must refuse with BatchError too.
    compressed = zlib.compress(payload)
    body = json.loads(VALID_FILE[8 : 8 + struct.unpack_from(">I", VALID_FILE, 4)[0]])
    body.update(
        payload_size=len(compressed),
        chunks=[hashlib.sha256(compressed).hexdigest()],
        entries_size=len(payload),
        entries_sha256=hashlib.sha256(payload).hexdigest(),
    )
    body.update(overrides)
    header = keys.canonical_json(body)
    signature = keys.sign(KEYSET.issuer_private, batch.DOMAIN, header)
    data = batch.FILE_MAGIC + struct.pack(">I", len(header)) + header + signature + compressed
    try:
        opened = batch.open_file(data, KEYSET.roots)
    except BatchError:
        return
    assert opened.entries == payload


# --- drivers: line framing and camera de-duplication -----------------------------------

_LINE_BYTES = st.binary(max_size=60) | st.lists(
    st.sampled_from([b"DEMO-1", b"\r", b"\n", b"\r\n", b"\x03", b"\x02", b"x" * 9, b"\x00", b" "]),
    max_size=30,
).map(b"".join)


@example(data=b"\x02\x02\x02A\n", cuts=[3], max_length=2)  # STX counted alike both ways
@PROPERTY
@given(
    data=_LINE_BYTES, cuts=st.lists(st.integers(0, 60), max_size=8), max_length=st.integers(1, 12)
)
def test_line_framer_gives_the_same_frames_however_the_bytes_are_split(data, cuts, max_length):
    whole = LineFramer(max_length=max_length)
    expected = whole.feed(data)
    pieces = LineFramer(max_length=max_length)
    got: list[bytes] = []
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        got += pieces.feed(data[start:cut])
        start = cut
    got += pieces.feed(data[start:])
    assert got == expected
    for frame in got:
        assert frame == OVERSIZED or (
            len(frame) <= max_length and not any(t in frame for t in (b"\r", b"\n", b"\x03"))
        )


_SEEN = st.sampled_from([("QR-Code", b"A"), ("QR-Code", b"B"), ("EAN-13", b"1"), ("EAN-13", b"2")])


@PROPERTY
@given(
    frames=st.lists(
        st.tuples(st.frozensets(_SEEN, max_size=3), st.floats(0, 3, allow_nan=False)), max_size=60
    ),
    rescan_after=st.floats(0, 2.5, allow_nan=False),
    needed_1d=st.integers(1, 3),
)
def test_deduper_emits_a_code_once_per_stay_in_view(frames, rescan_after, needed_1d):
    deduper = Deduper(rescan_after=rescan_after, min_sightings_1d=needed_1d)
    at = 0.0
    last_seen: dict = {}
    emitted_since_away: set = set()
    for codes, step in frames:
        at += step
        for code in list(last_seen):
            if at - last_seen[code] > rescan_after:  # out of view long enough: a new stay
                del last_seen[code]
                emitted_since_away.discard(code)
        new = deduper.feed(codes, at)
        assert set(new) <= codes and len(new) == len(set(new))
        for code in new:
            assert code not in emitted_since_away  # never twice in one stay
            emitted_since_away.add(code)
        for code in codes:
            last_seen[code] = at
            if code[0] == "QR-Code":
                assert code in emitted_since_away  # a 2-D code counts on its first sighting
        assert len(deduper) <= deduper.max_tracked
