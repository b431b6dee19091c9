"""One MQTT v5 connection for a backend process, that outlives the broker going away.

paho-mqtt 2.x with callback API v2. The connection owns one network thread: it
connects, runs paho's loop, and after a lost connection waits a random time between 0
and an exponentially growing cap (full jitter) before reconnecting, so a fleet of
backend processes restarted together does not hammer a recovering broker in step.
Subscriptions are renewed on every connect (the broker may have lost the session).

    >>> link = Connection("mqtt://127.0.0.1:1883", "redeemd-publish", say=print)
    >>> link.on_connect(lambda: link.subscribe("redeemd/v1/+/box/+/request"))
    >>> link.start()
    >>> link.publish("redeemd/v1/acme/manifest", data, retain=True)
    True
    >>> link.stop()
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
PUBLISH_TIMEOUT = 30.0
# The broker keeps a backend client's session (and queues its messages) this long after
# the connection drops, so a blip loses nothing. It must stay short: the broker keeps
# handing a shared subscription's share of messages to a session whose collector is
# gone, until the session expires. A clean stop ends the session at once (below);
# after a crash the boxes resend what was not acked (their `request_retry`).
SESSION_EXPIRY = 30


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


class Connection:
    def __init__(self, url: str, client_id: str, say: Callable[[str], None]):
        self.url = parse_broker_url(url)
        self.say = say
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if self.url.username:
            self.client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            self.client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hooks: list[Callable[[], None]] = []
        self._subscriptions: list[str] = []
        self._was_connected = False

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call `hook` after every successful connect. It runs on the network thread, so
        it must not wait for a publish (that thread is the one that would complete it):
        set a flag for the owner's loop instead."""
        self._hooks.append(hook)

    def subscribe(self, topic: str) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subscriptions.append(topic)
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    def on_message(self, handler: Callable[[mqtt.MQTTMessage], None]) -> None:
        self.client.on_message = lambda client, userdata, message: handler(message)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt {self.url}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly and join the network thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish at QoS 1 and wait for the broker's PUBACK; False if it did not come
        (not connected, connection lost, refused). The caller retries later."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def send(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 without waiting (acks: a lost one is repeated on the next
        resend of the same records)."""
        self.client.publish(topic, payload, qos=1)

    # ------------------------------------------------------------ network thread

    def _run(self) -> None:
        attempt = 0
        first = True
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY
        while not self._stop.is_set():
            try:
                if first:
                    self.client.connect(
                        self.url.host, self.url.port, keepalive=30,
                        clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=properties,
                    )  # fmt: skip
                    first = False
                else:
                    self.client.reconnect()
            except (OSError, ssl.SSLError) as exc:
                attempt += 1
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt))
                if attempt == 1 or attempt % 10 == 0:
                    self.say(f"broker {self.url} unreachable ({exc}); retrying")
                self._stop.wait(delay)
                continue
            rc = mqtt.MQTT_ERR_SUCCESS
            while rc == mqtt.MQTT_ERR_SUCCESS and not self._stop.is_set():
                rc = self.client.loop(timeout=0.2)
                if self.connected.is_set():
                    attempt = 0
            if self._stop.is_set():
                break
            self.connected.clear()
            attempt += 1
            self._stop.wait(random.uniform(0, min(BACKOFF_CAP, BACKOFF_FIRST * 2**attempt)))
        if self.connected.is_set():
            # Session expiry 0 on DISCONNECT: the broker forgets this session and its
            # place in shared subscriptions now, instead of queueing for it.
            goodbye = Properties(PacketTypes.DISCONNECT)
            goodbye.SessionExpiryInterval = 0
            self.client.disconnect(properties=goodbye)
            # Let the loop write the DISCONNECT packet before the socket closes.
            for _ in range(10):
                if self.client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
        self.connected.clear()

    def _connected(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.say(f"broker {self.url} refused the connection: {reason_code}")
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self.say(f"{'reconnected' if self._was_connected else 'connected'} to {self.url}")
        self._was_connected = True
        self.connected.set()
        for hook in self._hooks:
            hook()

    def _disconnected(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set() and not self._stop.is_set():
            self.say(f"lost the broker {self.url} ({reason_code}); reconnecting")
        self.connected.clear()
