"""`redeemd run`: drivers feed a queue, the engine decides, verdicts go out.

The service owns every thread it starts. Drivers only move bytes into the queue; the
engine runs on the main thread, so it is the single writer and a SIGTERM lands between
two scans, never inside a transaction.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from cards.scan import Scan
from cards.verdict import Action, Verdict
from daemon import box_key as box_key_mod
from daemon.api import ApiCall, ApiServer, ApiUnavailable, Error, error
from daemon.api_commands import Commands
from daemon.box_key import BoxKey
from daemon.config import Config, ConfigError, ScannerConfig
from daemon.debounce import Repeat
from daemon.dispense import Dispensed, PrintQueue
from daemon.engine import Engine, PaymentCode
from daemon.hooks import VerdictHook
from daemon.notify import Notifier
from drivers.settings import CameraSettings, HidSettings, SerialSettings, StdinSettings
from drivers.supervisor import Driver, Status, Supervisor, Unavailable
from runtime.threads import stop_all
from storage import api_requests
from storage.database import open_database
from storage.migrations import MIGRATION_TIMEOUT_S, pending_on
from sync.worker import Sync

log = logging.getLogger("redeemd")


_DONE = {"check": "checked", "redeem": "redeemed", "reverse": "reversed"}
"""What an accepted verdict did, as the console line says it."""


def describe(result: Verdict | PaymentCode) -> str:
    """One line for a human watching the console or the journal."""
    if isinstance(result, PaymentCode):
        return f"payment: {result.scheme} payment code from {result.source} (passed on, not stored)"
    parts = []
    if result.accepted:
        parts.append(_DONE.get(result.action.value, result.action.value))
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


def make_driver(scanner: ScannerConfig) -> Driver:
    """The driver object for one [[scanner]] block. Imports are lazy so that a box
    without a camera does not need ffmpeg or zbar installed."""
    # By the settings' model, which the config chose by `type`: the type checker then
    # knows each driver gets its own settings.
    settings = scanner.settings
    if isinstance(settings, StdinSettings):
        from drivers.stdin import StreamScanner

        return StreamScanner(scanner.name, settings)
    if isinstance(settings, SerialSettings):
        from drivers.serial import SerialScanner

        return SerialScanner(scanner.name, settings)
    if isinstance(settings, HidSettings):
        from drivers.hid import HidScanner

        return HidScanner(scanner.name, settings)
    if isinstance(settings, CameraSettings):
        from drivers.camera import CameraScanner

        return CameraScanner(scanner.name, settings)
    raise ValueError(f"unknown scanner type {scanner.type!r}")  # config validation prevents it


def build_driver(scanner: ScannerConfig) -> Driver:
    """`make_driver`, or an `Unavailable` stand-in saying why the driver cannot be built
    here: one scanner whose package is missing must not stop the box."""
    try:
        return make_driver(scanner)
    except ImportError as exc:
        reason = (
            f"{scanner.type} scanners need the Python package {exc.name or exc}, which "
            f"cannot be loaded ({exc}): install redeemd with its drivers extra "
            "(systemd/install.sh --extras drivers, or pip install 'redeemd[drivers]') and "
            "the system libraries docs/operations.md lists, then restart redeemd"
        )
    except Exception as exc:
        reason = f"cannot set up this {scanner.type} scanner: {exc}"
    return Unavailable(scanner.name, scanner.type, reason)


class Service:
    STATUS_EVERY = 2.0

    def __init__(
        self,
        config: Config,
        out: TextIO = sys.stdout,
        as_json: bool = False,
        load: Callable[[], Config] | None = None,
    ):
        self.config = config
        self.out = out
        self.as_json = as_json
        # How SIGHUP reads the configuration again (the CLI passes config.load with
        # the same -c / $REDEEMD_CONFIG); without it, SIGHUP keeps what is running.
        self.load = load
        self.notify = Notifier()
        self.hook: VerdictHook | None = None
        self._reload_asked = threading.Event()
        # Local API requests wait in the same queue as scans: the engine serves both,
        # in order, on this thread (the only writer).
        self.scans: queue.Queue[Scan | ApiCall | None] = queue.Queue(maxsize=1000)
        self.api: ApiServer | None = None
        self.commands: Commands | None = None
        self._api_closed = threading.Event()
        self.stopping = threading.Event()
        self.supervisors: dict[str, Supervisor] = {}
        self.status_path = config.box.state_dir / "status.json"
        self.sync: Sync | None = None
        self.box_key: BoxKey | None = None
        self.receipts: PrintQueue | None = None

    def run(self) -> int:
        if pending_on(self.config.box.database):
            # Copying a table can outlast the unit's start timeout; killed, the
            # migration would roll back and start over on every restart.
            self.notify.send(
                EXTEND_TIMEOUT_USEC=str(MIGRATION_TIMEOUT_S * 1_000_000),
                STATUS="migrating the database",
            )
        conn = open_database(self.config.box.database)
        engine = Engine(conn, self.config)
        forgotten = api_requests.prune(conn, int(time.time() * 1000))
        if forgotten:
            log.info("forgot %d local API idempotency key(s) older than 30 days", forgotten)
        self._load_box_key()
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload_asked.set())
        last_status = 0.0
        # The parts start inside the try: none of their threads is a daemon thread, so
        # a part that failed to start must not leave the others running with nobody to
        # stop them (the process would never exit).
        try:
            self._start_printer()
            self._start_api(engine)
            self._start_drivers()
            self._start_sync()
            self._start_hook()
            log.info(
                "ready: box %s merchant %s store %s, cache seq %d, %s",
                self.config.box.id,
                self.config.box.merchant,
                self.config.box.store,
                engine.cache_seq,
                self.config.source,
            )
            self.notify.ready(self._summary(engine))
            while not self.stopping.is_set():
                now = time.monotonic()
                # The watchdog is fed from this loop only: if the engine hangs (a stuck
                # disk, a bug), the pings stop and systemd restarts the service.
                if self.notify.watchdog_due():
                    self.notify.watchdog()
                if self._reload_asked.is_set():
                    self._reload_asked.clear()
                    engine = self._reload(engine)
                if now - last_status >= self.STATUS_EVERY:
                    self._write_status(engine)
                    self.notify.status(self._summary(engine))
                    last_status = now
                try:
                    scan = self.scans.get(timeout=0.5)
                except queue.Empty:
                    continue
                if scan is None:
                    if all(s.ended for s in self.supervisors.values()):
                        break
                    continue
                self._decide(engine, scan)
                if self.sync is not None:
                    self.sync.wake()  # a committed record goes up now, not at the next tick
        except KeyboardInterrupt:
            pass
        finally:
            self._shut_down(engine, conn)
        log.info("stopped")
        return 0

    def _shut_down(self, engine: Engine, conn: sqlite3.Connection) -> None:
        """Every step runs even when one before it failed (a full disk in the drain, a
        driver that raises on close): a part left running keeps the process alive,
        because none of its threads is a daemon thread."""
        steps: tuple[tuple[str, Callable[[], object]], ...] = (
            ("tell systemd", self.notify.stopping),
            ("stop the scanners", self._stop_drivers),
            ("decide the reads already queued", lambda: self._drain(engine)),
            ("stop the local API", self._stop_api),
            ("stop sync", self._stop_sync),
            ("stop the on_verdict hook", self._stop_hook),
            ("stop the printer", self._stop_printer),
            ("write status.json", lambda: self._write_status(engine)),
            ("close the database", conn.close),
            ("close the systemd socket", self.notify.close),
        )
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("while stopping, could not %s; going on with the rest", what)

    def _stop_sync(self) -> None:
        if self.sync is not None and not self.sync.stop(timeout=5.0):
            log.warning("sync did not stop within 5 s")

    def _stop_hook(self) -> None:
        if self.hook is not None and not self.hook.stop():
            log.warning("the on_verdict hook did not stop in time")

    def _decide(self, engine: Engine, scan: Scan | ApiCall) -> None:
        """One scan: decided and committed by the engine, then shown (durable before
        shown), then the scanner's beep and the hook."""
        if isinstance(scan, ApiCall):
            self._answer(engine, scan)
            return
        result = engine.handle(scan)
        if isinstance(result, Repeat):
            # A debounced repeat is the same read: answer it as that read was answered
            # (not as the read before it, which may be another code), because scanners
            # in host-ACK mode wait for an answer to every read.
            self._feedback(scan.source, result.accepted)
            self._show_repeat(result, scan)
        else:
            self._show(result)
            if self.commands is not None:
                self.commands.scanned(scan, result)
            # A payment code passed on to the POS app is a good read.
            self._feedback(scan.source, isinstance(result, PaymentCode) or result.accepted)
            if self.hook is not None and isinstance(result, Verdict):
                self.hook.submit(result.to_json())
            if isinstance(result, Verdict) and result.accepted and result.action is Action.REDEEM:
                self._dispense_by_rules(engine, result.card_id)

    def _drain(self, engine: Engine, limit: float = 2.0) -> None:
        """On the way out, decide the reads already queued (the drivers are stopped,
        so no new ones come): a customer who scanned just before SIGTERM still gets a
        verdict, and nothing read is dropped without a record. Bounded in time."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                scan = self.scans.get_nowait()
            except queue.Empty:
                return
            if scan is not None:
                try:
                    self._decide(engine, scan)
                except Exception:  # stopping anyway; the scan was not accepted
                    log.exception("could not decide a queued scan while stopping")
                    return

    def _summary(self, engine: Engine) -> str:
        """The STATUS= line systemctl status shows."""
        connected = [s for s in self.supervisors.values() if s.state.state is Status.CONNECTED]
        parts = [
            f"cache seq {engine.cache_seq}",
            f"scanners {len(connected)}/{len(self.supervisors)}",
        ]
        if self.sync is not None:
            state = self.sync.state()
            link = "online" if state.connected else "offline"
            depth = "?" if state.outbox_depth is None else state.outbox_depth
            parts.append(f"sync {link}, outbox {depth}")
        if engine.alarm:
            parts.append(f"ALARM {engine.alarm}")
        return "; ".join(parts)

    # ------------------------------------------------------------------ reload

    def _reload(self, engine: Engine) -> Engine:
        """SIGHUP: read the configuration again and apply what changed, keeping the
        broker session and every queued scan. A bad file changes nothing."""
        if self.load is None:
            log.warning("reload asked, but this service has no configuration file to re-read")
            return engine
        self.notify.reloading()
        try:
            new = self.load()
        except ConfigError as exc:
            log.error("reload refused, still running the previous configuration: %s", exc)
            self.notify.send(READY="1", STATUS="reload refused: " + self._summary(engine))
            return engine
        old = self.config
        if new.box != old.box:
            log.error(
                "reload refused: [box] changed (id, merchant, store, database or time zone "
                "take effect on restart: systemctl restart redeemd); still running the "
                "previous configuration"
            )
            self.notify.send(READY="1", STATUS="reload refused: " + self._summary(engine))
            return engine
        self.config = new
        changed = [
            name
            for name in ("trust", "scan", "sync", "hooks", "dispense", "printer")
            if getattr(new, name, None) != getattr(old, name, None)
        ]
        if self._reload_drivers(old, new):
            changed.append("scanners")
        if new.sync != old.sync:
            if self.sync is not None and not self.sync.stop(timeout=5.0):
                log.warning("sync did not stop within 5 s")
            self.sync = None
            self._start_sync()
        elif self.sync is not None and new.trust != old.trust:
            self.sync.update_trust(new.trust.root_keys, new.trust.max_batch_bytes)
        if new.hooks != old.hooks:
            if self.hook is not None:
                self.hook.stop()
            self.hook = None
            self._start_hook()
        if "printer" in changed:
            self._stop_printer()
            self.receipts = None
            self._start_printer()
        engine = (
            Engine(engine.conn, new) if {"trust", "scan", "dispense"} & set(changed) else engine
        )
        log.info("reloaded %s: %s", new.source, ", ".join(changed) or "nothing changed")
        self.notify.send(READY="1", STATUS=self._summary(engine))
        return engine

    def _reload_drivers(self, old: Config, new: Config) -> bool:
        """Stop scanners that were removed or changed, start the new and changed ones;
        the others keep running (a reload never interrupts an untouched scanner). True
        if any scanner was stopped or started."""
        before = {s.name: s for s in old.scanners}
        after = {s.name: s for s in new.scanners}
        gone = [name for name, s in before.items() if after.get(name) != s]
        added = [s for name, s in after.items() if before.get(name) != s]
        for name in gone:
            supervisor = self.supervisors.pop(name, None)
            if supervisor is not None:
                supervisor.stop(timeout=2.0)  # one that hangs is logged by its thread name
        for scanner in added:
            self._start_driver(scanner)
        if gone or added:
            log.info(
                "scanners: stopped %s; started %s",
                ", ".join(gone) or "none",
                ", ".join(s.name for s in added) or "none",
            )
        return bool(gone or added)

    def _start_drivers(self) -> None:
        for scanner in self.config.scanners:
            self._start_driver(scanner)

    def _start_driver(self, scanner: ScannerConfig) -> None:
        # The thread ends by putting None, so the loop notices an ended source.
        supervisor = Supervisor(
            build_driver(scanner), self.scans.put, on_end=lambda: self.scans.put(None)
        )
        self.supervisors[scanner.name] = supervisor
        supervisor.start()

    def _start_hook(self) -> None:
        if self.config.hooks.on_verdict:
            self.hook = VerdictHook(self.config.hooks.on_verdict, self.config.hooks.timeout)
            self.hook.start()

    def _start_sync(self) -> None:
        """MQTT sync in its own thread, after the engine: offline is normal, so the
        scan loop never waits for it."""
        if not self.config.sync.enabled:
            return
        box, trust = self.config.box, self.config.trust
        self.sync = Sync(
            self.config.sync,
            box=box.id,
            merchant=box.merchant,
            database=box.database,
            roots=trust.root_keys,
            max_batch_bytes=trust.max_batch_bytes,
            drivers=lambda: [s.state.to_json() for s in list(self.supervisors.values())],
            box_key=None if self.box_key is None else self.box_key.public,
        )
        self.sync.start()

    # ------------------------------------------------------------------ local API

    API_WAIT = 10.0

    def _start_api(self, engine: Engine) -> None:
        """The POS application's socket, after the engine is open. A socket that cannot
        be created is one log line: the box keeps scanning without the API."""
        config = self.config.api
        if not config.enabled:
            return
        server = ApiServer(config.socket, self._submit, mode=config.mode, group=config.group)
        try:
            server.start()
        except ApiUnavailable as exc:
            log.warning("%s", exc)
            return
        self.api = server
        self.commands = Commands(
            engine,
            server.publish,
            status=self._api_status,
            shown=self._shown_api,
            confirm_within=config.confirm_within,
            box_key=self.box_key,
            dispensed=self._dispensed,
        )
        log.info("local API on %s", config.socket)

    def _submit(self, request: dict) -> dict:
        """Called on the API's request thread; the engine answers on this service's
        thread between two scans. Bounded: the API never waits on a stuck engine."""
        call = ApiCall(request)
        try:
            self.scans.put(call, timeout=self.API_WAIT)
        except queue.Full:
            return error(Error.BUSY, "redeemd is busy with scans; retry with the same key")
        response = call.wait(self.API_WAIT, self._api_closed)
        if response is not None:
            return response
        if self._api_closed.is_set():
            return error(Error.SHUTTING_DOWN, "redeemd is stopping; retry after it restarts")
        return error(Error.TIMEOUT, "the engine did not answer in time; retry with the same key")

    def _answer(self, engine: Engine, call: ApiCall) -> None:
        if self.commands is None:  # never queued without a server
            call.answer(error(Error.SHUTTING_DOWN, "the local API is not running"))
            return
        self.commands.engine = engine  # a reload may have built a new one
        try:
            response = self.commands(call.request)
        except Exception:  # a bug in one request must not stop the box
            log.exception("api: %s request failed", call.request.get("cmd"))
            response = error(Error.INTERNAL_ERROR, "the request failed; see the log")
        call.answer(response)
        # After the answer: a rule's dispense never delays the redemption's verdict.
        verdict = response.get("verdict")
        if (
            isinstance(verdict, dict)
            and not response.get("replayed")
            and not response.get("repeat")
            and verdict.get("verdict") == "accepted"
            and verdict.get("action") == "redeem"
            and "record_id" in verdict
        ):
            self._dispense_by_rules(engine, verdict.get("card_id"))

    # ------------------------------------------------------------------ dispensing

    def _load_box_key(self) -> None:
        """The box key, made on first start. Without it the box still scans; dispensing
        answers with the reason (a local API request reads it again)."""
        try:
            self.box_key = box_key_mod.load_or_create(self.config.box.state_dir)
        except box_key_mod.BoxKeyError as exc:
            log.error("%s; dispensing is off until it is fixed", exc)
            return
        log.info("box key %s", self.box_key.key_id)

    def _dispense_by_rules(self, engine: Engine, card_id: int | None) -> None:
        """[[dispense.rules]] after an accepted redemption of `card_id`, whose verdict is
        already out (shown, answered, beeped). Each rule's codes are their own records."""
        rules = engine.dispense_config.after(card_id)
        if not rules:
            return
        if self.box_key is None:
            log.warning("dispense rule for card %s skipped: the box key cannot be read", card_id)
            return
        for rule in rules:
            try:
                if self.commands is not None:
                    self.commands.engine = engine  # a reload may have built a new one
                    self.commands.dispense_by_rule(rule.card, rule.count, "rule")
                else:
                    found = engine.dispense(rule.card, rule.count, self.box_key, "rule")
                    self._dispensed(found, True)
            except Exception:  # a bug in a rule must not stop the box
                log.exception("dispense rule %d -> %d failed", rule.after_card, rule.card)

    def _dispensed(self, dispensed: Dispensed, to_print: bool) -> None:
        """A committed dispense: its console lines (digest prefixes: stdout is the
        journal under systemd, so never the code) and, when asked, its receipts."""
        if self.as_json:
            lines = [
                json.dumps({"event": "dispensed", **c.record_json()}) for c in dispensed.claims
            ]
            if dispensed.refused is not None:
                lines.append(json.dumps(dispensed.refused.to_json()))
        else:
            lines = dispensed.describe()
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()
        if self.receipts is not None and to_print:
            for claim in dispensed.claims:
                self.receipts.submit(claim)

    def _start_printer(self) -> None:
        settings = self.config.printer
        if settings is None:
            return
        from drivers.printer import ReceiptPrinter

        self.receipts = PrintQueue(ReceiptPrinter(settings))
        self.receipts.start()
        log.info("receipt printer: %s %s", settings.kind, settings.device)

    def _stop_printer(self) -> None:
        if self.receipts is not None and not self.receipts.stop(timeout=2.0):
            log.warning("the printer thread did not stop within 2 s")

    def _shown_api(self, result: Verdict | PaymentCode) -> None:
        self._show(result)
        if self.hook is not None and isinstance(result, Verdict):
            self.hook.submit(result.to_json())

    def _api_state(self) -> dict[str, object]:
        if self.api is None:
            return {"enabled": self.config.api.enabled, "serving": False}
        return {
            "enabled": True,
            "serving": True,
            "socket": str(self.api.path),
            "clients": self.api.clients,
            "subscribers": self.api.subscribers,
        }

    def _api_status(self) -> dict[str, object]:
        return {
            "drivers": [s.state.to_json() for s in list(self.supervisors.values())],
            "sync": self.sync.state().to_json() if self.sync is not None else {"enabled": False},
            "api": self._api_state(),
            **self._printer_state(),
        }

    def _printer_state(self) -> dict[str, object]:
        """`printer` in status, when one is configured."""
        return {} if self.receipts is None else {"printer": self.receipts.describe()}

    def _stop_api(self) -> None:
        # After the drain: requests queued before the stop were answered there; later
        # ones are told redeemd is stopping.
        self._api_closed.set()
        if self.api is not None and not self.api.stop(timeout=2.0):
            log.warning("the local API did not stop within 2 s")

    def _stop_drivers(self) -> None:
        # Signal every driver first, then wait: shutdown takes the longest single wait,
        # not the sum of them. A scanner that hangs is logged by its thread name.
        stop_all([s.thread for s in self.supervisors.values()], timeout=2.0)

    def _feedback(self, source: str, accepted: bool) -> None:
        supervisor = self.supervisors.get(source)
        if supervisor is None:
            return
        try:
            supervisor.driver.feedback(accepted)
        except Exception as exc:  # a beep that fails must not lose the next scan
            log.warning("scanner %s: feedback failed: %s", source, exc)

    def _write_status(self, engine: Engine) -> None:
        """Live state for `redeemd status` (drivers, alarms), replaced atomically."""
        status = {
            "pid": os.getpid(),
            "updated_at": time.time(),
            "alarm": engine.alarm,
            "drivers": [s.state.to_json() for s in self.supervisors.values()],
            "sync": self.sync.state().to_json() if self.sync is not None else {"enabled": False},
            "hook": self.hook.state() if self.hook is not None else None,
            "api": self._api_state(),
            **self._printer_state(),
        }
        tmp = self.status_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(status))
            os.replace(tmp, self.status_path)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.status_path, exc)

    def _show_repeat(self, repeat: Repeat, scan: Scan) -> None:
        """A debounced repeat typed on a terminal (a stdin scanner): the person who typed
        a code twice sees it taken as the same read, not lost. Only there: a hardware
        scanner held over a code repeats it many times a second, and beeps for each; and
        --json prints verdicts only (a repeat is none)."""
        if self.as_json or not any(
            s.name == scan.source and s.type == "stdin" for s in self.config.scanners
        ):
            return
        answer = "accepted" if repeat.accepted else "rejected"
        self.out.write(
            f"same read as {repeat.age:.1f} s ago: {answer} (within the "
            f"{self.config.scan.debounce:g} s debounce: not recorded again)\n"
        )
        self.out.flush()

    def _show(self, result: Verdict | PaymentCode) -> None:
        line = json.dumps(result.to_json()) if self.as_json else describe(result)
        self.out.write(line + "\n")
        self.out.flush()
