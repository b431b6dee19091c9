"""The stdin/FIFO line framer (drivers.framing): over-long lines are discarded whole and
reported as one `malformed` read, at the framer and through the real `redeemd run`."""

from __future__ import annotations

import pytest
from conftest import read_json_lines

from cards.normalize import OVERSIZED, MalformedCode, normalize
from drivers.framing import LineFramer

JUNK = b"x" * 65536


def test_lines_split_across_feeds_are_joined():
    framer = LineFramer()
    assert framer.feed(b"DEMO-00") == []
    assert framer.feed(b"01\r\nDEMO-0002\n\x02DEMO-0003\x03") == [
        b"DEMO-0001",
        b"DEMO-0002",
        b"DEMO-0003",
    ]


def test_over_long_line_in_one_feed_is_one_oversized_frame():
    framer = LineFramer(max_length=16)
    assert framer.feed(b"y" * 40 + b"DEMO-0001\nDEMO-0002\n") == [OVERSIZED, b"DEMO-0002"]
    assert framer.overflowed == 1


def test_tail_of_an_over_long_line_split_across_feeds_is_never_a_code():
    framer = LineFramer(max_length=16)
    assert framer.feed(b"y" * 40) == [OVERSIZED]
    assert framer.feed(b"y" * 40) == []  # still the same line: reported once
    assert framer.feed(b"DEMO-0001") == []
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\nDEMO-0002\n") == [b"DEMO-0002"]
    assert framer.overflowed == 1
    assert len(framer.buffer) == 0


def test_each_over_long_line_is_reported_once():
    framer = LineFramer(max_length=16)
    frames = framer.feed(b"y" * 20 + b"\n" + b"z" * 20 + b"\nDEMO-0001\n")
    assert frames == [OVERSIZED, OVERSIZED, b"DEMO-0001"]


def test_line_of_exactly_the_limit_is_a_frame():
    framer = LineFramer(max_length=16)
    assert framer.feed(b"A" * 16) == []  # the buffer may hold a whole line
    assert framer.feed(b"\n") == [b"A" * 16]


def test_framer_memory_stays_bounded_while_a_line_never_ends():
    framer = LineFramer(max_length=4096)
    for _ in range(50):
        framer.feed(JUNK)
    assert len(framer.buffer) <= framer.max_length


@pytest.mark.parametrize("max_length", [1, 512, 100_000])
def test_oversized_frame_is_malformed_whatever_the_code_length_limit(max_length):
    with pytest.raises(MalformedCode, match="longer than the scanner line limit"):
        normalize(OVERSIZED, max_length)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (JUNK + b"DEMO-0001\n", [("rejected", "malformed")]),
        (JUNK + b"\r\nDEMO-0002\n", [("rejected", "malformed"), ("accepted", None)]),
    ],
    ids=["tail-is-a-code", "code-after-the-long-line"],
)
def test_over_long_stdin_line_is_rejected_malformed_and_its_tail_is_not_scanned(
    loaded_box, stream, expected
):
    result = loaded_box.cli("run", "--json", input=stream)
    assert result.returncode == 0, result.stderr.decode()
    verdicts = read_json_lines(result.stdout)
    assert [(v["verdict"], v.get("reason")) for v in verdicts] == expected
    assert "scanner line limit" in verdicts[0]["detail"]
