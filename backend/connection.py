"""One MQTT v5 connection for a backend process, that outlives the broker going away.

It is the box's session (sync/session.py): one reconnecting paho client for the whole
project, with its network thread (joined on stop within a bound), its full-jitter
backoff and its fresh paho client per connection. What differs for a backend is set
here: no last will, a broker session kept SESSION_EXPIRY seconds across a blip (and
ended by a clean stop), a blocking publish that waits for the PUBACK, and the lines
an operator reads on stdout (docs/backend.md) said from the session's Up and Down
events. Subscriptions are renewed on every connect (the broker may have lost the
session).

    >>> link = Connection("mqtt://127.0.0.1:1883", "redeemd-publish", say=print)
    >>> link.on_connect(lambda: link.subscribe("redeemd/v1/+/box/+/request"))
    >>> link.start()
    >>> link.publish("redeemd/v1/acme/manifest", data, retain=True)
    True
    >>> link.stop()
    True
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sync.session import STOP_BOUND, Down, Event, Loss, Message, Session, Up

PUBLISH_TIMEOUT = 30.0
# The broker keeps a backend client's session (and queues its messages) this long after
# the connection drops, so a blip loses nothing. It must stay short: the broker keeps
# handing a shared subscription's share of messages to a session whose collector is
# gone, until the session expires. A clean stop ends the session at once (Session);
# after a crash the boxes resend what was not acked (their `request_retry`).
SESSION_EXPIRY = 30
KEEPALIVE = 30
# A failed attempt is said the first time and then every this many in a row.
SAY_EVERY = 10
_CREDENTIALS = "; check the user and password in the broker URL (mqtt://user:password@host)"
REFUSAL_HINTS = {
    0x85: "; the broker does not accept this client id",
    0x86: _CREDENTIALS + " against the broker's password list",
    0x87: _CREDENTIALS + " and that the broker's ACL lets this user connect",
    0x8A: "; the broker has banned this client",
    0x88: "; the broker is up but not serving; it is retried",
    0x89: "; the broker is busy; it is retried",
}


def default_client_id(role: str) -> str:
    """A client id unique per process: two collectors with one id would throw each
    other off the broker."""
    return f"redeemd-{role}-{socket.gethostname()}-{os.getpid()}"


class BrokerUrlError(ValueError):
    pass


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(text: str) -> BrokerUrl:
    """`mqtt://[user[:password]@]host[:port]` or `mqtts://...` (TLS, system CAs).

    >>> parse_broker_url("mqtt://127.0.0.1:1884").port
    1884
    """
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise BrokerUrlError(
            f"broker URL {text!r} must look like mqtt://host[:port] or mqtts://host[:port]"
        )
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise BrokerUrlError(f"broker URL {text!r} has a bad port") from None
    return BrokerUrl(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True)
class LinkSettings:
    """What sync.session.Session needs, from a broker URL (TLS with the system CAs)."""

    broker: str
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = KEEPALIVE
    max_inflight: int = 16

    @classmethod
    def from_url(cls, url: BrokerUrl) -> LinkSettings:
        return cls(str(url), url.host, url.port, url.tls, url.username, url.password)


class Connection:
    def __init__(self, url: str, client_id: str, say: Callable[[str], None]):
        self.url = parse_broker_url(url)
        self.say = say
        self.connected = threading.Event()
        self.cancel: threading.Event | None = None
        """The owner's stop event: a publish waiting for its PUBACK gives up once it is set."""
        self._hooks: list[Callable[[], None]] = []
        self._handler: Callable[[Message], None] | None = None
        self._was_connected = False
        self._failures = 0
        self.session = Session(
            LinkSettings.from_url(self.url),
            client_id,
            will=None,
            subscriptions=[],
            events=self._event,
            keep_session=SESSION_EXPIRY,
            refusal_hints=REFUSAL_HINTS,
            logger=None,
            thread_name=f"mqtt-{client_id}",
        )

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call `hook` after every successful connect. It runs on the network thread, so
        it must not wait for a publish (that thread is the one that would complete it):
        set a flag for the owner's loop instead."""
        self._hooks.append(hook)

    def subscribe(self, topic: str) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self.session.subscribe(topic)

    def on_message(self, handler: Callable[[Message], None]) -> None:
        """`handler(message)` on the network thread: hand it over (a queue put)."""
        self._handler = handler

    def start(self) -> None:
        self.session.start()

    def stop(self, timeout: float = STOP_BOUND) -> bool:
        """Disconnect cleanly (the broker forgets the session) and join the network
        thread, waiting at most `timeout` seconds; True if it ended."""
        stopped = self.session.stop(timeout)
        self.connected.clear()
        return stopped

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish at QoS 1 and wait for the broker's PUBACK; False if it did not come
        (not connected, connection lost, refused, stopping). The caller retries later."""
        return self.session.wait_published(
            topic, payload, PUBLISH_TIMEOUT, retain=retain, cancel=self.cancel
        )

    def send(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 without waiting (acks: a lost one is repeated on the next
        resend of the same records)."""
        self.session.publish(topic, payload)

    # ------------------------------------------------------------ network thread

    def _event(self, event: Event) -> None:
        if isinstance(event, Message):
            if self._handler is not None:
                self._handler(event)
        elif isinstance(event, Up):
            self._failures = 0
            self.say(f"{'reconnected' if self._was_connected else 'connected'} to {self.url}")
            self._was_connected = True
            self.connected.set()
            for hook in self._hooks:
                hook()
        elif isinstance(event, Down):
            self.connected.clear()
            self._down(event)

    def _down(self, event: Down) -> None:
        if event.kind is Loss.LOST:
            self.say(f"lost the broker {self.url} ({event.cause}); reconnecting")
            return
        self._failures += 1
        if event.kind is Loss.REFUSED:
            self.say(event.reason)  # what is wrong and what to do, every time
        elif self._failures == 1 or self._failures % SAY_EVERY == 0:
            if event.kind is Loss.UNREACHABLE:
                self.say(f"broker {self.url} unreachable ({event.cause}); retrying")
            else:
                self.say(f"{event.reason}; retrying")
