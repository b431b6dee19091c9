"""`redeemd-backend box ...`: the boxes the backend is set up for, and the broker ACL.

A box is registered once, for one merchant (`box add`). The collector stores events only
from registered boxes, each under its own merchant, and `box acl` writes the Mosquitto
ACL that confines each box to its own topics of its own merchant (backend/broker_acl.py).
Passwords stay with Mosquitto's own tool: `mosquitto_passwd /etc/mosquitto/redeemd.passwd
BOX` (docs/operations.md, "Set up the broker").

    redeemd-backend box add  --dir keys/ --merchant acme box-0042 box-0043
    redeemd-backend box acl  --dir keys/ --out /etc/mosquitto/redeemd-acl.conf
    redeemd-backend box list --dir keys/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from backend import broker_acl
from backend.keystore import Keystore
from backend.publish import DEFAULT_PREFIX
from backend.store import Store, StoreError
from runtime.cli import Commands, Handler

EXAMPLE = "redeemd-backend box add --dir keys/ --merchant acme box-0042"


def add_to(commands: Commands) -> None:
    """Add `box` and its actions to redeemd-backend's commands."""
    box = commands.group(
        "box",
        "Register boxes for a merchant; write the broker ACL for them.",
        EXAMPLE,
        "redeemd-backend box acl --dir keys/ --out /etc/mosquitto/redeemd-acl.conf",
        details="The collector stores events only from registered boxes, each under its own "
        "merchant.",
    )

    def action(name: str, func: Handler, summary: str, example: str) -> argparse.ArgumentParser:
        return box.add(name, _speaking(func), summary, example)

    p = action(
        "add", cmd_add, "Register boxes for a merchant (its box ids = broker usernames).", EXAMPLE
    )
    p.add_argument("--merchant", required=True)
    p.add_argument("boxes", nargs="+", metavar="BOX", help="box ids ([box] id of each box)")
    p = action(
        "remove",
        cmd_remove,
        "Unregister boxes: their new events are refused.",
        "redeemd-backend box remove --dir keys/ box-0042",
    )
    p.add_argument("boxes", nargs="+", metavar="BOX")
    action(
        "list",
        cmd_list,
        "List registered boxes, and boxes that sent events unregistered.",
        "redeemd-backend box list --dir keys/",
    )
    p = action(
        "acl",
        cmd_acl,
        "Write the Mosquitto ACL for the registered boxes.",
        "redeemd-backend box acl --dir keys/ --out /etc/mosquitto/redeemd-acl.conf",
    )
    p.add_argument("--out", type=Path, help="write here (atomically, mode 0644); default stdout")
    p.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})"
    )
    p.add_argument(
        "--backend-user",
        action="append",
        dest="backend_users",
        metavar="NAME",
        help="a broker user of a backend process, one per process (repeat); default "
        + " and ".join(broker_acl.DEFAULT_BACKEND_USERS),
    )


def _speaking(func: Handler) -> Handler:
    """A bad name is a message and exit 1, like every other redeemd-backend error."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except broker_acl.AclError as exc:
            print(f"redeemd-backend: {exc}", file=sys.stderr)
            return 1

    return run


def cmd_add(args: argparse.Namespace) -> int:
    merchant = broker_acl.check_name("merchant", args.merchant)
    boxes = [broker_acl.check_name("box id", b) for b in args.boxes]
    # The collector answers a double redemption with a consumed batch signed for the
    # merchant: a merchant the issuer key may not sign for could never be served.
    delegation = Keystore(args.dir).delegation()
    if merchant not in delegation.merchants:
        raise StoreError(
            f"the issuer key is not delegated for merchant {merchant} (only "
            f"{', '.join(delegation.merchants)}): run redeemd-backend delegate --dir {args.dir} "
            f"--merchant {merchant} (with every other merchant) first"
        )
    store = Store.open(args.dir)
    try:
        added = store.add_boxes(merchant, boxes)
    finally:
        store.close()
    kept = [b for b in boxes if b not in added]
    if added:
        print(f"registered {', '.join(added)} for {merchant}")
    if kept:
        print(f"already registered for {merchant}: {', '.join(kept)}")
    print(
        "next: give each new box a broker password (mosquitto_passwd), write the ACL "
        f"(redeemd-backend box acl --dir {args.dir} --out ...) and reload the broker"
    )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        removed = store.remove_boxes(args.boxes)
    finally:
        store.close()
    unknown = [b for b in args.boxes if b not in removed]
    if removed:
        print(f"removed {', '.join(removed)}; their events stay in the backend's database")
        print(
            "next: write the ACL again (box acl), reload the broker, and delete their "
            "passwords (mosquitto_passwd -D)"
        )
    if unknown:
        print(f"not registered: {', '.join(unknown)}")
    return 0 if not unknown else 1


def cmd_list(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        fleet, unregistered = store.fleet(), store.seen_unregistered()
    finally:
        store.close()
    for box, merchant in fleet.items():
        print(f"{merchant}\t{box}")
    if not fleet:
        print(f"no boxes registered: redeemd-backend box add --dir {args.dir} --merchant M BOX")
    for merchant, box in unregistered:
        print(f"{merchant}\t{box}\tNOT REGISTERED (sent events before; its new ones are refused)")
    return 0


def cmd_acl(args: argparse.Namespace) -> int:
    store = Store.open(args.dir)
    try:
        fleet = store.fleet()
    finally:
        store.close()
    users = args.backend_users or broker_acl.DEFAULT_BACKEND_USERS
    text = broker_acl.render(fleet, args.prefix, users)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    # Atomically: Mosquitto may reload (SIGHUP) while the file is being written.
    part = args.out.with_name(f".{args.out.name}.part")
    part.write_text(text)
    part.chmod(0o644)
    os.replace(part, args.out)
    # The backend users are not remembered: name them, so a forgotten --backend-user
    # (a second collector locked out) shows here, not in the collector's log.
    print(
        f"wrote {args.out}: {len(fleet)} box(es), backend users {', '.join(users)}; "
        "reload the broker: systemctl reload mosquitto"
    )
    return 0
