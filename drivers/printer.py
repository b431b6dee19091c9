"""The receipt printer: claim codes printed as QR codes by the printer's own QR command.

One `ReceiptPrinter` per `[printer]` table (drivers/settings.py `PrinterSettings`). It
speaks a small subset of Epson ESC/POS that thermal receipt printers share (Epson,
Star in ESC/POS mode, Bixolon, Citizen, the generic 58/80 mm ones): text, alignment,
emphasis, the native QR code (GS ( k), feed and cut, and the real-time status queries
(DLE EOT). The receipt is built by a pure function, `receipt_bytes`; the printer object
only moves bytes and keeps the printer's state for `redeemd status`.

    printer = ReceiptPrinter({"kind": "serial", "device": "/dev/ttyUSB0", "baudrate": 19200})
    printer.print_claim(ClaimReceipt("Coffee card", "https://claim.example.com/c/RC1...",
                                     claim_by=date(2026, 12, 31)))
    printer.describe()   # {"state": "ready", "detail": "...", ...}

A printer that is off, unplugged, out of paper or with its cover open is a state, not a
crash: `check()` never raises, `print_claim()` raises only PrinterError (its message
tells the technician what is wrong and what to do), and the next call opens the
connection again. Nothing here logs or raises the claim URL: it carries the claim code.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import textwrap
import threading
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Protocol

import serial

from drivers.settings import PrinterSettings

log = logging.getLogger("redeemd.drivers.printer")

ESC, GS, DLE, EOT, LF = b"\x1b", b"\x1d", b"\x10", b"\x04", b"\n"

# Byte mode, error correction M: what one model 2 QR symbol (version 40) holds.
MAX_QR_BYTES = 2331


class PrinterState(StrEnum):
    """Where the printer is, as `redeemd status` names it (the words are the contract)."""

    UNKNOWN = "unknown"
    """Not asked yet (or a USB printer that cannot tell, before its first receipt)."""
    READY = "ready"
    PAPER_LOW = "paper_low"
    """The roll's near-end sensor is on: receipts still print; replace the roll soon."""
    PAPER_OUT = "paper_out"
    COVER_OPEN = "cover_open"
    OFFLINE = "offline"
    """Not reachable (unplugged, switched off, no answer) or it says it is offline."""
    ERROR = "error"
    """Something needs a technician: a cutter jam, a wrong baud rate, permissions."""


PRINTABLE = frozenset({PrinterState.READY, PrinterState.PAPER_LOW, PrinterState.UNKNOWN})


@dataclass(frozen=True)
class PrinterStatus:
    state: PrinterState
    detail: str
    """For the technician: what is wrong and what to do ("" when ready)."""
    checked: float | None = None
    """When this state was found (time.time()), None if never asked."""


class PrinterError(RuntimeError):
    """The receipt was not printed (or may be incomplete); `state` says why, the message
    tells the technician what to do. The printer object stays usable."""

    def __init__(self, state: PrinterState, message: str):
        super().__init__(message)
        self.state = state


@dataclass(frozen=True)
class ClaimReceipt:
    """What one claim receipt says. `url` is the claim URL the QR code carries."""

    title: str
    """The card's name, printed in bold."""
    url: str
    claim_by: date | None = None
    prompt: str = "Scan to add to your wallet"
    lines: tuple[str, ...] = field(default=())
    """Further lines under the claim-by date (terms, a reference number)."""


# ---------------------------------------------------------------------------------------
# The receipt as ESC/POS bytes (pure)


def qr_bytes(payload: bytes, module_size: int) -> bytes:
    """GS ( k: select model 2, module size, error correction M, store, print.

    Functions 165, 167, 169, 180, 181 of the Epson reference (cn = 49 is QR; fn = 65,
    67, 69, 80, 81). pL pH count the bytes after themselves, so the store command's is
    len(payload) + 3 (cn, fn, m).
    """
    if not payload or len(payload) > MAX_QR_BYTES:
        raise ValueError(f"a QR code holds 1 to {MAX_QR_BYTES} bytes, not {len(payload)}")
    if not 1 <= module_size <= 16:
        raise ValueError(f"QR module size must be 1-16 dots, not {module_size}")

    def k(fn: int, data: bytes) -> bytes:
        return GS + b"(k" + struct.pack("<H", len(data) + 2) + bytes((49, fn)) + data

    return (
        k(65, b"2\x00")  # model 2
        + k(67, bytes((module_size,)))
        + k(69, b"1")  # error correction M (48 L, 49 M, 50 Q, 51 H): ~15% damage
        + k(80, b"0" + payload)
        + k(81, b"0")
    )


def printable(text: str) -> str:
    """`text` as plain ASCII, which every ESC/POS printer prints the same whatever
    code page it is set to: accents dropped ("Café" -> "Cafe"), other letters "?"."""
    plain = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    return "".join(c if " " <= c <= "~" else "?" for c in plain)


def _lines(text: str, columns: int) -> list[str]:
    return textwrap.wrap(printable(text), columns) or [""]


def receipt_bytes(receipt: ClaimReceipt, settings: PrinterSettings) -> bytes:
    """The whole receipt: header, title, prompt, QR code, the URL as text, claim-by
    date, footer, feed and cut. Raises ValueError for a URL no QR code can hold."""
    url = receipt.url.encode("ascii")  # a URL is ASCII; anything else is a caller's bug
    columns = settings.columns
    out = bytearray(ESC + b"@" + ESC + b"a\x01")  # initialise, centre

    def text(line: str) -> None:
        for part in _lines(line, columns):
            out.extend(part.encode("ascii") + LF)

    for line in settings.header:
        text(line)
    out.extend(ESC + b"E\x01")
    text(receipt.title)
    out.extend(ESC + b"E\x00")
    text(receipt.prompt)
    out.extend(qr_bytes(url, settings.qr_module_size) + LF)
    # Under the code for a customer whose phone will not scan it; cut to the line width
    # at any character (a URL has no spaces to wrap at).
    for start in range(0, len(url), columns):
        out.extend(url[start : start + columns] + LF)
    if receipt.claim_by is not None:
        text(f"Claim by {receipt.claim_by.isoformat()}")
    for line in (*receipt.lines, *settings.footer):
        text(line)
    out.extend(ESC + b"a\x00")
    # GS V 66 n: feed to the cutter and cut partially (the receipt hangs until torn
    # off, so it does not drop to the floor of an unattended box).
    out.extend(GS + b"V\x42\x03" if settings.cut else ESC + b"d\x04")
    return bytes(out)


# ---------------------------------------------------------------------------------------
# Real-time status (pure)

# Every DLE EOT answer has bits 1 and 4 set and bits 0 and 7 clear: anything else is not
# an answer (line noise, a wrong baud rate, XON/XOFF, an automatic status block).
_FIXED_MASK, _FIXED_BITS = 0x93, 0x12


def is_status_byte(value: int) -> bool:
    return value & _FIXED_MASK == _FIXED_BITS


def decode_status(
    printer: int, paper: int | None, offline: int | None = None, error: int | None = None
) -> tuple[PrinterState, str]:
    """The state from the answers to DLE EOT 1 (printer), 4 (roll paper sensor) and,
    when the printer says it is offline, 2 (offline cause) and 3 (error cause). None:
    the printer did not answer that query (older models know only DLE EOT 1)."""
    paper = 0x12 if paper is None else paper
    if paper & 0x60 == 0x60:
        return PrinterState.PAPER_OUT, "out of paper: load a new roll and close the cover"
    if printer & 0x08:
        if offline is not None and offline & 0x04:
            return PrinterState.COVER_OPEN, "the cover is open: close it"
        if offline is not None and offline & 0x20:
            return PrinterState.PAPER_OUT, "out of paper: load a new roll and close the cover"
        if offline is not None and offline & 0x40:
            return PrinterState.ERROR, _error_detail(error)
        if offline is not None and offline & 0x08:
            return PrinterState.OFFLINE, "paper is being fed with the feed button"
        return (
            PrinterState.OFFLINE,
            "the printer says it is offline: check its lights, close the cover, "
            "or switch it off and on",
        )
    if paper & 0x0C == 0x0C:
        return PrinterState.PAPER_LOW, "paper near its end: replace the roll soon"
    return PrinterState.READY, ""


def _error_detail(error: int | None) -> str:
    if error is not None and error & 0x08:
        return (
            "autocutter error (paper jammed at the cutter): open the cover, "
            "clear the paper, close it"
        )
    if error is not None and error & 0x20:
        return "unrecoverable printer error: switch the printer off and on; if it stays, replace it"
    if error is not None and error & 0x40:
        return "the print head is too hot: it recovers by itself after a pause"
    return "the printer reports an error: switch it off and on"


# ---------------------------------------------------------------------------------------
# Transports: they move bytes and turn every I/O failure into PrinterError.


class _Transport(Protocol):
    answers: bool
    """Whether the printer's answers can be read on this connection."""

    def write(self, data: bytes, timeout: float) -> None: ...

    def read(self, timeout: float) -> bytes:
        """Whatever arrives within `timeout` (b"" if nothing)."""
        ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


def _offline(message: str) -> PrinterError:
    return PrinterError(PrinterState.OFFLINE, message)


def _fd_write(fd: int, data: bytes, timeout: float, where: str) -> None:
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        _, ready, _ = select.select([], [fd], [], max(0.0, left))
        if not ready:
            raise _offline(
                f"{where} did not take the receipt within {timeout:g} s: it is out of paper, "
                "its cover is open, or it is off; check it, then print again"
            )
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


class _SerialPort:
    answers = True

    def __init__(self, settings: PrinterSettings):
        device = os.path.realpath(settings.device)
        self.where = settings.device
        port = serial.Serial()
        port.port = device
        port.baudrate = settings.baudrate
        port.rtscts = settings.flow == "rtscts"
        port.dsrdtr = settings.flow == "dsrdtr"
        port.xonxoff = settings.flow == "xonxoff"
        port.timeout = 0  # reads wait in select()
        port.write_timeout = settings.timeout
        port.exclusive = True  # two programs printing at once interleave their bytes
        try:
            port.open()
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise _open_refusal(settings.device, exc, "dialout") from None
        self.port = port

    def write(self, data: bytes, timeout: float) -> None:
        try:
            # No flush() (tcdrain): it waits without a timeout while flow control holds
            # the line. The status query after the receipt confirms it left instead.
            self.port.write(data)
        except serial.SerialTimeoutException:
            raise _offline(
                f"{self.where} did not take the receipt within {timeout:g} s (flow control "
                "holding it: the printer is off, out of paper or its cover is open)"
            ) from None
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise _offline(f"{self.where} disconnected while printing ({exc})") from None

    def read(self, timeout: float) -> bytes:
        try:
            ready, _, _ = select.select([self.port.fileno()], [], [], timeout)
            # Readable and then nothing (pyserial raises) or EIO: the device is gone.
            return self.port.read(self.port.in_waiting or 1) if ready else b""
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise _offline(f"{self.where} disconnected ({exc})") from None

    def drain(self) -> None:
        try:
            self.port.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise _offline(f"{self.where} disconnected ({exc})") from None

    def close(self) -> None:
        with contextlib.suppress(serial.SerialException, OSError, ValueError):
            self.port.close()


# linux/lp.h: the usblp driver answers LPGETSTATUS with the IEEE 1284 status byte.
_LPGETSTATUS = 0x060B
_LP_PERRORP, _LP_PSELECD, _LP_POUTPA = 0x08, 0x10, 0x20


class _UsbFile:
    """A USB printer-class device (/dev/usb/lp0, the kernel's usblp). Many printers'
    USB interface is one-way, so no DLE EOT: the state comes from the port status the
    kernel reads for us where it can (LPGETSTATUS), else from whether writes go through."""

    answers = False

    def __init__(self, settings: PrinterSettings):
        self.where = settings.device
        try:
            # Non-blocking: usblp holds a write while the printer refuses data (out of
            # paper); we wait for it in select() with our own timeout instead.
            self.fd = os.open(settings.device, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_refusal(settings.device, exc, "lp") from None

    def port_status(self) -> tuple[PrinterState, str] | None:
        """From the kernel, or None for a device that cannot tell (not usblp)."""
        buffer = bytearray(4)
        try:
            fcntl.ioctl(self.fd, _LPGETSTATUS, buffer, True)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise _offline(f"{self.where} disconnected ({exc})") from None
        status = int.from_bytes(buffer, "little")
        if status & _LP_POUTPA:
            return PrinterState.PAPER_OUT, "out of paper: load a new roll and close the cover"
        if not status & _LP_PSELECD:
            return PrinterState.OFFLINE, "the printer says it is offline: check its lights"
        if not status & _LP_PERRORP:
            return PrinterState.ERROR, "the printer reports an error: switch it off and on"
        return PrinterState.READY, ""

    def write(self, data: bytes, timeout: float) -> None:
        try:
            _fd_write(self.fd, data, timeout, self.where)
        except OSError as exc:
            raise _offline(f"{self.where} disconnected while printing ({exc})") from None
        except PrinterError:
            # Not taken in time: the kernel may know why (paper out, offline).
            found = self.port_status()
            if found is None or found[0] is PrinterState.READY:
                raise
            raise PrinterError(*found) from None

    def read(self, timeout: float) -> bytes:
        return b""

    def drain(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Socket:
    """Raw TCP (port 9100, "JetDirect"): a connection per use, because a network
    printer serves one connection at a time and other hosts may print to it too."""

    answers = True

    def __init__(self, settings: PrinterSettings):
        host, port = settings.address
        self.where = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=settings.timeout)
        except socket.gaierror as exc:
            raise PrinterError(
                PrinterState.ERROR,
                f"printer {host}: the name does not resolve ({exc.strerror}); "
                "check `device` in [printer] or give its IP address",
            ) from None
        except ConnectionRefusedError:
            raise _offline(
                f"printer {self.where} refused the connection: it is starting up, busy "
                "with another host's job, or not a raw (9100) printer port; check the port"
            ) from None
        except OSError as exc:  # timeout, no route, network unreachable
            raise _offline(
                f"printer {self.where} cannot be reached ({exc or 'timed out'}): it is off, "
                "unplugged or has another address; its self-test slip shows the address"
            ) from None

    def write(self, data: bytes, timeout: float) -> None:
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except OSError as exc:
            raise _offline(f"printer {self.where} went away while printing ({exc})") from None

    def read(self, timeout: float) -> bytes:
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return b""
            data = self.sock.recv(64)
        except OSError as exc:
            raise _offline(f"printer {self.where} went away ({exc})") from None
        if not data:
            raise _offline(f"printer {self.where} closed the connection")
        return data

    def drain(self) -> None:
        while self.read(0):
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _open_refusal(path: str, exc: BaseException, group: str) -> PrinterError:
    """What a failed open means for the technician."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EIO):
        return _offline(
            f"{path} is not there: the printer is unplugged or off, or the path is wrong "
            "(`ls -l /dev/serial/by-id /dev/usb` lists printers)"
        )
    if code == errno.EACCES:
        return PrinterError(
            PrinterState.ERROR,
            f"{path}: permission denied; add the redeemd user to the group owning it "
            f"(usually {group}) or install the udev rule from systemd/",
        )
    if code in (errno.EBUSY, errno.EAGAIN) or "exclusively lock" in text:
        return PrinterError(
            PrinterState.ERROR,
            f"{path} is in use by another program (a print spooler such as CUPS, or a "
            "serial tool); stop it or give redeemd the printer alone",
        )
    if "configure port" in text:  # pyserial: it opened but takes no line settings
        return PrinterError(
            PrinterState.ERROR,
            f'{path} is not a serial port: use kind = "usb" for /dev/usb/lp*, or fix `device`',
        )
    return _offline(f"{path}: cannot open it ({exc})")


def _open(settings: PrinterSettings) -> _Transport:
    if settings.kind == "serial":
        return _SerialPort(settings)
    if settings.kind == "usb":
        return _UsbFile(settings)
    return _Socket(settings)


# ---------------------------------------------------------------------------------------


class ReceiptPrinter:
    """One receipt printer. Thread-safe: the daemon's status and its dispensing may call
    it at once; calls take turns. `close()` when done (or use it as a context manager)."""

    def __init__(self, settings: PrinterSettings | Mapping[str, object]):
        """`settings`: the [printer] table's, or a mapping checked against the same model."""
        self.settings = PrinterSettings.of(settings)
        self._lock = threading.Lock()
        self._transport: _Transport | None = None
        self._status = PrinterStatus(PrinterState.UNKNOWN, "not asked yet")

    @property
    def status(self) -> PrinterStatus:
        """The state found by the last call (no I/O)."""
        return self._status

    @property
    def state(self) -> PrinterState:
        return self._status.state

    def describe(self) -> dict[str, object]:
        """For `redeemd status`: {"state": "paper_out", "detail": "...", ...} (no I/O)."""
        status = self._status
        return {
            "state": str(status.state),
            "detail": status.detail,
            "kind": self.settings.kind,
            "device": self.settings.device,
            "checked": status.checked,
        }

    def check(self) -> PrinterStatus:
        """Ask the printer now. Never raises for I/O: a printer that cannot be reached is
        state `offline`. Takes at most a few `timeout`s (one for a silent printer)."""
        with self._lock:
            try:
                self._record(self._ask_state())
            except PrinterError as exc:
                self._failed(exc)
            finally:
                self._release()
            return self._status

    def print_claim(self, receipt: ClaimReceipt) -> None:
        """Print one claim receipt. Raises PrinterError if it was not printed, or may be
        incomplete (the paper ran out, the printer vanished); ValueError for a URL no QR
        code holds. The state afterwards is in `status`."""
        data = receipt_bytes(receipt, self.settings)
        with self._lock:
            try:
                try:
                    before = self._ask_state()
                except PrinterError as exc:
                    raise PrinterError(exc.state, f"receipt not printed: {exc}") from None
                self._record(before)
                if before[0] not in PRINTABLE:
                    raise PrinterError(before[0], f"receipt not printed: {before[1]}")
                try:
                    self._connected().write(data, self.settings.timeout)
                    # The answer comes after the receipt's bytes have gone down the line.
                    after = self._ask_state(grace=self._line_time(len(data)))
                except PrinterError as exc:
                    raise PrinterError(exc.state, f"the receipt may be incomplete: {exc}") from None
                if after[0] not in PRINTABLE:
                    raise PrinterError(
                        after[0], f"the receipt may be incomplete: {after[1]}; then print it again"
                    )
                self._record(after)
            except PrinterError as exc:
                self._failed(exc)
                raise
            finally:
                self._release()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> ReceiptPrinter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- inside the lock -------------------------------------------------------------

    def _connected(self) -> _Transport:
        if self._transport is None:
            self._transport = _open(self.settings)
        return self._transport

    def _release(self) -> None:
        # A network printer's connection is given back after each use; a serial port or
        # usblp device is kept (held exclusively) until it fails.
        if self.settings.kind == "network":
            self._drop()

    def _drop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _record(self, found: tuple[PrinterState, str]) -> None:
        state, detail = found
        if state != self._status.state:
            level = logging.INFO if state in PRINTABLE else logging.WARNING
            log.log(level, "printer %s: %s %s", self.settings.device, state, detail)
        self._status = PrinterStatus(state, detail, time.time())

    def _failed(self, exc: PrinterError) -> None:
        if exc.state is PrinterState.OFFLINE or exc.state is PrinterState.ERROR:
            # The connection may be half dead: open it afresh next time.
            self._drop()
        self._record((exc.state, str(exc)))

    def _line_time(self, size: int) -> float:
        """How long `size` bytes take down a serial line (10 bits a byte at 8N1)."""
        return size * 10 / self.settings.baudrate if self.settings.kind == "serial" else 0.0

    def _ask_state(self, grace: float = 0.0) -> tuple[PrinterState, str]:
        transport = self._connected()
        if isinstance(transport, _UsbFile):
            return transport.port_status() or (PrinterState.READY, "")
        if not (transport.answers and self.settings.status_query):
            return PrinterState.READY, ""
        printer = self._query(transport, 1, grace)
        assert printer is not None  # DLE EOT 1 must be answered
        # Once DLE EOT 1 is answered the line works: a printer that does not answer the
        # others does not know them.
        paper = self._query(transport, 4, required=False)
        offline = error = None
        if printer & 0x08:
            offline = self._query(transport, 2, required=False)
            if offline is not None and offline & 0x40:
                error = self._query(transport, 3, required=False)
        return decode_status(printer, paper, offline, error)

    def _query(
        self, transport: _Transport, n: int, grace: float = 0.0, required: bool = True
    ) -> int | None:
        """DLE EOT n and its one-byte answer. Bytes that are no answer are skipped; if
        only such bytes come, the line is wrong (baud rate) or it is no ESC/POS printer.
        Not `required`: None instead of raising."""
        transport.drain()  # a late answer to an earlier query is not this one's
        transport.write(DLE + EOT + bytes((n,)), self.settings.timeout)
        deadline = time.monotonic() + self.settings.timeout + grace
        junk = bytearray()
        while (left := deadline - time.monotonic()) > 0:
            for value in transport.read(left):
                if is_status_byte(value):
                    return value
                junk.append(value)
        if not required:
            return None
        where = f"printer {self.settings.device}"
        if junk:
            raise PrinterError(
                PrinterState.ERROR,
                f"{where} answered the status query with {bytes(junk[:8]).hex(' ')}, which "
                "is no ESC/POS status: check `baudrate` and `flow` against the printer's "
                "self-test slip, and that it is an ESC/POS printer",
            )
        raise _offline(
            f"{where} did not answer the status query within {self.settings.timeout:g} s: "
            "it is off or its cable is loose; a printer that never answers (a one-way "
            "cable) needs status_query = false"
        )


def main(argv: list[str] | None = None) -> int:
    """Test-print from a shell: python -m drivers.printer serial /dev/ttyUSB0 --baudrate 19200"""
    parser = argparse.ArgumentParser(
        prog="python -m drivers.printer",
        description="Print a sample claim receipt, or only show the printer's state.",
    )
    parser.add_argument("kind", choices=("serial", "usb", "network"))
    parser.add_argument("device", help="/dev/... path, or host[:port] for network")
    parser.add_argument("--baudrate", type=int, default=None)
    parser.add_argument("--status", action="store_true", help="only ask the printer's state")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the state line below says it once
    given: dict[str, object] = {"kind": args.kind, "device": args.device}
    if args.baudrate is not None:
        given["baudrate"] = args.baudrate
    with ReceiptPrinter(given) as printer:
        if args.status:
            status = printer.check()
        else:
            sample = ClaimReceipt(
                "Test receipt", "https://claim.example.com/c/TEST", claim_by=date.today()
            )
            with contextlib.suppress(PrinterError):  # the state below says why
                printer.print_claim(sample)
            status = printer.status
    print(f"{status.state}{': ' + status.detail if status.detail else ''}")
    return 0 if status.state in PRINTABLE else 1


if __name__ == "__main__":
    raise SystemExit(main())
