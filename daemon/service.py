"""`redeemd run`: drivers feed a queue, the engine decides, verdicts go out.

The service owns every thread it starts. Drivers only move bytes into the queue; the
engine runs on the main thread, so it is the single writer and a SIGTERM lands between
two scans, never inside a transaction.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import threading
from typing import TextIO

from cards.scan import Scan
from cards.verdict import Verdict
from daemon.config import Config
from daemon.engine import Engine, PaymentCode
from drivers.stdin import StreamScanner
from storage.database import open_database

log = logging.getLogger("redeemd")


def describe(result: Verdict | PaymentCode) -> str:
    """One line for a human watching the console or the journal."""
    if isinstance(result, PaymentCode):
        return f"payment: {result.scheme} payment code from {result.source} (passed on, not stored)"
    parts = []
    if result.accepted:
        parts.append("checked" if result.action.value == "check" else result.action.value + "ed")
        head = "accepted"
    else:
        head = f"rejected: {result.reason.value if result.reason else 'unknown'}"
    if result.card_kind:
        parts.append(f"{result.card_kind} card={result.card_id}")
    parts.append(f"code={result.digest_prefix}")
    if result.uses_left is not None:
        parts.append(f"uses_left={result.uses_left}")
    if result.balance is not None:
        parts.append(f"balance={result.balance}")
    if result.box_seq is not None:
        parts.append(f"seq={result.box_seq}")
    if result.detail:
        parts.append(f"({result.detail})")
    return f"{head}  " + " ".join(parts)


class Service:
    def __init__(self, config: Config, out: TextIO = sys.stdout, as_json: bool = False):
        self.config = config
        self.out = out
        self.as_json = as_json
        self.scans: queue.Queue[Scan | None] = queue.Queue(maxsize=1000)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def run(self) -> int:
        conn = open_database(self.config.box.database)
        engine = Engine(conn, self.config)
        log.info(
            "ready: box %s merchant %s store %s, cache seq %d, %s",
            self.config.box.id, self.config.box.merchant, self.config.box.store,
            engine.cache_seq, self.config.source,
        )  # fmt: skip
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        self._start_drivers()
        try:
            while not self.stopping.is_set():
                try:
                    scan = self.scans.get(timeout=0.5)
                except queue.Empty:
                    continue
                if scan is None:
                    if not any(t.is_alive() for t in self.threads):
                        break
                    continue
                result = engine.handle(scan)
                if result is not None:
                    self._show(result)
        except KeyboardInterrupt:
            pass
        finally:
            conn.close()
        log.info("stopped")
        return 0

    def _start_drivers(self) -> None:
        for scanner in self.config.scanners:
            if scanner.type == "stdin":
                driver = StreamScanner(scanner.name, sys.stdin.buffer, self.scans.put)
            else:  # pragma: no cover - config validation allows only known types
                raise ValueError(scanner.type)
            thread = threading.Thread(
                target=self._drive, args=(driver,), name=scanner.name, daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def _drive(self, driver: StreamScanner) -> None:
        try:
            driver.run()
        except Exception:  # a driver must never take the service down
            log.exception("scanner %s failed", driver.name)
        finally:
            self.scans.put(None)

    def _show(self, result: Verdict | PaymentCode) -> None:
        line = json.dumps(result.to_json()) if self.as_json else describe(result)
        self.out.write(line + "\n")
        self.out.flush()
