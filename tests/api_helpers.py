"""A local API client for tests, and an engine thread serving a real ApiServer.

`EngineLoop` does what `redeemd run` does (daemon/service.py): one thread owns the
engine and serves scans and API requests from one queue, publishing after commit.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
from pathlib import Path

from conftest import wait_for  # noqa: F401  (tests import it from here)

from cards.scan import Scan
from daemon.api import ApiCall, ApiServer, Error, error
from daemon.api_commands import Commands
from daemon.debounce import Repeat
from daemon.engine import Engine

WAIT = 20.0  # generous: reaching it means something hangs, and the test says what


class Client:
    """One connection speaking JSON lines; events that arrive between answers are kept
    in `events`, in order."""

    def __init__(self, path: Path | str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self.buffer = b""
        self.events: list[dict] = []
        self.lines: list[bytes] = []  # every line received, raw

    def send(self, request: dict | bytes) -> None:
        data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        self.sock.sendall(data)

    def line(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n", 1)
        self.lines.append(raw)
        return json.loads(raw)

    def answer(self) -> dict:
        while True:
            message = self.line()
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def request(self, request: dict) -> dict:
        self.send(request)
        return self.answer()

    def event(self) -> dict:
        if self.events:
            return self.events.pop(0)
        message = self.line()
        assert "event" in message, message
        return message

    def closed_by_server(self) -> bool:
        """Read until the server closes; True on EOF or reset."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


class EngineLoop:
    """The service's main loop in miniature, on its own thread."""

    def __init__(self, engine: Engine, path: Path, **server_options):
        self.engine = engine
        self.queue: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self.server = ApiServer(path, self.submit, **server_options)
        self.commands = Commands(engine, self.server.publish, confirm_within=60.0)
        self.thread = threading.Thread(target=self._loop, name="test-engine")

    def __enter__(self) -> EngineLoop:
        self.server.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closed.set()
        self.queue.put(None)
        self.thread.join(WAIT)
        assert self.server.stop(timeout=WAIT)

    def submit(self, request: dict) -> dict:
        call = ApiCall(request)
        self.queue.put(call)
        return call.wait(WAIT, self.closed) or error(Error.TIMEOUT, "test engine timed out")

    def scan(self, code: str, source: str = "front"):
        """A scanner read, decided on the engine thread like the service does."""
        done: queue.Queue = queue.Queue()
        self.queue.put((Scan(code.encode(), source), done))
        return done.get(timeout=WAIT)

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, ApiCall):
                item.answer(self.commands(item.request))
                continue
            scan, done = item
            result = self.engine.handle(scan)
            if not isinstance(result, Repeat):
                self.commands.scanned(scan, result)
            done.put(result)
