"""`redeemd-backend claim`: the page a customer's phone opens from a box's claim QR code.

A box hands out a claim code (cards/claim_code.py) wrapped in its claim URL,
`https://claim.example/c/RC1...`. Opening it (GET) shows what it is for and an "Add to
wallet" button, and claims nothing: chat apps and mail scanners open links to preview
them, and a preview must not use up the customer's code. The button POSTs to the same
URL, and the claim is decided in one readable path (`ClaimService.claim`):

1. the text is a claim code (else 400, `malformed`);
2. its grant is one the backend made (else 404, `no_grant`), for the box key the code
   names, and the code's signature verifies with that key (else 403, `bad_signature`);
3. `cards.claim_code.refusal` against the grant as the backend holds it now: revoked,
   card not granted, counter over the quota, past its claim-by date (410 / 403);
4. the claim row is committed once per (grant, counter) (backend/claims.py; a second
   claim gets 409, `already_claimed`), with the signed code it gives (a new serial of
   the card, cards/signed_code.py, signed by the issuer key), before the page shows
   that code as a QR code (inline SVG) and as text.

With `?format=json` either method answers JSON instead of a page (the QR code as PNG,
base64): for tests, scripts and a wallet app. A lost database is a 503 page and the
service reconnects on a later request; junk paths, wrong methods and overlong or
non-ASCII codes get a 4xx and the service goes on. No line it prints holds a code:
claim codes are named by their keyed digest's first 8 hex digits. Run it behind a TLS
reverse proxy (docs/backend.md).

    >>> service = ClaimService(Path("keys/"))
    >>> uvicorn.run(service.app(), host="127.0.0.1", port=8080, access_log=False)
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import segno
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from backend import claims, grants
from backend.keystore import Keystore, KeystoreError
from backend.store import Store
from backend.store_keeper import StoreOnDemand
from cards import claim_code, keys, signed_code
from cards.claim_code import ClaimCode, ClaimCodeError
from cards.digest import code_digest
from cards.grant import GrantSet
from cards.verdict import Reason

MAX_CODE = 512
"""Longer path segments are refused before anything else (414)."""
ALREADY_CLAIMED = "already_claimed"
MALFORMED = Reason.MALFORMED.value
UNAVAILABLE = "unavailable"

# What the customer reads for each outcome, and the HTTP status. The reason code is on
# the page too, for support (docs/reasons.md; already_claimed and unavailable are the
# claim service's own).
_OUTCOMES: dict[str, tuple[int, str, str]] = {
    MALFORMED: (
        400,
        "This link is not a claim link",
        "Check that the whole link was copied, or scan the code again.",
    ),
    Reason.BAD_SIGNATURE.value: (
        403,
        "This code is not genuine",
        "It was not made by one of our stores. Ask the staff for a new one.",
    ),
    Reason.NO_GRANT.value: (
        404,
        "We do not know this offer",
        "The code is not one of our current offers. Ask the staff for help.",
    ),
    Reason.GRANT_REVOKED.value: (
        410,
        "This offer was stopped",
        "The shop stopped handing out this card.",
    ),
    Reason.GRANT_EXPIRED.value: (410, "This offer has ended", "The code is too old to claim."),
    Reason.EXPIRED.value: (410, "This code has expired", "It had to be claimed earlier."),
    Reason.QUOTA_EXHAUSTED.value: (
        403,
        "This code is not valid",
        "It is outside what the shop handed out. Ask the staff for help.",
    ),
    ALREADY_CLAIMED: (
        409,
        "This code was already claimed",
        "A code can be added to one wallet only, and this one already was.",
    ),
    UNAVAILABLE: (
        503,
        "We cannot add cards right now",
        "Nothing was claimed. Please open the link again in a few minutes.",
    ),
}


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Outcome:
    """What one claim (or look) came to: a claimed code, or a reason it was not."""

    reason: str | None
    detail: str = ""
    title: str = ""
    card_id: int | None = None
    claimed: claims.Claimed | None = None
    claimed_at: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return 200 if self.reason is None else _OUTCOMES[self.reason][0]


@dataclass(frozen=True)
class _Claimable:
    """A claim code that passed every check, and what claiming it needs."""

    grant: grants.GrantRow
    title: str
    private: bytes
    delegation: keys.Delegation


class ClaimService:
    """The claim decision and its pages; `app()` is the ASGI application."""

    def __init__(
        self,
        directory: Path,
        *,
        database: str | None = None,
        code_days: float | None = None,
        say: Callable[[str], None] = _print,
        clock: Callable[[], float] = time.time,
    ):
        self.keystore = Keystore(directory)
        # Fail at start, with the command that fixes it, not at the first claim.
        self.code_key = self.keystore.code_key()
        self.keystore.require_signing()
        self.code_days = code_days
        self.say = say
        self.clock = clock
        self._db = StoreOnDemand(directory, database, say)
        # One connection, one statement at a time: requests run in a thread pool.
        self._lock = threading.Lock()
        self._titles: dict[str, tuple[int, dict[int, str]]] = {}

    # ------------------------------------------------------------ the decision

    def claim(self, text: str) -> Outcome:
        """Claim `text` (the claim code from the URL) once, or say why not."""
        return self._with_store(text, self._claim)

    def look(self, text: str) -> Outcome:
        """What the GET page shows: the card, or why it cannot be claimed. Claims nothing."""
        return self._with_store(text, self._look)

    def _with_store(
        self, text: str, step: Callable[[Store, ClaimCode, str, int], Outcome]
    ) -> Outcome:
        try:
            code = claim_code.parse(text)
        except ClaimCodeError as exc:
            return Outcome(MALFORMED, str(exc))
        ref = code_digest(self.code_key, text).hex()
        with self._lock:
            store = self._db.store()
            if store is None:
                return Outcome(UNAVAILABLE, "database unreachable")
            try:
                return step(store, code, ref, int(self.clock()))
            except store.errors as exc:
                self._db.failed(exc)
                return Outcome(UNAVAILABLE, "database error")

    def _look(self, store: Store, code: ClaimCode, ref: str, now: int) -> Outcome:
        checked = self._check(store, code, now)
        if isinstance(checked, Outcome):
            return checked
        return Outcome(None, "", title=checked.title, card_id=code.card_id)

    def _claim(self, store: Store, code: ClaimCode, ref: str, now: int) -> Outcome:
        checked = self._check(store, code, now)
        if isinstance(checked, Outcome):
            self._log(code, ref, checked)
            return checked
        delegation = checked.delegation
        not_before = max(now - 60, delegation.not_before)
        not_after = 0  # the card's own window, ending with the delegation (protocol 8)
        if self.code_days:
            not_after = min(now + int(self.code_days * 86400), delegation.not_after)
        try:
            claimed = claims.record(
                store,
                code=code,
                merchant=checked.grant.merchant,
                box=checked.grant.box,
                claim_digest=ref,
                code_key=self.code_key,
                now=now,
                sign=lambda serial: signed_code.mint(
                    checked.private, code.card_id, serial, not_before, not_after
                ),
            )
        except claims.AlreadyClaimed as exc:
            outcome = Outcome(
                ALREADY_CLAIMED,
                "",
                claimed_at=exc.claimed_at,
                title=checked.title,
                card_id=code.card_id,
            )
        else:
            outcome = Outcome(None, "", claimed=claimed, title=checked.title, card_id=code.card_id)
        self._log(code, ref, outcome)
        return outcome

    def _check(self, store: Store, code: ClaimCode, now: int) -> Outcome | _Claimable:
        """Whether `code` may be claimed now: the refusal, or what claiming it needs."""
        held = grants.find(store, code.grant_id)
        if held is None:
            return Outcome(Reason.NO_GRANT.value, f"grant {code.grant_id} is unknown")
        title, card = self._title(store, held.merchant, code.card_id), code.card_id
        if held.box_key_id != code.box_key_id or not claim_code.verify(code, held.box_key):
            return Outcome(
                Reason.BAD_SIGNATURE.value, "signature does not verify", title=title, card_id=card
            )
        when = claims.claimed_at(store, code.grant_id, code.counter)
        if when is not None:
            return Outcome(ALREADY_CLAIMED, "", claimed_at=when, title=title, card_id=card)
        try:
            private, delegation = self.keystore.signer(held.merchant, now)
        except (KeystoreError, keys.TrustError) as exc:
            self.say(f"cannot sign codes for {held.merchant}: {exc}")
            return Outcome(UNAVAILABLE, "the issuer key cannot sign now", title=title, card_id=card)
        # The grant as the backend holds it now (revoked or not), in the set's shape.
        current = GrantSet(
            merchant=held.merchant,
            box=held.box,
            box_key_id=held.box_key_id,
            seq=0,
            created_at=now,
            grants=(held.grant,),
            issuer=delegation,
            raw=b"",
        )
        refused = claim_code.refusal(code, current, now)
        if refused is not None:
            return Outcome(refused[0].value, refused[1], title=title, card_id=card)
        return _Claimable(held, title, private, delegation)

    def _title(self, store: Store, merchant: str, card_id: int) -> str:
        seq = claims.latest_cards_seq(store, merchant)
        cached = self._titles.get(merchant)
        if cached is None or cached[0] != seq:
            public = self.keystore.public("root")
            titles = claims.card_titles(store, merchant, {keys.key_id(public): public})
            self._titles[merchant] = cached = (seq, titles)
        return cached[1].get(card_id, "")

    def _log(self, code: ClaimCode, ref: str, outcome: Outcome) -> None:
        where = f"grant {code.grant_id} counter {code.counter} card {code.card_id}"
        if outcome.claimed is not None:
            self.say(
                f"claimed {ref[:8]}: {where} box {outcome.claimed.box} -> serial "
                f"{outcome.claimed.serial} (digest {outcome.claimed.code_digest[:8]})"
            )
        else:
            self.say(
                f"refused {ref[:8]} ({outcome.reason}): {where}; {outcome.detail}".rstrip("; ")
            )

    # ------------------------------------------------------------ HTTP

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/c/{code}", self._endpoint, methods=["GET", "POST"]),
                # A claim URL in capitals (HTTPS://HOST/C/) makes the box's QR code
                # smaller: all of it then fits the QR alphanumeric mode.
                Route("/C/{code}", self._endpoint, methods=["GET", "POST"]),
                Route("/health", self._health, methods=["GET"]),
            ],
            exception_handlers={500: self._crashed},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        with self._lock:
            self._db.close()

    async def _endpoint(self, request: Request) -> Response:
        text = request.path_params["code"]
        as_json = request.query_params.get("format") == "json"
        if len(text) > MAX_CODE:
            return _page(414, "This link is too long", "Scan the code again.", MALFORMED, as_json)
        if not text.isascii() or not text.isprintable():
            outcome = Outcome(MALFORMED, "not ASCII")
        elif request.method == "POST":
            outcome = await run_in_threadpool(self.claim, text)
        else:
            outcome = await run_in_threadpool(self.look, text)
            if outcome.reason is None:
                return _offer(outcome, as_json)
        if outcome.claimed is not None:
            return _claimed(outcome, as_json)
        return _refusal(outcome, as_json)

    async def _health(self, request: Request) -> Response:
        def check() -> bool:
            with self._lock:
                store = self._db.store()
                if store is None:
                    return False
                try:
                    store.engine.execute("SELECT 1").fetchone()
                except store.errors as exc:
                    self._db.failed(exc)
                    return False
                return True

        ok = await run_in_threadpool(check)
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503, headers=_HEADERS)

    async def _crashed(self, request: Request, exc: Exception) -> Response:
        self.say(f"error answering a request: {type(exc).__name__}: {exc}")
        return _page(
            500,
            "Something went wrong",
            "Nothing was claimed. Please try again.",
            "error",
            request.query_params.get("format") == "json",
        )


# ------------------------------------------------------------------ pages

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'"
    ),
    "X-Robots-Tag": "noindex",
}
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:2rem auto;padding:0 1rem;"
    "text-align:center}button{font-size:1.2rem;padding:.8rem 2rem}"
    ".code{font-family:monospace;word-break:break-all;font-size:.8rem}"
    ".support{color:#666;font-size:.8rem;margin-top:2rem}svg{max-width:100%;height:auto}"
)


def _html(status: int, heading: str, body: str) -> HTMLResponse:
    document = (
        '<!doctype html><html><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta name="robots" content="noindex"><title>{html.escape(heading)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(heading)}</h1>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status, headers=_HEADERS)


def _page(status: int, heading: str, words: str, reason: str, as_json: bool) -> Response:
    if as_json:
        return JSONResponse(
            {"result": "refused", "reason": reason, "message": f"{heading}. {words}"},
            status_code=status,
            headers=_HEADERS,
        )
    return _html(
        status,
        heading,
        f"<p>{html.escape(words)}</p>"
        f'<p class="support">For support: reason <code>{html.escape(reason)}</code></p>',
    )


def _card_name(outcome: Outcome) -> str:
    return outcome.title or (f"card {outcome.card_id}" if outcome.card_id is not None else "")


def _offer(outcome: Outcome, as_json: bool) -> Response:
    if as_json:
        return JSONResponse(
            {"result": "claimable", "card_id": outcome.card_id, "title": outcome.title},
            headers=_HEADERS,
        )
    # action="": the form posts to this very URL, whatever prefix a proxy put before it.
    return _html(
        200,
        _card_name(outcome) or "A card for your wallet",
        "<p>Add this card to your wallet. Each code can be added once.</p>"
        '<form method="post" action=""><button type="submit">Add to wallet</button></form>',
    )


def _refusal(outcome: Outcome, as_json: bool) -> Response:
    reason = outcome.reason or UNAVAILABLE
    status, heading, words = _OUTCOMES[reason]
    if outcome.claimed_at is not None:
        words = f"{words} It was claimed at {keys.iso(outcome.claimed_at)}."
    if reason == Reason.EXPIRED.value and outcome.detail:
        words = f"{words} ({outcome.detail})"
    response = _page(status, heading, words, reason, as_json)
    return response


def _claimed(outcome: Outcome, as_json: bool) -> Response:
    claimed = outcome.claimed
    assert claimed is not None
    qr = segno.make_qr(claimed.code, error="m")
    if as_json:
        png = io.BytesIO()
        qr.save(png, kind="png", scale=6, border=4)
        return JSONResponse(
            {
                "result": "claimed",
                "code": claimed.code,
                "card_id": claimed.card_id,
                "title": outcome.title,
                "serial": claimed.serial,
                "claimed_at": claimed.claimed_at,
                "qr_png": base64.b64encode(png.getvalue()).decode("ascii"),
            },
            headers=_HEADERS,
        )
    name = html.escape(_card_name(outcome))
    return _html(
        200,
        "Added",
        f"<p>Your {name} is ready. Show this code at any of our stores, or keep it in your "
        "wallet app.</p>"
        f"{qr.svg_inline(scale=6, border=4)}"
        f'<p class="code">{html.escape(claimed.code)}</p>'
        "<p>Save this page or take a screenshot: it is shown once.</p>",
    )
