"""The Mosquitto ACL for a fleet: each box confined to its own subtree of its own merchant.

Mosquitto's `pattern` lines substitute only the username (%u) and client id (%c), each
as a whole topic level, so a pattern cannot tie a box to its merchant: the merchant
level would have to stay a wildcard, and a box could then write under any merchant
(issue 17). This module writes one `user` block per registered box instead, with every
topic spelled out, from the fleet in backend.db (`redeemd-backend box add`); the
backend's own users get the backend's rights. The text is the same for the same fleet,
so writing it again after each change is safe to diff and to reload.

    >>> print(render({"box-1": "acme"}, "redeemd/v1", ["redeemd-publish"]))  # doctest: +ELLIPSIS
    # Mosquitto ACL for a redeemd fleet...
    user box-1
    topic write redeemd/v1/acme/box/box-1/events
    ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from sync.topics import Topics

DEFAULT_BACKEND_USERS = ("redeemd-publish", "redeemd-collect")
# Box, merchant and user names as a box's config allows them (docs/protocol.md 16):
# never /, + or #, never a space, so each is one topic level and one ACL word.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

HEADER = """\
# Mosquitto ACL for a redeemd fleet, written by `redeemd-backend box acl` from the boxes
# registered in backend.db. Do not edit it: register or remove boxes with
# `redeemd-backend box add` / `box remove`, write the file again and reload the broker
# (docs/operations.md, "Set up the broker"; the topic tree: docs/protocol.md section 16).
#
# Anything not granted here is refused. A box logs in with its box id as username (the
# broker makes that its client id too: use_username_as_clientid, systemd/mosquitto.conf)
# and may publish its own events, requests and status, read its own acks, resent
# batches and grant set, and read its own merchant's manifest and batches: nothing of
# another box or another merchant. Only the backend's users publish acks, manifests,
# batches and grant sets.
"""


class AclError(ValueError):
    """A name cannot go into the ACL; the message says which and what is allowed."""


def check_name(kind: str, name: str) -> str:
    """`name` if it can be one topic level and one ACL word, else AclError."""
    if not NAME.fullmatch(name):
        raise AclError(
            f"{kind} {name!r} is not allowed: 1 to 64 of A-Z a-z 0-9 _ . - "
            "(the same as [box] id and merchant in a box's config)"
        )
    return name


def render(
    fleet: Mapping[str, str],
    prefix: str,
    backend_users: Iterable[str] = DEFAULT_BACKEND_USERS,
) -> str:
    """The ACL file for `fleet` ({box: merchant}) under topic prefix `prefix`."""
    prefix = prefix.rstrip("/")
    users = [check_name("backend user", u) for u in backend_users]
    if not users:
        raise AclError("at least one backend user is needed: the backend publishes the batches")
    clash = set(users) & set(fleet)
    if clash:
        raise AclError(
            f"{', '.join(sorted(clash))} is both a box and a backend user: give them other names"
        )
    lines = [HEADER]
    any_box = Topics(prefix, "+", "+")
    lines += [
        "# The backend (redeemd-backend publish / collect): one user per process, since",
        "# the broker throws off a second login of the same username.",
    ]
    for user in users:
        lines += [
            f"user {user}",
            f"topic write {any_box.manifest}",
            f"topic write {any_box.merchant_root}/batches/+",
            f"topic write {any_box.box_batches}",
            f"topic write {any_box.ack}",
            f"topic write {any_box.box_root}/grants",
            f"topic read {any_box.events}",
            f"topic read {any_box.request}",
            f"topic read {any_box.status}",
            "",
        ]
    by_merchant: dict[str, list[str]] = {}
    for box, merchant in fleet.items():
        by_merchant.setdefault(check_name("merchant", merchant), []).append(
            check_name("box id", box)
        )
    for merchant in sorted(by_merchant):
        lines.append(f"# merchant {merchant}")
        for box in sorted(by_merchant[merchant]):
            t = Topics(prefix, merchant, box)
            lines += [
                f"user {box}",
                f"topic write {t.events}",
                f"topic write {t.request}",
                f"topic write {t.status}",
                f"topic read {t.ack}",
                f"topic read {t.box_batches}",
                f"topic read {t.box_root}/grants",
                f"topic read {t.manifest}",
                f"topic read {t.batches}",
                "",
            ]
    return "\n".join(lines).rstrip("\n") + "\n"
