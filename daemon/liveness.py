"""Is `redeemd run` alive for this box? The question `doctor` and `status` ask first.

Two witnesses, strongest first: the local API socket answers a `status` request (the
daemon's engine thread is serving, so scans are being decided), and `status.json`,
which the running daemon rewrites every 2 s with its pid. A pid alone proves little: a
crashed daemon leaves its last status.json behind, a zombie still has a pid, and a
pid is reused after a reboot, so a pid counts only while the file is fresh and the
process is not a zombie.

>>> state = probe(config)                                     # doctest: +SKIP
>>> state.running, state.pid, state.summary                   # doctest: +SKIP
(True, 4242, 'running, pid 4242; the local API at /run/redeemd/api.sock answers')
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config

# The daemon rewrites status.json every 2 s; older than this, it has stopped writing.
STATUS_FRESH = 10.0
API_TIMEOUT = 3.0
# process_state of no process, of a zombie, of a dead one.
GONE = (None, "Z", "X")
ANSWERED = "answered"
DENIED = "denied"


@dataclass(frozen=True)
class Liveness:
    running: bool
    pid: int | None
    summary: str
    """What was found, for a human: 'running, pid N; ...' or 'not running (why)'."""
    api_problem: str | None = None
    """The daemon runs but its local API does not serve the POS application: why."""


def probe(config: Config, now: float | None = None) -> Liveness:
    """Ask the API socket, then look at status.json and the pid it names."""
    now = time.time() if now is None else now
    pid, age = _status_file(config.box.state_dir / "status.json", now)
    state = process_state(pid) if pid is not None else None
    running = state not in GONE
    fresh = age is not None and age < STATUS_FRESH
    api = config.api
    answer = _ask_api(api.socket, config.box.id) if api.enabled else None
    who = f", pid {pid}" if running else ""
    if api.enabled and answer == ANSWERED:
        return Liveness(True, pid, f"running{who}; the local API at {api.socket} answers")
    if running and fresh:
        if not api.enabled:
            return Liveness(True, pid, f"running{who} (local API disabled in [api])")
        if answer == DENIED:
            return Liveness(
                True,
                pid,
                f"running{who} (this user may not connect to {api.socket}; "
                "run doctor as root to ask the local API too)",
            )
        return Liveness(True, pid, f"running{who}", api_problem=f"{api.socket} {answer}")
    if pid is None:
        why = f"no status.json in {config.box.state_dir}: it never ran with this config"
    elif state is None:
        why = f"pid {pid} in status.json has exited"
    elif state in GONE[1:]:
        why = f"pid {pid} has exited and is a zombie its parent did not reap"
    else:
        why = (
            f"pid {pid} is alive but has not updated status.json for {age:.0f} s: "
            "it hangs, or the pid now belongs to another program"
        )
    return Liveness(False, None, f"not running ({why})")


def alive(pid: int) -> bool:
    """Whether `pid` is a running process: it exists and is not a zombie (a process that
    exited and was not reaped still answers kill(pid, 0), but runs no more)."""
    return process_state(pid) not in GONE


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (R, S, D, Z ...), "?" for a process that
    exists in an unknown state, None when there is none."""
    if pid <= 0:  # kill(0, 0) would ask about our own process group
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        stat = ""
    if stat:
        # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
        return stat.rpartition(")")[2].split()[0]
    try:  # no /proc (not Linux)
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process (the daemon's, seen by a user)
        pass
    return "?"


def _status_file(path: Path, now: float) -> tuple[int | None, float | None]:
    try:
        live = json.loads(path.read_text())
        return int(live["pid"]), now - float(live["updated_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _ask_api(path: Path, box: str) -> str:
    """ANSWERED when the socket answers a status request, DENIED when this user may not
    connect, otherwise what went wrong."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(API_TIMEOUT)
            sock.connect(str(path))
            sock.sendall(b'{"cmd": "status"}\n')
            buffer = b""
            while True:
                while b"\n" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return "closed the connection without answering"
                    buffer += chunk
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                if "event" in message:  # verdicts go to every client, maybe before the answer
                    continue
                if not message.get("ok"):
                    return f"answered with an error: {message}"
                other = message.get("status", {}).get("box")
                return ANSWERED if other == box else f"is served by box {other}'s daemon"
    except FileNotFoundError:
        return "does not exist"
    except PermissionError:
        return DENIED
    except ConnectionRefusedError:
        return "refuses connections (nobody listens: a socket file left behind)"
    except TimeoutError:
        return f"accepted the connection but did not answer within {API_TIMEOUT:.0f} s"
    except (OSError, ValueError) as exc:
        return f"failed: {exc}"
