"""Serial scanners: framing, host commands and the device loop on real pseudo-terminals.

A pty stands in for the scanner: the test writes to the master side what a scanner sends
and reads from it what the driver sends back. Closing the master is an unplug (the
driver's reads fail with EIO, as they do when a CDC-ACM device goes away); a new pty
behind a re-pointed symlink in tmp_path is the same scanner coming back under another
/dev/ttyACMn, found through its /dev/serial/by-id/ link.

The Supervisor in these tests waits an hour before running a driver again, so whatever
reconnecting a test sees is the driver's own doing, not the Supervisor's retry.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import serial
from conftest import ROOT, write_box
from hypothesis import given, settings
from hypothesis import strategies as st
from ptys import Pty

from cards.normalize import OVERSIZED, MalformedCode, normalize
from cards.scan import Scan
from daemon import config as config_mod
from drivers.feedback import (
    SSI_ACK_REPLY,
    Feedback,
    feedback_from,
    ssi_beep,
    ssi_checksum,
)
from drivers.serial import SerialScanner
from drivers.serial_framing import DEFAULT_MAX_LENGTH, TERMINATORS, SerialFramer
from drivers.supervisor import DeviceGone, DriverError, DriverState, Supervisor

WAIT = 20.0  # generous: these wait on conditions, never on the clock
NEVER = 3600.0  # a Supervisor backoff no test outlives
# Mark/space ("stick") parity, from <asm-generic/termbits.h>; Python's termios lacks it.
CMSPAR = 0o10000000000


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def pty() -> Iterator[Pty]:
    device = Pty()
    yield device
    device.unplug()


class WatchedFramer(SerialFramer):
    """A SerialFramer that counts the quiet lines it is told about after a dropped read."""

    quiet_after_a_drop = 0

    def idle(self) -> list[bytes]:
        if self.dropped:
            self.quiet_after_a_drop += 1
        return super().idle()


class WatchedScanner(SerialScanner):
    """A SerialScanner that records what its loop does: how often run() was entered (the
    Supervisor's retries), how often it waited for input, what it read and opened."""

    def __init__(self, name: str, settings: dict[str, object]):
        super().__init__(name, settings)
        self.runs = 0
        self.reads = 0
        self.received = bytearray()
        self.opened: list[serial.Serial] = []
        self.framers: list[WatchedFramer] = []

    def run(self, emit, stop, state):
        self.runs += 1
        super().run(emit, stop, state)

    def _read(self, port, wait):
        self.reads += 1
        data = super()._read(port, wait)
        self.received += data
        return data

    def _open(self):
        port, device = super()._open()
        self.opened.append(port)
        return port, device

    def framer(self) -> WatchedFramer:
        plain = super().framer()
        framer = WatchedFramer(
            terminator=plain.terminator,
            prefix=plain.prefix,
            suffix=plain.suffix,
            strip_leading=plain.strip_leading,
        )
        self.framers.append(framer)
        return framer


class Running:
    def __init__(self, supervisor: Supervisor, scans: queue.Queue[Scan]):
        self.supervisor = supervisor
        self.driver: WatchedScanner = supervisor.driver  # type: ignore[assignment]
        self.scans = scans

    @property
    def state(self) -> DriverState:
        return self.supervisor.state

    def next_code(self) -> bytes:
        return self.scans.get(timeout=WAIT).code


@contextmanager
def supervised(port: str | Path, **settings: object) -> Iterator[Running]:
    """A WatchedScanner on `port` under a real Supervisor that never retries in time."""
    scans: queue.Queue[Scan] = queue.Queue()
    driver = WatchedScanner("counter", {"port": str(port), **settings})
    supervisor = Supervisor(driver, scans.put, initial_backoff=NEVER, max_backoff=NEVER)
    supervisor.start()
    try:
        yield Running(supervisor, scans)
    finally:
        assert supervisor.stop(timeout=WAIT), "the driver did not honour stop"
        assert supervisor.state.state == "stopped"


@contextmanager
def running(port: str | Path, **settings: object) -> Iterator[Running]:
    """Like `supervised`, once the scanner is connected to `port`."""
    with supervised(port, **settings) as scanner:
        wait_for(lambda: scanner.state.state == "connected", "the scanner to connect")
        yield scanner


# ---------------------------------------------------------------- framing, no device


def test_code_split_across_reads_is_one_frame():
    framer = SerialFramer()
    assert framer.feed(b"DEMO-") == []
    assert framer.feed(b"00") == []
    assert framer.feed(b"01\r") == [b"DEMO-0001"]


def test_several_codes_in_one_read_are_separate_frames():
    framer = SerialFramer()
    assert framer.feed(b"A1\rB2\nC3\r\nD4\x03E5") == [b"A1", b"B2", b"C3", b"D4"]
    assert framer.feed(b"\r") == [b"E5"]


def test_tab_suffix_ends_a_read_with_auto():
    # Scanners shipped with a TAB suffix (to jump to the next form field) send no CR:
    # each code must come out on its own, not wait for a CR and merge with the next.
    framer = SerialFramer()
    assert framer.feed(b"DEMO-0001\t") == [b"DEMO-0001"]
    assert framer.feed(b"DEMO-0002\tDEMO-0003\t\r\n") == [b"DEMO-0002", b"DEMO-0003"]
    assert framer.pending == 0


def test_crlf_split_between_cr_and_lf_gives_no_empty_frame():
    framer = SerialFramer()
    assert framer.feed(b"A1\r") == [b"A1"]
    assert framer.feed(b"\nB2\r") == [b"B2"]


def test_crlf_terminator_keeps_a_lone_cr_and_waits_for_lf():
    framer = SerialFramer(terminator="crlf")
    assert framer.feed(b"A1\r") == []
    assert framer.feed(b"\n") == [b"A1"]


@pytest.mark.parametrize(
    ("terminator", "data", "frames"),
    [
        ("cr", b"A1\rB2\n\r", [b"A1", b"B2\n"]),
        ("lf", b"A1\nB2\r\n", [b"A1", b"B2\r"]),
        ("etx", b"\x02A1\x03\x02B2\r\n\x03", [b"A1", b"B2\r\n"]),
        ("tab", b"A1\tB2\r\n\t", [b"A1", b"B2\r\n"]),
        ("auto", b"\x02A1\x03\r\n", [b"A1"]),
    ],
)
def test_only_the_configured_terminator_ends_a_frame(terminator, data, frames):
    assert SerialFramer(terminator=terminator).feed(data) == frames


def test_stx_starts_a_new_frame_and_discards_an_unfinished_one():
    framer = SerialFramer(terminator="etx")
    assert framer.feed(b"\x02LOST-HALF\x02DEMO-0001\x03") == [b"DEMO-0001"]
    assert framer.discarded == 1


def test_prefix_and_suffix_are_stripped():
    framer = SerialFramer(prefix=b"#S:", suffix=b"#")
    assert framer.feed(b"#S:DEMO-0001#\r") == [b"DEMO-0001"]
    assert framer.feed(b"NO-PREFIX\r") == [b"NO-PREFIX"]


def test_terminator_none_ends_a_read_when_the_line_goes_idle():
    framer = SerialFramer(terminator="none")
    assert framer.feed(b"DEMO-") == []
    assert framer.feed(b"0001\r\n") == []
    assert framer.idle() == [b"DEMO-0001\r\n"]  # normalisation strips the whitespace
    assert framer.idle() == []


def test_idle_keeps_a_partial_frame_when_a_terminator_is_configured():
    framer = SerialFramer()
    assert framer.feed(b"DEMO-") == []
    assert framer.idle() == []
    assert framer.feed(b"0001\r") == [b"DEMO-0001"]


def test_over_long_line_without_terminator_is_dropped_with_its_tail():
    framer = SerialFramer(max_length=64)
    # One OVERSIZED marker for the whole runaway line: the cashier sees one refusal.
    frames = [f for _ in range(100) for f in framer.feed(b"9" * 1000)]
    assert frames == [OVERSIZED]
    assert framer.pending <= 64
    assert framer.feed(b"999\rDEMO-0001\r") == [b"DEMO-0001"]
    assert framer.dropped == 1


def test_over_long_terminated_frame_is_dropped_and_counted():
    framer = SerialFramer(max_length=8)
    assert framer.feed(b"123456789\r12345678\r") == [OVERSIZED, b"12345678"]
    assert framer.dropped == 1


def test_the_oversized_marker_is_a_malformed_read():
    with pytest.raises(MalformedCode):
        normalize(OVERSIZED)


def test_garbage_nul_and_invalid_utf8_pass_as_bytes_the_engine_refuses():
    framer = SerialFramer()
    frames = framer.feed(b"\xff\xfe\xc3\x28\r\x00\x00\x00\r\x1b[2J\x7f\r   \r")
    assert frames == [b"\xff\xfe\xc3\x28", b"\x00\x00\x00", b"\x1b[2J\x7f"]
    for frame in frames:
        with pytest.raises(MalformedCode):
            normalize(frame)


def test_ssi_ack_reply_before_a_code_is_stripped():
    framer = SerialFramer(strip_leading=(SSI_ACK_REPLY,))
    assert framer.feed(SSI_ACK_REPLY + b"DEMO-" + SSI_ACK_REPLY[:2]) == []
    # Only a reply at the start of a frame is one; inside a code it is data.
    assert framer.feed(b"0001\r") == [b"DEMO-" + SSI_ACK_REPLY[:2] + b"0001"]
    assert framer.feed(SSI_ACK_REPLY * 2 + b"DEMO-0002\r") == [b"DEMO-0002"]


def test_every_terminator_the_framer_knows_is_accepted_in_the_config(tmp_path, keyset):
    for terminator in TERMINATORS:
        block = f'[[scanner]]\ntype = "serial"\nname = "counter"\nport = "/dev/ttyACM0"\nterminator = "{terminator}"'
        box = write_box(tmp_path, keyset, extra=block)
        [scanner] = config_mod.load(str(box.config_path)).scanners
        assert scanner.settings.terminator == terminator


def test_unknown_terminator_is_refused():
    with pytest.raises(ValueError, match="terminator"):
        SerialFramer(terminator="semicolon")


@settings(max_examples=300, deadline=None)
@given(
    terminator=st.sampled_from(sorted(TERMINATORS)),
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
    max_length=st.integers(min_value=1, max_value=300),
    prefix=st.sampled_from([b"", b"#", b"\x02]"]),
    suffix=st.sampled_from([b"", b"!", b"\r"]),
)
def test_framer_property_any_bytes_any_split(terminator, data, cuts, max_length, prefix, suffix):
    """Any bytes, cut anywhere: never raises, memory stays bounded, frames carry no
    terminator or STX, and the frames do not depend on where the reads were cut."""
    forbidden = {
        "auto": b"\r\n\t\x03",
        "cr": b"\r",
        "lf": b"\n",
        "crlf": b"",
        "tab": b"\t",
        "etx": b"\x03",
        "none": b"",
    }[terminator] + b"\x02"
    bound = max_length + len(prefix) + len(suffix)

    def frame_all(pieces: list[bytes]) -> list[bytes]:
        framer = SerialFramer(terminator, prefix, suffix, max_length=max_length)
        frames = []
        for piece in pieces:
            frames += framer.feed(piece)
            assert framer.pending <= bound
        frames += framer.idle()
        for frame in frames:
            if frame == OVERSIZED:
                continue  # what an over-long frame became
            assert len(frame) <= max_length
            assert not any(byte in forbidden for byte in frame), frame
            if terminator == "crlf":
                assert b"\r\n" not in frame
        return frames

    edges = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    pieces = [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    assert frame_all(pieces) == frame_all([data])


@settings(max_examples=200, deadline=None)
@given(
    reads=st.lists(
        st.tuples(
            st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
            st.sampled_from([b"\r", b"\n", b"\r\n", b"\t", b"\t\r\n", b"\x03", b"\x02"]),
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_auto_framer_property_every_terminator_a_scanner_sends_ends_its_code(reads, cuts):
    """Codes each ended by any terminator `auto` knows (TAB and TAB+CRLF included), cut
    anywhere: each code comes out once, alone, in order. A code ended by STX (a lost end of
    frame) is the one that is thrown away."""
    data = b"".join(code.encode() + end for code, end in reads)
    expected = [code.encode() for code, end in reads if end != b"\x02"]
    edges = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    framer = SerialFramer()
    frames = [f for a, b in zip(edges, edges[1:], strict=False) for f in framer.feed(data[a:b])]
    assert frames == expected


# ---------------------------------------------------------------- host commands


def test_ssi_checksum_matches_zebra_documented_packets():
    # AIM_OFF as printed in the SSI chapter of Symbol/Zebra integration guides.
    assert ssi_checksum(bytes.fromhex("04 C4 04 00")) == bytes.fromhex("FF 34")
    # The RSM initialisation command and its reply from the Zebra DS457 reference guide.
    assert ssi_checksum(bytes.fromhex("0A 80 04 00 00 06 20 00 00 FF")) == bytes.fromhex("FE 4D")
    assert ssi_checksum(bytes.fromhex("08 80 00 00 00 04 06 00")) == bytes.fromhex("FF 6E")
    # The decoder's CMD_ACK.
    assert bytes.fromhex("04 D0 00 00 FF 2C") == SSI_ACK_REPLY


def test_ssi_beep_packet_has_length_opcode_source_status_code_and_checksum():
    packet = ssi_beep(0x00)
    assert packet == bytes.fromhex("05 E6 04 00 00 FF 11")
    assert (sum(packet[:-2]) + int.from_bytes(packet[-2:], "big")) & 0xFFFF == 0
    assert ssi_beep(0x10)[:5] == bytes.fromhex("05 E6 04 00 10")


@pytest.mark.parametrize(
    ("settings_", "good", "bad"),
    [
        ({"feedback": "none"}, b"", b""),
        ({"feedback": "honeywell"}, b"\x1b7,", b"\x1b8,"),
        ({"feedback": "zebra-ssi"}, ssi_beep(0x00), ssi_beep(0x10)),
        ({"feedback": "raw", "good_read": b"\x07", "bad_read": b"\x07\x07"}, b"\x07", b"\x07\x07"),
        ({"feedback": "raw", "good_read": "42", "bad_read": ""}, b"B", b""),
    ],
)
def test_feedback_presets_give_the_documented_bytes(settings_, good, bad):
    feedback = feedback_from(settings_)
    assert isinstance(feedback, Feedback)
    assert (feedback.command(True), feedback.command(False)) == (good, bad)


# ---------------------------------------------------------------- the driver on a pty


def test_codes_written_to_the_port_become_scans(pty):
    with running(pty.path) as scanner:
        pty.send(b"DEMO-")
        pty.send(b"0001")
        pty.send(b"\r\n")
        assert scanner.next_code() == b"DEMO-0001"
        pty.send(b"A1\rB2\nC3\r\nD4\x03")
        assert [scanner.next_code() for _ in range(4)] == [b"A1", b"B2", b"C3", b"D4"]
        assert scanner.state.scans == 5 and scanner.state.last_scan is not None
        assert scanner.scans.empty()


def test_a_scanners_aim_prefix_names_the_symbology_of_its_scan(pty):
    with running(pty.path) as scanner:
        pty.send(b"]Q1DEMO-0001\r]E05901234123457\rDEMO-0002\r")
        scans = [scanner.scans.get(timeout=WAIT) for _ in range(3)]
    # The code keeps its prefix (normalisation removes it); the symbology is for the ledger.
    assert [(s.symbology, s.code) for s in scans] == [
        ("]Q1", b"]Q1DEMO-0001"),
        ("]E0", b"]E05901234123457"),
        (None, b"DEMO-0002"),
    ]


@pytest.mark.parametrize("terminator", ["auto", "tab"])
def test_tab_suffixed_scanner_reads_each_code_without_waiting_for_a_cr(pty, terminator):
    with running(pty.path, terminator=terminator) as scanner:
        pty.send(b"DEMO-0001\t")
        assert scanner.next_code() == b"DEMO-0001"
        pty.send(b"DEMO-0002\tDEMO-0003\t")
        assert [scanner.next_code() for _ in range(2)] == [b"DEMO-0002", b"DEMO-0003"]
        assert scanner.scans.empty()


def test_stx_etx_framed_codes_with_prefix_and_suffix(pty):
    with running(pty.path, terminator="etx", prefix="S:", suffix="/E") as scanner:
        pty.send(b"\x02S:DEMO-0001/E\x03\x02S:DEMO-0002/E\x03")
        assert scanner.next_code() == b"DEMO-0001"
        assert scanner.next_code() == b"DEMO-0002"


def test_crlf_terminated_scanner(pty):
    with running(pty.path, terminator="crlf") as scanner:
        pty.send(b"DEMO-0001\r")
        pty.send(b"\nDEMO-0002\r\n")
        assert scanner.next_code() == b"DEMO-0001"
        assert scanner.next_code() == b"DEMO-0002"


def test_scanner_without_terminator_ends_a_read_on_the_idle_gap(pty):
    with running(pty.path, terminator="none", idle_gap=0.05) as scanner:
        pty.send(b"DEMO-0001")
        assert scanner.next_code() == b"DEMO-0001"
        pty.send(b"DEMO-0002")
        assert scanner.next_code() == b"DEMO-0002"


@pytest.mark.parametrize(("terminator", "end"), [("auto", b"\r"), ("etx", b"\x03")])
def test_a_partial_read_waiting_for_its_terminator_costs_no_cpu(pty, terminator, end):
    with running(pty.path, terminator=terminator) as scanner:
        driver = scanner.driver
        pty.send(b"DEMO-")
        wait_for(lambda: driver.received == b"DEMO-", "the partial read to arrive")
        reads = driver.reads
        # Twenty idle gaps: waiting out each input POLL takes about five rounds of the
        # loop; spinning on select(0) took hundreds of thousands.
        time.sleep(1.0)
        assert driver.reads - reads < 50, "the driver spins while a partial read waits"
        pty.send(b"0001" + end)
        assert scanner.next_code() == b"DEMO-0001"
        assert scanner.scans.empty()


def test_a_quiet_line_after_a_runaway_one_lets_the_next_code_through(pty):
    with running(pty.path) as scanner:
        # Exactly one byte too many: the framer drops the line at the end of a read and
        # holds nothing, but skips what follows until a terminator or a quiet line.
        pty.send(b"7" * (DEFAULT_MAX_LENGTH + 1))
        assert scanner.next_code() == OVERSIZED
        [framer] = scanner.driver.framers
        wait_for(lambda: framer.quiet_after_a_drop > 0, "the quiet line to be seen")
        pty.send(b"DEMO-0001\r")
        assert scanner.next_code() == b"DEMO-0001"


@pytest.mark.parametrize(
    ("settings_", "before", "speed", "two_stop_bits", "rtscts", "xonxoff"),
    [
        (
            {"baudrate": 115200, "stopbits": 2, "flow": "rtscts"},
            (termios.B9600, 0, termios.IXON | termios.IXOFF),
            termios.B115200,
            True,
            True,
            False,
        ),
        (
            {"flow": "xonxoff"},
            (termios.B115200, termios.CRTSCTS, 0),
            termios.B9600,
            False,
            False,
            True,
        ),
        (
            {},  # 9600, 1 stop bit, no flow control: the defaults are set, not assumed
            (termios.B115200, termios.CSTOPB | termios.CRTSCTS, termios.IXON | termios.IXOFF),
            termios.B9600,
            False,
            False,
            False,
        ),
    ],
    ids=[
        "115200-2-stop-bits-rtscts",
        "xonxoff",
        "defaults-9600-1-stop-bit-no-flow-control",
    ],
)
def test_baud_rate_stop_bits_and_flow_control_from_the_config_reach_the_port(
    pty, settings_, before, speed, two_stop_bits, rtscts, xonxoff
):
    pty.set_line(*before)
    with running(pty.path, **settings_) as scanner:
        iflag, _, cflag, _, ispeed, ospeed, _ = pty.line_settings()
        assert (ispeed, ospeed) == (speed, speed)
        assert bool(cflag & termios.CSTOPB) is two_stop_bits
        assert bool(cflag & termios.CRTSCTS) is rtscts
        assert bool(iflag & termios.IXON) is xonxoff
        assert bool(iflag & termios.IXOFF) is xonxoff
        # The line as configured still carries the scanner's codes.
        pty.send(b"DEMO-0001\r")
        assert scanner.next_code() == b"DEMO-0001"


# Linux ptys force 8 data bits and parity off (pty_set_termios clears CSIZE and PARENB
# and sets CS8) but keep PARODD and CMSPAR, which tell the parities apart; the data bits
# and "parity on" can only be checked on the pyserial port the driver opened.
@pytest.mark.parametrize(
    ("bytesize", "parity", "before", "parodd", "cmspar", "line"),
    [
        (7, "even", termios.PARODD | CMSPAR, False, False, "9600 7E1"),
        (8, "odd", CMSPAR, True, False, "9600 8O1"),
        (7, "mark", 0, True, True, "9600 7M1"),
        (8, "space", termios.PARODD, False, True, "9600 8S1"),
    ],
)
def test_bytesize_and_parity_from_the_config_reach_the_port(
    pty, bytesize, parity, before, parodd, cmspar, line
):
    pty.set_line(termios.B9600, before)
    with running(pty.path, bytesize=bytesize, parity=parity) as scanner:
        [port] = scanner.driver.opened
        assert (port.bytesize, port.parity) == (bytesize, parity[0].upper())
        cflag = pty.line_settings()[2]
        assert bool(cflag & termios.PARODD) is parodd
        assert bool(cflag & CMSPAR) is cmspar
        assert line in scanner.state.message


def test_garbage_arrives_as_a_malformed_scan_and_the_driver_keeps_reading(pty):
    with running(pty.path) as scanner:
        pty.send(b"\xff\xfe\x80garbage\x00\r")
        junk = scanner.next_code()
        assert junk == b"\xff\xfe\x80garbage\x00"
        with pytest.raises(MalformedCode):
            normalize(junk)
        pty.send(b"DEMO-0001\r")
        assert scanner.next_code() == b"DEMO-0001"


def test_megabyte_without_terminator_is_dropped_and_the_next_code_still_reads(pty):
    with running(pty.path) as scanner:
        pty.send(b"7" * (1 << 20))
        pty.send(b"\rDEMO-0001\r")
        assert scanner.next_code() == OVERSIZED  # one refusal the cashier sees
        assert scanner.next_code() == b"DEMO-0001"
        assert "over-long" in scanner.state.message
        assert scanner.state.state == "connected"


def test_unplugged_serial_scanner_reports_disconnected_and_resumes_on_replug(pty, tmp_path):
    # tmp_path stands in for /dev/serial/by-id: the link follows the device.
    by_id = tmp_path / "usb-Honeywell_1900_12345-if00"
    by_id.symlink_to(pty.path)
    with running(by_id) as scanner:
        assert pty.path in scanner.state.message
        pty.send(b"DEMO-0001\r")
        assert scanner.next_code() == b"DEMO-0001"

        replug = Pty()  # allocated first, so it cannot reuse the old pts number
        try:
            pty.unplug()
            wait_for(lambda: scanner.state.state == "disconnected", "disconnected state")
            assert str(by_id) in scanner.state.message
            assert "waiting for it" in scanner.state.message
            scanner.driver.feedback(True)  # nothing to write to: must not raise

            link = tmp_path / "link.tmp"
            link.symlink_to(replug.path)
            os.replace(link, by_id)
            wait_for(lambda: scanner.state.state == "connected", "reconnection")
            assert replug.path in scanner.state.message and replug.path != pty.path
            assert scanner.state.restarts == 1
            replug.send(b"DEMO-0002\r")
            assert scanner.next_code() == b"DEMO-0002"
            assert scanner.driver.runs == 1, "the Supervisor had to restart the driver"
        finally:
            replug.unplug()


def test_by_id_link_moving_to_another_device_is_followed(pty, tmp_path):
    by_id = tmp_path / "usb-Honeywell_1900_12345-if00"
    by_id.symlink_to(pty.path)
    with running(by_id) as scanner:
        other = Pty()
        try:
            # The old tty never hangs up: only the link says the scanner moved.
            link = tmp_path / "link.tmp"
            link.symlink_to(other.path)
            os.replace(link, by_id)
            wait_for(lambda: other.path in scanner.state.message, "the new device")
            assert scanner.state.state == "connected"
            other.send(b"DEMO-0001\r")
            assert scanner.next_code() == b"DEMO-0001"
            assert scanner.driver.runs == 1, "the Supervisor had to restart the driver"
        finally:
            other.unplug()


def test_missing_port_is_reported_and_picked_up_when_it_appears(tmp_path, pty):
    by_id = tmp_path / "usb-Zebra_DS2208-if00"
    with supervised(by_id) as scanner:
        wait_for(lambda: "is not there" in scanner.state.message, "the missing-port message")
        assert scanner.state.state == "disconnected"
        assert str(by_id) in scanner.state.message
        assert "redeemd devices" in scanner.state.message
        by_id.symlink_to(pty.path)
        wait_for(lambda: scanner.state.state == "connected", "the port to be found")
        pty.send(b"DEMO-0001\r")
        assert scanner.next_code() == b"DEMO-0001"
        assert scanner.driver.runs == 1, "the Supervisor had to restart the driver"


def test_stopping_while_waiting_for_a_missing_port_ends_the_driver(tmp_path):
    with supervised(tmp_path / "usb-Zebra_DS2208-if00") as scanner:
        wait_for(lambda: scanner.state.state == "disconnected", "the wait for the port")
        # supervised() asserts on leaving that stop() ended the thread.
    assert scanner.driver.runs == 1


@contextmanager
def held_by_another_scanner_of_this_redeemd(pty: Pty) -> Iterator[str]:
    with running(pty.path) as first:
        yield "already open in this redeemd"
        pty.send(b"DEMO-0001\r")  # the first one is unaffected
        assert first.next_code() == b"DEMO-0001"


@contextmanager
def held_by_another_process(pty: Pty) -> Iterator[str]:
    # Another redeemd, or minicom: something that opened the port with a lock.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import serial, sys; port = serial.Serial(sys.argv[1], exclusive=True); "
         "print('locked', flush=True); sys.stdin.read()",
         pty.path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"locked\n"
        yield f"in use by another process (pid {holder.pid} "
        assert holder.poll() is None  # the holder is unaffected
    finally:
        holder.stdin.close()  # it exits at end of input
        holder.wait(timeout=WAIT)
        holder.stdout.close()


@pytest.mark.parametrize("held", [held_by_another_scanner_of_this_redeemd, held_by_another_process])
def test_scanner_on_a_busy_port_gets_a_clear_error(pty, held):
    with held(pty) as holder:
        second = SerialScanner("other", {"port": pty.path})
        with pytest.raises(DriverError) as refused:
            second.run(lambda scan: None, threading.Event(), DriverState("other", "serial"))
        message = str(refused.value)
        assert not isinstance(refused.value, DeviceGone)  # state "error": a technician's job
        assert pty.path in message and holder in message
        assert "another port" in message


@pytest.mark.parametrize("where", ["/dev/null", "plain-file"])
def test_path_that_is_not_a_serial_port_is_a_clear_error(tmp_path, where):
    port = Path(where) if where.startswith("/") else tmp_path / where
    if not port.exists():
        port.write_text("")
    driver = SerialScanner("counter", {"port": str(port)})
    with pytest.raises(DriverError) as refused:
        driver.run(lambda scan: None, threading.Event(), DriverState("counter", "serial"))
    message = str(refused.value)
    assert not isinstance(refused.value, DeviceGone)
    assert message.startswith(f"{port} is not a serial port (")
    assert "check `port` in the [[scanner]] table" in message
    assert "`redeemd devices` lists serial ports" in message


@pytest.mark.parametrize(
    ("settings_", "good", "bad"),
    [
        ({"feedback": "raw", "good_read": b"\x06", "bad_read": b"\x15"}, b"\x06", b"\x15"),
        ({"feedback": "honeywell"}, b"\x1b7,", b"\x1b8,"),
        ({"feedback": "zebra-ssi"}, ssi_beep(0x00), ssi_beep(0x10)),
    ],
)
def test_feedback_bytes_reach_the_scanner(pty, settings_, good, bad):
    with running(pty.path, **settings_) as scanner:
        scanner.driver.feedback(True)
        assert pty.read_until(good) == good
        scanner.driver.feedback(False)
        assert pty.read_until(good + bad) == good + bad


def test_zebra_ack_after_a_beep_does_not_spoil_the_next_code(pty):
    with running(pty.path, feedback="zebra-ssi") as scanner:
        scanner.driver.feedback(True)
        pty.read_until(ssi_beep(0x00))
        pty.send(SSI_ACK_REPLY + b"DEMO-0001\r")
        assert scanner.next_code() == b"DEMO-0001"


# ---------------------------------------------------------------- the real daemon


def test_redeemd_run_reads_a_serial_scanner_and_beeps_good_and_bad(loaded_box, keyset, pty):
    by_id = loaded_box.dir / "usb-Datalogic_QD2430-if00"
    by_id.symlink_to(pty.path)
    write_box(
        loaded_box.dir,
        keyset,
        extra=f"""
[[scanner]]
type = "serial"
name = "counter"
port = "{by_id}"
baudrate = 115200
feedback = "raw"
good_read = "06 07"
bad_read = "15"
""",
        debounce="1h",
    )
    stderr = (loaded_box.dir / "stderr.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "-c", str(loaded_box.config_path), "run", "--json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    lines: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in daemon.stdout], daemon=True)
    reader.start()
    status_path = loaded_box.dir / "status.json"

    def serial_state() -> str | None:
        try:
            drivers = json.loads(status_path.read_text())["drivers"]
        except (OSError, ValueError, KeyError):
            return None
        return drivers[0]["state"] if drivers else None

    try:
        wait_for(lambda: serial_state() == "connected" or daemon.poll() is not None,
                 "the daemon to open the serial scanner", timeout=60)  # fmt: skip
        assert daemon.poll() is None, (loaded_box.dir / "stderr.log").read_text()

        pty.send(b"DEMO-0001\r\n")
        verdict = json.loads(lines.get(timeout=60))
        assert verdict["verdict"] == "accepted" and verdict["source"] == "counter"
        assert pty.read_until(b"\x06\x07") == b"\x06\x07"

        pty.send(b"\xff\xfe\x00\r")
        verdict = json.loads(lines.get(timeout=60))
        assert (verdict["verdict"], verdict["reason"]) == ("rejected", "malformed")
        assert pty.read_until(b"\x06\x07\x15") == b"\x06\x07\x15"

        # A double read inside the debounce window is one scan, but a scanner in
        # host-ACK mode waits for an answer to each read: both get the good-read bytes.
        pty.send(b"DEMO-0002\r\nDEMO-0002\r\n")
        verdict = json.loads(lines.get(timeout=60))
        assert verdict["verdict"] == "accepted"
        assert pty.read_until(b"\x06\x07\x06\x07").endswith(b"\x06\x07\x06\x07")

        # A repeat is answered as its own first read was, not as the read just before it
        # (an unknown code here); a wallet payment code passed on to the POS is a good read.
        pty.send(b"NOPE-1234\r\n")
        verdict = json.loads(lines.get(timeout=60))
        assert (verdict["verdict"], verdict["reason"]) == ("rejected", "unknown_code")
        pty.send(b"DEMO-0002\r\n")
        pty.send(b"281234567890123456\r\n")
        assert json.loads(lines.get(timeout=60))["event"] == "payment"
        sent = b"\x06\x07\x15" + b"\x06\x07" * 2 + b"\x15" + b"\x06\x07" * 2
        assert pty.read_until(sent) == sent
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, (loaded_box.dir / "stderr.log").read_text()
        stderr.close()

    status = json.loads(loaded_box.cli("status", "--json").stdout)
    [driver] = status["drivers"]
    assert (driver["name"], driver["kind"], driver["scans"]) == ("counter", "serial", 7)
    assert lines.empty(), "the debounced repeat must not produce a second verdict"
