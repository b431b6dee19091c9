"""The redemption engine: Scan -> digest -> lookup -> rules -> one transaction -> Verdict.

The engine is the only writer on the scan path. A verdict is returned only after the
transaction holding its ledger row, its outbox row and the code's new state has
committed with synchronous=FULL, so whatever the caller shows has survived a crash
(durable before shown). Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar
from zoneinfo import ZoneInfo

from cards import signed_code
from cards.card import Card
from cards.classify import payment_scheme
from cards.digest import CodeDigester, short
from cards.normalize import OVERSIZED, MalformedCode, normalize, normalize_text
from cards.rules import (
    UNLIMITED_USES,
    Context,
    Decision,
    Redeemed,
    decide,
    decide_reverse,
    resolve,
)
from cards.scan import Scan
from cards.verdict import Action, Outcome, Reason, Verdict
from daemon.config import Config
from storage import api_requests, codes, ledger, trust
from storage.api_requests import RequestKey

log = logging.getLogger("redeemd.engine")
R = TypeVar("R")


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
    ):
        self.conn = conn
        self.config = config
        self.clock = clock
        self.zone = None if config.box.timezone == "local" else ZoneInfo(config.box.timezone)
        self.alarm: str | None = None
        # (source, code key) -> [monotonic time of its last read, whether that read was
        # accepted (None until decided)]: the debounce window, and the answer a scanner in
        # host-ACK mode gets for a repeat (it waits for one after every read).
        self._recent: OrderedDict[tuple[str, bytes], list] = OrderedDict()
        self.repeat_accepted = False
        """After `handle` returned None: whether the read it repeats was accepted."""
        self.repeat_age = 0.0
        """After `handle` returned None: seconds since that code's previous read."""
        self._data_version = -1
        self._next_seq = ledger.last_seq(conn) + 1
        self._recorded = False
        # The idempotency key of the API request being written, stored with its ledger row.
        self._request: RequestKey | None = None
        self._digest = CodeDigester(config.trust.code_key)
        # Read on every scan; the config is frozen and a reload makes a new Engine.
        self._box_id, self._merchant, self._store = (
            config.box.id, config.box.merchant, config.box.store,
        )  # fmt: skip
        self._max_length = config.scan.max_code_length
        self._window = config.scan.debounce
        self._reject_stale = config.trust.stale_policy == "reject"
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
        self.cards: dict[int, Card] = trust.cards(self.conn)
        self.issuers = trust.issuers(self.conn, self.config.trust.root_keys)
        self.floor = trust.time_floor(self.conn)
        self.cache_seq = trust.cache_seq(self.conn)
        # When the cache was known current: the newest applied manifest or batch, as
        # storage keeps them (the sync thread writes manifests there), so a restart or
        # a box fed by file judges staleness as the status shows it (protocol.md 16.1).
        self.cache_time = trust.cache_time(self.conn, self.config.box.merchant)

    def now(self) -> int:
        """Wall time, never earlier than the newest signed time verified (boxes without
        an RTC boot in 1970)."""
        return max(int(self.clock()), self.floor)

    # ------------------------------------------------------------------ scans

    def handle(self, scan: Scan) -> Verdict | PaymentCode | None:
        """Decide and record one scan. None means a debounced repeat of a read already
        decided (see `repeat_accepted`)."""
        try:
            text = normalize_text(scan.code, self._max_length)
        except MalformedCode as exc:
            # An over-long read is discarded by its driver and arrives as the OVERSIZED
            # marker, so two of them look alike without being the same read: each one is
            # its own read and gets its own ledger row (docs/decisions.md). Its driver
            # makes at most one per 4 KiB received, which bounds what a stuck scanner
            # costs. Any other malformed read is debounced by its bytes.
            read = None
            if scan.code != OVERSIZED:
                read = self._new_read(scan.source, hashlib.sha256(scan.code).digest()[:16])
                if read is None:
                    return None
            detail = str(exc)
            rejected = self._write(
                lambda: self._record_reject(Reason.MALFORMED, detail, None, None, scan), scan, None
            )
            if read is not None and rejected.reason is not Reason.STORAGE_ERROR:
                read[1] = False
            return rejected
        digest = self._digest(text)
        read = self._new_read(scan.source, digest)
        if read is None:
            return None
        result = self._write(
            lambda: self._evaluate(text, digest, scan, action=None, record=True), scan, digest
        )
        if isinstance(result, PaymentCode):
            read[1] = True  # passed on to the POS app: a good read
        elif result.reason is not Reason.STORAGE_ERROR:
            read[1] = result.accepted
        # After a storage error (or an exception) the read stays undecided: nothing was
        # recorded, so the cashier's rescan is a new try (see `_new_read`).
        return result

    def check(self, text: str, source: str = "cli") -> Verdict | PaymentCode:
        """Verdict for a code without recording or redeeming anything."""
        try:
            norm = normalize(_utf8(text), self._max_length)
        except MalformedCode as exc:
            return Verdict(
                Outcome.REJECTED, Action.REJECT, Reason.MALFORMED, str(exc), source=source
            )
        digest = self._digest(norm.text)
        scan = Scan(code=b"", source=source, at=self.clock())
        return self._evaluate(norm.text, digest, scan, action=Action.CHECK, record=False)

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
        self._request = request
        try:
            norm = normalize(_utf8(text), self._max_length)
        except MalformedCode as exc:
            scan, detail = Scan(b"", source), str(exc)
            return self._write(
                lambda: self._record_reject(Reason.MALFORMED, detail, None, None, scan), scan, None
            )
        digest = self._digest(norm.text)
        scan = Scan(code=b"", source=source, at=self.clock())
        return self._write(
            lambda: self._evaluate(
                norm.text, digest, scan, Action.REDEEM, record=True, amount=amount, uses=uses,
                operator=operator,
            ),
            scan,
            digest,
        )  # fmt: skip

    def _new_read(self, source: str, key: bytes) -> list | None:
        """The debounce window's entry for this read, [time, accepted] (the caller fills
        in `accepted` once decided), or None for a repeat: one read, one scan, so the same
        code from the same source inside the window is the read already decided, and
        `repeat_accepted` says how that one was answered. A read left undecided (nothing
        recorded) has no repeats: the next one is tried afresh."""
        now = time.monotonic()
        window = self._window
        recent = self._recent
        # Oldest read first (a read moves its key to the end), so expiry stops at the
        # first live entry: amortised O(1) per scan even when a burst fills the whole window.
        while recent:
            oldest, entry = next(iter(recent.items()))
            if now - entry[0] < window:
                break
            del recent[oldest]
        last = recent.pop((source, key), None)
        if last is not None and last[1] is not None and now - last[0] < window:
            self.repeat_age = now - last[0]
            last[0] = now
            recent[(source, key)] = last
            self.repeat_accepted = last[1]
            return None
        read = recent[(source, key)] = [now, None]
        return read

    def _evaluate(
        self,
        text: str,
        digest: bytes,
        scan: Scan,
        action: Action | None,
        record: bool,
        amount: int | None = None,
        uses: int = 1,
        operator: str | None = None,
    ) -> Verdict | PaymentCode:
        self._refresh()

        def reject(reason: Reason, detail: str, card: Card | None = None) -> Verdict:
            if not record:
                return Verdict(Outcome.REJECTED, Action.REJECT, reason, detail, short(digest),
                               card.card_id if card else None, source=scan.source)  # fmt: skip
            return self._record_reject(reason, detail, digest, card, scan)

        # One B-tree probe; the tuple is unpacked below rather than built into a CodeRow.
        row = self.conn.execute(codes.LOOKUP, (digest,)).fetchone()
        if signed_code.looks_signed(text):
            try:
                signed = signed_code.parse(text)
            except ValueError as exc:
                return reject(Reason.MALFORMED, str(exc))
            issuer = self.issuers.get(signed.key_id)
            if issuer is None:
                return reject(Reason.BAD_SIGNATURE, f"issuer key {signed.key_id} is not known here")
            if not signed_code.verify(signed, issuer.public_key):
                return reject(Reason.BAD_SIGNATURE, "signature does not verify")
            if not signed_code.inside_delegation(signed, issuer):
                # A leaked issuer key cannot mint codes that outlive its delegation.
                return reject(
                    Reason.BAD_SIGNATURE, "code is valid beyond its issuer key's delegation"
                )
            card = self.cards.get(signed.card_id)
            if card is None:
                return reject(Reason.UNKNOWN_CARD, f"card {signed.card_id} is not in the cache")
            if card.merchant not in issuer.merchants:
                return reject(
                    Reason.BAD_SIGNATURE, "issuer key may not sign for this card's merchant"
                )
            not_before, not_after = signed_code.window(signed, card, issuer)
            _, _, _, uses_left, balance, status = row or (None, None, None, None, None, 0)
            state = replace(
                resolve(card, status, None, None, uses_left, balance),
                not_before=not_before,
                not_after=not_after,
            )
        elif row is None:
            scheme = payment_scheme(text)
            if scheme:
                if self.config.scan.payment_codes == "pass":
                    return PaymentCode(scheme, text, scan.source)
                # Payment codes are never stored: the refusal is recorded (the backend
                # sees it) but without the code's digest, which would identify it.
                detail = f"{scheme} payment codes are not accepted here"
                if not record:
                    return Verdict(Outcome.REJECTED, Action.REJECT, Reason.PAYMENT_CODE, detail,
                                   source=scan.source)  # fmt: skip
                return self._record_reject(Reason.PAYMENT_CODE, detail, None, None, scan)
            return reject(Reason.UNKNOWN_CODE, "code is not in the cache")
        else:
            card_id, not_before, not_after, uses_left, balance, status = row
            card = self.cards.get(card_id)
            if card is None:
                return reject(Reason.UNKNOWN_CARD, f"card {card_id} is not in the cache")
            state = resolve(card, status, not_before, not_after, uses_left, balance)

        if card.merchant != self._merchant:
            return reject(Reason.WRONG_MERCHANT, f"card belongs to merchant {card.merchant}", card)
        now = self.now()
        if self._reject_stale and self._stale(now):
            return reject(Reason.STALE_CACHE, self._stale_detail(now), card)
        if action is None:
            action = Action.CHECK if card.two_phase else Action.REDEEM
        weekday = minute = 0
        if card.weekdays or card.hours:  # local time only for cards that need it
            local = (
                datetime.fromtimestamp(now, self.zone)
                if self.zone
                else datetime.fromtimestamp(now).astimezone()
            )
            weekday, minute = local.isoweekday(), local.hour * 60 + local.minute
        ctx = Context(now, weekday, minute, self._store, action, amount, uses)
        decision = decide(card, state, ctx)
        if not record:
            return self._verdict(decision, digest, card, scan.source, None, None, amount)
        return self._record(
            decision, digest, card, scan, amount=amount, uses=uses, operator=operator
        )

    def _stale(self, now: int) -> bool:
        return self.cache_time is None or now - self.cache_time > self.config.trust.max_staleness

    def _stale_detail(self, now: int) -> str:
        if self.cache_time is None:
            return "no batch applied yet"
        return (
            f"the cache was last known current {(now - self.cache_time) // 3600} h ago "
            f"(newest applied manifest or batch), over max_staleness"
        )

    # ------------------------------------------------------------------ reversal

    def reverse(
        self,
        record_id: str,
        source: str,
        operator: str | None = None,
        request: RequestKey | None = None,
    ) -> Verdict:
        """Undo an accepted redemption within its card's reversal window."""
        self._request = request
        try:
            rid = uuid.UUID(record_id).bytes
        except ValueError:
            self._request = None
            return Verdict(
                Outcome.REJECTED, Action.REJECT, Reason.MALFORMED, "not a record id", source=source
            )
        scan = Scan(code=b"", source=source, at=self.clock())
        return self._write(lambda: self._reverse(rid, scan, operator), scan, None)  # type: ignore[return-value]

    def _reverse(self, rid: bytes, scan: Scan, operator: str | None) -> Verdict:
        source = scan.source
        self._refresh()
        original = ledger.by_id(self.conn, rid)
        if (
            original is None
            or original.action != Action.REDEEM
            or original.verdict != Outcome.ACCEPTED
        ):
            return Verdict(Outcome.REJECTED, Action.REJECT, Reason.NOT_REVERSIBLE,
                           "no accepted redemption with that id", source=source)  # fmt: skip
        card = self.cards.get(original.card_id or -1)
        row = codes.lookup(self.conn, original.digest or b"")
        if card is None or row is None:
            return Verdict(Outcome.REJECTED, Action.REJECT, Reason.UNKNOWN_CARD,
                           "card or code no longer in the cache", source=source)  # fmt: skip
        state = resolve(card, row.status, row.not_before, row.not_after, row.uses_left, row.balance)
        decision = decide_reverse(
            card,
            state,
            Redeemed(
                original.at_ms // 1000,
                original.uses or 1,
                original.amount,
                ledger.is_reversed(self.conn, rid),
            ),  # fmt: skip
            self.now(),
        )
        return self._record(decision, original.digest, card, scan, amount=original.amount,
                            uses=original.uses or 1, operator=operator, reverses=rid)  # fmt: skip

    # ------------------------------------------------------------------ recording

    def _write(self, work: Callable[[], R], scan: Scan, digest: bytes | None) -> R | Verdict:
        """Run one decision as one write transaction, from lookup to COMMIT.

        The lookup happens under the write lock, so a batch imported by another process
        cannot change the code between the decision and its record. The result is only
        returned after COMMIT: durable before shown.
        """
        self._recorded = False
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = work()
                self.conn.execute("COMMIT")
            except BaseException:
                # SQLITE_FULL and SQLITE_IOERR roll the transaction back themselves; a
                # second ROLLBACK would raise and hide the real cause from the alarm.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            # Disk full, I/O error, locked too long: refuse rather than accept unrecorded.
            self.alarm = f"cannot write the ledger: {exc}; free disk space or check the storage"
            log.error("storage error on scan from %s: %s", scan.source, exc)
            self._resync_seq()
            return Verdict(Outcome.REJECTED, Action.REJECT, Reason.STORAGE_ERROR, str(exc),
                           short(digest), source=scan.source)  # fmt: skip
        finally:
            self._request = None
        if self._recorded:
            self._next_seq += 1
            self.alarm = None
        return result

    def _resync_seq(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._next_seq = ledger.last_seq(self.conn) + 1

    def _record_reject(
        self, reason: Reason, detail: str, digest: bytes | None, card: Card | None, scan: Scan
    ) -> Verdict:
        decision = Decision(Outcome.REJECTED, Action.REJECT, reason, detail)
        return self._record(decision, digest, card, scan)

    def _record(
        self,
        decision: Decision,
        digest: bytes | None,
        card: Card | None,
        scan: Scan,
        amount: int | None = None,
        uses: int = 1,
        operator: str | None = None,
        reverses: bytes | None = None,
    ) -> Verdict:
        record_id, record_text = ledger.new_id()
        seq = self._next_seq
        action = decision.action
        moved = action is Action.REDEEM or action is Action.REVERSE
        by_balance = card is not None and card.uses_balance
        amount = amount if moved and by_balance else None
        # The ledger row in ledger.COLUMNS order, without a Redemption: nothing on the
        # scan path needs the object, and building it cost more than its INSERT. str() of
        # a StrEnum member is its value, without Enum.value's Python-level property.
        self.conn.execute(
            ledger.INSERT,
            (
                seq, record_id, int(max(self.clock(), self.floor) * 1000),
                self._box_id, self._merchant, self._store, digest,
                card.card_id if card else None, str(action),
                uses if moved and not by_balance else None, amount,
                decision.uses_left, decision.balance, str(decision.outcome),
                str(decision.reason) if decision.reason else None,
                scan.source, scan.symbology, operator, self.cache_seq, reverses,
            ),
        )  # fmt: skip
        if decision.changed and digest is not None and card is not None:
            self.conn.execute(
                codes.UPSERT_STATE,
                (
                    digest,
                    card.card_id,
                    UNLIMITED_USES if decision.uses_left is None else decision.uses_left,
                    decision.balance,
                    decision.status,
                ),
            )
        self._recorded = True
        verdict = self._verdict(decision, digest, card, scan.source, record_text, seq, amount)
        if self._request is not None:
            api_requests.record(self.conn, self._request, seq, verdict.to_json())
        return verdict

    def recorded_request(self, key: str) -> api_requests.Recorded | None:
        """The request committed under an idempotency key, with the verdict it got."""
        return api_requests.lookup(self.conn, key)

    def _verdict(
        self,
        decision: Decision,
        digest: bytes | None,
        card: Card | None,
        source: str,
        record_id: str | None,
        seq: int | None,
        amount: int | None,
    ) -> Verdict:
        # Positional, in Verdict's field order: on every scan, thirteen keyword arguments
        # cost more than the frozen dataclass they build.
        return Verdict(
            decision.outcome, decision.action, decision.reason, decision.detail,
            short(digest), card.card_id if card else None, str(card.kind) if card else None,
            decision.uses_left, decision.balance, amount, record_id, seq, source,
        )  # fmt: skip
