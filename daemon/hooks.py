"""The `[hooks] on_verdict` command: a light, a relay or a buzzer after each verdict.

The engine thread only puts the verdict on a bounded queue; one hook thread runs the
command, waits at most `[hooks] timeout` and kills it after that. A hook that is slow,
fails or is missing never delays a verdict or takes the daemon down; when the queue is
full (the hook cannot keep up) verdicts are dropped for the hook alone, and the log
says so. The hook sees what the local API sees: outcome, reason, action, source and
the digest prefix, never the code.

    >>> hook = VerdictHook(("/usr/local/bin/light", "--pin", "17"), timeout=5.0)
    >>> hook.start()
    >>> hook.submit(verdict.to_json())
    >>> hook.stop()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess

from runtime.threads import OwnedThread

log = logging.getLogger("redeemd")

QUEUE = 100


class VerdictHook:
    def __init__(self, argv: tuple[str, ...], timeout: float):
        self.argv = argv
        self.timeout = timeout
        self.runs = 0
        self.failures = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=QUEUE)
        self._thread = OwnedThread("hook-on-verdict", self._run)

    def start(self) -> None:
        self._thread.start()

    def submit(self, verdict: dict) -> None:
        """Never blocks: the engine thread calls this right after a verdict."""
        try:
            self._queue.put_nowait(verdict)
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning(
                    "hook %s cannot keep up: %d verdict(s) not passed to it so far",
                    self.argv[0],
                    self.dropped,
                )

    def stop(self, timeout: float = 2.0) -> bool:
        """Let the running hook finish (bounded), drop the rest, join the thread."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        return self._thread.join(timeout + self.timeout)

    def state(self) -> dict[str, object]:
        return {
            "command": self.argv[0],
            "runs": self.runs,
            "failures": self.failures,
            "dropped": self.dropped,
            "last_error": self.last_error,
        }

    def _run(self) -> None:
        while True:
            verdict = self._queue.get()
            if verdict is None:
                return
            self._call(verdict)

    def _call(self, verdict: dict) -> None:
        env = {
            "REDEEMD_VERDICT": str(verdict.get("verdict", "")),
            "REDEEMD_REASON": str(verdict.get("reason", "")),
            "REDEEMD_ACTION": str(verdict.get("action", "")),
            "REDEEMD_SOURCE": str(verdict.get("source", "")),
            "PATH": "/usr/local/bin:/usr/bin:/bin",
        }
        self.runs += 1
        try:
            # Its own session, so that a timeout kills what the hook started too (a shell
            # script's `sleep`, a blinking light): killing the hook alone leaves them
            # running, and each stuck verdict would add one more.
            process = subprocess.Popen(
                self.argv,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self._failed(f"cannot run it: {exc}")
            return
        try:
            _, stderr = process.communicate((json.dumps(verdict) + "\n").encode(), self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            self._failed(
                f"still running after {self.timeout:g} s ([hooks] timeout); "
                "killed with the processes it started"
            )
            return
        if process.returncode != 0:
            tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            self._failed(f"exited with {process.returncode}{': ' + tail[0] if tail else ''}")
        else:
            self.last_error = None

    def _failed(self, why: str) -> None:
        self.failures += 1
        if why != self.last_error:
            log.warning("hook %s: %s; the verdict stands", self.argv[0], why)
        self.last_error = why


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the hook's process group (its pid: it leads its own session), then reap
    the hook. A child that left the group itself (setsid, a double fork) is out of reach,
    and may hold the stderr pipe: so wait for the hook alone, not for the pipe's end."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pipe in (process.stdin, process.stderr):
        if pipe is not None:
            pipe.close()
