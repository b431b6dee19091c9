"""A failing scanner never takes the daemon down: it is restarted with backoff and its
state is visible in `redeemd status`."""

from __future__ import annotations

import json
import queue
import threading

from cards.scan import Scan
from drivers.supervisor import DriverError, DriverState, Supervisor


class FlakyDriver:
    """Fails `failures` times (unplugged, then a bug), then delivers one scan and waits."""

    kind = "test"

    def __init__(self, failures: list[Exception]):
        self.name = "flaky"
        self.failures = list(failures)
        self.runs = 0
        self.closed = threading.Event()

    def run(self, emit, stop: threading.Event, state: DriverState) -> None:
        self.runs += 1
        if self.failures:
            raise self.failures.pop(0)
        state.state = "connected"
        emit(Scan(b"CODE", self.name, at=1.0))
        stop.wait()

    def feedback(self, accepted: bool) -> None:
        pass

    def close(self) -> None:
        self.closed.set()


def test_unplugged_and_crashing_driver_is_restarted_and_then_delivers():
    scans: queue.Queue[Scan] = queue.Queue()
    driver = FlakyDriver([OSError(19, "No such device"), ValueError("driver bug")])
    supervisor = Supervisor(driver, scans.put, initial_backoff=0.01, max_backoff=0.02)
    supervisor.start()
    assert scans.get(timeout=10).code == b"CODE"
    assert driver.runs == 3
    assert supervisor.state.restarts == 2
    assert supervisor.state.state == "connected"
    assert supervisor.state.scans == 1 and supervisor.state.last_scan == 1.0
    assert supervisor.stop(timeout=5)
    assert driver.closed.is_set()
    assert supervisor.state.state == "stopped"


def test_failure_message_is_kept_for_status_while_retrying():
    never = threading.Event()

    class Broken(FlakyDriver):
        def run(self, emit, stop, state):
            self.runs += 1
            if self.runs >= 2:
                never.set()
            raise DriverError("/dev/ttyACM0 is used by another process (pid 42); stop it")

    driver = Broken([])
    supervisor = Supervisor(driver, lambda scan: None, initial_backoff=0.01, max_backoff=0.02)
    supervisor.start()
    assert never.wait(10)
    assert supervisor.state.state == "disconnected"
    assert "another process" in supervisor.state.message
    assert supervisor.stop(timeout=5)


def test_status_shows_the_stdin_scanner_after_a_run(loaded_box):
    result = loaded_box.cli("run", "--json", input=b"DEMO-0001\nDEMO-0002\n")
    assert result.returncode == 0, result.stderr.decode()
    status = json.loads(loaded_box.cli("status", "--json").stdout)
    assert status["daemon"] == "not running"
    [driver] = status["drivers"]
    assert (driver["name"], driver["kind"], driver["state"]) == ("stdin", "stdin", "ended")
    assert driver["scans"] == 2
