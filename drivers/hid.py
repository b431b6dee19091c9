"""USB-HID keyboard-wedge scanners, read from evdev (/dev/input/event*).

A wedge scanner is a keyboard to the kernel: it "types" every code it reads. This driver
finds the input devices that belong to one configured scanner, grabs them so the codes do
not also land in a console or a focused window, and turns their key events back into
codes with `drivers.keymap.KeyDecoder` (one decoder per device, so two scanners typing at
once never mix their Shift state or buffers).

    [[scanner]]
    type = "hid"
    name = "door"
    device = "0c2e:0b61"      # or a name glob "Honeywell*", or /dev/input/by-id/usb-...-kbd
    layout = "de"             # what the scanner is set to type: us, uk, de, fr
    grab = true
    gap = "100ms"
    min_length = 3

Hotplug is handled inside `run()`: /dev/input is watched with inotify *before* the
devices are listed, so one plugged in between the two is not missed; devices that appear
later are picked up, devices that vanish (OSError ENODEV on read) are closed and
dropped, and the driver keeps waiting for them. A scanner whose device is not plugged in
is "disconnected" in `redeemd status`, not an error.

The device side is an `InputBackend` (listing, watching, opening); `EvdevBackend` is the
real one and the tests pass another that yields real `InputEvent`s.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from evdev import InputEvent

from cards.scan import Scan, scanned
from drivers.keymap import KeyDecoder
from drivers.settings import HidSettings
from drivers.supervisor import DriverError, DriverState, Status

log = logging.getLogger("redeemd.drivers.hid")

DEV_INPUT = "/dev/input"
# Upper bound on one select(): how late a `stop` set without close() is noticed.
POLL_SECONDS = 0.5
_VID_PID = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")


class InputDeviceLike(Protocol):
    """What the driver uses of `evdev.InputDevice`."""

    name: str

    @property
    def info(self): ...  # .vendor, .product

    def fileno(self) -> int: ...

    def read(self) -> Iterable[InputEvent]: ...

    def grab(self) -> None: ...

    def ungrab(self) -> None: ...

    def close(self) -> None: ...


class Watcher(Protocol):
    def fileno(self) -> int: ...

    def read(self) -> None:
        """Consume the pending notifications (something in /dev/input changed)."""

    def close(self) -> None: ...


class InputBackend(Protocol):
    def watch(self, also: tuple[str, ...] = ()) -> Watcher:
        """Start reporting changes in /dev/input (and in the directories `also`)."""

    def list_devices(self) -> list[str]: ...

    def open(self, path: str) -> InputDeviceLike: ...

    def resolve(self, path: str) -> str: ...

    def holders(self, path: str) -> list[str]: ...


class _InotifyWatcher:
    def __init__(self, root: str, also: tuple[str, ...] = ()):
        from inotify_simple import INotify, flags

        self._flags = flags
        # CREATE: a new event node; ATTRIB: udev has just given it the `input` group (it is
        # created root-only, so opening it right away can fail); DELETE/MOVED_TO: by-id
        # links being replaced.
        self._mask = flags.CREATE | flags.ATTRIB | flags.DELETE | flags.MOVED_TO
        self._inotify = INotify(nonblocking=True)
        self._root = root
        try:
            self._inotify.add_watch(root, self._mask)
        except FileNotFoundError:
            self._inotify.close()
            raise DriverError(
                f"{root} does not exist: this machine has no input devices yet "
                "(or /dev is not mounted into this container)"
            ) from None
        self._watch_by_id()
        for directory in also:
            # The directory of a configured link such as /dev/scanner-honeywell-kbd (our
            # udev rules): udev may create it just after the event node's last change.
            with contextlib.suppress(OSError):
                self._inotify.add_watch(directory, self._mask)

    def _watch_by_id(self) -> None:
        # udev creates the by-id links after the event node; a scanner configured by its
        # by-id path is matched once its link appears.
        by_id = os.path.join(self._root, "by-id")
        if os.path.isdir(by_id):
            with contextlib.suppress(OSError):
                self._inotify.add_watch(by_id, self._mask)

    def fileno(self) -> int:
        return self._inotify.fileno()

    def read(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except BlockingIOError:
            return
        if any(e.name == "by-id" and e.mask & self._flags.ISDIR for e in events):
            self._watch_by_id()

    def close(self) -> None:
        self._inotify.close()


class EvdevBackend:
    """The real devices under /dev/input."""

    def __init__(self, root: str = DEV_INPUT):
        self.root = root

    def watch(self, also: tuple[str, ...] = ()) -> Watcher:
        return _InotifyWatcher(self.root, also)

    def list_devices(self) -> list[str]:
        # Every node, not evdev.list_devices(): that one silently leaves out the nodes we
        # may not open, and "permission denied" is worth telling the technician.
        paths = glob.glob(os.path.join(self.root, "event*"))
        return sorted(paths, key=lambda p: (len(p), p))

    def open(self, path: str) -> InputDeviceLike:
        from evdev import InputDevice

        return InputDevice(path)

    def resolve(self, path: str) -> str:
        return os.path.realpath(path)

    def holders(self, path: str) -> list[str]:
        """'pid N (command)' for every other process that has `path` open (best effort:
        without root only our own user's processes are visible)."""
        found = []
        for fd_dir in glob.glob("/proc/[0-9]*/fd"):
            pid = fd_dir.split("/")[2]
            if pid == str(os.getpid()):
                continue
            try:
                if not any(
                    os.readlink(os.path.join(fd_dir, fd)) == path for fd in os.listdir(fd_dir)
                ):
                    continue
                with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                    found.append(f"pid {pid} ({f.read().strip()})")
            except OSError:
                continue
        return found


class _Reader:
    """One open device with its own decoder and its own clock anchor."""

    def __init__(self, path: str, device: InputDeviceLike, decoder: KeyDecoder, grabbed: bool):
        self.path = path
        self.device = device
        self.decoder = decoder
        self.grabbed = grabbed
        # Kernel timestamps are on the device's clock (CLOCK_REALTIME unless changed);
        # the decoder's gap is measured on that clock, so "now" is derived from the last
        # event's timestamp plus the monotonic time elapsed since it was read.
        self.anchor_event = 0.0
        self.anchor_mono = 0.0
        self.label = f"{os.path.basename(path)} ({device.name})"

    def fileno(self) -> int:
        return self.device.fileno()

    def read(self) -> list[bytes]:
        events = list(self.device.read())
        if events:
            self.anchor_event = events[-1].timestamp()
            self.anchor_mono = time.monotonic()
        return self.decoder.feed(events)

    def flush_due(self) -> float | None:
        """Monotonic time after which the code in progress is complete, or None."""
        deadline = self.decoder.deadline
        if deadline is None:
            return None
        return self.anchor_mono + (deadline - self.anchor_event)

    def flush(self, mono: float) -> list[bytes]:
        return self.decoder.flush(self.anchor_event + (mono - self.anchor_mono))


class HidScanner:
    """One configured keyboard-wedge scanner: every input device that matches `device`."""

    kind = "hid"

    def __init__(
        self,
        name: str,
        settings: HidSettings | Mapping[str, object],
        *,
        backend: InputBackend | None = None,
    ):
        self.name = name
        # Keys and defaults: drivers/settings.py. Read from here, not copied: one source.
        self.settings = HidSettings.of(settings)
        self.backend: InputBackend = backend or EvdevBackend()
        KeyDecoder(self.settings.layout)  # an unknown layout fails here, at configuration time
        self._closed = threading.Event()
        self._wake_w: int | None = None
        self._wake_lock = threading.Lock()

    # --- matching ----------------------------------------------------------------------

    def _wanted_path(self) -> str | None:
        wanted = self.settings.device
        if not wanted.startswith("/"):
            return None
        return self.backend.resolve(wanted)

    def _link_dirs(self) -> tuple[str, ...]:
        wanted = self.settings.device
        if not wanted.startswith("/"):
            return ()
        directory = os.path.dirname(wanted)
        return () if directory in (DEV_INPUT, os.path.join(DEV_INPUT, "by-id")) else (directory,)

    def _matches(self, device: InputDeviceLike) -> bool:
        wanted = self.settings.device
        if wanted.startswith("/"):
            return True  # chosen by path before opening
        vid_pid = _VID_PID.fullmatch(wanted)
        if vid_pid:
            return (device.info.vendor, device.info.product) == (
                int(vid_pid.group(1), 16),
                int(vid_pid.group(2), 16),
            )
        return fnmatch.fnmatchcase(device.name.lower(), wanted.lower())

    # --- the device loop ---------------------------------------------------------------

    def run(self, emit: Callable[[Scan], None], stop: threading.Event, state: DriverState) -> None:
        # A close() from an earlier shutdown must not end this run at once; a close()
        # racing with this start is covered by `stop`, which the supervisor sets first.
        self._closed.clear()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        with self._wake_lock:
            self._wake_w = wake_w
        readers: dict[str, _Reader] = {}
        watcher: Watcher | None = None
        try:
            # Watch before listing: a scanner plugged in between the listing and the start
            # of the watch would otherwise never be seen (Home Assistant keyboard_remote
            # does the same for the same reason).
            watcher = self.backend.watch(self._link_dirs())
            self._rescan(readers, state)
            while not stop.is_set() and not self._closed.is_set():
                watched: list[int | Watcher | _Reader] = [wake_r, watcher, *readers.values()]
                ready, _, _ = select.select(watched, [], [], self._timeout(readers))
                if wake_r in ready:
                    _drain(wake_r)
                    continue
                if watcher in ready:
                    watcher.read()
                    self._rescan(readers, state)
                lost = False
                for reader in ready:
                    if not isinstance(reader, _Reader):
                        continue
                    try:
                        codes = reader.read()
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        # ENODEV when unplugged. Drop it now: a dead evdev fd stays
                        # readable forever, so keeping it would spin the CPU.
                        self._drop(readers, reader, exc)
                        lost = True
                        continue
                    self._emit(emit, codes)
                mono = time.monotonic()
                for reader in readers.values():
                    due = reader.flush_due()
                    if due is not None and mono > due:
                        self._emit(emit, reader.flush(mono))
                if lost:
                    # The node may already belong to a new device (replugged fast).
                    self._rescan(readers, state)
        finally:
            self._release(readers)
            if watcher is not None:
                watcher.close()
            with self._wake_lock:
                self._wake_w = None
                os.close(wake_r)
                os.close(wake_w)

    def _emit(self, emit: Callable[[Scan], None], codes: list[bytes]) -> None:
        for code in codes:
            emit(scanned(code, self.name, time.time()))

    def _timeout(self, readers: dict[str, _Reader]) -> float:
        mono = time.monotonic()
        timeout = POLL_SECONDS
        for reader in readers.values():
            due = reader.flush_due()
            if due is not None:
                # 1 ms past the deadline, so the flush finds the gap strictly exceeded.
                timeout = min(timeout, max(0.0, due - mono) + 0.001)
        return timeout

    def _rescan(self, readers: dict[str, _Reader], state: DriverState) -> None:
        wanted = self._wanted_path()
        denied = []
        for path in self.backend.list_devices():
            if path in readers:
                continue
            if wanted is not None and self.backend.resolve(path) != wanted:
                continue
            try:
                device = self.backend.open(path)
            except PermissionError:
                denied.append(path)
                continue
            except OSError:
                continue  # gone between listing and opening
            try:
                matches = self._matches(device)
            except Exception:
                matches = False
            if not matches:
                device.close()
                continue
            self._attach(readers, path, device)
        self._report(readers, state, denied)

    def _attach(self, readers: dict[str, _Reader], path: str, device: InputDeviceLike) -> None:
        s = self.settings
        if s.grab:
            try:
                device.grab()
            except OSError as exc:
                device.close()
                raise DriverError(self._grab_refused(path, device, exc)) from None
        readers[path] = _Reader(
            path,
            device,
            KeyDecoder(s.layout, gap=s.gap, min_length=s.min_length),
            grabbed=s.grab,
        )
        log.info("scanner %s: reading %s (%s)", self.name, path, device.name)

    def _grab_refused(self, path: str, device: InputDeviceLike, exc: OSError) -> str:
        if exc.errno != errno.EBUSY:
            return f"cannot grab {path} ({device.name}): {exc}"
        holders = self.backend.holders(path)
        held = f"; it is open in {', '.join(holders)}" if holders else ""
        return (
            f"{path} ({device.name}) is grabbed by another program{held}. Stop that "
            f"program (a desktop session, a kiosk browser, another redeemd) or set "
            f"grab = false for scanner {self.name!r} (its codes then also reach whatever "
            f"has keyboard focus)"
        )

    def _drop(self, readers: dict[str, _Reader], reader: _Reader, exc: OSError) -> None:
        log.warning("scanner %s: %s went away (%s)", self.name, reader.label, exc)
        readers.pop(reader.path, None)
        _release_one(reader)

    def _report(self, readers: dict[str, _Reader], state: DriverState, denied: list[str]) -> None:
        if readers:
            state.state = Status.CONNECTED
            state.message = "reading " + ", ".join(r.label for r in readers.values())
            return
        # Input devices it may not open: the scanner may well be one of them, and the box
        # needs fixing (a group), not a plug: an error until it can see them all.
        if denied:
            state.state = Status.ERROR
            state.message = (
                f"{len(denied)} input devices could not be opened (permission denied), so "
                f"none seen matches {self.settings.device!r}: add the user redeemd runs as to the "
                "'input' group"
            )
        else:
            state.state = Status.DISCONNECTED
            state.message = (
                f"no input device matches {self.settings.device!r}; waiting for it to be plugged in"
            )

    def _release(self, readers: dict[str, _Reader]) -> None:
        for reader in readers.values():
            _release_one(reader)
        readers.clear()

    def feedback(self, accepted: bool) -> None:
        pass  # a keyboard wedge has no channel back to the scanner

    def close(self) -> None:
        self._closed.set()
        # Under the lock: once run() has closed the pipe its fd number may belong to
        # another file, and a stray byte written there would corrupt it.
        with self._wake_lock:
            if self._wake_w is not None:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"x")


def _release_one(reader: _Reader) -> None:
    # Ungrab, then close, and only then let run() end. Ungrab first because the grab
    # belongs to the open file description: if a child process inherited the fd, closing
    # ours would leave the keyboard grabbed. Close before run() returns because the
    # supervisor may call run() again at once, and a grab still held by our old fd would
    # make the new one fail with EBUSY against ourselves.
    if reader.grabbed:
        # OSError: already gone (ENODEV), the kernel dropped the grab with the device.
        with contextlib.suppress(OSError):
            reader.device.ungrab()
    with contextlib.suppress(OSError):
        reader.device.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
