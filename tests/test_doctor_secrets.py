"""`redeemd doctor` on the box's secrets (issue 17.5): the config, the code key, the root
keys, the MQTT password file and the TLS key, on real files with real owners and modes.

The service account is a throwaway uid and gid that no file on this machine belongs to
(no passwd entry needed: doctor judges it from owner, group and mode bits, as it judges
`redeemd` when root runs it). Giving files to another user needs root, as the tests
run. Each fix doctor prints is then run as printed, and doctor must be content.
"""

# ruff: noqa: F811  (fixtures are imported, then named as parameters)
from __future__ import annotations

import os
import pickle

import pytest
from broker import free_port
from conftest import ROOT, Box
from test_doctor import add, doctor_lines, follow, fresh, problems, tmp_path  # noqa: F401
from test_sync_tls import Authority

from daemon import doctor


@pytest.fixture(autouse=True)
def _root() -> None:
    # Not a skip: without root these checks of the service's access would not run at all.
    if os.geteuid() != 0:
        pytest.fail(
            "tests/test_doctor_secrets.py gives files to another user (chown): run ./dev test as root"
        )


UID, GID = 4242, 4343  # nobody on this machine
SERVICE = doctor.Account("svc", UID, GID, frozenset({GID}))


def installed(box: Box) -> Box:
    """The box's keys and config as systemd/tmpfiles.d/redeemd.conf lays them out: root
    writes, the service's group reads, nobody else; the keys' directory 0750."""
    fresh(box)
    keys = box.dir / "keys"
    for path, mode in [(keys, 0o750), *((p, 0o640) for p in keys.iterdir()),
                       (box.config_path, 0o640)]:  # fmt: skip
        os.chown(path, 0, GID)
        path.chmod(mode)
    return box


def secret_problems(box: Box, account: doctor.Account = SERVICE) -> list[str]:
    findings = doctor.check(str(box.config_path), account=account)
    return [f.line() for f in findings if f.check == "secrets" and not f.ok]


def fixed(box: Box, line: str, account: doctor.Account = SERVICE) -> list[str]:
    """Run the fix `line` ends with, and what doctor says then."""
    follow(line)
    return secret_problems(box, account)


def test_keys_and_config_laid_out_as_tmpfiles_says_pass(box):
    installed(box)
    findings = doctor.check(str(box.config_path), account=SERVICE)
    (secrets,) = [f for f in findings if f.check == "secrets"]
    assert secrets.ok, secrets
    assert "3 key and config file(s) readable by svc, not changeable by it" in secrets.message


def test_a_world_readable_code_key_is_a_problem_with_its_fix(box):
    installed(box)
    key = box.dir / "keys" / "code.key"
    key.chmod(0o644)
    (line,) = secret_problems(box)
    assert f"[trust] code_key_file: {key} (-rw-r--r-- root:{GID}): it is open to every user" in line
    assert line.endswith(f": chmod 0640 {key}")
    assert fixed(box, line) == []


def test_a_code_key_the_service_cannot_read_is_a_problem_with_its_fix(box):
    installed(box)
    key = box.dir / "keys" / "code.key"
    os.chown(key, 0, 0)
    key.chmod(0o600)  # what the tmpfiles rule left on Debian 12 (issue 17.3)
    (line,) = secret_problems(box)
    assert f"{key} (-rw------- root:root): user svc cannot read it, so redeemd cannot start" in line
    assert line.endswith(f": chown root:{GID} {key} && chmod 0640 {key}")
    assert fixed(box, line) == []


def test_a_world_readable_config_is_a_problem_with_its_fix(box):
    installed(box)
    os.chown(box.config_path, 0, 0)
    box.config_path.chmod(0o644)
    (line,) = secret_problems(box)
    assert f"config: {box.config_path} (-rw-r--r-- root:root): it is open to every user" in line
    assert line.endswith(f": chown root:{GID} {box.config_path} && chmod 0640 {box.config_path}")
    assert fixed(box, line) == []


def test_a_world_readable_mqtt_password_and_tls_key_are_problems_with_their_fixes(box):
    installed(box)
    authority = Authority(box.dir / "tls")
    cert_file, key_file = authority.issue("box-1")
    password_file = box.dir / "mqtt.password"
    password_file.write_text("secret\n")
    add(box, f'\n[sync]\nenabled = true\nbroker = "mqtts://127.0.0.1:{free_port()}"\n'
             f'username = "box-1"\npassword_file = "{password_file}"\n'
             f'ca_file = "{authority.ca_file}"\ncert_file = "{cert_file}"\n'
             f'key_file = "{key_file}"\n')  # fmt: skip
    for path in (authority.dir, authority.ca_file, cert_file):
        path.chmod(path.stat().st_mode | 0o005)  # public: the service reads them as other
    password_file.chmod(0o644)
    key_file.chmod(0o644)
    lines = secret_problems(box)
    (password,) = [p for p in lines if "[sync] password_file" in p]
    (key,) = [p for p in lines if "[sync] key_file" in p]
    for line, path in ((password, password_file), (key, key_file)):
        assert f"{path} (-rw-r--r-- root:root): it is open to every user" in line
        assert line.endswith(f": chown root:{GID} {path} && chmod 0640 {path}")
        follow(line)
    assert secret_problems(box) == []


def test_every_reason_for_one_file_is_one_line_with_one_fix(box):
    installed(box)
    key = box.dir / "keys" / "code.key"
    os.chown(key, UID, 0)
    key.chmod(0o604)  # the service owns it, its group cannot read, everyone else can
    (line,) = secret_problems(box)
    assert f"{key} (-rw----r-- {UID}:root): it is open to every user of the box; " in line
    assert "; user svc can change it, so whoever takes over the daemon" in line
    assert line.endswith(f": chown root:{GID} {key} && chmod 0640 {key}")
    assert fixed(box, line) == []


def test_a_key_the_service_owns_is_a_problem_it_could_rewrite(box):
    installed(box)
    key = box.dir / "keys" / "root.pub"
    os.chown(key, UID, GID)
    (line,) = secret_problems(box)
    assert f"[trust] root_key_files: {key} (-rw-r----- {UID}:{GID}): user svc can change it" in line
    assert line.endswith(f": chown root:{GID} {key}")
    assert fixed(box, line) == []


def test_keys_in_a_directory_the_service_owns_can_be_replaced_and_get_the_chown(box):
    """Whatever the files' own modes, the service owning their directory can rename
    them aside and put its own root.pub in place."""
    installed(box)
    keys = box.dir / "keys"
    os.chown(keys, UID, GID)
    lines = secret_problems(box)
    assert len(lines) == 2  # code.key and root.pub
    for line in lines:
        assert f"user svc can replace {keys}/" in line
        assert f"it may write to {keys} (drwxr-x--- {UID}:{GID})" in line
        assert line.endswith(f": chown root:{GID} {keys} && chmod 0750 {keys}")
    follow(lines[0])
    assert secret_problems(box) == []


def test_keys_and_config_in_the_state_directory_say_to_move_them_out(box, monkeypatch):
    """Issue 17.4's layout: keys under the state directory, which the service owns and
    must keep writing its database in, so the keys must move, not the directory."""
    monkeypatch.delenv("CONFIGURATION_DIRECTORY", raising=False)  # {config_dir}: /etc/redeemd
    installed(box)
    os.chown(box.dir, UID, GID)  # box.dir is the state directory
    lines = secret_problems(box)
    assert len(lines) == 3  # the config, code.key and root.pub
    assert all(f"it may write to {box.dir} (drwx--x--x {UID}:{GID})" in line for line in lines)
    (config,) = [line for line in lines if "secrets: config:" in line]
    assert f"install -d -o root -g {GID} -m 0750 /etc/redeemd and move it to " in config
    assert "/etc/redeemd/config.toml, which redeemd reads without -c" in config
    for line in (line for line in lines if "[trust]" in line):
        assert f"install -d -o root -g {GID} -m 0750 /etc/redeemd/keys, move it there" in line


def test_a_key_named_through_a_symlink_in_a_directory_the_service_owns_can_be_replaced(box):
    """The key itself is root's, but the link to it sits where the service can swap it."""
    installed(box)
    links = box.dir / "state"
    links.mkdir()
    os.chown(links, UID, GID)
    key = box.dir / "keys" / "code.key"
    (links / "code.key").symlink_to(key)
    text = box.config_path.read_text().replace(f'code_key_file = "{key}"',
                                               f'code_key_file = "{links}/code.key"')  # fmt: skip
    box.config_path.write_text(text)
    (line,) = secret_problems(box)
    assert f"user svc can replace {links}/code.key: it may write to {links} " in line


def test_keys_in_a_group_writable_directory_can_be_replaced(box):
    installed(box)
    keys = box.dir / "keys"
    keys.chmod(0o770)
    lines = secret_problems(box)
    assert lines and all(line.endswith(f": chmod go-w {keys}") for line in lines)
    follow(lines[0])
    assert secret_problems(box) == []


def test_a_keys_directory_the_service_cannot_enter_is_a_problem_with_its_fix(box):
    installed(box)
    keys = box.dir / "keys"
    os.chown(keys, 0, 0)
    keys.chmod(0o700)
    lines = secret_problems(box)
    assert len(lines) == 2
    for line in lines:
        assert f"it may not enter {keys} (drwx------ root:root)" in line
        assert line.endswith(f": chown root:{GID} {keys} && chmod 0750 {keys}")
    follow(lines[0])
    assert secret_problems(box) == []


def test_doctor_for_yourself_or_root_asks_only_that_secrets_are_hidden(box):
    """A developer's demo or a daemon run as root: the files are its own, so only the
    others' access is a problem, fixed without changing the owner."""
    fresh(box)
    key = box.dir / "keys" / "code.key"
    key.chmod(0o644)
    me = doctor.Account.named("root")
    (line,) = secret_problems(box, me)
    assert line.endswith(f": chmod o-rwx {key}")
    assert fixed(box, line, me) == []


def test_the_cli_flags_a_world_readable_code_key_for_the_service_user(box):
    installed(box)
    key = box.dir / "keys" / "code.key"
    for path in (box.config_path, box.dir / "keys", *(box.dir / "keys").iterdir()):
        os.chown(path, 0, 65534)  # nogroup, the group of `nobody`
    key.chmod(0o644)
    code, lines = doctor_lines(box, "--user", "nobody")
    assert code == 1
    (line,) = problems(lines, "secrets")
    assert f"{key} (-rw-r--r-- root:nogroup): it is open to every user of the box" in line
    assert line.endswith(f": chmod 0640 {key}")


def test_doctor_run_as_the_service_user_itself_says_which_key_it_cannot_read(box):
    """Doctor running as the service's uid asks the kernel (os.access); the config cannot
    even be loaded without the code key, and the line says which file and the fix."""
    installed(box)
    key = box.dir / "keys" / "code.key"
    os.chown(key, 0, 0)
    key.chmod(0o600)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes the service user and runs doctor's checks
        try:
            os.setgroups([GID])
            os.setgid(GID)
            os.setuid(UID)
            findings = doctor.check(str(box.config_path))
            os.write(write, pickle.dumps([f.line() for f in findings]))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        lines = pickle.loads(pipe.read())
    os.waitpid(pid, 0)
    (line,) = problems(lines, "config")
    assert f"user {UID} cannot read {key} (-rw------- root:root), so redeemd cannot start" in line
    assert line.endswith(f"as root, chown root:{GID} {key} && chmod 0640 {key}")


def test_doctor_expects_the_modes_the_tmpfiles_rules_set():
    """One source of truth: every root-owned path of group redeemd in the shipped tmpfiles
    rules has the modes doctor's fixes give."""
    rules = (ROOT / "systemd" / "tmpfiles.d" / "redeemd.conf").read_text()
    checked = 0
    for line in rules.splitlines():
        fields = line.split()
        if not fields or line.startswith("#") or fields[3:5] != ["root", "redeemd"]:
            continue
        kind, mode = fields[0], int(fields[2], 8)
        expected = doctor.SECRET_DIR_MODE if kind == "d" else doctor.SECRET_MODE
        assert mode == expected, line
        checked += 1
    assert checked >= 3
