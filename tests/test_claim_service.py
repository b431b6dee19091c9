"""`redeemd-backend claim` as a real process, driven over real HTTP: a claim code from a
grant gives a signed code once (it verifies, its QR code decodes to it, only its digest
is stored), and every other request (a second claim, a forged code, a revoked grant, a
counter over the quota, an expired code, junk of every kind, a lost database) gets a
clear answer and leaves the service serving. On SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import zxingcpp
from backend_helpers import make_backend, wait_until
from broker import free_port
from conftest import ROOT
from PIL import Image

from backend import grants
from backend.keystore import Keystore
from backend.store import DATABASE_ENV, Store
from cards import batch, claim_code, keys, signed_code
from cards.batch import Kind
from cards.digest import code_digest

BOX_KEY = keys.new_private_key()
BOX_PUBLIC = keys.public_of(BOX_KEY)
CARDS = [{"id": 1, "merchant": "demo", "kind": "coupon", "title": "Free coffee"},
         {"id": 2, "merchant": "demo", "kind": "coupon"}]  # fmt: skip


class Service:
    """`python -m backend.cli claim` on a free port; its output lines are kept."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "backend.cli", "claim", "--dir", str(directory),
             "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(self._up, f"the claim service on port {self.port}; output: {self.lines}")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"claim service exited: {self.lines}")
        try:
            return self.request("GET", "/health")[0] in (200, 503)
        except OSError:
            return False

    def request(self, method: str, path: str) -> tuple[int, str]:
        request = urllib.request.Request(
            self.base + path, method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def claim(self, code: str, as_json: bool = True) -> tuple[int, dict | str]:
        status, body = self.request("POST", f"/c/{code}" + ("?format=json" if as_json else ""))
        return status, json.loads(body) if as_json else body

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        return "\n".join(self.lines)


@dataclass
class Backend:
    dir: Path
    keystore: Keystore
    grant_id: str

    def code(
        self, counter: int, card: int = 1, claim_by: int | None = None, grant: str = ""
    ) -> str:
        claim_by = int(time.time()) + 3600 if claim_by is None else claim_by
        return claim_code.mint(BOX_KEY, grant or self.grant_id, counter, card, claim_by)


def setup_backend(directory: Path, quota: int = 3) -> Backend:
    keystore = make_backend(directory, boxes=("box-1",))
    store = Store.open(directory)
    try:
        now = int(time.time())
        entries = batch.encode_cards(CARDS)
        store.issue("demo", Kind.CARDS, lambda seq: batch.build(
            keystore.private("issuer"), keystore.delegation(), merchant="demo", seq=seq,
            kind=Kind.CARDS, entries=entries, created_at=now, expires_at=now + 86400))  # fmt: skip
        made = grants.add(
            store, keystore, box="box-1", cards=(1, 2), quota=quota, not_before=now - 60,
            not_after=now + 86400, box_key=BOX_PUBLIC,
        )  # fmt: skip
    finally:
        store.close()
    return Backend(directory, keystore, made.grant.id)


@pytest.fixture
def backend(tmp_path, each_store) -> Backend:
    return setup_backend(tmp_path / "backend")


@pytest.fixture
def service(backend):
    running = Service(backend.dir)
    yield running
    output = running.stop()
    # No code in the log: claim codes and signed codes are named by digest prefixes only.
    assert claim_code.PREFIX not in output and signed_code.PREFIX not in output, output


def test_a_claim_gives_a_signed_code_once(backend, service):
    text = backend.code(1)
    # A GET (a chat app's link preview) shows the card and claims nothing.
    status, page = service.request("GET", f"/c/{text}")
    assert status == 200 and "Free coffee" in page and 'method="post"' in page
    status, page = service.request("GET", f"/c/{text}")
    assert status == 200, "a second look is still claimable"
    status, answer = service.claim(text)
    assert status == 200 and answer["result"] == "claimed", answer
    given = signed_code.parse(answer["code"])
    issuer = backend.keystore.public("issuer")
    assert signed_code.verify(given, issuer) and given.card_id == 1
    assert given.key_id == keys.key_id(issuer)
    assert answer["title"] == "Free coffee"
    # The QR code is the signed code.
    image = Image.open(io.BytesIO(base64.b64decode(answer["qr_png"])))
    # Only QR codes: a row of a QR code's modules can also read as a short ITF
    # (tests/test_camera_zxing.py), which is not what this checks.
    (decoded,) = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)
    assert decoded.text == answer["code"]
    # Committed before it was shown: the row is there, with digests only.
    store = Store.open(backend.dir)
    try:
        rows = store.engine.execute(
            "SELECT grant_id, counter, box, card_id, serial, code_digest, claim_digest FROM claims"
        ).fetchall()
        dumped = json.dumps(store.engine.execute("SELECT * FROM claims").fetchall(), default=str)
    finally:
        store.close()
    code_key = backend.keystore.code_key()
    assert rows == [(
        backend.grant_id, 1, "box-1", 1, given.serial,
        code_digest(code_key, answer["code"]).hex(), code_digest(code_key, text).hex(),
    )]  # fmt: skip
    assert answer["code"] not in dumped and text not in dumped
    # Once only: the second claim is refused, saying so, with 409; so is a second look.
    status, again = service.claim(text)
    assert status == 409 and again["reason"] == "already_claimed"
    status, page = service.claim(text, as_json=False)
    assert status == 409 and "already claimed" in page and "already_claimed" in page
    # The page for a claim: the code as text and as an inline SVG QR code.
    status, page = service.claim(backend.code(2, card=2), as_json=False)
    assert status == 200 and "<svg" in page and "card 2" in page
    shown = signed_code.parse(page.split('<p class="code">')[1].split("</p>")[0])
    assert signed_code.verify(shown, issuer) and shown.card_id == 2


def forged(text: str) -> str:
    """`text` with its signature replaced by another valid-looking one."""
    raw = base64.b32decode(text[3:] + "=" * (-len(text[3:]) % 8))
    signature = bytes(64 - 1) + bytes([raw[-1] ^ 1])
    return "RC1" + base64.b32encode(raw[:28] + signature).decode().rstrip("=")


@pytest.mark.parametrize(
    "case, status, reason",
    [
        ("forged", 403, "bad_signature"),
        ("other_key", 403, "bad_signature"),
        ("unknown_grant", 404, "no_grant"),
        ("over_quota", 403, "quota_exhausted"),
        ("card_not_granted", 404, "no_grant"),
        ("expired", 410, "expired"),
        ("revoked", 410, "grant_revoked"),
    ],
)
def test_a_code_outside_its_grant_is_refused_with_its_reason(
    backend, service, case, status, reason
):
    if case == "forged":
        text = forged(backend.code(1))
    elif case == "other_key":
        text = claim_code.mint(
            keys.new_private_key(), backend.grant_id, 1, 1, int(time.time()) + 60
        )
    elif case == "unknown_grant":
        text = backend.code(1, grant="00" * 8)
    elif case == "over_quota":
        text = backend.code(4)
    elif case == "card_not_granted":
        text = backend.code(1, card=9)
    elif case == "expired":
        text = backend.code(1, claim_by=int(time.time()) - 10)
    else:
        store = Store.open(backend.dir)
        try:
            grants.revoke(store, backend.keystore, backend.grant_id)
        finally:
            store.close()
        text = backend.code(1)
    got, answer = service.claim(text)
    assert (got, answer["reason"]) == (status, reason), answer
    got, page = service.claim(text, as_json=False)
    assert got == status and f"<code>{reason}</code>" in page
    store = Store.open(backend.dir)
    try:
        assert store.engine.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)
    finally:
        store.close()
    # The GET page says the same before anyone presses the button.
    assert service.request("GET", f"/c/{text}")[0] == status


def raw_http(port: int, data: bytes) -> bytes:
    """What the service answers to `data` sent as is (b"" if it reset the connection
    first, as a server may while a client still sends what it refused)."""
    chunks = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_junk_gets_a_4xx_and_the_service_keeps_serving(backend, service):
    text = backend.code(1)
    for method, path, status in (
        ("GET", "/c/junk", 400),
        ("POST", "/c/junk", 400),
        ("POST", "/c/" + "A" * 5000, 414),
        ("POST", "/c/%C3%A9" + text[2:], 400),
        ("POST", "/c/" + text.lower(), 400),
        ("POST", "/c/" + text + "A", 400),
        ("POST", "/c/%00" + text[1:], 400),
        ("PUT", "/c/" + text, 405),
        ("DELETE", "/c/" + text, 405),
        ("GET", "/", 404),
        ("GET", "/c/", 404),
        ("GET", "/c/a/b", 404),
    ):
        assert service.request(method, path)[0] == status, (method, path)
    assert raw_http(service.port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw_http(service.port, b"GET /c/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n")[:12] in (
        b"HTTP/1.1 400",
        b"HTTP/1.1 404",
    )
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200_000 + b"\r\n\r\n"
    assert raw_http(service.port, huge)[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 431", b"")
    status, answer = service.claim(text)
    assert status == 200 and answer["result"] == "claimed", "still serving after the junk"


def test_a_lost_database_is_a_503_page_and_claims_resume(tmp_path, own_postgresql, monkeypatch):
    monkeypatch.setenv(DATABASE_ENV, own_postgresql.create_database())
    backend = setup_backend(tmp_path / "backend")
    running = Service(backend.dir)
    try:
        assert running.claim(backend.code(1))[0] == 200
        own_postgresql.kill()
        status, answer = running.claim(backend.code(2))
        assert status == 503 and answer["reason"] == "unavailable"
        status, page = running.claim(backend.code(2), as_json=False)
        assert status == 503 and "Nothing was claimed" in page and "a few minutes" in page
        assert running.request("GET", "/health")[0] == 503
        own_postgresql.start()
        status, answer = wait_until(
            lambda: (got := running.claim(backend.code(2)))[0] != 503 and got,
            "a claim after the database is back",
        )
        assert status == 200 and answer["result"] == "claimed"
    finally:
        output = running.stop()
    assert "lost the database" in output or "unreachable" in output, output
    assert running.process.returncode is not None


def test_two_services_on_one_database_accept_each_code_once(tmp_path, each_store):
    backend = setup_backend(tmp_path / "backend", quota=20)
    first, second = Service(backend.dir), Service(backend.dir)
    try:
        results: dict[int, list[int]] = {}

        def claim(service: Service, counter: int) -> None:
            results.setdefault(counter, []).append(service.claim(backend.code(counter))[0])

        for counter in range(1, 21):
            threads = [
                threading.Thread(target=claim, args=(service, counter))
                for service in (first, second)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        assert {c: sorted(s) for c, s in results.items()} == {c: [200, 409] for c in range(1, 21)}
    finally:
        first.stop()
        second.stop()
    store = Store.open(backend.dir)
    try:
        serials = [s for (s,) in store.engine.execute("SELECT serial FROM claims").fetchall()]
    finally:
        store.close()
    assert len(serials) == len(set(serials)) == 20
