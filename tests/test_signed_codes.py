"""Signed codes v1 (cards.signed_code) and code family classification (cards.classify)."""

from __future__ import annotations

import base64
import string

import pytest

from cards import keys, signed_code
from cards.card import Card, parse_card
from cards.classify import CodeFamily, family, payment_scheme
from cards.signed_code import PREFIX, TEXT_LENGTH

ISSUER = keys.new_private_key()
OTHER = keys.new_private_key()
NOT_BEFORE = 1_800_000_000
NOT_AFTER = 1_900_000_000
# The QR alphanumeric mode character set (ISO/IEC 18004).
QR_ALPHANUMERIC = frozenset(string.digits + string.ascii_uppercase + " $%*+-./:")


def _mint(card_id: int = 7, serial: int = 123456789, private: bytes = ISSUER) -> str:
    return signed_code.mint(private, card_id, serial, NOT_BEFORE, NOT_AFTER)


def test_minted_code_parses_back_to_its_fields():
    text = _mint(card_id=7, serial=2**64 - 1)
    code = signed_code.parse(text)
    assert code.card_id == 7
    assert code.serial == 2**64 - 1
    assert code.not_before == NOT_BEFORE
    assert code.not_after == NOT_AFTER
    assert code.key_id == keys.key_id(keys.public_of(ISSUER))
    assert len(code.signature) == 64


def test_minted_code_verifies_with_the_issuer_key():
    code = signed_code.parse(_mint())
    assert signed_code.verify(code, keys.public_of(ISSUER)) is True


def test_minted_code_does_not_verify_with_another_key():
    code = signed_code.parse(_mint())
    assert signed_code.verify(code, keys.public_of(OTHER)) is False


def test_code_minted_by_another_key_names_that_key():
    code = signed_code.parse(_mint(private=OTHER))
    assert code.key_id == keys.key_id(keys.public_of(OTHER))
    assert signed_code.verify(code, keys.public_of(ISSUER)) is False


def test_minted_code_has_the_documented_length_and_prefix():
    text = _mint()
    assert len(text) == TEXT_LENGTH
    assert text.startswith(PREFIX)


def test_minted_code_uses_only_qr_alphanumeric_ascii():
    for serial in range(50):
        text = _mint(serial=serial)
        assert text.isascii()
        assert set(text) <= QR_ALPHANUMERIC


def test_different_serials_give_different_codes():
    assert _mint(serial=1) != _mint(serial=2)


def test_every_single_character_change_fails_parse_or_verify():
    text = _mint()
    public = keys.public_of(ISSUER)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    for position in range(len(text)):
        replacement = alphabet[(alphabet.find(text[position]) + 1) % len(alphabet)]
        flipped = text[:position] + replacement + text[position + 1 :]
        assert flipped != text
        try:
            code = signed_code.parse(flipped)
        except ValueError:
            continue
        assert signed_code.verify(code, public) is False, f"flip at {position} still verifies"


def test_non_canonical_padding_bits_are_refused():
    text = _mint()
    # 92 bytes = 736 bits: the last base32 character carries 1 data bit and 4 zero bits.
    last = text[-1]
    value = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567".index(last)
    assert value & 0b01111 == 0
    forged = text[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[value | 0b00001]
    # The same bytes decode from both texts; only one may stand for the code.
    body = forged[len(PREFIX) :]
    assert base64.b32decode(body + "=" * (-len(body) % 8)) == base64.b32decode(
        text[len(PREFIX) :] + "=" * (-len(body) % 8)
    )
    with pytest.raises(ValueError, match="canonical"):
        signed_code.parse(forged)


def test_lowercase_code_is_refused():
    text = _mint()
    with pytest.raises(ValueError):
        signed_code.parse(PREFIX + text[len(PREFIX) :].lower())


def test_padding_character_in_code_is_refused():
    text = _mint()
    with pytest.raises(ValueError):
        signed_code.parse(text[:-1] + "=")


@pytest.mark.parametrize(
    "text",
    ["", "RD1", "RD1AAAA", "XX1" + "A" * (TEXT_LENGTH - 3), "RD1" + "A" * (TEXT_LENGTH - 2)],
)
def test_wrong_prefix_or_length_is_refused(text):
    with pytest.raises(ValueError, match="prefix or length"):
        signed_code.parse(text)


def test_digits_outside_base32_are_refused():
    text = _mint()
    with pytest.raises(ValueError, match="outside base32"):
        signed_code.parse(text[:10] + "1" + text[11:])


def test_looks_signed_only_for_prefix_and_length():
    text = _mint()
    assert signed_code.looks_signed(text)
    assert not signed_code.looks_signed(text[:-1])
    assert not signed_code.looks_signed("XX1" + text[3:])


# ------------------------------------------------------------------ classification


def test_signed_code_is_classified_signed():
    assert family(_mint()) is CodeFamily.SIGNED


@pytest.mark.parametrize("prefix", ["10", "11", "12", "13", "14", "15"])
def test_wechat_pay_code_is_classified_payment(prefix):
    text = prefix + "1234567890123456"
    assert len(text) == 18
    assert family(text) is CodeFamily.PAYMENT
    assert payment_scheme(text) == "wechat"


@pytest.mark.parametrize(
    "text",
    [
        "16" + "1234567890123456",  # prefix 16 is not WeChat
        "09" + "1234567890123456",
        "10" + "123456789012345",  # 17 digits
        "10" + "12345678901234567",  # 19 digits
        "10" + "12345678901234A6",
    ],
)
def test_near_miss_wechat_code_is_not_wechat(text):
    assert payment_scheme(text) != "wechat"


@pytest.mark.parametrize("prefix", ["25", "26", "27", "28", "29", "30"])
@pytest.mark.parametrize("length", [16, 18, 20, 24])
def test_alipay_code_is_classified_payment(prefix, length):
    text = prefix + "7" * (length - 2)
    assert family(text) is CodeFamily.PAYMENT
    assert payment_scheme(text) == "alipay"


@pytest.mark.parametrize(
    "text",
    [
        "24" + "7" * 16,  # prefix 24
        "31" + "7" * 16,  # prefix 31
        "25" + "7" * 13,  # 15 digits
        "25" + "7" * 23,  # 25 digits
    ],
)
def test_near_miss_alipay_code_is_listed(text):
    assert payment_scheme(text) is None
    assert family(text) is CodeFamily.LISTED


def test_unionpay_code_is_classified_payment():
    text = "62" + "1" * 17
    assert family(text) is CodeFamily.PAYMENT
    assert payment_scheme(text) == "unionpay"


@pytest.mark.parametrize("text", ["DEMO-0001", "123456", "4006381333931", "RD1SHORT", ""])
def test_ordinary_codes_are_classified_listed(text):
    assert family(text) is CodeFamily.LISTED


def test_payment_pattern_needs_a_full_match():
    text = "101234567890123456"
    assert family(text + "X") is CodeFamily.LISTED
    assert family(" " + text) is CodeFamily.LISTED


# ---------------------------------------------------------------- window inside the delegation


def _delegation(not_before: int = NOT_BEFORE, not_after: int = NOT_AFTER) -> keys.Delegation:
    root = keys.new_private_key()
    return keys.delegate(root, keys.public_of(ISSUER), ("demo",), not_before, not_after)


def _code(not_before: int, not_after: int) -> signed_code.SignedCode:
    return signed_code.parse(signed_code.mint(ISSUER, 1, 1, not_before, not_after))


def _card(**window) -> Card:
    return parse_card({"id": 1, "merchant": "demo", "kind": "coupon", **window})


def test_window_of_a_code_with_both_times_is_its_own():
    code = _code(NOT_BEFORE + 10, NOT_AFTER - 10)
    assert signed_code.window(code, _card(), _delegation()) == (NOT_BEFORE + 10, NOT_AFTER - 10)


def test_zero_times_with_an_unbounded_card_take_the_delegation_window():
    assert signed_code.window(_code(0, 0), _card(), _delegation()) == (NOT_BEFORE, NOT_AFTER)


def test_zero_times_take_the_card_window_when_it_lies_inside_the_delegation():
    card = _card(valid_from=NOT_BEFORE + 5, valid_until=NOT_AFTER - 5)
    assert signed_code.window(_code(0, 0), card, _delegation()) == (NOT_BEFORE + 5, NOT_AFTER - 5)


def test_zero_times_clip_a_card_window_wider_than_the_delegation():
    card = _card(valid_from=NOT_BEFORE - 5, valid_until=NOT_AFTER + 5)
    assert signed_code.window(_code(0, 0), card, _delegation()) == (NOT_BEFORE, NOT_AFTER)


@pytest.mark.parametrize(
    ("not_before", "not_after", "inside"),
    [
        (NOT_BEFORE, NOT_AFTER, True),
        (0, 0, True),
        (0, NOT_AFTER, True),
        (NOT_BEFORE, 0, True),
        (NOT_BEFORE - 1, 0, False),
        (0, NOT_AFTER + 1, False),
        (NOT_BEFORE - 1, NOT_AFTER, False),
        (NOT_BEFORE, NOT_AFTER + 1, False),
    ],
)
def test_only_nonzero_times_outside_the_delegation_are_refused(not_before, not_after, inside):
    code = _code(not_before, not_after)
    assert signed_code.inside_delegation(code, _delegation()) is inside
