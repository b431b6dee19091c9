"""Verdicts and the closed list of reasons a scan can be refused for.

The reason strings are a contract: the POS app and the backend switch on them, and
`docs/reasons.md` documents each one. Add to the list; never rename.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    UNKNOWN_CODE = "unknown_code"
    UNKNOWN_CARD = "unknown_card"
    ALREADY_REDEEMED = "already_redeemed"
    REVOKED = "revoked"
    BLOCKED = "blocked"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_STORE = "wrong_store"
    WRONG_MERCHANT = "wrong_merchant"
    OUTSIDE_HOURS = "outside_hours"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    AMOUNT_REQUIRED = "amount_required"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    STALE_CACHE = "stale_cache"
    STORAGE_ERROR = "storage_error"
    PAYMENT_CODE = "payment_code"
    NOT_REVERSIBLE = "not_reversible"
    REVERSAL_WINDOW_PASSED = "reversal_window_passed"
    ALREADY_REVERSED = "already_reversed"
    # Dispensing (issue 12): why the box would not mint a claim code.
    NO_GRANT = "no_grant"
    GRANT_REVOKED = "grant_revoked"
    GRANT_EXPIRED = "grant_expired"
    GRANT_NOT_YET_VALID = "grant_not_yet_valid"
    QUOTA_EXHAUSTED = "quota_exhausted"
    # Accounts (issue 13): a code whose value was given to another code, and a
    # redemption past the merchant's offline spending limit for this box.
    TRANSFERRED = "transferred"
    OFFLINE_LIMIT = "offline_limit"


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class Action(StrEnum):
    """What a ledger record did. `reject` is a refused scan; it changes no code."""

    CHECK = "check"
    REDEEM = "redeem"
    REVERSE = "reverse"
    REJECT = "reject"
    DISPENSE = "dispense"


@dataclass(slots=True)
class Verdict:
    """What the box tells the cashier and the POS app about one scan or request.

    `record_id` and `box_seq` are set once the ledger row is committed; a verdict
    without them was never recorded (a debounced repeat, a payment code, a storage
    error).
    """

    outcome: Outcome
    action: Action
    reason: Reason | None = None
    detail: str = ""
    digest_prefix: str = ""
    card_id: int | None = None
    card_kind: str | None = None
    uses_left: int | None = None
    balance: int | None = None
    amount: int | None = None
    record_id: str | None = None
    box_seq: int | None = None
    source: str = ""

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "verdict": self.outcome.value,
            "action": self.action.value,
        }
        if self.reason is not None:
            out["reason"] = self.reason.value
        for name in (
            "detail",
            "digest_prefix",
            "card_id",
            "card_kind",
            "uses_left",
            "balance",
            "amount",
            "record_id",
            "box_seq",
            "source",
        ):
            value = getattr(self, name)
            if value not in (None, ""):
                out[name] = value
        return out
