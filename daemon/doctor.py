"""`redeemd doctor`: check a box the way a technician would, and say what to fix.

Each check gives one `Finding`; a problem's message says what is wrong and what to do,
in one line, because it is read at a counter over a slow SSH session. The checks only
read: the database is opened read-only and nothing is migrated, so doctor is safe to
run beside the daemon and before it was ever started.

>>> from daemon.doctor import Finding
>>> print(Finding("disk", False, "only 20 MB free ...").line())
problem  disk: only 20 MB free ...

File and device permissions are judged for the account the daemon runs as: the
`redeemd` user when doctor runs as root and that user exists (so `sudo redeemd doctor`
tells whether the service can open a scanner), otherwise the user running doctor;
`--user` picks one. Doctor's own process may be root, for which every file opens, so
another account is judged from the owner, group and mode bits against its uid and
groups (POSIX ACLs are not read), and only the account doctor runs as is asked with
os.access.

Secrets (the config, the code key, the MQTT password file, the TLS key) and the root
keys follow one rule, the one systemd/tmpfiles.d/redeemd.conf lays down: root writes,
the service reads, nobody else looks. Doctor checks that rule on whatever paths the
config names, so a box that keeps its keys elsewhere is judged the same way.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from daemon import box_key, liveness
from daemon import config as config_mod
from daemon.config import Config, ConfigError, ScannerConfig
from drivers.settings import CameraSettings, HidSettings, SerialSettings, StdinSettings
from storage import dispensing, trust
from storage.database import DatabaseLost, is_empty, refuse_if_lost
from storage.migrations import migrations

SERVICE_USER = "redeemd"
# Modes of redeemd's secrets and of the directories holding them, as
# systemd/tmpfiles.d/redeemd.conf sets them (a test holds the two together).
SECRET_MODE = 0o640
SECRET_DIR_MODE = 0o750
# The section of docs/operations.md a damaged database sends the technician to.
RESTORE_SECTION = "Back up and restore the ledger"
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
    """Who must be able to open the files: a user name, uid, primary group and all groups."""

    name: str
    uid: int
    gid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> Account:
        entry = pwd.getpwnam(name)  # KeyError for an unknown user
        groups = frozenset(os.getgrouplist(name, entry.pw_gid))
        return cls(name, entry.pw_uid, entry.pw_gid, groups)

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
            uid, gid = os.geteuid(), os.getegid()
            return cls(str(uid), uid, gid, frozenset({gid, *os.getgroups()}))

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    @property
    def group(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)

    @property
    def confined(self) -> bool:
        """Whether this is a service account that must not be able to change its own
        keys and config. Not root (which can change anything anyway), and not a person
        checking a box they run as themselves (the demo, a developer's checkout)."""
        return self.uid != 0 and (self.name == SERVICE_USER or not self.is_self)

    def may(self, path: Path, bits: int) -> bool:
        """Whether this account may access `path` itself with `bits` (os.R_OK | os.W_OK
        | os.X_OK), from its owner, group and mode; directories above are not looked at."""
        if self.is_self:
            return os.access(path, bits, effective_ids=os.access in os.supports_effective_ids)
        if self.uid == 0:
            return True
        st = path.stat()
        # The owner's bits, else the group's, else the others'.
        if st.st_uid == self.uid:
            shift = 6
        elif st.st_gid in self.gids:
            shift = 3
        else:
            shift = 0
        return (st.st_mode >> shift) & bits == bits

    def blocked_at(self, path: Path) -> Path | None:
        """The first directory above `path` this account may not enter, if any."""
        for parent in reversed(path.absolute().parents):
            if not self.may(parent, os.X_OK):
                return parent
        return None

    def can(self, path: Path, write: bool) -> bool:
        """Whether this account may open `path` for reading (and writing)."""
        bits = os.R_OK | (os.W_OK if write else 0)
        return self.blocked_at(path) is None and self.may(path, bits)

    def can_change(self, path: Path) -> bool:
        """Whether this account may rewrite the file `path` leads to (it owns it, and so
        may chmod it, or may write it)."""
        real = path.resolve()
        return real.stat().st_uid == self.uid or self.may(real, os.W_OK)

    def replaces_through(self, path: Path) -> Path | None:
        """A directory above `path` this account may write, and so put another file in
        its place (renaming it, or a directory on the way, aside); None if none."""
        # The directories on the path as named (a symlink there can be swapped) and on
        # the path it leads to.
        for named in (Path(os.path.abspath(path)), path.resolve()):
            child = named
            for parent in named.parents:
                st = parent.stat()
                # In a sticky directory (/tmp) only the entry's owner (or the
                # directory's) may rename it.
                sticky = st.st_mode & stat.S_ISVTX and child.lstat().st_uid != self.uid
                if st.st_uid == self.uid or (self.may(parent, os.W_OK | os.X_OK) and not sticky):
                    return parent
                child = parent
        return None


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
        return [_config_problem(exc.source, problem, account) for problem in exc.problems]
    findings = [
        Finding(
            "config",
            True,
            f"{config.source} (box {config.box.id}, merchant {config.box.merchant}, "
            f"checking as user {account.name})",
        )
    ]
    findings += _daemon(config)
    findings += _secrets(config, account)
    findings += _database(config, account, now)
    findings += _clock_plausible(now)
    findings += [f for scanner in config.scanners for f in _scanner(scanner, account)]
    findings += _sync(config, account)
    findings += _dispensing(config, now)
    findings += _disk(config, min_free)
    return findings


def _config_problem(source: str, problem: str, account: Account) -> Finding:
    denied = re.search(r"Permission denied: '([^']+)'", problem)
    if denied and not account.is_self:
        # Doctor cannot read a file its own user may not read; root can check for the service.
        hint = f"run doctor as root (sudo redeemd doctor) to check it for user {account.name}"
    elif denied:
        path = Path(denied.group(1))
        try:
            mode, fix = describe_mode(path), _secret_fix(path, account)
        except OSError:  # a directory on the way it may not enter either
            hint = "run doctor as root (sudo redeemd doctor) to see which directory blocks it"
        else:
            return Finding(
                "config",
                False,
                f"user {account.name} cannot read {path} ({mode}), so redeemd cannot start: "
                f"as root, {fix}",
            )
    else:
        hint = "fix it, then `redeemd check-config`"
    return Finding("config", False, f"{source}: {problem}; {hint}")


# ---------------------------------------------------------------- daemon


def _daemon(config: Config) -> Iterator[Finding]:
    """A box whose daemon is down redeems nothing, whatever else is fine."""
    state = liveness.probe(config)
    if not state.running:
        yield Finding(
            "daemon",
            False,
            f"redeemd is {state.summary}, so no scan is decided: start it "
            "(systemctl start redeemd); if it stops again, journalctl -u redeemd -n 50 says why",
        )
    elif state.api_problem:
        yield Finding(
            "daemon",
            False,
            f"redeemd is {state.summary}, but its local API socket {state.api_problem}, so "
            "the POS application cannot reach it: journalctl -u redeemd -g api says why; "
            "systemctl restart redeemd makes the socket again",
        )
    else:
        yield Finding("daemon", True, state.summary)


# ---------------------------------------------------------------- secrets


def _guarded_files(config: Config) -> list[tuple[str, Path, bool]]:
    """(what, path, secret) for every file that only root may change; secret ones are
    also hidden from other users. Root keys are public, but they are trust anchors."""
    files: list[tuple[str, Path, bool]] = []
    source = Path(config.source)
    if source.is_file():  # not the built-in defaults, not /dev/null
        files.append(("config", source, True))
    if config.trust.code_key_file is not None:
        files.append(("[trust] code_key_file", config.trust.code_key_file, True))
    files += [("[trust] root_key_files", path, False) for path in config.trust.root_key_files]
    if config.sync.password_file is not None:
        files.append(("[sync] password_file", config.sync.password_file, True))
    if config.sync.key_file is not None:
        files.append(("[sync] key_file", config.sync.key_file, True))
    return [(what, path, secret) for what, path, secret in files if path.exists()]


def _secrets(config: Config, account: Account) -> Iterator[Finding]:
    files = _guarded_files(config)
    problems: list[Finding] = []
    for what, path, secret in files:
        try:
            problems += _guard(what, path, secret, account, config.box.state_dir)
        except OSError as exc:  # a directory on the way doctor's own user may not read
            problems.append(
                Finding(
                    "secrets", False, f"{what}: cannot check {path} ({exc}): run doctor as root"
                )
            )
    yield from problems
    if files and not problems:
        rule = "not changeable by it, " if account.confined else ""
        yield Finding(
            "secrets",
            True,
            f"{len(files)} key and config file(s) readable by {account.name}, {rule}"
            "secret ones hidden from other users",
        )


OPEN = "it is open to every user of the box"


def _guard(
    what: str, path: Path, secret: bool, account: Account, state_dir: Path
) -> Iterator[Finding]:
    """The problems of one secret or trust anchor: what is wrong with the file itself, in
    one line with one fix, and a directory on the way that blocks or endangers it."""
    blocked = account.blocked_at(path)
    if blocked is not None:
        yield Finding(
            "secrets",
            False,
            f"{what}: user {account.name} cannot reach {path}: it may not enter {blocked} "
            f"({describe_mode(blocked)}), so redeemd cannot start: chown root:{account.group} "
            f"{blocked} && chmod {SECRET_DIR_MODE:04o} {blocked}",
        )
    wrong = []
    if blocked is None and not account.may(path, os.R_OK):
        wrong.append(f"user {account.name} cannot read it, so redeemd cannot start")
    if secret and path.stat().st_mode & 0o007:
        wrong.append(OPEN)
    if account.confined and account.can_change(path):
        wrong.append(
            f"user {account.name} can change it, so whoever takes over the daemon can "
            "rewrite what it trusts"
        )
    if wrong:
        # Your own file (the demo) or root's only needs hiding; for the service, the
        # owner and mode of the tmpfiles layout fix every reason at once.
        hide = wrong == [OPEN] and not account.confined
        fix = f"chmod o-rwx {path}" if hide else _secret_fix(path, account)
        yield Finding(
            "secrets", False, f"{what}: {path} ({describe_mode(path)}): {'; '.join(wrong)}: {fix}"
        )
    way = account.replaces_through(path) if account.confined else None
    if way is not None:
        yield Finding(
            "secrets",
            False,
            f"{what}: user {account.name} can replace {path}: it may write to {way} "
            f"({describe_mode(way)}): {_move_fix(what, way, account, state_dir)}",
        )


def _move_fix(what: str, way: Path, account: Account, state_dir: Path) -> str:
    """How to keep the account from writing `way`, a directory above a guarded file."""
    if way.stat().st_uid != account.uid:
        return f"chmod go-w {way}"
    state = state_dir.resolve()
    if way != state and way not in state.parents:
        return f"chown root:{account.group} {way} && chmod {SECRET_DIR_MODE:04o} {way}"
    # The state directory must stay the service's: the file has to live elsewhere, in
    # root's configuration directory ({config_dir}, as tmpfiles.d lays it out).
    make = f"install -d -o root -g {account.group} -m {SECRET_DIR_MODE:04o}"
    if what == "config":
        default = config_mod.DEFAULT_PATH
        return (
            f"keep it out of the state directory: {make} {default.parent} and move it to "
            f"{default}, which redeemd reads without -c"
        )
    keys = Path(config_mod.default_config_dir()) / "keys"
    return (
        f"keep it out of the state directory: {make} {keys}, move it there and name the "
        "new path in the config (docs/operations.md)"
    )


def _secret_fix(path: Path, account: Account) -> str:
    """The commands that give `path` the owner and mode of systemd/tmpfiles.d/redeemd.conf:
    root writes, the account's group reads, nobody else."""
    st = path.stat()
    commands = []
    if (st.st_uid, st.st_gid) != (0, account.gid):
        commands.append(f"chown root:{account.group} {path}")
    if stat.S_IMODE(st.st_mode) != SECRET_MODE:
        commands.append(f"chmod {SECRET_MODE:04o} {path}")
    return " && ".join(commands)


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
    # Opening the database makes its -wal and -shm files (with the database's mode), so
    # who may write what is judged after it, and comes first in the output.
    opened = list(_database_content(config, now))
    if read_only_mount(config.box.database) is None and config.box.state_dir.exists():
        try:
            yield from _database_access(config, account)
        except OSError as exc:  # a directory doctor's own user may not look into
            yield Finding(
                "database", False, f"cannot check who may write it ({exc}): run doctor as root"
            )
    yield from opened


def _database_content(config: Config, now: float) -> Iterator[Finding]:
    path = config.box.database
    try:
        refuse_if_lost(path)
    except DatabaseLost as exc:  # missing or empty, on a box that used one
        yield Finding("database", False, str(exc))
        return
    if is_empty(path):
        get = (
            "start redeemd (systemctl start redeemd): it makes one and fetches batches "
            "from the broker (see the sync line)"
            if config.sync.enabled
            else "apply batches with `redeemd import FILE...`, or enable [sync] to fetch them"
        )
        yield Finding("database", False, f"no database at {path} yet (a new box): {get}")
        return
    mount = read_only_mount(path)
    if mount is not None:
        yield Finding(
            "database",
            False,
            f"{path} is on a file system mounted read-only ({mount}), so every scan is "
            f"rejected with storage_error: remount it (mount -o remount,rw {mount}) and make "
            "it stay so in /etc/fstab; if the kernel made it read-only after disk errors "
            "(dmesg | grep -i 'read-only'), run fsck or replace the disk or SD card first",
        )
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        yield from _unopenable(path, exc, mount)
        return
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        result = conn.execute("PRAGMA quick_check").fetchall()
        if [r[0] for r in result] != ["ok"]:
            yield _damaged(path, "; ".join(str(r[0]) for r in result[:3]))
            return
        schema = Database(conn, recursive_triggers=False, execute_plugins=False)
        if not migrations.applied(schema):
            yield _damaged(path, "not a redeemd database: none of its tables are there")
            return
        older = bool(migrations.pending(schema))
        floor = trust.time_floor(conn)
        # A release's new columns arrive when the daemon starts and migrates; doctor
        # only reads, so an older schema gets the older measure of the cache's age.
        newest = (trust.newest_batch_time if older else trust.cache_time)(conn, config.box.merchant)
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorname.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            yield _damaged(path, str(exc))
        else:
            yield from _unopenable(path, exc, mount)
        return
    finally:
        conn.close()
        give_back(path)
    upgrade = "; from an older release: redeemd upgrades it when it (re)starts" if older else ""
    yield Finding("database", True, f"{path}: quick_check ok{upgrade}")
    yield _clock_vs_floor(now, floor)
    yield _cache(config, now, floor, newest)


def _database_access(config: Config, account: Account) -> Iterator[Finding]:
    """The service must read and write the state directory and every database file."""
    path = config.box.database
    for item in (config.box.state_dir, path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if not item.exists():
            continue
        is_dir = item.is_dir()
        blocked = account.blocked_at(item)
        if blocked is not None:
            yield Finding(
                "database",
                False,
                f"user {account.name} cannot reach {item}: it may not enter {blocked} "
                f"({describe_mode(blocked)}): chmod o+x {blocked}",
            )
            return
        if account.may(item, os.R_OK | os.W_OK | (os.X_OK if is_dir else 0)):
            continue
        st = item.stat()
        fix = []
        if st.st_uid != account.uid:
            fix.append(f"chown {account.name}:{account.group} {item}")
        need = 0o700 if is_dir else 0o600
        if st.st_mode & need != need:
            fix.append(f"chmod u+{'rwx' if is_dir else 'rw'} {item}")
        yield Finding(
            "database",
            False,
            f"user {account.name} cannot write {item} ({describe_mode(item)}), so every scan "
            f"is rejected with storage_error: {' && '.join(fix)}",
        )


def _unopenable(path: Path, exc: sqlite3.Error, mount: Path | None) -> Iterator[Finding]:
    """An error opening or reading the database that is not damage."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        yield _damaged(path, str(exc))
    elif mount is not None:
        return  # a WAL database on a read-only mount: said above
    elif not os.access(path, os.R_OK):
        yield Finding(
            "database",
            False,
            f"doctor, as uid {os.geteuid()}, cannot read {path}: run it as root, "
            "sudo redeemd doctor",
        )
    elif name.startswith("SQLITE_IOERR"):
        yield Finding(
            "database",
            False,
            f"reading {path} failed with an I/O error ({exc}): the disk or SD card may be "
            "failing (dmesg); take a backup off the box now (redeemd backup) and replace it",
        )
    else:
        yield Finding("database", False, f"cannot open {path} ({exc}, {name})")


def _damaged(path: Path, detail: str) -> Finding:
    return Finding(
        "database",
        False,
        f"{path} is damaged ({detail}), so redeemd cannot use it: stop redeemd, move it aside "
        f"and restore the newest backup (docs/operations.md, {RESTORE_SECTION}); with no "
        "backup, replace the box as docs/operations.md says (a new box id)",
    )


def read_only_mount(path: Path) -> Path | None:
    """The mount point of the read-only file system holding `path`, None if writable."""
    try:
        if not os.statvfs(path).f_flag & os.ST_RDONLY:
            return None
    except OSError:
        return None
    real = path.resolve()
    best = Path("/")
    try:  # the longest mount point above `path` (a bind mount shares its device number)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = Path(re.sub(r"\\(\d{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
            if (point == real or point in real.parents) and len(point.parts) > len(best.parts):
                best = point
    except (OSError, IndexError):
        return real.parent
    return best


def _clock_plausible(now: float) -> Iterator[Finding]:
    if now < CLOCK_NEVER_BEFORE:
        yield Finding(
            "clock",
            False,
            f"the clock says {_when(now)}, so it was never set: enable NTP "
            "(timedatectl set-ntp true) and let the box reach an NTP server",
        )


def _clock_vs_floor(now: float, floor: int) -> Finding:
    if floor == 0:
        return Finding("clock", True, f"{_when(now)}; no signed time verified yet")
    if now < floor:
        return Finding(
            "clock",
            False,
            f"the clock ({_when(now)}) is {_age(floor - now)} behind the newest signed "
            f"time ({_when(floor)}); redeemd uses that time floor instead, so codes that "
            "expired since pass: enable NTP (timedatectl set-ntp true)",
        )
    return Finding("clock", True, f"{_when(now)}, after the time floor {_when(floor)}")


def _cache(config: Config, now: float, floor: int, newest: int | None) -> Finding:
    """How old the cache is, judged as the engine judges stale_policy: from when it was
    last known current (trust.cache_time), by the clock floored at the time floor."""
    if newest is None:
        get = (
            "redeemd fetches them from the broker while it runs (see the daemon and sync "
            "lines), or `redeemd import FILE...`"
            if config.sync.enabled
            else "`redeemd import FILE...`, or enable [sync] to fetch them from the backend"
        )
        return Finding(
            "cache",
            False,
            f"no batch for merchant {config.box.merchant} applied yet, so every code is "
            f"unknown: {get}",
        )
    age = max(now, floor) - newest
    if age > config.trust.max_staleness:
        effect = (
            "every scan is rejected (stale_policy = reject)"
            if config.trust.stale_policy == "reject"
            else "scans are still accepted"
        )
        return Finding(
            "cache",
            False,
            f"the cache is {_age(age)} old (its newest batch, or the newest manifest "
            f"saying there is nothing newer), over [trust] max_staleness "
            f"({_age(config.trust.max_staleness)}) and {effect}: "
            + (
                "fix the broker link (see the sync line) or import the newest batches"
                if config.sync.enabled
                else "import the newest batches (`redeemd import FILE...`)"
            ),
        )
    return Finding("cache", True, f"known current {_age(age)} ago")


# ---------------------------------------------------------------- scanners


def _scanner(scanner: ScannerConfig, account: Account) -> Iterator[Finding]:
    where = f"scanner {scanner.name}"
    settings = scanner.settings
    missing = _missing_software(scanner)
    if missing:
        yield Finding(where, False, missing)
        return
    if isinstance(settings, StdinSettings):
        if settings.path == "-":
            yield Finding(where, True, "standard input")
            return
        # The driver opens a FIFO read/write, so that it never sees end-of-file.
        path, write, hint = Path(settings.path), True, "fifo"
    elif isinstance(settings, SerialSettings):
        path, write, hint = Path(settings.port), True, "group dialout"
    elif isinstance(settings, HidSettings):
        device = settings.device
        if not device.startswith("/"):
            yield Finding(
                where,
                True,
                f"{device!r} is matched when redeemd starts; `redeemd devices` lists candidates",
            )
            return
        path, write, hint = Path(device), False, "group input"
    else:  # camera
        path = Path(settings.device)
        write = path.exists() and path.is_char_device()
        hint = "group video"
    if not path.exists() and hint == "fifo":
        yield Finding(
            where,
            False,
            f"{path} does not exist: a FIFO is made by the program that writes codes into it "
            f"(mkfifo, before redeemd starts): start that program, or correct the path in "
            f"[[scanner]] {scanner.name!r}",
        )
        return
    if not path.exists():
        yield Finding(
            where,
            False,
            f"{path} does not exist: plug the scanner in, or correct the [[scanner]] "
            f"{scanner.name!r} block from `redeemd devices`",
        )
        return
    if not account.can(path, write):
        if hint == "fifo":
            fix = (
                f"chgrp {account.group} {path} && chmod g+rw {path} (and make the program "
                "that creates it do so)"
            )
        else:
            fix = (
                f"usermod -aG {hint.split()[1]} {account.name} and install the udev rules "
                "(docs/scanners.md)"
            )
        yield Finding(
            where,
            False,
            f"user {account.name} cannot {'read and write' if write else 'read'} {path} "
            f"({describe_mode(path)}): {fix}",
        )
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
    if isinstance(scanner.settings, CameraSettings):
        from drivers.camera import find_ffmpeg, make_decoder_for

        try:
            find_ffmpeg(scanner.settings.ffmpeg)
            make_decoder_for(scanner.settings)  # the decoder the settings name, installed
        except DriverError as exc:
            return str(exc)
    return None


# ---------------------------------------------------------------- sync


def _sync(config: Config, account: Account) -> Iterator[Finding]:
    sync = config.sync
    if not sync.enabled:
        yield Finding("sync", True, "disabled: an offline box, batches by `redeemd import`")
        return
    # The password file and the TLS key are checked with the secrets; an unreadable one
    # fails the daemon's login whatever doctor's own (root) login says, so skip that.
    files = {
        "password_file": sync.password_file,
        "ca_file": sync.ca_file,
        "cert_file": sync.cert_file,
        "key_file": sync.key_file,
    }
    unreadable = False
    for key, path in files.items():
        if path is not None and path.exists() and not account.can(path, write=False):
            unreadable = True
            if key in ("ca_file", "cert_file"):
                yield Finding(
                    "sync",
                    False,
                    f"[sync] {key}: user {account.name} cannot read {path} "
                    f"({describe_mode(path)}): {_secret_fix(path, account)}",
                )
    context = None
    if sync.tls:
        try:
            context = ssl.create_default_context(cafile=str(sync.ca_file) if sync.ca_file else None)
            if sync.cert_file and sync.key_file:
                context.load_cert_chain(str(sync.cert_file), str(sync.key_file))
        except (ssl.SSLError, OSError) as exc:
            yield Finding(
                "sync",
                False,
                f"TLS files unusable ({exc}): check [sync] ca_file, cert_file and key_file "
                "are PEM files and the key belongs to the certificate",
            )
            return
    where = f"{sync.host}:{sync.port}"
    try:
        raw = socket.create_connection((sync.host, sync.port), timeout=BROKER_TIMEOUT)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        yield Finding(
            "sync",
            False,
            f"cannot reach the broker at {where} ({reason}): check the network, a firewall, "
            "and [sync] broker; scans go on offline meanwhile",
        )
        return
    with raw:
        if context is not None:
            try:
                with context.wrap_socket(raw, server_hostname=sync.host):
                    pass
            except (ssl.SSLError, OSError) as exc:
                yield Finding(
                    "sync",
                    False,
                    f"TLS with the broker at {where} failed ({exc}): [sync] ca_file must "
                    "hold the CA that signed the broker's certificate for this host name",
                )
                return
    if not unreadable:
        yield Finding("sync", True, f"broker {where} reachable{' over TLS' if sync.tls else ''}")
        if _daemon_logged_in(config):
            yield Finding("sync", True, "the running daemon is logged in to the broker")
        else:
            yield _mqtt_login(sync, config.box.id)


def _daemon_logged_in(config: Config) -> bool:
    """True if the running daemon's own MQTT session is up: that proves the login, and a
    second login as the box would take the session over on a broker that makes the
    username the client id (use_username_as_clientid, docs/operations.md)."""
    if not liveness.probe(config).running:
        return False
    try:
        live = json.loads((config.box.state_dir / "status.json").read_text())
        return live["sync"]["connected"] is True
    except (OSError, ValueError, TypeError, KeyError):
        return False


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
            "sync",
            False,
            f"the broker at {where} accepted the connection but did not answer the MQTT "
            "login: is it an MQTT broker, and is the port the MQTT port?",
        )
    reason = answer[0]
    if reason.is_failure:
        hint = REFUSAL_HINTS.get(reason.value, "")
        return Finding(
            "sync", False, f"the broker refused the login: {reason} (0x{reason.value:02x}){hint}"
        )
    who = f" as {sync.username}" if sync.username else " (anonymous)"
    return Finding("sync", True, f"broker accepted the MQTT login{who}")


# ---------------------------------------------------------------- disk


def _dispensing(config: Config, now: float) -> Iterator[Finding]:
    """The box key and the grant set, on a box that dispenses (rules configured, or a
    key or grant set already there): what would make a dispense be refused."""
    rules = config.dispense.rules
    try:
        key = box_key.load(Path(config.box.state_dir))
    except box_key.BoxKeyError as exc:
        yield Finding("dispensing", False, str(exc))
        return
    held = None
    path = config.box.database
    if not is_empty(path):
        try:
            conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
            try:
                held = dispensing.held_grants(conn, config.trust.root_keys)
                used = dispensing.used_counters(conn, [g.id for g in held.grants] if held else [])
            finally:
                conn.close()
                give_back(path)
        except dispensing.GrantsRefused as exc:
            yield Finding("dispensing", False, str(exc))
            return
        except sqlite3.Error:
            return  # the database line says what is wrong with it
    if key is None and held is None and not rules:
        return  # a box that does not dispense
    if key is None:
        yield Finding(
            "dispensing",
            False,
            "rules dispense claim codes but this box has no key yet: run `redeemd box-key` "
            "and have the backend grant that key",
        )
        return
    if (rules or held is not None) and "claim.invalid" in config.dispense.claim_url:
        yield Finding(
            "dispensing",
            False,
            "[dispense] claim_url is the placeholder: set the merchant's claim service, or "
            "customers get a QR code that opens nothing",
        )
    if held is None:
        yield Finding(
            "dispensing",
            not rules,
            f"box key {key.key_id}, no grant set: "
            + ("rules cannot dispense; " if rules else "")
            + "have the backend grant this key (redeemd-backend grant add)",
        )
        return
    live = [g for g in held.grants if not g.revoked and g.not_before <= now <= g.not_after]
    for rule in rules:
        if not any(rule.card in g.cards for g in live):
            yield Finding(
                "dispensing",
                False,
                f"a rule dispenses card {rule.card} but no current grant covers it: "
                "have the backend grant it (redeemd status shows the grants)",
            )
    low = [g for g in live if g.quota - used.get(g.id, 0) <= max(1, g.quota // 10)]
    for g in low:
        yield Finding(
            "dispensing",
            False,
            f"grant {g.id} has {g.quota - used.get(g.id, 0)} of {g.quota} claim codes left: "
            "ask the backend to raise its quota",
        )
    yield Finding(
        "dispensing",
        True,
        f"box key {key.key_id}, grant set {held.seq}: {len(live)} current grant(s)",
    )


def _disk(config: Config, min_free: int) -> Iterator[Finding]:
    where = config.box.state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < min_free:
        yield Finding(
            "disk",
            False,
            f"only {_size(free)} free for {config.box.state_dir} (want {_size(min_free)}); "
            "at zero every scan is rejected with storage_error: free space "
            "(journalctl --vacuum-size=100M, old files) or use a bigger card",
        )
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
