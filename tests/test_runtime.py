"""runtime/: the one backoff and the one thread scaffold every long-running part uses."""

from __future__ import annotations

import logging
import threading

import pytest

from runtime.backoff import Backoff
from runtime.threads import OwnedThread, stop_all


def test_backoff_ceiling_doubles_up_to_the_cap_and_a_reset_starts_it_over():
    bounds: list[float] = []

    def uniform(low: float, high: float) -> float:
        bounds.append(high)
        return high / 2

    delays = Backoff(0.5, 3.0, uniform=uniform)
    waits = [delays.next() for _ in range(5)]
    assert bounds == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert waits == [0.25, 0.5, 1.0, 1.5, 1.5]
    delays.reset()
    delays.next()
    assert bounds[-1] == 0.5


def test_backoff_waits_are_random_between_zero_and_the_ceiling():
    delays = Backoff(1.0, 1.0)
    waits = {delays.next() for _ in range(50)}
    assert all(0.0 <= w <= 1.0 for w in waits) and len(waits) > 1


def test_backoff_refuses_a_cap_below_the_first_wait():
    with pytest.raises(ValueError, match="0 < first <= cap"):
        Backoff(2.0, 1.0)


def test_an_owned_thread_is_named_not_a_daemon_woken_and_joined():
    woken = threading.Event()
    seen: list[threading.Thread] = []

    def run() -> None:
        seen.append(threading.current_thread())
        woken.wait()

    worker = OwnedThread("worker-1", run, wake=woken.set)
    assert worker.stop(1.0), "stopping a thread never started is done at once"
    worker = OwnedThread("worker-1", run, wake=woken.set)
    worker.start()
    assert worker.stop(10.0)
    assert worker.stopping.is_set() and not worker.is_alive()
    assert [(t.name, t.daemon) for t in seen] == [("worker-1", False)]


def test_a_thread_that_fails_is_logged_by_name_and_ends(caplog):
    def run() -> None:
        raise RuntimeError("a bug")

    worker = OwnedThread("worker-2", run)
    with caplog.at_level(logging.ERROR, logger="redeemd"):
        worker.start()
        assert worker.join(10)
    assert "thread worker-2 failed" in caplog.text and "a bug" in caplog.text


def test_a_thread_stopping_itself_does_not_wait_for_itself():
    answers: list[bool] = []
    worker: OwnedThread

    def run() -> None:
        answers.append(worker.stop(5.0))

    worker = OwnedThread("worker-3", run)
    worker.start()
    assert worker.join(10)
    assert answers == [False] and worker.stopping.is_set()


def test_stop_all_asks_every_thread_before_waiting_for_any():
    # `first` ends only once `second` has been asked to stop: stopping them one after
    # the other would wait out the whole bound on `first`.
    second = OwnedThread("worker-5", lambda: second.stopping.wait())
    first = OwnedThread("worker-4", lambda: second.stopping.wait())
    for worker in (first, second):
        worker.start()
    assert stop_all([first, second], timeout=10.0)
    assert not first.is_alive() and not second.is_alive()
