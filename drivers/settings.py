"""What each `[[scanner]]` type takes: its keys, their types and defaults, written once.

daemon/config.py checks a `[[scanner]]` block against the class of its `type` and hands
the driver the validated object; a driver built by hand (tests, benches, a REPL) passes a
plain mapping through `Settings.of`, which checks it against the same class. So a
default such as the HID `gap` lives here and nowhere else.

The value types below (durations, positive integers, hex bytes ...) are shared with the
box's other sections (daemon/config_model.py). Each one's validator raises ValueError
with what is allowed, in the words daemon/config.py puts after "must be": the reader is a
technician at a counter, so '"2 fortnights": must be a duration such as 2, "2s" ...',
not a pydantic error code. They are plain validators: nothing is coerced behind the
technician's back (true is not 1, "512" is not a number).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationInfo

from drivers.feedback import PRESETS
from drivers.serial_framing import TERMINATORS
from drivers.zxing_decoder import SYMBOLOGIES, check_symbologies


def check_string(value: object) -> str:
    """A non-empty string (for validators that build on it, in daemon/config_model.py)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty string")
    return value


def _path_text(value: object) -> str:
    # A path given from Python (tests, benches) may be a Path; the file gives a string.
    return check_string(os.fspath(value) if isinstance(value, os.PathLike) else value)


def _identifier(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("1-64 characters from A-Z a-z 0-9 _ . - (it appears in MQTT topics)")
    return value


def check_duration(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", value)
        if match:
            scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
            return float(match.group(1)) * scale
    raise ValueError('a duration such as 2, "2s", "100ms", "15m", "12h" or "7d"')


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a positive integer")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _hex_bytes(value: object) -> bytes:
    if isinstance(value, bytes):  # from Python (tests, benches): already bytes
        return value
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise ValueError('hex bytes such as "16 07 0d" ("" for none)')


def check_string_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return tuple(value)


def _number_choice(*allowed: int | float) -> PlainValidator:
    def check(value: object) -> int | float:
        if isinstance(value, bool) or value not in allowed:
            raise ValueError("one of " + ", ".join(str(a) for a in allowed))
        return value  # type: ignore[return-value]

    return PlainValidator(check)


PathText = Annotated[str, PlainValidator(_path_text)]
"""A device or file path, as a non-empty string."""
Identifier = Annotated[str, PlainValidator(_identifier)]
"""A name that appears in MQTT topics and ledger records."""
Duration = Annotated[float, PlainValidator(check_duration)]
"""Seconds, written as a number or with a unit: 2, "2s", "100ms", "15m", "12h", "7d"."""
PositiveInt = Annotated[int, PlainValidator(_positive_int)]
Boolean = Annotated[bool, PlainValidator(_boolean)]
Text = Annotated[str, PlainValidator(_text)]
"""Any string, "" included."""
HexBytes = Annotated[bytes, PlainValidator(_hex_bytes)]


class Settings(BaseModel):
    """Typed, immutable settings; unknown keys are refused (a typo is not a default)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @classmethod
    def of(cls, settings: Settings | Mapping[str, object]) -> Self:
        """These settings, or a mapping checked against this class (defaults filled in)."""
        if isinstance(settings, cls):
            return settings
        return cls.model_validate(dict(settings))

    @classmethod
    def default(cls, key: str) -> Any:
        """The default of `key` as a driver gets it ("100ms" -> 0.1), for code that takes
        one setting as a parameter (drivers/keymap.py's KeyDecoder)."""
        field = cls.model_fields[key]
        return TypeAdapter(Annotated[field.annotation, *field.metadata]).validate_python(
            field.default
        )


class StdinSettings(Settings):
    path: PathText = "-"
    """"-" is standard input; a path is a FIFO or file read line by line."""


# The allowed values come from the module that gives them meaning.
Terminator = Literal[tuple(TERMINATORS)]  # type: ignore[valid-type]
FeedbackPreset = Literal[PRESETS]  # type: ignore[valid-type]


class SerialSettings(Settings):
    port: PathText
    baudrate: PositiveInt = 9600
    bytesize: Annotated[int, _number_choice(5, 6, 7, 8)] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: Annotated[int | float, _number_choice(1, 1.5, 2)] = 1
    flow: Literal["none", "rtscts", "xonxoff"] = "none"
    terminator: Terminator = "auto"
    idle_gap: Duration = Field("50ms")
    """With terminator = "none": the silence that ends a read."""
    prefix: Text = ""
    suffix: Text = ""
    feedback: FeedbackPreset = "none"
    good_read: HexBytes = Field("")
    bad_read: HexBytes = Field("")


Layout = Literal["us", "uk", "de", "fr"]
"""The keyboard countries a HID scanner may be set to (drivers/keymap.py maps them)."""


class HidSettings(Settings):
    device: PathText
    layout: Layout = "us"
    grab: Boolean = True
    gap: Duration = Field("100ms")
    """A pause longer than this between keys ends a read."""
    min_length: PositiveInt = 3


def _symbologies(value: object) -> tuple[str, ...]:
    try:
        return check_symbologies(check_string_list(value))
    except ValueError:
        raise ValueError("a list of symbologies from " + ", ".join(SYMBOLOGIES)) from None


Symbologies = Annotated[tuple[str, ...], PlainValidator(_symbologies)]
"""Names from drivers/zxing_decoder.py's SYMBOLOGIES: "qr", "ean-13", "code128" ..."""


class CameraSettings(Settings):
    device: PathText
    width: PositiveInt = 640
    height: PositiveInt = 480
    fps: PositiveInt = 10
    ffmpeg: PathText = "ffmpeg"
    rescan_after: Duration = Field("2s")
    no_frame_timeout: Duration = Field("15s")
    """A camera that delivers no frame for this long has hung (a UVC camera can stop
    streaming after a USB glitch without its device node going away): restart it.
    Generous because some cameras take several seconds to start streaming."""
    min_sightings_1d: PositiveInt = 2
    input_format: Text = ""
    """ffmpeg's -input_format for V4L2 ("mjpeg", "yuyv422"); "" lets ffmpeg choose."""
    decoder: Literal["zxing", "zbar"] = "zxing"
    """zxing-cpp reads every symbology the camera claims and more of the corpus's photos;
    zbar (the brief's decoder) reads QR, EAN/UPC, Code 128, Code 39 and ITF."""
    symbologies: Symbologies = Field(list(SYMBOLOGIES))
    """What the camera reads; a symbology left out is not read (docs/scanners.md)."""


ScannerSettings = StdinSettings | SerialSettings | HidSettings | CameraSettings

# `type = "..."` of a [[scanner]] block -> what it takes. docs/scanners.md explains them.
SCANNER_SETTINGS: dict[str, type[Settings]] = {
    "stdin": StdinSettings,
    "serial": SerialSettings,
    "hid": HidSettings,
    "camera": CameraSettings,
}


def _printer_device(value: object, info: ValidationInfo) -> str:
    # What `device` names depends on `kind` (declared first, so validated first); a kind
    # that is itself wrong is reported on its own key, and the device is only checked
    # to be a string.
    kind = info.data.get("kind")
    if kind == "network":
        if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]+(:\d{1,5})?", value):
            host, _, port = value.partition(":")
            if not port or 1 <= int(port) <= 65535:
                return value
        raise ValueError(
            'a host name or IPv4 address with an optional port, such as "192.168.1.50" '
            'or "printer.local:9100" (kind = "network")'
        )
    if kind in ("serial", "usb"):
        path = _path_text(value)
        if not path.startswith("/"):
            example = "/dev/usb/lp0" if kind == "usb" else "/dev/serial/by-id/usb-..."
            raise ValueError(f'an absolute device path such as "{example}" (kind = "{kind}")')
        return path
    return check_string(value)


def _qr_module_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise ValueError("a whole number of printer dots from 1 to 16")
    return value


class PrinterSettings(Settings):
    """The receipt printer (drivers/printer.py) that prints claim codes as QR codes."""

    kind: Literal["serial", "usb", "network"]
    """How the printer is attached: "serial" (RS-232 or a USB virtual COM port),
    "usb" (a USB printer-class device, /dev/usb/lp0) or "network" (raw TCP, port 9100)."""
    device: Annotated[str, PlainValidator(_printer_device)]
    """The serial port or usblp device path (by-id links are followed at every open),
    or "host" / "host:port" for a network printer (port 9100 when left out)."""
    baudrate: PositiveInt = 9600
    """Serial only; the printer's self-test slip shows the rate it is set to."""
    flow: Literal["none", "rtscts", "dsrdtr", "xonxoff"] = "none"
    """Serial only: the flow control the printer is set to (many use DTR/DSR)."""
    timeout: Duration = Field("2s")
    """How long to wait for the connection, for a receipt to be taken and for each
    answer to a status query."""
    status_query: Boolean = True
    """Ask the printer its state (ESC/POS DLE EOT) before and after each receipt (serial,
    network). false for a printer or cable that cannot answer: then a printer that is
    off or out of paper is not noticed on serial."""
    qr_module_size: Annotated[int, PlainValidator(_qr_module_size)] = 6
    """Dots per QR module: 6 fits a claim URL on 80 mm paper, 5 on 58 mm."""
    columns: PositiveInt = 48
    """Characters per line: 48 for 80 mm paper, 32 for 58 mm (font A)."""
    header: Annotated[tuple[str, ...], PlainValidator(check_string_list)] = Field([])
    """Lines printed above the title (the shop's name)."""
    footer: Annotated[tuple[str, ...], PlainValidator(check_string_list)] = Field([])
    """Lines printed at the end of the receipt."""
    cut: Boolean = True
    """Cut the paper after each receipt (a printer without a cutter ignores it)."""

    @property
    def address(self) -> tuple[str, int]:
        """A network printer's (host, port)."""
        host, _, port = self.device.partition(":")
        return host, int(port or 9100)
