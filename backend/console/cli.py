"""`redeemd-backend console` and `redeemd-backend user ...`: serve the console, manage
its accounts.

Accounts are made here and only here: a password is typed at a prompt (twice) or read
as the first line of stdin, never taken from the command line, where `ps` and the
shell's history would keep it.

    redeemd-backend user add --dir keys/ ana --role operator
    printf '%s\\n' "$PASSWORD" | redeemd-backend user add --dir keys/ bob --role viewer
    redeemd-backend console --dir keys/ --listen 127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import sys
from pathlib import Path

from backend import web
from backend.console import audit, auth
from backend.store import Store
from runtime.cli import Commands, Handler

DEFAULT_LISTEN = "127.0.0.1:8081"


class ConsoleUsageError(RuntimeError):
    """A console command cannot run as asked; the message says what to do."""


def add_to(commands: Commands) -> None:
    """Add `console` and `user` to redeemd-backend's commands."""
    p = commands.add(
        "console",
        _speaking(cmd_console),
        "Serve the merchant console (fleet, metrics) over HTTP.",
        "redeemd-backend console --dir keys/ --listen 127.0.0.1:8081",
        "redeemd-backend console --dir keys/ --metrics-token-file /etc/redeemd/metrics.token",
        details="Run it behind a TLS reverse proxy (docs/console.md); accounts come from "
        "`redeemd-backend user add`.",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        type=_listen,
        help=f"HOST:PORT (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--metrics-token-file",
        type=Path,
        help="serve /metrics to requests bearing the token in this file "
        "(Authorization: Bearer TOKEN); without it /metrics is off",
    )
    p.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        help="proxies trusted for X-Forwarded-For/-Proto (default 127.0.0.1)",
    )
    p.add_argument(
        "--insecure-cookies",
        action="store_true",
        help="session cookies without Secure, for plain http on a loopback address only "
        "(tests, a look on this machine); refused on any other address",
    )
    group = commands.group(
        "user",
        "Console accounts: add (password at a prompt or on stdin), list, remove.",
        "redeemd-backend user add --dir keys/ ana --role operator",
        "redeemd-backend user list --dir keys/",
        details="viewer reads every page; operator also acts.",
    )
    p = group.add(
        "add",
        _speaking(cmd_user_add),
        "Make a console account; the password is asked for (or read from stdin).",
        "redeemd-backend user add --dir keys/ ana --role operator",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", choices=auth.ROLES, required=True)
    group.add(
        "list",
        _speaking(cmd_user_list),
        "List console accounts.",
        "redeemd-backend user list --dir keys/",
    )
    p = group.add(
        "remove",
        _speaking(cmd_user_remove),
        "Delete a console account and end its sessions.",
        "redeemd-backend user remove --dir keys/ ana",
    )
    p.add_argument("name", metavar="NAME")


def _speaking(func: Handler) -> Handler:
    """An account or usage problem is a message and exit 1, like every other error."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (auth.AuthError, ConsoleUsageError) as exc:
            print(f"redeemd-backend: {exc}", file=sys.stderr)
            return 1

    return run


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (like {DEFAULT_LISTEN})")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid {os.getuid()}"


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise ConsoleUsageError("the two passwords differ; nothing was changed")
        return first
    line = sys.stdin.readline()
    if not line:
        raise ConsoleUsageError(
            "no password: type it at the prompt, or give it as the first line of stdin"
        )
    return line.rstrip("\r\n")


def cmd_user_add(args: argparse.Namespace) -> int:
    auth.check_name(args.name)
    password = _read_password()
    store = Store.open(args.dir)
    try:
        user = auth.add_user(store, args.name, args.role, password)
        audit.record(store, _actor(), "user add", f"{user.name} ({user.role})")
    finally:
        store.close()
    print(f"user {user.name} added ({user.role}); sign in at the console with it")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from backend.console.pages import utc

    store = Store.open(args.dir)
    try:
        found = auth.users(store)
    finally:
        store.close()
    if not found:
        print(f"no console users: redeemd-backend user add --dir {args.dir} NAME --role operator")
        return 0
    width = max(len(u.name) for u in found)
    print(f"{'NAME':{width}}  {'ROLE':8}  CREATED")
    for u in found:
        print(f"{u.name:{width}}  {u.role:8}  {utc(u.created_at)}")
    return 0


def cmd_user_remove(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        removed = auth.remove_user(store, args.name)
        if removed:
            audit.record(store, _actor(), "user remove", args.name)
    finally:
        store.close()
    if not removed:
        raise ConsoleUsageError(f"no console user {args.name} (redeemd-backend user list)")
    print(f"user {args.name} removed; their sessions ended")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from backend.console.app import Console

    host, port = args.listen
    if args.insecure_cookies and not _loopback(host):
        raise ConsoleUsageError(
            f"--insecure-cookies sends the session cookie over plain http, allowed only on a "
            f"loopback address, not {host}: serve it behind a TLS reverse proxy instead "
            "(docs/console.md)"
        )
    token = None
    if args.metrics_token_file is not None:
        token = args.metrics_token_file.read_text().strip()
        if len(token) < 16:
            raise ConsoleUsageError(
                f"{args.metrics_token_file} holds {len(token)} characters; a metrics token needs "
                "at least 16 (like: openssl rand -hex 32 > FILE)"
            )
    console = Console(args.dir, secure_cookies=not args.insecure_cookies, metrics_token=token)
    # Open the store now: a database that cannot be migrated says so before serving.
    store = Store.open(args.dir)
    users = len(auth.users(store))
    store.close()
    scheme = "http" if args.insecure_cookies else "https (via your TLS proxy)"
    print(
        f"console on http://{host}:{port}/ ({scheme}) with {Store.describe(args.dir)}, "
        f"{users} user(s)",
        flush=True,
    )
    if not users:
        print(
            f"no users yet: redeemd-backend user add --dir {args.dir} NAME --role operator",
            flush=True,
        )
    web.serve(console.app(), host, port, args.forwarded_allow_ips)
    return 0
