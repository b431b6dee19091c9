"""What a technician sees when installing a box: `redeemd devices`.

Lists serial ports, keyboard-like input devices and video devices, says which look like
barcode scanners (by USB vendor id or by name) and prints a `[[scanner]]` block ready
to paste into the config file, naming each device by its stable path
(`/dev/serial/by-id/...`, `/dev/input/by-id/...`, `/dev/v4l/by-id/...`) rather than
`/dev/ttyACM0`, whose number changes when the scanner is unplugged and plugged back in.

    >>> from drivers.discovery import describe_devices
    >>> print(describe_devices())          # what `redeemd devices` prints

Serial ports come from pyserial (`serial.tools.list_ports`); input devices from
`/dev/input/event*` with their name and ids from sysfs (readable without the `input`
group), or from evdev when sysfs has none; cameras from `/dev/video*` and
`/sys/class/video4linux/*/name`. `root` points every /dev and /sys path into another
tree (tests build a fake one); pyserial only knows the real machine, so under another
root the serial ports to describe are passed in as `serial_ports`.

`SCANNER_VENDORS` is also the single source of `systemd/60-redeemd-scanners.rules`:
`python -m drivers.discovery --udev-rules` prints the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, get_args

from drivers.settings import Layout


@dataclass(frozen=True)
class ScannerMaker:
    vendor_id: int
    slug: str
    """Lower-case word used in udev names (/dev/scanner-SLUG-tty) and snippet names."""
    name: str


# USB vendor ids of barcode scanner makers, as named in the USB ID repository (usb.ids,
# 2025-07 edition). Only ids confirmed there are listed: Zebex, Code Corp, Unitech and
# Cino have no entry (Cino's FuzzyScan uses Cypress's generic 04b4, shared with countless
# other devices), so those are recognised by name only (_SCANNER_NAMES).
SCANNER_VENDORS: dict[int, ScannerMaker] = {
    maker.vendor_id: maker
    for maker in (
        ScannerMaker(0x0C2E, "honeywell", "Honeywell (Metrologic Instruments)"),
        ScannerMaker(0x0536, "handheld", "Hand Held Products (Honeywell)"),
        ScannerMaker(0x067E, "intermec", "Intermec (Honeywell)"),
        ScannerMaker(0x05E0, "zebra", "Zebra (Symbol Technologies)"),
        ScannerMaker(0x05F9, "datalogic", "Datalogic (PSC Scanning)"),
        ScannerMaker(0x080C, "datalogic", "Datalogic S.p.A."),
        ScannerMaker(0x065A, "opticon", "Opticon (Optoelectronics)"),
        ScannerMaker(0x1EAB, "newland", "Newland (Fujian Newland Computer)"),
        ScannerMaker(0x27DD, "mindeo", "Mindeo"),
    )
}

# Words in a device or product name that make it a likely scanner.
_SCANNER_NAMES = re.compile(
    r"bar ?code|scanner|hid ?pos|imager|honeywell|metrologic|symbol|zebra|datalogic|"
    r"gryphon|magellan|quickscan|newland|opticon|intermec|mindeo|zebex|cino|fuzzyscan|"
    r"unitech|voyager|xenon|granit",
    re.IGNORECASE,
)

# Kernel serial device names pyserial also looks at (serial/tools/list_ports_linux.py).
_KEY_ENTER = 28
_KEYS_DIGITS = range(2, 12)  # KEY_1 .. KEY_0: a barcode wedge types digits and Enter


class PortInfo(Protocol):
    """What discovery reads from pyserial's `ListPortInfo`."""

    device: str
    description: str
    vid: int | None
    pid: int | None
    serial_number: str | None
    manufacturer: str | None
    product: str | None


@dataclass(frozen=True)
class Device:
    """One device a scanner could be configured on."""

    type: str
    """The scanner type it would be configured as: "serial", "hid" or "camera"."""
    path: str
    """The kernel's device node, e.g. /dev/ttyACM0 (its number can change on replug)."""
    stable_path: str | None
    """A /dev/.../by-id (or by-path) link to it that survives a replug, if udev made one."""
    description: str
    vendor_id: int | None = None
    product_id: int | None = None
    serial_number: str | None = None
    maker: ScannerMaker | None = None
    scanner_reason: str | None = None
    """Why it looks like a barcode scanner; None when nothing suggests one."""
    note: str | None = None
    """Something the technician must fix or know (permissions, a metadata node...)."""
    aliases: tuple[str, ...] = ()
    """Other links to it, e.g. /dev/scanner-honeywell-tty from the redeemd udev rules."""
    config_name: str = ""
    """The unique `name` its snippet uses."""
    usable: bool = True
    """False for nodes that cannot be a scanner (a camera's metadata node): no snippet."""

    @property
    def looks_like_scanner(self) -> bool:
        return self.scanner_reason is not None

    @property
    def config_path(self) -> str:
        if self.stable_path:
            return self.stable_path
        if self.type == "hid" and self.ids:
            # drivers/hid.py matches "vendor:product" on any event node, so it survives
            # the renumbering that /dev/input/eventN does not.
            return self.ids
        return self.path

    @property
    def ids(self) -> str | None:
        if self.vendor_id is None or self.product_id is None:
            return None
        return f"{self.vendor_id:04x}:{self.product_id:04x}"

    def snippet(self) -> str:
        """A `[[scanner]]` block for this device, valid for daemon.config."""
        key = "port" if self.type == "serial" else "device"
        lines = [
            "[[scanner]]",
            f'type = "{self.type}"',
            f"name = {_toml_string(self.config_name or self.type)}",
            f"{key} = {_toml_string(self.config_path)}",
        ]
        if self.type == "hid":
            lines.append(
                'layout = "us"  # the keyboard layout the scanner is set to: '
                + ", ".join(get_args(Layout))
            )
        if self.type == "serial" and self.vendor_id is None:
            lines.append("baudrate = 9600  # an RS-232 scanner: set the rate it is configured for")
        return "\n".join(lines) + "\n"


def list_devices(root: str = "/", serial_ports: Iterable[PortInfo] | None = None) -> list[Device]:
    """Every serial port, keyboard-like input device and video device under `root`.

    serial_ports: pyserial port infos to describe; default: `list_ports.comports()` when
    root is "/", none under another root (pyserial reads only the real /dev and /sys).

        >>> [d.config_path for d in list_devices() if d.looks_like_scanner]
        ['/dev/serial/by-id/usb-Honeywell_Imaging___Mobility_1900_18012B4523-if00']
    """
    if serial_ports is None:
        serial_ports = _pyserial_ports() if os.path.realpath(root) == "/" else []
    devices = [
        *_serial_devices(root, serial_ports),
        *_input_devices(root),
        *_video_devices(root),
    ]
    return _name_uniquely(devices)


def describe_devices(root: str = "/", serial_ports: Iterable[PortInfo] | None = None) -> str:
    """The text `redeemd devices` prints: each device, a hint, a snippet, what to check."""
    devices = list_devices(root, serial_ports)
    out: list[str] = []
    sections = (
        ("serial", "Serial ports", "no serial ports"),
        ("hid", "Keyboard-like input devices (USB-HID keyboard-wedge scanners)", "none"),
        ("camera", "Video devices (cameras)", "none"),
    )
    for kind, title, empty in sections:
        out.append(f'{title}, type = "{kind}":')
        found = [d for d in devices if d.type == kind]
        if not found:
            out.append(f"  {empty}")
        for device in found:
            out.extend(_describe(device))
        if out[-1]:
            out.append("")
    skipped = _count_other_inputs(root)
    if skipped:
        out.append(f"({skipped} other input devices, such as mice and buttons, are not shown.)")
        out.append("")
    scanners = [d for d in devices if d.looks_like_scanner and d.usable]
    if scanners:
        names = ", ".join(d.config_name for d in scanners)
        out.append(
            f"Scanners found: {len(scanners)} ({names}). Paste the [[scanner]] block of each "
            "one to use into /etc/redeemd/config.toml, then run `redeemd check-config`."
        )
        if any(d.note for d in scanners):
            out.append("Fix the notes above first, or the daemon will not be able to open them.")
    else:
        out.append(_NOTHING_FOUND)
    return "\n".join(out).rstrip()


_NOTHING_FOUND = """No scanner found: nothing above looks like a barcode scanner. Check:
  - the cable and power: unplug the scanner, plug it in again and run
    `dmesg | tail -20`; a USB scanner shows up as ttyACM/ttyUSB (serial) or as an input
    device (keyboard mode). Nothing in dmesg means a bad cable, port or scanner.
  - the scanner's interface mode: most scanners switch between USB keyboard, USB serial
    (CDC-ACM) and HID POS by scanning a barcode from their manual.
  - permissions: the daemon's user needs the `dialout` group for serial ports and the
    `input` group for keyboard-mode scanners (`id redeemd`); install
    systemd/60-redeemd-scanners.rules (docs/scanners.md).
  - ModemManager: it probes new CDC-ACM ports (ttyACM*) as modems and can hold or
    confuse a serial scanner; the udev rules tell it to leave known scanners alone,
    or stop it (`systemctl disable --now ModemManager`) on a box without a modem.
  - an unknown maker: a scanner listed above under a plain name can still be used;
    paste its block and scan a code."""


def udev_rules() -> str:
    """The text of systemd/60-redeemd-scanners.rules, generated from SCANNER_VENDORS."""
    lines = [
        "# redeemd: stable names and group access for USB barcode scanners.",
        "# Generated from drivers/discovery.py SCANNER_VENDORS; do not edit by hand:",
        "#   python -m drivers.discovery --udev-rules > systemd/60-redeemd-scanners.rules",
        "# Install: cp to /etc/udev/rules.d/, then",
        "#   udevadm control --reload && udevadm trigger",
        "# (docs/scanners.md). Serial scanners: group dialout, /dev/scanner-MAKER-tty, and",
        "# ModemManager told not to probe them. Keyboard-mode scanners: group input,",
        "# /dev/scanner-MAKER-kbd. With two scanners of one maker, use the by-id paths",
        "# that `redeemd devices` prints instead.",
        "",
        'ACTION=="remove", GOTO="redeemd_scanners_end"',
        "",
    ]
    for maker in SCANNER_VENDORS.values():
        vid = f"{maker.vendor_id:04x}"
        lines += [
            f"# {vid} {maker.name}",
            f'SUBSYSTEM=="tty", ATTRS{{idVendor}}=="{vid}", GROUP="dialout", MODE="0660", '
            f'ENV{{ID_MM_DEVICE_IGNORE}}="1", SYMLINK+="scanner-{maker.slug}-tty"',
            f'SUBSYSTEM=="input", KERNEL=="event*", ATTRS{{idVendor}}=="{vid}", '
            f'ENV{{ID_INPUT_KEYBOARD}}=="1", GROUP="input", MODE="0660", '
            f'SYMLINK+="scanner-{maker.slug}-kbd"',
            "",
        ]
    lines.append('LABEL="redeemd_scanners_end"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- serial ports


def _pyserial_ports() -> list[PortInfo]:
    from serial.tools import list_ports

    try:
        return list(list_ports.comports())
    except OSError:  # an unreadable /dev or /sys: report no ports rather than fail
        return []


def _serial_devices(root: str, ports: Iterable[PortInfo]) -> list[Device]:
    stable = _links(root, "dev/serial/by-id/*", "dev/serial/by-path/*")
    aliases = _links(root, "dev/scanner-*")
    devices = []
    for port in sorted(ports, key=lambda p: _natural(p.device)):
        host = _host(root, port.device)
        key = os.path.realpath(host)
        product = " ".join(x for x in (port.manufacturer, port.product) if x)
        description = product or (port.description if port.description != "n/a" else "")
        maker = SCANNER_VENDORS.get(port.vid) if port.vid is not None else None
        note = None
        if os.path.exists(host) and not os.access(host, os.R_OK | os.W_OK):
            note = (
                "permission denied: the user needs the `dialout` group "
                "(sudo usermod -aG dialout USER, then log in again)"
            )
        devices.append(
            Device(
                type="serial",
                path=port.device,
                stable_path=stable.get(key, [None])[0],
                description=description or "serial port",
                vendor_id=port.vid,
                product_id=port.pid,
                serial_number=port.serial_number,
                maker=maker,
                scanner_reason=_reason(maker, port.vid, description),
                note=note,
                aliases=tuple(aliases.get(key, [])),
            )
        )
    return devices


# ---------------------------------------------------------------- input devices


def _input_devices(root: str) -> list[Device]:
    return [d for d, keyboard in _all_input_devices(root) if keyboard]


def _count_other_inputs(root: str) -> int:
    return sum(1 for _, keyboard in _all_input_devices(root) if not keyboard)


def _all_input_devices(root: str) -> list[tuple[Device, bool]]:
    stable = _links(root, "dev/input/by-id/*", "dev/input/by-path/*")
    aliases = _links(root, "dev/scanner-*")
    result = []
    for host in sorted(glob.glob(_host(root, "/dev/input/event*")), key=_natural):
        node = os.path.basename(host)
        box = "/dev/input/" + node
        key = os.path.realpath(host)
        sysfs = _host(root, f"/sys/class/input/{node}/device")
        name = _read(sysfs, "name")
        vendor = _hex(_read(sysfs, "id/vendor"))
        product = _hex(_read(sysfs, "id/product"))
        keys = _bitmap(_read(sysfs, "capabilities/key"))
        links = stable.get(key, [])
        # udev's input_id names a device's link -event-kbd when it has a keyboard's keys.
        links = sorted(links, key=lambda link: not link.endswith("-event-kbd"))
        note = None
        if not os.access(host, os.R_OK):
            note = (
                "permission denied: the user needs the `input` group "
                "(sudo usermod -aG input USER, then log in again)"
            )
        elif name is None:
            name, vendor, product, keys = _from_evdev(host, vendor, product, keys)
        if keys is None:
            keyboard = True  # cannot tell: show it rather than hide a scanner
        else:
            keyboard = _KEY_ENTER in keys and all(k in keys for k in _KEYS_DIGITS)
        keyboard = keyboard or any(link.endswith("-event-kbd") for link in links)
        maker = SCANNER_VENDORS.get(vendor) if vendor is not None else None
        device = Device(
            type="hid",
            path=box,
            stable_path=links[0] if links else None,
            description=name or "input device",
            vendor_id=vendor,
            product_id=product,
            maker=maker,
            scanner_reason=_reason(maker, vendor, name or ""),
            note=note,
            aliases=tuple(aliases.get(key, [])),
        )
        result.append((device, keyboard))
    return result


def _from_evdev(
    host: str, vendor: int | None, product: int | None, keys: set[int] | None
) -> tuple[str | None, int | None, int | None, set[int] | None]:
    try:
        import evdev  # the optional `drivers` extra
    except ImportError:
        return None, vendor, product, keys
    try:
        device = evdev.InputDevice(host)
    except OSError:  # not an input device (or gone): sysfs already said what it could
        return None, vendor, product, keys
    try:
        capabilities = device.capabilities().get(evdev.ecodes.EV_KEY, [])
        return device.name, device.info.vendor, device.info.product, set(capabilities)
    finally:
        device.close()


# ---------------------------------------------------------------- video devices


def _video_devices(root: str) -> list[Device]:
    stable = _links(root, "dev/v4l/by-id/*", "dev/v4l/by-path/*")
    devices = []
    for host in sorted(glob.glob(_host(root, "/dev/video*")), key=_natural):
        node = os.path.basename(host)
        sysfs = _host(root, f"/sys/class/video4linux/{node}")
        name = _read(sysfs, "name")
        index = _read(sysfs, "index")
        # device -> the USB interface; its parent is the USB device with the ids.
        vendor = _hex(_read(sysfs, "device/../idVendor"))
        product = _hex(_read(sysfs, "device/../idProduct"))
        maker = SCANNER_VENDORS.get(vendor) if vendor is not None else None
        key = os.path.realpath(host)
        links = sorted(stable.get(key, []), key=lambda link: "index0" not in link)
        usable = index in (None, "0")
        note = None
        if not usable:
            note = "a second node of the same camera (metadata), not a picture: use its index 0"
        elif not os.access(host, os.R_OK):
            note = "permission denied: the user needs the `video` group"
        devices.append(
            Device(
                type="camera",
                path="/dev/" + node,
                stable_path=links[0] if links else None,
                description=name or "video device",
                vendor_id=vendor,
                product_id=product,
                maker=maker,
                scanner_reason=_reason(maker, vendor, name or ""),
                note=note,
                usable=usable,
            )
        )
    return devices


# ---------------------------------------------------------------- output


def _describe(device: Device) -> list[str]:
    facts = [
        x for x in (device.ids, device.serial_number and f"serial {device.serial_number}") if x
    ]
    head = f"  {device.path}  {device.description}"
    if facts:
        head += f"  [{', '.join(facts)}]"
    lines = [head]
    if device.stable_path:
        lines.append(f"    stable path: {device.stable_path}")
    elif _renumbered_on_replug(device):
        lines.append(
            "    no stable link: the node's number may change when it is replugged "
            "(install the udev rules, docs/scanners.md)"
        )
    for alias in device.aliases:
        lines.append(f"    udev name:   {alias}")
    if device.scanner_reason:
        lines.append(f"    looks like a scanner: {device.scanner_reason}")
    if device.note:
        lines.append(f"    NOTE: {device.note}")
    if device.usable:
        lines.append("")
        lines.extend(device.snippet().splitlines())
    lines.append("")
    return lines


def _renumbered_on_replug(device: Device) -> bool:
    # A built-in RS-232 port (ttyS0, ttyAMA0) keeps its name; USB and input nodes do not.
    built_in = re.search(r"/tty(S|AMA)\d+$", device.path) is not None
    return device.type != "serial" or device.vendor_id is not None or not built_in


def _reason(maker: ScannerMaker | None, vendor: int | None, name: str) -> str | None:
    if maker is not None and vendor is not None:
        return f"USB vendor {vendor:04x} is {maker.name}, a scanner maker"
    match = _SCANNER_NAMES.search(name)
    if match:
        return f'its name contains "{match.group(0)}"'
    return None


def _name_uniquely(devices: Sequence[Device]) -> list[Device]:
    """Give each device a `name` for its snippet, unique across the listing."""
    used: dict[str, int] = {}
    named = []
    for device in devices:
        base = device.maker.slug if device.maker else device.type
        used[base] = used.get(base, 0) + 1
        name = base if used[base] == 1 else f"{base}-{used[base]}"
        named.append(replace(device, config_name=name))
    return named


def _toml_string(text: str) -> str:
    # A JSON string is a valid TOML basic string: same escapes for ", \ and controls.
    return json.dumps(text, ensure_ascii=False)


# ---------------------------------------------------------------- paths under root


def _host(root: str, box_path: str) -> str:
    """Where a path on the box (/dev/ttyACM0) is under `root`."""
    return os.path.join(root, box_path.lstrip("/"))


def _box(root: str, host_path: str) -> str:
    relative = os.path.relpath(host_path, root)
    return host_path if relative.startswith("..") else "/" + relative


def _links(root: str, *patterns: str) -> dict[str, list[str]]:
    """Real path of each link's target -> the links (box paths), first pattern first."""
    found: dict[str, list[str]] = {}
    for pattern in patterns:
        for link in sorted(glob.glob(os.path.join(root, pattern))):
            if os.path.islink(link):
                found.setdefault(os.path.realpath(link), []).append(_box(root, link))
    return found


def _read(*parts: str) -> str | None:
    try:
        with open(os.path.join(*parts), encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return None


def _hex(text: str | None) -> int | None:
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def _bitmap(text: str | None) -> set[int] | None:
    """Bits set in a sysfs capability bitmap: hex `long`s, most significant first."""
    if not text:
        return None
    bits = struct.calcsize("l") * 8  # the kernel prints words of its own long
    value = 0
    try:
        for word in text.split():
            value = (value << bits) | int(word, 16)
    except ValueError:
        return None
    return {i for i in range(value.bit_length()) if value >> i & 1}


def _natural(path: str) -> tuple[str, int]:
    """ttyUSB2 before ttyUSB10."""
    match = re.fullmatch(r"(.*?)(\d*)", os.path.basename(path))
    assert match is not None
    return (match.group(1), int(match.group(2) or -1))


if __name__ == "__main__":
    if sys.argv[1:] == ["--udev-rules"]:
        sys.stdout.write(udev_rules())
    else:
        print(describe_devices())
