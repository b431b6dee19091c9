"""`redeemd doctor` against real files: a real database (and a damaged one), a real
pseudo-terminal as the serial scanner, a real Mosquitto (plain and TLS), a port
nobody listens on, and the real free space of the test's disk.

Permissions are judged for another account (`--user nobody`), so the tests mean the
same whether they run as root or not.
"""

# ruff: noqa: F811  (fixtures are imported, then named as parameters)
from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from broker import broker, free_port  # noqa: F401  (fixture)
from conftest import CREATED, Box, write_box
from test_sync_tls import Authority, tls_box, tls_broker  # noqa: F401  (fixture)

from daemon import doctor
from storage.database import open_database

ME = pwd.getpwuid(os.geteuid()).pw_name


def fresh(box: Box, extra_trust: str = 'max_staleness = "3650d"') -> Box:
    """The box's config with [trust] keys added (write_box writes [trust] itself)."""
    text = box.config_path.read_text().replace("[trust]\n", f"[trust]\n{extra_trust}\n", 1)
    box.config_path.write_text(text)
    return box


def add(box: Box, text: str) -> Box:
    box.config_path.write_text(box.config_path.read_text() + text)
    return box


def doctor_lines(box: Box, *args: str) -> tuple[int, list[str]]:
    result = box.cli("doctor", *args)
    out = result.stdout.decode()
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()
    return result.returncode, out.splitlines()


def problems(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("problem")]


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


def test_a_healthy_box_passes_every_check(loaded_box, pty_port):
    box = add(fresh(loaded_box), serial("counter", pty_port))
    code, lines = doctor_lines(box, "--user", ME)
    assert code == 0, lines
    assert lines[-1] == "all checks ok"
    checks = {line.split()[1].rstrip(":") for line in lines[:-1]}
    assert {"config", "database", "clock", "cache", "scanner", "sync", "disk"} <= checks
    assert any(f"{pty_port} (serial) read/write" in line for line in lines)


def test_a_config_error_is_a_problem_naming_the_key(box):
    add(box, '\n[sync]\nbroker = "http://nowhere"\n')
    code, lines = doctor_lines(box)
    assert code == 1
    (line,) = problems(lines)
    assert "[sync] broker" in line and "redeemd check-config" in line


def test_no_database_yet_says_how_to_get_one(box):
    code, lines = doctor_lines(box, "--user", ME)
    assert code == 1
    assert any("no database" in p and "redeemd import" in p for p in problems(lines))


def test_a_damaged_database_says_restore_from_backup(loaded_box):
    fresh(loaded_box)
    data = bytearray(loaded_box.database.read_bytes())
    assert len(data) > 3 * 4096
    data[4096 : len(data) - 4096] = b"\xa5" * (len(data) - 2 * 4096)
    loaded_box.database.write_bytes(bytes(data))
    code, lines = doctor_lines(loaded_box, "--user", ME)
    assert code == 1
    (line,) = [p for p in problems(lines) if "database" in p]
    assert "damaged" in line and "restore" in line


def test_a_stale_cache_and_an_empty_one_are_problems(loaded_box, tmp_path, keyset):
    code, lines = doctor_lines(loaded_box, "--user", ME)  # batches from CREATED, 7d allowed
    assert code == 1
    (line,) = problems(lines)
    assert line.startswith("problem  cache:") and "max_staleness (7.0d)" in line
    empty = fresh(write_box(tmp_path / "empty", keyset))
    open_database(empty.database).close()
    code, lines = doctor_lines(empty, "--user", ME)
    (line,) = problems(lines)
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
    found = problems(lines)
    (counter,) = [p for p in found if "scanner counter" in p]
    assert f"user nobody cannot read and write {pty_port} (crw-------" in counter
    assert "usermod -aG dialout nobody" in counter
    (gone,) = [p for p in found if "scanner gone" in p]
    assert "/dev/ttyNOPE9 does not exist" in gone and "redeemd devices" in gone
    assert any(f"user nobody cannot write {box.database}" in p and "chown" in p for p in found)
    pty_port.chmod(0o666)
    box.dir.chmod(0o777)
    for path in box.dir.glob("redeemd.db*"):  # -wal and -shm too, if a reader left them
        path.chmod(0o666)
    _, lines = doctor_lines(box, "--user", "nobody")
    assert not [p for p in problems(lines) if "scanner counter" in p or str(box.database) in p]


def sync_config(broker_url: str) -> str:
    return f'\n[sync]\nenabled = true\nbroker = "{broker_url}"\n'


def test_a_reachable_broker_passes_and_a_closed_port_is_a_problem(loaded_box, broker):
    fresh(loaded_box)
    text = loaded_box.config_path.read_text()
    add(loaded_box, sync_config(broker.url))
    code, lines = doctor_lines(loaded_box, "--user", ME)
    assert code == 0, lines
    assert f"ok       sync: broker 127.0.0.1:{broker.port} reachable" in lines
    assert "ok       sync: broker accepted the MQTT login (anonymous)" in lines
    port = free_port()  # nothing listens there: a real refused connection
    loaded_box.config_path.write_text(text + sync_config(f"mqtt://127.0.0.1:{port}"))
    code, lines = doctor_lines(loaded_box, "--user", ME)
    assert code == 1
    (line,) = problems(lines)
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
    (line,) = [p for p in problems(lines) if "sync" in p]
    assert "TLS with the broker" in line and "certificate verify failed" in line
    assert "ca_file" in line
    key_file = Path(box.config.sync.key_file)
    key_file.chmod(0o600)
    _, lines = doctor_lines(box, "--user", "nobody")
    assert any(f"[sync] key_file: user nobody cannot read {key_file}" in p for p in problems(lines))
    key_file.write_text("not a key\n")
    _, lines = doctor_lines(box, "--user", ME)
    assert any("TLS files unusable" in p for p in problems(lines))


def test_a_wrong_mqtt_password_is_a_problem_that_names_the_key(tmp_path, keyset, tls_broker):
    box = fresh(tls_box(tmp_path / "box", keyset, tls_broker, password="wrong"))
    code, lines = doctor_lines(box, "--user", ME)
    assert code == 1
    (line,) = [p for p in problems(lines) if "sync" in p]
    assert "refused the login" in line and "password_file" in line


def test_too_little_free_disk_is_a_problem(loaded_box):
    fresh(loaded_box)
    code, lines = doctor_lines(loaded_box, "--user", ME, "--min-free", str(1 << 40))  # 1 EB
    assert code == 1
    (line,) = problems(lines)
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
