"""The console's ASGI app (Starlette): its routes, sessions, CSRF checks and roles.

Every page but the sign-in page needs a session; every POST needs the session's CSRF
token in its form (the sign-in form: the token of its own short cookie, a
double-submit), and every POST that changes something needs the operator role. What a
request does to the store runs on a worker thread holding the one store connection
(SQLite's and psycopg's connections are not for two threads at once); a password check
(Argon2id, deliberately slow) runs outside that lock.

    >>> console = Console(Path("keys/"), secure_cookies=True, metrics_token=token)
    >>> uvicorn.run(console.app(), host="127.0.0.1", port=8081)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend import accounts, boxes_view, broker_acl
from backend.console import activity, audit, auth, codes, fleet, metrics, pages, records
from backend.keystore import Keystore, KeystoreError
from backend.store import Store, StoreError
from backend.store_keeper import StoreOnDemand

STATIC = Path(__file__).parent / "static"
MAX_FORM = 16 * 1024
USER_FAILURES = (5, 15 * 60)
"""A user name is refused sign-ins after 5 failures in 15 minutes (a guessed password)."""
CLIENT_FAILURES = (20, 15 * 60)
"""A client address, after 20 failures in 15 minutes (names tried one after another)."""

VERIFYING = 4
"""Password checks at once (Argon2id: 64 MiB each)."""

T = TypeVar("T")

_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class _SecurityHeaders:
    """Adds the headers every answer carries (no inline script may run, no framing) and
    the time the app took."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Server-Timing: the app's own time to the response's start, which
                # bench/console.py reads beside its round trip.
                took = f"app;dur={(time.perf_counter() - start) * 1000:.2f}".encode()
                message["headers"] = [
                    *message.get("headers", []),
                    *_HEADERS,
                    (b"server-timing", took),
                ]
            await send(message)

        await self.app(scope, receive, sending)


class Unavailable(RuntimeError):
    """The database cannot answer now; the page says so (503) and a later request retries."""


class Refused(Exception):
    """A request refused with a page: status and a message for the person."""

    def __init__(self, status: int, title: str, text: str):
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


class Console:
    """The console over one backend store; `app()` is the ASGI application."""

    def __init__(
        self,
        directory: Path,
        database: str | None = None,
        *,
        secure_cookies: bool = True,
        metrics_token: str | None = None,
        clock: Callable[[], float] = time.time,
        say: Callable[[str], None] = print,
    ):
        self.dir = directory
        self.database = database
        self.secure = secure_cookies
        self.metrics_token = metrics_token
        self.clock = clock
        self.say = say
        # The __Host- prefix makes a browser refuse the cookie unless Secure, for this
        # host only and path /: no subdomain or plain-http page can set or shadow it.
        prefix = "__Host-" if secure_cookies else ""
        self.session_cookie = f"{prefix}redeemd-console"
        self.login_cookie = f"{prefix}redeemd-login"
        self.users = auth.RateLimiter(*USER_FAILURES)
        self.clients = auth.RateLimiter(*CLIENT_FAILURES)
        self._lock = threading.Lock()
        self._verifying = threading.BoundedSemaphore(VERIFYING)
        self._limits = threading.RLock()
        self._db = StoreOnDemand(directory, database, say)
        self.lookups = codes.Lookups()

    # ------------------------------------------------------------ the store

    def _locked(self, work: Callable[[Store], T]) -> T:
        with self._lock:
            store = self._db.store()
            if store is None:
                raise Unavailable("the database is unreachable")
            try:
                return work(store)
            except store.errors as exc:
                self._db.failed(exc)
                raise Unavailable(str(exc)) from None

    async def db(self, work: Callable[[Store], T]) -> T:
        """Run `work(store)` on a worker thread, alone on the store."""
        return await run_in_threadpool(self._locked, work)

    def _waiting(self, name: str, client: str, now: float) -> float:
        """Seconds until `name` from `client` may try again (0: now)."""
        with self._limits:
            return max(
                self.users.retry_after(f"user:{name}", now),
                self.clients.retry_after(f"client:{client}", now),
            )

    def _attempt(
        self,
        name: str,
        client: str,
        found: tuple[auth.User, str] | None,
        password: str,
        now: float,
    ) -> auth.User | float | None:
        """One password check, on a worker thread: the user, None for a wrong password,
        or the seconds to wait when rate limited."""
        # Each Argon2id check takes 64 MiB for a moment: a burst of sign-in requests waits
        # for one of a few slots instead of each taking that memory. Every check counts as
        # a failure from before it starts (forgiven if the password is right), so a burst
        # sent at once gets no more guesses than the limit, however many run together.
        with self._verifying:
            with self._limits:
                wait = self._waiting(name, client, now)
                if wait > 0:
                    return wait
                self.users.failed(f"user:{name}", now)
                self.clients.failed(f"client:{client}", now)
            user = auth.verify(found, password)
            if user is not None:
                with self._limits:
                    self.users.clear(f"user:{name}")
                    self.clients.forgive(f"client:{client}", now)
            return user

    # ------------------------------------------------------------ sessions and forms

    async def session(self, request: Request) -> auth.Session | None:
        token = request.cookies.get(self.session_cookie)
        if not token:
            return None
        now = self.clock()
        return await self.db(lambda s: auth.find_session(s, token, now))

    async def form(self, request: Request) -> dict[str, str]:
        """An urlencoded form's fields (first value of each); others are refused."""
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind != "application/x-www-form-urlencoded":
            raise Refused(415, "Not a form", "This address takes a submitted form only.")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                raise Refused(413, "Too large", "The form is larger than this console takes.")
        try:
            fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=50)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "Bad form", "The form could not be read.") from None
        return {k: v[0] for k, v in fields.items()}

    async def acting(self, request: Request, action: str) -> tuple[auth.Session, dict[str, str]]:
        """The session and form of a POST that changes something: signed in, the form's
        CSRF token the session's, the operator role. A refusal is audited."""
        session = await self.session(request)
        if session is None:
            raise Refused(403, "Signed out", "Your session has ended: sign in again.")
        fields = await self.form(request)
        if not auth.same_token(session.csrf, fields.get("csrf")):
            await self.audit(request, session.user.name, action, None, "refused: CSRF token")
            raise Refused(
                403,
                "Form refused",
                "This form did not come from your console session (its security token is "
                "missing or old): reload the page and submit it again.",
            )
        if not session.user.may_act:
            await self.audit(request, session.user.name, action, None, "refused: viewer")
            raise Refused(
                403,
                "Not allowed",
                f"Your role ({session.user.role}) may look but not act; ask an operator, or "
                "an administrator to give you the operator role.",
            )
        return session, fields

    async def audit(
        self, request: Request, actor: str | None, action: str, target: str | None, outcome: str
    ) -> None:
        client = request.client.host if request.client else None
        now = self.clock()
        await self.db(
            lambda s: audit.record(
                s, actor, action, target, client=client, outcome=outcome, now=now
            )
        )

    def _set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="strict",
        )

    # ------------------------------------------------------------ routes

    def app(self) -> Starlette:
        app = Starlette(
            routes=[
                Route("/", self.fleet_page, methods=["GET"]),
                Route("/fleet/rows", self.fleet_rows, methods=["GET"]),
                Route("/boxes", self.register_box, methods=["POST"]),
                Route("/login", self.login_page, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/audit", self.audit_page, methods=["GET"]),
                Route("/conflicts", self.conflicts_page, methods=["GET"]),
                Route("/box/{box}", self.box_page, methods=["GET"]),
                Route("/activity", self.activity_page, methods=["GET"]),
                Route("/activity.csv", self.activity_csv, methods=["GET"]),
                Route("/codes", self.codes_page, methods=["GET"]),
                Route("/codes/lookup", self.code_lookup, methods=["POST"]),
                Route("/codes/act", self.code_act, methods=["POST"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
            ],
            exception_handlers={Refused: self._refused, Unavailable: self._unavailable},
            lifespan=self._lifespan,
        )
        app.add_middleware(_SecurityHeaders)
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        with self._lock:
            self._db.close()

    async def _refused(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        session = None
        with contextlib.suppress(Unavailable, Refused):
            session = await self.session(request)
        return HTMLResponse(pages.message_page(exc.title, exc.text, session), exc.status)

    async def _unavailable(self, request: Request, exc: Exception) -> Response:
        text = "The backend database does not answer; this page will work again once it does."
        if request.url.path in ("/fleet/rows", "/metrics"):
            return PlainTextResponse(text, 503)
        return HTMLResponse(pages.message_page("Database unavailable", text, None), 503)

    async def login_page(self, request: Request) -> Response:
        if await self.session(request) is not None:
            return RedirectResponse("/", 303)
        token = secrets.token_urlsafe(32)
        response = HTMLResponse(pages.login_page(token))
        self._set_cookie(response, self.login_cookie, token, 3600)
        return response

    async def login(self, request: Request) -> Response:
        fields = await self.form(request)
        expected = request.cookies.get(self.login_cookie)
        if not expected or not auth.same_token(expected, fields.get("csrf")):
            raise Refused(
                403,
                "Sign-in refused",
                "The sign-in form was old or not from this console: open the sign-in page "
                "again and sign in from there.",
            )
        name = fields.get("name", "").strip()[:64]
        password = fields.get("password", "")[:1024]
        client = request.client.host if request.client else "unknown"
        now = self.clock()
        outcome: auth.User | float | None = self._waiting(name, client, now)
        if not outcome:
            found = await self.db(lambda s: auth.password_hash_of(s, name))
            outcome = await run_in_threadpool(self._attempt, name, client, found, password, now)
            if outcome is None:
                # The actor only if the name exists: a name field sometimes holds a password.
                await self.audit(
                    request, name if found else None, "sign in", None, "refused: wrong password"
                )
                return self._login_again(fields, "Wrong user name or password.", 401)
        if not isinstance(outcome, auth.User):
            await self.audit(request, name or None, "sign in", None, "refused: rate limited")
            minutes = max(1, round(outcome / 60))
            return self._login_again(
                fields,
                f"Too many failed sign-ins for this user or from this address. Try again in "
                f"{minutes} minute{'s' if minutes != 1 else ''}, or ask an administrator to "
                "check the audit log.",
                429,
            )
        user = outcome
        token, _ = await self.db(lambda s: auth.open_session(s, user, now))
        await self.audit(request, user.name, "sign in", None, audit.OK)
        response = RedirectResponse("/", 303)
        self._set_cookie(response, self.session_cookie, token, auth.SESSION_SECONDS)
        response.delete_cookie(
            self.login_cookie, path="/", secure=self.secure, httponly=True, samesite="strict"
        )
        return response

    def _login_again(self, fields: dict[str, str], error: str, status: int) -> Response:
        token = secrets.token_urlsafe(32)
        response = HTMLResponse(pages.login_page(token, error, fields.get("name", "")[:64]), status)
        self._set_cookie(response, self.login_cookie, token, 3600)
        return response

    async def logout(self, request: Request) -> Response:
        session = await self.session(request)
        if session is not None:
            fields = await self.form(request)
            if not auth.same_token(session.csrf, fields.get("csrf")):
                raise Refused(403, "Form refused", "Reload the page and sign out from there.")
            token = request.cookies[self.session_cookie]
            await self.db(lambda s: auth.close_session(s, token))
            await self.audit(request, session.user.name, "sign out", None, audit.OK)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(
            self.session_cookie, path="/", secure=self.secure, httponly=True, samesite="strict"
        )
        return response

    async def fleet_page(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        query = self._query(request)
        now = int(self.clock())
        rows = await self.db(lambda s: s.box_rows())
        page = fleet.select(rows, query, now)
        notice = ""
        if request.query_params.get("registered"):
            notice = f"Box {query.q} registered."
        return HTMLResponse(
            pages.fleet_page(page, query, now, session, notice=notice),
            headers={"cache-control": "no-store"},
        )

    def _query(self, request: Request) -> fleet.Query:
        try:
            return fleet.Query.parse(request.query_params)
        except fleet.QueryError as exc:
            raise Refused(
                400, "Bad address", f"{exc}. Open the fleet page from its menu."
            ) from None

    async def fleet_rows(self, request: Request) -> Response:
        """The fleet table's body for the page's live update, as JSON."""
        if await self.session(request) is None:
            return JSONResponse({"error": "signed out"}, 401)
        query = self._query(request)
        now = int(self.clock())
        rows = await self.db(lambda s: s.box_rows())
        page = fleet.select(rows, query, now)
        body = json.dumps(
            {"rows": pages.fleet_rows(page, now), "summary": pages.fleet_summary(page.counts)}
        ).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {"etag": etag, "cache-control": "no-store"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    async def register_box(self, request: Request) -> Response:
        session, fields = await self.acting(request, "box add")
        merchant, box = fields.get("merchant", "").strip(), fields.get("box", "").strip()
        target = f"{merchant[:64]}/{box[:64]}"
        try:
            # The names `box add` takes: each is a topic level and a word of the broker ACL.
            broker_acl.check_name("merchant", merchant)
            broker_acl.check_name("box id", box)
        except broker_acl.AclError as exc:
            raise Refused(400, "Not registered", str(exc)) from None
        try:
            await self.db(lambda s: s.add_boxes(merchant, [box]))
        except StoreError as exc:
            await self.audit(request, session.user.name, "box add", target, f"refused: {exc}")
            raise Refused(409, "Not registered", str(exc)) from None
        await self.audit(request, session.user.name, "box add", target, audit.OK)
        return RedirectResponse("/?" + urlencode({"q": box, "registered": "1"}), 303)

    async def audit_page(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        before = request.query_params.get("before")
        before_ms = int(before) if before and before.isdigit() else None
        entries = await self.db(lambda s: audit.recent(s, 200, before_ms))
        next_before = entries[-1].at_ms if len(entries) == 200 else None
        return HTMLResponse(pages.audit_page(entries, session, next_before))

    async def conflicts_page(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        found = await self.db(lambda s: records.conflicts(s))
        overspent = await self.db(lambda s: accounts.overspends(s))
        raced = await self.db(lambda s: accounts.transfer_conflicts(s))
        return HTMLResponse(pages.conflicts_page(found, overspent, raced, session))

    async def box_page(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        box = request.path_params["box"]
        now = int(self.clock())

        def read(store: Store) -> tuple[Any, ...] | None:
            rows = [r for r in store.box_rows() if r.box == box]
            if not rows:
                return None
            merchant = rows[0].merchant
            recent = records.recent_records(store, merchant, box)
            status = rows[0].status
            return (
                boxes_view.view(rows, now)[0],
                recent,
                records.by_reason(recent),
                records.gaps(store, merchant, box),
                records.conflicts(store, box=box),
                records.dispensing(store, box, status.raw if status else None),
                store.status_history(merchant, box),
            )

        found = await self.db(read)
        if found is None:
            raise Refused(
                404, "No such box", f"No box {box} is registered (redeemd-backend box add)."
            )
        entry, recent, reasons, gaps, conflicts, granted, history = found
        return HTMLResponse(
            pages.box_page(entry, recent, reasons, gaps, conflicts, granted, history, now, session)
        )

    async def metrics(self, request: Request) -> Response:
        if self.metrics_token is None:
            return PlainTextResponse(
                "/metrics is off: start the console with --metrics-token-file", 404
            )
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.metrics_token}".encode()):
            return PlainTextResponse(
                "give the metrics token: Authorization: Bearer TOKEN",
                401,
                headers={"www-authenticate": 'Bearer realm="redeemd-metrics"'},
            )
        now = int(self.clock())
        text = await self.db(lambda s: metrics.render(s, now))
        return Response(text, media_type=None, headers={"content-type": metrics.CONTENT_TYPE})

    async def health(self, request: Request) -> Response:
        await self.db(lambda s: s.engine.execute("SELECT 1").fetchone())
        return PlainTextResponse("ok")

    # ------------------------------------------------------------ activity

    def _activity(self, request: Request) -> activity.Filters:
        try:
            return activity.Filters.parse(request.query_params, self.clock())
        except activity.FilterError as exc:
            raise Refused(
                400, "Bad filter", f"{exc}. Open the activity page from its menu."
            ) from None

    async def _select(self, filters: activity.Filters) -> activity.Activity:
        try:
            return await self.db(lambda s: activity.select(s, filters))
        except activity.FilterError as exc:
            raise Refused(400, "Too many records", str(exc)) from None

    async def activity_page(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        found = await self._select(self._activity(request))
        # pygal takes some milliseconds a chart: off the event loop, and off the store lock.
        try:
            charts = await run_in_threadpool(activity.charts, found)
        except activity.ChartsMissing as exc:
            self.say(f"activity page: {exc}")
            raise Refused(500, "Charts unavailable", str(exc)) from None
        return HTMLResponse(
            pages.activity_page(found, charts, session), headers={"cache-control": "no-store"}
        )

    async def activity_csv(self, request: Request) -> Response:
        if await self.session(request) is None:
            return PlainTextResponse("signed out: sign in to the console first", 401)
        filters = self._activity(request)
        found = await self._select(filters)
        name = f"activity-{filters.by}-{filters.since}-{filters.until}.csv"
        return Response(
            activity.csv_text(found),
            media_type="text/csv; charset=utf-8",
            headers={
                "content-disposition": f'attachment; filename="{name}"',
                "cache-control": "no-store",
            },
        )

    # ------------------------------------------------------------ batches and codes

    async def _codes(self, session: auth.Session, status: int = 200, **shown: Any) -> Response:
        def read(store: Store) -> tuple[list[codes.BatchLine], list[str]]:
            merchants = sorted({r.merchant for r in store.box_rows()} | set(store.merchants()))
            return codes.batches(store), merchants

        lines, merchants = await self.db(read)
        return HTMLResponse(
            pages.codes_page(lines, merchants, session, **shown),
            status,
            headers={"cache-control": "no-store"},
        )

    async def codes_page(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        return await self._codes(session)

    async def code_lookup(self, request: Request) -> Response:
        """Digest the typed code, show its history. Any signed-in role may look up (it
        changes nothing), with the session's CSRF token; each look-up is audited."""
        session = await self.session(request)
        if session is None:
            raise Refused(403, "Signed out", "Your session has ended: sign in again.")
        fields = await self.form(request)
        if not auth.same_token(session.csrf, fields.get("csrf")):
            await self.audit(
                request, session.user.name, "code look-up", None, "refused: CSRF token"
            )
            raise Refused(403, "Form refused", "Reload the page and look the code up again.")
        merchant = fields.get("merchant", "").strip()[:64]
        text = fields.pop("code", "")[:256]
        try:
            digest = codes.digest_of(Keystore(self.dir), text)
        except codes.CodeError as exc:
            return await self._codes(session, 400, error=f"The code typed is {exc}.")
        except KeystoreError as exc:
            raise Refused(500, "No code key", str(exc)) from None
        finally:
            del text
        now = self.clock()
        found = codes.Found(merchant, digest, session.user.name, now)
        seen = await self.db(lambda s: codes.history(s, merchant, digest))
        await self.audit(
            request, session.user.name, "code look-up", f"{merchant}/{found.shown}", audit.OK
        )
        ref = self.lookups.keep(found)
        return await self._codes(session, found=found, seen=seen, ref=ref)

    async def code_act(self, request: Request) -> Response:
        """Revoke or block a looked-up code: a signed batch, stored for `publish`."""
        session, fields = await self.acting(request, "code revoke/block")
        action = fields.get("action", "")
        kind = codes.ACTIONS.get(action)
        if kind is None:
            raise Refused(400, "Bad form", "Choose revoke or block.")
        found = self.lookups.get(fields.get("ref", ""), session.user.name, self.clock())
        if found is None:
            raise Refused(
                410,
                "Look the code up again",
                "This look-up is older than 15 minutes or the console restarted: look the "
                "code up again, then revoke or block it.",
            )
        target = f"{found.merchant}/{found.shown}"
        try:
            issued = await self.db(
                lambda s: codes.issue(s, Keystore(self.dir), found.merchant, kind, [found.digest])
            )
        except (KeystoreError, StoreError) as exc:
            await self.audit(
                request, session.user.name, f"code {action}", target, f"refused: {exc}"
            )
            raise Refused(409, f"Not {action}d", str(exc)) from None
        await self.audit(
            request, session.user.name, f"code {action}", target, f"ok: batch {issued.seq}"
        )
        seen = await self.db(lambda s: codes.history(s, found.merchant, found.digest))
        return await self._codes(
            session,
            found=found,
            seen=seen,
            ref=fields.get("ref", ""),
            notice=f"{kind.value} batch {found.merchant}/{issued.seq} issued for code "
            f"{found.shown}; the running publish sends it to the boxes.",
        )
