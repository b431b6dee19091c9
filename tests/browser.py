"""A real browser for the console's tests: Playwright driving Debian's Chromium.

Playwright's own browser download is not used (it is not reachable where the tests
run): Chromium comes from the system package (`apt-get install chromium`, which
`./dev test` does), launched with --no-sandbox when the tests run as root, as in CI,
since Chromium's sandbox refuses root. A missing browser or Playwright fails the test
with what to install.

    >>> with chromium() as browser:
    ...     page = browser.new_page()
    ...     page.goto(url)
    ...     assert unlabelled(page) == []
    ...     shot(page, artifacts, "fleet")

`serve_console` starts the real `redeemd-backend console` process the browser talks to;
`add_user` makes its user as an operator would, and `sign_in` signs in through the page.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_helpers import CliProcess
from broker import free_port
from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS_ENV = "REDEEMD_TEST_ARTIFACTS"
"""A directory to keep the screenshots in (CI uploads it); else the test's tmp dir."""


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            "chromium is not installed: run 'sudo apt-get install chromium' (./dev test does it)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: .venv/bin/pip install -e '.[test]' (./dev test does it)"
        )
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            yield browser
        finally:
            browser.close()


def artifacts(tmp_path: Path, name: str) -> Path:
    base = os.environ.get(ARTIFACTS_ENV)
    directory = (Path(base) / name) if base else tmp_path / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def shot(page: Any, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


def unlabelled(page: Any) -> list[str]:
    """Every visible form control without an accessible name (by Playwright's own
    computation of it, as a screen reader gets it): [] when every one is labelled."""
    from playwright.sync_api import expect

    missing = []
    controls = page.locator("input:not([type=hidden]), select, textarea, button")
    for i in range(controls.count()):
        control = controls.nth(i)
        if not control.is_visible():
            continue
        try:
            expect(control).to_have_accessible_name(re.compile(r"\S"), timeout=1000)
        except AssertionError:
            missing.append(control.evaluate("e => e.outerHTML"))
    return missing


def focused(page: Any) -> str:
    """The focused element, as `tag#id` or `tag:text` (for keyboard navigation tests)."""
    return page.evaluate(
        "() => { const e = document.activeElement; "
        "return e.tagName.toLowerCase() + (e.id ? '#' + e.id : ':' + e.textContent.trim()); }"
    )


@contextlib.contextmanager
def serve_console(directory: Path, *extra: str) -> Iterator[tuple[str, CliProcess]]:
    """`redeemd-backend console --dir directory` on a free loopback port, plain http
    (--insecure-cookies), until it answers; yields (base URL, the process)."""
    port = free_port()
    process = CliProcess(
        "console", "--dir", str(directory), "--listen", f"127.0.0.1:{port}", "--insecure-cookies",
        *extra,
    )  # fmt: skip
    try:
        process.wait_line(lambda line: line.startswith("console on"), "the console serving")
        url = f"http://127.0.0.1:{port}"
        # uvicorn says nothing at log level warning once it listens: ask until it answers.
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or process.process.poll() is not None:
                    raise AssertionError(f"the console does not answer: {process.lines}") from None
                time.sleep(0.1)
        yield url, process
    finally:
        process.stop()


def add_user(directory: Path, name: str, role: str, password: str) -> None:
    """`redeemd-backend user add` as an operator runs it: the password on standard input."""
    made = subprocess.run(
        [sys.executable, "-m", "backend.cli", "user", "add", "--dir", str(directory), name,
         "--role", role],
        input=password + "\n", capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


def sign_in(page: Any, url: str, name: str, password: str) -> None:
    """Sign in through the login form, as a person does (the labels, the button)."""
    page.goto(f"{url}/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
