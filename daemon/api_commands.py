"""What the local API's commands mean: request dict in, response dict out.

Runs on the engine thread (the service answers `daemon.api.ApiServer`'s requests
between scans), so it may call the engine directly. `docs/local-api.md` is the
contract; this module validates fields, calls `Engine.check` / `redeem` / `reverse` /
`handle`, and builds the responses and events.

Events are published only after the engine returned, that is after its COMMIT
(durable before shown). No verdict event or response carries a plaintext code: a
verdict shows its digest prefix. A `payment` event carries the wallet payment code,
because the POS application must charge it; it is never stored or synced.

Two-phase cards: a scan that only checks (action `check`) is published as a `checked`
event whose `check_id` the POS application confirms with `redeem`. The code behind a
check is kept in memory only, for `[api] confirm_within`; nothing is redeemed without
the confirmation.

    commands = Commands(engine, server.publish)
    commands({"cmd": "check", "code": "DEMO-0001"})
    # {"ok": True, "verdict": {"verdict": "accepted", "action": "check", ...}}
"""

from __future__ import annotations

import hmac
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cards.scan import Scan
from cards.verdict import Action, Verdict
from daemon import box_key as box_key_mod
from daemon.api import Error, error
from daemon.box_key import BoxKey
from daemon.config_model import MAX_CARD_ID, MAX_DISPENSE_COUNT, Api
from daemon.debounce import Repeat
from daemon.dispense import Dispensed, grants_status, replayed
from daemon.engine import Engine, PaymentCode
from storage import dispensing
from storage.api_requests import RequestKey

MAX_CHECKS = 1000
"""Two-phase checks waiting for confirmation; the oldest is forgotten beyond it."""
MAX_KEY = 128
MAX_OPERATOR = 64

Result = Verdict | PaymentCode


class RequestError(Exception):
    """A request that cannot be served; becomes an error response."""

    def __init__(self, code: Error, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Check:
    text: str
    source: str
    until: float


class Commands:
    def __init__(
        self,
        engine: Engine,
        publish: Callable[[dict], None],
        *,
        status: Callable[[], dict] = dict,
        shown: Callable[[Result], None] | None = None,
        confirm_within: float = Api.default("confirm_within"),
        clock: Callable[[], float] = time.monotonic,
        box_key: BoxKey | None = None,
        dispensed: Callable[[Dispensed, bool], None] | None = None,
    ):
        """`publish` sends an event to subscribers; `status` adds the service's part of
        the `status` answer (drivers, sync); `shown` sees every verdict an API request
        produced, as the scan loop sees a scan's (console line, hook); `dispensed` sees
        every committed dispense and whether to print its receipts (console line,
        printer). The
        owner may replace `engine` (a reload builds a new one); pending checks survive
        it. Without `box_key`, the box key is read (or made) on the first dispense."""
        self.engine = engine
        self.publish = publish
        self.status = status
        self.shown = shown
        self.dispensed = dispensed
        self._box_key = box_key
        self.confirm_within = confirm_within
        self.clock = clock
        self._checks: OrderedDict[str, _Check] = OrderedDict()
        self._last_manual: tuple[str, dict] | None = None
        self._handlers: dict[str, Callable[[dict], dict]] = {
            "status": self._status,
            "check": self._check,
            "redeem": self._redeem,
            "reverse": self._reverse,
            "manual": self._manual,
            "dispense": self._dispense,
        }

    def __call__(self, request: dict) -> dict:
        """Serve one request (any JSON object with a `cmd`)."""
        handler = self._handlers.get(request.get("cmd"))  # type: ignore[arg-type]
        if handler is None:
            known = ", ".join(["subscribe", *self._handlers])
            return error(
                Error.UNKNOWN_COMMAND, f"unknown command {request.get('cmd')!r}; commands: {known}"
            )
        try:
            return handler(request)
        except RequestError as exc:
            return error(exc.code, exc.message)

    def scanned(self, scan: Scan, result: Result) -> dict:
        """Publish what a scan produced (call after `Engine.handle` returned) and return
        the event. A two-phase check is remembered for its confirmation."""
        event = self._event(scan.code, result)
        self.publish(event)
        return event

    # ------------------------------------------------------------------ commands

    def _status(self, request: dict) -> dict:
        engine = self.engine
        box = engine.config.box
        self._expire()
        status = {
            "box": box.id,
            "merchant": box.merchant,
            "store": box.store,
            "cache_seq": engine.cache_seq,
            "cache_time": engine.cache_time,
            "alarm": engine.alarm,
            "pending_checks": len(self._checks),
            "dispensing": self._dispensing_status(),
            **self.status(),
        }
        return {"ok": True, "status": status}

    def _dispensing_status(self) -> dict[str, object]:
        grants, problem = self.engine.held_grants()
        ids = [g.id for g in grants.grants] if grants else []
        used = dispensing.used_counters(self.engine.conn, ids)
        try:
            key: dict[str, object] = {**self.box_key().describe()}
        except RequestError as exc:  # status still answers; dispensing says why not
            key = {"box_key_id": None, "box_public_key": None, "box_key_problem": exc.message}
        return {**key, **grants_status(grants, used, problem)}

    def box_key(self) -> BoxKey:
        """The box key, read (or made) the first time it is needed."""
        if self._box_key is None:
            try:
                self._box_key = box_key_mod.load_or_create(self.engine.config.box.state_dir)
            except box_key_mod.BoxKeyError as exc:
                raise RequestError(Error.INTERNAL_ERROR, str(exc)) from None
        return self._box_key

    def _dispense(self, request: dict) -> dict:
        card = request.get("card")
        if isinstance(card, bool) or not isinstance(card, int) or not 0 < card <= MAX_CARD_ID:
            raise RequestError(Error.BAD_REQUEST, f'"card" must be a card id 1..{MAX_CARD_ID}')
        count = _count(request, "count") or 1
        if count > MAX_DISPENSE_COUNT:
            raise RequestError(
                Error.BAD_REQUEST, f'"count" may be at most {MAX_DISPENSE_COUNT} per request'
            )
        key = _text(request, "key", limit=MAX_KEY)
        operator = _text(request, "operator", limit=MAX_OPERATOR)
        to_print = request.get("print", False)
        if not isinstance(to_print, bool):
            raise RequestError(Error.BAD_REQUEST, '"print" must be true or false')
        box_key = self.box_key()
        request_key = None
        if key is not None:
            fingerprint = self._fingerprint("dispense", card, count, operator)
            recorded = self._recorded_key(key, fingerprint)
            if recorded is not None:
                again = replayed(recorded, box_key.private, self.engine.dispense_config.claim_url)
                shown = [claim.to_json() for claim in again.claims]
                return {**_dispense_answer(again, shown), "replayed": True}
            request_key = RequestKey(key, fingerprint)
        result = self.engine.dispense(card, count, box_key, "api", operator, request_key)
        return {**_dispense_answer(result, self.committed(result, to_print)), "replayed": False}

    def dispense_by_rule(self, card: int, count: int, source: str) -> Dispensed:
        """A rule's dispense (`[[dispense.rules]]`), after the redemption that triggered
        it was answered: committed, then published and shown as an API one is."""
        result = self.engine.dispense(card, count, self.box_key(), source)
        self.committed(result, True)
        return result

    def committed(self, result: Dispensed, to_print: bool) -> list[dict]:
        """Publish a dispense's committed records: a `dispensed` event per claim code
        (with its claim URL and QR, for the POS application to show), a `verdict`
        event for a recorded refusal. Returns each code's JSON, rendered once (encoding
        the QR is most of a dispense's time) for the answer too."""
        shown = [claim.to_json() for claim in result.claims]
        for item in shown:
            self.publish({"event": "dispensed", **item})
        refused = result.refused
        if refused is not None and refused.record_id is not None:
            self.publish({"event": "verdict", **refused.to_json()})
        if self.dispensed is not None and (result.claims or result.refused is not None):
            self.dispensed(result, to_print)
        return shown

    def _check(self, request: dict) -> dict:
        code = _required(request, "code")
        return self._answer(self.engine.check(code, source="api"))

    def _redeem(self, request: dict) -> dict:
        key = _required(request, "key", limit=MAX_KEY)
        code = _text(request, "code")
        check_id = _text(request, "check_id")
        if (code is None) == (check_id is None):
            raise RequestError(
                Error.BAD_REQUEST, 'give either "code" or "check_id" (from a checked event)'
            )
        amount = _count(request, "amount")
        uses = _count(request, "uses") or 1
        operator = _text(request, "operator", limit=MAX_OPERATOR)
        fingerprint = self._fingerprint("redeem", code, check_id, amount, uses, operator)
        replay = self._replay(key, fingerprint)
        if replay is not None:
            return replay
        if check_id is not None:
            self._expire()
            check = self._checks.get(check_id)
            if check is None:
                raise RequestError(
                    Error.UNKNOWN_CHECK,
                    f"no check {check_id} is waiting (confirmed already, older than "
                    f"{self.confirm_within:g} s, or redeemd restarted); scan the code again",
                )
            text, source = check.text, check.source
        else:
            assert code is not None  # exactly one of code and check_id, checked above
            text, source = code, "api"
        result = self.engine.redeem(
            text,
            source,
            amount=amount,
            uses=uses,
            operator=operator,
            request=RequestKey(key, fingerprint),
        )
        if check_id is not None and isinstance(result, Verdict) and result.accepted:
            del self._checks[check_id]
        return self._recorded(result)

    def _reverse(self, request: dict) -> dict:
        record_id = _required(request, "record_id")
        key = _text(request, "key", limit=MAX_KEY)
        operator = _text(request, "operator", limit=MAX_OPERATOR)
        request_key = None
        if key is not None:
            fingerprint = self._fingerprint("reverse", record_id, operator)
            replay = self._replay(key, fingerprint)
            if replay is not None:
                return replay
            request_key = RequestKey(key, fingerprint)
        result = self.engine.reverse(record_id, "api", operator=operator, request=request_key)
        return self._recorded(result)

    def _manual(self, request: dict) -> dict:
        code = _required(request, "code")
        # A lone surrogate ("\ud800") becomes bytes that are not UTF-8: `malformed`, as
        # from a scanner, instead of an exception.
        raw = code.encode("utf-8", "surrogatepass")
        scan = Scan(code=raw, source="manual", at=time.time())
        result = self.engine.handle(scan)
        if isinstance(result, Repeat):
            # Typed twice inside the debounce window: one scan, answered the same way.
            if self._last_manual is not None and self._last_manual[0] == code:
                return {**self._last_manual[1], "repeat": True}
            return {"ok": True, "repeat": True}
        event = self.scanned(scan, result)
        if self.shown is not None:
            self.shown(result)
        response = self._answer(result)
        if "check_id" in event:
            response["check_id"] = event["check_id"]
        self._last_manual = (code, response)
        return response

    # ------------------------------------------------------------------ pieces

    def _recorded(self, result: Result) -> dict:
        """The answer to a request that may have written a ledger row: published (it
        is committed) and shown like a scan's, unless nothing was recorded."""
        if isinstance(result, Verdict) and result.record_id is not None:
            self.publish(self._event(None, result))
            if self.shown is not None:
                self.shown(result)
        return {**self._answer(result), "replayed": False}

    def _answer(self, result: Result) -> dict:
        if isinstance(result, PaymentCode):
            # The caller sent the code itself; it is not echoed back.
            return {"ok": True, "payment": {"scheme": result.scheme, "source": result.source}}
        return {"ok": True, "verdict": result.to_json()}

    def _event(self, code: bytes | None, result: Result) -> dict:
        if isinstance(result, PaymentCode):
            # The one place a code travels in the clear: the POS application must hand
            # a wallet payment code to its payment provider to charge it. It goes only
            # to subscribers of this socket (mode 0660, the [api] group), never to the
            # ledger, the outbox, status, logs or stdout (PaymentCode.to_json has no code).
            return {**result.to_json(), "code": result.code}
        event: dict = {"event": "verdict", **result.to_json()}
        if (
            result.accepted
            and result.action is Action.CHECK
            and result.record_id is not None
            and code is not None
        ):
            self._remember(result.record_id, code, result.source)
            event["event"] = "checked"
            event["check_id"] = result.record_id
            event["confirm_within"] = self.confirm_within
        return event

    def _remember(self, check_id: str, code: bytes, source: str) -> None:
        self._expire()
        self._checks[check_id] = _Check(
            code.decode("utf-8", "replace"), source, self.clock() + self.confirm_within
        )
        while len(self._checks) > MAX_CHECKS:
            self._checks.popitem(last=False)

    def _expire(self) -> None:
        now = self.clock()
        checks = self._checks
        while checks:
            oldest = next(iter(checks.values()))
            if oldest.until > now:
                break
            checks.popitem(last=False)

    def _fingerprint(self, *fields: object) -> str:
        # Keyed like code digests: a stored fingerprint must not let anyone test guesses
        # of a short code against it.
        text = json.dumps(fields, separators=(",", ":")).encode()
        return hmac.new(self.engine.config.trust.code_key, text, "sha256").hexdigest()[:32]

    def _replay(self, key: str, fingerprint: str) -> dict | None:
        verdict = self._recorded_key(key, fingerprint)
        if verdict is None:
            return None
        return {"ok": True, "verdict": verdict, "replayed": True}

    def _recorded_key(self, key: str, fingerprint: str) -> dict | None:
        """What the request committed under `key` answered; None if the key is new."""
        recorded = self.engine.recorded_request(key)
        if recorded is None:
            return None
        if recorded.fingerprint != fingerprint:
            raise RequestError(
                Error.KEY_REUSED,
                f"key {key!r} was used for a different request (ledger seq {recorded.seq}); "
                "use a new key for each new request and the same key only to retry",
            )
        return recorded.verdict


def _dispense_answer(result: Dispensed, shown: list[dict]) -> dict:
    answer: dict = {"ok": True, "dispensed": shown}
    if result.refused is not None:
        answer["refused"] = result.refused.to_json()
    return answer


def _text(request: dict, name: str, limit: int = 0) -> str | None:
    """An optional text field: None when absent."""
    if request.get(name) is None:
        return None
    return _required(request, name, limit)


def _required(request: dict, name: str, limit: int = 0) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise RequestError(Error.BAD_REQUEST, f'"{name}" must be a non-empty string')
    if limit and len(value) > limit:
        raise RequestError(Error.BAD_REQUEST, f'"{name}" may be at most {limit} characters')
    return value


def _count(request: dict, name: str) -> int | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 53:
        raise RequestError(
            Error.BAD_REQUEST, f'"{name}" must be a positive integer (minor units for amounts)'
        )
    return value
