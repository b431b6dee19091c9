"""Serial scanners (RS-232, or USB in CDC-ACM / "virtual COM port" mode) through pyserial.

One `SerialScanner` per `[[scanner]] type = "serial"` block. The device loop only moves
bytes: framing is `drivers.serial_framing.SerialFramer`, host commands are
`drivers.feedback`. `run()` opens the port, reads until stopped and raises DriverError
when the scanner goes away; the Supervisor retries with backoff, and the next `run()`
resolves the configured path again, so a USB scanner that comes back as another
`/dev/ttyACMn` is found through its stable `/dev/serial/by-id/...` link without a restart.

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
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import serial

from cards.scan import Scan
from drivers.feedback import Feedback, feedback_from
from drivers.serial_framing import SerialFramer
from drivers.supervisor import DriverError, DriverState

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


class SerialScanner:
    kind = "serial"

    def __init__(self, name: str, settings: Mapping[str, object]):
        self.name = name
        self.port = str(settings["port"])
        self.baudrate = int(settings.get("baudrate", 9600))  # type: ignore[call-overload]
        self.bytesize = int(settings.get("bytesize", 8))  # type: ignore[call-overload]
        self.parity = str(settings.get("parity", "none"))
        self.stopbits = settings.get("stopbits", 1)
        self.flow = str(settings.get("flow", "none"))
        self.terminator = str(settings.get("terminator", "auto"))
        self.idle_gap = float(settings.get("idle_gap", 0.05))  # type: ignore[arg-type]
        self.prefix = _text_bytes(settings.get("prefix", ""))
        self.suffix = _text_bytes(settings.get("suffix", ""))
        self.commands: Feedback = feedback_from(settings)
        self._lock = threading.Lock()
        """Guards `_port` between the reading thread and feedback() on the engine thread."""
        self._port: serial.Serial | None = None
        self._closing = threading.Event()

    @property
    def line(self) -> str:
        """Line settings as a technician writes them: "9600 8N1"."""
        return f"{self.baudrate} {self.bytesize}{_PARITY[self.parity]}{self.stopbits}"

    def framer(self) -> SerialFramer:
        """A fresh framer for this scanner's settings (one per connection)."""
        return SerialFramer(
            terminator=self.terminator,
            prefix=self.prefix,
            suffix=self.suffix,
            strip_leading=self.commands.replies,
        )

    def run(self, emit: Callable[[Scan], None], stop: threading.Event, state: DriverState) -> None:
        self._closing.clear()
        port, device = self._open()
        with self._lock:
            self._port = port
        where = f"{self.port} -> {device}" if device != self.port else self.port
        opened = f"{where} {self.line}"
        state.state = "connected"
        state.message = f"open {opened}"
        log.info("scanner %s: open %s", self.name, opened)
        framer = self.framer()
        dropped = 0
        last_data = last_check = time.monotonic()
        try:
            while not stop.is_set() and not self._closing.is_set():
                now = time.monotonic()
                wait = POLL
                if framer.pending:
                    wait = max(0.0, min(POLL, last_data + self.idle_gap - now))
                data = self._read(port, wait)
                now = time.monotonic()
                if data:
                    frames = framer.feed(data)
                    last_data = now
                elif framer.pending and now - last_data >= self.idle_gap:
                    frames = framer.idle()
                else:
                    frames = []
                for frame in frames:
                    emit(Scan(code=frame, source=self.name, at=time.time()))
                if framer.dropped != dropped:
                    dropped = framer.dropped
                    state.message = f"open {opened}; {dropped} over-long read(s) dropped"
                    log.warning(
                        "scanner %s: dropped a read longer than %d bytes without a terminator "
                        "(check the terminator setting)", self.name, framer.max_length,
                    )  # fmt: skip
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
                    self.name, WRITE_TIMEOUT,
                )  # fmt: skip
            except (serial.SerialException, OSError) as exc:
                log.warning("scanner %s: feedback failed: %s", self.name, exc)

    def close(self) -> None:
        self._closing.set()

    def _open(self) -> tuple[serial.Serial, str]:
        # Resolve at every (re)open: /dev/serial/by-id/... follows the device to whatever
        # ttyACMn it got this time.
        device = os.path.realpath(self.port)
        if not os.path.exists(device):
            raise DriverError(
                f"{self.port} is not there (scanner disconnected, or wrong path: "
                "`redeemd devices` lists serial ports); waiting for it"
            )
        port = serial.Serial()
        port.port = device
        port.baudrate = self.baudrate
        port.bytesize = self.bytesize
        port.parity = _PARITY[self.parity]
        port.stopbits = self.stopbits
        port.rtscts = self.flow == "rtscts"
        port.xonxoff = self.flow == "xonxoff"
        port.timeout = 0  # we wait in select(); a read takes only what is there
        port.write_timeout = WRITE_TIMEOUT
        # flock(LOCK_EX|LOCK_NB): a second redeemd (or anything else using pyserial's
        # exclusive mode) gets a clear refusal instead of half the bytes each.
        port.exclusive = True
        try:
            port.open()
        except serial.SerialException as exc:
            raise DriverError(self._open_failure(device, exc)) from None
        except OSError as exc:  # e.g. termios on something that is not a tty
            raise DriverError(f"{self.port}: cannot use it as a serial port: {exc}") from None
        return port, device

    def _open_failure(self, device: str, exc: serial.SerialException) -> str:
        code = exc.errno
        if code in (errno.EWOULDBLOCK, errno.EAGAIN) or "exclusively lock" in str(exc):
            holders = _holders(device)
            by = f" ({holders})" if holders else ""
            return (
                f"{self.port} is in use by another process{by}: another redeemd or a serial "
                "tool that locks the port; stop it or give this scanner another port"
            )
        if code == errno.EACCES:
            return (
                f"{self.port}: permission denied; add the redeemd user to the group owning "
                f"{device} (usually dialout) or install the udev rule from systemd/"
            )
        if code == errno.EBUSY:
            return f"{self.port} is busy (opened exclusively by another program); stop it"
        if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EIO):
            return f"{self.port} disconnected while opening it ({exc}); waiting for it"
        return f"{self.port}: cannot open it: {exc}"

    def _read(self, port: serial.Serial, wait: float) -> bytes:
        try:
            ready, _, _ = select.select([port.fileno()], [], [], wait)
            if not ready:
                return b""
            # A readable port that returns nothing (pyserial raises) or EIO is gone.
            return port.read(port.in_waiting or 1)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DriverError(
                f"{self.port} disconnected ({exc}); waiting for it to come back"
            ) from None

    def _check_path(self, device: str) -> None:
        # A by-id link that vanished or moved means the device we hold is gone, even if
        # its tty has not hung up (yet).
        if os.path.realpath(self.port) != device or not os.path.exists(device):
            raise DriverError(f"{self.port} disconnected (the path no longer leads to {device})")


def _text_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _holders(device: str) -> str:
    """Which processes have `device` open, as "pid 42 (minicom)", as far as we may look."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == device:
                    if int(proc.name) == os.getpid():
                        found.append("this redeemd: two [[scanner]] blocks with one port?")
                    else:
                        comm = (proc / "comm").read_text().strip()
                        found.append(f"pid {proc.name} ({comm})")
                    break
        except OSError:  # other users' processes, or a process that just ended
            continue
    return ", ".join(found[:3])
