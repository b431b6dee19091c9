"""The service owns every thread it starts: after `Service.run` returns, none is left.

Runs the real Service in this process (signal handlers need the main thread) with
everything that starts threads switched on: a FIFO scanner, MQTT sync to a real broker,
the local API and an on_verdict hook.
"""

# ruff: noqa: F811  (the broker fixture is imported, then named as a parameter)
from __future__ import annotations

import io
import json
import os
import signal
import threading

from broker import broker  # noqa: F401  (fixture)
from conftest import wait_for
from test_service import Daemon

from daemon import config as config_mod
from daemon.service import Service


def test_run_returns_with_no_thread_left_behind(loaded_box, broker, tmp_path):
    fifo = tmp_path / "scans.fifo"
    os.mkfifo(fifo)
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\ncat > /dev/null\n")
    hook.chmod(0o755)
    loaded_box.config_path.write_text(
        loaded_box.config_path.read_text()
        + f'\n[sync]\nenabled = true\nbroker = "{broker.url}"\n'
        + f'\n[api]\nsocket = "{tmp_path / "api.sock"}"\n'
        + f'\n[hooks]\non_verdict = "{hook}"\n'
        + f'\n[[scanner]]\ntype = "stdin"\nname = "fifo"\npath = "{fifo}"\n'
    )
    config = config_mod.load(str(loaded_box.config_path))
    out = io.StringIO()
    service = Service(config, out=out, as_json=True)
    before = set(threading.enumerate())

    running: list[threading.Thread] = []

    def drive() -> None:
        # O_RDWR: opening does not wait for the daemon's end of the FIFO.
        fd = os.open(fifo, os.O_RDWR)
        try:
            os.write(fd, b"DEMO-0001\nDEMO-0002\n")
            wait_for(lambda: out.getvalue().count("\n") >= 2, "two verdicts")
            wait_for(lambda: service.sync is not None and service.sync.state().connected,
                     "sync connected")  # fmt: skip
            running.extend(t for t in threading.enumerate() if t not in before)
        finally:
            os.close(fd)
            service.stopping.set()  # what SIGTERM does

    driver = threading.Thread(target=drive)
    driver.start()
    assert service.run() == 0
    driver.join(30)
    verdicts = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [v["verdict"] for v in verdicts] == ["accepted", "accepted"]
    left = [t for t in threading.enumerate() if t not in before and t is not driver]
    assert left == [], f"threads left behind: {[t.name for t in left]}"
    # Each part ran in a thread of its own name, and none was a daemon thread (which
    # the interpreter would kill wherever it stood instead of the service joining it).
    started = {t.name: t for t in running if t is not driver}
    parts = {"scanner-fifo", "sync", "sync-network", "api-io", "api-requests", "hook-on-verdict"}
    assert parts <= set(started), sorted(started)
    daemons = sorted(name for name, t in started.items() if t.daemon)
    assert daemons == [], f"daemon threads: {daemons}"


def test_redeemd_run_stops_on_sigterm_while_the_broker_hangs(loaded_box, broker, tmp_path):
    """The real daemon process: every thread is joined within its bound even when the
    broker takes the connection and then never answers (no thread left for the
    interpreter to wait on, none reported as hanging)."""
    loaded_box.config_path.write_text(
        loaded_box.config_path.read_text()
        + f'\n[sync]\nenabled = true\nbroker = "{broker.url}"\n'
        + f'\n[api]\nsocket = "{tmp_path / "api.sock"}"\n'
    )
    daemon = Daemon(loaded_box)
    try:
        daemon.wait_log("sync: connected")
        broker.process.send_signal(signal.SIGSTOP)
        try:
            daemon.scan("DEMO-0001")  # its record waits for a PUBACK that never comes
            assert daemon.wait_verdicts(1)[0]["verdict"] == "accepted"
            assert daemon.stop() == 0
        finally:
            broker.process.send_signal(signal.SIGCONT)
    finally:
        daemon.kill()
    assert "did not stop" not in daemon.log(), daemon.log()[-2000:]


def test_a_part_that_fails_to_start_leaves_no_thread_of_the_others_behind(
    loaded_box, tmp_path, monkeypatch, caplog
):
    """None of the service's threads is a daemon thread, so a start that fails halfway
    (here: sync, after the API and the scanners started) must still stop what did
    start, and a stop step that fails (here: the drain) must not skip the steps after
    it; otherwise the process never exits."""
    fifo = tmp_path / "scans.fifo"
    os.mkfifo(fifo)
    loaded_box.config_path.write_text(
        loaded_box.config_path.read_text()
        + f'\n[api]\nsocket = "{tmp_path / "api.sock"}"\n'
        + f'\n[[scanner]]\ntype = "stdin"\nname = "fifo"\npath = "{fifo}"\n'
    )
    config = config_mod.load(str(loaded_box.config_path))
    service = Service(config, out=io.StringIO(), as_json=True)
    before = set(threading.enumerate())

    def broken_start() -> None:
        raise RuntimeError("sync could not start (injected)")

    def broken_drain(engine, limit: float = 2.0) -> None:
        raise OSError("disk full (injected)")

    monkeypatch.setattr(service, "_start_sync", broken_start)
    monkeypatch.setattr(service, "_drain", broken_drain)
    try:
        service.run()
    except RuntimeError as exc:
        assert "injected" in str(exc)
    else:
        raise AssertionError("the failed start was swallowed")
    left = [t for t in threading.enumerate() if t not in before]
    assert left == [], f"threads left behind: {[t.name for t in left]}"
    assert "could not decide the reads already queued" in caplog.text
    assert not (tmp_path / "api.sock").exists(), "the API stopped after the failed drain"
