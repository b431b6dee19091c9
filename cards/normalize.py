"""Turn what a scanner sent into the canonical text of a code, or refuse it.

Scanners differ in what they wrap around the data: an AIM symbology identifier
(`]Q1`, `]C1`, `]E0` ...), an ECI designator (`\\000026`) when they are configured to
transmit one, CR/LF/Tab terminators, STX/ETX framing. The same code read by two
scanners must give the same digest, so all of that is removed here, once, for every
driver. GS1 element strings keep their group separators (0x1D), because they delimit
variable-length fields; they are parsed with biip and rebuilt canonically so that a
trailing or superfluous separator does not change the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import biip
from biip.gs1_messages import GS1Message
from biip.symbology import SymbologyIdentifier

GS = "\x1d"
DEFAULT_MAX_LENGTH = 512

# Bytes that scanners put around a code: whitespace, terminators, STX/ETX/EOT framing.
_FRAMING = b" \t\r\n\x00\x02\x03\x04"

# Symbology identifier modifiers that announce the ECI protocol (ISO/IEC 15424): the
# data then carries `\nnnnnn` escapes and a literal backslash is doubled.
_ECI_MODIFIERS = {"Q": "246", "d": "456", "z": "345"}
_ECI_ESCAPE = re.compile(rb"\\(\d{6})")
_ECI_CODECS = {3: "latin-1", 4: "iso8859-2", 20: "shift_jis", 26: "utf-8", 29: "gb18030"}

# Printable text plus GS; everything else below 0x20, DEL and the C1 block are refused.
_CONTROL = re.compile(r"[\x00-\x1c\x1e\x1f\x7f-\x9f]")

# Most reads are plain printable ASCII: no AIM identifier (`]`), no ECI escape (`\`)
# in front, no GS, no framing or space at either end. For them every step of
# normalize_full is the identity, so the text is the bytes decoded, and the scan path
# skips the rest. Tested with bytes methods, not a regex: the scan path runs it cold
# (after an fsync), where the regex engine costs more than the check.
_PRINTABLE = bytes(range(0x20, 0x7F))
_NOT_FIRST = b" \\]"


# What a line framer hands on in place of a line longer than its limit: the line itself
# is discarded (its tail must never become a code), but the cashier still sees that a
# read was refused. CAN ("cancel") is a control character, so even a scanner that sent
# these bytes itself gets `malformed`.
OVERSIZED = b"\x18oversized"


class MalformedCode(ValueError):
    """The bytes are not a code: the verdict is `rejected: malformed`."""


@dataclass(frozen=True)
class Normalized:
    text: str
    symbology: str | None = None
    gs1: tuple[tuple[str, str], ...] = ()


def normalize(raw: bytes, max_length: int = DEFAULT_MAX_LENGTH) -> Normalized:
    """Canonical text of a scanned code.

    >>> normalize(b"]Q1HELLO-42\\r\\n").text
    'HELLO-42'

    Raises MalformedCode for empty, over-long, undecodable or control-laden input, and
    for OVERSIZED (a line its driver discarded as too long).
    """
    if _is_plain(raw, max_length):
        return Normalized(raw.decode("ascii"))
    return normalize_full(raw, max_length)


def normalize_text(raw: bytes, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """`normalize(raw, max_length).text`, without building a Normalized for a plain code:
    the engine's scan path needs only the text.

    >>> normalize_text(b"HELLO-42")
    'HELLO-42'
    """
    if _is_plain(raw, max_length):
        return raw.decode("ascii")
    return normalize_full(raw, max_length).text


def aim_identifier(raw: bytes) -> str | None:
    """The AIM symbology identifier a scanner put before the data, if any: what the
    ledger records as the symbology of a serial or keyboard-wedge read.

    >>> aim_identifier(b"]Q1HELLO-42\\r\\n"), aim_identifier(b"HELLO-42")
    (']Q1', None)
    """
    return _aim_prefix(raw.lstrip(_FRAMING))


def _aim_prefix(data: bytes) -> str | None:
    if not data.startswith(b"]") or len(data) < 3:
        return None
    # ValueError also covers UnicodeDecodeError and biip's int() on the modifier count
    # of `]Y` (system expansion): `]Yx...` is data, not an identifier.
    try:
        return SymbologyIdentifier.extract(data[:3].decode("ascii")).value
    except (biip.ParseError, ValueError):
        return None


def _is_plain(raw: bytes, max_length: int) -> bool:
    return (
        0 < len(raw) <= max_length
        and raw[0] not in _NOT_FIRST
        and raw[-1] != 0x20
        and not raw.translate(None, _PRINTABLE)
    )


def normalize_full(raw: bytes, max_length: int = DEFAULT_MAX_LENGTH) -> Normalized:
    """`normalize` without its shortcut for plain ASCII codes: every step, for every
    input. The tests prove that the shortcut gives exactly what this gives."""
    if raw == OVERSIZED:
        raise MalformedCode("the read was longer than the scanner line limit and was discarded")
    if len(raw) > max_length * 4 + 64:
        raise MalformedCode(f"{len(raw)} bytes is longer than any code (limit {max_length})")
    data = raw.strip(_FRAMING)
    if not data:
        raise MalformedCode("empty read")

    symbology = _aim_prefix(data)
    if symbology is not None:
        data = data[3:]

    codec = "utf-8"
    if symbology and symbology[2] in _ECI_MODIFIERS.get(symbology[1], ""):
        data, codec = _strip_eci(data, escapes_doubled=True)
    elif _ECI_ESCAPE.match(data):
        data, codec = _strip_eci(data, escapes_doubled=False)

    try:
        text = data.decode(codec)
    except (UnicodeDecodeError, LookupError) as exc:
        # LookupError: an ECI naming a codec this Python does not have (no `reason`).
        why = exc.reason if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise MalformedCode(f"not valid {codec} text: {why}") from None
    text = text.strip()
    if not text:
        raise MalformedCode("empty code")
    if len(text) > max_length:
        raise MalformedCode(f"{len(text)} characters is longer than the limit of {max_length}")
    bad = _CONTROL.search(text)
    if bad:
        raise MalformedCode(f"control character 0x{ord(bad.group()):02x} at position {bad.start()}")

    gs1: tuple[tuple[str, str], ...] = ()
    is_gs1 = GS in text or (symbology is not None and _is_gs1_symbology(symbology))
    if is_gs1:
        text, gs1 = _canonical_gs1(text)
    return Normalized(text=text, symbology=symbology, gs1=gs1)


def _strip_eci(data: bytes, *, escapes_doubled: bool) -> tuple[bytes, str]:
    codec = "utf-8"
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i : i + 1] == b"\\":
            match = _ECI_ESCAPE.match(data, i)
            if match:
                codec = _ECI_CODECS.get(int(match.group(1)), "utf-8")
                i = match.end()
                continue
            if escapes_doubled and data[i + 1 : i + 2] == b"\\":
                out += b"\\"
                i += 2
                continue
        out.append(data[i])
        i += 1
    return bytes(out), codec


def _is_gs1_symbology(symbology: str) -> bool:
    try:
        return SymbologyIdentifier.extract(symbology).gs1_symbology is not None
    except biip.ParseError:
        return False


def _canonical_gs1(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Rebuild a GS1 element string with separators exactly where they are required."""
    try:
        # GS1Message.parse, not biip.parse: the latter would take a leading `]C1` in
        # the data for a second symbology identifier and drop it, even to empty text.
        message = GS1Message.parse(text)
    except biip.ParseError:
        message = None
    if message is None:
        return text.rstrip(GS), ()
    elements = tuple((e.ai.ai, e.value) for e in message.element_strings)
    parts = []
    for index, e in enumerate(message.element_strings):
        parts.append(e.ai.ai + e.value)
        if e.ai.separator_required and index < len(message.element_strings) - 1:
            parts.append(GS)
    return "".join(parts), elements
