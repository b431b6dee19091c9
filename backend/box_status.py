"""Boxes' retained status messages into the store: liveness and lag as data.

Every box keeps a retained status on `{p}/{merchant}/box/{box}/status` (docs/protocol.md
16.5): online or offline, its cache_seq, its outbox's depth and oldest age, its
scanners, stuck and alarm. The broker publishes the box's last will there when it
vanishes without a clean stop (`{"v":1,"box":BOX,"state":"offline"}`). The collector
subscribes to them all and hands each message here; `record` checks it and keeps it
as the box's latest (`Store.record_status`), which `redeemd-backend boxes` reads.

The subscription is a plain one, not the collector group's shared subscription: a
broker sends retained messages to a new plain subscription only (MQTT 5, 4.8.2), and
a status is small and idempotent to store, so every collector keeping it is harmless.

    >>> recorder = StatusRecorder("redeemd/v1", say=print)
    >>> recorder.record(store, Message("redeemd/v1/acme/box/box-1/status", payload))
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from backend.store import BoxStatus, Store
from cards import keys
from sync.session import Message

# A box repeats its status every `status_every`: a refusal (unregistered box, bad
# payload) is said the first time and then at most this often per box, with the count.
REFUSAL_LOG_EVERY = 60.0
STATES = ("online", "offline")
_INTS = ("at", "cache_seq", "outbox_depth")
_OPTIONAL_INTS = ("cache_age_s", "outbox_oldest_age_s")
_OPTIONAL_TEXTS = ("publish_error", "stuck", "alarm")


class StatusError(ValueError):
    """A status message that is not what protocol.md 16.5 says; the message says how."""


def parse_status(payload: bytes, box: str) -> BoxStatus:
    """A status message of `box` (the topic's), or StatusError.

    Members the store keeps are checked for their types; members this backend does not
    know are ignored, as 16.5 asks of a receiver (a later v1 box may add some).

    >>> parse_status(b'{"v":1,"box":"b1","state":"offline"}', "b1").will
    True
    """
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise StatusError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise StatusError("not a JSON object")
    if doc.get("v") != 1:
        raise StatusError(f"version v={doc.get('v')!r}, this backend reads v=1")
    if doc.get("box") != box:
        raise StatusError(f"box {doc.get('box')!r} does not match the topic's box {box!r}")
    state = doc.get("state")
    if state not in STATES:
        raise StatusError(f"state {state!r} is not online or offline")
    raw = payload.decode()
    if set(doc) == {"v", "box", "state"}:
        if state != "offline":
            raise StatusError(
                "a status without members other than v, box, state must be the "
                "last will, whose state is offline"
            )
        return BoxStatus(state=state, raw=raw, will=True)
    for name in _INTS:
        if not _is_int(doc.get(name)) or doc[name] < 0:
            raise StatusError(f"{name} must be an integer >= 0, not {doc.get(name)!r}")
    for name in _OPTIONAL_INTS:
        if doc.get(name) is not None and not _is_int(doc[name]):
            raise StatusError(f"{name} must be an integer or null, not {doc[name]!r}")
    for name in (*_OPTIONAL_TEXTS, "version"):
        if doc.get(name) is not None and not isinstance(doc[name], str):
            raise StatusError(f"{name} must be a string or null, not {doc[name]!r}")
    drivers = doc.get("drivers", [])
    if not isinstance(drivers, list) or not all(
        isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("state"), str)
        for d in drivers
    ):
        raise StatusError("drivers must be an array of objects, each with a name and a state")
    if doc.get("box_key") is not None:
        _box_key(doc["box_key"])
    return BoxStatus(
        state=state,
        raw=raw,
        box_at=doc["at"],
        version=doc.get("version"),
        cache_seq=doc["cache_seq"],
        cache_age_s=doc.get("cache_age_s"),
        outbox_depth=doc["outbox_depth"],
        outbox_oldest_age_s=doc.get("outbox_oldest_age_s"),
        publish_error=doc.get("publish_error"),
        drivers=tuple(drivers),
        stuck=doc.get("stuck"),
        alarm=doc.get("alarm"),
    )


def box_key_of(raw: str) -> bytes | None:
    """The box's public key from a stored status (its optional `box_key` member,
    {"key_id": ..., "public_key": base64}, which a box that dispenses reports), or None
    when it has none or the text is not a status that carries a good one (a last will
    carries none). `redeemd-backend grant add` grants this key when given no other."""
    try:
        doc = json.loads(raw)
        return _box_key(doc["box_key"]) if isinstance(doc, dict) and doc.get("box_key") else None
    except (ValueError, RecursionError, StatusError):
        return None


def _box_key(value: Any) -> bytes:
    if not isinstance(value, dict) or not isinstance(value.get("public_key"), str):
        raise StatusError('box_key must be {"key_id": ..., "public_key": base64} or absent')
    try:
        public = keys.unb64(value["public_key"], "box_key public_key", 32)
    except keys.TrustError as exc:
        raise StatusError(str(exc)) from None
    if value.get("key_id") != keys.key_id(public):
        raise StatusError(
            f"box_key key_id {value.get('key_id')!r} is not the key id of its public_key "
            f"({keys.key_id(public)})"
        )
    return public


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StatusRecorder:
    """Checks and stores the status messages the collector receives, on its thread."""

    def __init__(
        self, prefix: str, say: Callable[[str], None], clock: Callable[[], float] = time.time
    ):
        self.prefix = prefix.rstrip("/")
        self.say = say
        self.clock = clock
        self._said: dict[str, float] = {}
        self.refused: dict[str, int] = {}

    @property
    def topic(self) -> str:
        return f"{self.prefix}/+/box/+/status"

    def is_status(self, topic: str) -> bool:
        return topic.startswith(f"{self.prefix}/") and topic.endswith("/status")

    def record(self, store: Store, message: Message) -> bool:
        """Store the message's status if its box is registered for the topic's merchant
        and the payload is good; True if the store changed. Never raises for a bad
        message or a database error: the collector goes on."""
        parts = message.topic[len(self.prefix) + 1 :].split("/")
        if len(parts) != 4 or parts[1] != "box" or parts[3] != "status":
            return False
        merchant, box = parts[0], parts[2]
        where = f"{merchant}/{box}"
        try:
            registered = store.merchant_of(box)
            if registered != merchant:
                # As for events: the backend keeps only what it was set up for.
                why = (
                    f"box {box} is not registered (redeemd-backend box add)"
                    if registered is None
                    else f"box {box} is registered for merchant {registered}, not {merchant}"
                )
                self._refuse(where, f"ignored the status of {where}: {why}")
                return False
            try:
                status = parse_status(message.payload, box)
            except StatusError as exc:
                self._refuse(
                    where,
                    f"refused the status of {where}: {exc}; the last good one is kept "
                    "(docs/protocol.md 16.5 says what a status holds)",
                )
                return False
            changed = store.record_status(merchant, box, status, int(self.clock()))
        except store.errors as exc:
            self.say(f"could not store the status of {where}: {exc}; the next one is stored")
            return False
        if changed and (status.will or status.state == "offline"):
            how = "its last will (gone without a clean stop)" if status.will else "stopped"
            self.say(f"box {where} offline: {how}")
        return changed

    def _refuse(self, where: str, line: str) -> None:
        self.refused[where] = self.refused.get(where, 0) + 1
        now = time.monotonic()
        said = self._said.get(where)
        if said is not None and now - said < REFUSAL_LOG_EVERY:
            return
        self._said[where] = now
        self.say(f"{line} ({self.refused[where]} status message(s) from {where} so far)")
