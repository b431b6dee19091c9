"""The whole admission decision for one code, from plain values, with no I/O.

Like pretix's check-in service, every refusal carries one machine reason from the
closed list in `cards.verdict.Reason` and a sentence for a human. The order of the
checks is part of the contract (docs/reasons.md): a revoked code says `revoked` even
when it is also expired, because that is what the cashier must act on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cards.batch import CodeStatus
from cards.card import Card, Limit
from cards.verdict import Action, Outcome, Reason

# Stored uses_left value that means unlimited (NULL means "the card's default").
UNLIMITED_USES = -1


@dataclass(frozen=True)
class CodeState:
    """A code's state with the card's defaults already applied."""

    status: int = CodeStatus.ACTIVE
    not_before: int | None = None
    not_after: int | None = None
    uses_left: int | None = 1
    """None means unlimited."""
    balance: int | None = None


# Not frozen: a Context is built for one decision and never kept or shared, and a
# frozen dataclass's __init__ costs about a microsecond more on every scan.
@dataclass(slots=True)
class Context:
    now: int
    """Unix seconds, never earlier than the box's time floor."""
    weekday: int
    """ISO weekday in the box's time zone."""
    minute_of_day: int
    store: str
    action: Action = Action.REDEEM
    amount: int | None = None
    uses: int = 1


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    action: Action
    reason: Reason | None = None
    detail: str = ""
    uses_left: int | None = None
    balance: int | None = None
    status: int = CodeStatus.ACTIVE
    changed: bool = False
    """True when the code's stored state must be updated."""


def resolve(
    card: Card,
    status: int,
    not_before: int | None,
    not_after: int | None,
    uses_left: int | None,
    balance: int | None,
) -> CodeState:
    """Apply the card's defaults to a stored code row (NULL/0 = the card's value)."""
    if uses_left is None:
        uses = card.uses
    elif uses_left == UNLIMITED_USES:
        uses = None
    else:
        uses = uses_left
    return _code_state(
        status,
        not_before or card.valid_from,
        not_after or card.valid_until,
        uses,
        card.balance if balance is None else balance,
    )


# Both are immutable, and on the scan path the same few values recur: every fresh
# single-use code resolves to the same CodeState, and every first redemption of one is
# the same Decision. Sharing them saves building a frozen dataclass (about a
# microsecond each) per scan.
@functools.lru_cache(maxsize=256)
def _code_state(
    status: int,
    not_before: int | None,
    not_after: int | None,
    uses_left: int | None,
    balance: int | None,
) -> CodeState:
    return CodeState(status, not_before, not_after, uses_left, balance)


@functools.lru_cache(maxsize=256)
def _accept(action: Action, uses_left: int | None, balance: int | None, status: int) -> Decision:
    """An acceptance: a check changes nothing, a redemption changes the code's state."""
    changed = action is not Action.CHECK
    return Decision(Outcome.ACCEPTED, action, None, "", uses_left, balance, status, changed)


def _refuse(code: CodeState, reason: Reason, detail: str) -> Decision:
    return Decision(
        Outcome.REJECTED, Action.REJECT, reason, detail, code.uses_left, code.balance, code.status
    )


def decide(card: Card, code: CodeState, ctx: Context) -> Decision:
    """Verdict for a check or a redemption of `code` under `card` in `ctx`."""
    if code.status == CodeStatus.REVOKED:
        return _refuse(code, Reason.REVOKED, "this code was revoked by the issuer")
    if code.status == CodeStatus.BLOCKED:
        return _refuse(code, Reason.BLOCKED, "this code is blocked; ask the issuer")
    if code.status == CodeStatus.TRANSFERRED:
        return _refuse(code, Reason.TRANSFERRED, "this code was given to another code")
    if code.status == CodeStatus.CONSUMED or code.uses_left == 0:
        return _refuse(code, Reason.ALREADY_REDEEMED, "this code has no uses left")
    if card.stores and ctx.store not in card.stores:
        return _refuse(code, Reason.WRONG_STORE, f"not valid at store {ctx.store}")
    if code.not_before is not None and ctx.now < code.not_before:
        return _refuse(code, Reason.NOT_YET_VALID, f"valid from {code.not_before}")
    if code.not_after is not None and ctx.now > code.not_after:
        return _refuse(code, Reason.EXPIRED, f"expired at {code.not_after}")
    if card.weekdays and ctx.weekday not in card.weekdays:
        return _refuse(code, Reason.OUTSIDE_HOURS, "not valid on this weekday")
    if card.hours and not any(_in_window(ctx.minute_of_day, w) for w in card.hours):
        return _refuse(code, Reason.OUTSIDE_HOURS, "not valid at this time of day")

    if card.uses_balance:
        if ctx.action is Action.CHECK:
            return _accept(Action.CHECK, code.uses_left, code.balance, CodeStatus.ACTIVE)
        if ctx.amount is None or ctx.amount <= 0:
            return _refuse(
                code, Reason.AMOUNT_REQUIRED, "a stored-value redemption needs an amount"
            )
        balance = code.balance or 0
        if ctx.amount > balance:
            return _refuse(
                code, Reason.INSUFFICIENT_BALANCE, f"balance {balance} is less than {ctx.amount}"
            )
        return Decision(
            Outcome.ACCEPTED,
            Action.REDEEM,
            uses_left=code.uses_left,
            balance=balance - ctx.amount,
            status=code.status,
            changed=True,
        )

    uses = max(ctx.uses, 1)
    if code.uses_left is not None and uses > code.uses_left:
        return _refuse(code, Reason.ALREADY_REDEEMED, f"only {code.uses_left} uses left")
    if ctx.action is Action.CHECK:
        return _accept(Action.CHECK, code.uses_left, code.balance, CodeStatus.ACTIVE)
    left = None if code.uses_left is None else code.uses_left - uses
    status = CodeStatus.CONSUMED if left == 0 else CodeStatus.ACTIVE
    return _accept(Action.REDEEM, left, code.balance, status)


def within_limit(
    card: Card, decision: Decision, amount: int | None, uses: int, limit: Limit, spent: int
) -> Decision:
    """`decision` unless it accepts a redemption past `limit` (protocol.md 19.5): what it
    takes (minor units for balance cards, uses for the others) over `per_redemption`, or
    `spent` (this box's unacknowledged spend on the account) plus it over `per_account`,
    is refused `offline_limit`, showing the state before the redemption."""
    if decision.outcome is not Outcome.ACCEPTED or decision.action is not Action.REDEEM:
        return decision
    if card.uses_balance:
        asked, unit = amount or 0, "minor units"
    else:
        asked, unit = max(uses, 1), "uses"
    if limit.per_redemption is not None and asked > limit.per_redemption:
        detail = (
            f"{asked} {unit} is over this box's offline limit of {limit.per_redemption} per "
            "redemption"
        )
    elif limit.per_account is not None and spent + asked > limit.per_account:
        detail = (
            f"{spent} {unit} accepted here and not yet acknowledged by the backend plus "
            f"{asked} is over this box's offline limit of {limit.per_account} per account"
        )
    else:
        return decision
    uses_left, balance = decision.uses_left, decision.balance
    if card.uses_balance:
        balance = (balance or 0) + asked
    elif uses_left is not None:
        uses_left += asked
    return Decision(
        Outcome.REJECTED,
        Action.REJECT,
        Reason.OFFLINE_LIMIT,
        detail,
        uses_left,
        balance,
        CodeStatus.ACTIVE,
    )


@dataclass(frozen=True)
class Redeemed:
    """What the ledger says about the redemption being reversed."""

    at: int
    uses: int
    amount: int | None
    already_reversed: bool


def decide_reverse(card: Card, code: CodeState, original: Redeemed, now: int) -> Decision:
    """Undo a redemption within the card's reversal window; restores uses or balance."""

    def refuse(reason: Reason, detail: str) -> Decision:
        return Decision(
            Outcome.REJECTED,
            Action.REJECT,
            reason,
            detail,
            code.uses_left,
            code.balance,
            code.status,
        )

    if original.already_reversed:
        return refuse(Reason.ALREADY_REVERSED, "this redemption was already reversed")
    if card.reversal_window <= 0:
        return refuse(Reason.NOT_REVERSIBLE, "this card does not allow reversals")
    if now > original.at + card.reversal_window:
        return refuse(
            Reason.REVERSAL_WINDOW_PASSED,
            f"reversals are allowed for {card.reversal_window} s after redemption",
        )
    if code.status in (CodeStatus.REVOKED, CodeStatus.BLOCKED):
        return refuse(
            Reason.REVOKED if code.status == CodeStatus.REVOKED else Reason.BLOCKED,
            "the code was withdrawn after it was redeemed",
        )
    if code.status == CodeStatus.TRANSFERRED:
        # Its value now lives in another code: giving it back here would create value.
        return refuse(
            Reason.TRANSFERRED, "the code was given to another code after it was redeemed"
        )
    if card.uses_balance:
        return Decision(
            Outcome.ACCEPTED,
            Action.REVERSE,
            uses_left=code.uses_left,
            balance=(code.balance or 0) + (original.amount or 0),
            status=CodeStatus.ACTIVE,
            changed=True,
        )
    left = None if code.uses_left is None else code.uses_left + original.uses
    return Decision(
        Outcome.ACCEPTED,
        Action.REVERSE,
        uses_left=left,
        balance=code.balance,
        status=CodeStatus.ACTIVE,
        changed=True,
    )


def _in_window(minute: int, window: tuple[int, int]) -> bool:
    """[start, end) in minutes; a window whose end is before its start wraps past
    midnight ("22:00-02:00" for a bar's late offer)."""
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end
