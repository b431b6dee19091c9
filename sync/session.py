"""The MQTT v5 link to the broker: connect, stay connected, report why not.

paho-mqtt 2.x, callback API v2, client id = box id, TLS and username/password from
`[sync]`. The session owns one network thread (runtime.threads.OwnedThread, joined on
stop within a bound). Every connection attempt uses a fresh paho client, so nothing
paho keeps in memory (its queue of unacknowledged publishes) outlives a connection:
the SQLite outbox is the only store and the pump decides what to send again. After a
lost or refused connection the thread waits a random time between 0 and an
exponentially growing cap (runtime.backoff, full jitter) before trying again, so a
fleet of boxes behind one flaky uplink does not reconnect in lockstep.

The backend's publisher and collector use this same session (backend/connection.py
adapts it): they keep their broker session for `keep_session` seconds across a blip,
have no last will, and report in their own words from the Up and Down events.

Callbacks run on the network thread and must only hand work over (a queue put):

    >>> session = Session(config.sync, "box-1", will=(topic, b'{"state":"offline"}'),
    ...                   subscriptions=["redeemd/v1/demo/manifest"], events=inbox.put)
    >>> session.start()
    >>> session.publish("redeemd/v1/demo/box/box-1/events", b"{...}")   # (generation, mid)
    >>> session.stop()
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from runtime.backoff import Backoff
from runtime.threads import OwnedThread

log = logging.getLogger("redeemd.sync")

BACKOFF_FIRST = 0.5
BACKOFF_CAP = 60.0
# One connection attempt (TCP connect, then the TLS handshake) waits at most this long
# for each step: it is the part of the network thread a stop cannot interrupt, so it
# bounds how long `Session.stop` may take (STOP_BOUND).
CONNECT_TIMEOUT = 5.0
STOP_BOUND = 2 * CONNECT_TIMEOUT + 1.0
# The broker is told not to send us anything bigger (MQTT v5 Maximum Packet Size), so a
# hostile or broken publisher cannot make the box read a huge message into memory.
MAX_PACKET = 16 << 20
# What a technician can do about a CONNACK refusal (MQTT v5 reason codes).
_CREDENTIALS = "; check [sync] username and password_file against the broker's password list"
REFUSAL_HINTS = {
    0x85: "; [box] id is the MQTT client id: the broker does not accept it",
    0x86: _CREDENTIALS,
    0x87: _CREDENTIALS + " (and that the broker lets this user connect)",
    0x8A: "; the broker has banned this client",
    0x88: "; the broker is up but not serving; it is retried",
    0x89: "; the broker is busy; it is retried",
}


@dataclass(frozen=True)
class Up:
    """A connection is established and subscriptions are requested."""

    generation: int


class Loss(StrEnum):
    """Why there is no connection (Down.kind)."""

    LOST = "lost"
    """It was up and went away."""
    UNREACHABLE = "unreachable"
    """No TCP or TLS connection to the broker."""
    REFUSED = "refused"
    """The broker's CONNACK said no (credentials, client id, not authorised)."""
    CLOSED = "closed"
    """Closed before the broker answered the CONNECT."""


@dataclass(frozen=True)
class Down:
    """No connection, after a connection or a failed attempt: `reason` is the sentence
    for the log and status, `cause` the underlying error alone."""

    generation: int
    reason: str
    kind: Loss = Loss.LOST
    cause: str = ""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Published:
    """The broker answered a QoS 1 publish (PUBACK); `reason` may be a failure (>= 0x80)."""

    generation: int
    mid: int
    reason: int
    reason_text: str


Event = Up | Down | Message | Published


class LinkSettings(Protocol):
    """What the session needs from `[sync]` (daemon.config_model.Sync provides it).
    Read-only properties, so a frozen model or dataclass satisfies it."""

    @property
    def broker(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def tls(self) -> bool: ...

    @property
    def username(self) -> str | None: ...

    @property
    def password(self) -> str | None: ...

    @property
    def ca_file(self) -> Path | None: ...

    @property
    def cert_file(self) -> Path | None: ...

    @property
    def key_file(self) -> Path | None: ...

    @property
    def keepalive(self) -> int: ...

    @property
    def max_inflight(self) -> int: ...


def use_credentials(client: mqtt.Client, settings: LinkSettings) -> None:
    """Username/password and TLS (CA, client certificate) from `[sync]`, on a paho
    client: the same for the box's session and for `redeemd doctor`'s login check."""
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )


class Session:
    def __init__(
        self,
        settings: LinkSettings,
        client_id: str,
        *,
        will: tuple[str, bytes] | None,
        subscriptions: list[str],
        events: Callable[[Event], None],
        keep_session: int = 0,
        refusal_hints: dict[int, str] = REFUSAL_HINTS,
        logger: logging.Logger | None = log,
        thread_name: str = "sync-network",
    ):
        """`keep_session` > 0: the broker keeps this client's session (subscriptions,
        queued QoS 1 messages) that many seconds after a lost connection, and a clean
        `stop` ends it at once; 0 (a box): every connection starts clean. `logger` None:
        the owner reports failures itself, from the Up and Down events."""
        self.settings = settings
        self.client_id = client_id
        self.will = will
        self.subscriptions = list(subscriptions)
        self.keep_session = keep_session
        self._hints = refusal_hints
        self._log = logger
        self._events = events
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._generation = 0
        self.connected = False
        self.last_error: str | None = None
        self.connects = 0
        self._refusal: str | None = None
        self._backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        self.thread = OwnedThread(thread_name, self._run, wake=self._disconnect)
        self._stop = self.thread.stopping

    # ------------------------------------------------------------------ owner API

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = STOP_BOUND) -> bool:
        """Disconnect cleanly (the broker then does not publish the last will, and
        forgets a kept session) and wait at most `timeout` seconds for the network
        thread; True if it ended. A thread inside a connection attempt ends within
        2 * CONNECT_TIMEOUT (STOP_BOUND covers it), after resolving the broker's name
        (bounded by resolv.conf only)."""
        return self.thread.stop(timeout)

    def subscribe(self, topic: str) -> None:
        """Subscribe now if connected, and on every later connection."""
        with self._lock:
            self.subscriptions.append(topic)
            client = self._client if self.connected else None
        if client is not None:
            client.subscribe(topic, qos=1)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> tuple[int, int] | None:
        """Hand one QoS 1 message to the current connection.

        Returns (generation, mid) to match the PUBACK with, or None when there is no
        connection (the caller keeps the data and tries again after the next Up)."""
        with self._lock:
            client, generation = self._client, self._generation
            if client is None or not self.connected:
                return None
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return generation, info.mid

    def wait_published(
        self,
        topic: str,
        payload: bytes,
        timeout: float,
        *,
        retain: bool,
        cancel: threading.Event | None = None,
    ) -> bool:
        """Publish and wait (at most `timeout` s) for the broker's PUBACK: False if it
        did not come. Gives up at once when the connection is lost, the session is
        stopping or `cancel` (the owner's stop) is set, so an owner waiting here never
        holds up a shutdown."""
        with self._lock:
            client = self._client if self.connected else None
            generation = self._generation
        if client is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            info = client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            while not info.is_published():
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set() or (cancel is not None and cancel.is_set()):
                    return False
                with self._lock:
                    if not self.connected or self._generation != generation:
                        return False
                info.wait_for_publish(min(left, 0.2))
            return True
        except (RuntimeError, ValueError):
            return False

    # ------------------------------------------------------------------ network thread

    def _disconnect(self) -> None:
        """Wakes the network thread on stop: its loop ends when the socket closes."""
        with self._lock:
            client = self._client
        if client is None:
            return
        goodbye = None
        if self.keep_session:
            # Session expiry 0 on DISCONNECT: the broker forgets this session and its
            # place in shared subscriptions now, instead of queueing for it.
            goodbye = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            goodbye.SessionExpiryInterval = 0
        client.disconnect(properties=goodbye)

    def _new_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        client.connect_timeout = CONNECT_TIMEOUT
        # paho's own window must not hold back what the pump decided to send, nor the
        # status and requests that travel beside the events.
        client.max_inflight_messages_set(s.max_inflight + 16)
        use_credentials(client, s)
        if self.will is not None:
            topic, payload = self.will
            client.will_set(topic, payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = MAX_PACKET
        if self.keep_session:
            properties.SessionExpiryInterval = self.keep_session
        return properties

    def _run(self) -> None:
        while not self._stop.is_set():
            ok_before = self.connects
            self._refusal = None
            try:
                client = self._new_client()
                # A box starts clean every time: downstream is pull-style (manifest +
                # requests), so a session the broker keeps would only buffer what we
                # re-request. A kept session starts clean only on the first connection.
                client.connect(
                    self.settings.host,
                    self.settings.port,
                    keepalive=self.settings.keepalive,
                    clean_start=not (self.keep_session and self.connects),
                    properties=self._connect_properties(),
                )
            except ssl.SSLCertVerificationError as exc:
                self._fail(
                    f"cannot connect to {self.settings.broker}: {exc}; the broker's certificate "
                    "must be signed by [sync] ca_file (or a system CA when it is empty) and "
                    "name the host in [sync] broker",
                    Loss.UNREACHABLE,
                    str(exc),
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._fail(
                    f"cannot connect to {self.settings.broker}: {exc}", Loss.UNREACHABLE, str(exc)
                )
            else:
                with self._lock:
                    self._generation += 1
                    self._client = client
                if self._stop.is_set():
                    self._disconnect()  # stop() came while connecting: say goodbye now
                rc = mqtt.MQTT_ERR_SUCCESS
                while not self._stop.is_set() and rc == mqtt.MQTT_ERR_SUCCESS:
                    rc = client.loop(timeout=0.5)
                if self._stop.is_set():
                    # Let the loop write the DISCONNECT packet before the socket closes.
                    for _ in range(10):
                        if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                            break
                was_connected = self.connected
                with self._lock:
                    self._client = None
                    self.connected = False
                if self._stop.is_set():
                    break
                cause = mqtt.error_string(rc)
                if was_connected:
                    self._fail(
                        f"connection to {self.settings.broker} lost ({cause})", Loss.LOST, cause
                    )
                elif self._refusal:
                    self._fail(self._refusal, Loss.REFUSED, self._refusal)
                else:
                    self._fail(
                        f"connection to {self.settings.broker} closed before the broker "
                        f"answered ({cause})",
                        Loss.CLOSED,
                        cause,
                    )
            if self.connects != ok_before:
                self._backoff.reset()  # it worked for a while: start backing off afresh
            if self._stop.wait(self._backoff.next()):
                break

    def _fail(self, message: str, kind: Loss, cause: str) -> None:
        if message != self.last_error and self._log is not None:
            self._log.warning("sync: %s; retrying with backoff", message)
        self.last_error = message
        with self._lock:
            generation = self._generation
        self._events(Down(generation, message, kind, cause))

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            # Wrong credentials, client id refused, not authorised: the broker closes
            # the connection next; the run loop backs off and tries again.
            hint = self._hints.get(reason_code.value, "")
            self._refusal = (
                f"broker {self.settings.broker} refused the connection: {reason_code} "
                f"(0x{reason_code.value:02x}){hint}"
            )
            return
        with self._lock:
            topics = list(self.subscriptions)
            self.connected = True
            generation = self._generation
        for topic in topics:
            client.subscribe(topic, qos=1)
        self.connects += 1
        self.last_error = None
        if self._log is not None:
            self._log.info("sync: connected to %s as %s", self.settings.broker, self.client_id)
        self._events(Up(generation))

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            generation = self._generation
        self._events(Published(generation, mid, reason_code.value, str(reason_code)))

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "(topic not UTF-8)"
        self._events(Message(topic, bytes(message.payload)))
