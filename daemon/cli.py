"""The `redeemd` command line: what a technician types at the box."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sqlite3
import sys
import time
import uuid
from pathlib import Path

from cards.batch import BatchError, open_file
from daemon import config as config_mod
from daemon import liveness, logs
from daemon.config import Config, ConfigError
from runtime.cli import Commands, program
from storage import batch_import, codes, ledger, outbox, trust
from storage.database import (
    StorageError,
    connect,
    is_empty,
    marker_path,
    open_database,
    refuse_if_lost,
)

HELP = """\
redeemd validates coupon, member-card, gift-card and ticket codes offline against a
signed cache in SQLite and records every redemption durably.

examples:
  redeemd run                           scan on stdin with the built-in defaults
  redeemd -c /etc/redeemd/config.toml check-config
  redeemd import /media/usb/batch-0007.rdb
  redeemd status --json
  redeemd box-key                       the key to grant this box dispensing rights
  redeemd dispense --card 8             a claim code for card 8, as a QR in the terminal
"""


class CommandError(RuntimeError):
    """A command cannot do what was asked; the message says why and what to do."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.setup(verbose=args.verbose)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"redeemd: configuration {exc.source} is not usable:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except (StorageError, BatchError, batch_import.ImportRefused, CommandError) as exc:
        print(f"redeemd: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(
            f"redeemd: database error: {exc}; nothing was changed. Check free disk space "
            "and permissions of the state directory",
            file=sys.stderr,
        )
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = program("redeemd", HELP)
    config_help = (
        "config file (default $REDEEMD_CONFIG, then /etc/redeemd/config.toml, then built-in "
        "defaults)"
    )
    parser.add_argument("-c", "--config", help=config_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    def also_after_the_command(p: argparse.ArgumentParser) -> None:
        # Before or after the command, as people type them: `redeemd -c F status` and
        # `redeemd status -c F`. SUPPRESS: not given here keeps what was given before it.
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )

    commands = Commands(parser, common=also_after_the_command)
    command = commands.add
    p = command(
        "run", cmd_run, "Run the daemon in the foreground.", "redeemd run --json < scans.txt"
    )
    p.add_argument("--json", action="store_true", help="print verdicts as JSON lines")
    command(
        "check-config",
        cmd_check_config,
        "Validate the config file and exit.",
        "redeemd -c /etc/redeemd/config.toml check-config",
    )
    command(
        "init",
        cmd_init,
        "Create an empty database, or start over on a box whose database was lost "
        "(redeemd refuses to start on a missing or empty one once it has used one).",
        "redeemd init",
    )
    p = command(
        "import",
        cmd_import,
        "Verify and apply signed batch files (e.g. from a USB stick).",
        "redeemd import batch-0001.rdb batch-0002.rdb",
    )
    p.add_argument("files", nargs="+", type=Path, help="batch files, applied in sequence order")
    p = command(
        "check",
        cmd_check,
        "Show the verdict for a code without redeeming or recording it.",
        "redeemd check DEMO-0001",
    )
    p.add_argument("code")
    p = command(
        "ledger",
        cmd_ledger,
        "Export the ledger (every verdict) as JSON lines or CSV.",
        "redeemd ledger --format csv --after 1200 > ledger.csv",
    )
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--after", type=int, default=0, help="only records with box sequence > N")
    p = command(
        "backup",
        cmd_backup,
        "Copy the database to a file, safely while redeemd runs.",
        "redeemd backup /var/lib/redeemd/backup/redeemd-$(date +%F).db",
    )
    p.add_argument("file", type=Path, help="where to write the copy (must not exist yet)")
    command(
        "devices",
        cmd_devices,
        "List serial ports, input devices and cameras, with config snippets.",
        "redeemd devices",
    )
    p = command(
        "decode",
        cmd_decode,
        "Print the codes the camera finds in photos (or videos) taken at the counter.",
        "redeemd decode --json counter/*.jpg",
    )
    p.add_argument(
        "images",
        nargs="+",
        type=Path,
        help="image files (PNG, JPEG, WebP ..., read directly) or video files (read by ffmpeg)",
    )
    p.add_argument(
        "--decoder",
        choices=("zxing", "zbar"),
        default="zxing",
        help="the camera decoder to check with (a camera's `decoder` setting)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document: every file's codes")
    p = command(
        "status",
        cmd_status,
        "Show cache, trust and outbox state, and each scanner's driver state "
        "(connected, disconnected, error ...).",
        "redeemd status --json",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command(
        "box-key",
        cmd_box_key,
        "Show this box's public key and key id (made on first use), for the backend to "
        "grant it dispensing rights. The private key never leaves the box.",
        "redeemd box-key",
        "redeemd box-key --json",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    grant = commands.group(
        "grant",
        "Dispensing grants: install the grant set the backend signed for this box.",
        "redeemd grant install /media/usb/box-1.rdg",
    )
    p = grant.add(
        "install",
        cmd_grant_install,
        "Verify a grant set file and make it the one this box holds (never an older one).",
        "redeemd grant install /media/usb/box-1.rdg",
    )
    p.add_argument("file", type=Path, help="the grant set file (.rdg) from the backend")
    p = command(
        "dispense",
        cmd_dispense,
        "Dispense claim codes for a card and show each as a QR code in the terminal "
        "(through the running daemon's local API, else directly).",
        "redeemd dispense --card 8",
        "redeemd dispense --card 8 --count 3 --json",
    )
    p.add_argument("--card", type=int, required=True, help="the card template id")
    p.add_argument("--count", type=int, default=1, help="how many claim codes (1-10, default 1)")
    p.add_argument("--print", action="store_true", help="also print receipts ([printer])")
    p.add_argument(
        "--json", action="store_true", help="the local API's answer (with SVG and PNG) as JSON"
    )
    p = command(
        "doctor",
        cmd_doctor,
        "Check config, database, clock, scanner permissions, broker, disk and cache "
        "freshness; one line per problem with the fix (exit 1 if any).",
        "sudo redeemd doctor --user redeemd",
    )
    p.add_argument(
        "--user",
        help="judge device and file access for this user (default: redeemd when run as root "
        "and it exists, else you)",
    )
    p.add_argument(
        "--min-free",
        type=int,
        default=100,
        metavar="MB",
        help="free space wanted on the state directory's disk (default 100)",
    )
    return parser


def _config(args: argparse.Namespace) -> Config:
    return config_mod.load(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import Service

    return Service(
        _config(args), as_json=args.json, load=lambda: config_mod.load(args.config)
    ).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(
        f"{config.source}: ok (box {config.box.id}, merchant {config.box.merchant}, "
        f"store {config.box.store}, {len(config.trust.root_keys)} root key(s), "
        f"{len(config.scanners)} scanner(s), database {config.box.database})"
    )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """The one way to start over on an empty database once a box has used one: said
    on purpose, because it forgets the applied batch sequence and the time floor."""
    config = _config(args)
    path = config.box.database
    if not is_empty(path):
        raise CommandError(
            f"{path} already holds a database; `redeemd init` never overwrites one. To "
            f"start this box over, stop redeemd and move {path}* aside (keep the files: "
            "records not yet on the backend are only there), then run it again"
        )
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size:
        raise CommandError(
            f"{wal} is left from a previous database and would be read into the new one; "
            "move it aside with the database, then run `redeemd init` again"
        )
    lost = marker_path(path).exists()
    open_database(path, init=True).close()
    print(f"initialised an empty database at {path}")
    if lost:
        print(
            "this box starts over: its ledger begins again at sequence 1 and it accepts "
            "batches from sequence 1. If it keeps its [box] id, tell the backend operator; "
            "a new id keeps the two ledgers apart (docs/operations.md, 'Replace a box')"
        )
    print("next: redeemd import BATCH-FILES..., or start redeemd with [sync] enabled")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    config = _config(args)
    conn = open_database(config.box.database)
    from daemon.engine import Engine

    engine = Engine(conn, config)
    batches = []
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        try:
            batches.append(
                (
                    path,
                    open_file(
                        data, config.trust.root_keys, max_entries_size=config.trust.max_batch_bytes
                    ),
                )
            )
        except BatchError as exc:
            raise CommandError(f"{path}: refused, nothing applied: {exc}") from None
    for path, batch in sorted(batches, key=lambda b: b[1].header.seq):
        try:
            result = batch_import.apply(
                conn, batch, merchant=config.box.merchant, now=engine.now(), wall=int(time.time())
            )
        except batch_import.ImportRefused as exc:
            raise CommandError(f"{path}: refused, nothing applied: {exc}") from None
        engine.reload()
        print(f"{path}: {result.describe()}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from daemon.engine import Engine
    from daemon.service import describe

    try:
        # argv holds undecodable bytes as lone surrogates (PEP 383); a code is text.
        args.code.encode("utf-8")
    except UnicodeEncodeError as exc:
        point = ord(args.code[exc.start])
        what = f"byte 0x{point - 0xDC00:02x}" if 0xDC80 <= point <= 0xDCFF else f"U+{point:04X}"
        raise CommandError(
            f"the code is not valid UTF-8: {what} at position {exc.start}; "
            "type the code as text (scanners' bytes are checked by `redeemd run`)"
        ) from None
    config = _config(args)
    conn = open_database(config.box.database)
    print(describe(Engine(conn, config).check(args.code)))
    return 0


def cmd_box_key(args: argparse.Namespace) -> int:
    from daemon.box_key import BoxKeyError, load_or_create, path_in

    config = _config(args)
    try:
        key = load_or_create(config.box.state_dir)
    except BoxKeyError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(
            json.dumps(
                {"box": config.box.id, "merchant": config.box.merchant, **key.describe()}, indent=2
            )
        )
        return 0
    print(f"box {config.box.id} (merchant {config.box.merchant})")
    print(f"box key id: {key.key_id}")
    print(f"public key: {key.public_b64}")
    print(f"(private key in {path_in(config.box.state_dir)}: back it up with the database)")
    return 0


def cmd_grant_install(args: argparse.Namespace) -> int:
    from daemon.box_key import BoxKeyError, load_or_create
    from storage.dispensing import GrantsRefused, install_grants

    config = _config(args)
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        key = load_or_create(config.box.state_dir)
    except BoxKeyError as exc:
        raise CommandError(str(exc)) from None
    conn = open_database(config.box.database)
    try:
        installed = install_grants(
            conn,
            data,
            config.trust.root_keys,
            merchant=config.box.merchant,
            box=config.box.id,
            box_key_id=key.key_id,
        )
    except GrantsRefused as exc:
        raise CommandError(f"{args.file}: {exc}") from None
    finally:
        conn.close()
    print(f"{args.file}: {installed.message}")
    return 0


def cmd_dispense(args: argparse.Namespace) -> int:
    from daemon.config_model import MAX_DISPENSE_COUNT

    if not 1 <= args.count <= MAX_DISPENSE_COUNT:
        raise CommandError(f"--count must be 1..{MAX_DISPENSE_COUNT}")
    config = _config(args)
    state = liveness.probe(config)
    if state.running and not state.summary.endswith("answers"):
        raise CommandError(
            f"redeemd is {state.summary}, and dispensing must go through it (it owns the "
            "ledger's sequence): enable [api] or make its socket reachable for this user"
        )
    request = {
        "cmd": "dispense",
        "card": args.card,
        "count": args.count,
        "key": str(uuid.uuid4()),
        "print": args.print,
    }
    answer = _ask_daemon(config, request) if state.running else _dispense_here(config, request)
    if not answer.get("ok"):
        raise CommandError(f"dispense refused: {answer.get('message')} ({answer.get('error')})")
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        for item in answer["dispensed"]:
            print(item["qr_text"])
            print(item["claim_url"])
            print(
                f"card {item['card_id']}, grant {item['grant_id']} counter {item['counter']}, "
                f"claim by {item['claim_by_iso']}, ledger seq {item['box_seq']}\n"
            )
        refused = answer.get("refused")
        if refused:
            print(f"refused: {refused.get('reason')}: {refused.get('detail', '')}", file=sys.stderr)
    return 0 if not answer.get("refused") else 1


def _ask_daemon(config: Config, request: dict) -> dict:
    """One request to the running daemon's local API; events are skipped."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(config.api.socket))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reader = sock.makefile("rb")
            for line in reader:
                message = json.loads(line)
                if "event" not in message:
                    return message
    except (OSError, ValueError) as exc:
        raise CommandError(
            f"the local API at {config.api.socket} failed ({exc}); the codes dispensed, if "
            "any, are in the ledger (redeemd ledger)"
        ) from None
    raise CommandError(f"the local API at {config.api.socket} closed without answering")


def _dispense_here(config: Config, request: dict) -> dict:
    """No daemon runs: this process is the only writer, as `redeemd run` would be."""
    from daemon.api_commands import Commands
    from daemon.engine import Engine

    conn = open_database(config.box.database)
    try:
        commands = Commands(Engine(conn, config), lambda event: None)
        return commands({**request, "print": False})
    finally:
        conn.close()


def cmd_devices(args: argparse.Namespace) -> int:
    from drivers.discovery import describe_devices

    print(describe_devices())
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from drivers.camera import ZbarDecoder, decode_files
    from drivers.supervisor import DriverError
    from drivers.zxing_decoder import ZxingDecoder

    found = 0
    results = []
    try:
        decoder = ZbarDecoder() if args.decoder == "zbar" else ZxingDecoder()
        for result in decode_files(args.images, decoder):
            found += len(result.reads)
            codes = [
                {"symbology": r.symbology, "aim": r.aim, "text": r.data.decode("utf-8", "replace")}
                for r in result.reads
            ]
            results.append({"path": result.path, "codes": codes, "error": result.error})
            if args.json:
                continue
            if result.error is not None:
                print(f"redeemd: {result.path}: {result.error}", file=sys.stderr)
            for code in codes:
                text = _visible(code["text"])
                print(f"{result.path}: {code['symbology']} {code['aim']}: {text}")
            if not codes and result.error is None:
                print(f"{result.path}: no code found")
    except DriverError as exc:
        # A decoder, Pillow or (for a video) ffmpeg missing: the message says what to install.
        print(f"redeemd: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    if not found:
        print("redeemd: no code found in the given files", file=sys.stderr)
        return 1
    return 0


_SHOWN = {"\x1d": "<GS>", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(text: str) -> str:
    """A code on one terminal line: GS1's separator (0x1D) and line breaks made visible."""
    return re.sub(
        r"[\x00-\x1f\x7f]", lambda m: _SHOWN.get(m.group(), f"\\x{ord(m.group()):02x}"), text
    )


def cmd_ledger(args: argparse.Namespace) -> int:
    config = _config(args)
    conn = _read_only(config)
    # Every column on every row (a scan's record has no grant_id or counter in its
    # event, but an export is a table).
    rows = (
        {**dict.fromkeys(ledger.COLUMNS), **r.to_json()} for r in ledger.records(conn, args.after)
    )
    if args.format == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=ledger.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """SQLite's online backup: a consistent copy even while the daemon writes (a `cp`
    of a WAL database can miss or tear the newest records), checked before it counts."""
    config = _config(args)
    target: Path = args.file
    if target.exists():
        raise CommandError(f"{target} already exists; give a new file name")
    if not target.parent.is_dir():
        raise CommandError(f"{target.parent} is not a directory; create it first")
    source = _read_only(config)
    partial = target.with_name(target.name + ".partial")
    try:
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            seq = ledger.last_seq(copy)
            waiting = outbox.depth(copy)
        finally:
            copy.close()
        if check != "ok":
            raise CommandError(f"the copy does not pass integrity_check ({check}); not kept")
        os.replace(partial, target)
    except sqlite3.Error as exc:
        raise CommandError(f"cannot write {target}: {exc}") from None
    finally:
        source.close()
        partial.unlink(missing_ok=True)
    print(
        f"backed up {config.box.database} to {target}: {target.stat().st_size:,} bytes, "
        f"ledger up to seq {seq}, {waiting} record(s) not yet acknowledged by the backend"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from daemon import doctor

    try:
        account = doctor.Account.named(args.user) if args.user else None
    except KeyError:
        raise CommandError(f"--user {args.user}: no such user") from None
    findings = doctor.check(args.config, account=account, min_free=args.min_free << 20)
    for finding in findings:
        print(finding.line())
    problems = sum(not f.ok for f in findings)
    print(f"{problems} problem(s)" if problems else "all checks ok")
    return 1 if problems else 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    conn = _read_only(config)
    merchant = config.box.merchant
    state = trust.state(conn, merchant)
    # When the cache was known current (protocol.md 16.1), judged by the floored clock
    # as the engine's stale_policy and the status message judge it (section 12).
    newest = trust.cache_time(conn, merchant)
    now = time.time()
    oldest = outbox.oldest_ms(conn)
    floor = state.time_floor
    judged = max(now, floor)
    info = {
        "box": config.box.id,
        "merchant": merchant,
        "store": config.box.store,
        "config": config.source,
        "database": str(config.box.database),
        "cache_seq": state.last_seq,
        "cache_age_s": None if newest is None else int(judged - newest),
        "stale": newest is None or judged - newest > config.trust.max_staleness,
        "codes": codes.count(conn),
        "cards": len(trust.cards(conn)),
        "time_floor": floor,
        "clock": int(now),
        # Positive: the clock is past the newest signed time, as it should be.
        "clock_minus_floor_s": int(now - floor) if floor else None,
        "clock_behind_floor": now < floor,
        "ledger_seq": ledger.last_seq(conn),
        "outbox_depth": outbox.depth(conn),
        "outbox_oldest_age_s": None if oldest is None else int(now - oldest / 1000),
        "broker": config.sync.broker if config.sync.enabled else None,
        "dispensing": _dispensing_status(config, conn),
    }
    conn.close()
    live = _live_status(config)
    info.update(live)
    sync = live["sync"]
    info["broker_connected"] = (
        (sync.get("connected") if isinstance(sync, dict) else None) if config.sync.enabled else None
    )
    info["last_errors"] = _last_errors(live)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(_status_text(info))
    return 0


# How `redeemd status` says "nothing here" for a field, instead of None.
_NONE_TEXT = {
    "cache_age_s": "no batch applied yet",
    "time_floor": "none yet (no signed time seen)",
    "clock_minus_floor_s": "no floor yet",
    "outbox_oldest_age_s": "outbox empty",
    "broker": "none (sync is disabled)",
    "broker_connected": "sync is disabled",
    "status_age_s": "no status.json",
    "alarm": "none",
}


def _dispensing_status(config: Config, conn: sqlite3.Connection) -> dict[str, object]:
    """The box key (not made here: status only reads) and the grant set held."""
    from daemon.box_key import BoxKeyError, load
    from daemon.dispense import grants_status
    from storage import dispensing

    try:
        key = load(config.box.state_dir)
        described: dict[str, object] = {"box_key_id": None, "box_public_key": None}
        if key is not None:
            described = {**key.describe()}
    except BoxKeyError as exc:
        described = {"box_key_id": None, "box_public_key": None, "box_key_problem": str(exc)}
    try:
        grants, problem = dispensing.held_grants(conn, config.trust.root_keys), ""
    except dispensing.GrantsRefused as exc:
        grants, problem = None, str(exc)
    used = dispensing.used_counters(conn, [g.id for g in grants.grants]) if grants else {}
    return {**described, **grants_status(grants, used, problem)}


def _dispensing_text(dispensing: dict, printer: dict | None) -> list[str]:
    lines = [
        f"{'box key':>20}: " + (dispensing["box_key_id"] or "none yet (redeemd box-key makes it)"),
    ]
    if dispensing.get("box_key_problem"):
        lines.append(f"{'box key problem':>20}: {dispensing['box_key_problem']}")
    seq = dispensing.get("grant_seq")
    lines.append(
        f"{'grant set':>20}: "
        + ("none (this box may not dispense)" if seq is None else f"seq {seq}")
    )
    if dispensing.get("problem"):
        lines.append(f"{'grant problem':>20}: {dispensing['problem']}")
    for g in dispensing.get("grants", []):
        cards = ",".join(str(c) for c in g["cards"])
        state = "REVOKED" if g["revoked"] else f"{g['left']} left"
        lines.append(
            f"{'grant':>20}: {g['id']} cards {cards}, used {g['used']}/{g['quota']} ({state}), "
            f"{_utc(g['not_before'])} .. {_utc(g['not_after'])}"
        )
    if printer is not None:
        detail = f" ({printer['detail']})" if printer.get("detail") else ""
        lines.append(
            f"{'printer':>20}: {printer.get('kind')} {printer.get('device')} "
            f"{printer.get('state')}{detail}, {printer.get('printed', 0)} printed, "
            f"{printer.get('failed', 0)} failed"
        )
    return lines


def _status_text(info: dict) -> str:
    """What a technician reads: the same fields as --json, in words (yes/no, dates,
    "none yet") rather than Python's None and False."""
    info = dict(info)
    drivers = info.pop("drivers")
    sync = info.pop("sync") or {}
    errors = info.pop("last_errors")
    dispensing = info.pop("dispensing")
    printer = info.pop("printer", None)
    for key in ("hook", "api"):
        info.pop(key, None)
    lines = []
    for key, value in info.items():
        if key in ("time_floor", "clock"):
            value = f"{value} ({_utc(value)})" if value else None
        lines.append(f"{key:>20}: {_NONE_TEXT.get(key, 'none') if value is None else _word(value)}")
    for key, value in sync.items():
        lines.append(f"{'sync ' + key:>20}: {'none' if value is None else _word(value)}")
    for d in drivers:
        seen = "never" if d.get("last_scan") is None else _utc(d["last_scan"])
        message = f" ({d['message']})" if d.get("message") else ""
        lines.append(
            f"{'scanner ' + d['name']:>20}: {d['kind']} {d['state']}{message}, "
            f"{d['scans']} scans, last {seen}, {d['restarts']} restarts"
        )
    lines += _dispensing_text(dispensing, printer)
    for error in errors or ["none"]:
        lines.append(f"{'last error':>20}: {error}")
    return "\n".join(lines)


def _word(value: object) -> object:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _last_errors(live: dict) -> list[str]:
    """What went wrong most recently, one line per part (engine, sync, each scanner)."""
    errors = []
    if live.get("alarm"):
        errors.append(f"engine: {live['alarm']}")
    sync = live.get("sync") or {}
    shown = set()
    for key in (
        "alarm",
        "stuck",
        "last_error",
        "publish_error",
        "last_refused",
        "last_grants_refused",
    ):
        if sync.get(key) and sync[key] not in shown:  # a conflict is the alarm and last_refused
            shown.add(sync[key])
            errors.append(f"sync {key}: {sync[key]}")
    for d in live.get("drivers") or []:
        if d.get("message") and d.get("state") not in ("connected", "stopped"):
            errors.append(f"scanner {d.get('name')}: {d.get('state')}: {d['message']}")
    hook = live.get("hook")
    if isinstance(hook, dict) and hook.get("last_error"):
        errors.append(f"hook: {hook['last_error']}")
    printer = live.get("printer")
    if isinstance(printer, dict) and printer.get("state") not in ("ready", "unknown"):
        errors.append(f"printer: {printer.get('state')}: {printer.get('detail')}")
    return errors


def _live_status(config: Config) -> dict[str, object]:
    """What the running daemon last wrote: scanner states, sync and alarms. When the
    daemon is not running, its scanners are not read whatever it last wrote of them."""
    path = config.box.state_dir / "status.json"
    try:
        live = json.loads(path.read_text())
        age = time.time() - float(live.get("updated_at", 0))
        pid = int(live.get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return {
            "daemon": "not running (no status.json)",
            "status_age_s": None,
            "alarm": None,
            "drivers": [],
            "sync": None,
            "hook": None,
            "api": None,
        }
    # Written every 2 s by a live daemon: an older file is a daemon that stopped or
    # hangs, and its pid may be a zombie or, after a reboot, another process.
    running = age < liveness.STATUS_FRESH and liveness.alive(pid)
    drivers = [d for d in live.get("drivers", []) if isinstance(d, dict)]
    if not running:
        drivers = [_not_running(d, live.get("updated_at")) for d in drivers]
    return {
        "daemon": f"running, pid {pid}" if running else "not running",
        "status_age_s": int(age),
        "alarm": live.get("alarm"),  # the last one stays worth knowing
        "drivers": drivers,
        "sync": live.get("sync") if running else None,
        "hook": live.get("hook") if running else None,
        "api": live.get("api") if running else None,
        **({"printer": live["printer"]} if running and live.get("printer") else {}),
    }


def _not_running(driver: dict, updated_at: object) -> dict:
    """A scanner of a daemon that is not running: `stopped`, whatever it was last."""
    if driver.get("state") in ("ended", "stopped"):
        return driver
    when = _utc(float(updated_at)) if isinstance(updated_at, (int, float)) else "?"
    return {
        **driver,
        "state": "stopped",
        "last_state": driver.get("state"),
        "message": f"redeemd is not running; at {when} this scanner was {driver.get('state')}",
    }


def _read_only(config: Config):
    refuse_if_lost(config.box.database)
    if not config.box.database.exists():
        raise CommandError(
            f"no database at {config.box.database} yet; run `redeemd import` or `redeemd run` first"
        )
    from daemon.doctor import give_back

    open_database(config.box.database).close()  # migrate if this release is newer
    conn = connect(config.box.database, readonly=True)
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # makes -wal and -shm ...
    give_back(config.box.database)  # ... which stay the daemon's when root runs this
    return conn


if __name__ == "__main__":
    sys.exit(main())
