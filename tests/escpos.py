"""ESC/POS for tests: a parser of what a printer was sent, and fake printers.

`parse(data)` reads the byte stream a receipt printer received and says what it would
have printed: text lines, QR codes (the payload stored with GS ( k function 180 and
whether function 181 printed it), cuts, status queries. It knows the commands
drivers/printer.py sends and refuses any other, so a new command shows up in a test.

`PtyPrinter` (the far side of a real pseudo-terminal, opened through a stable symlink
like /dev/serial/by-id/...) and `TcpPrinter` (a real loopback server, like port 9100)
record what they receive and answer DLE EOT status queries from `answers`, which a test
sets to one of STATUS's presets or to its own bytes. Both can vanish mid-receipt and
come back.

    printer = PtyPrinter(tmp_path / "printer")
    ... print to str(printer.path) ...
    (receipt,) = parse(printer.wait_for(CUT)).receipts
    assert receipt.qr_codes[0].payload == url.encode()
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ptys import Pty

WAIT = 60.0
CUT = b"\x1dVB"
"""GS V 66: feed and partial cut, the end of each receipt."""

# DLE EOT n -> the printer's answer. Status bytes have bits 1 and 4 set (0x12).
_ALL_OK = {1: b"\x12", 2: b"\x12", 3: b"\x12", 4: b"\x12"}
STATUS: dict[str, dict[int, bytes]] = {
    "online": _ALL_OK,
    "paper_low": {**_ALL_OK, 4: b"\x1e"},  # near-end sensor bits 2-3
    "paper_out": {**_ALL_OK, 1: b"\x1a", 2: b"\x32", 4: b"\x72"},  # offline, paper end
    "cover_open": {**_ALL_OK, 1: b"\x1a", 2: b"\x16"},
    "offline": {**_ALL_OK, 1: b"\x1a"},  # offline, no cause given
    "cutter_jam": {**_ALL_OK, 1: b"\x1a", 2: b"\x52", 3: b"\x1a"},
    "silent": {},
    "status_1_only": {1: b"\x12"},  # an older model: DLE EOT 1 only
    "junk": {1: b"\xff\x00", 2: b"\xff", 3: b"\xff", 4: b"\xff"},
    # XOFF and a stray byte before the real answer: the answer counts.
    "noisy_online": {n: b"\x13\x80" + answer for n, answer in _ALL_OK.items()},
}


# ---------------------------------------------------------------------------------------
# The parser


@dataclass
class QrCode:
    payload: bytes
    model: int | None
    module_size: int | None
    error_correction: str | None
    """"L", "M", "Q" or "H"."""
    printed: bool = False
    """Function 181 followed the store."""


@dataclass
class PrintedReceipt:
    lines: list[str] = field(default_factory=list)
    qr_codes: list[QrCode] = field(default_factory=list)
    cut: bool = False
    qr_at: int | None = None
    """How many lines came before the first QR code."""

    def text_after_qr(self) -> list[str]:
        """The lines printed after the first QR code."""
        assert self.qr_at is not None, f"no QR code in {self.lines}"
        return self.lines[self.qr_at :]


@dataclass
class Parsed:
    receipts: list[PrintedReceipt]
    """Split at each cut; the last one is not cut if the stream ended before."""
    status_queries: list[int]
    """n of each DLE EOT n, in order."""
    incomplete: bool
    """The stream ends inside a command (the printer vanished mid-receipt)."""


class EscPosError(ValueError):
    pass


_ESC_ARGS = {ord("@"): 0, ord("a"): 1, ord("E"): 1, ord("d"): 1, ord("t"): 1, ord("!"): 1}
_EC = {48: "L", 49: "M", 50: "Q", 51: "H"}


def parse(data: bytes) -> Parsed:
    """What a printer that received `data` printed. Raises EscPosError for a command
    it does not know, or a QR command whose length fields do not add up."""
    receipts = [PrintedReceipt()]
    queries: list[int] = []
    line = bytearray()
    qr: dict[str, int | None] = {"model": None, "module_size": None}
    ec: str | None = None
    i = 0
    n = len(data)

    def need(count: int) -> bool:
        return i + count <= n

    while i < n:
        byte = data[i]
        receipt = receipts[-1]
        if byte == 0x0A:
            receipt.lines.append(line.decode("ascii", "replace"))
            line.clear()
            i += 1
        elif byte == 0x10:  # DLE EOT n
            if not need(3):
                return Parsed(receipts, queries, True)
            if data[i + 1] != 0x04:
                raise EscPosError(f"DLE {data[i + 1]:#x} at {i}: only DLE EOT is known")
            queries.append(data[i + 2])
            i += 3
        elif byte == 0x1B:  # ESC
            if not need(2):
                return Parsed(receipts, queries, True)
            command = data[i + 1]
            if command not in _ESC_ARGS:
                raise EscPosError(f"ESC {chr(command)!r} at {i}: unknown command")
            size = 2 + _ESC_ARGS[command]
            if not need(size):
                return Parsed(receipts, queries, True)
            if command == ord("d"):  # feed n lines
                receipt.lines.extend([""] * data[i + 2])
            i += size
        elif byte == 0x1D:  # GS
            if not need(2):
                return Parsed(receipts, queries, True)
            command = data[i + 1]
            if command == ord("V"):
                if not need(3):
                    return Parsed(receipts, queries, True)
                size = 4 if data[i + 2] in (65, 66) else 3
                if not need(size):
                    return Parsed(receipts, queries, True)
                if line:  # a cut prints what is in the line buffer first
                    receipt.lines.append(line.decode("ascii", "replace"))
                    line.clear()
                receipt.cut = True
                receipts.append(PrintedReceipt())
                i += size
            elif command == ord("(") and need(3) and data[i + 2] == ord("k"):
                if not need(5):
                    return Parsed(receipts, queries, True)
                (length,) = struct.unpack_from("<H", data, i + 3)
                if not need(5 + length):
                    return Parsed(receipts, queries, True)
                body = data[i + 5 : i + 5 + length]
                if len(body) < 2 or body[0] != 49:
                    raise EscPosError(f"GS ( k at {i}: not a QR command (cn {body[:1]!r})")
                fn, args = body[1], body[2:]
                if fn == 65:  # 165: model
                    qr["model"] = args[0] - 48
                elif fn == 67:  # 167: module size
                    qr["module_size"] = args[0]
                elif fn == 69:  # 169: error correction
                    ec = _EC.get(args[0], "?")
                elif fn == 80:  # 180: store
                    if args[:1] != b"0":
                        raise EscPosError(f"GS ( k 180 at {i}: m must be 48, is {args[:1]!r}")
                    if receipt.qr_at is None:
                        receipt.qr_at = len(receipt.lines)
                    receipt.qr_codes.append(
                        QrCode(bytes(args[1:]), qr["model"], qr["module_size"], ec)
                    )
                elif fn == 81:  # 181: print the stored symbol
                    if not receipt.qr_codes:
                        raise EscPosError(f"GS ( k 181 at {i}: print with nothing stored")
                    receipt.qr_codes[-1].printed = True
                else:
                    raise EscPosError(f"GS ( k at {i}: unknown QR function {fn}")
                i += 5 + length
            elif command == ord("!"):
                if not need(3):
                    return Parsed(receipts, queries, True)
                i += 3
            else:
                raise EscPosError(f"GS {chr(command)!r} at {i}: unknown command")
        elif byte < 0x20:
            raise EscPosError(f"control byte {byte:#04x} at {i}: unknown command")
        else:
            line.append(byte)
            i += 1
    return Parsed(receipts, queries, bool(line))


# ---------------------------------------------------------------------------------------
# Fake printers


class FakePrinter:
    """What both fakes share: the bytes received, the answers to status queries, the
    trigger that makes the printer vanish. The serving thread is owned: `close()`
    stops and joins it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.answers: dict[int, bytes] = dict(STATUS["online"])
        self.vanish_on: bytes | None = None
        """When this arrives, the printer vanishes before answering anything more."""
        self.change_on: tuple[bytes, str] | None = None
        """(bytes, preset): when the bytes arrive, the answers become STATUS[preset]
        (the paper runs out while a receipt prints)."""
        self.vanished = threading.Event()
        self._changed = threading.Condition()
        self._scanned = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_status(self, name: str) -> None:
        self.answers = dict(STATUS[name])

    def wait_for(self, expected: bytes, count: int = 1, timeout: float = WAIT) -> bytes:
        """All bytes received, once `expected` appears `count` times in them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.received.count(expected) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{expected!r} x{count} never arrived; got {bytes(self.received)!r}"
                    )
                self._changed.wait(left)
            return bytes(self.received)

    def _take(self, data: bytes) -> tuple[bytes, bool]:
        """Record `data`; return the answers due and whether to vanish now."""
        with self._changed:
            self.received += data
            self._changed.notify_all()
            if self.vanish_on is not None and self.vanish_on in self.received[self._scanned :]:
                self.vanish_on = None
                self._scanned = len(self.received)
                return b"", True
            if self.change_on is not None and self.change_on[0] in self.received:
                self.set_status(self.change_on[1])
                self.change_on = None
            replies = bytearray()
            # Real-time commands are acted on as they arrive, wherever they are.
            start = max(0, self._scanned - 2)
            while (found := self.received.find(b"\x10\x04", start)) >= 0:
                if found + 2 >= len(self.received):
                    break
                replies += self.answers.get(self.received[found + 2], b"")
                start = found + 3
            self._scanned = max(self._scanned, start, len(self.received) - 2)
            return bytes(replies), False

    def _start(self, target: object) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
        self._thread.start()

    def _join(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
            assert not self._thread.is_alive(), "the fake printer's thread did not stop"
        self._thread = None


class PtyPrinter(FakePrinter):
    """A serial printer on a real pty; the driver opens `path`, a symlink to the slave
    (as /dev/serial/by-id/... is), which `replug()` points at a new pty."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.pty: Pty | None = None
        self.replug()

    def replug(self) -> None:
        self.unplug()
        self.pty = Pty()
        self.vanished.clear()
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.pty.path)
        tmp.replace(self.path)
        self._start(self._serve)

    def _serve(self) -> None:
        pty = self.pty
        assert pty is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([pty.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(pty.master, 4096)
            except OSError:  # EIO: nobody has the slave open right now
                time.sleep(0.01)
                continue
            replies, vanish = self._take(data)
            if vanish:
                pty.unplug()  # the driver's slave now reads and writes EIO
                self.vanished.set()
                return
            if replies:
                pty.send(replies)

    def unplug(self) -> None:
        """The printer is gone: the pty closes (its path stays, leading nowhere)."""
        self._join()
        if self.pty is not None:
            self.pty.unplug()
            self.pty = None

    close = unplug


class TcpPrinter(FakePrinter):
    """A network printer on loopback: one connection at a time, like port 9100."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.connections = 0
        self._listener: socket.socket | None = None
        self.start()

    @property
    def device(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again, on the same port once it had one)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self.vanished.clear()
        self._start(self._serve)

    def stop(self) -> None:
        """Switched off: nothing listens, connections are refused."""
        self._join()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    close = stop

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([listener], [], [], 0.05)
            if not ready:
                continue
            conn, _ = listener.accept()
            self.connections += 1
            with conn:
                if self._talk(conn):
                    return

    def _talk(self, conn: socket.socket) -> bool:
        """Serve one connection; True if the printer vanished."""
        while not self._stop.is_set():
            ready, _, _ = select.select([conn], [], [], 0.05)
            if not ready:
                continue
            try:
                data = conn.recv(4096)
            except ConnectionError:
                return False
            if not data:
                return False
            replies, vanish = self._take(data)
            if vanish:
                # A reset, not a goodbye: SO_LINGER 0 makes close() send RST.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                assert self._listener is not None
                self._listener.close()
                self._listener = None
                self.vanished.set()
                return True
            if replies:
                conn.sendall(replies)
        return False
