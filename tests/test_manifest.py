"""Manifests verify like batch headers and cannot be confused with them."""

from __future__ import annotations

import pytest
from conftest import CREATED, FAR, make_keyset

from cards import manifest
from cards.batch import BatchError, open_file
from cards.manifest import ManifestError


def _manifest(keyset, **kw) -> bytes:
    args = {"merchant": "demo", "latest_seq": 7, "created_at": CREATED, "expires_at": FAR}
    return manifest.build(keyset.issuer_private, keyset.delegation, **{**args, **kw})


def test_manifest_round_trip(keyset):
    opened = manifest.open_manifest(_manifest(keyset), keyset.roots)
    assert (opened.merchant, opened.latest_seq, opened.created_at) == ("demo", 7, CREATED)


def test_manifest_from_an_untrusted_root_is_refused(keyset):
    stranger = make_keyset()
    with pytest.raises(ManifestError, match="root"):
        manifest.open_manifest(_manifest(stranger), keyset.roots)


@pytest.mark.parametrize("position", [5, 40, -1])
def test_bit_flipped_manifest_is_refused(keyset, position):
    data = bytearray(_manifest(keyset))
    data[position] ^= 0x01
    with pytest.raises(ManifestError):
        manifest.open_manifest(bytes(data), keyset.roots)


def test_manifest_for_another_merchant_scope_is_refused(keyset):
    with pytest.raises(ManifestError, match="may not sign"):
        manifest.open_manifest(_manifest(keyset, merchant="other"), keyset.roots)


def test_manifest_is_not_a_batch_and_a_batch_is_not_a_manifest(keyset):
    with pytest.raises(BatchError):
        open_file(_manifest(keyset), keyset.roots)
    with pytest.raises(ManifestError):
        manifest.open_manifest(keyset.cards_batch(1), keyset.roots)


def test_truncated_manifest_is_refused(keyset):
    data = _manifest(keyset)
    for cut in (3, 8, len(data) - 1):
        with pytest.raises(ManifestError):
            manifest.open_manifest(data[:cut], keyset.roots)
