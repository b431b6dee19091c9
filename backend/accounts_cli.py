"""`redeemd-backend account ...`, `transfer`, `topup`, `limits ...`, `overspends`: card
accounts from the command line (issue 13; the logic is backend/accounts.py).

Each change signs a batch through the store's allocator, as `issue` does: the running
`redeemd-backend publish` sends it to the boxes, and `--out FILE` also writes it for a
box fed by USB stick (`redeemd import FILE`). A code the operator gives is digested
with the merchant's code key here and never stored: pass `-` to type it on standard
input instead of the command line, where shell history and `ps` would keep it.

    redeemd-backend account create --dir keys/ --merchant acme --card 9 --balance 10000
    redeemd-backend account link --dir keys/ --account 9f1c... --code -
    redeemd-backend transfer --dir keys/ --code GIFT-0001 --signed
    redeemd-backend topup --dir keys/ --account 9f1c... --amount 5000
    redeemd-backend limits set --dir keys/ --merchant acme --card 9 --per-account 20000
    redeemd-backend overspends --dir keys/ --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backend import accounts
from backend.accounts import AccountsError, Limit, Made, Receiver
from backend.keystore import Keystore, utc
from backend.store import Store
from cards import keys, signed_code
from cards.digest import code_digest
from cards.normalize import MalformedCode, normalize
from runtime.cli import Commands

STATUS_NAMES = {0: "active", 2: "revoked", 3: "blocked"}


def register(commands: Commands) -> None:
    """Add the account commands to redeemd-backend's (backend/cli.py calls this once)."""
    group = commands.group(
        "account",
        "Card accounts: one balance or count of uses that several codes spend.",
        "redeemd-backend account create --dir keys/ --merchant acme --card 9 --balance 10000",
        "redeemd-backend account link --dir keys/ --account 9f1c0e... --code -",
        details="Each change is a signed batch that `publish` sends (docs/backend.md, Accounts).",
    )
    p = group.add(
        "create",
        cmd_create,
        "Create an account for a card; prints its id.",
        "redeemd-backend account create --dir keys/ --merchant acme --card 9 --balance 10000",
        "redeemd-backend account create --dir keys/ --card 3 --uses 10 --out 0007.rdb",
    )
    p.add_argument("--merchant", help="default: the only merchant in backend.db")
    p.add_argument("--card", type=int, required=True, help="card template id")
    value = p.add_mutually_exclusive_group()
    value.add_argument("--uses", type=int, help="uses the account holds (use-counted cards)")
    value.add_argument("--balance", type=int, help="minor units the account holds")
    _batch_options(p)
    p = group.add(
        "link",
        cmd_link,
        "Link a code to an account: it spends the account's value from then on.",
        "redeemd-backend account link --dir keys/ --account 9f1c0e... --code -",
    )
    p.add_argument("--account", required=True, help="the account id (32 hex digits)")
    p.add_argument("--code", required=True, help="the code, or - to read it from standard input")
    _batch_options(p)
    p = group.add(
        "unblock",
        cmd_unblock,
        "Unblock every code of an account (once an overspend is settled).",
        "redeemd-backend account unblock --dir keys/ --account 9f1c0e...",
    )
    p.add_argument("--account", required=True, help="the account id (32 hex digits)")
    _batch_options(p)
    p = group.add(
        "list",
        cmd_list,
        "List accounts, their value (created + top-ups) and linked codes' count.",
        "redeemd-backend account list --dir keys/ --json",
    )
    p.add_argument("--merchant", help="only this merchant's accounts")
    p.add_argument("--json", action="store_true", help="a JSON array of accounts")
    p = group.add(
        "policy",
        cmd_policy,
        "Show or set the merchant's policy for overspent accounts.",
        "redeemd-backend account policy --dir keys/ --merchant acme --block-overspent",
        details="With --block-overspent, a collector that finds an account overspent (its "
        "boxes spent more than its value offline) issues a `block` batch of its codes; "
        "with --no-block-overspent it only reports it (`overspends`). The policy is kept "
        "in the backend's database: every collector applies it, without a restart.",
    )
    p.add_argument("--merchant", help="default: the only merchant in backend.db")
    p.add_argument(
        "--block-overspent",
        action=argparse.BooleanOptionalAction,
        help="block an overspent account's codes by batch (default: only report)",
    )

    p = commands.add(
        "transfer",
        cmd_transfer,
        "Give a code's value to another code (a gift); the old code answers `transferred`.",
        "redeemd-backend transfer --dir keys/ --code GIFT-0001 --signed",
        "redeemd-backend transfer --dir keys/ --code - --to -",
        details="With --signed the receiver gets a new signed code, which works on every box "
        "at once; it is printed once, here, and never stored. With --to the receiver's code "
        "works once the batch reached the box.",
    )
    p.add_argument("--code", required=True, help="the giver's code, or - for standard input")
    receiver = p.add_mutually_exclusive_group(required=True)
    receiver.add_argument("--to", metavar="NEWCODE", help="the receiver's code (or -)")
    receiver.add_argument(
        "--signed", action="store_true", help="mint a signed code for the receiver"
    )
    p.add_argument("--merchant", help="default: the only merchant in backend.db")
    p.add_argument(
        "--card",
        type=int,
        help="with --signed: the code's card, when the backend cannot tell it (no account, "
        "no record of the code)",
    )
    _batch_options(p)

    p = commands.add(
        "topup",
        cmd_topup,
        "Add value to an account (uses or minor units); each top-up applies once per box.",
        "redeemd-backend topup --dir keys/ --account 9f1c0e... --amount 5000",
    )
    p.add_argument("--account", required=True, help="the account id (32 hex digits)")
    p.add_argument("--amount", type=int, required=True, help="uses or minor units to add")
    _batch_options(p)

    limits = commands.group(
        "limits",
        "Offline spending limits per card and box, sent to the boxes in a `limits` batch.",
        "redeemd-backend limits set --dir keys/ --merchant acme --card 9 --per-redemption 5000",
        "redeemd-backend limits list --dir keys/",
        details="A box refuses (`offline_limit`) a redemption over the per-redemption cap, or "
        "one that takes an account's spending on it, not yet acknowledged by the backend, "
        "over the per-account cap. A limit naming a box wins over the card's '*' limit.",
    )
    p = limits.add(
        "set",
        cmd_limits_set,
        "Set the limit of a card (on one box, or every box) and send the merchant's limits.",
        "redeemd-backend limits set --dir keys/ --merchant acme --card 9 --per-account 20000",
        "redeemd-backend limits set --dir keys/ --card 9 --box box-0042 --per-redemption 1000",
    )
    p.add_argument("--merchant", help="default: the only merchant in backend.db")
    p.add_argument("--card", type=int, required=True)
    p.add_argument("--box", default="*", help="a registered box (default: '*', every box)")
    p.add_argument("--per-redemption", type=int, help="cap on one redemption (uses or units)")
    p.add_argument(
        "--per-account", type=int, help="cap on an account's spending not yet acknowledged"
    )
    _batch_options(p)
    p = limits.add(
        "remove",
        cmd_limits_remove,
        "Take a limit away and send the merchant's remaining limits.",
        "redeemd-backend limits remove --dir keys/ --card 9 --box box-0042",
    )
    p.add_argument("--merchant", help="default: the only merchant in backend.db")
    p.add_argument("--card", type=int, required=True)
    p.add_argument("--box", default="*", help="default: '*'")
    _batch_options(p)
    p = limits.add("list", cmd_limits_list, "List limits.", "redeemd-backend limits list --dir k/")
    p.add_argument("--merchant", help="only this merchant's limits")
    p.add_argument("--json", action="store_true", help="a JSON array of limits")

    p = commands.add(
        "overspends",
        cmd_overspends,
        "Accounts spent past their value by boxes offline, and transfers raced by a redemption.",
        "redeemd-backend overspends --dir keys/",
        "redeemd-backend overspends --dir keys/ --json",
        details="Found by the collector as the boxes' records arrive (docs/backend.md).",
    )
    p.add_argument("--merchant", help="only this merchant's")
    p.add_argument(
        "--json", action="store_true", help="one JSON object: {overspends: [...], conflicts: [...]}"
    )


def _batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="also write the signed batch to this file")
    p.add_argument("--expires-days", type=float, default=30.0, help="default 30")


# ------------------------------------------------------------------ helpers


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[tuple[Store, Keystore]]:
    keystore = Keystore(args.dir)
    store = Store.open(args.dir)
    try:
        yield store, keystore
    finally:
        store.close()


def _signer(keystore: Keystore, args: argparse.Namespace) -> accounts.Signer:
    days = args.expires_days
    if not 0 < days <= 36500:  # also refuses nan
        raise AccountsError(f"--expires-days {days} is out of range: more than 0, up to 36500")
    keystore.private("issuer")  # a missing key is said before anything is read
    return accounts.signer(keystore, expires_in=int(days * 86400))


def _merchant(store: Store, keystore: Keystore, given: str | None) -> str:
    """--merchant, else the only merchant the store has batches for, else the only one
    the issuer key is delegated for; checked against the delegation before anything."""
    if given is None:
        known = store.merchants() or list(keystore.delegation().merchants)
        if len(known) != 1:
            raise AccountsError(f"choose the merchant with --merchant ({', '.join(known)})")
        given = known[0]
    keystore.signer(given, int(time.time()))
    return given


def _digest(keystore: Keystore, text: str, what: str) -> bytes:
    """The keyed digest of a code the operator gave (`-`: one line of standard input)."""
    if text == "-":
        text = sys.stdin.readline().rstrip("\r\n")
    try:
        canonical = normalize(text.encode("utf-8")).text
    except MalformedCode as exc:
        raise AccountsError(f"{what} is not a usable code: {exc}") from None
    return code_digest(keystore.code_key(), canonical)


def _said(args: argparse.Namespace, made: Made) -> None:
    issued = made.batch
    if args.out is not None:
        args.out.write_bytes(issued.data)
        print(f"wrote {args.out}: on a box fed by USB stick, redeemd import {args.out.name}")
    print(
        f"{issued.kind} batch {issued.merchant}/{issued.seq} stored, {issued.count} entries: "
        "a running `redeemd-backend publish` sends it"
    )


def _value(account: accounts.Account) -> str:
    if account.value is None:
        return "unlimited uses"
    return f"{account.value} {'uses' if account.unit == 'uses' else '(minor units)'}"


# ------------------------------------------------------------------ commands


def cmd_create(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        sign = _signer(keystore, args)
        merchant = _merchant(store, keystore, args.merchant)
        roots = {keys.key_id(keystore.public("root")): keystore.public("root")}
        card = accounts.card_template(store, roots, merchant, args.card)
        if card is not None:
            unit = "balance" if card.uses_balance else "uses"
            if args.uses is not None and unit == "balance":
                raise AccountsError(
                    f"card {args.card} is a {card.kind} card, counted in minor units: "
                    "give --balance, not --uses"
                )
            if args.balance is not None and unit == "uses":
                raise AccountsError(
                    f"card {args.card} is a {card.kind} card, counted in uses: give --uses"
                )
            given = args.uses if args.uses is not None else args.balance
            default = card.balance if card.uses_balance else card.uses
            value = given if given is not None else default
        elif args.uses is None and args.balance is None:
            raise AccountsError(
                f"no cards batch in the backend's database has card {args.card} of {merchant}: "
                "say what the account holds with --uses N or --balance N"
            )
        else:
            unit = "uses" if args.uses is not None else "balance"
            value = args.uses if args.uses is not None else args.balance
        made = accounts.create_account(
            store,
            sign,
            merchant=merchant,
            card_id=args.card,
            unit=unit,
            value=value,
            now=int(time.time()),
        )
    assert made.account is not None
    print(f"account {made.id}: card {args.card}, {_value(made.account)}")
    _said(args, made)
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        sign = _signer(keystore, args)
        digest = _digest(keystore, args.code, "--code")
        made = accounts.link(
            store, sign, account_id=args.account, digest=digest, now=int(time.time())
        )
    print(f"code {digest.hex()[:12]}... now spends account {made.id}")
    _said(args, made)
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        sign = _signer(keystore, args)
        made = accounts.unblock(store, sign, account_id=args.account)
    print(f"account {made.id}: its {made.batch.count} code(s) unblocked")
    _said(args, made)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _opened(args) as (store, _):
        rows = accounts.accounts(store, args.merchant)
        codes = {a.id: len(accounts.linked(store, a.merchant, a.id)) for a in rows}
    if args.json:
        print(json.dumps([{**a.to_json(), "codes": codes[a.id]} for a in rows], indent=1))
        return 0
    if not rows:
        print("no accounts: redeemd-backend account create --dir ... --card ID")
        return 0
    print(f"{'ACCOUNT':32}  {'MERCHANT':12} {'CARD':>6} {'VALUE':>24} {'CODES':>5}  STATUS")
    for a in rows:
        status = STATUS_NAMES.get(a.status, str(a.status))
        print(f"{a.id}  {a.merchant:12} {a.card_id:>6} {_value(a):>24} {codes[a.id]:>5}  {status}")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        merchant = _merchant(store, keystore, args.merchant)
        if args.block_overspent is not None:
            accounts.set_policy(
                store, merchant, block_overspent=args.block_overspent, now=int(time.time())
            )
        block = accounts.blocks_overspent(store, merchant)
    if block:
        print(f"{merchant}: an overspent account's codes are blocked by batch")
    else:
        print(f"{merchant}: an overspent account is reported (`overspends`), not blocked")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        sign = _signer(keystore, args)
        merchant = _merchant(store, keystore, args.merchant)
        old = _digest(keystore, args.code, "--code")
        if args.signed:
            card_id = args.card if args.card is not None else accounts.card_of(store, merchant, old)
            if card_id is None:
                raise AccountsError(
                    "the backend does not know this code's card (no account, no record of it): "
                    "give --card ID for the receiver's signed code"
                )
            private, _ = keystore.signer(None, int(time.time()))
            code_key = keystore.code_key()

            def mint(serial: int) -> str:
                # 0, 0: the card's window inside the issuer's delegation (protocol.md 8).
                return signed_code.mint(private, card_id, serial, 0, 0)

            receiver = Receiver(
                card_id=card_id, mint=mint, digest_of=lambda code: code_digest(code_key, code)
            )
        else:
            receiver = Receiver(digest=_digest(keystore, args.to, "--to"))
        made = accounts.transfer(
            store, sign, merchant=merchant, old=old, receiver=receiver, now=int(time.time())
        )
    print(f"transfer {made.id}: code {old.hex()[:12]}... is retired, its value moves on")
    _said(args, made)
    if made.code is not None:
        # After the commit (durable before shown), and only here: it is not stored.
        print("the receiver's code (shown once, not stored; give it to the receiver now):")
        print(made.code)
    return 0


def cmd_topup(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        sign = _signer(keystore, args)
        made = accounts.topup(
            store, sign, account_id=args.account, amount=args.amount, now=int(time.time())
        )
    assert made.account is not None
    print(f"top-up {made.id}: account {made.account.id} +{args.amount}, now {_value(made.account)}")
    _said(args, made)
    return 0


def cmd_limits_set(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        sign = _signer(keystore, args)
        merchant = _merchant(store, keystore, args.merchant)
        limit = Limit(merchant, args.card, args.box, args.per_redemption, args.per_account)
        made = accounts.set_limit(store, sign, limit, now=int(time.time()))
    print(f"limit for card {args.card} on {_box(args.box)} set")
    _said(args, made)
    return 0


def cmd_limits_remove(args: argparse.Namespace) -> int:
    with _opened(args) as (store, keystore):
        sign = _signer(keystore, args)
        merchant = _merchant(store, keystore, args.merchant)
        made = accounts.remove_limit(
            store, sign, merchant=merchant, card_id=args.card, box=args.box, now=int(time.time())
        )
    print(f"limit for card {args.card} on {_box(args.box)} removed")
    _said(args, made)
    return 0


def _box(box: str) -> str:
    return "every box" if box == "*" else f"box {box}"


def cmd_limits_list(args: argparse.Namespace) -> int:
    with _opened(args) as (store, _):
        rows = accounts.limits(store, args.merchant)
    if args.json:
        print(json.dumps([{"merchant": r.merchant, **r.to_json()} for r in rows], indent=1))
        return 0
    if not rows:
        print("no limits: boxes spend offline without a cap")
        return 0
    print(f"{'MERCHANT':12} {'CARD':>6} {'BOX':14} {'PER REDEMPTION':>14} {'PER ACCOUNT':>12}")
    for r in rows:
        each = "-" if r.per_redemption is None else str(r.per_redemption)
        total = "-" if r.per_account is None else str(r.per_account)
        print(f"{r.merchant:12} {r.card_id:>6} {r.box:14} {each:>14} {total:>12}")
    return 0


def cmd_overspends(args: argparse.Namespace) -> int:
    with _opened(args) as (store, _):
        found = accounts.overspends(store, args.merchant)
        raced = accounts.transfer_conflicts(store, args.merchant)
    if args.json:
        print(
            json.dumps(
                {
                    "overspends": [o.to_json() for o in found],
                    "conflicts": [c.to_json() for c in raced],
                },
                indent=1,
            )
        )
        return 0
    if not found and not raced:
        print("no overspent accounts, no transfer conflicts")
        return 0
    for o in found:
        unit = "uses" if o.unit == "uses" else "minor units"
        blocked = f"blocked by batch {o.blocked_seq}" if o.blocked_seq else "not blocked"
        print(
            f"OVERSPENT {o.merchant} account {o.account}: {o.spent} {unit} spent of "
            f"{o.value}, {o.amount_over} over, on {', '.join(o.boxes)} since "
            f"{utc(o.detected_at)}; {blocked}"
        )
        print(f"  records: {' '.join(o.records)}")
    for c in raced:
        print(
            f"CONFLICT transfer {c.merchant}: code {c.digest} redeemed on {c.box} ({c.record_id}) "
            f"at cache_seq {c.cache_seq}, before transfer {c.transfer_id} (batch {c.transfer_seq})"
        )
    return 0
