"""`redeemd doctor`: check a box the way a technician would, and say what to fix.

Each check gives one `Finding`; a problem's message says what is wrong and what to do,
in one line, because it is read at a counter over a slow SSH session. The checks only
read: the database is opened read-only and nothing is migrated, so doctor is safe to
run beside the daemon and before it was ever started.

>>> from daemon.doctor import Finding
>>> print(Finding("disk", False, "only 20 MB free ...").line())
problem  disk: only 20 MB free ...

Device permissions are judged for the account the daemon runs as: the `redeemd` user
when doctor runs as root and that user exists (so `sudo redeemd doctor` tells whether
the service can open a scanner), otherwise the user running doctor; `--user` picks one.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon import config as config_mod
from daemon.config import Config, ConfigError, ScannerConfig
from storage import trust
from storage.database import StorageError, connect

SERVICE_USER = "redeemd"
# A clock before this was never set (a board without a real-time clock boots in 1970).
CLOCK_NEVER_BEFORE = 1_735_689_600  # 2025-01-01
DEFAULT_MIN_FREE = 100 << 20
BROKER_TIMEOUT = 3.0


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'problem':<8} {self.check}: {self.message}"


@dataclass(frozen=True)
class Account:
    """Who must be able to open the files: a user name, uid and all its groups."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> Account:
        entry = pwd.getpwnam(name)  # KeyError for an unknown user
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))

    @classmethod
    def default(cls) -> Account:
        if os.geteuid() == 0:
            try:
                return cls.named(SERVICE_USER)
            except KeyError:
                pass
        try:
            return cls.named(pwd.getpwuid(os.geteuid()).pw_name)
        except KeyError:  # a uid without a name (some containers)
            return cls(str(os.geteuid()), os.geteuid(), frozenset(os.getgroups()))

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def can(self, path: Path, write: bool) -> bool:
        """Whether this account may open `path` for reading (and writing)."""
        if self.is_self:
            return os.access(path, os.R_OK | (os.W_OK if write else 0))
        if self.uid == 0:
            return True
        st = path.stat()
        # The owner's bits, else the group's, else the others' (POSIX ACLs are not read).
        if st.st_uid == self.uid:
            shift = 6
        elif st.st_gid in self.gids:
            shift = 3
        else:
            shift = 0
        need = 0o4 | (0o2 if write else 0)
        return (st.st_mode >> shift) & need == need


def describe_mode(path: Path) -> str:
    st = path.stat()
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.filemode(st.st_mode)} {owner}:{group}"


def check(
    config_path: str | None,
    *,
    account: Account | None = None,
    min_free: int = DEFAULT_MIN_FREE,
    now: float | None = None,
) -> list[Finding]:
    """Every finding for the box configured by `config_path` (as the CLI resolves it)."""
    account = account or Account.default()
    now = time.time() if now is None else now
    try:
        config = config_mod.load(config_path)
    except ConfigError as exc:
        return [
            Finding(
                "config", False, f"{exc.source}: {problem}; fix it, then `redeemd check-config`"
            )
            for problem in exc.problems
        ]
    findings = [
        Finding(
            "config",
            True,
            f"{config.source} (box {config.box.id}, merchant {config.box.merchant}, "
            f"checking as user {account.name})",
        )
    ]
    findings += _database(config, account, now)
    findings += _clock_plausible(now)
    findings += [f for scanner in config.scanners for f in _scanner(scanner, account)]
    findings += _sync(config, account)
    findings += _disk(config, min_free)
    return findings


# ---------------------------------------------------------------- database, clock, cache


def give_back(database: Path) -> None:
    """Give -wal and -shm files to the database's owner.

    Any connection, even a read-only one, creates them and leaves them behind; made by
    root (`sudo redeemd doctor`, `sudo redeemd status`) they are root's, and the daemon's
    user could then no longer write its own database.
    """
    if os.geteuid() != 0:
        return
    try:
        owner = database.stat()
    except OSError:
        return
    for suffix in ("-wal", "-shm"):
        path = Path(f"{database}{suffix}")
        try:
            st = path.stat()
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(path, owner.st_uid, owner.st_gid)
        except OSError:
            continue


def _database(config: Config, account: Account, now: float) -> Iterator[Finding]:
    path = config.box.database
    if not path.exists():
        yield Finding(
            "database", False,
            f"no database at {path} yet: apply batches with `redeemd import FILE...` or "
            "enable [sync] and start redeemd",
        )  # fmt: skip
        return
    for item in (config.box.state_dir, path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if item.exists() and not account.can(item, write=True):
            yield Finding(
                "database", False,
                f"user {account.name} cannot write {item} ({describe_mode(item)}): "
                f"chown -R {account.name}: {config.box.state_dir} (a command run as root "
                "created it)",
            )  # fmt: skip
    try:
        conn = connect(path, readonly=True)
    except StorageError as exc:
        yield Finding("database", False, f"{exc}; check the permissions of {path}")
        return
    try:
        result = conn.execute("PRAGMA quick_check").fetchall()
        if [r[0] for r in result] != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(str(r[0]) for r in result[:3]))
        yield Finding("database", True, f"{path}: quick_check ok")
        floor = trust.time_floor(conn)
        newest = trust.newest_batch_time(conn, config.box.merchant)
    except sqlite3.Error as exc:
        yield Finding(
            "database", False,
            f"{path} is damaged ({exc}): stop redeemd, move the file aside and restore "
            "the newest backup (docs/operations.md, Back up and restore)",
        )  # fmt: skip
        return
    finally:
        conn.close()
        give_back(path)
    yield _clock_vs_floor(now, floor)
    yield _cache(config, now, newest)


def _clock_plausible(now: float) -> Iterator[Finding]:
    if now < CLOCK_NEVER_BEFORE:
        yield Finding(
            "clock", False,
            f"the clock says {_when(now)}, so it was never set: enable NTP "
            "(timedatectl set-ntp true) and let the box reach an NTP server",
        )  # fmt: skip


def _clock_vs_floor(now: float, floor: int) -> Finding:
    if floor == 0:
        return Finding("clock", True, f"{_when(now)}; no signed time verified yet")
    if now < floor:
        return Finding(
            "clock", False,
            f"the clock ({_when(now)}) is {_age(floor - now)} behind the newest signed "
            f"time ({_when(floor)}); redeemd uses that time floor instead, so codes that "
            "expired since pass: enable NTP (timedatectl set-ntp true)",
        )  # fmt: skip
    return Finding("clock", True, f"{_when(now)}, after the time floor {_when(floor)}")


def _cache(config: Config, now: float, newest: int | None) -> Finding:
    if newest is None:
        return Finding(
            "cache", False,
            f"no batch for merchant {config.box.merchant} applied yet, so every code is "
            "unknown: `redeemd import FILE...` or enable [sync]",
        )  # fmt: skip
    age = now - newest
    if age > config.trust.max_staleness:
        effect = (
            "every scan is rejected (stale_policy = reject)"
            if config.trust.stale_policy == "reject"
            else "scans are still accepted"
        )
        return Finding(
            "cache", False,
            f"the newest batch is {_age(age)} old, over [trust] max_staleness "
            f"({_age(config.trust.max_staleness)}) and {effect}: fix the broker link "
            "(see sync above) or import the newest batches",
        )  # fmt: skip
    return Finding("cache", True, f"newest batch {_age(age)} old")


# ---------------------------------------------------------------- scanners


def _scanner(scanner: ScannerConfig, account: Account) -> Iterator[Finding]:
    where = f"scanner {scanner.name}"
    settings = scanner.settings
    missing = _missing_software(scanner)
    if missing:
        yield Finding(where, False, missing)
        return
    if scanner.type == "stdin":
        if settings["path"] == "-":
            yield Finding(where, True, "standard input")
            return
        path, write, hint = Path(str(settings["path"])), False, "fix [[scanner]] path"
    elif scanner.type == "serial":
        path, write, hint = Path(str(settings["port"])), True, "group dialout"
    elif scanner.type == "hid":
        device = str(settings["device"])
        if not device.startswith("/"):
            yield Finding(
                where, True,
                f"{device!r} is matched when redeemd starts; `redeemd devices` lists candidates",
            )  # fmt: skip
            return
        path, write, hint = Path(device), False, "group input"
    else:  # camera
        path = Path(str(settings["device"]))
        write = path.exists() and path.is_char_device()
        hint = "group video"
    if not path.exists():
        yield Finding(
            where, False,
            f"{path} does not exist: plug the scanner in, or correct the [[scanner]] "
            f"{scanner.name!r} block from `redeemd devices`",
        )  # fmt: skip
        return
    if not account.can(path, write):
        fix = (
            f"usermod -aG {hint.split()[1]} {account.name} and install the udev rules "
            "(docs/scanners.md)"
            if hint.startswith("group")
            else hint
        )
        yield Finding(
            where, False,
            f"user {account.name} cannot {'read and write' if write else 'read'} {path} "
            f"({describe_mode(path)}): {fix}",
        )  # fmt: skip
        return
    yield Finding(where, True, f"{path} ({scanner.type}) {'read/write' if write else 'readable'}")


def _missing_software(scanner: ScannerConfig) -> str | None:
    """What the daemon would report for this scanner before touching its device: a
    Python package or ffmpeg that is not installed."""
    from daemon.service import build_driver
    from drivers.supervisor import DriverError, Unavailable

    driver = build_driver(scanner)
    if isinstance(driver, Unavailable):
        return driver.reason
    if scanner.type == "camera":
        from drivers.camera import find_ffmpeg, zbar_scanner

        try:
            find_ffmpeg(str(scanner.settings.get("ffmpeg", "ffmpeg")))
            zbar_scanner()
        except DriverError as exc:
            return str(exc)
    return None


# ---------------------------------------------------------------- sync


def _sync(config: Config, account: Account) -> Iterator[Finding]:
    sync = config.sync
    if not sync.enabled:
        yield Finding("sync", True, "disabled: an offline box, batches by `redeemd import`")
        return
    unreadable = False
    files = {
        "password_file": _password_file(config),
        "ca_file": sync.ca_file,
        "cert_file": sync.cert_file,
        "key_file": sync.key_file,
    }
    for key, path in files.items():
        if path is not None and path.exists() and not account.can(path, write=False):
            unreadable = True
            yield Finding(
                "sync", False,
                f"[sync] {key}: user {account.name} cannot read {path} "
                f"({describe_mode(path)}): chown root:{SERVICE_USER} {path}; chmod 0640 {path}",
            )  # fmt: skip
    context = None
    if sync.tls:
        try:
            context = ssl.create_default_context(cafile=str(sync.ca_file) if sync.ca_file else None)
            if sync.cert_file and sync.key_file:
                context.load_cert_chain(str(sync.cert_file), str(sync.key_file))
        except (ssl.SSLError, OSError) as exc:
            yield Finding(
                "sync", False,
                f"TLS files unusable ({exc}): check [sync] ca_file, cert_file and key_file "
                "are PEM files and the key belongs to the certificate",
            )  # fmt: skip
            return
    where = f"{sync.host}:{sync.port}"
    try:
        raw = socket.create_connection((sync.host, sync.port), timeout=BROKER_TIMEOUT)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        yield Finding(
            "sync", False,
            f"cannot reach the broker at {where} ({reason}): check the network, a firewall, "
            "and [sync] broker; scans go on offline meanwhile",
        )  # fmt: skip
        return
    with raw:
        if context is not None:
            try:
                with context.wrap_socket(raw, server_hostname=sync.host):
                    pass
            except (ssl.SSLError, OSError) as exc:
                yield Finding(
                    "sync", False,
                    f"TLS with the broker at {where} failed ({exc}): [sync] ca_file must "
                    "hold the CA that signed the broker's certificate for this host name",
                )  # fmt: skip
                return
    if not unreadable:
        yield Finding("sync", True, f"broker {where} reachable{' over TLS' if sync.tls else ''}")
        yield _mqtt_login(sync, config.box.id)


def _mqtt_login(sync, box_id: str) -> Finding:
    """Log in as the box would, so a wrong username or password shows here and not only
    in the journal. The client id is not the box's own: the broker would otherwise throw
    the running daemon off to let this check in."""
    import paho.mqtt.client as mqtt

    from sync.session import REFUSAL_HINTS, use_credentials

    answer: list = []
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"{box_id}-doctor", protocol=mqtt.MQTTv5
    )
    client.on_connect = lambda c, u, flags, reason, props: answer.append(reason)
    use_credentials(client, sync)
    where = f"{sync.host}:{sync.port}"
    try:
        client.connect(sync.host, sync.port, keepalive=10)
        deadline = time.monotonic() + BROKER_TIMEOUT
        while not answer and time.monotonic() < deadline:
            if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (OSError, ssl.SSLError, ValueError) as exc:
        return Finding("sync", False, f"MQTT login at {where} failed: {exc}")
    finally:
        if answer and not answer[0].is_failure:
            client.disconnect()
    if not answer:
        return Finding(
            "sync", False,
            f"the broker at {where} accepted the connection but did not answer the MQTT "
            "login: is it an MQTT broker, and is the port the MQTT port?",
        )  # fmt: skip
    reason = answer[0]
    if reason.is_failure:
        hint = REFUSAL_HINTS.get(reason.value, "")
        return Finding(
            "sync", False, f"the broker refused the login: {reason} (0x{reason.value:02x}){hint}"
        )
    who = f" as {sync.username}" if sync.username else " (anonymous)"
    return Finding("sync", True, f"broker accepted the MQTT login{who}")


def _password_file(config: Config) -> Path | None:
    """The password file named in the config (SyncConfig keeps only its content)."""
    path = Path(config.source)
    if not path.is_file():
        return None
    try:
        name = tomllib.loads(path.read_text()).get("sync", {}).get("password_file", "")
    except (OSError, ValueError):
        return None
    if not isinstance(name, str) or not name.strip():
        return None
    return Path(name.strip().replace("{state_dir}", str(config.box.state_dir))).expanduser()


# ---------------------------------------------------------------- disk


def _disk(config: Config, min_free: int) -> Iterator[Finding]:
    where = config.box.state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < min_free:
        yield Finding(
            "disk", False,
            f"only {_size(free)} free for {config.box.state_dir} (want {_size(min_free)}); "
            "at zero every scan is rejected with storage_error: free space "
            "(journalctl --vacuum-size=100M, old files) or use a bigger card",
        )  # fmt: skip
        return
    yield Finding("disk", True, f"{_size(free)} free for {config.box.state_dir}")


# ---------------------------------------------------------------- formatting


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _age(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _size(n: float) -> str:
    for unit in ("GB", "MB", "kB"):
        scale = {"GB": 1 << 30, "MB": 1 << 20, "kB": 1 << 10}[unit]
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
