"""cards.evaluate: the whole verdict for a looked-up code, from plain values (no database).

The engine's tests prove the same verdicts end to end on a real database; these pin
the pure function's contract: each refusal's reason, its order, which card a refusal
names, and that no stored row or trust state makes it raise.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from cards import keys, signed_code
from cards.batch import CodeStatus
from cards.card import Card, CardKind
from cards.evaluate import (
    CHECK,
    SCAN,
    Ask,
    Evaluation,
    Original,
    PaymentPass,
    Policy,
    Trusted,
    evaluate,
    evaluate_reverse,
)
from cards.rules import UNLIMITED_USES
from cards.verdict import Action, Outcome, Reason

NOW = 1_800_000_000  # 2027-01-15T08:00:00Z, a Friday
DAY = 86400
ROOT = bytes(range(32))
ISSUER = bytes(range(1, 33))
OTHER_ISSUER = bytes(range(2, 34))

COUPON = Card(card_id=1, merchant="demo", kind=CardKind.COUPON)
GIFT = Card(card_id=2, merchant="demo", kind=CardKind.GIFT, uses=None, balance=5000, two_phase=True)
MEMBER = Card(card_id=3, merchant="demo", kind=CardKind.MEMBER, uses=None)
WEEKENDS = Card(card_id=4, merchant="demo", kind=CardKind.COUPON, weekdays=frozenset({6, 7}))
FOREIGN = Card(card_id=5, merchant="other", kind=CardKind.COUPON)
CARDS = {card.card_id: card for card in (COUPON, GIFT, MEMBER, WEEKENDS, FOREIGN)}

DELEGATION = keys.delegate(
    ROOT, keys.public_of(ISSUER), ("demo",), NOW - 365 * DAY, NOW + 365 * DAY
)
TRUSTED = Trusted(cards=CARDS, issuers={DELEGATION.key_id: DELEGATION}, cache_time=NOW - DAY)
POLICY = Policy(
    merchant="demo",
    store="s1",
    pass_payment_codes=False,
    reject_stale=False,
    max_staleness=7 * DAY,
    zone=ZoneInfo("UTC"),
)
STRICT = Policy(
    merchant="demo",
    store="s1",
    pass_payment_codes=False,
    reject_stale=True,
    max_staleness=7 * DAY,
    zone=ZoneInfo("UTC"),
)


def row(card_id: int = 1, uses_left=None, balance=None, status=CodeStatus.ACTIVE) -> tuple:
    """A stored code row as storage.codes.LOOKUP returns it (0/NULL = the card's default;
    no account)."""
    return (card_id, 0, 0, uses_left, balance, status, None)


def refused(result) -> tuple[Reason | None, int | None]:
    assert isinstance(result, Evaluation), result
    assert result.decision.outcome is Outcome.REJECTED
    return result.decision.reason, result.card.card_id if result.card else None


def mint(card_id: int = 1, not_before: int = 0, not_after: int = 0, key: bytes = ISSUER) -> str:
    return signed_code.mint(key, card_id, 42, not_before, not_after)


# ---------------------------------------------------------------- listed codes


def test_a_listed_code_is_redeemed_under_its_card():
    result = evaluate("DEMO-0001", row(), TRUSTED, NOW, POLICY)
    assert result.card is COUPON and result.keeps_digest
    assert result.decision.outcome is Outcome.ACCEPTED
    assert result.decision.action is Action.REDEEM and result.decision.changed
    assert result.decision.uses_left == 0 and result.decision.status == CodeStatus.CONSUMED


def test_a_check_changes_nothing():
    result = evaluate("DEMO-0001", row(), TRUSTED, NOW, POLICY, CHECK)
    assert result.decision.action is Action.CHECK and not result.decision.changed


def test_a_scan_of_a_two_phase_card_only_checks_and_a_redeem_needs_an_amount():
    assert evaluate("G-1", row(2), TRUSTED, NOW, POLICY).decision.action is Action.CHECK
    redeem = evaluate("G-1", row(2), TRUSTED, NOW, POLICY, Ask(Action.REDEEM, 1200))
    assert redeem.decision.action is Action.REDEEM and redeem.decision.balance == 3800
    assert refused(evaluate("G-1", row(2), TRUSTED, NOW, POLICY, Ask(Action.REDEEM))) == (
        Reason.AMOUNT_REQUIRED,
        2,
    )


def test_a_stored_unlimited_row_overrides_a_single_use_card():
    result = evaluate("X", row(uses_left=UNLIMITED_USES), TRUSTED, NOW, POLICY)
    assert result.decision.outcome is Outcome.ACCEPTED and result.decision.uses_left is None


def test_a_code_not_listed_is_unknown_code():
    assert refused(evaluate("NOPE-1", None, TRUSTED, NOW, POLICY)) == (Reason.UNKNOWN_CODE, None)


def test_a_listed_code_whose_card_is_not_cached_is_unknown_card():
    result = evaluate("X", row(99), TRUSTED, NOW, POLICY)
    assert refused(result) == (Reason.UNKNOWN_CARD, None)
    assert result.decision.detail == "card 99 is not in the cache"


def test_a_card_of_another_merchant_is_wrong_merchant_and_names_the_card():
    result = evaluate("X", row(5), TRUSTED, NOW, POLICY)
    assert refused(result) == (Reason.WRONG_MERCHANT, 5)
    assert result.decision.detail == "card belongs to merchant other"


def test_a_card_for_weekends_is_judged_in_the_boxs_time_zone():
    # Friday 16:00 UTC is already Saturday 01:00 in Tokyo.
    friday_late = NOW + 8 * 3600
    tokyo = Policy("demo", "s1", False, False, 7 * DAY, ZoneInfo("Asia/Tokyo"))
    assert refused(evaluate("W", row(4), TRUSTED, friday_late, POLICY)) == (
        Reason.OUTSIDE_HOURS,
        4,
    )
    assert evaluate("W", row(4), TRUSTED, friday_late, tokyo).decision.outcome is Outcome.ACCEPTED


# ---------------------------------------------------------------- cache age


def test_a_stale_cache_refuses_under_the_reject_policy_only():
    old = Trusted(CARDS, TRUSTED.issuers, cache_time=NOW - 8 * DAY)
    result = evaluate("DEMO-0001", row(), old, NOW, STRICT)
    assert refused(result) == (Reason.STALE_CACHE, 1)
    assert result.decision.detail.startswith("the cache was last known current 192 h ago")
    assert evaluate("DEMO-0001", row(), old, NOW, POLICY).decision.outcome is Outcome.ACCEPTED
    assert evaluate("DEMO-0001", row(), TRUSTED, NOW, STRICT).decision.outcome is Outcome.ACCEPTED


def test_a_cache_without_any_batch_is_stale():
    never = Trusted(CARDS, TRUSTED.issuers, cache_time=None)
    result = evaluate("DEMO-0001", row(), never, NOW, STRICT)
    assert refused(result) == (Reason.STALE_CACHE, 1)
    assert result.decision.detail == "no batch applied yet"


def test_wrong_merchant_is_said_before_a_stale_cache():
    old = Trusted(CARDS, TRUSTED.issuers, cache_time=None)
    assert refused(evaluate("X", row(5), old, NOW, STRICT)) == (Reason.WRONG_MERCHANT, 5)


def test_a_revoked_code_in_a_stale_cache_says_stale_cache():
    # The box cannot trust what its cache says about the code, revoked or not.
    old = Trusted(CARDS, TRUSTED.issuers, cache_time=None)
    result = evaluate("X", row(status=CodeStatus.REVOKED), old, NOW, STRICT)
    assert refused(result) == (Reason.STALE_CACHE, 1)


# ---------------------------------------------------------------- payment codes


def test_a_payment_code_is_passed_on_or_refused_without_its_digest():
    wechat = "134567890123456789"
    passing = Policy("demo", "s1", True, False, 7 * DAY, None)
    assert evaluate(wechat, None, TRUSTED, NOW, passing) == PaymentPass("wechat")
    result = evaluate(wechat, None, TRUSTED, NOW, POLICY)
    assert refused(result) == (Reason.PAYMENT_CODE, None) and not result.keeps_digest
    assert result.decision.detail == "wechat payment codes are not accepted here"


def test_a_listed_code_that_looks_like_a_payment_code_is_judged_as_listed():
    result = evaluate("134567890123456789", row(), TRUSTED, NOW, POLICY)
    assert result.decision.outcome is Outcome.ACCEPTED and result.keeps_digest


# ---------------------------------------------------------------- signed codes


def test_a_signed_code_not_yet_used_is_accepted_under_its_card():
    result = evaluate(mint(), None, TRUSTED, NOW, POLICY)
    assert result.card is COUPON and result.decision.outcome is Outcome.ACCEPTED
    assert result.decision.changed  # its first use lists it


def test_a_used_signed_code_is_judged_by_its_stored_row():
    used = row(uses_left=0, status=CodeStatus.CONSUMED)
    assert refused(evaluate(mint(), used, TRUSTED, NOW, POLICY)) == (Reason.ALREADY_REDEEMED, 1)


def test_a_signed_code_outside_its_signed_window_is_refused():
    code = mint(not_before=NOW + DAY, not_after=NOW + 2 * DAY)
    assert refused(evaluate(code, None, TRUSTED, NOW, POLICY)) == (Reason.NOT_YET_VALID, 1)


def test_a_signed_code_from_an_unknown_issuer_is_bad_signature():
    result = evaluate(mint(key=OTHER_ISSUER), None, TRUSTED, NOW, POLICY)
    assert refused(result) == (Reason.BAD_SIGNATURE, None)
    assert result.decision.detail.endswith("is not known here")


def test_a_tampered_signed_code_is_bad_signature():
    text = mint()
    tampered = text[:10] + ("A" if text[10] != "A" else "B") + text[11:]
    result = evaluate(tampered, None, TRUSTED, NOW, POLICY)
    assert refused(result) == (Reason.BAD_SIGNATURE, None)


def test_a_signed_code_valid_beyond_its_issuers_delegation_is_bad_signature():
    code = mint(not_after=DELEGATION.not_after + 1)
    result = evaluate(code, None, TRUSTED, NOW, POLICY)
    assert refused(result) == (Reason.BAD_SIGNATURE, None)
    assert result.decision.detail == "code is valid beyond its issuer key's delegation"


def test_a_signed_code_for_a_card_not_cached_is_unknown_card():
    assert refused(evaluate(mint(card_id=99), None, TRUSTED, NOW, POLICY)) == (
        Reason.UNKNOWN_CARD,
        None,
    )


def test_a_signed_code_for_a_merchant_its_issuer_may_not_sign_for_is_bad_signature():
    result = evaluate(mint(card_id=5), None, TRUSTED, NOW, POLICY)
    assert refused(result) == (Reason.BAD_SIGNATURE, None)
    assert result.decision.detail == "issuer key may not sign for this card's merchant"


def test_a_signed_looking_code_that_does_not_decode_is_malformed():
    broken = signed_code.PREFIX + "1" * (signed_code.TEXT_LENGTH - len(signed_code.PREFIX))
    assert refused(evaluate(broken, None, TRUSTED, NOW, POLICY)) == (Reason.MALFORMED, None)


# ---------------------------------------------------------------- reversals

LUNCH = Card(card_id=6, merchant="demo", kind=CardKind.COUPON, uses=3, reversal_window=600)
WITH_LUNCH = Trusted({**CARDS, 6: LUNCH}, TRUSTED.issuers, TRUSTED.cache_time)


def redeemed(**fields) -> Original:
    base = dict(
        action="redeem", verdict="accepted", card_id=6, at=NOW - 60, uses=1, amount=None,
        already_reversed=False,
    )  # fmt: skip
    return Original(**{**base, **fields})


def test_a_reversal_inside_the_window_gives_the_uses_back_and_is_recorded():
    result = evaluate_reverse(redeemed(uses=2), row(6, uses_left=1), WITH_LUNCH, NOW)
    assert result.recorded and result.card is LUNCH
    assert result.decision.action is Action.REVERSE and result.decision.uses_left == 3


def test_a_reversal_of_nothing_reversible_is_answered_but_not_recorded():
    for original in (None, redeemed(action="reject"), redeemed(verdict="rejected")):
        result = evaluate_reverse(original, row(6), WITH_LUNCH, NOW)
        assert refused(result) == (Reason.NOT_REVERSIBLE, None) and not result.recorded


def test_a_reversal_whose_card_or_code_is_gone_is_answered_but_not_recorded():
    for original, stored in ((redeemed(card_id=99), row(99)), (redeemed(), None)):
        result = evaluate_reverse(original, stored, WITH_LUNCH, NOW)
        assert refused(result) == (Reason.UNKNOWN_CARD, None) and not result.recorded


def test_a_reversal_refused_by_the_rules_is_recorded():
    late = evaluate_reverse(redeemed(at=NOW - 601), row(6, uses_left=2), WITH_LUNCH, NOW)
    assert refused(late) == (Reason.REVERSAL_WINDOW_PASSED, 6) and late.recorded
    twice = evaluate_reverse(redeemed(already_reversed=True), row(6), WITH_LUNCH, NOW)
    assert refused(twice) == (Reason.ALREADY_REVERSED, 6) and twice.recorded


# ---------------------------------------------------------------- never raises

small = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))
rows = st.one_of(
    st.none(),
    st.tuples(
        st.integers(-(2**31), 2**32),
        small,
        small,
        small,
        small,
        st.integers(-(2**31), 2**31),
        st.sampled_from([None, b"a" * 16]),  # linked to an account or not
    ),
)
# A linked code's account row (issue 13), or None: the account is not in the cache.
account_rows = st.one_of(
    st.none(),
    st.tuples(
        st.integers(-(2**31), 2**32), small, small, small, small, st.integers(-(2**31), 2**31)
    ),
)
texts = st.one_of(
    st.text(max_size=40),
    st.builds(
        mint,
        card_id=st.sampled_from([1, 2, 3, 4, 5, 99]),
        not_before=st.integers(0, 2**32 - 1),
        not_after=st.integers(0, 2**32 - 1),
        key=st.sampled_from([ISSUER, OTHER_ISSUER]),
    ),
)
asks = st.one_of(
    st.just(SCAN),
    st.builds(
        Ask,
        st.sampled_from([None, Action.CHECK, Action.REDEEM]),
        small,
        st.integers(-5, 2**31),
    ),
)
policies = st.builds(
    Policy,
    st.sampled_from(["demo", "other"]),
    st.sampled_from(["s1", "s2"]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 30 * DAY),
    st.sampled_from([None, ZoneInfo("UTC"), ZoneInfo("Pacific/Kiritimati")]),
)
trusts = st.builds(
    Trusted,
    st.dictionaries(st.sampled_from(sorted(CARDS)), st.sampled_from(list(CARDS.values()))),
    st.sampled_from([{}, TRUSTED.issuers]),
    st.one_of(st.none(), st.integers(0, 2**32)),
)


@settings(max_examples=400, deadline=None)
@given(texts, rows, trusts, st.integers(0, 2**32 - 1), policies, asks, account_rows)
def test_evaluate_never_raises_and_always_gives_a_reasoned_verdict(
    text, stored, trusted, now, policy, ask, account
):
    result = evaluate(text, stored, trusted, now, policy, ask, account)
    if isinstance(result, PaymentPass):
        assert policy.pass_payment_codes and stored is None
        return
    decision = result.decision
    if decision.outcome is Outcome.REJECTED:
        assert isinstance(decision.reason, Reason) and decision.detail
        assert decision.action is Action.REJECT and not decision.changed
    else:
        assert decision.reason is None and result.card is not None
        assert result.card.merchant == policy.merchant


originals = st.one_of(
    st.none(),
    st.builds(
        Original,
        st.sampled_from(["redeem", "check", "reverse", "reject"]),
        st.sampled_from(["accepted", "rejected"]),
        st.one_of(st.none(), st.integers(-(2**31), 2**32)),
        st.integers(0, 2**32),
        st.integers(1, 2**31),
        small,
        st.booleans(),
    ),
)


@settings(max_examples=200, deadline=None)
@given(originals, rows, trusts, st.integers(0, 2**32 - 1))
def test_evaluate_reverse_never_raises(original, stored, trusted, now):
    decision = evaluate_reverse(original, stored, trusted, now).decision
    assert decision.outcome is Outcome.ACCEPTED or isinstance(decision.reason, Reason)
