"""The documented deployment, attacked (issue 17; docs/threat-model.md).

Stood up as docs/operations.md says: a real Mosquitto with the shipped settings
(systemd/mosquitto.conf), the shipped ACL (systemd/mosquitto-acl.conf: merchant acme
with box-0042 and box-0043, merchant bistro with box-0101) and a password file made by
the real `mosquitto_passwd`; a box installed by systemd/install.sh into a temporary
root, its user and files applied by the real systemd-sysusers and systemd-tmpfiles;
and a throwaway system user (useradd, removed afterwards) that plays the service user
`redeemd`. Each test tries one attack with real credentials and asserts that it is
refused, beside a control that the same party can do its own job, so that a refusal
never passes because nothing worked at all.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import getpass
import json
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from backend_helpers import make_backend, record, register, wait_until
from broker import Broker, broker, shipped_settings  # noqa: F401  (fixture)
from conftest import ROOT
from fleet import Fleet, backend_cli
from test_install import install
from test_sync_tls import Authority
from test_systemd import tool

from backend.collect import Collector
from backend.store import Store
from daemon import config as config_mod
from sync.topics import Topics

SYSTEMD = ROOT / "systemd"
PREFIX = "redeemd/v1"
FLEET = {"box-0042": "acme", "box-0043": "acme", "box-0101": "bistro"}
BACKEND_USERS = ("redeemd-publish", "redeemd-collect")
PASSWORDS = {user: f"pw-{user}-{secrets.token_hex(4)}" for user in (*FLEET, *BACKEND_USERS)}


def topics(box: str) -> Topics:
    return Topics(PREFIX, FLEET[box], box)


# ---------------------------------------------------------------- the broker


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory):
    """Mosquitto with the shipped settings, ACL and a password file for the example fleet."""
    directory = tmp_path_factory.mktemp("security-broker")
    passwd = directory / "redeemd.passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(
            [tool("mosquitto_passwd", "mosquitto"), "-b", str(passwd), user, password], check=True
        )
    acl = directory / "redeemd-acl.conf"
    shutil.copy(SYSTEMD / "mosquitto-acl.conf", acl)
    settings, listener = shipped_settings(
        (SYSTEMD / "mosquitto.conf").read_text(),
        {"/etc/mosquitto/redeemd.passwd": str(passwd), "/etc/mosquitto/redeemd-acl.conf": str(acl)},
    )
    assert "use_username_as_clientid true" in listener
    instance = Broker(directory / "broker")
    instance.anonymous = False
    instance.options = settings
    instance.listener_options = listener
    instance.start()
    yield instance
    instance.stop()


class Login:
    """A plain MQTT v5 client logged in as `user`; keeps what the broker answers."""

    def __init__(self, port: int, user: str | None, password: str | None = None, **kw):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.answers: queue.Queue[tuple[str, object]] = queue.Queue()
        self.disconnects: list[object] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=kw.get("client_id", user or ""),
            protocol=mqtt.MQTTv5,
        )
        if user is not None:
            self.client.username_pw_set(user, password or PASSWORDS[user])
        if kw.get("tls_ca"):
            self.client.tls_set(ca_certs=str(kw["tls_ca"]))
        self.client.on_connect = lambda c, u, f, reason, p: self.answers.put(("connect", reason))
        self.client.on_disconnect = lambda c, u, f, reason, p: self.disconnects.append(reason)
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.answers.put(
            ("suback", reasons)
        )
        self.client.on_publish = lambda c, u, mid, reason, p: self.answers.put(("puback", reason))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        kind, self.connack = self.answers.get(timeout=30)
        assert kind == "connect"

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        kind, _ = self.answers.get(timeout=30)
        assert kind == "suback"

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> bool:
        """True if the broker took the message (MQTT v5 PUBACK without an error code)."""
        self.client.publish(topic, payload, qos=1, retain=retain)
        kind, reason = self.answers.get(timeout=30)
        assert kind == "puback"
        return not reason.is_failure

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=30)

    def received(self, topic: str, payload: bytes) -> bool:
        """Wait for (topic, payload); a b"marker" message arriving first means it never will."""
        while True:
            try:
                got = self.messages.get(timeout=30)
            except queue.Empty:
                return False
            if got == (topic, payload):
                return True
            if got[1] == b"marker":
                return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def login(fleet_broker):
    made: list[Login] = []

    def connect(user: str | None, password: str | None = None, **kw) -> Login:
        made.append(Login(fleet_broker.port, user, password, **kw))
        return made[-1]

    yield connect
    for client in made:
        client.close()


def test_shipped_acl_is_what_box_acl_writes_for_the_registered_fleet(tmp_path):
    backend = tmp_path / "backend"
    make_backend(backend, merchants=("acme", "bistro"))
    cli = [sys.executable, "-m", "backend.cli", "box"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for merchant in ("acme", "bistro"):
        boxes = [box for box, m in FLEET.items() if m == merchant]
        subprocess.run([*cli, "add", "--dir", str(backend), "--merchant", merchant, *boxes],
                       check=True, cwd=ROOT, env=env, capture_output=True)  # fmt: skip
    out = tmp_path / "redeemd-acl.conf"
    subprocess.run([*cli, "acl", "--dir", str(backend), "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True)  # fmt: skip
    shipped = (SYSTEMD / "mosquitto-acl.conf").read_text()
    assert shipped.endswith(out.read_text()), "regenerate systemd/mosquitto-acl.conf"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # Mosquitto reads it after dropping root


def test_anonymous_and_wrong_password_logins_are_refused(login):
    assert not login(None, client_id="nobody").accepted
    assert not login("box-0042", "not-its-password").accepted
    assert not login("box-9999", "pw").accepted  # no such user
    assert login("box-0042").accepted


def test_a_box_uses_its_own_topics_and_reads_its_merchants_batches(login):
    backend, box = login("redeemd-collect"), login("box-0042")
    mine = topics("box-0042")
    backend.subscribe(f"$share/main/{PREFIX}/+/box/+/events")
    backend.subscribe(f"{PREFIX}/+/box/+/request")
    backend.subscribe(f"{PREFIX}/+/box/+/status")
    for topic in mine.subscriptions():
        box.subscribe(topic)
    for topic in (mine.events, mine.request, mine.status):
        assert box.publish(topic, b"up"), topic
        assert backend.received(topic, b"up"), topic
    for topic in (
        mine.manifest,
        f"{PREFIX}/acme/batches/7",
        mine.ack,
        f"{mine.box_root}/batches/7",
    ):
        assert backend.publish(topic, b"down"), topic
        assert box.received(topic, b"down"), topic


def test_a_box_cannot_write_into_another_merchants_ledger(login):
    backend, box = login("redeemd-collect"), login("box-0042")
    backend.subscribe(f"{PREFIX}/+/box/+/events")
    backend.subscribe(f"{PREFIX}/+/box/+/status")
    forged = Topics(PREFIX, "bistro", "box-0042")  # its own box id, another merchant
    theirs = topics("box-0101")
    for topic in (forged.events, forged.status, forged.request, theirs.events, theirs.status):
        assert not box.publish(topic, b"forged"), topic
    assert box.publish(topics("box-0042").events, b"marker")
    assert backend.next_message() == (topics("box-0042").events, b"marker"), "a forgery got through"


def test_a_box_cannot_read_another_merchants_manifest_or_batches(login):
    backend = login("redeemd-publish")
    bistro = topics("box-0101")
    # Manifests are retained: a box subscribing later would get them from the broker.
    assert backend.publish(bistro.manifest, b"bistro manifest", retain=True)
    box = login("box-0042")
    for topic in (bistro.manifest, bistro.batches, f"{PREFIX}/+/manifest", f"{PREFIX}/#"):
        box.subscribe(topic)
    assert backend.publish(f"{PREFIX}/bistro/batches/3", b"bistro batch")
    assert backend.publish(f"{bistro.box_root}/batches/3", b"bistro box batch")
    assert backend.publish(topics("box-0042").manifest, b"marker")
    assert box.next_message() == (topics("box-0042").manifest, b"marker"), "read bistro's"
    assert backend.publish(bistro.manifest, b"", retain=True)  # clear the retained message


def test_a_box_cannot_publish_acks_manifests_or_batches(login):
    backend, box = login("redeemd-collect"), login("box-0042")
    mine = topics("box-0042")
    backend.subscribe(f"{PREFIX}/#")
    for topic in (mine.ack, mine.manifest, f"{PREFIX}/acme/batches/9", f"{mine.box_root}/batches/9",
                  topics("box-0043").ack):  # fmt: skip
        assert not box.publish(topic, b"forged"), topic
    assert box.publish(mine.events, b"marker")
    assert backend.next_message() == (mine.events, b"marker")


def test_a_box_cannot_speak_for_or_listen_to_another_box_of_its_merchant(login):
    backend, box, other = login("redeemd-collect"), login("box-0042"), login("box-0043")
    mine, theirs = topics("box-0042"), topics("box-0043")
    backend.subscribe(f"{PREFIX}/+/box/+/events")
    for topic in (theirs.events, theirs.status, theirs.request):
        assert not box.publish(topic, b"forged"), topic
    for topic in (theirs.ack, theirs.box_batches, f"{PREFIX}/acme/box/+/events"):
        box.subscribe(topic)
    other.subscribe(theirs.ack)
    assert backend.publish(theirs.ack, b"for box-0043")
    assert other.publish(theirs.events, b"from box-0043")
    assert other.received(theirs.ack, b"for box-0043")
    assert backend.received(theirs.events, b"from box-0043")
    box.subscribe(mine.ack)
    assert backend.publish(mine.ack, b"marker")
    assert box.next_message() == (mine.ack, b"marker"), "box-0042 got box-0043's messages"


@pytest.mark.parametrize("victim", ["box-0043", "redeemd-collect"])
def test_a_login_with_another_clients_id_does_not_throw_that_client_off(login, victim):
    """Session takeover: box-0042's credentials with the victim's client id."""
    target = login(victim)
    watched = topics("box-0043").ack if victim == "box-0043" else topics("box-0042").events
    target.subscribe(watched)
    impostor = login("box-0042", client_id=victim)
    assert impostor.accepted  # let in, under its own username as its client id
    sender = login("redeemd-publish") if victim == "box-0043" else impostor
    assert sender.publish(watched, b"still here")
    assert target.received(watched, b"still here")
    assert target.client.is_connected() and target.disconnects == [], target.disconnects
    # And the impostor is still box-0042 in every other way.
    assert not impostor.publish(topics("box-0043").events, b"forged")


def test_a_forged_record_for_another_merchant_is_neither_delivered_nor_stored(
    fleet_broker, login, tmp_path
):
    backend = tmp_path / "backend"
    make_backend(backend, merchants=("acme", "bistro"))
    register(backend, "acme", "box-0042", "box-0043")
    register(backend, "bistro", "box-0101")
    lines: list[str] = []
    url = f"mqtt://redeemd-collect:{PASSWORDS['redeemd-collect']}@127.0.0.1:{fleet_broker.port}"
    collector = Collector(backend, url, say=lines.append)
    collector.start()
    try:
        wait_until(collector.link.connected.is_set, "collector logged in as redeemd-collect")
        box = login("box-0042")
        box.subscribe(topics("box-0042").ack)
        forged = {**record(1, "box-0042"), "merchant": "bistro", "verdict": "accepted"}
        body = json.dumps({"v": 1, "box": "box-0042", "records": [forged]}).encode()
        assert not box.publish(Topics(PREFIX, "bistro", "box-0042").events, body)
        own = {**record(1, "box-0042"), "merchant": "acme"}
        body = json.dumps({"v": 1, "box": "box-0042", "records": [own]}).encode()
        assert box.publish(topics("box-0042").events, body)
        assert box.received(topics("box-0042").ack, b'{"v": 1, "upto": 1, "ids": []}')
        store = Store.open(backend)
        try:
            rows = store.conn.execute("SELECT merchant, box, id FROM events").fetchall()
        finally:
            store.close()
        assert rows == [("acme", "box-0042", own["id"])]
        assert not collector.refused, "the broker stopped it; the collector never saw it"
    finally:
        collector.stop()


def secured(broker: Broker, acl: Path, users: tuple[str, ...]) -> dict[str, str]:
    """Give `broker` the shipped settings, `acl` and a password for each of `users`."""
    passwords = {user: f"pw-{user}" for user in users}
    passwd = broker.dir / "redeemd.passwd"
    passwd.touch()
    for user, password in passwords.items():
        subprocess.run(
            [tool("mosquitto_passwd", "mosquitto"), "-b", str(passwd), user, password], check=True
        )
    broker.anonymous = False
    broker.options, broker.listener_options = shipped_settings(
        (SYSTEMD / "mosquitto.conf").read_text(),
        {"/etc/mosquitto/redeemd.passwd": str(passwd), "/etc/mosquitto/redeemd-acl.conf": str(acl)},
    )
    broker.restart()
    return passwords


def test_the_documented_deployment_syncs_a_real_box_under_its_own_logins(tmp_path, broker):
    """The positive control for everything above: a real daemon, collector and publisher,
    each logging in as docs/operations.md says, through the ACL `box acl` writes."""
    fleet = Fleet(tmp_path, broker)
    try:
        password_file = tmp_path / "mqtt.password"
        password_file.write_text("pw-box-sec\n")
        box = fleet.box(  # registers it (box add)
            "box-sec", extra=f'username = "box-sec"\npassword_file = "{password_file}"'
        )
        acl = tmp_path / "redeemd-acl.conf"
        backend_cli("box", "acl", "--dir", str(fleet.backend), "--out", str(acl))
        passwords = secured(broker, acl, ("box-sec", *BACKEND_USERS))

        def login(user: str) -> str:
            return f"mqtt://{user}:{passwords[user]}@127.0.0.1:{broker.port}"

        fleet._start("collect", "--dir", str(fleet.backend), "--broker", login("redeemd-collect"))
        fleet._start("publish", "--dir", str(fleet.backend), "--broker", login("redeemd-publish"),
                     "--poll", "0.2s")  # fmt: skip
        daemon = fleet.run(box)
        daemon.scan("FLEET-0001", "FLEET-0002")
        assert [v["verdict"] for v in daemon.wait_verdicts(2)] == ["accepted", "accepted"]
        wait_until(lambda: fleet.all_collected(box), "the box's records stored and acked")
        fleet.issue("revoke", _csv(tmp_path))
        wait_until(lambda: box.cache_seq() == 3, "the new batch reached the box")
        # doctor checks the login without taking the running daemon's session (the
        # broker makes every login of box-sec client id box-sec).
        status = box.state_dir / "status.json"  # rewritten every 2 s by the daemon
        wait_until(lambda: json.loads(status.read_text())["sync"]["connected"], "status.json")
        doctor = box.cli("doctor", "--user", "root")
        assert "sync: the running daemon is logged in" in doctor.stdout, doctor.stdout
        daemon.scan("FLEET-0003")  # a round trip after doctor: any takeover is logged by now
        daemon.wait_verdicts(3)
        wait_until(lambda: fleet.all_collected(box), "the third record stored and acked")
        log = box.stderr()
        assert "lost" not in log and "not authorized" not in log.lower(), log[-2000:]
    finally:
        fleet.close()


def _csv(directory: Path) -> Path:
    path = directory / "revoke.csv"
    path.write_text("code\nFLEET-0100\n")
    return path


def test_a_box_registered_later_gets_in_once_the_acl_is_written_again_and_reloaded(
    tmp_path, broker
):
    backend = tmp_path / "backend"
    make_backend(backend, merchants=("acme",))
    backend_cli("box", "add", "--dir", str(backend), "--merchant", "acme", "box-0042")
    acl = tmp_path / "redeemd-acl.conf"
    backend_cli("box", "acl", "--dir", str(backend), "--out", str(acl))
    passwords = secured(broker, acl, ("box-0042", "box-0044", *BACKEND_USERS))
    new = Topics(PREFIX, "acme", "box-0044")

    def publishes() -> bool:
        client = Login(broker.port, "box-0044", passwords["box-0044"])
        try:
            return client.publish(new.events, b"hello")
        finally:
            client.close()

    assert not publishes(), "a box with a password but not in the ACL may not publish"
    backend_cli("box", "add", "--dir", str(backend), "--merchant", "acme", "box-0044")
    backend_cli("box", "acl", "--dir", str(backend), "--out", str(acl))
    broker.process.send_signal(signal.SIGHUP)  # systemctl reload mosquitto
    wait_until(publishes, "box-0044 allowed after the reload")


class ShippedBroker(Broker):
    """Mosquitto reading systemd/mosquitto.conf as an operator copies it: only the file
    paths and the port are the test's, plus where a test broker logs and runs as."""

    def __init__(self, directory: Path, paths: dict[str, str]):
        super().__init__(directory)
        self.paths = paths

    def _config(self) -> Path:
        text = (SYSTEMD / "mosquitto.conf").read_text()
        for shipped, ours in self.paths.items():
            text = text.replace(shipped, ours)
        text = text.replace("\nlistener 8883\n", f"\nlistener {self.port} 127.0.0.1\n")
        assert f"listener {self.port} 127.0.0.1" in text
        path = self.dir / "mosquitto.conf"
        path.write_text(f"{text}\npersistence false\nlog_dest stderr\nuser {getpass.getuser()}\n")
        return path


def test_the_shipped_broker_settings_run_verbatim_with_tls(tmp_path):
    authority = Authority(tmp_path / "pki")
    cert, key = authority.issue("broker", server=True)
    passwd = tmp_path / "redeemd.passwd"
    passwd.touch()
    subprocess.run([tool("mosquitto_passwd", "mosquitto"), "-b", str(passwd), "box-0042",
                    PASSWORDS["box-0042"]], check=True)  # fmt: skip
    shipped = ShippedBroker(tmp_path / "broker", {
        "/etc/mosquitto/redeemd.passwd": str(passwd),
        "/etc/mosquitto/redeemd-acl.conf": str(SYSTEMD / "mosquitto-acl.conf"),
        "/etc/mosquitto/certs/broker.crt": str(cert),
        "/etc/mosquitto/certs/broker.key": str(key),
    })  # fmt: skip
    shipped.start()
    try:
        box = Login(shipped.port, "box-0042", tls_ca=authority.ca_file)
        try:
            assert box.accepted
            assert box.publish(topics("box-0042").events, b"up")
            assert not box.publish(Topics(PREFIX, "bistro", "box-0042").events, b"forged")
        finally:
            box.close()
    finally:
        shipped.stop()


# ---------------------------------------------------------------- the box's files


@pytest.fixture(scope="module")
def service_user():
    """A real system user standing in for `redeemd`, removed after the module."""
    name = f"rdmtest{secrets.token_hex(3)}"
    subprocess.run(
        [tool("useradd", "passwd"), "--system", "--user-group", "--no-create-home",
         "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        result = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True)
        uid = int(result.stdout)
        gid = int(subprocess.run(["id", "-g", name], check=True, capture_output=True,
                                 text=True).stdout)  # fmt: skip
        yield name, uid, gid
    finally:
        subprocess.run([tool("userdel", "passwd"), name], capture_output=True)


@pytest.fixture(scope="module")
def installed_box(service_user):
    """install.sh into a temporary root; `redeemd` there is the throwaway user; the keys
    copied in as an operator would (root's, 0600); then the real sysusers and tmpfiles."""
    if os.geteuid() != 0:
        pytest.fail("tests/test_security.py needs root (a service user, file owners): run as root")
    _, uid, gid = service_user
    # Traversable by the service user all the way down (pytest's own temp is 0700).
    base = Path(tempfile.mkdtemp(prefix="redeemd-security-"))
    base.chmod(0o755)
    root = base / "root"
    try:
        result = install(root, shims=base / "shims")
        assert result.returncode == 0, result.stderr
        # The name redeemd in this root is the throwaway user: sysusers finds it there
        # and only adds the groups, tmpfiles gives the files to it.
        (root / "etc/passwd").write_text(
            f"redeemd:x:{uid}:{gid}:redeemd:/var/lib/redeemd:/usr/sbin/nologin\n"
        )
        (root / "etc/group").write_text(f"redeemd:x:{gid}:\n")
        sysusers = subprocess.run(
            [tool("systemd-sysusers", "systemd"), f"--root={root}",
             str(root / "etc/sysusers.d/redeemd.conf")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sysusers.returncode == 0, sysusers.stderr
        backend = base / "backend"
        make_backend(backend)
        keys = root / "etc/redeemd/keys"
        for name in ("root.pub", "code.key"):
            shutil.copy(backend / name, keys / name)
            (keys / name).chmod(0o600)
        (root / "etc/redeemd/mqtt.password").write_text("pw\n")
        (root / "etc/redeemd/mqtt.password").chmod(0o644)
        tmpfiles = subprocess.run(
            [tool("systemd-tmpfiles", "systemd"), f"--root={root}", "--create",
             str(root / "etc/tmpfiles.d/redeemd.conf")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        yield root, tmpfiles, service_user
    finally:
        shutil.rmtree(base, ignore_errors=True)


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_tmpfiles_gives_the_service_exactly_read_access_to_its_keys(installed_box):
    root, tmpfiles, (_, uid, gid) = installed_box
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert "unsafe path transition" not in tmpfiles.stderr
    expected = {
        "etc/redeemd": (0, gid, 0o750),
        "etc/redeemd/config.toml": (0, gid, 0o640),
        "etc/redeemd/mqtt.password": (0, gid, 0o640),
        "etc/redeemd/keys": (0, gid, 0o750),
        "etc/redeemd/keys/root.pub": (0, gid, 0o640),
        "etc/redeemd/keys/code.key": (0, gid, 0o640),
        "var/lib/redeemd": (uid, gid, 0o750),
    }
    assert {path: owner_and_mode(root / path) for path in expected} == expected
    assert not (root / "var/lib/redeemd/keys").exists()


def as_user(uid: int, gid: int, groups: list[int], func, *args):
    """func(*args) in a forked child running as uid:gid; its JSON-able result, or the
    text of the exception it raised. Forked, not exec'd: the test's Python (under
    /root) is not one another user may run, and everything func needs is loaded."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                answer = {"result": func(*args)}
            except Exception as exc:  # noqa: BLE001  (reported to the parent)
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write, json.dumps(answer).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child failed"
    return json.loads(data)


def probe(root: str) -> dict[str, str]:
    """What a process of this user may do to the box's keys, config and state."""
    etc = Path(root) / "etc/redeemd"
    keys, state = etc / "keys", Path(root) / "var/lib/redeemd"

    def attempt(action) -> str:
        try:
            action()
            return "ok"
        except OSError as exc:
            return os.strerror(exc.errno)

    return {
        "read code.key": attempt(lambda: (keys / "code.key").read_bytes()),
        "read root.pub": attempt(lambda: (keys / "root.pub").read_bytes()),
        "read config.toml": attempt(lambda: (etc / "config.toml").read_bytes()),
        "read mqtt.password": attempt(lambda: (etc / "mqtt.password").read_bytes()),
        "write in the state directory": attempt(lambda: (state / "probe").write_text("x")),
        "overwrite root.pub": attempt(lambda: open(keys / "root.pub", "r+b").close()),
        "overwrite code.key": attempt(lambda: open(keys / "code.key", "r+b").close()),
        "add a root key": attempt(lambda: open(keys / "mine.pub", "x").close()),
        "rename root.pub": attempt(lambda: os.rename(keys / "root.pub", keys / "old.pub")),
        "delete root.pub": attempt(lambda: os.unlink(keys / "root.pub")),
        "chmod code.key": attempt(lambda: os.chmod(keys / "code.key", 0o644)),
        "move keys/ aside": attempt(lambda: os.rename(keys, etc / "keys.old")),
        "make another keys dir": attempt(lambda: os.mkdir(etc / "keys.new")),
        "overwrite config.toml": attempt(lambda: open(etc / "config.toml", "r+b").close()),
    }


def test_the_service_user_reads_its_keys_but_cannot_change_move_or_replace_them(installed_box):
    root, _, (_, uid, gid) = installed_box
    denied = "Permission denied"
    assert as_user(uid, gid, [gid], probe, str(root)) == {
        "result": {
            "read code.key": "ok",
            "read root.pub": "ok",
            "read config.toml": "ok",
            "read mqtt.password": "ok",
            "write in the state directory": "ok",
            "overwrite root.pub": denied,
            "overwrite code.key": denied,
            "add a root key": denied,
            "rename root.pub": denied,
            "delete root.pub": denied,
            "chmod code.key": "Operation not permitted",
            "move keys/ aside": denied,
            "make another keys dir": denied,
            "overwrite config.toml": denied,
        }
    }


def test_others_on_the_box_cannot_read_keys_or_config(installed_box):
    root, _, _ = installed_box
    nobody = 65534
    seen = as_user(nobody, nobody, [], probe, str(root))["result"]
    for what in ("read code.key", "read root.pub", "read config.toml", "read mqtt.password"):
        assert seen[what] == "Permission denied", what


def load_config(path: str, config_dir: str) -> str:
    os.environ["CONFIGURATION_DIRECTORY"] = config_dir
    loaded = config_mod.load(path)
    return f"{len(loaded.trust.root_keys)} root key(s), code key {len(loaded.trust.code_key)} bytes"


def test_the_installed_config_loads_its_keys_as_the_service_user(installed_box):
    root, _, (_, uid, gid) = installed_box
    etc = root / "etc/redeemd"
    answer = as_user(uid, gid, [gid], load_config, str(etc / "config.toml"), str(etc))
    assert answer == {"result": "1 root key(s), code key 32 bytes"}
