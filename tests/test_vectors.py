"""The committed protocol vectors in tests/vectors/ still describe the bytes the code makes.

Nothing is regenerated here: each test loads a committed vector and checks that the
current code produces exactly those bytes, or accepts exactly those bytes. A failure
means a byte format changed; backends in other languages implement these formats from
docs/protocol.md and these files, so that change needs a new format version, not a
regenerated vector.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
import zlib
from pathlib import Path

import pytest

from cards import batch, keys, manifest, signed_code
from cards.batch import BatchError, ChunkAssembler, Kind, open_file
from cards.card import parse_card
from cards.digest import code_digest
from cards.manifest import ManifestError
from cards.normalize import MalformedCode, normalize

VECTORS = Path(__file__).resolve().parent / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


KEYS = load("keys.json")
BATCHES = load("batches.json")
ROOT_SEED = bytes.fromhex(KEYS["root"]["seed_hex"])
ISSUER_SEED = bytes.fromhex(KEYS["issuer"]["seed_hex"])
CODE_KEY = bytes.fromhex(KEYS["code_key_hex"])
ROOTS = {k: bytes.fromhex(v) for k, v in BATCHES["roots"].items()}


def committed_delegation() -> keys.Delegation:
    return keys.parse_delegation(load("delegation.json")["delegation"], ROOTS)


# ---------------------------------------------------------------- keys and JSON


@pytest.mark.parametrize("role", ["root", "issuer"])
def test_key_id_is_first_8_bytes_of_sha256_of_public_key(role):
    entry = KEYS[role]
    public = keys.public_of(bytes.fromhex(entry["seed_hex"]))
    assert public.hex() == entry["public_hex"]
    assert keys.b64(public) == entry["public_b64"]
    assert keys.key_id(public) == entry["key_id"]
    assert hashlib.sha256(public).hexdigest()[:16] == entry["key_id"]


def test_canonical_json_bytes_match_vector():
    vector = load("canonical_json.json")
    produced = keys.canonical_json(vector["value"])
    assert produced.hex() == vector["canonical_hex"]
    assert produced.decode("ascii") == vector["canonical"]


# ---------------------------------------------------------------- codes


def test_code_digests_match_vectors():
    vector = load("digest.json")
    key = bytes.fromhex(vector["code_key_hex"])
    assert key == CODE_KEY
    for item in vector["vectors"]:
        assert item["text"].encode("utf-8").hex() == item["text_utf8_hex"]
        assert code_digest(key, item["text"]).hex() == item["digest_hex"], item["note"]


def test_normalisation_matches_vectors():
    vector = load("normalize.json")
    for item in vector["vectors"]:
        raw = bytes.fromhex(item["raw_hex"])
        if item.get("malformed"):
            with pytest.raises(MalformedCode):
                normalize(raw, vector["max_length"])
            continue
        found = normalize(raw, vector["max_length"])
        assert found.text == item["text"], item["note"]
        assert found.text.encode("utf-8").hex() == item["text_utf8_hex"], item["note"]
        if "gs1_elements" in item:
            assert [list(e) for e in found.gs1] == item["gs1_elements"], item["note"]


def test_gs1_vectors_cover_more_than_ais_01_10_and_17():
    covered = {
        ai for item in load("normalize.json")["vectors"] for ai, _ in item.get("gs1_elements", [])
    }
    assert {"00", "02", "11", "13", "15", "21", "240", "3103", "3922", "400", "8020"} <= covered


def test_gs1_table_is_the_one_the_box_parses_with():
    # A backend finds element strings with tests/vectors/gs1_ai.json. The box's table
    # (biip's) may gain AIs; an AI listed here must keep its pattern and its separator
    # rule, or the canonical text (and the digest) of codes using it would change.
    from biip.gs1_application_identifiers import _GS1_APPLICATION_IDENTIFIERS as box_table

    table = load("gs1_ai.json")
    predefined = table["predefined_length"]
    for entry in table["ais"]:
        ai = box_table[entry["ai"]]
        assert ai.pattern == entry["pattern"], entry["ai"]
        assert ai.separator_required == entry["fnc1_required"], entry["ai"]
        assert entry["fnc1_required"] == (entry["ai"][:2] not in predefined), entry["ai"]
        if not entry["fnc1_required"]:  # exactly the predefined length, digits only
            length = predefined[entry["ai"][:2]]
            assert re.fullmatch(entry["pattern"], entry["ai"].ljust(length, "0")), entry["ai"]
            assert not re.fullmatch(entry["pattern"], entry["ai"].ljust(length + 1, "0"))
    assert {"01", "10", "17", "8020"} <= {e["ai"] for e in table["ais"]}


# ---------------------------------------------------------------- delegation


def test_delegation_is_reproduced_byte_for_byte():
    vector = load("delegation.json")
    issuer_public = bytes.fromhex(vector["issuer_public_hex"])
    made = keys.delegate(
        bytes.fromhex(vector["root_seed_hex"]),
        issuer_public,
        tuple(vector["merchants"]),
        vector["not_before"],
        vector["not_after"],
    )
    body = keys.canonical_json(made.body())
    assert body.decode("ascii") == vector["cert_canonical"]
    assert (keys.DELEGATION_DOMAIN + body).hex() == vector["signed_message_hex"]
    assert made.signature.hex() == vector["signature_hex"]
    assert made.to_json() == vector["delegation"]


def test_committed_delegation_verifies_against_the_root():
    vector = load("delegation.json")
    delegation = committed_delegation()
    assert delegation.key_id == KEYS["issuer"]["key_id"]
    assert delegation.root_key_id == KEYS["root"]["key_id"]
    root_public = bytes.fromhex(KEYS["root"]["public_hex"])
    assert keys.verify(
        root_public,
        bytes.fromhex(vector["signature_hex"]),
        b"",
        bytes.fromhex(vector["signed_message_hex"]),
    )


# ---------------------------------------------------------------- signed codes


def test_signed_code_text_is_reproduced():
    vector = load("signed_code.json")
    assert vector["prefix"] == signed_code.PREFIX
    assert vector["text_length"] == signed_code.TEXT_LENGTH
    assert signed_code.DOMAIN.hex() == vector["domain_hex"]
    for item in vector["vectors"]:
        text = signed_code.mint(
            bytes.fromhex(item["issuer_seed_hex"]),
            item["card_id"],
            item["serial"],
            item["not_before"],
            item["not_after"],
        )
        assert text == item["text"], item["note"]
        assert code_digest(CODE_KEY, text).hex() == item["digest_hex"]


def test_committed_signed_codes_parse_and_verify():
    vector = load("signed_code.json")
    issuer_public = bytes.fromhex(KEYS["issuer"]["public_hex"])
    for item in vector["vectors"]:
        assert normalize(item["text"].encode("ascii")).text == item["text"]
        code = signed_code.parse(item["text"])
        assert code.key_id == item["key_id"]
        assert (code.card_id, code.serial) == (item["card_id"], item["serial"])
        assert (code.not_before, code.not_after) == (item["not_before"], item["not_after"])
        assert code.payload.hex() == item["payload_hex"]
        assert code.signature.hex() == item["signature_hex"]
        assert signed_code.verify(code, issuer_public)


def test_non_canonical_signed_codes_are_refused():
    vector = load("signed_code.json")
    for item in vector["refused_by_parse"]:
        with pytest.raises(ValueError):
            signed_code.parse(item["text"])
    forged = signed_code.parse(vector["bad_signature"]["text"])
    assert not signed_code.verify(forged, bytes.fromhex(KEYS["issuer"]["public_hex"]))


# ---------------------------------------------------------------- batches

# The accounts kinds (protocol.md section 19) are in their own file, sequences 5-9 of
# the same chain, so that batches.json stayed as it was.
ALL_BATCHES = {**BATCHES["batches"], **load("accounts.json")["batches"]}
BATCH_NAMES = sorted(ALL_BATCHES)


def entries_from_inputs(kind: Kind, inputs: dict) -> bytes:
    """The entries exactly as the backend encodes them from the documented inputs."""
    if kind is Kind.CARDS:
        return batch.encode_cards(inputs["templates"])
    if kind is Kind.ISSUE:
        rows = [
            (code_digest(CODE_KEY, r["code"]), r["card_id"], r["not_before"], r["not_after"],
             r["uses"], r["balance"], r["status"])
            for r in inputs["rows"]
        ]  # fmt: skip
        return batch.encode_issue(rows)
    if kind is Kind.CONSUMED:
        rows = [
            (code_digest(CODE_KEY, r["code"]), uuid.UUID(r["record_id"]).bytes, r["uses"],
             r["amount"])
            for r in inputs["rows"]
        ]  # fmt: skip
        return batch.encode_consumed(rows)
    if kind is Kind.ACCOUNTS:
        return batch.encode_accounts(
            (bytes.fromhex(r["account"]), r["card_id"], r["not_before"], r["not_after"],
             r["uses"], r["balance"], r["status"])
            for r in inputs["rows"]
        )  # fmt: skip
    if kind is Kind.LINK:
        return batch.encode_links(
            (code_digest(CODE_KEY, r["code"]), bytes.fromhex(r["account"])) for r in inputs["rows"]
        )
    if kind is Kind.TRANSFER:
        return batch.encode_transfers(
            (bytes.fromhex(r["transfer_id"]), code_digest(CODE_KEY, r["old_code"]),
             code_digest(CODE_KEY, r["new_code"]))
            for r in inputs["rows"]
        )  # fmt: skip
    if kind is Kind.TOPUP:
        return batch.encode_topups(
            (bytes.fromhex(r["topup_id"]), bytes.fromhex(r["account"]), r["amount"])
            for r in inputs["rows"]
        )
    if kind is Kind.LIMITS:
        return batch.encode_limits(inputs["limits"])
    return batch.encode_digests(code_digest(CODE_KEY, c) for c in inputs["codes"])


def committed_file(vector: dict) -> bytes:
    data = (VECTORS / vector["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == vector["file_sha256"]
    return data


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_batch_entries_are_encoded_as_documented(name):
    vector = ALL_BATCHES[name]
    kind = Kind(vector["inputs"]["kind"])
    entries = entries_from_inputs(kind, vector["inputs"])
    assert entries.hex() == vector["entries_hex"]
    for row in vector["inputs"].get("rows", []):
        for name in ("code", "old_code", "new_code"):
            if name in row:
                assert code_digest(CODE_KEY, row[name]).hex() in vector["entries_hex"]


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_batch_header_is_canonical_json_of_documented_fields(name):
    # Independent of the zlib implementation: the payload is taken from the committed file.
    vector = ALL_BATCHES[name]
    data = committed_file(vector)
    inputs = vector["inputs"]
    header_len = vector["header_len"]
    assert data[:4] == b"RDB1"
    assert int.from_bytes(data[4:8], "big") == header_len
    raw = data[8 : 8 + header_len]
    signature = data[8 + header_len : 8 + header_len + 64]
    payload = data[8 + header_len + 64 :]
    entries = bytes.fromhex(vector["entries_hex"])
    size = inputs["chunk_size"]
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
    expected = {
        "v": 1,
        "merchant": inputs["merchant"],
        "seq": inputs["seq"],
        "kind": inputs["kind"],
        "created_at": inputs["created_at"],
        "expires_at": inputs["expires_at"],
        "count": len(vector["entries"]),
        "entry_size": batch.ENTRY_SIZES[Kind(inputs["kind"])],
        "entries_size": len(entries),
        "entries_sha256": hashlib.sha256(entries).hexdigest(),
        "compression": "zlib",
        "payload_size": len(payload),
        "chunk_size": size,
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
        "key_id": KEYS["issuer"]["key_id"],
        "issuer": load("delegation.json")["delegation"],
    }
    assert expected == vector["header"]
    assert raw == keys.canonical_json(expected)
    assert hashlib.sha256(raw).hexdigest() == vector["header_sha256"]
    assert zlib.decompress(payload) == entries
    assert keys.sign(ISSUER_SEED, batch.DOMAIN, raw) == signature
    assert signature.hex() == vector["signature_hex"]


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_rebuilding_a_batch_gives_the_committed_file(name):
    vector = ALL_BATCHES[name]
    data = committed_file(vector)
    inputs = vector["inputs"]
    entries = entries_from_inputs(Kind(inputs["kind"]), inputs)
    payload = data[-vector["payload_size"] :]
    if zlib.compress(entries, BATCHES["zlib_level"]) != payload:
        # Not a format change: another zlib (e.g. zlib-ng) may emit a different, equally
        # valid stream. The header test above still pins every other byte.
        pytest.skip(f"zlib {zlib.ZLIB_RUNTIME_VERSION} compresses differently from "
                    f"{BATCHES['zlib_version_used']}")  # fmt: skip
    rebuilt = batch.build(
        ISSUER_SEED,
        committed_delegation(),
        merchant=inputs["merchant"],
        seq=inputs["seq"],
        kind=Kind(inputs["kind"]),
        entries=entries,
        created_at=inputs["created_at"],
        expires_at=inputs["expires_at"],
        chunk_size=inputs["chunk_size"],
    )
    assert rebuilt == data


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_committed_batch_opens_and_yields_documented_entries(name):
    vector = ALL_BATCHES[name]
    opened = open_file(committed_file(vector), ROOTS)
    header = opened.header
    assert header.sha256 == vector["header_sha256"]
    assert header.signature.hex() == vector["signature_hex"]
    for field in ("merchant", "seq", "created_at", "expires_at", "count", "entries_size",
                  "entries_sha256", "payload_size", "chunk_size"):  # fmt: skip
        assert getattr(header, field) == vector["header"][field], field
    assert header.kind.value == vector["header"]["kind"]
    assert list(header.chunks) == vector["header"]["chunks"]
    assert header.issuer.key_id == KEYS["issuer"]["key_id"]
    assert opened.entries.hex() == vector["entries_hex"]

    kind = header.kind
    if kind is Kind.CARDS:
        assert opened.card_templates() == vector["entries"]
    elif kind is Kind.ISSUE:
        got = [
            {"digest": d.hex(), "card_id": c, "not_before": nb, "not_after": na,
             "uses": u, "balance": b, "status": s}
            for d, c, nb, na, u, b, s in opened.issue_entries()
        ]  # fmt: skip
        assert got == vector["entries"]
    elif kind is Kind.CONSUMED:
        got = [
            {"digest": d.hex(), "record_id": r.hex(), "uses": u, "amount": a}
            for d, r, u, a in opened.consumed_entries()
        ]
        assert got == vector["entries"]
    elif kind is Kind.ACCOUNTS:
        got = [
            {"account": i.hex(), "card_id": c, "not_before": nb, "not_after": na,
             "uses": u, "balance": b, "status": s}
            for i, c, nb, na, u, b, s in opened.account_entries()
        ]  # fmt: skip
        assert got == vector["entries"]
    elif kind is Kind.LINK:
        got = [{"digest": d.hex(), "account": a.hex()} for d, a in opened.link_entries()]
        assert got == vector["entries"]
    elif kind is Kind.TRANSFER:
        got = [
            {"transfer_id": t.hex(), "old_digest": o.hex(), "new_digest": n.hex()}
            for t, o, n in opened.transfer_entries()
        ]
        assert got == vector["entries"]
    elif kind is Kind.TOPUP:
        got = [
            {"topup_id": t.hex(), "account": a.hex(), "amount": m}
            for t, a, m in opened.topup_entries()
        ]
        assert got == vector["entries"]
    elif kind is Kind.LIMITS:
        assert opened.card_templates() == vector["entries"]
        limits = opened.limits()
        assert [(lim.card_id, lim.box, lim.per_redemption, lim.per_account) for lim in limits] == [
            (e["card"], e["box"], e["per_redemption"], e["per_account"]) for e in vector["entries"]
        ]
    else:
        assert [{"digest": d.hex()} for (d,) in opened.digest_entries()] == vector["entries"]


def test_card_templates_parse_to_documented_defaults():
    vector = BATCHES["batches"]["cards"]
    for template, expected in zip(vector["entries"], vector["parsed_cards"], strict=True):
        card = parse_card(template)
        got = {
            "id": card.card_id, "merchant": card.merchant, "kind": card.kind.value,
            "title": card.title, "uses": card.uses, "balance": card.balance,
            "stores": sorted(card.stores), "weekdays": sorted(card.weekdays),
            "hours": [list(h) for h in card.hours], "valid_from": card.valid_from,
            "valid_until": card.valid_until, "two_phase": card.two_phase,
            "reversal_window": card.reversal_window,
        }  # fmt: skip
        assert got == expected


def test_issue_batch_spans_several_chunks_and_chunks_match_vector():
    vector = BATCHES["batches"]["issue"]
    data = committed_file(vector)
    chunks = [bytes.fromhex(c) for c in vector["chunks_hex"]]
    assert len(chunks) >= 2
    assert batch.split(data) == chunks
    prefix = b"RDC1" + data[4 : 8 + vector["header_len"] + 64]
    payload = b""
    for index, chunk in enumerate(chunks):
        assert chunk.startswith(prefix)
        assert int.from_bytes(chunk[len(prefix) : len(prefix) + 4], "big") == index
        piece = chunk[len(prefix) + 4 :]
        assert hashlib.sha256(piece).hexdigest() == vector["header"]["chunks"][index]
        payload += piece
    assert payload == data[-vector["payload_size"] :]


def test_committed_chunks_reassemble_in_any_order():
    vector = BATCHES["batches"]["issue"]
    chunks = [bytes.fromhex(c) for c in vector["chunks_hex"]]
    assembler = ChunkAssembler(ROOTS)
    results = [assembler.add(c) for c in reversed(chunks)]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1].entries.hex() == vector["entries_hex"]
    assert results[-1].header.sha256 == vector["header_sha256"]


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_any_flipped_payload_byte_is_refused(name):
    vector = ALL_BATCHES[name]
    data = bytearray(committed_file(vector))
    data[-1] ^= 0x01
    with pytest.raises(BatchError):
        open_file(bytes(data), ROOTS)


# ---------------------------------------------------------------- manifest


def test_manifest_is_reproduced_byte_for_byte():
    vector = load("manifest.json")
    assert manifest.MAGIC.decode("ascii") == vector["magic"]
    assert manifest.DOMAIN.hex() == vector["domain_hex"]
    data = manifest.build(ISSUER_SEED, committed_delegation(), **vector["inputs"])
    assert data == (VECTORS / vector["file"]).read_bytes()
    assert data.hex() == vector["file_hex"]
    assert hashlib.sha256(data).hexdigest() == vector["file_sha256"]


def test_manifest_header_is_canonical_json_signed_under_the_manifest_domain():
    vector = load("manifest.json")
    data = bytes.fromhex(vector["file_hex"])
    header_len = vector["header_len"]
    assert data[:4] == b"RDM1" and int.from_bytes(data[4:8], "big") == header_len
    raw = data[8 : 8 + header_len]
    expected = {
        "v": 1,
        **vector["inputs"],
        "key_id": KEYS["issuer"]["key_id"],
        "issuer": load("delegation.json")["delegation"],
    }
    assert expected == vector["header"]
    assert raw == keys.canonical_json(expected)
    assert raw.decode("ascii") == vector["header_canonical"]
    assert (bytes.fromhex(vector["domain_hex"]) + raw).hex() == vector["signed_message_hex"]
    signature = data[8 + header_len :]
    assert len(signature) == 64 and signature.hex() == vector["signature_hex"]
    issuer_public = bytes.fromhex(KEYS["issuer"]["public_hex"])
    assert keys.verify(issuer_public, signature, b"", bytes.fromhex(vector["signed_message_hex"]))


def test_committed_manifest_opens_with_the_documented_fields():
    vector = load("manifest.json")
    opened = manifest.open_manifest((VECTORS / vector["file"]).read_bytes(), ROOTS)
    inputs = vector["inputs"]
    assert (opened.merchant, opened.latest_seq) == (inputs["merchant"], inputs["latest_seq"])
    assert (opened.created_at, opened.expires_at) == (inputs["created_at"], inputs["expires_at"])
    assert opened.issuer.key_id == KEYS["issuer"]["key_id"]


def test_manifests_signed_for_another_purpose_or_with_extra_bytes_are_refused():
    for item in load("manifest.json")["refused"]:
        with pytest.raises(ManifestError):
            manifest.open_manifest(bytes.fromhex(item["hex"]), ROOTS)


# ---------------------------------------------------------------- card template hours


def test_card_hours_parse_and_hold_as_documented():
    from cards.card import CardError
    from cards.rules import _in_window

    vector = load("hours.json")
    for item in vector["vectors"]:
        template = {"id": 1, "merchant": "demo", "kind": "coupon", "hours": [item["hours"]]}
        if item.get("refused"):
            with pytest.raises(CardError):
                parse_card(template)
            continue
        window = parse_card(template).hours[0]
        assert window == (item["start_minute"], item["end_minute"]), item["note"]
        inside = [m for m in range(24 * 60) if _in_window(m, window)]
        assert len(inside) == item["minutes_inside"], item["note"]
        assert [m for m in vector["probes"] if m in inside] == item["probes_inside"], item["note"]


def test_protocol_document_names_every_signature_domain_the_code_uses():
    # Section 6's table is what a backend signs with; the manifest's row was missing.
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text("utf-8")
    for domain in (keys.DELEGATION_DOMAIN, batch.DOMAIN, signed_code.DOMAIN, manifest.DOMAIN):
        assert f"`{domain.hex()}`" in text, domain
        assert f"`{domain[:-1].decode('ascii')}\\0`" in text, domain


def test_protocol_document_states_the_gs1_predefined_length_table_of_the_vectors():
    # Section 2 step 10 writes the table out so that a backend needs no library for it.
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text("utf-8")
    stated = {}
    for prefixes, length in re.findall(r"^\s*\| ((?:`\d\d` ?)+) \| (\d+) \|$", text, re.M):
        for prefix in re.findall(r"\d\d", prefixes):
            stated[prefix] = int(length)
    assert stated == load("gs1_ai.json")["predefined_length"]
