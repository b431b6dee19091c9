"""`redeemd doctor` against real files: a real database (and a damaged, truncated,
empty or read-only one), a real pseudo-terminal as the serial scanner, a real
`redeemd run` answering on its API socket (and a dead or zombie one), a real Mosquitto
(plain and TLS), a port nobody listens on, and the real free space of the test's disk.

Permissions are judged for another account (`--user nobody`), so the tests mean the
same whether they run as root or not. Secrets: tests/test_doctor_secrets.py.
"""

# ruff: noqa: F811  (fixtures are imported, then named as parameters)
from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from broker import broker, free_port  # noqa: F401  (fixture)
from conftest import CREATED, ROOT, Box, wait_for, write_box
from sqlite_utils import Database
from test_api_service import Daemon
from test_sync_tls import Authority, tls_box, tls_broker  # noqa: F401  (fixture)

from daemon import doctor, liveness
from storage.database import open_database
from storage.migrations import migrations

ME = pwd.getpwuid(os.geteuid()).pw_name


def fresh(box: Box, extra_trust: str = 'max_staleness = "3650d"') -> Box:
    """The box's config with [trust] keys added (write_box writes [trust] itself), its
    config and code key hidden from other users as an installed box's are."""
    text = box.config_path.read_text().replace("[trust]\n", f"[trust]\n{extra_trust}\n", 1)
    # Its own API socket: the default one may be another test's daemon, also box-1.
    box.config_path.write_text(text + f'\n[api]\nsocket = "{box.dir / "run" / "api.sock"}"\n')
    for secret in (box.config_path, box.dir / "keys" / "code.key"):
        secret.chmod(0o600)
    return box


@pytest.fixture
def tmp_path():
    """A fresh directory every user may enter, for the boxes of this module (`box` and
    `loaded_box` take it). pytest's own sit under /tmp/pytest-of-root, which is 0700 and
    which every pytest run makes 0700 again, so another account's access would be
    judged on pytest's directory instead of on the files a test sets up."""
    directory = Path(tempfile.mkdtemp(prefix="redeemd-doctor-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory)


def add(box: Box, text: str) -> Box:
    box.config_path.write_text(box.config_path.read_text() + text)
    return box


def doctor_lines(box: Box, *args: str) -> tuple[int, list[str]]:
    result = box.cli("doctor", *args)
    out = result.stdout.decode()
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()
    return result.returncode, out.splitlines()


def problems(lines: list[str], check: str = "") -> list[str]:
    """The problem lines, or only those of one check ("database", "scanner counter")."""
    prefix = f"problem  {check}:" if check else "problem"
    return [line for line in lines if line.startswith(prefix)]


@pytest.fixture
def running(tmp_path):
    """Start `redeemd run` (scans on stdin) for a box made `fresh`, and wait until its
    API socket answers."""
    daemons: list[Daemon] = []

    def start(box: Box) -> Box:
        socket = box.config.api.socket  # fresh() put it in the box's directory
        daemon = Daemon(box)
        daemons.append(daemon)
        daemon.connect(socket).close()
        return box

    yield start
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.communicate(timeout=30)


@pytest.fixture
def pty_port():
    """A real serial-like character device: the far end of a pseudo-terminal."""
    controller, device = os.openpty()
    path = Path(os.ttyname(device))
    yield path
    os.close(device)
    os.close(controller)


def serial(name: str, port: Path | str) -> str:
    return f'\n[[scanner]]\ntype = "serial"\nname = "{name}"\nport = "{port}"\n'


def test_a_healthy_box_passes_every_check(loaded_box, pty_port, running):
    box = running(add(fresh(loaded_box), serial("counter", pty_port)))
    code, lines = doctor_lines(box, "--user", ME)
    assert code == 0, lines
    assert lines[-1] == "all checks ok"
    checks = {line.split()[1].rstrip(":") for line in lines[:-1]}
    assert {"config", "daemon", "secrets", "database", "clock", "cache", "scanner", "sync",
            "disk"} <= checks  # fmt: skip
    assert any(f"{pty_port} (serial) read/write" in line for line in lines)
    (daemon,) = [line for line in lines if line.startswith("ok       daemon:")]
    assert "running, pid" in daemon and "api.sock answers" in daemon


def test_a_box_whose_daemon_is_not_running_is_not_all_ok(loaded_box):
    box = fresh(loaded_box)
    code, lines = doctor_lines(box, "--user", ME)
    assert code == 1 and lines[-1] != "all checks ok"
    (line,) = problems(lines)
    assert line.startswith("problem  daemon: redeemd is not running (no status.json")
    assert "systemctl start redeemd" in line and "journalctl -u redeemd" in line


def test_a_dead_or_zombie_daemon_left_in_status_json_is_not_running(loaded_box):
    box = fresh(loaded_box)
    status = box.dir / "status.json"
    # A child that exits and is not waited for stays a zombie: its pid still exists.
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: liveness.process_state(zombie.pid) == "Z", "the child to exit")
    status.write_text(json.dumps({"pid": zombie.pid, "updated_at": time.time()}))
    _, lines = doctor_lines(box, "--user", ME)
    (line,) = problems(lines, "daemon")
    assert f"pid {zombie.pid} has exited and is a zombie" in line
    zombie.wait()  # reaped: the pid is gone
    _, lines = doctor_lines(box, "--user", ME)
    (line,) = problems(lines, "daemon")
    assert f"not running (pid {zombie.pid} in status.json has exited)" in line


def test_without_the_api_a_fresh_status_of_a_live_pid_is_running_and_a_stale_one_hangs(
    loaded_box,
):
    box = fresh(loaded_box)
    text = box.config_path.read_text().replace("[api]\n", "[api]\nenabled = false\n")
    box.config_path.write_text(text)
    status = box.dir / "status.json"
    pid = os.getpid()  # a live process that is not a zombie: this test's own
    status.write_text(json.dumps({"pid": pid, "updated_at": time.time()}))
    (daemon,) = [f for f in doctor.check(str(box.config_path)) if f.check == "daemon"]
    assert daemon.ok and daemon.message == f"running, pid {pid} (local API disabled in [api])"
    status.write_text(json.dumps({"pid": pid, "updated_at": time.time() - 60}))
    (daemon,) = [f for f in doctor.check(str(box.config_path)) if f.check == "daemon"]
    assert not daemon.ok
    assert (
        f"pid {pid} is alive but has not updated status.json for 60 s: it hangs" in daemon.message
    )


def test_a_daemon_whose_api_socket_is_gone_is_a_problem(loaded_box, running):
    box = running(fresh(loaded_box))
    (box.dir / "run" / "api.sock").unlink()
    _, lines = doctor_lines(box, "--user", ME)
    (line,) = problems(lines, "daemon")
    assert "redeemd is running, pid" in line and "api.sock does not exist" in line
    assert "POS application cannot reach it" in line


def test_a_config_error_is_a_problem_naming_the_key(box):
    add(box, '\n[sync]\nbroker = "http://nowhere"\n')
    code, lines = doctor_lines(box)
    assert code == 1
    (line,) = problems(lines)
    assert "[sync] broker" in line and "redeemd check-config" in line


def test_no_database_yet_says_how_to_get_one_and_never_to_enable_sync_when_it_is(box, broker):
    code, lines = doctor_lines(box, "--user", ME)
    assert code == 1
    (line,) = problems(lines, "database")
    assert "no database" in line and "redeemd import" in line and "enable [sync]" in line
    add(box, sync_config(broker.url))
    _, lines = doctor_lines(box, "--user", ME)
    (line,) = problems(lines, "database")
    assert "start redeemd" in line and "fetches batches from the broker" in line
    assert "enable [sync]" not in "\n".join(lines)
    open_database(box.database).close()  # a database without batches: the cache advice
    _, lines = doctor_lines(box, "--user", ME)
    (line,) = problems(lines, "cache")
    assert "no batch for merchant demo applied yet" in line and "from the broker" in line
    assert "enable [sync]" not in "\n".join(lines)


def garble(database: Path) -> None:
    data = bytearray(database.read_bytes())
    assert len(data) > 3 * 4096
    data[4096 : len(data) - 4096] = b"\xa5" * (len(data) - 2 * 4096)
    database.write_bytes(bytes(data))


def truncate(database: Path) -> None:
    with database.open("r+b") as f:
        f.truncate(10000)  # cut inside the third page


def overwrite(database: Path) -> None:
    database.write_bytes(os.urandom(64 << 10))  # the header too: not a database at all


@pytest.mark.parametrize("damage", [garble, truncate, overwrite])
def test_a_damaged_database_says_restore_from_backup_and_where(loaded_box, damage):
    fresh(loaded_box)
    damage(loaded_box.database)
    code, lines = doctor_lines(loaded_box, "--user", ME)
    assert code == 1
    (line,) = problems(lines, "database")
    assert "is damaged (" in line and "restore the newest backup" in line
    assert "permission" not in line and "chown" not in line and "chmod" not in line
    section = f"docs/operations.md, {doctor.RESTORE_SECTION}"
    assert section in line
    assert f"\n## {doctor.RESTORE_SECTION}\n" in (ROOT / "docs" / "operations.md").read_text()


@pytest.mark.parametrize("lost", ["emptied", "deleted"])
def test_a_lost_database_says_the_state_is_gone_restore_from_backup(loaded_box, lost):
    fresh(loaded_box)  # loaded_box opened its database: the box has used one
    for path in loaded_box.dir.glob("redeemd.db*"):
        path.unlink()
    if lost == "emptied":
        loaded_box.database.write_bytes(b"")
    _, lines = doctor_lines(loaded_box, "--user", ME)
    (line,) = problems(lines, "database")
    what = "empty (0 bytes)" if lost == "emptied" else "missing"
    assert f"database {loaded_box.database} is {what}, but this box has used one" in line
    assert "anti-rollback state" in line and "Restore the database from backup" in line
    assert doctor.RESTORE_SECTION in line and "redeemd init" in line


def test_a_database_from_an_older_release_is_not_damaged_and_is_not_migrated(box):
    """Doctor only reads: a schema one migration behind this release (the daemon
    upgrades it when it starts) is fine, not "damaged", and stays as it was."""
    fresh(box)
    conn = sqlite3.connect(box.database)
    schema = Database(conn, recursive_triggers=False, execute_plugins=False)
    newest = migrations._migrations[-1].name
    migrations.apply(schema, stop_before=newest)
    conn.close()
    code, lines = doctor_lines(box, "--user", ME)
    (line,) = [line for line in lines if line.startswith("ok       database:")]
    assert "from an older release: redeemd upgrades it when it (re)starts" in line
    assert not problems(lines, "database")
    conn = sqlite3.connect(box.database)
    assert migrations.pending(Database(conn))[0].name == newest
    conn.close()


def test_a_database_of_another_program_is_not_a_redeemd_database(box):
    fresh(box)
    conn = sqlite3.connect(box.database)
    conn.execute("CREATE TABLE photos (name TEXT)")
    conn.commit()
    conn.close()
    _, lines = doctor_lines(box, "--user", ME)
    (line,) = problems(lines, "database")
    assert "is damaged (not a redeemd database" in line and "restore the newest backup" in line


def test_a_stale_cache_and_an_empty_one_are_problems(loaded_box, tmp_path, keyset):
    code, lines = doctor_lines(loaded_box, "--user", ME)  # batches from CREATED, 7d allowed
    assert code == 1
    (line,) = problems(lines, "cache")
    assert "max_staleness (7.0d)" in line
    assert "import the newest batches" in line and "broker" not in line  # sync is off
    empty = fresh(write_box(tmp_path / "empty", keyset))
    open_database(empty.database).close()
    code, lines = doctor_lines(empty, "--user", ME)
    (line,) = problems(lines, "cache")
    assert "no batch for merchant demo applied yet" in line


def test_a_clock_behind_the_time_floor_or_never_set_is_a_problem(loaded_box):
    fresh(loaded_box)
    behind = doctor.check(str(loaded_box.config_path), now=CREATED - 86400)
    (clock,) = [f for f in behind if f.check == "clock"]
    assert not clock.ok and "1.0d behind" in clock.message and "set-ntp" in clock.message
    never = doctor.check(str(loaded_box.config_path), now=1000.0)
    assert any(not f.ok and "never set" in f.message for f in never if f.check == "clock")
    after = doctor.check(str(loaded_box.config_path), now=CREATED + 60)
    assert all(f.ok for f in after if f.check in ("clock", "cache"))


def test_scanner_and_database_permissions_are_judged_for_the_service_user(loaded_box, pty_port):
    box = add(fresh(loaded_box), serial("counter", pty_port) + serial("gone", "/dev/ttyNOPE9"))
    pty_port.chmod(0o600)
    box.database.chmod(0o600)
    box.dir.chmod(0o755)
    code, lines = doctor_lines(box, "--user", "nobody")
    assert code == 1
    (counter,) = problems(lines, "scanner counter")
    assert f"user nobody cannot read and write {pty_port} (crw-------" in counter
    assert "usermod -aG dialout nobody" in counter
    (gone,) = problems(lines, "scanner gone")
    assert "/dev/ttyNOPE9 does not exist" in gone and "redeemd devices" in gone
    found = problems(lines, "database")
    assert f"user nobody cannot write {box.dir} (drwxr-xr-x" in found[0]
    assert any(f"user nobody cannot write {box.database}" in p for p in found)
    pty_port.chmod(0o666)
    box.dir.chmod(0o777)
    for path in box.dir.glob("redeemd.db*"):  # -wal and -shm too, if a reader left them
        path.chmod(0o666)
    _, lines = doctor_lines(box, "--user", "nobody")
    assert not problems(lines, "scanner counter") and not problems(lines, "database")


def service_account(paths: list[Path]) -> str:
    """The account the tests judge for, owning `paths` as the service owns its database:
    nobody when the tests run as root, else the user running them (then doctor asks
    os.access, which judges modes for a non-root user as the kernel does)."""
    if os.geteuid() != 0:
        return ME
    nobody = pwd.getpwnam("nobody")
    for path in paths:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return "nobody"


def follow(line: str) -> None:
    """Run the commands a problem line ends with, as a technician would paste them."""
    subprocess.run(["sh", "-c", line.rsplit(": ", 1)[1]], check=True)


@pytest.mark.parametrize("mode", [0o444, 0o000])
def test_a_database_the_service_owns_but_may_not_write_gets_a_chmod_not_a_chown(loaded_box, mode):
    box = fresh(loaded_box)
    user = service_account([box.dir, *box.dir.glob("redeemd.db*")])
    box.database.chmod(mode)
    _, lines = doctor_lines(box, "--user", user)
    found = problems(lines, "database")
    shown = stat.filemode(stat.S_IFREG | mode)  # -r--r--r-- or ----------
    assert f"user {user} cannot write {box.database} ({shown} {user}:" in found[0]
    assert found[0].endswith(f"rejected with storage_error: chmod u+rw {box.database}")
    assert not [p for p in found if "chown" in p]
    for line in found:  # the -shm file a reader made takes the database's mode too
        assert line.endswith(" chmod u+rw " + line.split(" cannot write ")[1].split()[0])
        follow(line)
    _, lines = doctor_lines(box, "--user", user)
    assert not problems(lines, "database")


def test_a_database_root_made_gets_the_chown_that_gives_it_back(loaded_box):
    box = fresh(loaded_box)
    box.dir.chmod(0o777)
    box.database.chmod(0o644)
    _, lines = doctor_lines(box, "--user", "nobody")
    found = problems(lines, "database")
    assert found[0].endswith(f": chown nobody:nogroup {box.database}")
    for line in found:  # and the -wal and -shm files root's reading made
        assert " chown nobody:nogroup " in line and "chmod" not in line
        follow(line)
    _, lines = doctor_lines(box, "--user", "nobody")
    assert not problems(lines, "database")


def test_a_database_on_a_read_only_mount_says_remount_not_chown(loaded_box):
    """A real read-only bind mount of the state directory, in a mount namespace of its own
    (unshare), so nothing outside this doctor run sees it."""
    box = fresh(loaded_box)
    for path in box.dir.glob("redeemd.db-*"):
        path.unlink()
    script = 'mount --bind "$D" "$D" && mount -o remount,bind,ro "$D" && exec "$@"'
    root = [] if os.geteuid() == 0 else ["--map-root-user"]
    result = subprocess.run(
        ["unshare", "--mount", *root, "sh", "-c", script, "sh", sys.executable, "-m",
         "daemon.cli", "-c", str(box.config_path), "doctor", "--user", "nobody"],
        capture_output=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "D": str(box.dir)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    (line,) = problems(lines, "database")
    assert f"{box.database} is on a file system mounted read-only ({box.dir})" in line
    assert f"mount -o remount,rw {box.dir}" in line
    assert "chown" not in line and "chmod" not in line


def test_a_missing_fifo_says_who_makes_it_not_to_plug_a_scanner_in(loaded_box):
    fifo = loaded_box.dir / "codes.fifo"
    box = add(fresh(loaded_box), f'\n[[scanner]]\ntype = "stdin"\nname = "pos"\npath = "{fifo}"\n')
    _, lines = doctor_lines(box, "--user", ME)
    (line,) = problems(lines, "scanner pos")
    assert f"{fifo} does not exist: a FIFO is made by the program that writes codes" in line
    assert "plug" not in line
    os.mkfifo(fifo, 0o600)
    _, lines = doctor_lines(box, "--user", ME)
    assert f"ok       scanner pos: {fifo} (stdin) read/write" in lines


def sync_config(broker_url: str) -> str:
    return f'\n[sync]\nenabled = true\nbroker = "{broker_url}"\n'


def test_a_reachable_broker_passes_and_a_closed_port_is_a_problem(loaded_box, broker):
    fresh(loaded_box)
    text = loaded_box.config_path.read_text()
    add(loaded_box, sync_config(broker.url))
    code, lines = doctor_lines(loaded_box, "--user", ME)
    assert not problems(lines, "sync"), lines
    assert f"ok       sync: broker 127.0.0.1:{broker.port} reachable" in lines
    assert "ok       sync: broker accepted the MQTT login (anonymous)" in lines
    port = free_port()  # nothing listens there: a real refused connection
    loaded_box.config_path.write_text(text + sync_config(f"mqtt://127.0.0.1:{port}"))
    code, lines = doctor_lines(loaded_box, "--user", ME)
    assert code == 1
    (line,) = problems(lines, "sync")
    assert f"cannot reach the broker at 127.0.0.1:{port} (Connection refused)" in line


def test_tls_broker_with_the_right_ca_the_wrong_ca_and_unreadable_files(
    tmp_path, keyset, tls_broker
):
    box = fresh(tls_box(tmp_path / "box", keyset, tls_broker))
    code, lines = doctor_lines(box, "--user", ME)
    assert f"ok       sync: broker 127.0.0.1:{tls_broker.port} reachable over TLS" in lines
    assert "ok       sync: broker accepted the MQTT login as box-1" in lines
    other = Authority(tmp_path / "other", name="someone else's CA")
    wrong = fresh(tls_box(tmp_path / "wrong", keyset, tls_broker, ca=other.ca_file))
    _, lines = doctor_lines(wrong, "--user", ME)
    (line,) = problems(lines, "sync")
    assert "TLS with the broker" in line and "certificate verify failed" in line
    assert "ca_file" in line
    key_file = Path(box.config.sync.key_file)
    key_file.chmod(0o600)
    _, lines = doctor_lines(box, "--user", "nobody")
    assert any(
        f"[sync] key_file: {key_file} (-rw------- root:root): user nobody cannot read it" in p
        for p in problems(lines, "secrets")
    )
    key_file.write_text("not a key\n")
    _, lines = doctor_lines(box, "--user", ME)
    assert any("TLS files unusable" in p for p in problems(lines, "sync"))


def test_a_wrong_mqtt_password_is_a_problem_that_names_the_key(tmp_path, keyset, tls_broker):
    box = fresh(tls_box(tmp_path / "box", keyset, tls_broker, password="wrong"))
    code, lines = doctor_lines(box, "--user", ME)
    assert code == 1
    (line,) = problems(lines, "sync")
    assert "refused the login" in line and "password_file" in line


def test_too_little_free_disk_is_a_problem(loaded_box):
    fresh(loaded_box)
    code, lines = doctor_lines(loaded_box, "--user", ME, "--min-free", str(1 << 40))  # 1 EB
    assert code == 1
    (line,) = problems(lines, "disk")
    assert line.startswith("problem  disk: only") and "storage_error" in line


def test_an_unknown_user_is_one_line(loaded_box):
    result = loaded_box.cli("doctor", "--user", "no-such-user-here")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "redeemd: --user no-such-user-here: no such user"


def test_doctor_as_root_leaves_the_database_files_to_their_owner(loaded_box):
    fresh(loaded_box)
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() == 0:
        for path in [loaded_box.dir, *loaded_box.dir.glob("redeemd.db*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    doctor_lines(loaded_box, "--user", ME)
    owner = loaded_box.database.stat()
    for path in loaded_box.dir.glob("redeemd.db-*"):  # a reader makes -wal and -shm
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (owner.st_uid, owner.st_gid), path


def test_a_camera_scanner_without_ffmpeg_is_a_problem_saying_what_to_install(loaded_box):
    add(
        loaded_box,
        '\n[[scanner]]\ntype = "camera"\nname = "cam"\ndevice = "/dev/null"\n'
        'ffmpeg = "/nonexistent/ffmpeg"\n',
    )
    _, lines = doctor_lines(loaded_box, "--user", ME)
    [line] = [line for line in problems(lines) if "scanner cam" in line]
    assert "ffmpeg not found" in line and "apt install ffmpeg" in line


def test_doctor_says_what_stops_a_box_from_dispensing(loaded_box):
    """A rule with no box key, then no grant for its card, then a grant almost used up:
    each is a problem line that says what to do; a box that dispenses nothing gets no
    dispensing line at all."""
    from cards import grant as grants
    from cards import keys as keys_mod
    from daemon import box_key
    from storage import dispensing

    box = fresh(loaded_box)
    _, lines = doctor_lines(box)
    assert not [line for line in lines if "dispensing:" in line]

    add(box, '\n[dispense]\nclaim_url = "https://claim.example.com/c/"\n'
             "[[dispense.rules]]\nafter_card = 1\ncard = 1\n")  # fmt: skip
    _, lines = doctor_lines(box)
    [line] = problems(lines, "dispensing")
    assert "no key yet" in line and "redeemd box-key" in line

    key = box_key.load_or_create(box.dir)
    _, lines = doctor_lines(box)
    [line] = problems(lines, "dispensing")
    assert key.key_id in line and "grant add" in line

    now = int(time.time())
    data = grants.build(
        box.keyset.issuer_private, box.keyset.delegation, merchant="demo", box="box-1",
        box_public=keys_mod.public_of(key.private), seq=1, created_at=now - 10,
        grants=(grants.Grant("00000000000000c1", (1,), 10, now - 10, now + 3600),),
    )  # fmt: skip
    conn = open_database(box.dir / "redeemd.db")
    try:
        dispensing.install_grants(
            conn, data, box.keyset.roots, merchant="demo", box="box-1", box_key_id=key.key_id
        )
    finally:
        conn.close()
    code, lines = doctor_lines(box)
    assert problems(lines, "dispensing") == [], lines
    assert any(line.startswith("ok       dispensing: box key") for line in lines), lines
    from daemon import config as config_mod
    from daemon.engine import Engine

    conn = open_database(box.dir / "redeemd.db")
    try:
        dispensed = Engine(conn, config_mod.load(str(box.config_path))).dispense(1, 9, key)
        assert len(dispensed.claims) == 9
    finally:
        conn.close()
    _, lines = doctor_lines(box)
    [line] = problems(lines, "dispensing")
    assert "1 of 10 claim codes left" in line and "raise its quota" in line
