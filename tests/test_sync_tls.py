"""Sync over TLS with a client certificate and a password, against a real Mosquitto.

The test makes its own certificate authority (cryptography), a broker certificate for
127.0.0.1 and client certificates, and a Mosquitto listener that requires all of them
plus a username and password (hashed by the real `mosquitto_passwd`). The box side is
the real `sync.worker.Sync` configured from a real config file, as on a box.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import broker  # noqa: F401  (fixture)
from conftest import CREATED, wait_for, write_box
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cards import batch
from storage import batch_import, outbox
from storage.database import connect, open_database
from sync.worker import Sync

WAIT = 60.0
PASSWORD = "correct horse battery staple"


class Authority:
    """A throwaway CA that signs a server certificate and client certificates."""

    def __init__(self, directory: Path, name: str = "redeemd test CA"):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name if hasattr(self, "name") else subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    def issue(self, common_name: str, *, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), key.public_key()
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.dir / f"{common_name}.crt", self.dir / f"{common_name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


@pytest.fixture
def tls_broker(tmp_path, broker):
    """The test's broker, restarted with a TLS listener that wants a client
    certificate from our CA and the password of user box-1 or backend."""
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(passwd).exists():
        pytest.fail("mosquitto_passwd is missing: run 'sudo apt-get install mosquitto'")
    authority = Authority(tmp_path / "pki")
    server_cert, server_key = authority.issue("broker", server=True)
    passwords = tmp_path / "pki" / "passwords"
    passwords.touch()
    for user in ("box-1", "backend"):
        subprocess.run([passwd, "-b", str(passwords), user, PASSWORD], check=True)
    broker.listener_options = [
        f"cafile {authority.ca_file}",
        f"certfile {server_cert}",
        f"keyfile {server_key}",
        "require_certificate true",
    ]
    broker.anonymous = False
    broker.options = [f"password_file {passwords}"]
    broker.restart()
    broker.authority = authority
    return broker


def tls_box(directory: Path, keyset, broker, *, password: str = PASSWORD, ca: Path | None = None):
    cert_file, key_file = broker.authority.issue("box-1")
    directory.mkdir(parents=True, exist_ok=True)
    password_file = directory / "mqtt.password"
    password_file.write_text(password + "\n")
    box = write_box(
        directory,
        keyset,
        extra=(
            f'[sync]\nenabled = true\nbroker = "mqtts://127.0.0.1:{broker.port}"\n'
            f'username = "box-1"\npassword_file = "{password_file}"\n'
            f'ca_file = "{ca or broker.authority.ca_file}"\n'
            f'cert_file = "{cert_file}"\nkey_file = "{key_file}"\nstatus_every = "1s"\n'
        ),
    )
    conn = open_database(box.database)
    try:
        data = keyset.cards_batch(1)
        batch_import.apply(conn, batch.open_file(data, keyset.roots), merchant="demo", now=CREATED)
        # Two records waiting in the outbox, as after two scans.
        for seq in (1, 2):
            conn.execute(
                "INSERT INTO ledger(seq, id, at_ms, box, merchant, store, action, verdict, "
                "source, cache_seq) VALUES (?, randomblob(16), 0, 'box-1', 'demo', 'store-1', "
                "'check', 'rejected', 'stdin', 1)",
                (seq,),
            )
        conn.commit()
    finally:
        conn.close()
    return box


def start_sync(box) -> Sync:
    config = box.config
    sync = Sync(
        config.sync, box=config.box.id, merchant=config.box.merchant,
        database=config.box.database, roots=config.trust.root_keys,
        max_batch_bytes=config.trust.max_batch_bytes,
    )  # fmt: skip
    sync.start()
    return sync


class TlsBackend:
    """A plain paho client with its own certificate and password, reading the box's tree."""

    def __init__(self, broker):
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        cert_file, key_file = broker.authority.issue("backend")
        ready = threading.Event()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="test-backend", protocol=mqtt.MQTTv5
        )
        client.tls_set(
            ca_certs=str(broker.authority.ca_file), certfile=str(cert_file),
            keyfile=str(key_file), cert_reqs=ssl.CERT_REQUIRED,
        )  # fmt: skip
        client.username_pw_set("backend", PASSWORD)
        client.on_connect = lambda c, *a: c.subscribe("redeemd/v1/demo/box/box-1/#", qos=1)
        client.on_subscribe = lambda *a: ready.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        assert ready.wait(WAIT), "the TLS test backend could not subscribe"
        self.client = client

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def on(self, suffix: str) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p in self.messages if t.endswith(suffix) and p]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_box_syncs_over_tls_with_a_client_certificate_and_a_password(tmp_path, keyset, tls_broker):
    backend = TlsBackend(tls_broker)
    box = tls_box(tmp_path / "box", keyset, tls_broker)
    sync = start_sync(box)
    try:
        wait_for(lambda: sync.state().connected, "the box connected over TLS")
        events = wait_for(lambda: backend.on("/events"), "the box's records over TLS")
        assert [r["seq"] for r in events[0]["records"]] == [1, 2]
        status = wait_for(lambda: backend.on("/status"), "the retained status over TLS")
        assert status[-1]["state"] == "online"
        backend.client.publish(
            "redeemd/v1/demo/box/box-1/ack", b'{"v":1,"upto":2,"ids":[]}', qos=1
        ).wait_for_publish(WAIT)
        reader = connect(box.database)
        try:
            wait_for(lambda: outbox.depth(reader) == 0, "the ack received over TLS")
        finally:
            reader.close()
    finally:
        assert sync.stop(10)
        backend.close()


def test_a_wrong_password_is_reported_and_the_records_stay(tmp_path, keyset, tls_broker):
    box = tls_box(tmp_path / "box", keyset, tls_broker, password="wrong")
    sync = start_sync(box)
    try:
        error = wait_for(lambda: sync.state().last_error, "the refusal in the status")
        assert "refused the connection" in error and "password_file" in error, error
        assert not sync.state().connected
        reader = connect(box.database)
        try:
            assert outbox.depth(reader) == 2
        finally:
            reader.close()
    finally:
        assert sync.stop(10)


def test_a_broker_certificate_from_an_unknown_authority_is_refused(tmp_path, keyset, tls_broker):
    stranger = Authority(tmp_path / "other-pki", name="someone else")
    box = tls_box(tmp_path / "box", keyset, tls_broker, ca=stranger.ca_file)
    sync = start_sync(box)
    try:
        error = wait_for(lambda: sync.state().last_error, "the TLS failure in the status")
        assert "certificate verify failed" in error and "ca_file" in error, error
        assert not sync.state().connected
    finally:
        assert sync.stop(10)
