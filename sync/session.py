"""The MQTT v5 link to the broker: connect, stay connected, report why not.

paho-mqtt 2.x, callback API v2, client id = box id, TLS and username/password from
`[sync]`. The session owns one network thread. Every connection attempt uses a fresh
paho client, so nothing paho keeps in memory (its queue of unacknowledged publishes)
outlives a connection: the SQLite outbox is the only store and the pump decides what
to send again. After a lost or refused connection the thread waits a random time
between 0 and an exponentially growing cap (full jitter) before trying again, so a
fleet of boxes behind one flaky uplink does not reconnect in lockstep.

Callbacks run on the network thread and must only hand work over (a queue put):

    >>> session = Session(config.sync, "box-1", will=(topic, b'{"state":"offline"}'),
    ...                   subscriptions=["redeemd/v1/demo/manifest"], events=inbox.put)
    >>> session.start()
    >>> session.publish("redeemd/v1/demo/box/box-1/events", b"{...}")   # (generation, mid)
    >>> session.stop()
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("redeemd.sync")

BACKOFF_FIRST = 0.5
BACKOFF_CAP = 60.0
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


@dataclass(frozen=True)
class Down:
    generation: int
    reason: str


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
    """What the session needs from `[sync]` (daemon.config.SyncConfig provides it)."""

    broker: str
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    keepalive: int
    max_inflight: int


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
        will: tuple[str, bytes],
        subscriptions: list[str],
        events: Callable[[Event], None],
    ):
        self.settings = settings
        self.client_id = client_id
        self.will = will
        self.subscriptions = subscriptions
        self._events = events
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._generation = 0
        self.connected = False
        self.last_error: str | None = None
        self.connects = 0
        self._refusal: str | None = None
        self.thread = threading.Thread(target=self._run, name="sync-network", daemon=True)

    # ------------------------------------------------------------------ owner API

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Disconnect cleanly (the broker then does not publish the last will) and wait
        for the network thread; True if it ended."""
        self._stop.set()
        if self.thread.ident is None:
            return True  # never started
        with self._lock:
            client = self._client
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # already gone: the thread ends anyway
                log.debug("disconnect failed", exc_info=True)
        self.thread.join(timeout)
        return not self.thread.is_alive()

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

    def wait_published(self, topic: str, payload: bytes, timeout: float, *, retain: bool) -> bool:
        """Publish and wait (bounded) for the broker's PUBACK; used for the offline status."""
        with self._lock:
            client = self._client if self.connected else None
        if client is None:
            return False
        try:
            info = client.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError):
            return False

    # ------------------------------------------------------------------ network thread

    def _new_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        # paho's own window must not hold back what the pump decided to send, nor the
        # status and requests that travel beside the events.
        client.max_inflight_messages_set(s.max_inflight + 16)
        use_credentials(client, s)
        topic, payload = self.will
        client.will_set(topic, payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            ok_before = self.connects
            self._refusal = None
            try:
                client = self._new_client()
                properties = Properties(PacketTypes.CONNECT)
                properties.MaximumPacketSize = MAX_PACKET
                # Clean start: downstream is pull-style (manifest + requests), so a
                # session the broker keeps for us would only buffer what we re-request.
                client.connect(
                    self.settings.host,
                    self.settings.port,
                    keepalive=self.settings.keepalive,
                    clean_start=True,
                    properties=properties,
                )
            except ssl.SSLCertVerificationError as exc:
                self._fail(
                    f"cannot connect to {self.settings.broker}: {exc}; the broker's certificate "
                    "must be signed by [sync] ca_file (or a system CA when it is empty) and "
                    "name the host in [sync] broker"
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._fail(f"cannot connect to {self.settings.broker}: {exc}")
            else:
                with self._lock:
                    self._generation += 1
                    self._client = client
                    generation = self._generation
                rc = mqtt.MQTT_ERR_SUCCESS
                while not self._stop.is_set() and rc == mqtt.MQTT_ERR_SUCCESS:
                    rc = client.loop(timeout=0.5)
                was_connected = self.connected
                with self._lock:
                    self._client = None
                    self.connected = False
                if self._stop.is_set():
                    break
                if was_connected:
                    self._fail(
                        f"connection to {self.settings.broker} lost ({mqtt.error_string(rc)})"
                    )
                elif self._refusal:
                    self._fail(self._refusal)
                else:
                    self._fail(
                        f"connection to {self.settings.broker} closed before the broker "
                        f"answered ({mqtt.error_string(rc)})"
                    )
                self._events(Down(generation, self.last_error or "disconnected"))
            if self.connects != ok_before:
                delay = BACKOFF_FIRST  # it worked for a while: start backing off afresh
            if self._stop.wait(random.uniform(0, delay)):
                break
            delay = min(delay * 2, BACKOFF_CAP)

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.warning("sync: %s; retrying with backoff", message)
        self.last_error = message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # Wrong credentials, client id refused, not authorised: the broker closes
            # the connection next; the run loop backs off and tries again.
            hint = REFUSAL_HINTS.get(reason_code.value, "")
            self._refusal = (
                f"broker {self.settings.broker} refused the connection: {reason_code} "
                f"(0x{reason_code.value:02x}){hint}"
            )
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        with self._lock:
            self.connected = True
            generation = self._generation
        self.connects += 1
        self.last_error = None
        log.info("sync: connected to %s as %s", self.settings.broker, self.client_id)
        self._events(Up(generation))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            generation = self._generation
        self._events(Published(generation, mid, reason_code.value, str(reason_code)))

    def _on_message(self, client, userdata, message) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "(topic not UTF-8)"
        self._events(Message(topic, bytes(message.payload)))
