"""The merchant console (issue 15) in a real browser against the real `redeemd-backend
console` process, on each store: signing in (a wrong password refused, the rate
limit), the fleet table and a box going offline without a reload, CSRF and role
refusals, keyboard navigation and labels on every form, /metrics, the user CLI.
Screenshots of each page are kept (tests/browser.py says where)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import browser
import pytest
from backend_helpers import CliProcess, make_backend, record, wait_until
from broker import free_port
from browser import artifacts, chromium, focused, serve_console, shot, unlabelled
from conftest import ROOT

from backend import grants
from backend.console import auth
from backend.console.fleet import Query, select
from backend.events import parse_message
from backend.keystore import Keystore
from backend.store import DATABASE_ENV, BoxRow, BoxStatus, Store
from cards import keys

PASSWORD = "correct horse battery staple"
VIEWER_PASSWORD = "viewer passphrase here"
TOKEN = "metrics-token-0123456789abcdef"
BOXES = ("box-0001", "box-0002", "box-0003")


def backend_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def online(cache_seq: int = 0, depth: int = 0, raw: str = "") -> BoxStatus:
    return BoxStatus(
        state="online", raw=raw or f"online {cache_seq} {depth} {time.time()}", box_at=int(time.time()),
        version="1.4.0", cache_seq=cache_seq, outbox_depth=depth, outbox_oldest_age_s=40 if depth else None,
        drivers=({"name": "hid0", "kind": "hid", "state": "ready"},),
    )  # fmt: skip


def set_status(directory: Path, box: str, status: BoxStatus) -> None:
    """What the collector does on a box's retained status (backend/box_status.py)."""
    store = Store.open(directory)
    try:
        assert store.record_status("demo", box, status, int(time.time()))
    finally:
        store.close()


@dataclass
class Console:
    url: str
    dir: Path
    process: CliProcess
    store: str
    """sqlite or postgresql: the screenshots of each are kept apart."""


@pytest.fixture
def console(tmp_path: Path, each_store: str):
    keys = tmp_path / "keys"
    make_backend(keys, boxes=BOXES)
    made = backend_cli(
        "user", "add", "--dir", str(keys), "ana", "--role", "operator", stdin=PASSWORD + "\n"
    )
    assert made.returncode == 0, made.stderr
    made = backend_cli(
        "user", "add", "--dir", str(keys), "vic", "--role", "viewer", stdin=VIEWER_PASSWORD + "\n"
    )
    assert made.returncode == 0, made.stderr
    token = tmp_path / "metrics.token"
    token.write_text(TOKEN + "\n")
    with serve_console(keys, "--metrics-token-file", str(token)) as (url, process):
        yield Console(url, keys, process, each_store)


def sign_in(page, console: Console, name: str = "ana", password: str = PASSWORD) -> None:
    browser.sign_in(page, console.url, name, password)


def row(page, box: str):
    return page.locator(f'#fleet-rows tr[data-box="{box}"]')


def metrics(console: Console, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(f"{console.url}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_operator_signs_in_and_sees_a_box_go_offline_without_reload(
    console: Console, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    shots = artifacts(tmp_path, f"console-fleet-{console.store}")
    set_status(console.dir, "box-0001", online(cache_seq=0, depth=3))
    with chromium() as browser:
        page = browser.new_page()
        page.goto(console.url)
        assert page.url.endswith("/login"), "the fleet is shown only to a signed-in user"
        shot(page, shots, "login")
        sign_in(page, console, password="not the password at all")
        expect(page.get_by_role("alert")).to_contain_text("Wrong user name or password")
        shot(page, shots, "login-refused")
        sign_in(page, console)
        expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
        expect(row(page, "box-0001")).to_contain_text("online")
        expect(row(page, "box-0001")).to_contain_text("3 (oldest")
        expect(row(page, "box-0002")).to_contain_text("never seen")
        assert "hid0" in row(page, "box-0001").inner_text()
        shot(page, shots, "fleet")
        # A marker the page would lose on any reload or navigation.
        page.evaluate("window.stillThisPage = true")
        set_status(console.dir, "box-0001", BoxStatus(state="offline", raw='{"will"}', will=True))
        expect(row(page, "box-0001")).to_contain_text("offline", timeout=30_000)
        assert page.evaluate("window.stillThisPage === true"), "the page reloaded"
        expect(row(page, "box-0001")).to_contain_text("3 (oldest")  # kept from its last status
        expect(page.locator("#summary")).to_contain_text("1 offline")
        shot(page, shots, "fleet-box-offline")
        # The offline filter: a box offline for seconds is not "offline over 1 h".
        page.get_by_label("Offline over 1 h").check()
        page.get_by_role("button", name="Apply").click()
        expect(page.locator("#fleet-rows")).to_contain_text("No box matches")
        page.goto(f"{console.url}/audit")
        expect(page.locator("table")).to_contain_text("refused: wrong password")
        expect(page.locator("table")).to_contain_text("sign in")
        shot(page, shots, "audit")
    status, text = metrics(console)
    assert status == 200
    assert 'redeemd_box_online{merchant="demo",box="box-0001"} 0' in text
    assert 'redeemd_box_outbox_depth{merchant="demo",box="box-0001"} 3' in text
    assert 'redeemd_boxes{merchant="demo",state="never_seen"} 2' in text
    assert PASSWORD not in text


def test_metrics_need_the_bearer_token(console: Console) -> None:
    assert metrics(console, token=None)[0] == 401
    assert metrics(console, token="wrong-token-0123456789")[0] == 401
    status, text = metrics(console)
    assert status == 200 and "# TYPE redeemd_conflicts_total counter" in text


@pytest.mark.parametrize("each_store", ["sqlite"], indirect=True)
def test_sign_in_is_rate_limited_per_user(console: Console, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        for _ in range(5):
            sign_in(page, console, password="guessing the password")
            expect(page.get_by_role("alert")).to_contain_text("Wrong user name or password")
        sign_in(page, console)  # the right password, too late
        expect(page.get_by_role("alert")).to_contain_text("Too many failed sign-ins")
        shot(page, artifacts(tmp_path, f"console-rate-limit-{console.store}"), "login-rate-limited")
        # Another user from the same address is not locked out by ana's failures.
        sign_in(page, console, "vic", VIEWER_PASSWORD)
        expect(page.get_by_role("heading", name="Fleet")).to_be_visible()


def csrf_of(page) -> str:
    return page.locator('form[action="/logout"] input[name=csrf]').get_attribute("value")


def registered(console: Console) -> dict[str, str]:
    store = Store.open(console.dir)
    try:
        return store.fleet()
    finally:
        store.close()


def test_a_post_without_the_csrf_token_is_refused(console: Console) -> None:
    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, console)
        # The browser's own cookies, but a form from elsewhere: no token, or a wrong one.
        for form in (
            {"merchant": "demo", "box": "box-9"},
            {"merchant": "demo", "box": "box-9", "csrf": "x" * 43},
        ):
            answer = page.request.post(f"{console.url}/boxes", form=form, max_redirects=0)
            assert answer.status == 403
            assert "did not come from your console session" in answer.text()
        assert "box-9" not in registered(console)
        # With the token, a name `box add` would refuse is refused the same way.
        answer = page.request.post(
            f"{console.url}/boxes",
            form={"merchant": "demo", "box": "box 9/#", "csrf": csrf_of(page)},
            max_redirects=0,
        )
        assert answer.status == 400 and "is not allowed" in answer.text()
        # The sign-in form has its own token too.
        answer = page.request.post(
            f"{console.url}/login", form={"name": "ana", "password": PASSWORD}, max_redirects=0
        )
        assert answer.status == 403


def test_a_viewer_is_refused_an_operator_action(console: Console, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    shots = artifacts(tmp_path, f"console-roles-{console.store}")
    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, console, "vic", VIEWER_PASSWORD)
        expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
        assert page.get_by_text("Register a box").count() == 0, "a viewer is offered no action"
        answer = page.request.post(
            f"{console.url}/boxes",
            form={"merchant": "demo", "box": "box-9", "csrf": csrf_of(page)},
            max_redirects=0,
        )
        assert answer.status == 403 and "may look but not act" in answer.text()
        page.set_content(answer.text())
        shot(page, shots, "viewer-refused")
        assert "box-9" not in registered(console)

        operator = browser.new_page()
        sign_in(operator, console)
        operator.get_by_text("Register a box").click()
        operator.get_by_label("Merchant").fill("demo")
        operator.get_by_label("Box id").fill("box-0042")
        operator.get_by_role("button", name="Register").click()
        expect(operator.get_by_role("status").first).to_contain_text("box-0042 registered")
        expect(row(operator, "box-0042")).to_contain_text("never seen")
        assert registered(console)["box-0042"] == "demo"
        operator.goto(f"{console.url}/audit")
        table = operator.locator("table")
        expect(table).to_contain_text("demo/box-0042")
        expect(table).to_contain_text("refused: viewer")
        shot(operator, shots, "audit-after-actions")


@pytest.mark.parametrize("each_store", ["sqlite"], indirect=True)
def test_keyboard_alone_signs_in_and_searches_and_every_input_is_labelled(
    console: Console, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    shots = artifacts(tmp_path, f"console-keyboard-{console.store}")
    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{console.url}/login")
        assert unlabelled(page) == []
        assert focused(page) == "input#name", "the user name field has the focus at once"
        page.keyboard.type("ana")
        page.keyboard.press("Tab")
        assert focused(page) == "input#password"
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
        page.get_by_text("Register a box").click()  # open, so its inputs are checked too
        assert unlabelled(page) == []
        page.goto(console.url)
        page.keyboard.press("Tab")
        assert focused(page) == "a:Skip to content", "the skip link comes first"
        page.keyboard.press("Enter")
        assert focused(page) == "main#main"
        for _ in range(30):
            page.keyboard.press("Tab")
            if focused(page) == "input#q":
                break
        else:
            raise AssertionError("the search field cannot be reached with Tab")
        page.keyboard.type("box-0002")
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r"q=box-0002"))
        expect(page.locator("#fleet-rows tr")).to_have_count(1)
        expect(row(page, "box-0002")).to_be_visible()
        shot(page, shots, "fleet-search")
        page.goto(f"{console.url}/audit")
        assert unlabelled(page) == []


def test_fleet_pages_cover_every_box_once_in_each_sort() -> None:
    now = int(time.time())
    rows = [
        BoxRow("acme" if i % 2 else "beta", f"box-{i:04d}", now - 100, 5,
               online(cache_seq=i % 6, depth=i % 4) if i % 3 else None, now - i, now - i, now)
        for i in range(257)
    ]  # fmt: skip
    for sort in ("state", "box", "merchant", "last_seen", "behind", "outbox", "version"):
        for desc in (False, True):
            query, seen = Query(sort=sort, desc=desc, limit=50), []
            while True:
                page = select(rows, query, now)
                seen += [e["box"] for e in page.rows]
                if page.next_after is None:
                    break
                query = Query.parse({**query.params(after=page.next_after)})
            assert sorted(seen) == sorted(r.box for r in rows), (sort, desc)
            assert len(seen) == len(set(seen))
    behind = select(rows, Query(behind=True, limit=1000), now)
    assert behind.rows and all(e["behind"] for e in behind.rows)
    assert behind.counts.total == 257


def test_user_cli_takes_the_password_from_stdin_never_argv(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    make_backend(keys)
    refused = backend_cli("user", "add", "--dir", str(keys), "ana", "--role", "operator", PASSWORD)
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr
    short = backend_cli(
        "user", "add", "--dir", str(keys), "ana", "--role", "operator", stdin="short\n"
    )
    assert short.returncode == 1 and "at least 12" in short.stderr
    made = backend_cli(
        "user", "add", "--dir", str(keys), "ana", "--role", "operator", stdin=PASSWORD + "\n"
    )
    assert made.returncode == 0, made.stderr
    again = backend_cli(
        "user", "add", "--dir", str(keys), "ana", "--role", "viewer", stdin=PASSWORD + "\n"
    )
    assert again.returncode == 1 and "exists" in again.stderr
    store = Store.open(keys)
    try:
        (hashed,) = store.conn.execute("SELECT password_hash FROM console_users").fetchone()
        assert hashed.startswith("$argon2id$") and PASSWORD not in hashed
        user = auth.check_password(store, "ana", PASSWORD)
        assert user is not None and user.role == "operator"
        token, _ = auth.open_session(store, user)
    finally:
        store.close()
    listed = backend_cli("user", "list", "--dir", str(keys))
    assert re.search(r"^ana\s+operator\s", listed.stdout, re.M), listed.stdout
    removed = backend_cli("user", "remove", "--dir", str(keys), "ana")
    assert removed.returncode == 0
    store = Store.open(keys)
    try:
        assert auth.find_session(store, token) is None, "removing a user ends their sessions"
        actions = [
            r[0] for r in store.conn.execute("SELECT action FROM console_audit ORDER BY at_ms")
        ]
        assert actions == ["user add", "user remove"]
    finally:
        store.close()
    assert backend_cli("user", "remove", "--dir", str(keys), "ana").returncode == 1


def test_session_cookies_are_secure_httponly_strict_unless_loopback_test_flag(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    make_backend(keys)
    wide = backend_cli("console", "--dir", str(keys), "--listen", "0.0.0.0:1", "--insecure-cookies")
    assert wide.returncode == 1 and "loopback" in wide.stderr
    port = free_port()
    process = CliProcess("console", "--dir", str(keys), "--listen", f"127.0.0.1:{port}")
    try:
        process.wait_line(lambda line: line.startswith("console on"), "the console serving")
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as answer:
                    cookie = answer.headers["set-cookie"]
                    policy = answer.headers["content-security-policy"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        process.stop()
    assert cookie.startswith("__Host-redeemd-login=")
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= attributes
    assert "script-src 'self'" in policy


def test_box_and_conflicts_pages_show_reasons_gaps_and_digest_prefixes_only(
    console: Console, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    digest = bytes(range(16, 32))
    redeem = {"action": "redeem", "digest": digest, "uses": 1, "uses_left": 0}
    refused = {**record(2, "box-0001", action="redeem", digest=digest), "verdict": "rejected",
               "reason": "already_redeemed"}  # fmt: skip
    messages = {
        "box-0001": [record(1, "box-0001", **redeem), refused, record(5, "box-0001")],
        "box-0002": [record(1, "box-0002", **redeem)],
    }
    store = Store.open(console.dir)
    try:
        for box, records in messages.items():
            body = json.dumps({"v": 1, "box": box, "records": records}).encode()
            store.store_events("demo", box, parse_message(body, merchant="demo", box=box))
        assert len(store.conflicts()) == 1 and store.open_gaps()
        # A grant of 10 claim codes, 3 of which the box says it has used.
        made = grants.add(
            store, Keystore(console.dir), box="box-0001", cards=(1,), quota=10, not_before=0,
            not_after=int(time.time()) + 86400, box_key=keys.public_of(keys.new_private_key()),
        ).grant  # fmt: skip
        said = {"dispensing": {"grant_seq": 1, "grants": [{"id": made.id, "used": 3}]}}
        store.record_status("demo", "box-0001", online(raw=json.dumps(said)), int(time.time()))
        # An offline overspend and a raced transfer, as the collector's reconciliation
        # writes them (backend/accounts.py; found by tests/test_backend_accounts.py).
        now = int(time.time())
        store.engine.execute(
            "INSERT INTO overspends(merchant, account, amount_over, spent, account_value, boxes, "
            "records, detected_at, updated_at, blocked_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("demo", "ac" * 16, 2000, 13000, 11000, json.dumps(["box-0001", "box-0002"]),
             json.dumps(["r-1", "r-2", "r-3"]), now, now, 7),
        )  # fmt: skip
        store.engine.execute(
            "INSERT INTO transfer_conflicts(merchant, transfer_id, digest, record_id, box, "
            "cache_seq, transfer_seq, detected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("demo", "t" * 32, digest.hex(), "r-9", "box-0002", 4, 6, now),
        )  # fmt: skip
    finally:
        store.close()
    shots = artifacts(tmp_path, f"console-box-{console.store}")
    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, console)
        row(page, "box-0001").get_by_role("link", name="box-0001").click()
        expect(page.get_by_role("heading", name="Box box-0001")).to_be_visible()
        text = page.locator("main").inner_text()
        assert "already_redeemed" in text
        assert digest.hex()[:12] in text and digest.hex() not in text
        assert "3–4" in text and "open" in text  # the gap
        assert "box-0002" in text  # the conflict it took part in
        expect(page.locator("table", has_text="Status history")).to_contain_text("online")
        grant = page.locator("tr", has_text=made.id)
        expect(grant).to_contain_text("10")
        assert grant.locator("td").nth(4).inner_text() == "7", "quota 10, used 3: 7 left"
        expect(grant).to_contain_text("active")
        shot(page, shots, "box")
        page.get_by_role("link", name="Conflicts").click()
        expect(page.locator("table").first).to_contain_text("box-0002")
        overspent = page.locator("table", has_text="Offline overspends")
        expect(overspent).to_contain_text("2000 over (13000 spent of 11000)")
        expect(overspent).to_contain_text("blocked by batch 7")
        raced = page.locator("table", has_text="Transfers raced")
        expect(raced).to_contain_text("r-9")
        expect(raced).to_contain_text("4 < 6")
        assert digest.hex() not in page.content()
        shot(page, shots, "conflicts")


def test_rate_limiter_refuses_after_the_limit_until_the_oldest_failure_expires() -> None:
    limiter = auth.RateLimiter(3, 900)
    for t in (0, 10, 20):
        assert limiter.retry_after("client:10.0.0.9", t) == 0
        limiter.failed("client:10.0.0.9", t)
    assert limiter.retry_after("client:10.0.0.9", 30) == 870
    assert limiter.retry_after("client:10.0.0.8", 30) == 0, "another address is not limited"
    assert limiter.retry_after("client:10.0.0.9", 900) == 0, "the first failure has expired"


@pytest.mark.parametrize("each_store", ["sqlite"], indirect=True)
def test_a_burst_of_guesses_sent_at_once_gets_no_more_than_the_limit(console: Console) -> None:
    with urllib.request.urlopen(f"{console.url}/login", timeout=10) as answer:
        cookie = answer.headers["set-cookie"].split(";")[0]
        csrf = re.search(r'name="csrf" value="([^"]+)"', answer.read().decode())[1]
    form = urllib.parse.urlencode({"csrf": csrf, "name": "ana", "password": "a guess, wrong"})

    def guess(_: int) -> int:
        request = urllib.request.Request(
            f"{console.url}/login", data=form.encode(), headers={"Cookie": cookie}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(guess, range(16)))
    assert statuses.count(401) == 5, statuses  # checked: the per-user limit
    assert statuses.count(429) == 11, statuses  # refused unchecked


@pytest.mark.parametrize("each_store", ["sqlite"], indirect=True)
def test_a_removed_user_stops_getting_live_updates(console: Console) -> None:
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, console, "vic", VIEWER_PASSWORD)
        expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
        assert backend_cli("user", "remove", "--dir", str(console.dir), "vic").returncode == 0
        expect(page.locator("#live-status")).to_contain_text("Signed out", timeout=30_000)
        page.reload()
        assert page.url.endswith("/login")


def test_a_lost_database_is_a_503_and_the_console_comes_back_without_a_restart(
    tmp_path: Path, own_postgresql, monkeypatch
) -> None:
    monkeypatch.setenv(DATABASE_ENV, own_postgresql.create_database())
    keys = tmp_path / "keys"
    make_backend(keys, boxes=BOXES)
    token = tmp_path / "metrics.token"
    token.write_text(TOKEN + "\n")
    with serve_console(keys, "--metrics-token-file", str(token)) as (url, process):
        console = Console(url, keys, process, "postgresql")
        status, text = metrics(console)
        assert status == 200 and "box-0001" in text
        own_postgresql.kill()
        status, text = metrics(console)
        assert status == 503 and "database does not answer" in text
        with pytest.raises(urllib.error.HTTPError) as page:
            urllib.request.urlopen(f"{url}/health", timeout=10)
        assert page.value.code == 503
        assert process.process.poll() is None, "the console must keep serving"
        own_postgresql.start()
        wait_until(lambda: metrics(console)[0] == 200, "/metrics once the database is back")
        said = "\n".join(process.lines)
    assert "lost the database" in said and "reachable again" in said, said
