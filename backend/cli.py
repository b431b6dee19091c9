"""`redeemd-backend`: keys, delegation, batches, signed codes; publish and collect over MQTT."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from backend import accounts_cli, box_commands, boxes_view, claims, codes_csv, grants, web
from backend.collect import DEFAULT_GROUP, Collector
from backend.connection import BrokerUrlError
from backend.console import cli as console_cli
from backend.export import ExportError, export, parse_seqs, pick_merchant
from backend.keystore import Keystore, KeystoreError, utc
from backend.publish import DEFAULT_PREFIX, Publisher
from backend.store import DATABASE_ENV, Store, StoreError
from cards import batch, grant, keys, signed_code
from cards.batch import BatchError, Kind
from cards.card import CardError, parse_card
from runtime.cli import Commands, program

HELP = """\
Reference backend for redeemd boxes.

examples:
  redeemd-backend keygen --dir keys/
  redeemd-backend delegate --dir keys/ --merchant acme --days 365
  redeemd-backend issue --dir keys/ --merchant acme --kind cards --input cards.json --out 0001.rdb
  redeemd-backend issue --dir keys/ --merchant acme --input codes.csv --out 0002.rdb
  redeemd-backend mint --dir keys/ --card 7 --serial 1 --count 10
  redeemd-backend publish --dir keys/ --broker mqtt://127.0.0.1:1883
  redeemd-backend collect --dir keys/ --broker mqtt://127.0.0.1:1883
  redeemd-backend box add --dir keys/ --merchant acme box-0042
  redeemd-backend boxes --dir keys/ --offline 1h
  redeemd-backend export --dir keys/ --out /media/usb/ 4-6
  redeemd-backend grant add --dir keys/ --box box-0042 --card 7 --quota 500 --days 30 \
      --broker mqtt://127.0.0.1:1883
  redeemd-backend claim --dir keys/ --listen 127.0.0.1:8080
  redeemd-backend dispensing --dir keys/ --by store
  redeemd-backend console --dir keys/ --listen 127.0.0.1:8081

The backend's records (batches, box events, the fleet) are in {dir}/backend.db, or in
PostgreSQL with --database postgresql://user@host:port/name (or the environment
variable REDEEMD_BACKEND_DATABASE), which publishers and collectors on several hosts
can share:
  redeemd-backend collect --dir keys/ --broker mqtt://broker:1883 \\
      --database postgresql://redeemd@db.internal/redeemd
"""


class UsageError(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        with _database(getattr(args, "database", None)):  # `box` alone has no options
            return args.func(args)
    except (
        KeystoreError,
        UsageError,
        BatchError,
        CardError,
        keys.TrustError,
        OSError,
        StoreError,
        BrokerUrlError,
        signed_code.SignedCodeError,
        ExportError,
    ) as exc:
        print(f"redeemd-backend: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = program("redeemd-backend", HELP)
    commands = Commands(parser, common=key_directory)
    command = commands.add
    p = command(
        "keygen",
        cmd_keygen,
        "Create root, issuer and code keys.",
        "redeemd-backend keygen --dir keys/",
    )
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p = command(
        "delegate",
        cmd_delegate,
        "Sign the issuer key with the root key for merchants.",
        "redeemd-backend delegate --dir keys/ --merchant acme --days 365",
    )
    p.add_argument("--merchant", action="append", required=True, help="repeat for several")
    p.add_argument("--days", type=int, default=365)
    p = command(
        "issue",
        cmd_issue,
        "Write a signed batch file from a CSV of codes or a JSON list of cards.",
        "redeemd-backend issue --dir keys/ --merchant acme --input codes.csv --out 0002.rdb",
    )
    p.add_argument("--merchant", required=True)
    p.add_argument("--kind", choices=[k.value for k in Kind], default="issue")
    p.add_argument(
        "--input",
        default="-",
        help="CSV (code,card_id[,not_before,not_after,uses,balance]) "
        "or, for --kind cards, a JSON array of card templates; - for stdin",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seq", type=int, help="sequence number (default: next after the last issued)")
    p.add_argument("--expires-days", type=float, default=30.0)
    p.add_argument("--chunk-size", type=int, default=batch.DEFAULT_CHUNK_SIZE)
    p = command(
        "mint",
        cmd_mint,
        "Print signed codes (valid offline before any batch lists them).",
        "redeemd-backend mint --dir keys/ --card 7 --serial 1 --count 10 --days 30",
    )
    p.add_argument("--card", type=int, required=True)
    p.add_argument("--serial", type=int, required=True, help="first serial")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--days", type=float, default=30.0)
    p = command(
        "publish",
        cmd_publish,
        "Publish batches and the signed manifest over MQTT; answer resend requests.",
        "redeemd-backend publish --dir keys/ --broker mqtt://127.0.0.1:1883 --merchant acme",
    )
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port] or mqtts://...")
    p.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})"
    )
    p.add_argument(
        "--merchant",
        action="append",
        help="only these merchants (repeat); default all in backend.db",
    )
    p.add_argument(
        "--heartbeat",
        type=_duration,
        default="1h",
        help="re-sign the manifest at least this often (default 1h)",
    )
    p.add_argument(
        "--poll",
        type=_duration,
        default="1s",
        help="how often backend.db is checked for new batches (default 1s)",
    )
    p = command(
        "export",
        cmd_export,
        "Write stored batches as files for boxes fed by USB stick (expired ones re-signed).",
        "redeemd-backend export --dir keys/ --merchant acme --out /media/usb/ 4-6 9",
    )
    p.add_argument("seqs", nargs="+", metavar="SEQ", help="a sequence (4) or a range (4-6 or 4..6)")
    p.add_argument(
        "--out", type=Path, required=True, help="directory for the files (created if needed)"
    )
    p.add_argument("--merchant", help="default: the only merchant in backend.db")
    p = command(
        "collect",
        cmd_collect,
        "Store box events in the backend's database, ack them, flag gaps and double redemptions.",
        "redeemd-backend collect --dir keys/ --broker mqtt://127.0.0.1:1883 --group main",
    )
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port] or mqtts://...")
    p.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})"
    )
    p.add_argument(
        "--group",
        default=DEFAULT_GROUP,
        help="shared subscription group; collectors in one group split the load",
    )
    box_commands.add_to(commands)
    p = command(
        "boxes",
        cmd_boxes,
        "Show each box's state, last seen, cache and outbox (from its status).",
        "redeemd-backend boxes --dir keys/",
        "redeemd-backend boxes --dir keys/ --offline 1h --merchant acme",
        "redeemd-backend boxes --dir keys/ --behind --json",
        details="Filters narrow together. The collector keeps each box's latest status; "
        "docs/backend.md says what each column means and what to do.",
    )
    p.add_argument(
        "--offline",
        nargs="?",
        type=_duration,
        const=0.0,
        metavar="DURATION",
        help="only boxes not online (or never seen) for at least DURATION (like 1h; "
        "default: any time)",
    )
    p.add_argument(
        "--behind", action="store_true", help="only boxes whose cache_seq is below the latest batch"
    )
    p.add_argument("--holding", action="store_true", help="only boxes with records not yet acked")
    p.add_argument("--merchant", help="only this merchant's boxes")
    p.add_argument("--json", action="store_true", help="one JSON object: {at, boxes: [...]}")
    _dispensing_commands(commands)
    accounts_cli.register(commands)
    console_cli.add_to(commands)
    return parser


def _dispensing_commands(commands: Commands) -> None:
    """grant ..., claim and dispensing (issue 12)."""
    group = commands.group(
        "grant",
        "Grant boxes the right to dispense cards (a quota of claim codes); revoke, list, publish.",
        "redeemd-backend grant add --dir keys/ --box box-0042 --card 7 --quota 500 --days 30",
        "redeemd-backend grant revoke --dir keys/ 3f0c9d1e2a4b5c6d --broker mqtt://127.0.0.1:1883",
        details="Each change signs the box a new grant set, published retained to "
        "{prefix}/{merchant}/box/{box}/grants with --broker, or later with `grant publish`; "
        "--out writes it to a file for `redeemd grant install` on a box fed by USB stick.",
    )

    def delivery(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", help="publish the box's new grant set there (mqtt://...)")
        p.add_argument(
            "--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})"
        )
        p.add_argument("--out", type=Path, help="also write the signed grant set to this file")

    p = group.add(
        "add",
        cmd_grant_add,
        "Grant a box's key cards to dispense, up to a quota, in a window.",
        "redeemd-backend grant add --dir keys/ --box box-0042 --card 7,8 --quota 500 --days 30",
        "redeemd-backend grant add --dir keys/ --box box-0042 --card 7 --quota 50 "
        "--from 2026-12-24 --until 2026-12-26T18:00 --box-key BASE64",
    )
    p.add_argument("--box", required=True, help="a registered box (redeemd-backend box add)")
    p.add_argument("--card", required=True, type=_card_ids, help="card id(s), comma-separated")
    p.add_argument("--quota", required=True, type=int, help="how many claim codes the box may mint")
    p.add_argument(
        "--from",
        dest="start",
        type=_when,
        help="start: YYYY-MM-DD[THH:MM] UTC or Unix seconds (default now)",
    )
    end = p.add_mutually_exclusive_group()
    end.add_argument("--days", type=float, help="length in days (default 30)")
    end.add_argument("--until", type=_when, help="end: YYYY-MM-DD[THH:MM] UTC or Unix seconds")
    p.add_argument(
        "--box-key",
        metavar="B64",
        help="the box's public key (`redeemd box-key` on the box); default: the key the "
        "box's status reports, else the key of its newest grant",
    )
    delivery(p)
    p = group.add(
        "revoke",
        cmd_grant_revoke,
        "Revoke a grant: the box stops dispensing it, the claim service refuses its codes.",
        "redeemd-backend grant revoke --dir keys/ 3f0c9d1e2a4b5c6d --broker mqtt://127.0.0.1:1883",
    )
    p.add_argument("grant_id", metavar="GRANT_ID")
    delivery(p)
    p = group.add(
        "list", cmd_grant_list, "List grants.", "redeemd-backend grant list --dir keys/ --json"
    )
    p.add_argument("--box", help="only this box's grants")
    p.add_argument("--json", action="store_true", help="a JSON array of grants")
    p = group.add(
        "publish",
        cmd_grant_publish,
        "Publish each box's newest grant set not yet published (retained).",
        "redeemd-backend grant publish --dir keys/ --broker mqtt://127.0.0.1:1883",
        "redeemd-backend grant publish --dir keys/ --broker mqtt://127.0.0.1:1883 --again",
    )
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host[:port] or mqtts://...")
    p.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})"
    )
    p.add_argument("--box", action="append", help="only these boxes (repeat)")
    p.add_argument(
        "--again",
        action="store_true",
        help="publish the newest sets even if published before (the broker lost them)",
    )
    p = commands.add(
        "claim",
        cmd_claim,
        "Serve the claim pages customers open from a box's claim QR code (HTTP).",
        "redeemd-backend claim --dir keys/ --listen 127.0.0.1:8080",
        details="Run it behind a TLS reverse proxy; boxes are configured with the public URL "
        "https://HOST/c/ (docs/backend.md).",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        type=_listen,
        help="HOST:PORT (default 127.0.0.1:8080)",
    )
    p.add_argument(
        "--code-days",
        type=float,
        help="the signed codes given end this many days after the claim (default: the "
        "card's own validity)",
    )
    p.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        help="proxies trusted for X-Forwarded-For/-Proto (default 127.0.0.1)",
    )
    p = commands.add(
        "dispensing",
        cmd_dispensing,
        "Dispensed -> claimed -> redeemed counts per card, box or store.",
        "redeemd-backend dispensing --dir keys/",
        "redeemd-backend dispensing --dir keys/ --by store --json",
    )
    p.add_argument("--by", choices=claims.BY, default="card", help="rows per (default card)")
    p.add_argument("--json", action="store_true", help="one JSON object: {by, rows: [...]}")


def key_directory(parser: argparse.ArgumentParser) -> None:
    """--dir and --database, which every command (and every `box` action) takes."""
    parser.add_argument("--dir", type=Path, required=True, help="the backend's key directory")
    parser.add_argument(
        "--database",
        metavar="URL",
        help="the backend's records in PostgreSQL: postgresql://user[:password]@host[:port]/name "
        f"(default: ${DATABASE_ENV}, else the SQLite file backend.db in --dir)",
    )


@contextlib.contextmanager
def _database(url: str | None):
    """--database for the length of one command: the store reads it from the environment
    wherever the command opens it (the collector, the publisher, the box commands), so
    it is set here once rather than handed through each of them."""
    if url is None:
        yield
        return
    before = os.environ.get(DATABASE_ENV)
    os.environ[DATABASE_ENV] = url
    try:
        yield
    finally:
        if before is None:
            del os.environ[DATABASE_ENV]
        else:
            os.environ[DATABASE_ENV] = before


def _duration(text: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `1d` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 30s, 15m, 1h)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _until_signalled(run) -> int:
    """Run `run(stop)` until SIGINT or SIGTERM; both stop it cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run(stop)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    publisher = Publisher(
        args.dir,
        args.broker,
        prefix=args.prefix,
        merchants=args.merchant,
        heartbeat=args.heartbeat,
        poll=args.poll,
    )
    print(
        f"publishing from {Store.describe(args.dir)} to {args.broker} under {args.prefix}/",
        flush=True,
    )
    return _until_signalled(publisher.run)


def cmd_collect(args: argparse.Namespace) -> int:
    collector = Collector(args.dir, args.broker, prefix=args.prefix, group=args.group)
    print(
        f"collecting {collector.topic} from {args.broker} into {Store.describe(args.dir)}",
        flush=True,
    )
    return _until_signalled(collector.run)


def cmd_boxes(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        rows = store.box_rows()
    finally:
        store.close()
    now = int(time.time())
    entries = boxes_view.select(
        boxes_view.view(rows, now),
        offline=args.offline,
        behind=args.behind,
        holding=args.holding,
        merchant=args.merchant,
    )
    if args.json:
        print(json.dumps({"at": now, "boxes": entries}, indent=1))
        return 0
    if not rows:
        print(f"no boxes registered: redeemd-backend box add --dir {args.dir} --merchant M BOX")
    elif args.merchant is not None and all(r.merchant != args.merchant for r in rows):
        known = ", ".join(sorted({r.merchant for r in rows}))
        raise UsageError(f"no box is registered for merchant {args.merchant} (merchants: {known})")
    elif not entries:
        print(f"none of the {len(rows)} registered box(es) match")
    else:
        print(boxes_view.table(entries, now))
    return 0


def _card_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not card ids like 7 or 7,8") from None
    if not all(0 < i <= grant.MAX_CARD_ID for i in ids):
        raise argparse.ArgumentTypeError(f"card ids must be 1..{grant.MAX_CARD_ID}")
    return ids


def _when(text: str) -> int:
    """`1767225600`, `2026-12-24`, `2026-12-24T18:00` (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give YYYY-MM-DD, YYYY-MM-DDTHH:MM (UTC) or Unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (like 127.0.0.1:8080)")
    return host.strip("[]"), int(port)


def _deliver(args: argparse.Namespace, store: Store, made: grants.Made) -> None:
    """A new set: to --out, and to --broker (else it waits for `grant publish`)."""
    signed = made.signed
    if signed is None:
        print(
            f"no grant set signed: box {made.grant.box} no longer holds key "
            f"{made.grant.box_key_id}; the claim service refuses the grant's codes from now"
        )
        return
    print(
        f"signed grant set {signed.merchant}/{signed.box} seq {signed.seq} "
        f"for box key {signed.box_key_id}"
    )
    if args.out is not None:
        args.out.write_bytes(signed.data)
        print(f"wrote {args.out}: on the box, redeemd grant install {args.out.name}")
    if args.broker is not None:
        try:
            grants.publish_latest(store, args.broker, args.prefix, [signed.box])
        except grants.GrantsError as exc:
            raise UsageError(str(exc)) from None
    else:
        print(
            "not published: redeemd-backend grant publish --dir "
            f"{args.dir} --broker mqtt://... (or pass --broker)"
        )


def cmd_grant_add(args: argparse.Namespace) -> int:
    if not 1 <= args.quota <= grant.MAX_QUOTA:
        raise UsageError(f"--quota {args.quota} is out of range: allowed 1..{grant.MAX_QUOTA}")
    now = int(time.time())
    start = now if args.start is None else args.start
    if args.until is not None:
        end = args.until
    else:
        end = start + _seconds(30.0 if args.days is None else args.days, "--days")
    if end < start:
        raise UsageError(f"the grant would end ({utc(end)}) before it starts ({utc(start)})")
    keystore = Keystore(args.dir)
    store = Store.open(args.dir)
    try:
        try:
            public = grants.box_key(store, args.box, args.box_key)
            made = grants.add(
                store,
                keystore,
                box=args.box,
                cards=args.card,
                quota=args.quota,
                not_before=start,
                not_after=end,
                box_key=public,
                now=now,
            )
        except grants.GrantsError as exc:
            raise UsageError(str(exc)) from None
        row = made.grant
        print(
            f"grant {row.id}: box {row.box} (key {row.box_key_id}) may dispense card(s) "
            f"{','.join(map(str, row.cards))}, {row.quota} claim codes, "
            f"{utc(row.not_before)} to {utc(row.not_after)}"
        )
        _deliver(args, store, made)
    finally:
        store.close()
    return 0


def cmd_grant_revoke(args: argparse.Namespace) -> int:
    keystore = Keystore(args.dir)
    store = Store.open(args.dir)
    try:
        try:
            made = grants.revoke(store, keystore, args.grant_id.lower())
        except grants.GrantsError as exc:
            raise UsageError(str(exc)) from None
        print(f"grant {made.grant.id} of box {made.grant.box} revoked")
        _deliver(args, store, made)
    finally:
        store.close()
    return 0


def cmd_grant_list(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        rows = grants.grants(store, args.box)
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=1))
        return 0
    if not rows:
        print("no grants" + (f" for box {args.box}" if args.box else ""))
        return 0
    print(f"{'GRANT':16}  {'BOX':14} {'CARDS':10} {'QUOTA':>7}  {'FROM':20} {'UNTIL':20} STATE")
    now = int(time.time())
    for r in rows:
        state = (
            f"revoked {utc(r.revoked_at)}"
            if r.revoked_at is not None
            else "ended"
            if r.not_after < now
            else "not started"
            if r.not_before > now
            else "live"
        )
        cards = ",".join(map(str, r.cards))
        print(
            f"{r.id}  {r.box:14} {cards:10} {r.quota:>7}  {utc(r.not_before):20} "
            f"{utc(r.not_after):20} {state}"
        )
    return 0


def cmd_grant_publish(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        try:
            done = grants.publish_latest(
                store, args.broker, args.prefix, args.box, again=args.again
            )
        except grants.GrantsError as exc:
            raise UsageError(str(exc)) from None
    finally:
        store.close()
    if not done:
        print("nothing to publish: every box's newest grant set was published (--again resends)")
    return 0


def cmd_claim(args: argparse.Namespace) -> int:
    from backend.claim_service import ClaimService

    host, port = args.listen
    service = ClaimService(args.dir, code_days=args.code_days)
    print(
        f"claim service on http://{host}:{port}/c/CODE with {Store.describe(args.dir)}",
        flush=True,
    )
    web.serve(service.app(), host, port, args.forwarded_allow_ips)
    return 0


def cmd_dispensing(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        rows = claims.funnel(store, args.by)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"by": args.by, "rows": [r.to_json(args.by) for r in rows]}, indent=1))
        return 0
    if not rows:
        print("nothing dispensed or claimed yet")
        return 0
    print(f"{'MERCHANT':12} {args.by.upper():14} {'DISPENSED':>9} {'CLAIMED':>8} {'REDEEMED':>8}")
    for r in rows:
        print(f"{r.merchant:12} {r.key!s:14} {r.dispensed:>9} {r.claimed:>8} {r.redeemed:>8}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    seqs = parse_seqs(args.seqs)
    keystore = Keystore(args.dir)
    store = Store.open(args.dir)
    try:
        written = export(store, keystore, pick_merchant(store, args.merchant), seqs, args.out)
    finally:
        store.close()
    for done in written:
        issued = done.batch
        note = f"; re-signed, the stored copy {done.resigned}" if done.resigned else ""
        print(
            f"wrote {done.path}: {issued.kind} batch {issued.merchant}/{issued.seq}, "
            f"{issued.count} entries{note}"
        )
    print(f"on the box: redeemd import {args.out}/*.rdb")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    written = Keystore(args.dir).generate(force=args.force)
    print(f"wrote {', '.join(written)} in {args.dir}")
    print("copy root.pub and code.key to each box; keep root.key offline")
    return 0


def cmd_delegate(args: argparse.Namespace) -> int:
    store = Keystore(args.dir)
    now = int(time.time())
    delegation = keys.delegate(
        store.private("root"),
        store.public("issuer"),
        tuple(args.merchant),
        now - 3600,
        now + args.days * 86400,
    )
    store.save_delegation(delegation)
    print(
        f"issuer key {delegation.key_id} may sign for {', '.join(args.merchant)} for {args.days} days"
    )
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    store = Keystore(args.dir)
    kind = Kind(args.kind)
    # Checked before anything is read or allocated: boxes refuse both (protocol.md 9).
    if args.seq is not None and not 1 <= args.seq <= batch.MAX_SEQ:
        raise UsageError(f"--seq {args.seq} is out of range: allowed 1..{batch.MAX_SEQ}")
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size {args.chunk_size} is out of range: allowed 1 or more bytes")
    expires_in = _seconds(args.expires_days, "--expires-days")
    now = int(time.time())
    # Before the input is read or a sequence allocated: a batch signed by a key not
    # delegated for this merchant at created_at is refused by every box.
    private, delegation = store.signer(args.merchant, now)
    if now + expires_in > delegation.not_after:
        print(
            f"redeemd-backend: note: boxes refuse this batch from {utc(delegation.not_after)}, "
            "when the issuer key's delegation ends, not when it expires; delegate again "
            "with more --days for a longer-lived batch",
            file=sys.stderr,
        )
    text = _read_text(args.input)
    if kind is Kind.CARDS:
        templates = _cards(text, args.merchant)
        entries = batch.encode_cards(templates)
    else:
        try:
            entries = codes_csv.entries(text, kind, store.code_key())
        except codes_csv.CsvError as exc:
            raise UsageError(f"{_source(args.input)}: {exc}") from None

    def sign(seq: int) -> bytes:
        return batch.build(
            private,
            delegation,
            merchant=args.merchant,
            seq=seq,
            kind=kind,
            entries=entries,
            created_at=now,
            expires_at=now + expires_in,
            chunk_size=args.chunk_size,
        )

    # backend.db allocates the sequence and keeps the batch, so `publish` can send it
    # and answer resend requests for it.
    backend = Store.open(args.dir)
    try:
        issued = backend.issue(args.merchant, kind, sign, seq=args.seq)
    finally:
        backend.close()
    seq, data = issued.seq, issued.data
    args.out.write_bytes(data)
    count = (
        len(json.loads(entries)) if kind is Kind.CARDS else len(entries) // batch.ENTRY_SIZES[kind]
    )
    print(
        f"wrote {args.out}: {kind} batch {args.merchant}/{seq}, {count} entries, {len(data)} bytes"
    )
    return 0


def _read_text(name: str) -> str:
    """The --input file (or stdin for -) as UTF-8 text."""
    data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{_source(name)} is not valid UTF-8: byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}; save the file as UTF-8"
        ) from None


def _source(name: str) -> str:
    """The --input as an error message names it."""
    return "standard input" if name == "-" else name


def _seconds(days: float, flag: str) -> int:
    if not 0 < days <= 36500:  # also refuses nan
        raise UsageError(f"{flag} {days} is out of range: allowed more than 0, up to 36500")
    return int(days * 86400)


def _cards(text: str, merchant: str) -> list[dict]:
    try:
        templates = json.loads(text)
    # ValueError: integers over Python's 4300-digit limit; RecursionError: deep nesting.
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"cards input is not JSON: {exc}") from None
    if not isinstance(templates, list):
        raise UsageError("cards input must be a JSON array of card templates")
    seen: dict[int, int] = {}
    for number, template in enumerate(templates, start=1):
        if not isinstance(template, dict):
            raise UsageError(
                f"cards input element {number} is {json.dumps(template)[:40]}: "
                "each element must be a JSON object (a card template)"
            )
        template.setdefault("merchant", merchant)
        card = parse_card(template)
        # Both refused by every box or silently lost there: the box takes a cards batch's
        # templates only for the batch's merchant, and a later template replaces an
        # earlier one with the same id.
        if card.merchant != merchant:
            raise UsageError(
                f"cards input element {number} (card {card.card_id}) is for merchant "
                f"{card.merchant!r}, not --merchant {merchant!r}: boxes refuse a cards "
                f"batch with another merchant's card; issue it with --merchant {card.merchant}"
            )
        if card.card_id in seen:
            raise UsageError(
                f"cards input elements {seen[card.card_id]} and {number} both have id "
                f"{card.card_id}: a card id names one template; keep one of them"
            )
        seen[card.card_id] = number
    return templates


def cmd_mint(args: argparse.Namespace) -> int:
    store = Keystore(args.dir)
    # A signed code names no merchant (card ids are per merchant; a box checks its own
    # card's merchant against the delegation), so only the delegation's window can be
    # checked here: codes signed outside it are refused by every box.
    private, delegation = store.signer(None, int(time.time()))
    if args.count < 1:
        raise UsageError(f"--count {args.count} is out of range: allowed 1 or more")
    last = args.serial + args.count - 1
    if args.serial >= 0 and last >= claims.CLAIM_SERIAL_BASE:
        # Checked before printing, so no partial run of codes is handed out. Serials from
        # 2^62 up are the claim service's and transfers' (backend/claims.py): a code minted
        # here with one of them would be the same code as a customer's.
        raise UsageError(
            f"--serial {args.serial} with --count {args.count} ends at serial {last}: "
            f"allowed 0..{claims.CLAIM_SERIAL_BASE - 1} (serials from 2^62 up are given by "
            "the claim service and transfers)"
        )
    lifetime = _seconds(args.days, "--days")
    now = int(time.time())
    not_before, not_after = max(now - 60, delegation.not_before), now + lifetime
    if not_after > delegation.not_after:
        # Boxes refuse codes that outlive the key's delegation; end them with it instead.
        not_after = delegation.not_after
        print(
            f"redeemd-backend: note: codes end at {not_after}, when the issuer key's delegation "
            "ends; delegate again with more --days for longer-lived codes",
            file=sys.stderr,
        )
    for serial in range(args.serial, args.serial + args.count):
        print(signed_code.mint(private, args.card, serial, not_before, not_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
