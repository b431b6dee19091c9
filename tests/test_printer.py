"""The receipt printer (drivers/printer.py) against real ptys, loopback TCP and files.

What a printer received is read back with tests/escpos.py's parser: the QR payload is
the claim URL with length fields that add up, and the printer's states come from the
status bytes a fake printer answers with. No mocks: the driver's bytes cross a real
pseudo-terminal or socket.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from conftest import ROOT
from escpos import CUT, EscPosError, PtyPrinter, TcpPrinter, parse
from pydantic import ValidationError

from drivers.printer import (
    ClaimReceipt,
    PrinterError,
    PrinterState,
    ReceiptPrinter,
    decode_status,
    qr_bytes,
    receipt_bytes,
)
from drivers.settings import PrinterSettings

# A claim URL of the length the box mints (~190 ASCII characters).
URL = "https://claim.example.com/c/RC1" + "ABCDEFGHJKLMNPQRSTUVWXYZ23456789" * 5 + "Q7"
RECEIPT = ClaimReceipt("Coffee card", URL, claim_by=date(2026, 12, 31))
QR_STORE = b"\x1d(k"  # every QR command starts so; the store carries the payload
FAST = {"timeout": 0.5}  # the silent printer's wait; nothing is asserted on time


def assert_claim_receipt(data: bytes, settings: PrinterSettings) -> None:
    """`data` holds exactly one complete claim receipt for URL."""
    parsed = parse(data)
    assert not parsed.incomplete
    printed = [r for r in parsed.receipts if r.qr_codes or r.cut]
    assert len(printed) == 1, parsed
    (receipt,) = printed
    assert receipt.cut
    (qr,) = receipt.qr_codes
    assert qr.payload == URL.encode()
    assert qr.printed, "GS ( k function 181 (print) did not follow the store"
    assert (qr.model, qr.module_size, qr.error_correction) == (2, settings.qr_module_size, "M")
    # Store: pL pH = payload + 3 (cn 49, fn 80, m 48), little-endian.
    store = b"\x1d(k" + struct.pack("<H", len(URL) + 3) + b"1P0" + URL.encode()
    assert store in data
    assert "Coffee card" in receipt.lines[: receipt.qr_at]
    assert "Scan to add to your wallet" in receipt.lines[: receipt.qr_at]
    after = receipt.text_after_qr()
    assert after[0] == ""  # the line the QR code stands on
    url_lines = after[1 : after.index("Claim by 2026-12-31")]
    assert "".join(url_lines) == URL, after
    assert all(len(line) <= settings.columns for line in receipt.lines)


@pytest.fixture
def pty_printer(tmp_path: Path) -> Iterator[PtyPrinter]:
    printer = PtyPrinter(tmp_path / "usb-Epson_TM-T20-if00")
    yield printer
    printer.close()


@pytest.fixture
def tcp_printer() -> Iterator[TcpPrinter]:
    printer = TcpPrinter()
    yield printer
    printer.close()


def serial_driver(fake: PtyPrinter, **more: object) -> ReceiptPrinter:
    return ReceiptPrinter({"kind": "serial", "device": str(fake.path), **FAST, **more})


def network_driver(fake: TcpPrinter, **more: object) -> ReceiptPrinter:
    return ReceiptPrinter({"kind": "network", "device": fake.device, **FAST, **more})


@pytest.fixture(params=["serial", "network"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[object, ReceiptPrinter]]:
    """A fake printer and a driver printing to it, over a pty or over TCP."""
    if request.param == "serial":
        fake: PtyPrinter | TcpPrinter = PtyPrinter(tmp_path / "printer")
        driver = serial_driver(fake)
    else:
        fake = TcpPrinter()
        driver = network_driver(fake)
    yield fake, driver
    driver.close()
    fake.close()


# -- the receipt's bytes ----------------------------------------------------------------


def test_receipt_carries_the_claim_url_in_a_native_qr_code():
    settings = PrinterSettings.of({"kind": "usb", "device": "/dev/usb/lp0"})
    data = receipt_bytes(RECEIPT, settings)
    assert_claim_receipt(data, settings)
    # Select model 2, module size, error correction M, exactly as the Epson reference has them.
    assert data.count(QR_STORE) == 5
    assert b"\x1d(k\x04\x001A2\x00" in data
    assert b"\x1d(k\x03\x001C\x06" in data
    assert b"\x1d(k\x03\x001E1" in data
    assert b"\x1d(k\x03\x001Q0" in data


def test_header_footer_and_width_come_from_the_settings():
    settings = PrinterSettings.of(
        {
            "kind": "usb",
            "device": "/dev/usb/lp0",
            "columns": 32,
            "qr_module_size": 5,
            "header": ["Café Zürich"],
            "footer": ["Thank you"],
        }
    )
    (receipt,) = [r for r in parse(receipt_bytes(RECEIPT, settings)).receipts if r.cut]
    assert receipt.lines[0] == "Cafe Zurich"  # plain ASCII prints on any code page
    assert receipt.lines[-1] == "Thank you"
    assert receipt.qr_codes[0].module_size == 5
    assert all(len(line) <= 32 for line in receipt.lines)
    after = receipt.text_after_qr()
    assert "".join(after[1 : after.index("Claim by 2026-12-31")]) == URL


def test_a_payload_no_qr_code_holds_is_refused_before_printing():
    with pytest.raises(ValueError, match="2331"):
        qr_bytes(b"x" * 2332, 6)
    with pytest.raises(ValueError, match="1 to"):
        qr_bytes(b"", 6)


def test_parser_refuses_unknown_commands_and_reports_truncated_streams():
    with pytest.raises(EscPosError, match="unknown"):
        parse(b"\x1bZ\x00")
    with pytest.raises(EscPosError, match="unknown QR function"):
        parse(b"\x1d(k\x03\x001\x99\x00")
    settings = PrinterSettings.of({"kind": "usb", "device": "/dev/usb/lp0"})
    data = receipt_bytes(RECEIPT, settings)
    cut_short = data[: data.index(URL.encode()) + 20]  # inside the store command
    parsed = parse(cut_short)
    assert parsed.incomplete and not parsed.receipts[0].qr_codes


# -- printing on real transports ----------------------------------------------------------


def test_receipt_prints_on_a_serial_pty(pty_printer: PtyPrinter):
    with serial_driver(pty_printer, baudrate=19200) as driver:
        driver.print_claim(RECEIPT)
        data = pty_printer.wait_for(CUT)
        assert_claim_receipt(data, driver.settings)
        # Asked before (printer, paper) and after the receipt.
        assert parse(data).status_queries == [1, 4, 1, 4]
        assert driver.state is PrinterState.READY
        assert driver.describe()["state"] == "ready"


def test_receipt_prints_over_tcp(tcp_printer: TcpPrinter):
    with network_driver(tcp_printer) as driver:
        driver.print_claim(RECEIPT)
        assert_claim_receipt(tcp_printer.wait_for(CUT), driver.settings)
        driver.print_claim(RECEIPT)
        tcp_printer.wait_for(CUT, count=2)
        assert driver.state is PrinterState.READY
    # A connection per receipt: another host may print between them.
    assert tcp_printer.connections == 2


def test_receipt_prints_to_a_usb_printer_device_file(tmp_path: Path):
    device = tmp_path / "lp0"
    with ReceiptPrinter({"kind": "usb", "device": str(device), **FAST}) as driver:
        with pytest.raises(PrinterError, match="not there") as raised:
            driver.print_claim(RECEIPT)
        assert raised.value.state is PrinterState.OFFLINE
        assert driver.describe()["state"] == "offline"
        device.write_bytes(b"")  # plugged in
        driver.print_claim(RECEIPT)
        assert driver.state is PrinterState.READY
    data = device.read_bytes()
    assert_claim_receipt(data, driver.settings)
    assert parse(data).status_queries == []  # a one-way device is not asked


def test_usb_printer_whose_reader_went_away_is_offline(tmp_path: Path):
    """A FIFO stands in for a device whose other end is gone: open() gives ENXIO."""
    device = tmp_path / "lp0"
    os.mkfifo(device)
    with ReceiptPrinter({"kind": "usb", "device": str(device), **FAST}) as driver:
        status = driver.check()
        assert status.state is PrinterState.OFFLINE
        received = bytearray()
        reader = os.open(device, os.O_RDONLY | os.O_NONBLOCK)
        try:
            driver.print_claim(RECEIPT)
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(reader, 65536):
                    received += chunk
        finally:
            os.close(reader)
        assert_claim_receipt(bytes(received), driver.settings)


# -- states -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "state", "words"),
    [
        ("online", PrinterState.READY, ""),
        ("noisy_online", PrinterState.READY, ""),
        ("status_1_only", PrinterState.READY, ""),
        ("paper_low", PrinterState.PAPER_LOW, "replace the roll"),
        ("paper_out", PrinterState.PAPER_OUT, "load a new roll"),
        ("cover_open", PrinterState.COVER_OPEN, "close it"),
        ("offline", PrinterState.OFFLINE, "says it is offline"),
        ("cutter_jam", PrinterState.ERROR, "cutter"),
        ("silent", PrinterState.OFFLINE, "did not answer"),
        ("junk", PrinterState.ERROR, "baudrate"),
    ],
)
def test_state_comes_from_the_status_bytes(rig, answers: str, state: PrinterState, words: str):
    fake, driver = rig
    fake.set_status(answers)
    status = driver.check()  # never raises
    assert status.state is state
    assert words in status.detail
    assert driver.describe() == {
        "state": str(state),
        "detail": status.detail,
        "kind": driver.settings.kind,
        "device": driver.settings.device,
        "checked": status.checked,
    }


@pytest.mark.parametrize("answers", ["paper_out", "cover_open", "offline", "silent", "junk"])
def test_a_printer_that_cannot_print_raises_printer_error_and_gets_nothing(rig, answers: str):
    fake, driver = rig
    fake.set_status(answers)
    with pytest.raises(PrinterError, match="receipt not printed") as raised:
        driver.print_claim(RECEIPT)
    assert raised.value.state is driver.state
    assert driver.state is not PrinterState.READY
    assert QR_STORE not in fake.received
    assert URL not in str(raised.value)  # the claim code stays off logs and messages
    fake.set_status("online")
    driver.print_claim(RECEIPT)
    assert_claim_receipt(fake.wait_for(CUT), driver.settings)
    assert driver.state is PrinterState.READY


def test_paper_low_still_prints(rig):
    fake, driver = rig
    fake.set_status("paper_low")
    driver.print_claim(RECEIPT)
    assert_claim_receipt(fake.wait_for(CUT), driver.settings)
    assert driver.state is PrinterState.PAPER_LOW


def test_paper_running_out_during_the_receipt_says_it_may_be_incomplete(rig):
    fake, driver = rig
    # The answers change once the receipt has arrived: the query after it sees paper end.
    fake.change_on = (QR_STORE, "paper_out")
    with pytest.raises(PrinterError, match="may be incomplete") as raised:
        driver.print_claim(RECEIPT)
    assert raised.value.state is PrinterState.PAPER_OUT
    assert driver.describe()["state"] == "paper_out"


def test_silent_printer_prints_when_status_queries_are_off(pty_printer: PtyPrinter):
    pty_printer.set_status("silent")
    with serial_driver(pty_printer, status_query=False) as driver:
        driver.print_claim(RECEIPT)
        data = pty_printer.wait_for(CUT)
        assert_claim_receipt(data, driver.settings)
        assert parse(data).status_queries == []


# -- vanishing and coming back --------------------------------------------------------------


def test_serial_printer_that_vanishes_mid_print_is_offline_and_prints_when_back(
    pty_printer: PtyPrinter,
):
    with serial_driver(pty_printer) as driver:
        pty_printer.vanish_on = QR_STORE
        with pytest.raises(PrinterError, match="disconnected") as raised:
            driver.print_claim(RECEIPT)
        assert raised.value.state is PrinterState.OFFLINE
        assert pty_printer.vanished.wait(60)
        assert driver.describe()["state"] == "offline"
        # Still gone (the symlink leads to a closed pty): offline, not a crash.
        assert driver.check().state is PrinterState.OFFLINE
        with pytest.raises(PrinterError):
            driver.print_claim(RECEIPT)
        pty_printer.replug()
        before, cuts = len(pty_printer.received), pty_printer.received.count(CUT)
        driver.print_claim(RECEIPT)
        data = pty_printer.wait_for(CUT, count=cuts + 1)
        assert_claim_receipt(data[before:], driver.settings)
        assert driver.state is PrinterState.READY


def test_network_printer_that_resets_mid_print_is_offline_and_prints_when_back(
    tcp_printer: TcpPrinter,
):
    with network_driver(tcp_printer) as driver:
        tcp_printer.vanish_on = QR_STORE
        with pytest.raises(PrinterError, match="went away|closed the connection") as raised:
            driver.print_claim(RECEIPT)
        assert raised.value.state is PrinterState.OFFLINE
        assert tcp_printer.vanished.wait(60)
        tcp_printer.stop()
        status = driver.check()  # nothing listens: refused
        assert status.state is PrinterState.OFFLINE
        assert "refused" in status.detail
        tcp_printer.start()
        before, cuts = len(tcp_printer.received), tcp_printer.received.count(CUT)
        driver.print_claim(RECEIPT)
        data = tcp_printer.wait_for(CUT, count=cuts + 1)
        assert_claim_receipt(data[before:], driver.settings)
        assert driver.state is PrinterState.READY


def test_a_path_that_is_no_serial_port_is_an_error_for_the_technician(tmp_path: Path):
    plain = tmp_path / "not-a-tty"
    plain.write_bytes(b"")
    with ReceiptPrinter({"kind": "serial", "device": str(plain)}) as driver:
        status = driver.check()
    assert status.state is PrinterState.ERROR
    assert "not a serial port" in status.detail


def test_a_serial_port_held_by_another_printer_object_is_in_use(pty_printer: PtyPrinter):
    with serial_driver(pty_printer) as first, serial_driver(pty_printer) as second:
        assert first.check().state is PrinterState.READY
        status = second.check()
        assert status.state is PrinterState.ERROR
        assert "in use" in status.detail


# -- status decoding and settings -------------------------------------------------------------


def test_paper_end_sensor_wins_over_an_online_printer():
    # Some printers stay online with the paper out and say so only on DLE EOT 4.
    assert decode_status(0x12, 0x72)[0] is PrinterState.PAPER_OUT


def test_printer_settings_check_the_device_against_the_kind():
    network = PrinterSettings.of({"kind": "network", "device": "printer.local:9101"})
    assert network.address == ("printer.local", 9101)
    assert PrinterSettings.of({"kind": "network", "device": "10.0.0.5"}).address == (
        "10.0.0.5",
        9100,
    )
    with pytest.raises(ValidationError) as raised:
        PrinterSettings.of({"kind": "network", "device": "/dev/usb/lp0", "qr_module_size": 17})
    problems = {e["loc"][0]: str(e["ctx"]["error"]) for e in raised.value.errors()}
    assert "host name" in problems["device"]
    assert "1 to 16" in problems["qr_module_size"]
    with pytest.raises(ValidationError, match="absolute device path"):
        PrinterSettings.of({"kind": "serial", "device": "ttyUSB0"})
    with pytest.raises(ValidationError, match="port"):
        PrinterSettings.of({"kind": "network", "device": "printer:99999"})
    with pytest.raises(ValidationError):
        network.timeout = 3.0  # type: ignore[misc]


def test_technician_test_print_from_a_shell(tmp_path: Path):
    device = tmp_path / "lp0"
    device.write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "drivers.printer", "usb", str(device)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "ready\n"), done.stderr
    (receipt,) = [r for r in parse(device.read_bytes()).receipts if r.cut]
    assert receipt.qr_codes[0].payload.startswith(b"https://") and receipt.qr_codes[0].printed
    device.unlink()
    done = subprocess.run(
        [sys.executable, "-m", "drivers.printer", "usb", str(device), "--status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout.startswith("offline: ") and "not there" in done.stdout
