"""A small TCP proxy between the boxes and the broker, so a test can cut the line.

`cut()` closes every connection passing through at that instant, in both directions,
the way a flaky uplink or a NAT timeout does: the broker sees a socket close without
DISCONNECT (so it publishes the last will) and the box sees its reads fail. New
connections are accepted again at once, unless the proxy is held: `hold()` closes every
new connection at once (the box sees the line refused) until `release()`.

    >>> proxy = TcpProxy(broker.port).start()
    >>> proxy.url                # give this to the box instead of the broker's
    >>> proxy.cut()
    >>> proxy.stop()
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from broker import free_port


class TcpProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.cuts = 0
        self.accepted = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> int:
        """Close every open connection; returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self.cuts += len(pairs)
        return len(pairs)

    def hold(self) -> None:
        """Cut the line and refuse every new connection until `release()`."""
        self._held.set()
        self.cut()

    def release(self) -> None:
        self._held.clear()

    def stop(self) -> None:
        self._stop.set()
        self.cut()
        for thread in self._threads:
            thread.join(5)
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._held.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # the broker is down: the box sees a refused line too
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            self.accepted += 1
            thread = threading.Thread(
                target=self._pipe, args=(client, upstream), name="proxy-pipe", daemon=True
            )
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        other = {a: b, b: a}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    for key, _ in sel.select(timeout=0.2):
                        data = key.fileobj.recv(65536)
                        if not data:
                            return
                        other[key.fileobj].sendall(data)
            except OSError:
                return
            finally:
                with self._lock:
                    if (a, b) in self._pairs:
                        self._pairs.remove((a, b))
                a.close()
                b.close()
