"""`redeemd devices`: finding scanners on a box and printing config snippets for them.

This machine has no /dev/input, no cameras and no USB serial ports, so most tests build
a fake /dev and /sys tree the way the kernel and udev lay them out (by-id links pointing
at device nodes, sysfs attribute files) and point `root` at it. Serial ports come from
pyserial, which only reads the real machine, so the tests hand discovery pyserial's own
`ListPortInfo` objects, filled in as pyserial fills them for a USB scanner; the device
node behind them is a real pseudo-terminal. The real `redeemd devices` runs once
against this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import serial
from conftest import ROOT, write_box
from serial.tools.list_ports_common import ListPortInfo

from daemon import config as config_mod
from drivers import discovery
from drivers.discovery import SCANNER_VENDORS, describe_devices, list_devices

RULES = ROOT / "systemd" / "60-redeemd-scanners.rules"

# sysfs capabilities/key bitmaps as a 64-bit kernel prints them (most significant first).
KEYBOARD_KEYS = "1000000000007 ff9f207ac14057ff febeffdfffefffff fffffffffffffffe"
POWER_BUTTON_KEYS = "10000000000000 0"  # KEY_POWER (116) only
MOUSE_KEYS = "1f0000 0 0 0 0"  # BTN_LEFT .. BTN_EXTRA (272-276)

HONEYWELL_BY_ID = "usb-Honeywell_Imaging___Mobility_1900_18012B4523-if00"


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n" if text else "")


def add_input(root: Path, node: str, name: str, vendor: str, product: str, keys: str) -> None:
    write(root / "dev/input" / node)
    sysfs = root / "sys/class/input" / node / "device"
    write(sysfs / "name", name)
    write(sysfs / "id/vendor", vendor)
    write(sysfs / "id/product", product)
    write(sysfs / "capabilities/key", keys)


def add_camera(root: Path, node: str, name: str, index: int) -> None:
    write(root / "dev" / node)
    write(root / "sys/class/video4linux" / node / "name", name)
    write(root / "sys/class/video4linux" / node / "index", str(index))


def honeywell_port(device: str = "/dev/ttyACM0") -> ListPortInfo:
    """What pyserial reports for a Honeywell 1900 in USB serial (CDC-ACM) mode."""
    port = ListPortInfo(device)
    port.vid, port.pid = 0x0C2E, 0x0B6A
    port.manufacturer, port.product = "Honeywell Imaging & Mobility", "1900"
    port.serial_number = "18012B4523"
    port.apply_usb_info()
    return port


def ftdi_port(device: str = "/dev/ttyUSB0") -> ListPortInfo:
    port = ListPortInfo(device)
    port.vid, port.pid = 0x0403, 0x6001
    port.manufacturer, port.product = "FTDI", "FT232R USB UART"
    port.apply_usb_info()
    return port


def box_tree(root: Path, pty_slave: str) -> None:
    """A box with a serial Honeywell, a keyboard-mode Zebra, a keyboard, a mouse,
    a power button and a webcam (capture node and metadata node)."""
    link(root / "dev/ttyACM0", pty_slave)  # the device node is a real pseudo-terminal
    link(root / "dev/serial/by-id" / HONEYWELL_BY_ID, "../../ttyACM0")
    link(root / "dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0", "../../ttyACM0")
    link(root / "dev/scanner-honeywell-tty", "ttyACM0")
    write(root / "dev/ttyUSB0")
    add_input(root, "event0", "Power Button", "0000", "0001", POWER_BUTTON_KEYS)
    add_input(root, "event1", "Logitech USB Optical Mouse", "046d", "c077", MOUSE_KEYS)
    add_input(root, "event2", "Dell KB216 Wired Keyboard", "413c", "2113", KEYBOARD_KEYS)
    add_input(root, "event3", "Symbol Bar Code Scanner", "05e0", "1200", KEYBOARD_KEYS)
    by_id = root / "dev/input/by-id"
    link(by_id / "usb-Dell_KB216_Wired_Keyboard-event-kbd", "../event2")
    link(by_id / "usb-Symbol_Technologies__Inc__2008_Symbol_Bar_Code_Scanner_S4-event-kbd", "../event3")  # fmt: skip
    link(by_id / "usb-Logitech_USB_Optical_Mouse-event-mouse", "../event1")
    add_camera(root, "video0", "HD Pro Webcam C920", 0)
    add_camera(root, "video1", "HD Pro Webcam C920", 1)
    link(root / "dev/v4l/by-id/usb-046d_HD_Pro_Webcam_C920_8F2D-video-index0", "../../video0")
    link(root / "dev/v4l/by-id/usb-046d_HD_Pro_Webcam_C920_8F2D-video-index1", "../../video1")


def pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    return master, slave, os.ttyname(slave)


def by_path(devices: list[discovery.Device]) -> dict[str, discovery.Device]:
    return {d.path: d for d in devices}


# ---------------------------------------------------------------- serial ports


def test_serial_scanner_of_known_vendor_is_hinted_and_named_by_its_by_id_link(tmp_path):
    master, slave, slave_name = pty()
    try:
        box_tree(tmp_path, slave_name)
        devices = by_path(list_devices(str(tmp_path), [honeywell_port()]))
        scanner = devices["/dev/ttyACM0"]
        assert scanner.looks_like_scanner
        assert "0c2e" in scanner.scanner_reason and "Honeywell" in scanner.scanner_reason
        assert scanner.stable_path == "/dev/serial/by-id/" + HONEYWELL_BY_ID
        assert scanner.aliases == ("/dev/scanner-honeywell-tty",)
        assert scanner.config_name == "honeywell"
        assert f'port = "/dev/serial/by-id/{HONEYWELL_BY_ID}"' in scanner.snippet()
        text = describe_devices(str(tmp_path), [honeywell_port()])
        assert "Honeywell Imaging & Mobility 1900  [0c2e:0b6a, serial 18012B4523]" in text
        assert "Scanners found: 2 (honeywell, zebra)" in text
    finally:
        os.close(master)
        os.close(slave)


def test_the_stable_path_in_the_snippet_opens_the_scanners_port(tmp_path):
    master, slave, slave_name = pty()
    try:
        box_tree(tmp_path, slave_name)
        (scanner,) = [d for d in list_devices(str(tmp_path), [honeywell_port()]) if d.type == "serial"]  # fmt: skip
        with serial.Serial(str(tmp_path) + scanner.config_path, timeout=10) as port:
            os.write(master, b"DEMO-0001\r\n")
            assert port.readline() == b"DEMO-0001\r\n"
    finally:
        os.close(master)
        os.close(slave)


def test_serial_port_of_unknown_vendor_is_listed_without_a_hint(tmp_path):
    write(tmp_path / "dev/ttyUSB0")
    (device,) = list_devices(str(tmp_path), [ftdi_port()])
    assert not device.looks_like_scanner
    assert device.description == "FTDI FT232R USB UART"
    assert device.stable_path is None
    assert 'port = "/dev/ttyUSB0"' in device.snippet()
    text = describe_devices(str(tmp_path), [ftdi_port()])
    assert "no stable link" in text
    assert "No scanner found" in text


def test_scanner_behind_a_generic_usb_chip_is_recognised_by_its_name(tmp_path):
    port = ListPortInfo("/dev/ttyACM1")
    port.vid, port.pid = 0x04B4, 0x0100  # Cypress: Cino's FuzzyScan uses its vendor id
    port.manufacturer, port.product = "Cino", "FuzzyScan Barcode Scanner"
    port.apply_usb_info()
    (device,) = list_devices(str(tmp_path), [port])
    assert device.looks_like_scanner
    assert device.scanner_reason.startswith("its name contains")


def test_built_in_rs232_port_gets_a_snippet_with_a_baudrate_reminder(tmp_path):
    write(tmp_path / "dev/ttyS0")
    port = ListPortInfo("/dev/ttyS0")  # pyserial's "n/a" port: no USB ids
    (device,) = list_devices(str(tmp_path), [port])
    assert device.description == "serial port"
    assert "baudrate = 9600" in device.snippet()
    assert "no stable link" not in describe_devices(str(tmp_path), [port])


# ---------------------------------------------------------------- input devices


def test_keyboard_wedge_scanner_is_found_through_its_input_by_id_link(tmp_path):
    master, slave, slave_name = pty()
    try:
        box_tree(tmp_path, slave_name)
        devices = by_path(list_devices(str(tmp_path)))
    finally:
        os.close(master)
        os.close(slave)
    zebra = devices["/dev/input/event3"]
    assert zebra.type == "hid"
    assert zebra.ids == "05e0:1200"
    assert zebra.description == "Symbol Bar Code Scanner"
    assert zebra.looks_like_scanner and "Zebra" in zebra.scanner_reason
    assert zebra.stable_path == (
        "/dev/input/by-id/usb-Symbol_Technologies__Inc__2008_Symbol_Bar_Code_Scanner_S4-event-kbd"
    )
    assert f'device = "{zebra.stable_path}"' in zebra.snippet()
    keyboard = devices["/dev/input/event2"]
    assert not keyboard.looks_like_scanner  # listed, since a plain-named wedge looks the same


def test_keyboard_without_a_by_id_link_is_configured_by_vendor_and_product(tmp_path):
    add_input(tmp_path, "event9", "Newland HR200", "1eab", "0103", KEYBOARD_KEYS)
    (device,) = list_devices(str(tmp_path))
    assert device.stable_path is None
    assert 'device = "1eab:0103"' in device.snippet()


def test_mice_and_buttons_are_not_offered_as_scanners(tmp_path):
    add_input(tmp_path, "event0", "Power Button", "0000", "0001", POWER_BUTTON_KEYS)
    add_input(tmp_path, "event1", "Logitech USB Optical Mouse", "046d", "c077", MOUSE_KEYS)
    assert list_devices(str(tmp_path)) == []
    text = describe_devices(str(tmp_path))
    assert "2 other input devices" in text
    assert "Power Button" not in text


def test_input_device_without_sysfs_information_is_still_shown(tmp_path):
    write(tmp_path / "dev/input/event7")  # not an evdev node: evdev refuses it too
    (device,) = list_devices(str(tmp_path))
    assert device.path == "/dev/input/event7"
    assert device.description == "input device"
    assert 'device = "/dev/input/event7"' in device.snippet()


def test_unreadable_input_device_gets_a_note_about_the_input_group():
    # Root reads any file, so the listing runs in a child that drops to `nobody`; the
    # tree lives outside pytest's private tmp directory so that user can walk it.
    tree = Path(tempfile.mkdtemp(prefix="redeemd-devices-"))
    try:
        tree.chmod(0o755)
        add_input(tree, "event3", "Symbol Bar Code Scanner", "05e0", "1200", KEYBOARD_KEYS)
        (tree / "dev/input/event3").chmod(0o000)
        child = (
            "import os, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from drivers.discovery import describe_devices\n"
            "if os.geteuid() == 0:\n"
            "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "print(describe_devices(sys.argv[1]))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", child, str(tree)], capture_output=True, text=True, timeout=60
        )
    finally:
        shutil.rmtree(tree)
    assert result.returncode == 0, result.stderr
    assert "NOTE: permission denied: the user needs the `input` group" in result.stdout
    assert "Fix the notes above first" in result.stdout


# ---------------------------------------------------------------- cameras


def test_camera_is_listed_with_its_v4l2_name_and_metadata_node_has_no_snippet(tmp_path):
    master, slave, slave_name = pty()
    try:
        box_tree(tmp_path, slave_name)
        devices = by_path(list_devices(str(tmp_path)))
    finally:
        os.close(master)
        os.close(slave)
    camera, metadata = devices["/dev/video0"], devices["/dev/video1"]
    assert camera.description == "HD Pro Webcam C920"
    assert camera.stable_path == "/dev/v4l/by-id/usb-046d_HD_Pro_Webcam_C920_8F2D-video-index0"
    assert camera.usable and not camera.looks_like_scanner
    assert not metadata.usable and "metadata" in metadata.note
    text = describe_devices(str(tmp_path))
    assert text.count('type = "camera"') == 2  # the section title and video0's snippet


# ---------------------------------------------------------------- snippets


def test_every_snippet_parses_with_the_config_parser(tmp_path, keyset):
    master, slave, slave_name = pty()
    try:
        tree = tmp_path / "tree"
        box_tree(tree, slave_name)
        ports = [honeywell_port(), honeywell_port("/dev/ttyACM5"), ftdi_port()]
        devices = [d for d in list_devices(str(tree), ports) if d.usable]
    finally:
        os.close(master)
        os.close(slave)
    snippets = "\n".join(d.snippet() for d in devices)
    box = write_box(tmp_path / "box", keyset, extra=snippets)
    config = config_mod.load(str(box.config_path))
    parsed = {(s.type, s.name, getattr(s.settings, "port", None) or getattr(s.settings, "device", None)) for s in config.scanners}  # fmt: skip
    assert parsed == {(d.type, d.config_name, d.config_path) for d in devices}
    names = [s.name for s in config.scanners]
    assert "honeywell" in names and "honeywell-2" in names


def test_the_printed_snippets_parse_as_the_technician_would_paste_them(tmp_path, keyset):
    master, slave, slave_name = pty()
    try:
        tree = tmp_path / "tree"
        box_tree(tree, slave_name)
        text = describe_devices(str(tree), [honeywell_port()])
    finally:
        os.close(master)
        os.close(slave)
    blocks = re.findall(r"^\[\[scanner\]\]\n(?:\S.*\n?)+", text, re.MULTILINE)
    assert len(blocks) == 4  # honeywell, the keyboard, zebra, the camera
    box = write_box(tmp_path / "box", keyset, extra="\n".join(blocks))
    assert len(config_mod.load(str(box.config_path)).scanners) == 4


def test_paths_with_quotes_and_backslashes_are_escaped_in_snippets(tmp_path, keyset):
    odd = 'usb-ACME_"Scan\\er"_01-event-kbd'
    add_input(tmp_path, "event4", "ACME Scanner", "1234", "5678", KEYBOARD_KEYS)
    link(tmp_path / "dev/input/by-id" / odd, "../event4")
    (device,) = list_devices(str(tmp_path))
    box = write_box(tmp_path / "box", keyset, extra=device.snippet())
    (scanner,) = config_mod.load(str(box.config_path)).scanners
    assert scanner.settings.device == "/dev/input/by-id/" + odd


# ---------------------------------------------------------------- nothing found


def test_empty_box_says_no_scanner_and_what_to_check(tmp_path):
    text = describe_devices(str(tmp_path))
    assert "No scanner found" in text
    for hint in ("cable", "dmesg", "dialout", "`input` group", "ModemManager"):
        assert hint in text


def test_redeemd_devices_on_this_machine_exits_0_and_reports_what_it_found():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("REDEEMD_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "devices"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert 'Serial ports, type = "serial"' in result.stdout
    if any(d.looks_like_scanner and d.usable for d in list_devices()):
        assert "Scanners found:" in result.stdout
    else:  # this sandbox and CI: no scanner attached
        assert "No scanner found" in result.stdout
        assert "dmesg" in result.stdout and "ModemManager" in result.stdout


# ---------------------------------------------------------------- udev rules


def rule_lines() -> list[str]:
    lines = RULES.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_udev_rules_file_is_generated_from_the_vendor_table():
    assert RULES.read_text() == discovery.udev_rules(), (
        "regenerate: python -m drivers.discovery --udev-rules > systemd/60-redeemd-scanners.rules"
    )


def test_udev_rules_have_udev_syntax():
    pair = re.compile(r'\s*[A-Z_]+(\{[A-Za-z0-9_]+\})?\s*(==|!=|\+=|-=|:=|=)\s*"[^"]*"\s*')
    for line in rule_lines():
        for item in line.split(","):
            assert pair.fullmatch(item), f'not KEY=="value" or KEY="value": {item!r} in {line!r}'
    udevadm = shutil.which("udevadm")
    if (
        udevadm
        and subprocess.run([udevadm, "verify", "--help"], capture_output=True).returncode == 0
    ):
        result = subprocess.run([udevadm, "verify", str(RULES)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_scanner_vendor_has_a_tty_and_an_input_rule():
    covered: dict[str, set[int]] = {"tty": set(), "input": set()}
    for line in rule_lines():
        subsystem = re.search(r'SUBSYSTEM=="(\w+)"', line)
        vendor = re.search(r'ATTRS\{idVendor\}=="([0-9a-f]{4})"', line)
        if subsystem and vendor:
            covered[subsystem.group(1)].add(int(vendor.group(1), 16))
            assert re.search(r'SYMLINK\+="scanner-[a-z]+-(tty|kbd)"', line), line
    assert covered["tty"] == set(SCANNER_VENDORS)
    assert covered["input"] == set(SCANNER_VENDORS)


def test_serial_rules_put_scanners_in_dialout_and_keep_modemmanager_away():
    for line in rule_lines():
        if 'SUBSYSTEM=="tty"' in line:
            assert 'GROUP="dialout"' in line
            assert 'ENV{ID_MM_DEVICE_IGNORE}="1"' in line
        if 'SUBSYSTEM=="input"' in line:
            assert 'GROUP="input"' in line
