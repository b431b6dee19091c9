"""The local API server: JSON lines on a Unix socket, for the POS application.

`docs/local-api.md` is the contract. This module is only the transport: it accepts
clients, splits lines, answers `subscribe` itself and hands every other request to the
owner's `submit(request) -> response`, one at a time, in arrival order. The owner (the
service) implements `submit` by queueing the request for the engine thread and waiting
for its answer, so the engine stays the only writer. Command semantics live in
`daemon.api_commands`.

Threads, both owned by the server (`start` / `stop`, runtime.threads.OwnedThread):
- `api-io`: one selector over the listening socket, every client and a wake-up pair.
  It never blocks on a client: each has a bounded output buffer, and a client that lets
  it overflow (connects and never reads) is dropped alone.
- `api-requests`: calls `submit` and queues the answer for `api-io`.

`publish(event)` is called from the engine thread after a commit and never blocks: it
queues the encoded line and wakes `api-io`, which copies it to every subscriber.

    server = ApiServer(Path("/run/redeemd/api.sock"), submit)
    server.start()              # ApiUnavailable says why and what to do
    server.publish({"event": "verdict", "verdict": "accepted", ...})
    server.stop(timeout=2.0)    # closes clients, removes the socket, joins both threads
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import grp
import json
import logging
import os
import queue
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from runtime.threads import OwnedThread, stop_all

log = logging.getLogger("redeemd.api")

MAX_LINE = 64 * 1024
"""Longest request line; a longer one is answered with `line_too_long` and dropped."""
MAX_OUTPUT = 1 << 20
"""Bytes waiting to be sent to one client; beyond it the client is dropped."""
MAX_CLIENTS = 256
MAX_QUEUED = 1000
"""Requests waiting for the engine, over all clients; beyond it they get `busy`."""
MAX_QUEUED_PER_CLIENT = 32
MAX_DEPTH = 32
"""Arrays and objects nested in a request; deeper is `bad_json`."""


class Error(StrEnum):
    """The closed list of `error` codes (docs/local-api.md, "Errors"). Add; never rename."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_COMMAND = "unknown_command"
    LINE_TOO_LONG = "line_too_long"
    TOO_MANY_CLIENTS = "too_many_clients"
    BUSY = "busy"
    TIMEOUT = "timeout"
    UNKNOWN_CHECK = "unknown_check"
    KEY_REUSED = "key_reused"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"


def error(code: Error, message: str) -> dict[str, object]:
    """An error response: a stable code for the program, a message for a human."""
    return {"ok": False, "error": code.value, "message": message}


def encode(message: dict) -> bytes:
    """One line of UTF-8 JSON. A lone surrogate (JSON allows "\\ud800" in a string, and a
    client's `id` is echoed back) is written as that same JSON escape: it cannot be UTF-8."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n"
    return text.encode("utf-8", "backslashreplace")


class BadJson(ValueError):
    """A request line that is not a JSON text we accept; the message says why."""


def _no_constant(name: str) -> object:
    raise BadJson(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def parse(line: bytes) -> object:
    """The JSON value of one request line; BadJson if it is not one.

    Nesting is bounded: a line of 30,000 `[` fits in 64 KiB and makes the parser raise
    RecursionError, and a value nested just below the recursion limit would make
    echoing its `id` raise one later. Requests are flat; MAX_DEPTH is generous.
    """
    too_deep = f"the line is nested too deeply (at most {MAX_DEPTH} levels of [] and {{}})"
    try:
        value = json.loads(line, parse_constant=_no_constant)
    except RecursionError:
        raise BadJson(too_deep) from None
    except BadJson:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJson(f"the line is not JSON: {exc}") from None
    if _depth(value) > MAX_DEPTH:
        raise BadJson(too_deep)
    return value


def _depth(value: object) -> int:
    """How deep arrays and objects nest in `value`, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((each, depth + 1) for each in item)
    return deepest


class ApiUnavailable(RuntimeError):
    """The socket cannot be served; the message says why and what to do."""


class ApiCall:
    """A request on its way to the engine thread: how an owner implements `submit`.

    The request thread creates it and waits; the engine thread calls `answer`.
    """

    def __init__(self, request: dict):
        self.request = request
        self.response: dict | None = None
        self._done = threading.Event()

    def answer(self, response: dict) -> None:
        self.response = response
        self._done.set()

    def wait(self, timeout: float, cancel: threading.Event) -> dict | None:
        """The answer, or None after `timeout` seconds or once `cancel` is set."""
        waited = 0.0
        while not self._done.wait(0.1):
            waited += 0.1
            if cancel.is_set() or waited >= timeout:
                # Answered between the last wait and now: the answer still counts.
                return self.response if self._done.is_set() else None
        return self.response


class _Client:
    __slots__ = (
        "sock",
        "number",
        "inbuf",
        "out",
        "subscribed",
        "queued",
        "eof",
        "closing",
        "closed",
        "events",
    )

    def __init__(self, sock: socket.socket, number: int):
        self.sock = sock
        self.number = number
        self.inbuf = bytearray()
        self.out = bytearray()
        self.subscribed = False
        self.queued = 0  # requests sent to `submit` and not answered yet
        self.eof = False  # the client shut down its side; answer what it asked, then close
        self.closing = False  # close as soon as `out` is sent (after line_too_long)
        self.closed = False
        self.events = 0  # selector interest currently registered


_LISTEN = object()
_WAKE = object()


class ApiServer:
    def __init__(
        self,
        path: Path,
        submit: Callable[[dict], dict],
        *,
        mode: int = 0o660,
        group: str = "",
        max_line: int = MAX_LINE,
        max_output: int = MAX_OUTPUT,
        max_clients: int = MAX_CLIENTS,
    ):
        self.path = Path(path)
        self.submit = submit
        self.mode = mode
        self.group = group
        self.max_line = max_line
        self.max_output = max_output
        self.max_clients = max_clients
        self._clients: dict[int, _Client] = {}
        self._numbers = 0
        self._queued = 0
        # (client, line) for one client, (None, line) for every subscriber. Appended from
        # any thread, consumed by api-io: deque.append is atomic, so publish needs no lock.
        self._outbox: collections.deque[tuple[_Client | None, bytes]] = collections.deque()
        self._requests: queue.Queue[tuple[_Client, dict] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._io = OwnedThread("api-io", self._io_loop, wake=self._wake, stopping=self._stopping)
        self._answering = OwnedThread(
            "api-requests",
            self._request_loop,
            wake=lambda: self._requests.put(None),
            stopping=self._stopping,
        )
        self._sock: socket.socket | None = None
        self._lock_file: int | None = None
        self._inode: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind the socket and start both threads; ApiUnavailable if it cannot be served."""
        path = self.path
        what_to_do = (
            "run redeemd under its systemd unit (RuntimeDirectory=redeemd), create the "
            "directory for this user, set [api] socket to a writable path, or set "
            "[api] enabled = false"
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ApiUnavailable(
                f"local API disabled: cannot create {path.parent} ({exc.strerror or exc}); "
                + what_to_do
            ) from None
        try:
            self._take_lock()
            self._bind()
        except OSError as exc:
            self._release()
            raise ApiUnavailable(
                f"local API disabled: cannot serve {path} ({exc.strerror or exc}); " + what_to_do
            ) from None
        except ApiUnavailable:
            self._release()
            raise
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._sock, selectors.EVENT_READ, _LISTEN)  # type: ignore[arg-type]
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._io.start()
        self._answering.start()

    @property
    def _threads(self) -> list[OwnedThread]:
        """Both threads (tests check they survive a bug in one request)."""
        return [self._io, self._answering]

    def _take_lock(self) -> None:
        # A lock beside the socket tells a live server from a stale socket file left by a
        # crash: only the holder of the lock may unlink and bind the path.
        self._lock_file = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ApiUnavailable(
                f"local API disabled: another redeemd is serving {self.path}; stop it, or "
                "give this one its own [api] socket"
            ) from None

    def _bind(self) -> None:
        path = self.path
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ApiUnavailable(
                    f"local API disabled: {path} exists and is not a socket; remove it or "
                    "set [api] socket to another path"
                )
            path.unlink()  # a socket left by a crash: we hold the lock, so it is stale
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bound with the umask's bits (0755 by default: nobody else may connect, as
            # connecting needs write permission), then opened to the group.
            sock.bind(str(path))
            os.chmod(path, self.mode)
            if self.group:
                self._chown_group()
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        info = path.stat()
        self._inode = (info.st_dev, info.st_ino)
        self._sock = sock

    def _chown_group(self) -> None:
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            log.warning(
                "[api] group %r does not exist; %s keeps the daemon's group (create the "
                "group, e.g. with systemd-sysusers, or change [api] group)",
                self.group,
                self.path,
            )
            return
        try:
            os.chown(self.path, -1, gid)
        except OSError as exc:
            log.warning(
                "[api] cannot give %s to group %s (%s); the daemon's user must be a member "
                "of that group",
                self.path,
                self.group,
                exc.strerror,
            )

    def stop(self, timeout: float = 2.0) -> bool:
        """Close every client, remove the socket and join both threads. False if a
        thread was still running after `timeout` seconds."""
        ended = stop_all([self._io, self._answering], timeout)
        if not self._io.is_alive():
            self._release()
        return ended

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            # Only our own socket: another server may have bound the path since.
            with contextlib.suppress(OSError):
                info = self.path.stat()
                if (info.st_dev, info.st_ino) == self._inode:
                    self.path.unlink()
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the flock; the file stays (see _take_lock)
            self._lock_file = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None

    # ------------------------------------------------------------------ other threads

    def publish(self, event: dict) -> None:
        """Send an event line to every subscriber. Never blocks (engine thread)."""
        if self._stopping.is_set() or self._sock is None:
            return
        self._outbox.append((None, encode(event)))
        self._wake()

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def subscribers(self) -> int:
        return sum(1 for c in list(self._clients.values()) if c.subscribed)

    def _wake(self) -> None:
        sock = self._wake_w
        if sock is None:
            return
        # A full wake-up pair already has a wake-up pending.
        with contextlib.suppress(BlockingIOError, OSError):
            sock.send(b"x")

    def _request_loop(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            client, request = item
            try:
                line = self._serve(request, client)
            except Exception:  # a bug in one request must not stop the others' answers
                log.exception("api: request %r failed", request.get("cmd"))
                line = encode(error(Error.INTERNAL_ERROR, "the request failed; see the log"))
            self._outbox.append((client, line))
            self._wake()

    def _serve(self, request: dict, client: _Client) -> bytes:
        if client.closed or self._stopping.is_set():
            response = error(Error.SHUTTING_DOWN, "redeemd is stopping; retry after restart")
        else:
            try:
                response = self.submit(request)
            except Exception:
                log.exception("api: request %r failed", request.get("cmd"))
                response = error(Error.INTERNAL_ERROR, "the request failed; see the log")
        if "id" in request:
            response = {"id": request["id"], **response}
        return encode(response)

    # ------------------------------------------------------------------ api-io

    def _io_loop(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping.is_set():
                for key, mask in selector.select(0.5):
                    if key.data is _LISTEN:
                        try:
                            self._accept()
                        except Exception:  # a bug costs a connection, not the API
                            log.exception("api: accepting a client failed")
                    elif key.data is _WAKE:
                        with contextlib.suppress(BlockingIOError):
                            while self._wake_r.recv(4096):  # type: ignore[union-attr]
                                pass
                    else:
                        self._serve_client(key.data, mask)
                self._deliver()
        except Exception:
            log.exception("api: the I/O loop failed; the local API is down")
        finally:
            for client in list(self._clients.values()):
                self._close(client)
            self._release()

    def _serve_client(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ and not client.closed:
            self._guarded(client, self._read)
        if mask & selectors.EVENT_WRITE and not client.closed:
            self._guarded(client, self._flush)

    def _guarded(self, client: _Client, action: Callable[..., None], *args: object) -> None:
        """Do `action` for one client. No input may stop the API: whatever goes wrong
        while serving one client (a bug) costs that client its connection, not everyone
        theirs. (A bad line is answered in `_read` and keeps the connection.)"""
        try:
            action(client, *args)
        except Exception:
            log.exception("api: serving client %d failed; that client is dropped", client.number)
            with contextlib.suppress(Exception):
                self._close(client)

    def _accept(self) -> None:
        for _ in range(64):  # a burst of connections, without starving the others
            try:
                sock, _ = self._sock.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE: the listener stays, the client waits
                log.warning("api: cannot accept a client: %s", exc)
                return
            sock.setblocking(False)
            if len(self._clients) >= self.max_clients:
                with contextlib.suppress(OSError):
                    sock.send(
                        encode(
                            error(
                                Error.TOO_MANY_CLIENTS,
                                f"at most {self.max_clients} clients at once",
                            )
                        )
                    )
                sock.close()
                continue
            self._numbers += 1
            client = _Client(sock, self._numbers)
            self._clients[client.number] = client
            self._guarded(client, self._interest)

    def _interest(self, client: _Client) -> None:
        events = 0
        if not (client.eof or client.closing):
            events |= selectors.EVENT_READ
        if client.out:
            events |= selectors.EVENT_WRITE
        if events == client.events:
            return
        selector = self._selector
        assert selector is not None
        if client.events == 0:
            selector.register(client.sock, events, client)
        elif events == 0:
            selector.unregister(client.sock)
        else:
            selector.modify(client.sock, events, client)
        client.events = events

    def _close(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        if client.events and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        client.events = 0
        client.sock.close()
        self._clients.pop(client.number, None)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if not data:
            client.eof = True
            self._settle(client)
            return
        client.inbuf += data
        start = 0
        while not (client.closing or client.closed):
            end = client.inbuf.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                self._too_long(client)
                return
            line = bytes(client.inbuf[start:end])
            start = end + 1
            try:
                self._line(client, line)
            except Exception:  # a bug: this line is answered, the connection stays
                log.exception("api: client %d: a request line failed", client.number)
                self._send(
                    client, encode(error(Error.INTERNAL_ERROR, "the request failed; see the log"))
                )
        del client.inbuf[:start]
        if len(client.inbuf) > self.max_line and not client.closing:
            self._too_long(client)

    def _too_long(self, client: _Client) -> None:
        log.warning(
            "api: client %d sent a line over %d bytes; dropped", client.number, self.max_line
        )
        client.inbuf.clear()
        client.closing = True
        self._send(
            client,
            encode(
                error(
                    Error.LINE_TOO_LONG,
                    f"a request line may be at most {self.max_line} bytes; the connection is closed",
                )
            ),
        )
        self._settle(client)

    def _line(self, client: _Client, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            request = parse(line)
        except BadJson as exc:
            self._send(client, encode(error(Error.BAD_JSON, str(exc))))
            return
        if not isinstance(request, dict):
            self._send(
                client,
                encode(
                    error(Error.BAD_REQUEST, 'a request is a JSON object such as {"cmd": "status"}')
                ),
            )
            return
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            response = error(Error.BAD_REQUEST, 'the request has no "cmd" string')
        elif cmd == "subscribe":
            client.subscribed = True
            response = {"ok": True, "subscribed": True}
        elif client.queued >= MAX_QUEUED_PER_CLIENT or self._queued >= MAX_QUEUED:
            response = error(Error.BUSY, "too many requests waiting; wait for the answers")
        else:
            client.queued += 1
            self._queued += 1
            self._requests.put((client, request))
            return
        if "id" in request:
            response = {"id": request["id"], **response}
        self._send(client, encode(response))

    def _deliver(self) -> None:
        outbox = self._outbox
        while outbox:
            client, line = outbox.popleft()
            if client is None:
                for each in list(self._clients.values()):
                    if each.subscribed and not each.closing:
                        self._guarded(each, self._send, line)
                continue
            client.queued -= 1
            self._queued -= 1
            self._guarded(client, self._send, line)
            self._guarded(client, self._settle)

    def _send(self, client: _Client, data: bytes) -> None:
        if client.closed:
            return
        if not client.out:
            try:
                sent = client.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(client)
                return
            data = data[sent:]
        if data:
            if len(client.out) + len(data) > self.max_output:
                # It does not read what it asked for: waiting for it would hold events
                # for everyone else in memory without bound.
                log.warning(
                    "api: client %d is not reading (%d bytes waiting); dropped",
                    client.number,
                    len(client.out) + len(data),
                )
                self._close(client)
                return
            client.out += data
        self._interest(client)

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        del client.out[:sent]
        self._interest(client)
        self._settle(client)

    def _settle(self, client: _Client) -> None:
        """Close a client that has nothing more coming: after line_too_long once its
        error is sent, after its EOF once every answer it asked for is sent."""
        if client.closed or client.out:
            if not client.closed:
                self._interest(client)
            return
        if client.closing or (client.eof and client.queued == 0):
            self._close(client)
        else:
            self._interest(client)
