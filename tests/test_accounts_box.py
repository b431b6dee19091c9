"""Accounts, transfers, top-ups and offline limits on the box (issue 13, protocol.md 19).

Formats (cards.batch, cards.card), applying the five batch kinds (storage.batch_import),
the pure decisions (cards.evaluate, cards.rules) and the engine on a real database.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
from conftest import CREATED, FAR, make_keyset

from cards import batch
from cards.batch import BatchError, CodeStatus, Kind
from cards.card import CardError, Limit, limit_for, parse_limit, parse_limits

FAMILY = bytes(range(128, 144))
GROUP = bytes(range(144, 160))


# ---------------------------------------------------------------- formats


def test_new_kinds_have_their_documented_entry_sizes():
    assert batch.ENTRY_SIZES[Kind.ACCOUNTS] == 41
    assert batch.ENTRY_SIZES[Kind.LINK] == 32
    assert batch.ENTRY_SIZES[Kind.TRANSFER] == 48
    assert batch.ENTRY_SIZES[Kind.TOPUP] == 40
    assert batch.ENTRY_SIZES[Kind.LIMITS] == 0
    assert CodeStatus.TRANSFERRED == 4


def test_each_new_kind_round_trips_through_a_signed_file():
    ks = make_keyset()
    a, b = ks.digest("A"), ks.digest("B")
    made = {
        Kind.ACCOUNTS: batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 100, 0)]),
        Kind.LINK: batch.encode_links([(b, FAMILY), (a, GROUP)]),
        Kind.TRANSFER: batch.encode_transfers([(b"t" * 16, a, b)]),
        Kind.TOPUP: batch.encode_topups([(b"u" * 16, FAMILY, 250)]),
        Kind.LIMITS: batch.encode_limits(
            [{"card": 5, "box": "*", "per_redemption": 10, "per_account": None}]
        ),
    }
    opened = {k: batch.open_file(ks.build(k, e, seq=3), ks.roots) for k, e in made.items()}
    assert list(opened[Kind.ACCOUNTS].account_entries()) == [(FAMILY, 5, 0, 0, 0, 100, 0)]
    # Links are sorted by digest, transfers and top-ups stay in file order.
    assert list(opened[Kind.LINK].link_entries()) == sorted([(b, FAMILY), (a, GROUP)])
    assert list(opened[Kind.TRANSFER].transfer_entries()) == [(b"t" * 16, a, b)]
    assert list(opened[Kind.TOPUP].topup_entries()) == [(b"u" * 16, FAMILY, 250)]
    assert opened[Kind.LIMITS].limits() == [Limit(5, "*", 10, None)]
    assert opened[Kind.LIMITS].header.count == 1


def test_encoders_refuse_what_a_box_would_refuse():
    with pytest.raises(BatchError, match="amount 0"):
        batch.encode_topups([(b"u" * 16, FAMILY, 0)])
    with pytest.raises(BatchError, match="status 1"):
        batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 0, CodeStatus.CONSUMED)])
    with pytest.raises(BatchError, match="status 4"):
        batch.encode_accounts([(FAMILY, 5, 0, 0, 0, 0, CodeStatus.TRANSFERRED)])
    with pytest.raises(BatchError, match="16 bytes"):
        batch.encode_links([(b"short", FAMILY)])
    with pytest.raises(BatchError, match="two limits"):
        batch.encode_limits([{"card": 5, "box": "*", "per_redemption": 1, "per_account": 1}] * 2)


def _forged(ks, kind: Kind, entries: bytes) -> bytes:
    """A batch of `kind` carrying `entries` that no encoder would write, signed properly:
    what a buggy or compromised backend could send."""
    size = batch.ENTRY_SIZES[kind]
    payload = zlib.compress(entries)
    body = {
        "v": 1, "merchant": "demo", "seq": 3, "kind": kind.value, "created_at": CREATED,
        "expires_at": FAR, "count": len(entries) // size if size else 1, "entry_size": size,
        "entries_size": len(entries), "entries_sha256": hashlib.sha256(entries).hexdigest(),
        "compression": "zlib", "payload_size": len(payload),
        "chunk_size": batch.DEFAULT_CHUNK_SIZE, "chunks": [hashlib.sha256(payload).hexdigest()],
        "key_id": ks.delegation.key_id, "issuer": ks.delegation.to_json(),
    }  # fmt: skip
    from cards import envelope

    return envelope.seal(batch.FILE_MAGIC, batch.DOMAIN, body, ks.issuer_private) + payload


def test_signed_batches_that_say_what_the_format_forbids_are_refused():
    ks = make_keyset()
    cases = [
        (Kind.TOPUP, batch.TOPUP_ENTRY.pack(b"u" * 16, FAMILY, 0), "must be above 0"),
        (Kind.TOPUP, batch.TOPUP_ENTRY.pack(b"u" * 16, FAMILY, -5), "must be above 0"),
        (Kind.ACCOUNTS, batch.ACCOUNT_ENTRY.pack(FAMILY, 5, 0, 0, 0, 0, 4), "status 4"),
        (Kind.ACCOUNTS, batch.ACCOUNT_ENTRY.pack(FAMILY, 5, 0, 0, 0, -1, 0), "negative"),
        (Kind.LIMITS, b'[{"card":5,"box":"*","per_redemption":-1,"per_account":null}]', "0..2"),
        (Kind.LIMITS, b'[{"card":5,"box":"a b","per_redemption":1,"per_account":null}]', "box"),
        (Kind.LIMITS, b'[{"card":5,"box":"*","per_redemption":1}]', "exactly"),
        (Kind.LIMITS, b'{"card":5}', "JSON array"),
    ]
    for kind, entries, message in cases:
        with pytest.raises(BatchError, match=message):
            batch.open_file(_forged(ks, kind, entries), ks.roots)


@pytest.mark.parametrize("kind", [Kind.ACCOUNTS, Kind.LINK, Kind.TRANSFER, Kind.TOPUP])
def test_truncated_new_kind_batches_are_refused(kind):
    ks = make_keyset()
    size = batch.ENTRY_SIZES[kind]
    good = _forged(ks, kind, bytes(size))
    # The entries not a whole number of entries, though the header's count says so.
    with pytest.raises(BatchError):
        batch.open_file(_forged(ks, kind, bytes(size - 1)), ks.roots)
    with pytest.raises(BatchError, match="truncated"):
        batch.open_file(good[:-1], ks.roots)
    (header_len,) = struct.unpack_from(">I", good, 4)
    with pytest.raises(BatchError):
        batch.open_file(good[: 8 + header_len + 10], ks.roots)


def test_limits_parse_strictly_and_the_box_named_wins_over_every_box():
    limits = parse_limits(
        [
            {"card": 5, "box": "*", "per_redemption": 5000, "per_account": 8000},
            {"card": 5, "box": "box-1", "per_redemption": None, "per_account": 3000},
            {"card": 3, "box": "*", "per_redemption": 2, "per_account": None},
        ]
    )
    assert limit_for(limits, 5, "box-1") == Limit(5, "box-1", None, 3000)
    assert limit_for(limits, 5, "box-2") == Limit(5, "*", 5000, 8000)
    assert limit_for(limits, 3, "box-1") == Limit(3, "*", 2, None)
    assert limit_for(limits, 1, "box-1") is None
    for bad in (
        {"card": 5, "box": "*", "per_redemption": True, "per_account": None},
        {"card": 2**32, "box": "*", "per_redemption": 1, "per_account": None},
        {"card": 5, "box": "", "per_redemption": 1, "per_account": None},
        {"card": 5, "box": "*", "per_redemption": 1, "per_account": None, "extra": 1},
    ):
        with pytest.raises(CardError):
            parse_limit(bad)
