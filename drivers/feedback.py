"""Good-read / bad-read host commands: the bytes a serial scanner is sent after a verdict.

Many scanners beep or flash when the host sends them a command, so the cashier hears
"accepted" or "rejected" at the scanner instead of looking at a screen. What to send
depends on the scanner family; the `feedback` config key picks a preset:

``none``
    Send nothing (the default: an unknown command can confuse a scanner).

``honeywell``
    Honeywell Host ACK escape commands, documented in the Xenon/Granit, 1900/1902 and
    2020 user guides ("Host ACK Responses"): ``ESC 7 ,`` "beeps to indicate a successful
    decode and communication to host", ``ESC 8 ,`` "razz or error tone". The trailing
    comma terminates an escape command and is required. The scanner acts on them only
    with **Host ACK On** (a programming bar code / menu setting), and then it waits for
    one after every read (about 10 s, then an error tone). We found no Honeywell document
    for a ``SYN BEL CR`` beep command: the ``SYN x CR`` prefixes are for menu (``SYN M
    CR``) and trigger (``SYN T CR`` / ``SYN U CR``) commands. For scanners set to "beep on
    BEL", use ``feedback = "raw"`` with ``good_read = "07"``.

``zebra-ssi``
    A Zebra (Symbol) Simple Serial Interface BEEP packet: length, opcode 0xE6, message
    source 0x04 (host), status 0x00, beep code, then a 2-byte checksum (high byte first)
    that is the two's complement of the 16-bit sum of the bytes before it. Good read is
    beep code 0x00 (one short high beep, the usual decode beep); bad read is 0x10 (two
    long low beeps, unmistakably not a good read). See `ssi_packet`.

``raw``
    Whatever `good_read` / `bad_read` hold (hex in the config, e.g. ``"07"``), for any
    scanner with documented host commands (Datalogic RS-232 host commands: ``42`` "B",
    beep good read tone; Newland, Opticon ... per their manuals).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ESC = b"\x1b"

SSI_BEEP = 0xE6
SSI_CMD_ACK = 0xD0
SSI_CMD_NAK = 0xD1
SSI_SOURCE_HOST = 0x04
SSI_SOURCE_DECODER = 0x00

# SSI beep codes used by the preset (from the SSI beep table: 0x00-0x04 are 1-5 short
# high beeps, 0x05-0x09 short low, 0x0A-0x0E long high, 0x0F-0x13 long low).
SSI_BEEP_ONE_SHORT_HIGH = 0x00
SSI_BEEP_TWO_LONG_LOW = 0x10

PRESETS = ("none", "honeywell", "zebra-ssi", "raw")


def ssi_checksum(data: bytes) -> bytes:
    """The SSI checksum of a packet's bytes: two's complement of their 16-bit sum, high
    byte first.

    >>> ssi_checksum(bytes.fromhex("04 C4 04 00")).hex()  # AIM_OFF from the SSI guide
    'ff34'
    """
    return ((-sum(data)) & 0xFFFF).to_bytes(2, "big")


def ssi_packet(opcode: int, data: bytes = b"", source: int = SSI_SOURCE_HOST) -> bytes:
    """A complete SSI packet from the host: length, opcode, source, status 0, data, checksum.

    >>> ssi_packet(SSI_BEEP, bytes([0x00])).hex(" ")
    '05 e6 04 00 00 ff 11'
    """
    body = bytes([4 + len(data), opcode, source, 0x00]) + data
    if body[0] > 0xFF:
        raise ValueError(f"SSI packet of {len(body)} bytes: the length field holds at most 255")
    return body + ssi_checksum(body)


def ssi_beep(code: int) -> bytes:
    """The SSI BEEP command for one beep code (0x00-0x1A)."""
    return ssi_packet(SSI_BEEP, bytes([code]))


# What a decoder answers to every host command when ACKs are on: a CMD_ACK packet. It is
# not a code, so the serial driver strips it from the start of the next frame.
SSI_ACK_REPLY = ssi_packet(SSI_CMD_ACK, source=SSI_SOURCE_DECODER)


@dataclass(frozen=True)
class Feedback:
    """The bytes to send for each verdict; empty means send nothing."""

    preset: str
    good: bytes = b""
    bad: bytes = b""
    replies: tuple[bytes, ...] = ()
    """Replies the scanner may send back to these commands, to be ignored on input."""

    def command(self, accepted: bool) -> bytes:
        return self.good if accepted else self.bad


def feedback_from(settings: Mapping[str, object]) -> Feedback:
    """The Feedback for a serial scanner's settings (`feedback`, and for "raw" `good_read`
    and `bad_read`). Their defaults are SerialSettings' (drivers/settings.py), not this
    function's.

    >>> feedback_from({"feedback": "honeywell"}).command(True)
    b'\\x1b7,'
    """
    preset = str(settings["feedback"])
    if preset == "none":
        return Feedback("none")
    if preset == "honeywell":
        return Feedback(preset, good=ESC + b"7,", bad=ESC + b"8,")
    if preset == "zebra-ssi":
        return Feedback(
            preset,
            good=ssi_beep(SSI_BEEP_ONE_SHORT_HIGH),
            bad=ssi_beep(SSI_BEEP_TWO_LONG_LOW),
            replies=(SSI_ACK_REPLY,),
        )
    if preset == "raw":
        good, bad = settings["good_read"], settings["bad_read"]
        return Feedback(preset, good=_as_bytes(good), bad=_as_bytes(bad))
    raise ValueError(f"feedback {preset!r}: must be one of {', '.join(PRESETS)}")


def _as_bytes(value: object) -> bytes:
    # The config layer hands over bytes; a string here is hex written by hand (tests, REPL).
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return bytes.fromhex(value)
    raise TypeError(f"expected hex bytes, got {value!r}")
