"""A failing scanner never takes the daemon down: it is restarted with backoff and its
state is visible in `redeemd status`."""

from __future__ import annotations

import errno
import json
import logging
import queue
import threading

from cards.scan import Scan
from drivers.supervisor import DeviceGone, DriverError, DriverState, Status, Supervisor


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
    supervisor = Supervisor(
        driver, scans.put, initial_backoff=0.01, max_backoff=0.02, gone_retry=0.01
    )
    supervisor.start()
    assert scans.get(timeout=10).code == b"CODE"
    assert driver.runs == 3
    assert supervisor.state.restarts == 2
    assert supervisor.state.state == "connected"
    assert supervisor.state.scans == 1 and supervisor.state.last_scan == 1.0
    assert supervisor.stop(timeout=5)
    assert driver.closed.is_set()
    assert supervisor.state.state == "stopped"


def _failing(exc: Exception, runs: int) -> tuple[Supervisor, threading.Event]:
    """A supervisor over a driver that raises `exc` every time; the event is set once it
    has run `runs` times."""
    enough = threading.Event()

    class Broken(FlakyDriver):
        def run(self, emit, stop, state):
            self.runs += 1
            if self.runs >= runs:
                enough.set()
            raise exc

    supervisor = Supervisor(
        Broken([]), lambda scan: None, initial_backoff=0.01, max_backoff=0.02, gone_retry=0.01
    )
    return supervisor, enough


def test_a_problem_on_the_box_is_an_error_with_its_message_while_retrying():
    supervisor, enough = _failing(
        DriverError("/dev/ttyACM0 is used by another process (pid 42); stop it"), runs=2
    )
    supervisor.start()
    assert enough.wait(10)
    assert supervisor.state.state == "error"
    assert "another process" in supervisor.state.message
    assert supervisor.stop(timeout=5)
    assert (supervisor.state.state, supervisor.state.message) == ("stopped", "")


def test_an_unplugged_scanner_is_disconnected_and_logged_once(caplog):
    supervisor, enough = _failing(DeviceGone("/dev/ttyACM0 is not there; waiting for it"), runs=5)
    with caplog.at_level(logging.WARNING, logger="redeemd.drivers"):
        supervisor.start()
        assert enough.wait(10)
        assert supervisor.stop(timeout=5)
    assert supervisor.state.restarts >= 4
    assert [r.getMessage() for r in caplog.records] == [
        "scanner flaky: /dev/ttyACM0 is not there; waiting for it; retrying"
    ]


def test_a_vanished_device_from_the_kernel_is_disconnected():
    supervisor, enough = _failing(OSError(errno.ENODEV, "No such device"), runs=2)
    supervisor.start()
    assert enough.wait(10)
    assert supervisor.state.state == "disconnected"
    assert supervisor.stop(timeout=5)


def test_status_shows_the_stdin_scanner_after_a_run(loaded_box):
    result = loaded_box.cli("run", "--json", input=b"DEMO-0001\nDEMO-0002\n")
    assert result.returncode == 0, result.stderr.decode()
    status = json.loads(loaded_box.cli("status", "--json").stdout)
    assert status["daemon"] == "not running"
    [driver] = status["drivers"]
    assert (driver["name"], driver["kind"], driver["state"]) == ("stdin", "stdin", "ended")
    assert driver["scans"] == 2


class CrashingDriver(FlakyDriver):
    """A driver with a bug: each run hands the scanner beside it a code to deliver, then
    raises; after `crashes` runs it waits for stop without ever connecting."""

    def __init__(self, crashes: int, beside: HealthyDriver):
        super().__init__([])
        self.name = "crashing"
        self.crashes = crashes
        self.beside = beside
        self.settled = threading.Event()

    def run(self, emit, stop, state):
        self.runs += 1
        if self.runs > self.crashes:
            self.settled.set()
            stop.wait()
            return
        self.beside.codes.put(f"DURING-CRASH-{self.runs}".encode())
        raise RuntimeError(f"zbar returned a 3-D array (run {self.runs})")


class HealthyDriver(FlakyDriver):
    """Delivers every code put in `codes`, until closed."""

    def __init__(self):
        super().__init__([])
        self.name = "healthy"
        self.codes: queue.Queue[bytes | None] = queue.Queue()

    def run(self, emit, stop, state):
        self.runs += 1
        state.state = "connected"
        while (code := self.codes.get()) is not None:
            emit(Scan(code, self.name, at=2.0))

    def close(self) -> None:
        super().close()
        self.codes.put(None)


class RecordedBackoff:
    """Stands in for the supervisor's `random`: notes each backoff's upper bound and
    waits 0 s, so the backoff sequence is checked without measuring time."""

    def __init__(self):
        self.bounds: list[float] = []

    def uniform(self, low: float, high: float) -> float:
        self.bounds.append(high)
        return low


def test_driver_bug_shows_error_with_its_message_and_restarts_with_backoff_beside_a_healthy_driver(
    monkeypatch,
):
    backoff = RecordedBackoff()
    monkeypatch.setattr("runtime.backoff.random", backoff)
    scans: queue.Queue[Scan] = queue.Queue()
    healthy = HealthyDriver()
    crashing = CrashingDriver(3, beside=healthy)
    supervisors = [
        Supervisor(healthy, scans.put, initial_backoff=0.01, max_backoff=0.03),
        Supervisor(crashing, scans.put, initial_backoff=0.01, max_backoff=0.03),
    ]
    for supervisor in supervisors:
        supervisor.start()
    healthy_status, crashing_status = (s.state for s in supervisors)
    try:
        assert crashing.settled.wait(10)
        # Running again after the third crash, not connected yet: status still shows the
        # last failure, with the exception's type and message.
        assert crashing_status.to_json() == {
            "name": "crashing",
            "kind": "test",
            "state": "error",
            "message": "RuntimeError: zbar returned a 3-D array (run 3)",
            "last_scan": None,
            "scans": 0,
            "restarts": 3,
        }
        # Full-jitter backoff: a random wait up to a bound that doubles, up to the maximum.
        assert backoff.bounds == [0.01, 0.02, 0.03]

        delivered = [scans.get(timeout=10) for _ in range(3)]
        healthy.codes.put(b"AFTER-CRASHES")
        delivered.append(scans.get(timeout=10))
        assert [(s.source, s.code) for s in delivered] == [
            ("healthy", b"DURING-CRASH-1"),
            ("healthy", b"DURING-CRASH-2"),
            ("healthy", b"DURING-CRASH-3"),
            ("healthy", b"AFTER-CRASHES"),
        ]
        assert (healthy_status.state, healthy_status.scans, healthy_status.restarts) == (
            "connected",
            4,
            0,
        )
        assert healthy.runs == 1
    finally:
        for supervisor in supervisors:
            assert supervisor.stop(timeout=5)
    assert crashing_status.state == healthy_status.state == "stopped"


class BlockedDriver(FlakyDriver):
    """Blocked in a read that does not look at the stop event, like a driver inside
    os.read() on a device: only close() ends it, or `release` if close() does not."""

    def __init__(self, ends_on_close: bool):
        super().__init__([])
        self.name = "blocked"
        self.ends_on_close = ends_on_close
        self.reading = threading.Event()
        self.release = threading.Event()

    def run(self, emit, stop, state):
        state.state = "connected"
        self.reading.set()
        self.release.wait()

    def close(self) -> None:
        super().close()
        if self.ends_on_close:
            self.release.set()


def test_stop_closes_a_driver_blocked_in_a_read_and_joins_its_thread():
    driver = BlockedDriver(ends_on_close=True)
    supervisor = Supervisor(driver, lambda scan: None)
    supervisor.start()
    assert driver.reading.wait(10)
    assert supervisor.stop(timeout=5)
    assert driver.closed.is_set() and not supervisor.thread.is_alive()
    assert supervisor.state.state == "stopped"


def test_a_scanner_thread_still_running_after_its_bound_is_named_in_the_log(caplog):
    driver = BlockedDriver(ends_on_close=False)
    ended = threading.Event()
    supervisor = Supervisor(driver, lambda scan: None, on_end=ended.set)
    supervisor.start()
    assert driver.reading.wait(10)
    with caplog.at_level(logging.WARNING, logger="redeemd"):
        assert supervisor.stop(timeout=0.2) is False
    assert "thread scanner-blocked did not stop within 0.2 s" in caplog.text
    assert supervisor.thread.is_alive() and not ended.is_set()
    driver.release.set()  # the read returns at last: the thread ends, and tells its owner
    assert supervisor.thread.join(10)
    assert ended.is_set() and supervisor.state.state == "stopped"


def test_driver_states_are_one_closed_enum_that_status_json_writes_as_words():
    state = DriverState("front", "stdin")
    assert state.state is Status.STARTING
    # The words are what `redeemd status` and status.json show.
    assert {s.value for s in Status} == {
        "starting",
        "connected",
        "disconnected",
        "error",
        "ended",
        "stopped",
    }
    state.state = Status.DISCONNECTED
    assert json.loads(json.dumps(state.to_json()))["state"] == "disconnected"
