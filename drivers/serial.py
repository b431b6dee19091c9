"""Serial scanners (RS-232, or USB in CDC-ACM / "virtual COM port" mode) through pyserial.

One `SerialScanner` per `[[scanner]] type = "serial"` block. The device loop only moves
bytes: framing is `drivers.serial_framing.SerialFramer`, host commands are
`drivers.feedback`. `run()` opens the port and reads until stopped. A scanner that is
not there (unplugged, not plugged in yet, or gone mid-read) is the driver's own business:
it shows as `disconnected` and the driver looks for the port again every `REPLUG_POLL`,
resolving the configured path each time, so a USB scanner that comes back as another
`/dev/ttyACMn` is found through its stable `/dev/serial/by-id/...` link within about a
second, not after the Supervisor's backoff. Problems a technician must fix (permissions,
a port locked by another program, a path that is not a serial port) raise DriverError
and are retried by the Supervisor.

    [[scanner]]
    type = "serial"
    name = "counter"
    port = "/dev/serial/by-id/usb-Honeywell_Imaging___Mobility_1900_12345-if00"
    feedback = "honeywell"
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import termios
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import serial

from cards.scan import Scan, scanned
from drivers.feedback import Feedback, feedback_from
from drivers.serial_framing import SerialFramer
from drivers.settings import SerialSettings
from drivers.supervisor import DeviceGone, DriverError, DriverState, Status

log = logging.getLogger("redeemd.drivers.serial")

_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}

# Upper bound on one wait for input: how soon `stop` is noticed and how often the
# configured path is checked while the line is quiet.
POLL = 0.2
# How long a good/bad-read command may take to leave: the engine waits for it.
WRITE_TIMEOUT = 0.25
# A path that stopped resolving to the device we opened is checked this often.
PATH_CHECK_EVERY = 1.0
# How often a missing or vanished port is looked for: a replugged scanner reads again
# within about this long. Looking costs a stat() (or a failed open()) per round.
REPLUG_POLL = 0.5

# What open() fails with when the device node is there but the device is not (yet, or
# any more): a USB device half-way through appearing or going away.
_GONE_ERRNOS = frozenset((errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EIO))


class SerialScanner:
    kind = "serial"

    def __init__(self, name: str, settings: SerialSettings | Mapping[str, object]):
        """`settings`: the [[scanner]] block's, or a mapping checked against the same
        model (drivers/settings.py holds every key's type and default)."""
        self.name = name
        # Every setting is read from here, not copied into attributes: one source each.
        self.settings = s = SerialSettings.of(settings)
        self.commands: Feedback = feedback_from(
            {"feedback": s.feedback, "good_read": s.good_read, "bad_read": s.bad_read}
        )
        self._lock = threading.Lock()
        """Guards `_port` between the reading thread and feedback() on the engine thread."""
        self._port: serial.Serial | None = None
        self._closing = threading.Event()

    @property
    def line(self) -> str:
        """Line settings as a technician writes them: "9600 8N1"."""
        s = self.settings
        return f"{s.baudrate} {s.bytesize}{_PARITY[s.parity]}{s.stopbits}"

    def framer(self) -> SerialFramer:
        """A fresh framer for this scanner's settings (one per connection)."""
        s = self.settings
        return SerialFramer(
            terminator=s.terminator,
            prefix=s.prefix.encode("utf-8"),
            suffix=s.suffix.encode("utf-8"),
            strip_leading=self.commands.replies,
        )

    def run(self, emit: Callable[[Scan], None], stop: threading.Event, state: DriverState) -> None:
        self._closing.clear()
        connected_before = False
        while not self._stopping(stop):
            try:
                port, device = self._open()
                if connected_before:
                    state.restarts += 1
                connected_before = True
                self._serve(port, device, emit, stop, state)
                return  # only stopping ends _serve without an exception
            except DeviceGone as exc:
                self._gone(str(exc), state)
            # Also when a by-id link moved: the old device may linger for a moment, and
            # a node that opens and fails at once must not become a busy loop.
            stop.wait(REPLUG_POLL)

    def _serve(
        self,
        port: serial.Serial,
        device: str,
        emit: Callable[[Scan], None],
        stop: threading.Event,
        state: DriverState,
    ) -> None:
        """Read and frame until stopped; raise DeviceGone when the device goes away."""
        with self._lock:
            self._port = port
        where = self._where(device)
        opened = f"{where} {self.line}"
        state.state = Status.CONNECTED
        state.message = f"open {opened}"
        log.info("scanner %s: open %s", self.name, opened)
        framer = self.framer()
        dropped = 0
        # True from the arrival of bytes until the quiet line after them has been handed
        # to framer.idle(). Once only: a partial read waiting for its terminator stays in
        # the framer, and waiting for the idle gap again would be select(0) in a loop.
        quiet_due = False
        idle_gap = self.settings.idle_gap  # bound once: the loop reads it on every read
        last_data = last_check = time.monotonic()
        try:
            while not self._stopping(stop):
                now = time.monotonic()
                wait = POLL
                if quiet_due:
                    wait = max(0.0, min(POLL, last_data + idle_gap - now))
                data = self._read(port, wait)
                now = time.monotonic()
                if data:
                    frames = framer.feed(data)
                    last_data = now
                    quiet_due = True
                elif quiet_due and now - last_data >= idle_gap:
                    # Also after reads that left nothing pending: a runaway line that was
                    # dropped exactly at a read boundary is still being skipped.
                    frames = framer.idle()
                    quiet_due = False
                else:
                    frames = []
                for frame in frames:
                    emit(scanned(frame, self.name, time.time()))
                if framer.dropped != dropped:
                    dropped = framer.dropped
                    state.message = f"open {opened}; {dropped} over-long read(s) dropped"
                    log.warning(
                        "scanner %s: dropped a read longer than %d bytes without a terminator "
                        "(check the terminator setting)",
                        self.name,
                        framer.max_length,
                    )
                if not data and now - last_check >= PATH_CHECK_EVERY:
                    last_check = now
                    self._check_path(device)
        finally:
            # Forget the port before closing it, so that feedback() never writes to a
            # closed (or, worse, reused) file descriptor.
            with self._lock:
                self._port = None
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()

    def _gone(self, message: str, state: DriverState) -> None:
        """Show the scanner as disconnected; log the change, not every look for it."""
        if state.state is not Status.DISCONNECTED:
            log.warning("scanner %s: %s", self.name, message)
        elif message != state.message:
            log.info("scanner %s: %s", self.name, message)
        state.state = Status.DISCONNECTED
        state.message = message

    def _stopping(self, stop: threading.Event) -> bool:
        return stop.is_set() or self._closing.is_set()

    def feedback(self, accepted: bool) -> None:
        command = self.commands.command(accepted)
        if not command:
            return
        with self._lock:
            port = self._port
            if port is None:
                log.debug("scanner %s: not connected; no feedback sent", self.name)
                return
            try:
                port.write(command)
            except serial.SerialTimeoutException:
                log.warning(
                    "scanner %s: feedback not sent within %.2f s (flow control holding it?)",
                    self.name,
                    WRITE_TIMEOUT,
                )
            except (serial.SerialException, OSError) as exc:
                log.warning("scanner %s: feedback failed: %s", self.name, exc)

    def close(self) -> None:
        self._closing.set()

    def _open(self) -> tuple[serial.Serial, str]:
        # Resolve at every (re)open: /dev/serial/by-id/... follows the device to whatever
        # ttyACMn it got this time.
        s = self.settings
        device = os.path.realpath(s.port)
        if not os.path.exists(device):
            raise DeviceGone(
                f"{s.port} is not there (scanner disconnected, or wrong path: "
                "`redeemd devices` lists serial ports); waiting for it"
            )
        port = serial.Serial()
        port.port = device
        port.baudrate = s.baudrate
        port.bytesize = s.bytesize
        port.parity = _PARITY[s.parity]
        port.stopbits = s.stopbits
        port.rtscts = s.flow == "rtscts"
        port.xonxoff = s.flow == "xonxoff"
        port.timeout = 0  # we wait in select(); a read takes only what is there
        port.write_timeout = WRITE_TIMEOUT
        # flock(LOCK_EX|LOCK_NB): a second redeemd (or anything else using pyserial's
        # exclusive mode) gets a clear refusal instead of half the bytes each.
        port.exclusive = True
        try:
            port.open()
        except (serial.SerialException, OSError) as exc:
            raise self._refusal(device, exc) from None
        return port, device

    def _where(self, device: str) -> str:
        """The configured path, and the device it leads to when that differs (a by-id link)."""
        path = self.settings.port
        return f"{path} -> {device}" if device != path else path

    def _refusal(self, device: str, exc: Exception) -> DriverError:
        """What a failed open() means for the technician: DeviceGone if the device is
        simply not there, DriverError naming the fix otherwise."""
        code = _errno_of(exc)
        path = self.settings.port
        where = self._where(device)
        if code in (errno.EWOULDBLOCK, errno.EAGAIN) or "exclusively lock" in str(exc):
            return DriverError(_in_use(path, device))
        if code == errno.EACCES:
            return DriverError(
                f"{path}: permission denied; add the redeemd user to the group owning "
                f"{device} (usually dialout) or install the udev rule from systemd/"
            )
        if code == errno.EBUSY:
            return DriverError(f"{path} is busy (opened exclusively by another program); stop it")
        if code == errno.ENOTTY:
            # pyserial's "Could not configure port: (25, ...)": the open worked, but the
            # file takes no terminal settings (/dev/null, a plain file, a disk).
            return DriverError(
                f"{where} is not a serial port (it takes no line settings: "
                f"{os.strerror(code)}); check `port` in the [[scanner]] table, "
                "`redeemd devices` lists serial ports"
            )
        if code in _GONE_ERRNOS:
            return DeviceGone(f"{path} disconnected while opening it ({exc}); waiting for it")
        return DriverError(f"{path}: cannot open it: {exc}")

    def _read(self, port: serial.Serial, wait: float) -> bytes:
        try:
            ready, _, _ = select.select([port.fileno()], [], [], wait)
            if not ready:
                return b""
            # A readable port that returns nothing (pyserial raises) or EIO is gone.
            return port.read(port.in_waiting or 1)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceGone(
                f"{self.settings.port} disconnected ({exc}); waiting for it to come back"
            ) from None

    def _check_path(self, device: str) -> None:
        # A by-id link that vanished or moved means the device we hold is gone, even if
        # its tty has not hung up (yet).
        path = self.settings.port
        if os.path.realpath(path) != device or not os.path.exists(device):
            raise DeviceGone(f"{path} disconnected (the path no longer leads to {device})")


def _errno_of(exc: Exception) -> int | None:
    """The errno behind a pyserial error, which often keeps it only in the text of the
    termios.error or OSError it was raised from."""
    code = getattr(exc, "errno", None)
    if code is None and isinstance(exc.__context__, (termios.error, OSError)):
        inner = exc.__context__
        code = getattr(inner, "errno", None) or (inner.args[0] if inner.args else None)
    return code if isinstance(code, int) else None


def _in_use(port: str, device: str) -> str:
    pids = _lock_holders(device)
    if os.getpid() in pids:
        return (
            f"{port} is already open in this redeemd: two [[scanner]] tables name the same "
            "port; remove one or give this scanner another port"
        )
    holders = ", ".join(_describe(pid) for pid in pids[:3]) or _holders(device)
    by = f" ({holders})" if holders else ""
    return (
        f"{port} is in use by another process{by}: another redeemd or a serial tool that "
        "locks the port; stop it or give this scanner another port"
    )


def _lock_holders(device: str) -> list[int]:
    """The pids holding a flock() on `device`, from /proc/locks: exactly the processes
    that made our exclusive open fail, unlike everyone who merely has the port open."""
    try:
        info = os.stat(device)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    wanted = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    pids = []
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 00:1a:3 0 EOF": pid, then major:minor:inode
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "1: -> FLOCK ..." waits for a lock
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                pids.append(int(fields[4]))
        except ValueError:
            continue
    return pids


def _describe(pid: int) -> str:
    try:
        return f"pid {pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})"
    except OSError:  # another user's process, or one that just ended
        return f"pid {pid}"


def _holders(device: str) -> str:
    """Other processes that have `device` open, as "pid 42 (minicom)", as far as we may
    look: a guess at the lock holder when /proc/locks names none (another namespace)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == device for fd in (proc / "fd").iterdir()):
                found.append(_describe(int(proc.name)))
        except OSError:  # other users' processes, or a process that just ended
            continue
    return ", ".join(found[:3])
