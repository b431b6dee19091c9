"""Which family a normalised code belongs to, before any lookup.

Payment auth codes from wallet apps are not ours to redeem: they are passed to the POS
app as `payment` events and never digested into the ledger. The patterns follow the
published formats: WeChat Pay 18 digits starting 10-15, Alipay 16-24 digits
starting 25-30, UnionPay QuickPass 19 digits starting 62.
"""

from __future__ import annotations

import re
from enum import StrEnum

from cards import signed_code


class CodeFamily(StrEnum):
    SIGNED = "signed"
    PAYMENT = "payment"
    LISTED = "listed"


_PAYMENT = (
    ("wechat", re.compile(r"1[0-5]\d{16}")),
    ("alipay", re.compile(r"(2[5-9]|30)\d{14,22}")),
    ("unionpay", re.compile(r"62\d{17}")),
)


def payment_scheme(text: str) -> str | None:
    """The wallet whose payment-code format `text` matches, if any."""
    for scheme, pattern in _PAYMENT:
        if pattern.fullmatch(text):
            return scheme
    return None


def family(text: str) -> CodeFamily:
    """Signed codes are recognised by their prefix; a listed code that happens to look
    like a payment code is still looked up first by the engine, so this only answers
    `payment` as a hint."""
    if signed_code.looks_signed(text):
        return CodeFamily.SIGNED
    if payment_scheme(text):
        return CodeFamily.PAYMENT
    return CodeFamily.LISTED
