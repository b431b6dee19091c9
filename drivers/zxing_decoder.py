"""The camera's default decoder: zxing-cpp, reading what a hardware scanner would send.

One job: turn a grey frame (a 2-D uint8 numpy array, handed to zxing-cpp without a copy)
into reads, each the bytes a hardware scanner in its default setup sends for that symbol
and the AIM symbology identifier (ISO/IEC 15424) it would put before them::

    >>> import numpy as np, zxingcpp
    >>> symbol = zxingcpp.create_barcode("DEMO-0001", zxingcpp.BarcodeFormat.QRCode)
    >>> frame = np.asarray(zxingcpp.write_barcode_to_image(symbol, scale=4))
    >>> ZxingDecoder().decode(frame)
    {(']Q1', b'DEMO-0001')}

Why zxing-cpp over zbar (bench/camera_corpus.py measures it): it reads Aztec, PDF417,
DataMatrix and Micro QR, which zbar cannot (wallet passes and tickets use them), and more
of the real photos in the corpus, in about the same time.

What a read becomes (docs/scanners.md, "What the camera sends", has the table):

- The text in zxing-cpp's `TextMode.Plain`: ECI designators and the symbology's character
  set applied (Latin-1 in Code 128, Shift-JIS in QR, where 0x5C stays a backslash), as
  UTF-8; a symbol that holds binary data (no text) gives its bytes unchanged.
- Code 39 Full ASCII applied (`12+A+B` is `12ab`, identifier `]A4`); a Code 39 whose text
  is not valid Full ASCII is read as plain Code 39 (`]A0`).
- UPC-A and UPC-E as the 13-digit EAN-13 they stand for (`036000291452` is
  `0036000291452`, UPC-E `01234565` is `0012345000065`), identifier `]E0`, as the box
  records every UPC/EAN-13 whichever scanner read it (see `ean13_form`).
- GS1 symbols (GS1-128, GS1 QR, GS1 DataMatrix ...) as their element string with FNC1
  as 0x1D between variable-length fields and no leading FNC1; the identifier says GS1
  (`]C1`, `]Q3`, `]d2`, `]z1`).
- The identifier is the one zxing-cpp reports for the symbol, the one an AIM-enabled
  hardware scanner sends (modifiers included: `]I1` for an ITF-14 with its check digit).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from drivers.supervisor import DriverError

if TYPE_CHECKING:
    # Only for types: drivers/settings.py imports SYMBOLOGIES, and the config check must
    # work on a box installed without the drivers extra (numpy, zxing-cpp).
    import numpy as np
    import zxingcpp

INSTALL_ZXING = "install zxing-cpp (pip install 'redeemd[drivers]')"

# Config name -> zxing-cpp's format names (BarcodeFormat members) it switches on. Names,
# not the enum, so that this table (and the config check that uses it) needs no zxing-cpp.
# Code 39 leaves out Code 32 and PZN, pharmacy codes read from the same bars whose text
# zxing-cpp rewrites: a hardware scanner sends the bars' own text. QR leaves out rMQR.
# Aztec includes runes (ISO/IEC 24778 annex: a number 0-255, read as three digits).
SYMBOLOGIES: dict[str, tuple[str, ...]] = {
    "qr": ("QRCodeModel1", "QRCodeModel2"),
    "micro-qr": ("MicroQRCode",),
    "aztec": ("AztecCode", "AztecRune"),
    "pdf417": ("PDF417",),
    "datamatrix": ("DataMatrix",),
    "ean-8": ("EAN8",),
    "ean-13": ("EAN13",),
    "upc-a": ("UPCA",),
    "upc-e": ("UPCE",),
    "code128": ("Code128",),
    "code39": ("Code39Std", "Code39Ext"),
    "code93": ("Code93",),
    "itf": ("ITF",),
    "codabar": ("Codabar",),
}
"""Every symbology the camera can read, by the name config.toml's `symbologies` uses."""

TWO_D = frozenset({"qr", "micro-qr", "aztec", "pdf417", "datamatrix"})
"""Symbologies with their own error correction: a single sighting is trusted."""

# zxing-cpp's format (as str() gives it) -> config name. An EAN-13 starting with 0 is a
# UPC-A (`_name`): zxing-cpp reports a UPC-A as EAN-13 when both are on.
_NAMES = {
    "QR Code": "qr",
    "QR Code Model 1": "qr",
    "QR Code Model 2": "qr",
    "Micro QR Code": "micro-qr",
    "Aztec": "aztec",
    "Aztec Code": "aztec",
    "Aztec Rune": "aztec",
    "PDF417": "pdf417",
    "Compact PDF417": "pdf417",
    "MicroPDF417": "pdf417",
    "Data Matrix": "datamatrix",
    "EAN-8": "ean-8",
    "EAN-13": "ean-13",
    "UPC-A": "upc-a",
    "UPC-E": "upc-e",
    "Code 128": "code128",
    "Code 39": "code39",
    "Code 39 Standard": "code39",
    "Code 39 Extended": "code39",
    "Code 93": "code93",
    "ITF": "itf",
    "ITF-14": "itf",
    "Codabar": "codabar",
}


@dataclass(frozen=True)
class Read:
    """One code found in a frame: what a hardware scanner would send for it."""

    symbology: str
    """The config name (`SYMBOLOGIES`): "qr", "ean-13" ..."""
    aim: str
    """The AIM identifier recorded in the ledger: "]Q1", "]E0", "]C1" ..."""
    data: bytes
    """The code as a hardware scanner sends it, without the identifier."""


def check_symbologies(names: Iterable[str]) -> tuple[str, ...]:
    """The names in config order, or ValueError naming the unknown ones and the allowed.

    >>> check_symbologies(["qr", "code128"])
    ('qr', 'code128')
    """
    names = tuple(names)
    unknown = [name for name in names if name not in SYMBOLOGIES]
    if unknown:
        raise ValueError(f"unknown symbologies {unknown}; allowed: {', '.join(SYMBOLOGIES)}")
    return names


def ean13_form(digits: str) -> str:
    """A UPC-A (12 digits) or UPC-E (8, or 6 without number system and check digit) as
    the 13-digit EAN-13 it stands for; EAN-13 and anything else unchanged. One rule for
    every decoder: the box records each UPC/EAN-13 as 13 digits (`]E0`).

    >>> ean13_form("036000291452"), ean13_form("01234565"), ean13_form("4006381333931")
    ('0036000291452', '0012345000065', '4006381333931')
    """
    if not digits.isdigit():
        return digits
    if len(digits) == 12:
        return "0" + digits
    if len(digits) == 6:
        digits = "0" + digits + _upca_check(_upce_body("0" + digits))
    if len(digits) == 8 and digits[0] in "01":
        return "0" + _upce_body(digits[:7]) + digits[7]
    return digits


def _upce_body(system_and_six: str) -> str:
    """The first 11 digits of the UPC-A a UPC-E stands for (GS1 General Specifications,
    UPC-E zero suppression): number system, then the six digits re-expanded."""
    system, d = system_and_six[0], system_and_six[1:7]
    last = d[5]
    if last in "012":
        body = d[0:2] + last + "0000" + d[2:5]
    elif last == "3":
        body = d[0:3] + "00000" + d[3:5]
    elif last == "4":
        body = d[0:4] + "00000" + d[4]
    else:
        body = d[0:5] + "0000" + last
    return system + body


def _upca_check(eleven: str) -> str:
    odd = sum(int(c) for c in eleven[0::2])
    even = sum(int(c) for c in eleven[1::2])
    return str((10 - (odd * 3 + even) % 10) % 10)


class ZxingDecoder:
    """zxing-cpp as a camera's `FrameDecoder`, reading only the switched-on `symbologies`
    (names from `SYMBOLOGIES`; all by default). Raises DriverError when zxing-cpp is not
    installed, ValueError for an unknown symbology name."""

    def __init__(self, symbologies: Iterable[str] = tuple(SYMBOLOGIES)) -> None:
        try:
            import zxingcpp
        except ImportError as exc:
            raise DriverError(f"zxing-cpp is not usable ({exc}): {INSTALL_ZXING}") from None
        self._zxing = zxingcpp
        self.symbologies = frozenset(check_symbologies(symbologies))
        formats = [
            getattr(zxingcpp.BarcodeFormat, member)
            for name in SYMBOLOGIES
            if name in self.symbologies
            for member in SYMBOLOGIES[name]
        ]
        # No formats would mean "every format" to zxing-cpp; with nothing switched on
        # nothing is read, without calling it.
        self._formats = zxingcpp.BarcodeFormats(formats) if formats else None

    def reads(self, image: np.ndarray) -> list[Read]:
        """Every code zxing-cpp finds in a 2-D uint8 frame, as `Read`s."""
        if image.ndim != 2 or image.dtype.name != "uint8":
            raise ValueError(
                f"a frame must be 2-D uint8 grayscale, got {image.dtype} {image.shape}"
            )
        if self._formats is None:
            return []
        # zxing-cpp reads the array's buffer in place, strides included (a crop works);
        # only the text mode and the formats differ from its defaults.
        found = self._zxing.read_barcodes(
            image, formats=self._formats, text_mode=self._zxing.TextMode.Plain
        )
        # A row of a 2-D symbol's modules can read as a short linear code (zxing-cpp
        # finds an ITF "6603" across about one QR code in 2000): it is in every frame the
        # symbol is, so confirmation would not stop it. A linear code whose centre lies
        # inside a 2-D symbol found in the same frame is that symbol, not a code.
        named = [(barcode, _NAMES.get(str(barcode.format))) for barcode in found]
        symbols = [barcode.position for barcode, name in named if name in TWO_D]
        reads = []
        for barcode, name in named:
            if symbols and name not in TWO_D:
                centre = _centre(barcode.position)
                if any(_inside(centre, symbol) for symbol in symbols):
                    continue
            read = self._read(barcode, name)
            if read is not None:
                reads.append(read)
        return reads

    def decode(self, image: np.ndarray) -> set[tuple[str, bytes]]:
        """(AIM identifier, data) of every code in a 2-D uint8 frame."""
        return {(read.aim, read.data) for read in self.reads(image)}

    def _read(self, barcode: zxingcpp.Barcode, name: str | None) -> Read | None:
        """`barcode` as a hardware scanner sends it; `name` is its format's config name."""
        text, aim = barcode.text, barcode.symbology_identifier
        if name == "ean-13" and text.startswith("0"):
            name = "upc-a"
        if name is None or name not in self.symbologies:
            return None
        if name in ("upc-a", "upc-e"):
            text = ean13_form(text)
        if barcode.content_type == self._zxing.ContentType.Binary:
            # No text in it: what the scanner sends is the bytes themselves.
            return Read(name, aim, bytes(barcode.bytes))
        return Read(name, aim, text.encode("utf-8"))


def _corners(position: zxingcpp.Position) -> list[tuple[float, float]]:
    """A found symbol's quadrilateral, corner by corner around it."""
    return [
        (point.x, point.y)
        for point in (
            position.top_left,
            position.top_right,
            position.bottom_right,
            position.bottom_left,
        )
    ]


def _centre(position: zxingcpp.Position) -> tuple[float, float]:
    corners = _corners(position)
    return (sum(x for x, _ in corners) / 4, sum(y for _, y in corners) / 4)


def _inside(point: tuple[float, float], position: zxingcpp.Position) -> bool:
    """Whether `point` lies in the (convex) quadrilateral of `position`, edges included:
    on the same side of all four edges, whichever way round the corners go."""
    corners = _corners(position)
    x, y = point
    sides = set()
    for (x1, y1), (x2, y2) in zip(corners, corners[1:] + corners[:1], strict=True):
        cross = (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)
        if cross:
            sides.add(cross > 0)
    return len(sides) == 1
