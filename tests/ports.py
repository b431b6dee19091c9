"""Loopback ports for the servers tests start, unique across parallel test workers.

A port the kernel hands out for `bind(0)` comes from the ephemeral range, the same range
every outgoing connection's local port comes from: a broker stopped and restarted on "its"
port can find that another worker's client now holds it ("Address already in use"), and
two workers can be handed the same port a moment apart. So each worker (pytest -n, named
gw0, gw1 ... in PYTEST_XDIST_WORKER) takes ports from its own block below the ephemeral
range, in turn, never the same one twice in a run.
"""

from __future__ import annotations

import itertools
import os
import socket

BLOCK = 400  # ports per worker; a run of the suite takes fewer than this per worker
FIRST = 20_000  # below Linux's default ephemeral range (32768-60999), above well-known services
WORKERS = (32_768 - FIRST) // BLOCK  # blocks that fit below the ephemeral range


def _worker_number() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = name.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


def _candidates() -> itertools.cycle[int]:
    start = FIRST + (_worker_number() % WORKERS) * BLOCK
    # A bench or helper process outside pytest-xdist shares block 0 with worker gw0; start
    # it at an offset from its pid so the two rarely meet, and the bind check settles it.
    offset = 0 if "PYTEST_XDIST_WORKER" in os.environ else os.getpid() % BLOCK
    ports = [start + (offset + i) % BLOCK for i in range(BLOCK)]
    return itertools.cycle(ports)


_next = _candidates()


def free_port() -> int:
    """A loopback port nothing listens on now, not handed out before in this process."""
    for _ in range(BLOCK):
        port = next(_next)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {FIRST}..{FIRST + BLOCK} for this worker")
