"""cards.rules: the admission decision from plain values, and cards.card template parsing."""

from __future__ import annotations

import dataclasses

import pytest

from cards.batch import CodeStatus
from cards.card import Card, CardError, CardKind, parse_card
from cards.rules import (
    UNLIMITED_USES,
    CodeState,
    Context,
    Redeemed,
    decide,
    decide_reverse,
    resolve,
)
from cards.verdict import Action, Outcome, Reason

NOW = 1_800_000_000
MONDAY, SATURDAY = 1, 6


def _card(**fields) -> Card:
    return Card(**{"card_id": 1, "merchant": "demo", "kind": CardKind.COUPON, **fields})


def _ctx(**fields) -> Context:
    return Context(
        **{"now": NOW, "weekday": MONDAY, "minute_of_day": 12 * 60, "store": "s1", **fields}
    )


def _gift(**fields) -> Card:
    return _card(
        **{"kind": CardKind.GIFT, "uses": None, "balance": 5000, "two_phase": True, **fields}
    )


def _accepted(decision) -> bool:
    return decision.outcome is Outcome.ACCEPTED and decision.reason is None


# ------------------------------------------------------------------ uses


def test_single_use_code_is_accepted_once_and_then_consumed():
    card = _card(uses=1)
    first = decide(card, CodeState(uses_left=1), _ctx())
    assert _accepted(first)
    assert first.action is Action.REDEEM
    assert first.uses_left == 0
    assert first.status == CodeStatus.CONSUMED
    assert first.changed is True

    again = decide(card, CodeState(status=first.status, uses_left=first.uses_left), _ctx())
    assert again.outcome is Outcome.REJECTED
    assert again.reason is Reason.ALREADY_REDEEMED
    assert again.action is Action.REJECT
    assert again.changed is False


def test_code_with_n_uses_counts_down_to_zero():
    card = _card(uses=3)
    state = CodeState(uses_left=3)
    seen = []
    for _ in range(3):
        decision = decide(card, state, _ctx())
        assert _accepted(decision)
        seen.append(decision.uses_left)
        state = CodeState(status=decision.status, uses_left=decision.uses_left)
    assert seen == [2, 1, 0]
    assert state.status == CodeStatus.CONSUMED
    assert decide(card, state, _ctx()).reason is Reason.ALREADY_REDEEMED


def test_code_with_uses_left_stays_active():
    decision = decide(_card(uses=3), CodeState(uses_left=3), _ctx())
    assert decision.status == CodeStatus.ACTIVE


def test_redeeming_several_uses_at_once_takes_them_all():
    decision = decide(_card(uses=5), CodeState(uses_left=5), _ctx(uses=3))
    assert _accepted(decision)
    assert decision.uses_left == 2


def test_redeeming_more_uses_than_left_is_refused():
    decision = decide(_card(uses=5), CodeState(uses_left=2), _ctx(uses=3))
    assert decision.reason is Reason.ALREADY_REDEEMED
    assert decision.uses_left == 2


def test_unlimited_code_is_accepted_every_time_and_stays_unlimited():
    card = _card(kind=CardKind.MEMBER, uses=None)
    state = CodeState(uses_left=None)
    for _ in range(20):
        decision = decide(card, state, _ctx())
        assert _accepted(decision)
        assert decision.uses_left is None
        assert decision.status == CodeStatus.ACTIVE
        state = CodeState(status=decision.status, uses_left=decision.uses_left)


def test_zero_uses_left_is_already_redeemed_even_if_status_is_active():
    decision = decide(_card(), CodeState(status=CodeStatus.ACTIVE, uses_left=0), _ctx())
    assert decision.reason is Reason.ALREADY_REDEEMED


# ------------------------------------------------------------------ stored value


def test_stored_value_redemption_without_amount_is_refused():
    decision = decide(_gift(), CodeState(uses_left=None, balance=5000), _ctx(amount=None))
    assert decision.reason is Reason.AMOUNT_REQUIRED
    assert decision.balance == 5000


@pytest.mark.parametrize("amount", [0, -100])
def test_stored_value_redemption_with_non_positive_amount_is_refused(amount):
    decision = decide(_gift(), CodeState(uses_left=None, balance=5000), _ctx(amount=amount))
    assert decision.reason is Reason.AMOUNT_REQUIRED


def test_stored_value_redemption_decreases_the_balance():
    state = CodeState(uses_left=None, balance=5000)
    first = decide(_gift(), state, _ctx(amount=1200))
    assert _accepted(first)
    assert first.action is Action.REDEEM
    assert first.balance == 3800
    assert first.changed is True
    second = decide(_gift(), CodeState(uses_left=None, balance=first.balance), _ctx(amount=800))
    assert second.balance == 3000


def test_stored_value_can_be_spent_to_exactly_zero():
    decision = decide(_gift(), CodeState(uses_left=None, balance=5000), _ctx(amount=5000))
    assert _accepted(decision)
    assert decision.balance == 0


def test_stored_value_redemption_above_balance_is_refused():
    decision = decide(_gift(), CodeState(uses_left=None, balance=500), _ctx(amount=501))
    assert decision.reason is Reason.INSUFFICIENT_BALANCE
    assert decision.balance == 500
    assert decision.changed is False


def test_stored_value_without_any_balance_is_insufficient():
    decision = decide(_gift(balance=None), CodeState(uses_left=None, balance=None), _ctx(amount=1))
    assert decision.reason is Reason.INSUFFICIENT_BALANCE


def test_stored_value_check_reports_balance_without_changing_it():
    decision = decide(
        _gift(), CodeState(uses_left=None, balance=5000), _ctx(action=Action.CHECK, amount=None)
    )
    assert _accepted(decision)
    assert decision.action is Action.CHECK
    assert decision.balance == 5000
    assert decision.changed is False


# ------------------------------------------------------------------ check action


def test_check_does_not_use_up_a_single_use_code():
    state = CodeState(uses_left=1)
    decision = decide(_card(uses=1), state, _ctx(action=Action.CHECK))
    assert _accepted(decision)
    assert decision.action is Action.CHECK
    assert decision.uses_left == 1
    assert decision.changed is False
    assert decision.status == CodeStatus.ACTIVE


def test_check_still_refuses_a_consumed_code():
    state = CodeState(status=CodeStatus.CONSUMED, uses_left=0)
    decision = decide(_card(), state, _ctx(action=Action.CHECK))
    assert decision.reason is Reason.ALREADY_REDEEMED


# ------------------------------------------------------------------ windows


def test_code_before_its_window_is_not_yet_valid():
    decision = decide(_card(), CodeState(not_before=NOW + 1), _ctx())
    assert decision.reason is Reason.NOT_YET_VALID


def test_code_after_its_window_is_expired():
    decision = decide(_card(), CodeState(not_after=NOW - 1), _ctx())
    assert decision.reason is Reason.EXPIRED


def test_code_at_both_edges_of_its_window_is_accepted():
    assert _accepted(decide(_card(), CodeState(not_before=NOW, not_after=NOW + 10), _ctx()))
    assert _accepted(decide(_card(), CodeState(not_before=NOW - 10, not_after=NOW), _ctx()))


def test_code_at_another_store_is_wrong_store():
    card = _card(stores=frozenset({"s2", "s3"}))
    assert decide(card, CodeState(), _ctx(store="s1")).reason is Reason.WRONG_STORE
    assert _accepted(decide(card, CodeState(), _ctx(store="s3")))


def test_card_without_stores_is_valid_at_every_store():
    assert _accepted(decide(_card(), CodeState(), _ctx(store="anywhere")))


def test_card_on_another_weekday_is_outside_hours():
    card = _card(weekdays=frozenset({MONDAY, 2, 3, 4, 5}))
    decision = decide(card, CodeState(), _ctx(weekday=SATURDAY))
    assert decision.reason is Reason.OUTSIDE_HOURS
    assert "weekday" in decision.detail
    assert _accepted(decide(card, CodeState(), _ctx(weekday=MONDAY)))


def test_card_outside_its_hours_is_outside_hours():
    card = _card(hours=((9 * 60, 11 * 60), (14 * 60, 17 * 60 + 30)))
    for minute in (0, 9 * 60 - 1, 11 * 60, 12 * 60, 17 * 60 + 30, 23 * 60 + 59):
        decision = decide(card, CodeState(), _ctx(minute_of_day=minute))
        assert decision.reason is Reason.OUTSIDE_HOURS, minute
    for minute in (9 * 60, 10 * 60 + 59, 14 * 60, 17 * 60 + 29):
        assert _accepted(decide(card, CodeState(), _ctx(minute_of_day=minute))), minute


# ------------------------------------------------------------------ precedence


def test_revoked_wins_over_expired():
    state = CodeState(status=CodeStatus.REVOKED, not_after=NOW - 100)
    assert decide(_card(), state, _ctx()).reason is Reason.REVOKED


def test_revoked_wins_over_blocked_consumed_and_wrong_store():
    card = _card(stores=frozenset({"elsewhere"}))
    state = CodeState(status=CodeStatus.REVOKED, uses_left=0)
    assert decide(card, state, _ctx()).reason is Reason.REVOKED


def test_blocked_wins_over_consumed_and_expired():
    state = CodeState(status=CodeStatus.BLOCKED, uses_left=0, not_after=NOW - 1)
    assert decide(_card(), state, _ctx()).reason is Reason.BLOCKED


def test_already_redeemed_wins_over_wrong_store_and_expired():
    card = _card(stores=frozenset({"elsewhere"}))
    state = CodeState(status=CodeStatus.CONSUMED, uses_left=0, not_after=NOW - 1)
    assert decide(card, state, _ctx()).reason is Reason.ALREADY_REDEEMED


def test_wrong_store_wins_over_expired():
    card = _card(stores=frozenset({"elsewhere"}))
    assert decide(card, CodeState(not_after=NOW - 1), _ctx()).reason is Reason.WRONG_STORE


def test_expired_wins_over_outside_hours():
    card = _card(weekdays=frozenset({2}))
    state = CodeState(not_after=NOW - 1)
    assert decide(card, state, _ctx(weekday=MONDAY)).reason is Reason.EXPIRED


def test_outside_hours_wins_over_missing_amount():
    card = _gift(hours=((9 * 60, 10 * 60),))
    state = CodeState(uses_left=None, balance=100)
    assert decide(card, state, _ctx(minute_of_day=0)).reason is Reason.OUTSIDE_HOURS


def test_refusal_keeps_the_code_state_unchanged():
    state = CodeState(status=CodeStatus.BLOCKED, uses_left=2, balance=None)
    decision = decide(_card(uses=2), state, _ctx())
    assert decision.status == CodeStatus.BLOCKED
    assert decision.uses_left == 2
    assert decision.changed is False


# ------------------------------------------------------------------ resolve


def test_resolve_uses_the_cards_defaults_for_null_and_zero():
    card = _card(uses=3, valid_from=NOW - 10, valid_until=NOW + 10)
    state = resolve(card, CodeStatus.ACTIVE, 0, None, None, None)
    assert (state.uses_left, state.not_before, state.not_after) == (3, NOW - 10, NOW + 10)


def test_resolve_keeps_a_codes_own_window_and_uses():
    card = _card(uses=3, valid_from=NOW - 10, valid_until=NOW + 10)
    state = resolve(card, CodeStatus.ACTIVE, NOW - 5, NOW + 5, 1, None)
    assert (state.uses_left, state.not_before, state.not_after) == (1, NOW - 5, NOW + 5)


def test_resolve_stored_unlimited_marker_means_unlimited():
    state = resolve(_card(uses=1), CodeStatus.ACTIVE, None, None, UNLIMITED_USES, None)
    assert state.uses_left is None


def test_resolve_zero_balance_is_kept_not_replaced_by_the_default():
    state = resolve(_gift(), CodeStatus.ACTIVE, None, None, None, 0)
    assert state.balance == 0
    assert resolve(_gift(), CodeStatus.ACTIVE, None, None, None, None).balance == 5000


# ------------------------------------------------------------------ reversal


def _redeemed(at: int = NOW - 60, uses: int = 1, amount: int | None = None, reversed_=False):
    return Redeemed(at=at, uses=uses, amount=amount, already_reversed=reversed_)


def test_reversal_within_window_restores_the_uses():
    card = _card(uses=1, reversal_window=600)
    state = CodeState(status=CodeStatus.CONSUMED, uses_left=0)
    decision = decide_reverse(card, state, _redeemed(at=NOW - 600), NOW)
    assert _accepted(decision)
    assert decision.action is Action.REVERSE
    assert decision.uses_left == 1
    assert decision.status == CodeStatus.ACTIVE
    assert decision.changed is True


def test_reversal_of_several_uses_restores_them_all():
    card = _card(uses=5, reversal_window=600)
    decision = decide_reverse(card, CodeState(uses_left=1), _redeemed(uses=3), NOW)
    assert decision.uses_left == 4


def test_reversal_of_unlimited_code_stays_unlimited():
    card = _card(kind=CardKind.MEMBER, uses=None, reversal_window=600)
    decision = decide_reverse(card, CodeState(uses_left=None), _redeemed(), NOW)
    assert _accepted(decision)
    assert decision.uses_left is None


def test_reversal_of_stored_value_restores_the_amount():
    card = _gift(reversal_window=600)
    state = CodeState(uses_left=None, balance=3800)
    decision = decide_reverse(card, state, _redeemed(amount=1200), NOW)
    assert _accepted(decision)
    assert decision.balance == 5000


def test_reversal_after_window_is_refused():
    card = _card(reversal_window=600)
    state = CodeState(status=CodeStatus.CONSUMED, uses_left=0)
    decision = decide_reverse(card, state, _redeemed(at=NOW - 601), NOW)
    assert decision.reason is Reason.REVERSAL_WINDOW_PASSED
    assert decision.uses_left == 0
    assert decision.changed is False


def test_reversal_of_card_without_window_is_not_reversible():
    card = _card(reversal_window=0)
    decision = decide_reverse(card, CodeState(uses_left=0), _redeemed(at=NOW), NOW)
    assert decision.reason is Reason.NOT_REVERSIBLE


def test_reversal_twice_is_already_reversed():
    card = _card(reversal_window=600)
    decision = decide_reverse(card, CodeState(uses_left=1), _redeemed(reversed_=True), NOW)
    assert decision.reason is Reason.ALREADY_REVERSED


def test_already_reversed_wins_over_window_passed():
    card = _card(reversal_window=600)
    original = _redeemed(at=NOW - 10_000, reversed_=True)
    assert decide_reverse(card, CodeState(), original, NOW).reason is Reason.ALREADY_REVERSED


@pytest.mark.parametrize(
    ("status", "reason"),
    [(CodeStatus.REVOKED, Reason.REVOKED), (CodeStatus.BLOCKED, Reason.BLOCKED)],
)
def test_reversal_of_withdrawn_code_is_refused(status, reason):
    card = _card(reversal_window=600)
    decision = decide_reverse(card, CodeState(status=status, uses_left=0), _redeemed(), NOW)
    assert decision.reason is reason
    assert decision.status == status


# ------------------------------------------------------------------ card templates


def test_minimal_coupon_template_gets_single_use_defaults():
    card = parse_card({"id": 7, "merchant": "demo", "kind": "coupon"})
    assert card == Card(card_id=7, merchant="demo", kind=CardKind.COUPON)
    assert card.uses == 1
    assert card.two_phase is False


def test_full_template_parses_every_field():
    card = parse_card(
        {
            "id": 9,
            "merchant": "demo",
            "kind": "ticket",
            "title": "Entry",
            "uses": 2,
            "stores": ["s1", "s2"],
            "weekdays": [6, 7],
            "hours": ["09:00-12:00", "13:30-24:00"],
            "valid_from": 10,
            "valid_until": 20,
            "two_phase": True,
            "reversal_window": 300,
        }
    )
    assert card.uses == 2
    assert card.stores == frozenset({"s1", "s2"})
    assert card.weekdays == frozenset({6, 7})
    assert card.hours == ((540, 720), (810, 1440))
    assert (card.valid_from, card.valid_until) == (10, 20)
    assert card.two_phase is True
    assert card.reversal_window == 300


@pytest.mark.parametrize("kind", ["gift", "stored_value"])
def test_balance_kinds_default_to_unlimited_uses_and_two_phase(kind):
    card = parse_card({"id": 1, "merchant": "demo", "kind": kind, "balance": 100})
    assert card.uses is None
    assert card.two_phase is True
    assert card.uses_balance is True


def test_member_card_defaults_to_unlimited_uses():
    assert parse_card({"id": 1, "merchant": "demo", "kind": "member"}).uses is None


def test_null_uses_means_unlimited():
    assert parse_card({"id": 1, "merchant": "demo", "kind": "coupon", "uses": None}).uses is None


BASE = {"id": 1, "merchant": "demo", "kind": "coupon"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"colour": "red"}, "unknown fields"),
        ({"id": None}, "'id'"),
        ({"id": "1"}, "'id'"),
        ({"id": -1}, "'id'"),
        ({"id": True}, "'id'"),
        ({"kind": "voucher"}, "kind"),
        ({"kind": None}, "kind"),
        ({"merchant": ""}, "merchant"),
        ({"merchant": 5}, "merchant"),
        ({"uses": 0}, "uses"),
        ({"uses": -2}, "uses"),
        ({"uses": 1.5}, "uses"),
        ({"uses": True}, "uses"),
        ({"uses": "3"}, "uses"),
        ({"hours": ["9-17"]}, "hours"),
        ({"hours": ["09:00"]}, "hours"),
        ({"hours": ["09:00-25:00"]}, "hours"),
        ({"hours": ["aa:bb-cc:dd"]}, "hours"),
        ({"hours": [900]}, "hours"),
        ({"hours": 5}, "hours"),
        ({"weekdays": [0]}, "weekdays"),
        ({"weekdays": [8]}, "weekdays"),
        ({"weekdays": "1"}, "weekdays"),
        ({"stores": "s1"}, "stores"),
        ({"stores": [1]}, "stores"),
        ({"two_phase": "yes"}, "two_phase"),
        ({"two_phase": 1}, "two_phase"),
        ({"balance": -5}, "'balance'"),
        ({"balance": 1.5}, "'balance'"),
        ({"valid_from": "2024"}, "'valid_from'"),
        ({"valid_until": -1}, "'valid_until'"),
        ({"reversal_window": "600"}, "'reversal_window'"),
    ],
)
def test_template_with_bad_field_is_refused_naming_the_field(change, field):
    with pytest.raises(CardError, match=field):
        parse_card({**BASE, **change})


def test_card_error_is_a_value_error():
    assert issubclass(CardError, ValueError)


def test_card_is_frozen():
    card = parse_card(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.uses = 5  # type: ignore[misc]


def test_hours_window_past_midnight_admits_late_and_early_minutes():
    from cards.card import parse_card

    card = parse_card({"id": 9, "merchant": "demo", "kind": "coupon", "hours": ["22:00-02:00"]})
    code = CodeState(uses_left=1)
    at = {m: decide(card, code, Context(NOW, 1, m, "s")) for m in (23 * 60, 60, 12 * 60)}
    assert at[23 * 60].outcome.value == "accepted"
    assert at[60].outcome.value == "accepted"
    assert at[12 * 60].reason.value == "outside_hours"


def test_card_with_minute_60_or_boolean_weekday_is_refused():
    from cards.card import CardError, parse_card

    with pytest.raises(CardError):
        parse_card({"id": 9, "merchant": "demo", "kind": "coupon", "hours": ["09:60-10:00"]})
    with pytest.raises(CardError):
        parse_card({"id": 9, "merchant": "demo", "kind": "coupon", "weekdays": [True]})
