"""Generate the protocol test vectors in tests/vectors/ (docs/protocol.md explains them).

Run from the repository root:

    .venv/bin/python tests/vectors/make_vectors.py

Every input is fixed (key seeds, code key, times, codes), and Ed25519 signatures are
deterministic, so running this twice writes the same bytes. The vectors are committed;
tests/test_vectors.py never regenerates them, it checks that the current code still
produces exactly these bytes. Regenerate only when a format change is intended, and
then bump the format version it belongs to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zlib
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from cards import batch, claim_code, grant, keys, manifest, signed_code  # noqa: E402
from cards.batch import CodeStatus, Kind  # noqa: E402
from cards.card import parse_card  # noqa: E402
from cards.digest import code_digest  # noqa: E402
from cards.normalize import MalformedCode, normalize  # noqa: E402

# ---------------------------------------------------------------- fixed inputs

ROOT_SEED = bytes(range(32))
ISSUER_SEED = bytes(range(32, 64))
CODE_KEY = bytes(range(64, 96))
MERCHANT = "demo"
DELEGATION_NOT_BEFORE = 1_767_225_600  # 2026-01-01T00:00:00Z
DELEGATION_NOT_AFTER = 1_893_456_000  # 2030-01-01T00:00:00Z
CREATED_AT = 1_780_000_000  # 2026-05-28T20:26:40Z
EXPIRES_AT = 1_790_000_000  # 2026-09-21T14:13:20Z
ISSUE_CHUNK_SIZE = 128
# The manifest names the newest batch of the chain above (consumed, sequence 4) and is
# stale after three missed heartbeats of 1 h, as the reference backend signs it.
MANIFEST_LATEST_SEQ = 4
MANIFEST_EXPIRES_AT = CREATED_AT + 3 * 3600
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

DIGEST_CODES = [
    ("plain ASCII listed code", "DEMO-0001"),
    ("six-digit coupon", "123456"),
    ("GS1 element string: (01) fixed length, (10) variable + GS, (17) last", None),
    ("non-ASCII (CJK), hashed as UTF-8", "券-0001"),
    ("non-ASCII (Latin-1 range), hashed as UTF-8", "café"),
]
GS1_TEXT = "010950110153000310ABC123\x1d17251231"
# More canonical GS1 texts, added later (existing vectors never change): the digest is
# over the canonical text of section 2 step 10, GS (0x1D) included where it is kept.
MORE_DIGEST_CODES = [
    ("GS1: SSCC (00) then lot (10), no GS", "0010614141123456789110LOT-7"),
    (
        "GS1: GTIN, net weight 3103, price 3922 (GS kept), lot",
        "010950110153000331030012343922000499\x1d10L1",
    ),
    ("GS1: order number 400 (GS kept) then GLN 415", "400PO-123/A\x1d4151234567890128"),
    ("GS1: payment slip 415 + 8020", "41512345678901288020REF-77"),
]

# raw scanner bytes -> canonical text (or malformed), with why
NORMALIZE_CASES = [
    (b"DEMO-0001", "already canonical"),
    (b"]Q1HELLO-42\r\n", "AIM identifier ]Q1 and CR LF terminator removed"),
    (b"  DEMO-0001\t", "surrounding spaces and tab removed"),
    (b"\x02DEMO-0001\x03", "STX/ETX framing removed"),
    (b"\xc2\xa0HELLO\xe3\x80\x80", "Unicode whitespace (U+00A0, U+3000) stripped after decoding"),
    (b"\xe5\x88\xb8-0001", "UTF-8 text kept as is"),
    (b"]Q2\\000026caf\xc3\xa9", "ECI 000026 (UTF-8) after an ECI-announcing identifier"),
    (b"]Q2\\000003caf\xe9", "ECI 000003 (ISO-8859-1) selects the decoder"),
    (b"\\000026caf\xc3\xa9", "ECI escape at the very start without an identifier"),
    (b"]Q2AB\\\\CD", "ECI mode: a doubled backslash is one literal backslash"),
    (b"]d1AB\\\\CD", "not ECI mode (]d1): backslashes kept as they are"),
    (b"]E04006381333931", "EAN-13 with its identifier: GS1 parse leaves the text unchanged"),
    (b"]C1010950110153000317251231\x1d10ABC123", "GS1-128: GS after fixed-length (17) removed"),
    (b"]C1010950110153000310ABC123\x1d17251231", "GS1-128: GS after variable-length (10) kept"),
    (b"]C10109501101530003\x1d17251231\x1d", "GS1: superfluous and trailing GS removed"),
    (b"0109501101530003\x1d17251231", "GS present, no identifier: still parsed as GS1"),
    (b"\x1d0109501101530003", "leading GS is whitespace to str.strip(): removed, no GS1 step"),
    (b"ABC\x1dDEF", "GS in a non-GS1 string: kept in the middle"),
    (b"]zzHELLO", "any recognised identifier is removed, here ]zz (Aztec)"),
    (b"]C1]C1ABC", "only the first identifier is removed; the rest is data"),
    (b"]Q3(01)09501101530003(17)251231", "GS1 in human-readable (AI) form: kept as is"),
    (b"]YxHELLO", "]Y needs a digit modifier: not an identifier, kept as data"),
    (b"]", "a lone ] is data"),
    (b"", "empty read"),
    (b"\r\n", "only terminators"),
    (b"AB\x07CD", "control character inside"),
    (b"AB\x1eCD", "RS inside (only GS is allowed)"),
    (b"AB\xc2\x85CD", "C1 control U+0085 inside"),
    (b"\xff\xfe", "not UTF-8"),
    (b"A" * 512, "exactly 512 characters: accepted"),
    (b"A" * 513, "513 characters: too long"),
]

# Added later (existing vectors never change), each with the GS1 element strings the box
# found ([] = the text is not a GS1 element string and is left as it is).
# GS1 beyond AIs 01, 10 and 17 (protocol.md section 2 step 10). A GS is kept exactly
# after an element whose AI is not in the predefined-length table (00-04, 11-20,
# 31-36, 41), unless it is the last; everything else about the element is kept.
GS1_NORMALIZE_CASES = [
    (b"]C10010614141123456789110LOT-7", "SSCC (00, fixed 18 digits) then a lot: no GS needed"),
    (b"]C100106141411234567891\x1d10LOT-7", "GS after SSCC (00, predefined length) removed"),
    (b"]C102095011015300033712\x1d10AB", "02 fixed; GS after count 37 (variable) kept; 10 last"),
    (
        b"]C1112512311325010015250100\x1d21S1",
        "dates 11, 13, 15 (fixed 6 digits; day 00 allowed): GS removed",
    ),
    (b"]C117250230\x1d10AB", "17 with 30 February is not a date: no GS1 parse, text left as it is"),
    (b"]C11725133110AB", "17 with month 13: no GS1 parse, text left as it is (no GS added)"),
    (b"]C121SER-1\x1d17251231", "serial 21 (variable) then a date: GS kept"),
    (
        b"]C10109501101530003\x1d21SER-1\x1d\x1d",
        "serial 21 last: trailing GS stripped, GS after 01 removed",
    ),
    (
        b"]C121AAAAAAAAAAAAAAAAAAAA10B",
        "21 at its maximum of 20 characters ends there: GS inserted before 10",
    ),
    (b"]C121AAAAAAAAAAAAAAAAAAAAA", "21 longer than 20 characters: no GS1 parse, left as it is"),
    (b"]C1240PART/4711\x1d17251231", "240 additional id (variable): GS kept"),
    (
        b"]C13103001234\x1d17251231\x1d10L1",
        "net weight 3103 (fixed 6 digits): GS removed; GS after 17 removed",
    ),
    (b"]C101095011015300033922000499\x1d10L1", "price 3922 (variable, up to 15 digits): GS kept"),
    (b"]C13932978001250\x1d10L1", "price with ISO 4217 currency 3932 (variable): GS kept"),
    (b"]C1400PO-123/A\x1d4151234567890128", "order number 400 (variable) then GLN 415: GS kept"),
    (
        b"]C141512345678901288020REF-77",
        "payment slip: 415 (fixed 13 digits) then 8020 reference last",
    ),
    (
        b"]C14151234567890127\x1d8020REF-77",
        "a wrong check digit is not checked: parsed, GS after 415 removed",
    ),
    (b"]C10109501101530003\x1d23X", "unknown AI 23 after a GS: no GS1 parse, text left as it is"),
    (b"]C110A B\x1d17251231", "space is not in GS1 character set 82: no GS1 parse, left as it is"),
    (b"]C18008251231235959\x1d10L1", "8008 date and time (variable, 8-12 digits): GS kept"),
    (b"]C18008251231246000\x1d10L1", "8008 with hour 24: not a time, no GS1 parse, left as it is"),
    (b"]E04006381333931", "EAN-13 read with ]E0: parsed as one element (AI 400), text unchanged"),
    (b"]e00109501101530003\x1d17251231", "GS1 DataBar (]e0): same canonical form as GS1-128"),
    (b"]Q3010950110153000317251231\x1d", "GS1 QR (]Q3): trailing GS stripped as whitespace"),
]

CARD_TEMPLATES = [
    {"id": 1, "merchant": MERCHANT, "kind": "coupon", "title": "Free coffee", "reversal_window": 600},
    {"id": 2, "merchant": MERCHANT, "kind": "ticket", "title": "Entry", "weekdays": [6, 7],
     "hours": ["09:00-17:30"]},
    {"id": 3, "merchant": MERCHANT, "kind": "groupon", "uses": 3, "stores": ["store-1"]},
    {"id": 4, "merchant": MERCHANT, "kind": "member"},
    {"id": 5, "merchant": MERCHANT, "kind": "gift", "title": "Gift card €50", "balance": 5000},
]  # fmt: skip

# issue entries: code text, card id, not_before, not_after, uses, balance, status
ISSUE_ROWS = [
    ("DEMO-0001", 1, 0, 0, 0, 0, CodeStatus.ACTIVE),
    ("DEMO-0002", 1, 0, 0, 0, 0, CodeStatus.ACTIVE),
    ("TICKET-7", 2, CREATED_AT, CREATED_AT + 86_400, 0, 0, CodeStatus.ACTIVE),
    ("GROUP-1", 3, 0, 0, 0, 0, CodeStatus.ACTIVE),
    ("MEMBER-9", 4, 0, 0, batch.UNLIMITED, 0, CodeStatus.ACTIVE),
    ("GIFT-50", 5, 0, 0, 0, 0, CodeStatus.ACTIVE),
    ("GIFT-20", 5, 0, 0, 0, 2000, CodeStatus.ACTIVE),
    ("券-0001", 1, 0, 0, 2, 0, CodeStatus.ACTIVE),
    ("OLD-1", 1, 0, 0, 0, 0, CodeStatus.CONSUMED),
    (GS1_TEXT, 2, 0, 0, 0, 0, CodeStatus.ACTIVE),
]
REVOKE_CODES = ["DEMO-0002", "OLD-1"]
# consumed elsewhere: code text, other box's record id (UUID), uses, amount
CONSUMED_ROWS = [
    ("GROUP-1", "0196f3a0-0000-7000-8000-000000000001", 1, 0),
    ("GIFT-50", "0196f3a0-0000-7000-8000-000000000002", 0, 1250),
]

# `hours` windows of card templates (protocol.md section 13): the text, what the box
# parses it to (minutes since local midnight) or that it refuses the template, and why.
HOURS_CASES = [
    ("09:00-17:30", "the form producers write: 09:00 inclusive to 17:30 exclusive"),
    ("00:00-24:00", "the whole day"),
    ("22:00-02:00", "end before start: wraps past midnight"),
    ("09:00-09:00", "start equal to end: the whole day"),
    ("00:00-00:00", "start equal to end: the whole day"),
    ("24:00-02:00", "24:00 as a start is the same as 00:00"),
    ("22:00-24:00", "to the end of the day"),
    ("9:0-17:30", "lenient: one-digit hour and minute (producers must not rely on it)"),
    (" 09:00 - 17:30 ", "lenient: spaces around the times"),
    ("009:00-10:00", "lenient: extra leading zero"),
    ("23:60-24:00", "minute 60"),
    ("24:01-01:00", "after 24:00"),
    ("25:00-01:00", "hour 25"),
    ("0900-1700", "no colon"),
    ("09:00", "no end"),
    ("09:00-17:30-18:00", "two dashes"),
    ("09:00\u201317:00", "an en dash is not a dash"),
]

HOURS_PROBES = [0, 1, 119, 120, 539, 540, 599, 600, 1049, 1050, 1319, 1320, 1439]

SIGNED_CODES = [
    ("ordinary code, 30 days", 1, 1, CREATED_AT, CREATED_AT + 30 * 86_400),
    ("largest field values", 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0, 0xFFFFFFFF),
]

CANONICAL_JSON_INPUT = {
    "v": 1,
    "b": [3, -2, 0, True, False, None],
    "a": 'quote " backslash \\ slash / nl \n tab \t gs \x1d del \x7f',
    "é": "café 券 😀",
    "A": {"z": 1, "Z": 2, "_": 3},
}


# ---------------------------------------------------------------- generation


def entries_doc(kind: Kind, entries: bytes) -> list[dict]:
    """The entries of a batch as the documentation describes them, in file order."""
    if kind is Kind.CARDS:
        return json.loads(entries)
    if kind in (Kind.ISSUE, Kind.SNAPSHOT):
        return [
            {"digest": d.hex(), "card_id": c, "not_before": nb, "not_after": na,
             "uses": u, "balance": b, "status": s}
            for d, c, nb, na, u, b, s in batch.ISSUE_ENTRY.iter_unpack(entries)
        ]  # fmt: skip
    if kind is Kind.CONSUMED:
        return [
            {"digest": d.hex(), "record_id": r.hex(), "uses": u, "amount": a}
            for d, r, u, a in batch.CONSUMED_ENTRY.iter_unpack(entries)
        ]
    if kind is Kind.ACCOUNTS:
        return [
            {"account": i.hex(), "card_id": c, "not_before": nb, "not_after": na,
             "uses": u, "balance": b, "status": s}
            for i, c, nb, na, u, b, s in batch.ACCOUNT_ENTRY.iter_unpack(entries)
        ]  # fmt: skip
    if kind is Kind.LINK:
        return [
            {"digest": d.hex(), "account": a.hex()}
            for d, a in batch.LINK_ENTRY.iter_unpack(entries)
        ]
    if kind is Kind.TRANSFER:
        return [
            {"transfer_id": t.hex(), "old_digest": o.hex(), "new_digest": n.hex()}
            for t, o, n in batch.TRANSFER_ENTRY.iter_unpack(entries)
        ]
    if kind is Kind.TOPUP:
        return [
            {"topup_id": t.hex(), "account": a.hex(), "amount": m}
            for t, a, m in batch.TOPUP_ENTRY.iter_unpack(entries)
        ]
    if kind is Kind.LIMITS:
        return json.loads(entries)
    return [{"digest": d.hex()} for (d,) in batch.DIGEST_ENTRY.iter_unpack(entries)]


def digest_of(text: str) -> bytes:
    return code_digest(CODE_KEY, text)


def make_batch(delegation, name, kind, seq, entries, inputs, chunk_size=batch.DEFAULT_CHUNK_SIZE):
    data = batch.build(
        ISSUER_SEED, delegation, merchant=MERCHANT, seq=seq, kind=kind, entries=entries,
        created_at=CREATED_AT, expires_at=EXPIRES_AT, chunk_size=chunk_size,
    )  # fmt: skip
    (header_len,) = batch._U32.unpack_from(data, 4)
    header_raw = data[8 : 8 + header_len]
    signature = data[8 + header_len : 8 + header_len + 64]
    payload = data[8 + header_len + 64 :]
    (HERE / name).write_bytes(data)
    return data, {
        "file": name,
        "inputs": {
            "merchant": MERCHANT,
            "seq": seq,
            "kind": kind.value,
            "created_at": CREATED_AT,
            "expires_at": EXPIRES_AT,
            "chunk_size": chunk_size,
            **inputs,
        },
        "file_size": len(data),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "header_len": header_len,
        "header": json.loads(header_raw),
        "header_sha256": hashlib.sha256(header_raw).hexdigest(),
        "signature_hex": signature.hex(),
        "payload_size": len(payload),
        "entries_hex": entries.hex(),
        "entries": entries_doc(kind, entries),
    }


def main() -> None:
    root_public = keys.public_of(ROOT_SEED)
    issuer_public = keys.public_of(ISSUER_SEED)
    delegation = keys.delegate(
        ROOT_SEED, issuer_public, (MERCHANT,), DELEGATION_NOT_BEFORE, DELEGATION_NOT_AFTER
    )
    body = keys.canonical_json(delegation.body())

    write("keys.json", {
        "note": "Ed25519 private keys are the 32-byte seeds of RFC 8032.",
        "root": {"seed_hex": ROOT_SEED.hex(), "public_hex": root_public.hex(),
                 "public_b64": keys.b64(root_public), "key_id": keys.key_id(root_public)},
        "issuer": {"seed_hex": ISSUER_SEED.hex(), "public_hex": issuer_public.hex(),
                   "public_b64": keys.b64(issuer_public), "key_id": keys.key_id(issuer_public)},
        "code_key_hex": CODE_KEY.hex(),
        "code_key_b64": keys.b64(CODE_KEY),
    })  # fmt: skip

    write("canonical_json.json", {
        "note": "json.dumps(value, sort_keys=True, separators=(',', ':'), ensure_ascii=True)",
        "value": CANONICAL_JSON_INPUT,
        "canonical": keys.canonical_json(CANONICAL_JSON_INPUT).decode("ascii"),
        "canonical_hex": keys.canonical_json(CANONICAL_JSON_INPUT).hex(),
    })  # fmt: skip

    write("delegation.json", {
        "root_seed_hex": ROOT_SEED.hex(),
        "issuer_public_hex": issuer_public.hex(),
        "merchants": [MERCHANT],
        "not_before": DELEGATION_NOT_BEFORE,
        "not_after": DELEGATION_NOT_AFTER,
        "cert_canonical": body.decode("ascii"),
        "signed_message_hex": (keys.DELEGATION_DOMAIN + body).hex(),
        "signature_hex": delegation.signature.hex(),
        "delegation": delegation.to_json(),
    })  # fmt: skip

    digests = []
    for note, text in DIGEST_CODES:
        text = GS1_TEXT if text is None else text
        digests.append({"note": note, "text": text, "text_utf8_hex": text.encode().hex(),
                        "digest_hex": digest_of(text).hex()})  # fmt: skip
    for note, text in MORE_DIGEST_CODES:
        assert normalize(b"]C1" + text.encode()).text == text, f"{note}: not canonical"
        digests.append({"note": note, "text": text, "text_utf8_hex": text.encode().hex(),
                        "digest_hex": digest_of(text).hex()})  # fmt: skip
    write("digest.json", {"code_key_hex": CODE_KEY.hex(), "vectors": digests})

    cases = []
    for raw, note in NORMALIZE_CASES:
        try:
            text = normalize(raw).text
        except MalformedCode:
            cases.append({"raw_hex": raw.hex(), "malformed": True, "note": note})
            continue
        cases.append({"raw_hex": raw.hex(), "text": text, "text_utf8_hex": text.encode().hex(),
                      "note": note})  # fmt: skip
    for raw, note in GS1_NORMALIZE_CASES:
        found = normalize(raw)
        cases.append({"raw_hex": raw.hex(), "text": found.text,
                      "text_utf8_hex": found.text.encode().hex(),
                      "gs1_elements": [list(e) for e in found.gs1], "note": note})  # fmt: skip
    write("normalize.json", {"max_length": 512, "vectors": cases})
    write_gs1_table()

    codes = []
    for note, card_id, serial, not_before, not_after in SIGNED_CODES:
        text = signed_code.mint(ISSUER_SEED, card_id, serial, not_before, not_after)
        parsed = signed_code.parse(text)
        codes.append({
            "note": note,
            "issuer_seed_hex": ISSUER_SEED.hex(),
            "key_id": parsed.key_id,
            "card_id": card_id,
            "serial": serial,
            "not_before": not_before,
            "not_after": not_after,
            "payload_hex": parsed.payload.hex(),
            "signed_message_hex": (signed_code.DOMAIN + parsed.payload).hex(),
            "signature_hex": parsed.signature.hex(),
            "text": text,
            "digest_hex": digest_of(text).hex(),
        })  # fmt: skip
    good = codes[0]["text"]
    # The last character carries 1 bit of signature and 4 zero padding bits.
    last = BASE32.index(good[-1])
    assert last % 16 == 0
    refused = [
        {"text": good[:-1] + BASE32[last + 1],
         "why": "non-zero padding bits in the last character: not canonical"},
        {"text": good.lower().replace("rd1", "RD1", 1), "why": "lower-case base32"},
        {"text": good[:-1], "why": "one character short"},
    ]  # fmt: skip
    raw = bytearray(base64.b32decode(good[3:] + "=" * (-len(good[3:]) % 8)))
    raw[-1] ^= 0x01
    forged = "RD1" + base64.b32encode(bytes(raw)).decode().rstrip("=")
    write("signed_code.json", {
        "prefix": signed_code.PREFIX,
        "text_length": signed_code.TEXT_LENGTH,
        "domain_hex": signed_code.DOMAIN.hex(),
        "vectors": codes,
        "refused_by_parse": refused,
        "bad_signature": {"text": forged, "why": "last signature byte flipped: parses, does not verify"},
    })  # fmt: skip

    batches = {}
    _, batches["cards"] = make_batch(
        delegation, "batch-cards.rdb", Kind.CARDS, 1, batch.encode_cards(CARD_TEMPLATES),
        {"templates": CARD_TEMPLATES},
    )  # fmt: skip
    batches["cards"]["parsed_cards"] = [card_doc(parse_card(t)) for t in CARD_TEMPLATES]

    rows = [(digest_of(t), *rest) for t, *rest in ISSUE_ROWS]
    issue_inputs = [
        {"code": t, "digest": digest_of(t).hex(), "card_id": c, "not_before": nb,
         "not_after": na, "uses": u, "balance": b, "status": s}
        for t, c, nb, na, u, b, s in ISSUE_ROWS
    ]  # fmt: skip
    issue_file, batches["issue"] = make_batch(
        delegation, "batch-issue.rdb", Kind.ISSUE, 2, batch.encode_issue(rows),
        {"rows": issue_inputs}, chunk_size=ISSUE_CHUNK_SIZE,
    )  # fmt: skip
    chunks = batch.split(issue_file)
    assert len(chunks) >= 2, "the issue vector must span several chunks"
    batches["issue"]["chunks_hex"] = [c.hex() for c in chunks]

    _, batches["revoke"] = make_batch(
        delegation, "batch-revoke.rdb", Kind.REVOKE, 3,
        batch.encode_digests(digest_of(t) for t in REVOKE_CODES), {"codes": REVOKE_CODES},
    )  # fmt: skip

    consumed = [
        (digest_of(t), bytes.fromhex(r.replace("-", "")), u, a) for t, r, u, a in CONSUMED_ROWS
    ]
    _, batches["consumed"] = make_batch(
        delegation, "batch-consumed.rdb", Kind.CONSUMED, 4, batch.encode_consumed(consumed),
        {"rows": [{"code": t, "record_id": r, "uses": u, "amount": a} for t, r, u, a in CONSUMED_ROWS]},
    )  # fmt: skip

    write_manifest(delegation)
    write_hours()
    write_dispensing(delegation)

    write("batches.json", {
        "roots": {keys.key_id(root_public): root_public.hex()},
        "issuer_seed_hex": ISSUER_SEED.hex(),
        "code_key_hex": CODE_KEY.hex(),
        "zlib_level": 6,
        "zlib_version_used": zlib.ZLIB_RUNTIME_VERSION,
        "batches": batches,
    })  # fmt: skip
    write_accounts(delegation, root_public)


# Accounts, transfers, top-ups and offline limits (docs/protocol.md section 19): five
# batches continuing the chain above (sequences 5-9), in their own files so that the
# vectors above stay byte for byte as they were.
FAMILY = bytes(range(128, 144))  # a family's stored-value account on the gift card (5)
GROUP = bytes(range(144, 160))  # a use-counted account on the groupon card (3)
# accounts: account id, card id, not_before, not_after, uses, balance, status
ACCOUNT_ROWS = [
    (FAMILY, 5, 0, 0, 0, 10_000, CodeStatus.ACTIVE),
    (GROUP, 3, 0, 0, 10, 0, CodeStatus.ACTIVE),
]
# link: code text, account id (GIFT-20 is an issued code: a plastic card joining it)
LINK_ROWS = [
    ("FAMILY-PHONE-1", FAMILY),
    ("FAMILY-PHONE-2", FAMILY),
    ("GIFT-20", FAMILY),
    ("GROUP-1", GROUP),
]
# transfer: transfer id, old code text, new code text (GIFT-50 given to a friend)
TRANSFER_ROWS = [(bytes(range(160, 176)), "GIFT-50", "GIFT-50-FRIEND")]
# topup: topup id, account id, amount (minor units for FAMILY, uses for GROUP)
TOPUP_ROWS = [(bytes(range(176, 192)), FAMILY, 2_500), (bytes(range(192, 208)), GROUP, 5)]
LIMIT_ROWS = [
    {"card": 5, "box": "*", "per_redemption": 5_000, "per_account": 8_000},
    {"card": 5, "box": "box-1", "per_redemption": None, "per_account": 3_000},
    {"card": 3, "box": "*", "per_redemption": 2, "per_account": None},
]


def write_accounts(delegation, root_public) -> None:
    """batch-accounts.rdb, batch-link.rdb, batch-transfer.rdb, batch-topup.rdb,
    batch-limits.rdb and accounts.json (laid out as batches.json)."""
    found = {}
    _, found["accounts"] = make_batch(
        delegation, "batch-accounts.rdb", Kind.ACCOUNTS, 5, batch.encode_accounts(ACCOUNT_ROWS),
        {"rows": [{"account": a.hex(), "card_id": c, "not_before": nb, "not_after": na,
                   "uses": u, "balance": b, "status": s}
                  for a, c, nb, na, u, b, s in ACCOUNT_ROWS]},
    )  # fmt: skip
    _, found["link"] = make_batch(
        delegation, "batch-link.rdb", Kind.LINK, 6,
        batch.encode_links((digest_of(t), a) for t, a in LINK_ROWS),
        {"rows": [{"code": t, "account": a.hex()} for t, a in LINK_ROWS]},
    )  # fmt: skip
    _, found["transfer"] = make_batch(
        delegation, "batch-transfer.rdb", Kind.TRANSFER, 7,
        batch.encode_transfers((i, digest_of(o), digest_of(n)) for i, o, n in TRANSFER_ROWS),
        {"rows": [{"transfer_id": i.hex(), "old_code": o, "new_code": n}
                  for i, o, n in TRANSFER_ROWS]},
    )  # fmt: skip
    _, found["topup"] = make_batch(
        delegation, "batch-topup.rdb", Kind.TOPUP, 8, batch.encode_topups(TOPUP_ROWS),
        {"rows": [{"topup_id": i.hex(), "account": a.hex(), "amount": m}
                  for i, a, m in TOPUP_ROWS]},
    )  # fmt: skip
    _, found["limits"] = make_batch(
        delegation, "batch-limits.rdb", Kind.LIMITS, 9, batch.encode_limits(LIMIT_ROWS),
        {"limits": LIMIT_ROWS},
    )  # fmt: skip
    write("accounts.json", {
        "roots": {keys.key_id(root_public): root_public.hex()},
        "issuer_seed_hex": ISSUER_SEED.hex(),
        "code_key_hex": CODE_KEY.hex(),
        "zlib_level": 6,
        "zlib_version_used": zlib.ZLIB_RUNTIME_VERSION,
        "batches": found,
    })  # fmt: skip


# GS1 General Specifications, figure 7.8.5-2 ("element strings with predefined length
# using GS1 Application Identifiers"): the first two digits of an AI -> the length of
# AI and value together. GS1 keeps this table fixed for all time (new AIs never start
# with these digits unless they have this length), so it alone decides where a GS goes.
GS1_PREDEFINED_LENGTH = {
    "00": 20, "01": 16, "02": 16, "03": 16, "04": 18, "11": 8, "12": 8, "13": 8,
    "14": 8, "15": 8, "16": 8, "17": 8, "18": 8, "19": 8, "20": 4, "31": 10, "32": 10,
    "33": 10, "34": 10, "35": 10, "36": 10, "41": 16,
}  # fmt: skip
# AIs whose value the box also checks as a date (and time): see protocol.md step 10.
GS1_DATE_AIS = ["11", "12", "13", "15", "16", "17", "4324", "4325", "4326", "7003", "7006",
                "7007", "7011", "8008"]  # fmt: skip


def write_gs1_table() -> None:
    """gs1_ai.json: the GS1 Application Identifier table the box parses with, so that a
    backend in any language can find the same element strings (protocol.md step 10)."""
    from biip.gs1_application_identifiers import _GS1_APPLICATION_IDENTIFIERS

    ais = []
    for ai, entry in sorted(_GS1_APPLICATION_IDENTIFIERS.items()):
        predefined = GS1_PREDEFINED_LENGTH.get(ai[:2])
        assert entry.separator_required == (predefined is None), ai
        ais.append({"ai": ai, "fnc1_required": entry.separator_required,
                    "format": entry.format, "pattern": entry.pattern})  # fmt: skip
    write("gs1_ai.json", {
        "note": "GS1 Application Identifiers as the box parses them (biip "
                f"{version('biip')}, from the GS1 Barcode Syntax Dictionary). "
                "pattern: a regular expression for AI and value (\\d = a digit); "
                "fnc1_required: a GS must follow the element unless it is the last. "
                "See docs/protocol.md section 2 step 10.",
        "predefined_length": GS1_PREDEFINED_LENGTH,
        "date_ais": GS1_DATE_AIS,
        "ais": ais,
    })  # fmt: skip


def write_hours() -> None:
    """hours.json: card template `hours` windows as the box parses and applies them."""
    from cards.card import CardError
    from cards.rules import _in_window

    cases = []
    for text, note in HOURS_CASES:
        template = {"id": 1, "merchant": MERCHANT, "kind": "coupon", "hours": [text]}
        try:
            start, end = parse_card(template).hours[0]
        except CardError:
            cases.append({"hours": text, "refused": True, "note": note})
            continue
        inside = [m for m in range(24 * 60) if _in_window(m, (start, end))]
        cases.append({"hours": text, "start_minute": start, "end_minute": end,
                      "minutes_inside": len(inside),
                      "probes_inside": [m for m in HOURS_PROBES if m in inside],
                      "note": note})  # fmt: skip
    write("hours.json", {
        "note": "minutes since local midnight; a window holds for minute m when start <= m "
                "< end, or, when end <= start, when m >= start or m < end (protocol.md 13). "
                "probes_inside: which of the probe minutes the window holds for.",
        "probes": HOURS_PROBES,
        "vectors": cases,
    })  # fmt: skip


def write_manifest(delegation) -> None:
    """manifest.rdm and manifest.json: a signed manifest (docs/protocol.md 16.1), the
    exact bytes its signature covers, and manifests a box must refuse."""
    inputs = {"merchant": MERCHANT, "latest_seq": MANIFEST_LATEST_SEQ,
              "created_at": CREATED_AT, "expires_at": MANIFEST_EXPIRES_AT}  # fmt: skip
    data = manifest.build(ISSUER_SEED, delegation, **inputs)
    (header_len,) = batch._U32.unpack_from(data, 4)
    header_raw = data[8 : 8 + header_len]
    signature = data[8 + header_len :]
    (HERE / "manifest.rdm").write_bytes(data)
    # The same header signed under the batch domain: the signature is valid Ed25519 by a
    # trusted issuer, but for the wrong purpose.
    wrong_domain = data[: 8 + header_len] + keys.sign(ISSUER_SEED, batch.DOMAIN, header_raw)
    write("manifest.json", {
        "file": "manifest.rdm",
        "inputs": inputs,
        "magic": manifest.MAGIC.decode("ascii"),
        "domain_hex": manifest.DOMAIN.hex(),
        "file_hex": data.hex(),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "header_len": header_len,
        "header": json.loads(header_raw),
        "header_canonical": header_raw.decode("ascii"),
        "signed_message_hex": (manifest.DOMAIN + header_raw).hex(),
        "signature_hex": signature.hex(),
        "refused": [
            {"hex": wrong_domain.hex(),
             "why": "header signed under the batch domain redeemd-batch-v1 instead of "
                    "redeemd-manifest-v1"},
            {"hex": (data + b"\x00").hex(), "why": "one byte after the signature"},
            {"hex": (b"RDB1" + data[4:]).hex(), "why": "batch magic RDB1 instead of RDM1"},
        ],
    })  # fmt: skip


# Dispensing (docs/protocol.md section 18): a box key seeded like the others, one grant
# set with a live and a revoked grant, and a claim code minted under the live one.
BOX_SEED = bytes(range(96, 128))
BOX = "box-1"
GRANT_SET_SEQ = 1
GRANTS = (
    grant.Grant("0102030405060708", (1, 2), 100, CREATED_AT, EXPIRES_AT),
    grant.Grant("1112131415161718", (2,), 5, CREATED_AT, EXPIRES_AT, revoked=True),
)
CLAIM = {"grant_id": "0102030405060708", "counter": 1, "card_id": 1,
         "claim_by": CREATED_AT + 30 * 86400}  # fmt: skip


def write_dispensing(delegation) -> None:
    """grants.rdg, grants.json and claim_code.json: a signed grant set for box-1's key
    and a claim code that box minted under it; things a box or claim service refuses."""
    box_public = keys.public_of(BOX_SEED)
    data = grant.build(
        ISSUER_SEED, delegation, merchant=MERCHANT, box=BOX, box_public=box_public,
        seq=GRANT_SET_SEQ, created_at=CREATED_AT, grants=GRANTS,
    )  # fmt: skip
    (header_len,) = batch._U32.unpack_from(data, 4)
    header_raw = data[8 : 8 + header_len]
    (HERE / "grants.rdg").write_bytes(data)
    write("grants.json", {
        "file": "grants.rdg",
        "box_seed_hex": BOX_SEED.hex(),
        "box_public_b64": keys.b64(box_public),
        "box_key_id": keys.key_id(box_public),
        "magic": grant.MAGIC.decode("ascii"),
        "domain_hex": grant.DOMAIN.hex(),
        "file_hex": data.hex(),
        "header": json.loads(header_raw),
        "header_canonical": header_raw.decode("ascii"),
        "signed_message_hex": (grant.DOMAIN + header_raw).hex(),
        "signature_hex": data[8 + header_len :].hex(),
        "refused": [
            {"hex": (b"RDM1" + data[4:]).hex(), "why": "manifest magic RDM1 instead of RDG1"},
            {"hex": (data + b"\x00").hex(), "why": "one byte after the signature"},
        ],
    })  # fmt: skip
    text = claim_code.mint(BOX_SEED, **CLAIM)
    parsed = claim_code.parse(text)
    raw = bytearray(base64.b32decode(text[3:] + "=" * (-len(text[3:]) % 8)))
    raw[-1] ^= 0x01
    forged = "RC1" + base64.b32encode(bytes(raw)).decode().rstrip("=")
    write("claim_code.json", {
        "prefix": claim_code.PREFIX,
        "text_length": claim_code.TEXT_LENGTH,
        "domain_hex": claim_code.DOMAIN.hex(),
        "box_seed_hex": BOX_SEED.hex(),
        "box_key_id": parsed.box_key_id,
        **CLAIM,
        "payload_hex": parsed.payload.hex(),
        "signed_message_hex": (claim_code.DOMAIN + parsed.payload).hex(),
        "signature_hex": parsed.signature.hex(),
        "text": text,
        "digest_hex": digest_of(text).hex(),
        "refused_by_parse": [
            {"text": text.lower().replace("rc1", "RC1", 1), "why": "lower-case base32"},
            {"text": text[:-1], "why": "one character short"},
        ],
        "bad_signature": {"text": forged, "why": "last signature byte flipped"},
    })  # fmt: skip


def card_doc(card) -> dict:
    return {
        "id": card.card_id, "merchant": card.merchant, "kind": card.kind.value,
        "title": card.title, "uses": card.uses, "balance": card.balance,
        "stores": sorted(card.stores), "weekdays": sorted(card.weekdays),
        "hours": [list(h) for h in card.hours], "valid_from": card.valid_from,
        "valid_until": card.valid_until, "two_phase": card.two_phase,
        "reversal_window": card.reversal_window,
    }  # fmt: skip


def write(name: str, value: object) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    (HERE / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
