"""The redemption engine: Scan -> digest -> look up -> evaluate -> record -> Verdict.

The decision is `cards.evaluate.evaluate`, a pure function; the engine is the I/O
around it. It is the only writer on the scan path: a verdict is returned only after
the transaction holding its ledger row and the code's new state has committed with
synchronous=FULL, so whatever the caller shows has survived a crash (durable before
shown). Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple
from zoneinfo import ZoneInfo

from cards import claim_code
from cards.card import Limit, limit_for
from cards.digest import CodeDigester, short
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
    limited,
    refusal,
)
from cards.grant import GrantSet
from cards.normalize import OVERSIZED, MalformedCode, normalize, normalize_text
from cards.rules import UNLIMITED_USES
from cards.scan import Scan
from cards.verdict import Action, Outcome, Reason, Verdict
from daemon.box_key import BoxKey
from daemon.config import Config
from daemon.config_model import Dispense
from daemon.debounce import Debounce, Repeat
from daemon.dispense import Claim, Dispensed, claim_by
from storage import accounts, api_requests, codes, dispensing, ledger, trust
from storage.api_requests import RequestKey
from storage.dispensing import GrantsRefused

log = logging.getLogger("redeemd.engine")
R = TypeVar("R")
Ts = TypeVarTuple("Ts")


@dataclass(frozen=True)
class PaymentCode:
    """A wallet payment code: handed to the POS app, never stored or synced."""

    scheme: str
    code: str
    source: str

    def to_json(self) -> dict[str, object]:
        # The POS app needs the code to charge it; it goes only to the local socket.
        return {"event": "payment", "scheme": self.scheme, "source": self.source}


def _utf8(text: str) -> bytes:
    """A code's bytes. A lone surrogate (JSON's "\\ud800") passes as bytes that are not
    UTF-8, so the code is `malformed` as a scanner's bad bytes are, not an exception."""
    return text.encode("utf-8", "surrogatepass")


class Engine:
    def __init__(
        self,
        conn: sqlite3.Connection,
        config: Config,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        """`clock` is the wall clock (floored at the time floor, see `now`);
        `monotonic` times the debounce window. Tests pass their own to move time."""
        self.conn = conn
        self.config = config
        self.clock = clock
        self.alarm: str | None = None
        self._data_version = -1
        self._next_seq = ledger.last_seq(conn) + 1
        self._new_id = ledger.RecordIds()  # this engine's decider thread is its one caller
        self._digest = CodeDigester(config.trust.code_key)
        self._debounce = Debounce(config.scan.debounce, monotonic)
        # Read on every scan; the config is frozen and a reload makes a new Engine.
        self._box_id, self._merchant, self._store = (
            config.box.id,
            config.box.merchant,
            config.box.store,
        )
        self._max_length = config.scan.max_code_length
        self.policy = Policy(
            merchant=config.box.merchant,
            store=config.box.store,
            pass_payment_codes=config.scan.payment_codes == "pass",
            reject_stale=config.trust.stale_policy == "reject",
            max_staleness=config.trust.max_staleness,
            zone=None if config.box.timezone == "local" else ZoneInfo(config.box.timezone),
        )
        # Until daemon/config.py carries [dispense] (see the request in the notes),
        # a Config without it dispenses with the defaults.
        self.dispense_config: Dispense = config.dispense
        self._grants: tuple[int | None, GrantSet | None, str] = (None, None, "")
        self._refresh()

    # ------------------------------------------------------------------ state

    def _refresh(self, force: bool = False) -> None:
        """Reload cards, issuer keys and the time floor when another connection (a
        batch import) has changed the database; PRAGMA data_version is a cheap check.
        It does not change for commits on this same connection, so whoever applies a
        batch through `self.conn` must pass force=True."""
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version and not force:
            return
        self._data_version = version
        self.floor = trust.time_floor(self.conn)
        self.cache_seq = trust.cache_seq(self.conn)
        # When the cache was known current: the newest applied manifest or batch, as
        # storage keeps them (the sync thread writes manifests there), so a restart or
        # a box fed by file judges staleness as the status shows it (protocol.md 16.1).
        self.cache_time = trust.cache_time(self.conn, self.config.box.merchant)
        self.trusted = Trusted(
            cards=trust.cards(self.conn),
            issuers=trust.issuers(self.conn, self.config.trust.root_keys),
            cache_time=self.cache_time,
        )
        # Offline limits (docs/protocol.md 19.5): the one holding on this box per card,
        # and the cards whose redemptions count in the unacknowledged spend. Both empty
        # on a box without limits, where the scan path only asks `in` of an empty dict.
        held = accounts.limits(self.conn)
        self._limits: dict[int, Limit] = {}
        for card_id in {lim.card_id for lim in held}:
            found = limit_for(held, card_id, self._box_id)
            if found is not None:
                self._limits[card_id] = found
        self._tracked = accounts.tracked_cards(held)

    def reload(self) -> None:
        """Read cards, issuer keys and the time floor again after a batch was applied
        through this engine's own connection, which PRAGMA data_version does not see."""
        self._refresh(force=True)

    def now(self) -> int:
        """Wall time, never earlier than the newest signed time verified (boxes without
        an RTC boot in 1970)."""
        return max(int(self.clock()), self.floor)

    # ------------------------------------------------------------------ scans

    def handle(self, scan: Scan) -> Verdict | PaymentCode | Repeat:
        """Decide and record one scan. A Repeat is a debounced repeat of a read already
        decided: nothing is recorded, and it says how that read was answered."""
        source = scan.source
        try:
            text = normalize_text(scan.code, self._max_length)
        except MalformedCode as exc:
            return self._malformed_read(scan, str(exc))
        digest = self._digest(text)
        repeat = self._debounce.read(source, digest)
        if repeat is not None:
            return repeat
        result = self._write(scan, digest, self._decide, text, digest, scan, SCAN)
        if isinstance(result, PaymentCode):
            self._debounce.decided(True)  # passed on to the POS app: a good read
        elif result.reason is not Reason.STORAGE_ERROR:
            self._debounce.decided(result.accepted)
        # After a storage error (or an exception) the read stays undecided: nothing was
        # recorded, so the cashier's rescan is a new try (see `Debounce.read`).
        return result

    def _malformed_read(self, scan: Scan, detail: str) -> Verdict | Repeat:
        """A read that is no code. An over-long read is discarded by its driver and
        arrives as the OVERSIZED marker, so two of them look alike without being the
        same read: each one is its own read and gets its own ledger row
        (docs/decisions.md). Its driver makes at most one per 4 KiB received, which
        bounds what a stuck scanner costs. Any other malformed read is debounced by
        its bytes."""
        key = None
        if scan.code != OVERSIZED:
            key = hashlib.sha256(scan.code).digest()[:16]
            repeat = self._debounce.read(scan.source, key)
            if repeat is not None:
                return repeat
        refused = Evaluation(refusal(Reason.MALFORMED, detail))
        verdict = self._write(scan, None, self._record, refused, None, scan, SCAN)
        if key is not None and verdict.reason is not Reason.STORAGE_ERROR:
            self._debounce.decided(False)
        return verdict

    def check(self, text: str, source: str = "cli") -> Verdict | PaymentCode:
        """Verdict for a code without recording or redeeming anything."""
        try:
            norm = normalize(_utf8(text), self._max_length)
        except MalformedCode as exc:
            return Verdict(
                Outcome.REJECTED, Action.REJECT, Reason.MALFORMED, str(exc), source=source
            )
        digest = self._digest(norm.text)
        found, _ = self._look_up(norm.text, digest, CHECK)
        if isinstance(found, PaymentPass):
            return PaymentCode(found.scheme, norm.text, source)
        return self._answer(found, digest, source)

    def redeem(
        self,
        text: str,
        source: str,
        amount: int | None = None,
        uses: int = 1,
        operator: str | None = None,
        request: RequestKey | None = None,
    ) -> Verdict | PaymentCode:
        """Redeem explicitly (the POS app's confirmation of a two-phase check).

        With `request`, its idempotency key is committed with the ledger row (see
        `recorded_request`), so a retry can be answered without redeeming twice. The
        caller looks the key up first: a key is stored once.
        """
        scan = Scan(code=b"", source=source, at=self.clock())
        try:
            norm = normalize(_utf8(text), self._max_length)
        except MalformedCode as exc:
            refused = Evaluation(refusal(Reason.MALFORMED, str(exc)))
            return self._write(scan, None, self._record, refused, None, scan, SCAN, None, request)
        digest = self._digest(norm.text)
        ask = Ask(Action.REDEEM, amount, uses)
        return self._write(
            scan, digest, self._decide, norm.text, digest, scan, ask, operator, request
        )

    def _look_up(self, text: str, digest: bytes, ask: Ask) -> tuple[Evaluation | PaymentPass, int]:
        """Look the code up and evaluate it: the decision, with nothing written, and this
        box's unacknowledged spend on the code's account (or the code) for the offline
        limits (storage/accounts.py)."""
        execute = self.conn.execute
        # `_refresh`'s check, inline: on the scan path every Python call counts.
        if execute("PRAGMA data_version").fetchone()[0] != self._data_version:
            self._refresh()
        # One statement: the code's row and, for a linked code (docs/protocol.md 19.2),
        # its account's, as the tuple SQLite returns (storage/codes.py, SCAN_LOOKUP).
        row = execute(codes.SCAN_LOOKUP, (digest,)).fetchone()
        account = None
        spent = 0
        if row is not None:
            if row[7] is not None:
                account = row[7:13]
                spent = row[14] or 0
            else:
                spent = row[13] or 0
            row = row[:7]
        now = max(int(self.clock()), self.floor)  # self.now(), inline
        return evaluate(text, row, self.trusted, now, self.policy, ask, account), spent

    def _decide(
        self,
        text: str,
        digest: bytes,
        scan: Scan,
        ask: Ask,
        operator: str | None = None,
        request: RequestKey | None = None,
    ) -> Verdict | PaymentCode:
        """Look up, evaluate and record, inside the caller's write transaction: the
        unacknowledged spend an offline limit is judged on is read under the write lock,
        so a second scan cannot slip in between the check and the record."""
        found, spent = self._look_up(text, digest, ask)
        if isinstance(found, PaymentPass):
            return PaymentCode(found.scheme, text, scan.source)
        card = found.card
        if card is not None and card.card_id in self._limits and found.decision.changed:
            found = limited(found, ask, self._limits[card.card_id], spent)
        return self._record(found, digest, scan, ask, operator, request)

    # ------------------------------------------------------------------ reversal

    def reverse(
        self,
        record_id: str,
        source: str,
        operator: str | None = None,
        request: RequestKey | None = None,
    ) -> Verdict:
        """Undo an accepted redemption within its card's reversal window."""
        try:
            rid = uuid.UUID(record_id).bytes
        except ValueError:
            return Verdict(
                Outcome.REJECTED, Action.REJECT, Reason.MALFORMED, "not a record id", source=source
            )
        scan = Scan(code=b"", source=source, at=self.clock())
        return self._write(scan, None, self._reverse, rid, scan, operator, request)

    def _reverse(
        self, rid: bytes, scan: Scan, operator: str | None, request: RequestKey | None
    ) -> Verdict:
        """Look up the redemption and its code, evaluate the reversal, record it."""
        self._refresh()
        redemption = ledger.by_id(self.conn, rid)
        original = row = account = None
        if redemption is not None:
            original = Original(
                redemption.action,
                redemption.verdict,
                redemption.card_id,
                redemption.at_ms // 1000,
                redemption.uses or 1,
                redemption.amount,
                ledger.is_reversed(self.conn, rid),
                redemption.account,
            )
            row = self.conn.execute(codes.LOOKUP, (redemption.digest or b"",)).fetchone()
            if redemption.account is not None:
                account = self.conn.execute(codes.ACCOUNT_LOOKUP, (redemption.account,)).fetchone()
        found = evaluate_reverse(original, row, self.trusted, self.now(), account)
        if not found.recorded or redemption is None or original is None:
            return self._answer(found, None, scan.source)
        ask = Ask(Action.REVERSE, original.amount, original.uses)
        return self._record(found, redemption.digest, scan, ask, operator, request, rid)

    # ------------------------------------------------------------------ dispensing

    def dispense(
        self,
        card_id: int,
        count: int,
        box_key: BoxKey,
        source: str = "api",
        operator: str | None = None,
        request: RequestKey | None = None,
    ) -> Dispensed:
        """Mint up to `count` claim codes for `card_id` (docs/protocol.md 18).

        One write transaction: the grant and counter of each code are chosen under the
        write lock from the committed ledger, each code's `dispense` record is written,
        and a refusal (no grant, quota used up ...) is written as a `reject` record that
        uses no counter; with `request`, its idempotency key too. Nothing is returned
        before COMMIT, so no code is ever shown whose counter could be minted again. The
        code is signed inside the transaction because its record holds its digest; the
        text does not leave this call before the COMMIT.
        """
        scan = Scan(code=b"", source=source, at=self.clock())
        result = self._write(
            scan, None, self._dispense, card_id, count, box_key, source, operator, request
        )
        if isinstance(result, Verdict):  # a storage error: nothing was committed
            return Dispensed((), result)
        self._next_seq += len(result.claims) + (result.refused is not None)
        self.alarm = None
        return result

    def held_grants(self) -> tuple[GrantSet | None, str]:
        """The verified grant set this box holds, or None and why; verified again only
        when the stored set changed (the sync thread or `redeemd grant install` wrote
        another through their own connection)."""
        seq = dispensing.held_seq(self.conn)
        cached_seq, grants, problem = self._grants
        if seq != cached_seq:
            try:
                grants, problem = dispensing.held_grants(self.conn, self.config.trust.root_keys), ""
            except GrantsRefused as exc:
                grants, problem = None, str(exc)
            self._grants = (seq, grants, problem)
        return grants, problem

    def _dispense(
        self,
        card_id: int,
        count: int,
        box_key: BoxKey,
        source: str,
        operator: str | None,
        request: RequestKey | None,
    ) -> Dispensed:
        grants, problem = self.held_grants()
        if grants is not None and grants.box_key_id != box_key.key_id:
            problem = (
                f"the grant set is for box key {grants.box_key_id}, this box's key is "
                f"{box_key.key_id} (was box.key replaced?): grant the key `redeemd box-key` shows"
            )
            grants = None
        covering = [g.id for g in grants.grants if card_id in g.cards] if grants else []
        used = dispensing.used_counters(self.conn, covering)
        now = self.now()
        at_ms = int(max(self.clock(), self.floor) * 1000)
        card = self.trusted.cards.get(card_id)
        kind, title = (str(card.kind), card.title) if card is not None else (None, "")
        claims: list[Claim] = []
        refused = None
        seq = self._next_seq
        # What every record of this dispense shares; each adds its sequence, id and outcome.
        append = functools.partial(
            ledger.append,
            self.conn,
            at_ms=at_ms,
            box=self._box_id,
            merchant=self._merchant,
            store=self._store,
            card_id=card_id,
            amount=None,
            uses_left=None,
            balance=None,
            source=source,
            symbology=None,
            operator=operator,
            cache_seq=self.cache_seq,
        )
        for _ in range(count):
            choice = claim_code.choose(grants, used, card_id, now)
            record_id, record_text = self._new_id()
            if choice.grant is None:
                reason = choice.reason or Reason.NO_GRANT
                detail = problem or choice.detail
                append(
                    seq=seq,
                    record_id=record_id,
                    digest=None,
                    action=str(Action.REJECT),
                    uses=None,
                    verdict=str(Outcome.REJECTED),
                    reason=str(reason),
                )
                refused = Verdict(
                    Outcome.REJECTED,
                    Action.REJECT,
                    reason,
                    detail,
                    "",
                    card_id,
                    kind,
                    record_id=record_text,
                    box_seq=seq,
                    source=source,
                )
                break
            grant, counter = choice.grant, choice.counter
            by = claim_by(now, self.dispense_config.claim_days, grant)
            text = claim_code.mint(box_key.private, grant.id, counter, card_id, by)
            digest = self._digest(text)
            append(
                seq=seq,
                record_id=record_id,
                digest=digest,
                action=str(Action.DISPENSE),
                uses=1,
                verdict=str(Outcome.ACCEPTED),
                reason=None,
                grant_id=grant.id,
                counter=counter,
            )
            used[grant.id] = counter
            verdict = Verdict(
                Outcome.ACCEPTED,
                Action.DISPENSE,
                None,
                "",
                short(digest),
                card_id,
                kind,
                record_id=record_text,
                box_seq=seq,
                source=source,
            )
            url = self.dispense_config.claim_url + text
            claims.append(Claim(verdict, grant.id, counter, by, url, title))
            seq += 1
        result = Dispensed(tuple(claims), refused)
        if request is not None:
            api_requests.record(self.conn, request, self._next_seq, result.record_json())
        return result

    # ------------------------------------------------------------------ recording

    def _write(
        self,
        scan: Scan,
        digest: bytes | None,
        work: Callable[[*Ts], R],
        *args: *Ts,
    ) -> R | Verdict:
        """Run `work(*args)`, one decision, as one write transaction, from lookup to COMMIT.

        The lookup happens under the write lock, so a batch imported by another process
        cannot change the code between the decision and its record. The result is only
        returned after COMMIT: durable before shown.
        """
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(*args)
                self.conn.execute("COMMIT")
            except BaseException:
                # SQLITE_FULL and SQLITE_IOERR roll the transaction back themselves; a
                # second ROLLBACK would raise and hide the real cause from the alarm.
                try:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                finally:
                    self._resync_seq()  # `_record` counted a row that is not there
                raise
        except sqlite3.Error as exc:
            # Disk full, I/O error, locked too long: refuse rather than accept unrecorded.
            self.alarm = f"cannot write the ledger: {exc}; free disk space or check the storage"
            log.error("storage error on scan from %s: %s", scan.source, exc)
            return Verdict(
                Outcome.REJECTED,
                Action.REJECT,
                Reason.STORAGE_ERROR,
                str(exc),
                short(digest),
                source=scan.source,
            )
        return result

    def _resync_seq(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._next_seq = ledger.last_seq(self.conn) + 1

    def _record(
        self,
        found: Evaluation,
        digest: bytes | None,
        scan: Scan,
        ask: Ask,
        operator: str | None = None,
        request: RequestKey | None = None,
        reverses: bytes | None = None,
    ) -> Verdict:
        """Write the evaluation's ledger row (and the code's new state), inside the
        caller's transaction, and answer with the recorded verdict."""
        decision, card = found.decision, found.card
        if not found.keeps_digest:
            digest = None
        record_id, record_text = self._new_id()
        seq = self._next_seq
        action = decision.action
        moved = action is Action.REDEEM or action is Action.REVERSE
        by_balance = card is not None and card.uses_balance
        amount = ask.amount if moved and by_balance else None
        # str() of a StrEnum member is its value, without Enum.value's Python-level property.
        ledger.append(
            self.conn,
            seq,
            record_id,
            int(max(self.clock(), self.floor) * 1000),
            self._box_id,
            self._merchant,
            self._store,
            digest,
            card.card_id if card else None,
            str(action),
            ask.uses if moved and not by_balance else None,
            amount,
            decision.uses_left,
            decision.balance,
            str(decision.outcome),
            str(decision.reason) if decision.reason else None,
            scan.source,
            scan.symbology,
            operator,
            self.cache_seq,
            reverses,
            None,  # grant_id and counter: a scan dispenses nothing
            None,
            found.account,
        )
        if decision.changed and digest is not None and card is not None:
            uses_left = UNLIMITED_USES if decision.uses_left is None else decision.uses_left
            balance, account = decision.balance, found.account
            # A tracked card's redemption also adds to the offline limits' unacknowledged
            # spend, in the same statement as the new state (storage/accounts.py).
            spend = None
            if action is Action.REDEEM and card.card_id in self._tracked:
                spend = (amount if by_balance else ask.uses) or 0
            if account is None:
                state = (digest, card.card_id, uses_left, balance, decision.status)
                if spend is None:
                    self.conn.execute(codes.UPSERT_STATE, state)
                else:
                    self.conn.execute(accounts.SPEND_CODE, (*state, spend))
            elif spend is None:  # a linked code spends (or a reversal refills) its account
                self.conn.execute(codes.UPDATE_ACCOUNT, (uses_left, balance, account))
            else:
                self.conn.execute(accounts.SPEND_ACCOUNT, (uses_left, balance, spend, account))
        verdict = self._verdict(found, short(digest), scan.source, record_text, seq, amount)
        # Counted before the COMMIT, so nothing but the COMMIT runs between the fsync and
        # the verdict's return; `_write` counts again from the ledger if the row is lost.
        self._next_seq = seq + 1
        self.alarm = None
        if request is not None:
            api_requests.record(self.conn, request, seq, verdict.to_json())
        return verdict

    def recorded_request(self, key: str) -> api_requests.Recorded | None:
        """The request committed under an idempotency key, with the verdict it got."""
        return api_requests.lookup(self.conn, key)

    def _answer(self, found: Evaluation, digest: bytes | None, source: str) -> Verdict:
        """The verdict of an evaluation that is not recorded (a check, a reversal of
        nothing): without a digest it shows no digest prefix at all."""
        prefix = short(digest) if digest is not None and found.keeps_digest else ""
        return self._verdict(found, prefix, source, None, None, None)

    @staticmethod
    def _verdict(
        found: Evaluation,
        digest_prefix: str,
        source: str,
        record_id: str | None,
        seq: int | None,
        amount: int | None,
    ) -> Verdict:
        decision, card = found.decision, found.card
        # Positional, in Verdict's field order: on every scan, thirteen keyword arguments
        # cost more than the frozen dataclass they build.
        return Verdict(
            decision.outcome,
            decision.action,
            decision.reason,
            decision.detail,
            digest_prefix,
            card.card_id if card else None,
            str(card.kind) if card else None,
            decision.uses_left,
            decision.balance,
            amount,
            record_id,
            seq,
            source,
        )
