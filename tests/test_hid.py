"""The USB-HID keyboard-wedge device loop (drivers/hid.py).

This machine's kernel has no uinput module and there is no /dev/input, so no real input
device can be created here. The device loop is therefore driven through its injectable
`InputBackend` by fake devices that behave like evdev's at the system-call level: each
has a real file descriptor (a pipe) that `select()` waits on, `read()` returns real
`evdev.InputEvent`s (decoded by the real keymap, nothing mocked there), raises
BlockingIOError when nothing is pending, and once unplugged raises OSError(19, ENODEV)
while its descriptor stays readable forever, as a dead evdev node does. `grab()` raises
OSError(EBUSY) when someone else holds the grab. The real backend's inotify watch and
device listing are tested on a temporary directory.
"""

from __future__ import annotations

import errno
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from conftest import write_box
from evdev import DeviceInfo, InputEvent
from evdev import ecodes as e

from cards.scan import Scan
from daemon.service import make_driver
from drivers.hid import EvdevBackend, HidScanner
from drivers.supervisor import DriverError, DriverState

WAIT = 10.0  # upper bound for a background thread to get somewhere; never a measurement


def wait_for(predicate, what: str) -> None:
    end = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def keystrokes(text: str, *, enter: bool = True) -> list[InputEvent]:
    """What a US-layout scanner sends for `text` (digits, letters, capitals), stamped now."""
    events = []
    t_us = int(time.time() * 1_000_000)

    def report(code: int, value: int) -> None:
        nonlocal t_us
        sec, usec = divmod(t_us, 1_000_000)
        events.append(InputEvent(sec, usec, e.EV_MSC, e.MSC_SCAN, 0x70000 + code))
        events.append(InputEvent(sec, usec, e.EV_KEY, code, value))
        events.append(InputEvent(sec, usec, e.EV_SYN, e.SYN_REPORT, 0))
        t_us += 1_000

    for char in text:
        code = getattr(e, f"KEY_{char.upper()}")
        if char.isupper():
            report(e.KEY_LEFTSHIFT, 1)
        report(code, 1)
        report(code, 0)
        if char.isupper():
            report(e.KEY_LEFTSHIFT, 0)
    if enter:
        report(e.KEY_ENTER, 1)
        report(e.KEY_ENTER, 0)
    return events


class FakeHandle:
    """One open file on a FakeNode, like one evdev.InputDevice."""

    def __init__(self, node: FakeNode):
        self.node = node
        self.path = node.path
        self.name = node.name
        self.info = node.info
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.pending: deque[list[InputEvent]] = deque()
        self.reads = 0
        self.log: list[str] = []
        self.closed = False

    def fileno(self) -> int:
        return self._r

    def deliver(self, events: list[InputEvent]) -> None:
        self.pending.append(events)
        os.write(self._w, b"e")

    def wake(self) -> None:
        os.write(self._w, b"!")

    def read(self) -> list[InputEvent]:
        self.reads += 1
        if not self.node.plugged:
            raise OSError(errno.ENODEV, "No such device")
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        os.read(self._r, 1)
        return self.pending.popleft()

    def grab(self) -> None:
        if self.node.grabbed_by is not None:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.node.grabbed_by = self
        self.log.append("grab")

    def ungrab(self) -> None:
        if self.node.grabbed_by is not self:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.node.grabbed_by = None
        self.log.append("ungrab")

    def close(self) -> None:
        self.log.append("close")
        if self.node.grabbed_by is self:  # the kernel releases a grab with its file
            self.node.grabbed_by = None
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


@dataclass
class FakeNode:
    """An /dev/input/eventN node and the device behind it."""

    path: str
    name: str
    vendor: int = 0x0C2E
    product: int = 0x0B61
    plugged: bool = True
    grabbed_by: object = None
    handles: list[FakeHandle] = field(default_factory=list)

    @property
    def info(self) -> DeviceInfo:
        return DeviceInfo(bustype=3, vendor=self.vendor, product=self.product, version=0x111)

    @property
    def open_handles(self) -> list[FakeHandle]:
        return [h for h in self.handles if not h.closed]

    def send(self, events: list[InputEvent]) -> None:
        for handle in self.open_handles:
            handle.deliver(events)

    def unplug(self) -> None:
        self.plugged = False
        for handle in self.open_handles:
            handle.wake()  # a dead evdev fd polls readable from now on


class FakeWatcher:
    def __init__(self, backend: FakeBackend):
        self.backend = backend
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)

    def fileno(self) -> int:
        return self._r

    def notify(self) -> None:
        os.write(self._w, b"n")

    def read(self) -> None:
        self.backend.calls.append("watch-read")
        try:
            while os.read(self._r, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.backend.calls.append("watch-close")
        os.close(self._r)
        os.close(self._w)


class FakeBackend:
    def __init__(self, *nodes: FakeNode, links: dict[str, str] | None = None):
        self.nodes = {node.path: node for node in nodes}
        self.links = links or {}
        self.denied: set[str] = set()
        self.holder_list = ["pid 4242 (Xorg)"]
        self.calls: list[str] = []
        self.watcher: FakeWatcher | None = None

    def watch(self, also: tuple[str, ...] = ()) -> FakeWatcher:
        self.calls.append("watch")
        self.watched_also = also
        self.watcher = FakeWatcher(self)
        return self.watcher

    def list_devices(self) -> list[str]:
        self.calls.append("list")
        return [path for path, node in self.nodes.items() if node.plugged]

    def open(self, path: str) -> FakeHandle:
        if path in self.denied:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        node = self.nodes.get(path)
        if node is None or not node.plugged:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        handle = FakeHandle(node)
        node.handles.append(handle)
        return handle

    def resolve(self, path: str) -> str:
        return self.links.get(path, path)

    def holders(self, path: str) -> list[str]:
        return self.holder_list

    def plug(self, node: FakeNode) -> None:
        """A device appears (inotify reports the new node)."""
        self.nodes[node.path] = node
        assert self.watcher is not None
        self.watcher.notify()

    def unplug(self, path: str) -> None:
        self.nodes[path].unplug()


@dataclass
class Running:
    scanner: HidScanner
    scans: queue.Queue[Scan]
    state: DriverState
    stop: threading.Event
    errors: list[BaseException]
    thread: threading.Thread

    def next_code(self) -> bytes:
        return self.scans.get(timeout=WAIT).code


@contextmanager
def running(scanner: HidScanner) -> Iterator[Running]:
    scans: queue.Queue[Scan] = queue.Queue()
    stop = threading.Event()
    state = DriverState(scanner.name, scanner.kind)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            scanner.run(scans.put, stop, state)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    run = Running(scanner, scans, state, stop, errors, thread)
    try:
        yield run
    finally:
        stop.set()
        scanner.close()
        thread.join(WAIT)
        assert not thread.is_alive(), "run() did not return after stop"
    assert not errors, errors


def scanner(backend: FakeBackend, device: str = "0c2e:0b61", **settings) -> HidScanner:
    return HidScanner("door", {"device": device, **settings}, backend=backend)


SCANNER = "/dev/input/event5"
KEYBOARD = "/dev/input/event2"


def test_scans_from_matching_device_are_delivered():
    node = FakeNode(SCANNER, "Honeywell 1900")
    with running(scanner(FakeBackend(node))) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
        node.send(keystrokes("abc123"))
        node.send(keystrokes("Ticket42"))
        first = run.scans.get(timeout=WAIT)
        assert (first.code, first.source, first.symbology) == (b"abc123", "door", None)
        assert first.at > 0
        assert run.next_code() == b"Ticket42"
        assert "event5 (Honeywell 1900)" in run.state.message


def test_matches_by_name_glob_and_leaves_other_keyboards_alone():
    keyboard = FakeNode(KEYBOARD, "AT Translated Set 2 keyboard", vendor=1, product=1)
    node = FakeNode(SCANNER, "Honeywell Imaging 1900", vendor=2, product=2)
    with running(scanner(FakeBackend(keyboard, node), device="honeywell*")) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
        assert keyboard.open_handles == [] and keyboard.grabbed_by is None
        assert node.grabbed_by is not None
        node.send(keystrokes("4711"))
        assert run.next_code() == b"4711"


def test_matches_by_id_path_without_opening_other_devices():
    keyboard = FakeNode(KEYBOARD, "AT Translated Set 2 keyboard")
    node = FakeNode(SCANNER, "Honeywell 1900")
    link = "/dev/input/by-id/usb-Honeywell_1900-event-kbd"
    backend = FakeBackend(keyboard, node, links={link: SCANNER})
    with running(scanner(backend, device=link)) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
        assert keyboard.handles == []
        node.send(keystrokes("4711"))
        assert run.next_code() == b"4711"
    assert backend.watched_also == ()


def test_udev_link_outside_dev_input_is_matched_and_its_directory_watched():
    node = FakeNode(SCANNER, "Honeywell 1900")
    backend = FakeBackend(links={"/dev/scanner-honeywell-kbd": SCANNER})
    with running(scanner(backend, device="/dev/scanner-honeywell-kbd")) as run:
        wait_for(lambda: run.state.state == "disconnected", "waiting")
        backend.plug(node)
        wait_for(lambda: run.state.state == "connected", "connected")
        node.send(keystrokes("4711"))
        assert run.next_code() == b"4711"
    assert backend.watched_also == ("/dev",)


def test_code_without_terminator_is_delivered_once_the_gap_has_passed():
    node = FakeNode(SCANNER, "Scanner")
    with running(scanner(FakeBackend(node), gap=0.05)) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
        node.send(keystrokes("9780201379624", enter=False))
        assert run.next_code() == b"9780201379624"


def test_layout_setting_is_used_for_decoding():
    node = FakeNode(SCANNER, "Scanner")
    with running(scanner(FakeBackend(node), layout="de")) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
        node.send(keystrokes("yz1"))
        assert run.next_code() == b"zy1"


def test_unplugged_device_is_dropped_without_busy_loop_and_others_keep_working():
    first = FakeNode("/dev/input/event5", "Scanner A")
    second = FakeNode("/dev/input/event6", "Scanner B")
    backend = FakeBackend(first, second)
    with running(scanner(backend, device="scanner*", gap=0.02)) as run:
        wait_for(
            lambda: "Scanner B" in run.state.message and "Scanner A" in run.state.message, "both"
        )
        [dead] = first.open_handles
        reads_before = dead.reads
        backend.unplug(first.path)
        wait_for(lambda: dead.closed, "the unplugged device to be closed")
        # Several more turns of the loop, including gap flushes on the survivor.
        for code in ("111", "222", "333"):
            second.send(keystrokes(code, enter=False))
            assert run.next_code() == code.encode()
        assert dead.reads == reads_before + 1  # the one read that reported ENODEV
        assert run.state.state == "connected"
        assert "Scanner A" not in run.state.message and "Scanner B" in run.state.message


def test_last_device_unplugged_is_disconnected_until_it_comes_back():
    node = FakeNode(SCANNER, "Scanner")
    backend = FakeBackend(node)
    with running(scanner(backend)) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
        backend.unplug(SCANNER)
        wait_for(lambda: run.state.state == "disconnected", "disconnected")
        assert "waiting for it to be plugged in" in run.state.message
        replugged = FakeNode(SCANNER, "Scanner")  # same node name, a new device
        backend.plug(replugged)
        wait_for(lambda: run.state.state == "connected", "reconnected")
        replugged.send(keystrokes("back1"))
        assert run.next_code() == b"back1"
        assert run.errors == []


def test_device_plugged_in_later_is_picked_up():
    backend = FakeBackend()
    with running(scanner(backend)) as run:
        wait_for(lambda: run.state.state == "disconnected", "waiting")
        assert "no input device matches '0c2e:0b61'" in run.state.message
        node = FakeNode(SCANNER, "Scanner")
        backend.plug(node)
        wait_for(lambda: run.state.state == "connected", "connected")
        node.send(keystrokes("late99"))
        assert run.next_code() == b"late99"


def test_watch_starts_before_devices_are_listed():
    backend = FakeBackend(FakeNode(SCANNER, "Scanner"))
    with running(scanner(backend)) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
    assert backend.calls[:2] == ["watch", "list"]


def test_grab_refused_says_another_program_holds_it_and_which():
    node = FakeNode(SCANNER, "Honeywell 1900", grabbed_by="Xorg")
    run = scanner(FakeBackend(node))
    with pytest.raises(DriverError) as refused:
        run.run(lambda scan: None, threading.Event(), DriverState("door", "hid"))
    message = str(refused.value)
    assert "/dev/input/event5 (Honeywell 1900) is grabbed by another program" in message
    assert "pid 4242 (Xorg)" in message
    assert "grab = false" in message
    assert all(handle.closed for handle in node.handles)


def test_grab_false_reads_without_grabbing():
    node = FakeNode(SCANNER, "Scanner", grabbed_by="Xorg")
    with running(scanner(FakeBackend(node), grab=False)) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
        node.send(keystrokes("shared1"))
        assert run.next_code() == b"shared1"
    assert node.handles[0].log == ["close"]


def test_stop_ungrabs_then_closes_so_a_new_run_can_grab_again():
    node = FakeNode(SCANNER, "Scanner")
    backend = FakeBackend(node)
    hid = scanner(backend)
    with running(hid) as run:
        wait_for(lambda: run.state.state == "connected", "connected")
    assert node.handles[0].log == ["grab", "ungrab", "close"]
    assert backend.calls[-1] == "watch-close"
    with running(hid) as run:  # what the supervisor does after a restart
        wait_for(lambda: run.state.state == "connected", "connected again")
        node.send(keystrokes("again1"))
        assert run.next_code() == b"again1"


def test_close_alone_makes_run_return():
    node = FakeNode(SCANNER, "Scanner")
    hid = scanner(FakeBackend(node))
    state = DriverState("door", "hid")
    thread = threading.Thread(target=hid.run, args=(lambda s: None, threading.Event(), state))
    thread.start()
    wait_for(lambda: state.state == "connected", "connected")
    hid.close()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_each_device_has_its_own_shift_state():
    first = FakeNode("/dev/input/event5", "Scanner A")
    second = FakeNode("/dev/input/event6", "Scanner B")
    with running(scanner(FakeBackend(first, second), device="scanner*")) as run:
        wait_for(lambda: "Scanner B" in run.state.message, "both")
        first.send(keystrokes("A", enter=False)[:3])  # Shift goes down and stays
        second.send(keystrokes("lower"))
        assert run.next_code() == b"lower"


def test_devices_that_cannot_be_opened_make_an_error_in_status():
    node = FakeNode(SCANNER, "Scanner")
    backend = FakeBackend(node)
    backend.denied.add(SCANNER)
    with running(scanner(backend)) as run:
        wait_for(lambda: run.state.state == "error", "error")
        assert "permission denied" in run.state.message
        assert "'input' group" in run.state.message


def test_config_file_scanner_block_builds_hid_driver(tmp_path, keyset):
    block = '[[scanner]]\ntype = "hid"\nname = "door"\ndevice = "Honeywell*"\nlayout = "uk"\n'
    config = write_box(tmp_path, keyset, extra=block).config
    driver = make_driver(config.scanners[0])
    assert isinstance(driver, HidScanner)
    s = driver.settings
    assert (s.device, s.layout, s.grab, s.gap, s.min_length) == (
        "Honeywell*",
        "uk",
        True,
        0.1,
        3,
    )


# --- the real backend, on a directory standing in for /dev/input ------------------------


def test_real_backend_lists_event_nodes_in_numeric_order(tmp_path):
    for name in ("event10", "event2", "mouse0", "event1"):
        (tmp_path / name).touch()
    listed = EvdevBackend(str(tmp_path)).list_devices()
    assert [os.path.basename(p) for p in listed] == ["event1", "event2", "event10"]


def test_real_backend_watch_wakes_select_when_a_node_appears(tmp_path):
    import select

    watcher = EvdevBackend(str(tmp_path)).watch()
    try:
        assert select.select([watcher], [], [], 0)[0] == []
        (tmp_path / "event7").touch()
        assert select.select([watcher], [], [], WAIT)[0] == [watcher]
        watcher.read()
        assert select.select([watcher], [], [], 0)[0] == []
    finally:
        watcher.close()


def test_real_backend_without_dev_input_explains(tmp_path):
    with pytest.raises(DriverError, match="does not exist"):
        EvdevBackend(str(tmp_path / "input")).watch()


def test_real_backend_names_processes_holding_a_device(tmp_path):
    node = tmp_path / "event3"
    node.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(node)!r}); import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        backend = EvdevBackend(str(tmp_path))
        wait_for(lambda: backend.holders(str(node)), "the holder to open the file")
        assert [h for h in backend.holders(str(node)) if h.startswith(f"pid {holder.pid} (")]
    finally:
        holder.stdin.close()
        holder.wait(WAIT)


def test_real_backend_also_watches_the_directory_of_a_configured_link(tmp_path):
    import select

    (tmp_path / "input").mkdir()
    watcher = EvdevBackend(str(tmp_path / "input")).watch(also=(str(tmp_path),))
    try:
        (tmp_path / "scanner-honeywell-kbd").symlink_to(tmp_path / "input" / "event3")
        assert select.select([watcher], [], [], WAIT)[0] == [watcher]
    finally:
        watcher.close()
