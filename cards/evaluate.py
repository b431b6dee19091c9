"""The verdict for one scanned code, from what the box looked up: no I/O, no clock.

`cards.rules.decide` judges a code against its card. Before that, a code must be one
the box may judge at all: a signed code's signature, issuer and delegation; a card
the cache knows; this box's merchant; a cache recent enough to trust (stale_policy
"reject"). `evaluate` makes all of those checks in their documented order
(docs/reasons.md) and then hands over to `decide`, so the whole verdict is one pure
function of (code text, the code's stored row, what the box trusts, time, policy).
The engine around it does the I/O: look up, evaluate, record, answer.

Every refusal carries a reason from the closed `Reason` list. `evaluate` never raises
for any stored row or trust state: a code that cannot be judged is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, tzinfo

from cards import signed_code
from cards.batch import CodeStatus
from cards.card import Card, Limit
from cards.classify import payment_scheme
from cards.keys import Delegation
from cards.rules import (
    CodeState,
    Context,
    Decision,
    Redeemed,
    decide,
    decide_reverse,
    resolve,
    within_limit,
)
from cards.verdict import Action, Outcome, Reason

CodeRow = tuple[int, "int | None", "int | None", "int | None", "int | None", int, "bytes | None"]
"""A code's stored row as `storage.codes.LOOKUP` selects it: card_id, not_before,
not_after, uses_left, balance, status (NULL/0 = the card's default), account (the id of
the account it is linked to, or NULL)."""
AccountRow = tuple[int, "int | None", "int | None", "int | None", "int | None", int]
"""An account's stored row as `storage.codes.ACCOUNT_LOOKUP` selects it: card_id,
not_before, not_after, uses_left, balance, status (docs/protocol.md 19.1)."""
# A code's own status that outranks its account's (protocol.md 19.2).
_CODE_FIRST = frozenset({CodeStatus.REVOKED, CodeStatus.BLOCKED, CodeStatus.TRANSFERRED})


@dataclass(frozen=True, slots=True)
class Policy:
    """The box's configuration that a verdict depends on."""

    merchant: str
    store: str
    pass_payment_codes: bool
    """True: a wallet payment code goes to the POS app; False: it is refused."""
    reject_stale: bool
    """stale_policy = "reject": refuse every code while the cache is older than
    `max_staleness` seconds."""
    max_staleness: float
    zone: tzinfo | None
    """Time zone for a card's weekdays and hours; None means the system's local time."""


@dataclass(frozen=True, slots=True)
class Trusted:
    """What the box trusts now, read from its database when a batch changes it."""

    cards: Mapping[int, Card]
    issuers: Mapping[str, Delegation]
    cache_time: int | None = None
    """When the cache was last known current (newest applied manifest or batch);
    None before the first batch."""


@dataclass(frozen=True, slots=True)
class Ask:
    """What the caller asks for: a scan (action None: redeem, or check for a two-phase
    card), a check, or a redemption of `uses` uses or of `amount` minor units."""

    action: Action | None = None
    amount: int | None = None
    uses: int = 1


SCAN = Ask()
CHECK = Ask(Action.CHECK)


# Not frozen, as rules.Context and Verdict: an Evaluation is built for one scan and only
# read after, and a frozen dataclass's __init__ (object.__setattr__ per field) costs
# about a microsecond more on every scan, cold after the last fsync.
@dataclass(slots=True)
class Evaluation:
    """A decision and the card it was made under (None when no card was found)."""

    decision: Decision
    card: Card | None = None
    keeps_digest: bool = True
    """False for a refused payment code: its digest would identify a customer's
    payment code, so the record keeps none."""
    recorded: bool = True
    """False for a reversal refused before anything it names was found (no accepted
    redemption with that id, or its card or code gone): answered, not recorded."""
    account: bytes | None = None
    """The account a linked code spends (its record names it), None for other codes."""


@dataclass(frozen=True, slots=True)
class PaymentPass:
    """A wallet payment code to hand to the POS app; never stored or recorded."""

    scheme: str


def refusal(reason: Reason, detail: str) -> Decision:
    """A refusal made before any code state is known (no uses or balance to show)."""
    return Decision(Outcome.REJECTED, Action.REJECT, reason, detail)


def _refused(
    reason: Reason, detail: str, card: Card | None = None, account: bytes | None = None
) -> Evaluation:
    return Evaluation(
        Decision(Outcome.REJECTED, Action.REJECT, reason, detail), card, account=account
    )


def linked_row(row: CodeRow, account: AccountRow) -> AccountRow:
    """A linked code judged through its account (protocol.md 19.2): the account's card,
    uses and balance; both windows (the later start, the earlier end; 0/NULL = the
    card's); the code's own revoked, blocked or transferred status first, else the
    account's status."""
    card_id, not_before, not_after, uses_left, balance, status = account
    if row[1] and (not not_before or row[1] > not_before):
        not_before = row[1]
    if row[2] and (not not_after or row[2] < not_after):
        not_after = row[2]
    if row[5] in _CODE_FIRST:
        status = row[5]
    return card_id, not_before, not_after, uses_left, balance, status


def evaluate(
    text: str,
    row: CodeRow | None,
    trusted: Trusted,
    now: int,
    policy: Policy,
    ask: Ask = SCAN,
    account: AccountRow | None = None,
) -> Evaluation | PaymentPass:
    """The verdict for normalised code `text` whose stored row is `row` (None: not
    listed), at `now` (Unix seconds, already floored at the time floor). A linked code
    (row's account set) is judged through `account`, its account's row as the engine
    read it (None: the account is not in the cache)."""
    linked = None
    if row is not None and row[6] is not None:
        linked = row[6]
        if account is None:
            return _refused(Reason.UNKNOWN_CODE, "the code's account is not in the cache")
    if signed_code.looks_signed(text):
        found = _signed(text, row, trusted, account)
        if isinstance(found, Evaluation):
            return found
        card, state = found
    elif row is None:
        scheme = payment_scheme(text)
        if scheme is None:
            return _refused(Reason.UNKNOWN_CODE, "code is not in the cache")
        if policy.pass_payment_codes:
            return PaymentPass(scheme)
        detail = f"{scheme} payment codes are not accepted here"
        return Evaluation(refusal(Reason.PAYMENT_CODE, detail), None, keeps_digest=False)
    else:
        if linked is None:
            card_id, not_before, not_after, uses_left, balance, status, _ = row
        else:
            assert account is not None
            card_id, not_before, not_after, uses_left, balance, status = linked_row(row, account)
        listed = trusted.cards.get(card_id)
        if listed is None:
            return _refused(
                Reason.UNKNOWN_CARD, f"card {card_id} is not in the cache", None, linked
            )
        card = listed
        state = resolve(card, status, not_before, not_after, uses_left, balance)

    if card.merchant != policy.merchant:
        return _refused(
            Reason.WRONG_MERCHANT, f"card belongs to merchant {card.merchant}", card, linked
        )
    if policy.reject_stale and stale(trusted.cache_time, now, policy.max_staleness):
        return _refused(Reason.STALE_CACHE, stale_detail(trusted.cache_time, now), card, linked)
    action = ask.action
    if action is None:
        action = Action.CHECK if card.two_phase else Action.REDEEM
    weekday = minute = 0
    if card.weekdays or card.hours:  # local time only for cards that need it
        local = datetime.fromtimestamp(now, policy.zone) if policy.zone else _system_local(now)
        weekday, minute = local.isoweekday(), local.hour * 60 + local.minute
    ctx = Context(now, weekday, minute, policy.store, action, ask.amount, ask.uses)
    # Positional: on every scan a keyword argument costs a frozen dataclass 0.2 us more.
    return Evaluation(decide(card, state, ctx), card, True, True, linked)


def limited(found: Evaluation, ask: Ask, limit: Limit, spent: int) -> Evaluation:
    """`found` unless it accepts a redemption past the offline `limit` of its card on
    this box, given `spent`, this box's unacknowledged spend on the account (or the
    code); then the refusal `offline_limit` (docs/reasons.md, the last step)."""
    if found.card is None:
        return found
    decision = within_limit(found.card, found.decision, ask.amount, ask.uses, limit, spent)
    if decision is found.decision:
        return found
    return replace(found, decision=decision)


def _signed(
    text: str, row: CodeRow | None, trusted: Trusted, account: AccountRow | None = None
) -> Evaluation | tuple[Card, CodeState]:
    """A signed code's card and state, or its refusal. Its signature, issuer and
    delegation are checked before anything it claims is believed."""
    try:
        signed = signed_code.parse(text)
    except ValueError as exc:
        return _refused(Reason.MALFORMED, str(exc))
    issuer = trusted.issuers.get(signed.key_id)
    if issuer is None:
        return _refused(Reason.BAD_SIGNATURE, f"issuer key {signed.key_id} is not known here")
    if not signed_code.verify(signed, issuer.public_key):
        return _refused(Reason.BAD_SIGNATURE, "signature does not verify")
    if not signed_code.inside_delegation(signed, issuer):
        # A leaked issuer key cannot mint codes that outlive its delegation.
        return _refused(Reason.BAD_SIGNATURE, "code is valid beyond its issuer key's delegation")
    card = trusted.cards.get(signed.card_id)
    if card is None:
        return _refused(Reason.UNKNOWN_CARD, f"card {signed.card_id} is not in the cache")
    if card.merchant not in issuer.merchants:
        return _refused(Reason.BAD_SIGNATURE, "issuer key may not sign for this card's merchant")
    not_before, not_after = signed_code.window(signed, card, issuer)
    # A signed code is listed only once it was used (or revoked): until then it has
    # the card's defaults, inside the window it was signed for. Linked to an account,
    # it spends the account's uses or balance under its own card and window.
    if row is None:
        uses_left = balance = None
        status = CodeStatus.ACTIVE
    elif account is not None and row[6] is not None:
        _, _, _, uses_left, balance, status = linked_row(row, account)
    else:
        uses_left, balance, status = row[3], row[4], row[5]
    state = resolve(card, status, None, None, uses_left, balance)
    return card, replace(state, not_before=not_before, not_after=not_after)


@dataclass(frozen=True, slots=True)
class Original:
    """The ledger record a reversal names, as the engine read it."""

    action: str
    verdict: str
    card_id: int | None
    at: int
    """Unix seconds of the redemption."""
    uses: int
    amount: int | None
    already_reversed: bool
    account: bytes | None = None
    """The account the redemption spent (a linked code's), which a reversal refills."""


def evaluate_reverse(
    original: Original | None,
    row: CodeRow | None,
    trusted: Trusted,
    now: int,
    account: AccountRow | None = None,
) -> Evaluation:
    """The verdict for reversing `original` (None: no record with that id), whose
    code's stored row is `row` and, when it spent an account, that account's row is
    `account`, at `now` (docs/reasons.md, a reversal)."""
    if original is None or original.action != Action.REDEEM or original.verdict != Outcome.ACCEPTED:
        return Evaluation(
            refusal(Reason.NOT_REVERSIBLE, "no accepted redemption with that id"), recorded=False
        )
    card = trusted.cards.get(original.card_id or -1)
    if card is None or row is None or (original.account is not None and account is None):
        return Evaluation(
            refusal(Reason.UNKNOWN_CARD, "card or code no longer in the cache"), recorded=False
        )
    if original.account is not None and account is not None:
        # The account it spent gets the value back, whatever the code is linked to now.
        _, not_before, not_after, uses_left, balance, status = linked_row(
            (*row[:6], original.account), account
        )
    else:
        _, not_before, not_after, uses_left, balance, status, _ = row
    state = resolve(card, status, not_before, not_after, uses_left, balance)
    redeemed = Redeemed(original.at, original.uses, original.amount, original.already_reversed)
    return Evaluation(decide_reverse(card, state, redeemed, now), card, account=original.account)


def stale(cache_time: int | None, now: int, max_staleness: float) -> bool:
    """Whether a cache last known current at `cache_time` is too old to trust at `now`."""
    return cache_time is None or now - cache_time > max_staleness


def stale_detail(cache_time: int | None, now: int) -> str:
    if cache_time is None:
        return "no batch applied yet"
    return (
        f"the cache was last known current {(now - cache_time) // 3600} h ago "
        f"(newest applied manifest or batch), over max_staleness"
    )


def _system_local(now: int) -> datetime:
    return datetime.fromtimestamp(now).astimezone()
