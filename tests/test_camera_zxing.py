"""The camera's decoders read every symbology as a hardware scanner sends it.

Symbols are generated (zxing-cpp's writer; segno for the Shift-JIS and ECI QR codes that
need a chosen encoding), decoded through the camera's `FrameDecoder`s and held to the
exact bytes and AIM identifier the ledger records (docs/scanners.md, "What the camera
sends"). Each case runs for every decoder that can read its symbology: zxing-cpp reads
them all; zbar (decoder = "zbar") reads QR, EAN/UPC, Code 128, Code 39 and ITF, without
Full ASCII, GS1 separators or Latin-1. Real photos from ../shared/corpus/barcodes (copied to tests/corpus) follow.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import segno
import zxingcpp
from conftest import ROOT
from PIL import Image

from cards import keys
from daemon import config as config_mod
from daemon.config import ConfigError
from drivers.camera import CameraScanner, ZbarDecoder
from drivers.zxing_decoder import SYMBOLOGIES, ZxingDecoder, check_symbologies, ean13_form

F = zxingcpp.BarcodeFormat
# A copy of the photos these tests read, from ../shared/corpus/barcodes (tests/corpus/README.md).
CORPUS = Path(__file__).resolve().parent / "corpus"


def symbol(content: str | bytes, format: zxingcpp.BarcodeFormat, **options: object) -> np.ndarray:
    """A generated symbol as a grey frame: 3 pixels a module, a white margin around."""
    barcode = zxingcpp.create_barcode(content, format, **options)
    image = np.asarray(zxingcpp.write_barcode_to_image(barcode, scale=3))
    return np.pad(image, 24, constant_values=255)


def qr(text: str, **options: object) -> np.ndarray:
    """A QR code made by segno, which lets the test choose the encoding and ECI."""
    buffer = io.BytesIO()
    segno.make_qr(text, **options).save(buffer, kind="png", scale=3, border=8)
    buffer.seek(0)
    with Image.open(buffer) as picture:
        return np.asarray(picture.convert("L"))


@dataclass(frozen=True)
class Case:
    symbology: str  # the config name
    make: Callable[[], np.ndarray]
    aim: str
    data: bytes
    zbar: bool = False  # zbar reads this one exactly so too


GS1 = "(01)09521234543213(10)AB12(21)123"
GS1_SENT = b"010952123454321310AB12\x1d21123"  # FNC1 between fields as GS, none in front

CASES = {
    "qr": Case("qr", lambda: symbol("DEMO-0001", F.QRCode), "]Q1", b"DEMO-0001", zbar=True),
    "qr-shift-jis-backslash": Case(
        # 0x5C in Shift-JIS: a backslash as JIS X 0201 has it, not the yen sign zbar gives.
        "qr",
        lambda: qr("C:\\日本", encoding="shift_jis"),
        "]Q1",
        "C:\\日本".encode(),
    ),
    "qr-eci-utf8": Case(
        "qr", lambda: qr("Ωmega-€", encoding="utf-8", eci=True), "]Q1", "Ωmega-€".encode()
    ),
    "qr-gs1": Case("qr", lambda: symbol(GS1, F.QRCode, gs1=True), "]Q3", GS1_SENT),
    "micro-qr": Case("micro-qr", lambda: symbol("HELLO", F.MicroQRCode), "]Q1", b"HELLO"),
    "aztec": Case("aztec", lambda: symbol("PASS-1234", F.Aztec), "]z0", b"PASS-1234"),
    "aztec-gs1": Case("aztec", lambda: symbol(GS1, F.Aztec, gs1=True), "]z1", GS1_SENT),
    "pdf417": Case("pdf417", lambda: symbol("BOARDING M1", F.PDF417), "]L2", b"BOARDING M1"),
    "datamatrix": Case("datamatrix", lambda: symbol("DM-42", F.DataMatrix), "]d1", b"DM-42"),
    "datamatrix-gs1": Case(
        "datamatrix", lambda: symbol(GS1, F.DataMatrix, gs1=True), "]d2", GS1_SENT
    ),
    "ean-8": Case("ean-8", lambda: symbol("9638507", F.EAN8), "]E4", b"96385074", zbar=True),
    "ean-13": Case(
        "ean-13", lambda: symbol("400638133393", F.EAN13), "]E0", b"4006381333931", zbar=True
    ),
    "upc-a": Case(
        "upc-a", lambda: symbol("03600029145", F.UPCA), "]E0", b"0036000291452", zbar=True
    ),
    "upc-e": Case("upc-e", lambda: symbol("0123456", F.UPCE), "]E0", b"0012345000065", zbar=True),
    "code128": Case(
        "code128", lambda: symbol("Code-128/x", F.Code128), "]C0", b"Code-128/x", zbar=True
    ),
    "code128-latin-1": Case(
        # Code 128's extended characters are ISO 8859-1: sent as the text they stand for.
        "code128",
        lambda: symbol("Café ü", F.Code128),
        "]C0",
        "Café ü".encode(),
    ),
    "code128-gs1": Case("code128", lambda: symbol(GS1, F.Code128, gs1=True), "]C1", GS1_SENT),
    "code39": Case("code39", lambda: symbol("CODE-39", F.Code39), "]A0", b"CODE-39", zbar=True),
    "code39-full-ascii": Case("code39", lambda: symbol("12+A+B", F.Code39), "]A4", b"12ab"),
    "code93": Case("code93", lambda: symbol("CODE93", F.Code93), "]G0", b"CODE93"),
    "itf": Case("itf", lambda: symbol("12345678", F.ITF), "]I0", b"12345678", zbar=True),
    "codabar": Case("codabar", lambda: symbol("A123456B", F.Codabar), "]F0", b"A123456B"),
}


def test_every_symbology_has_a_generated_case() -> None:
    assert {case.symbology for case in CASES.values()} == set(SYMBOLOGIES)


DECODERS: dict[str, Callable[..., ZxingDecoder | ZbarDecoder]] = {
    "zxing": ZxingDecoder,
    "zbar": ZbarDecoder,
}


def decoder_cases() -> list[object]:
    return [
        pytest.param(decoder, name, id=f"{decoder}-{name}")
        for decoder in DECODERS
        for name, case in CASES.items()
        if decoder == "zxing" or case.zbar
    ]


@pytest.mark.parametrize(("decoder", "name"), decoder_cases())
def test_generated_symbol_reads_as_a_hardware_scanner_sends_it(decoder: str, name: str) -> None:
    case = CASES[name]
    assert DECODERS[decoder]().decode(case.make()) == {(case.aim, case.data)}


@pytest.mark.parametrize(("decoder", "name"), decoder_cases())
def test_switched_off_symbology_is_not_read(decoder: str, name: str) -> None:
    case = CASES[name]
    image = case.make()
    others = [other for other in SYMBOLOGIES if other != case.symbology]
    assert DECODERS[decoder](others).decode(image) == set()
    assert DECODERS[decoder]([case.symbology]).decode(image) == {(case.aim, case.data)}


def test_nothing_switched_on_reads_nothing() -> None:
    assert ZxingDecoder([]).decode(CASES["qr"].make()) == set()


def test_unknown_symbology_is_refused_with_the_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"unknown symbologies \['qrcode'\]; allowed: qr, "):
        check_symbologies(["qr", "qrcode"])


def test_upc_is_recorded_as_its_ean13_form() -> None:
    assert ean13_form("036000291452") == "0036000291452"  # UPC-A
    assert ean13_form("01234565") == "0012345000065"  # UPC-E, number system 0
    assert ean13_form("11234562") == "0112345000062"  # UPC-E, number system 1
    assert ean13_form("123456") == "0012345000065"  # UPC-E without system and check
    assert ean13_form("04252614") == "0042100005264"  # UPC-E ending 4
    assert ean13_form("4006381333931") == "4006381333931"  # EAN-13 as it is
    assert ean13_form("96385074") == "96385074"  # EAN-8 (starts with 9): not a UPC-E


def test_a_crop_of_a_frame_is_read_in_place() -> None:
    code = CASES["qr"].make()
    frame = np.full((600, 800), 255, dtype=np.uint8)
    frame[100 : 100 + code.shape[0], 200 : 200 + code.shape[1]] = code
    crop = frame[50:500, 150:700]  # a strided view, not a copy
    assert not crop.flags.c_contiguous
    assert ZxingDecoder().decode(crop) == {("]Q1", b"DEMO-0001")}


def test_the_frame_itself_is_handed_to_zxing_cpp_not_a_copy(monkeypatch) -> None:
    handed: list[object] = []
    real = zxingcpp.read_barcodes

    def spy(image: np.ndarray, **options: object) -> list[zxingcpp.Barcode]:
        handed.append(image)
        return real(image, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(zxingcpp, "read_barcodes", spy)
    frame = CASES["qr"].make()
    assert ZxingDecoder().decode(frame) == {("]Q1", b"DEMO-0001")}
    assert handed == [frame] and handed[0] is frame


# A claim link whose QR code zxing-cpp also reads as an ITF "6603" (one of about 2000
# random links does), from a row of the symbol's own modules.
QR_WITH_AN_ITF_INSIDE = "https://claim.example.com/C/LE2UH32VPR47YZ3M4NCOPP4KHZYMIEJWOZWZG4PP"


def test_a_linear_code_read_inside_a_qr_code_is_not_a_read_of_its_own() -> None:
    frame = qr(QR_WITH_AN_ITF_INSIDE, error="m")
    seen = {str(barcode.format) for barcode in zxingcpp.read_barcodes(frame)}
    assert seen == {"QR Code", "ITF"}, f"zxing-cpp no longer sees the ITF here: {seen}"
    # In every frame the phone is held up, so confirming 1-D reads would not stop it.
    assert ZxingDecoder().decode(frame) == {("]Q1", QR_WITH_AN_ITF_INSIDE.encode())}


def test_a_linear_code_beside_a_qr_code_is_still_read() -> None:
    beside = symbol("12345678", F.ITF)
    code = qr(QR_WITH_AN_ITF_INSIDE, error="m")
    frame = np.full((max(code.shape[0], beside.shape[0]), code.shape[1] + beside.shape[1]), 255,
                    dtype=np.uint8)  # fmt: skip
    frame[: code.shape[0], : code.shape[1]] = code
    frame[: beside.shape[0], code.shape[1] :] = beside
    assert ZxingDecoder().decode(frame) == {
        ("]Q1", QR_WITH_AN_ITF_INSIDE.encode()),
        ("]I0", b"12345678"),
    }


def test_a_colour_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        ZxingDecoder().decode(np.zeros((10, 10, 3), dtype=np.uint8))


# A handful of real photos per symbology (../shared/corpus/barcodes) that the camera reads,
# each with its identifier: bench/camera_corpus.py scores the whole corpus.
PHOTOS = {
    "aztec-1/#128.webp": "]z0",
    "aztec-1/abc-37x37.png": "]z0",
    "aztec-1/rune-68.png": "]zC",  # a rune
    "code128-1/3.webp": "]C0",
    "code128-1/4.png": "]C1",
    "code128-1/5.png": "]C1",
    "code39-1/1.png": "]A0",
    "code39-1/3.png": "]A0",
    "datamatrix-1/0123456789.png": "]d1",
    "datamatrix-1/EDIFACT.png": "]d1",
    "datamatrix-1/HelloWorld_Text_L_Kaywa.png": "]d1",
    "ean13-1/15.webp": "]E0",
    "ean13-1/25.webp": "]E0",
    "ean8-1/3.png": "]E4",
    "ean8-1/4.webp": "]E4",
    "itf-1/1.webp": "]I1",
    "itf-1/5.webp": "]I0",
    "pdf417-1/01.png": "]L2",
    "pdf417-1/02.png": "]L2",
    "qrcode-1/13.webp": "]Q1",
    "qrcode-1/17.webp": "]Q1",
    "upca-1/16.webp": "]E0",
    "upca-2/07.webp": "]E0",
    "upce-1/1.png": "]E0",
    "upce-2/01.webp": "]E0",
}


def corpus_image(name: str) -> np.ndarray:
    path = CORPUS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the barcode photo corpus belongs in {CORPUS}")
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"))


def expected_content(name: str) -> bytes:
    """The corpus's expected content, UPC in its 13-digit EAN-13 form (README there)."""
    path = CORPUS / name
    expected = path.with_suffix(".txt").read_bytes()
    if path.parent.name.startswith(("upca", "upce")):
        expected = ean13_form(expected.decode()).encode()
    return expected


@pytest.mark.parametrize("name", list(PHOTOS))
def test_real_photo_is_read(name: str) -> None:
    assert ZxingDecoder().decode(corpus_image(name)) == {(PHOTOS[name], expected_content(name))}


@pytest.mark.parametrize(
    "name", ["falsepositives-1/01.webp", "falsepositives-1/#245.png", "falsepositives-2/03.webp"]
)
def test_photo_without_a_barcode_reads_nothing(name: str) -> None:
    assert ZxingDecoder().decode(corpus_image(name)) == set()


def test_redeemd_decode_reads_many_corpus_photos_in_one_call_without_ffmpeg(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()  # no ffmpeg on PATH: photos must not need it
    paths = [str(CORPUS / name) for name in PHOTOS]
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "decode", "--json", *paths],
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(empty)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    files = json.loads(done.stdout)
    assert [found["path"] for found in files] == paths
    for name, found in zip(PHOTOS, files, strict=True):
        codes = [(code["aim"], code["text"].encode()) for code in found["codes"]]
        assert codes == [(PHOTOS[name], expected_content(name))], name


def test_a_camera_decodes_with_zxing_by_default_and_with_zbar_when_configured() -> None:
    default = CameraScanner("cam", {"device": "/dev/video0"}).make_decoder()
    assert isinstance(default, ZxingDecoder) and default.symbologies == set(SYMBOLOGIES)
    chosen = {"device": "/dev/video0", "decoder": "zbar", "symbologies": ["qr", "ean-13"]}
    zbar = CameraScanner("cam", chosen).make_decoder()
    assert isinstance(zbar, ZbarDecoder) and zbar.symbologies == {"qr", "ean-13"}


def test_config_names_an_unknown_symbology_and_the_allowed_ones(tmp_path, keyset) -> None:
    (tmp_path / "root.pub").write_text(keys.b64(keys.public_of(keyset.root_private)) + "\n")
    (tmp_path / "code.key").write_text(keys.b64(keyset.code_key) + "\n")
    data = {
        "box": {"state_dir": str(tmp_path)},
        "trust": {
            "root_key_files": [str(tmp_path / "root.pub")],
            "code_key_file": str(tmp_path / "code.key"),
        },
        "scanner": [
            {"type": "camera", "name": "cam", "device": "/dev/video0", "symbologies": ["qrcode"]},
            {"type": "camera", "name": "cam2", "device": "/dev/video2", "decoder": "zxing-cpp"},
        ],
    }
    with pytest.raises(ConfigError) as caught:
        config_mod.parse(data, source="test.toml")
    allowed = ", ".join(SYMBOLOGIES)
    assert caught.value.problems == [
        f"[[scanner]] #1 symbologies = ['qrcode']: must be a list of symbologies from {allowed}",
        "[[scanner]] #2 decoder = 'zxing-cpp': must be one of 'zxing', 'zbar'",
    ]
