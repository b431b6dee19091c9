"""Camera scanners: codes generated here, decoded through the real ffmpeg pipe and the real
decoders (zxing-cpp, the default, and zbar where a test is about zbar or runs for both).

Every picture is made by the test: QR codes by segno, EAN-13 and Code 128 modules by
python-barcode (rendered with numpy, so no Pillow is needed), then rotated, scaled and
made noisy, written to PNG and turned into short videos by the real `ffmpeg`. The driver
reads those files through exactly the pipe it uses for a V4L2 camera (only the input
options differ; `test_camera_command_asks_v4l2_for_raw_gray_frames` pins those), so what
is decoded here is what the box decodes from its camera. No camera is attached to the
test machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, read_json_lines, wait_for, write_box

from cards.scan import Scan
from drivers import camera
from drivers.camera import CameraScanner, decode_files, decode_frame, ffmpeg_command
from drivers.dedupe import Deduper
from drivers.supervisor import DeviceGone, DriverError, DriverState, Supervisor
from drivers.zxing_decoder import ZxingDecoder

W, H, FPS = 320, 240, 10
# A 320x240 gray frame is 76,800 bytes, more than a pipe hands over in one read (64 KiB):
# every frame in these tests is assembled from several short reads.
assert W * H > 65536

EAN_A, EAN_B = "590123412345", "400638133393"  # 12 digits; zbar reports the 13th (check digit)


@pytest.fixture(scope="module", autouse=True)
def camera_tools() -> None:
    """No skipping: a box with a camera needs both, so a test machine without them fails."""
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not installed: apt install ffmpeg", pytrace=False)
    try:
        import zbar  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.fail(f"zbar-py is not usable ({exc}): pip install 'redeemd[drivers]'", pytrace=False)


# --- pictures --------------------------------------------------------------------------


def qr(text: str, module: int = 5, border: int = 4) -> np.ndarray:
    import segno

    # micro=False: segno picks a Micro QR for short texts, which zbar does not read.
    code = segno.make(text, error="m", micro=False)
    size = len(code.matrix)
    dark = np.frombuffer(b"".join(code.matrix), dtype=np.uint8).reshape(size, size)
    image = np.where(dark == 1, 0, 255).astype(np.uint8)
    image = np.pad(image, border, constant_values=255)
    return np.kron(image, np.ones((module, module), dtype=np.uint8))


def linear(kind: str, text: str, module: int = 2, height: int = 60) -> np.ndarray:
    import barcode

    bars = barcode.get(kind, text).build()[0]
    row = np.array([0 if bit == "1" else 255 for bit in bars], dtype=np.uint8)
    row = np.pad(row, 10, constant_values=255)  # quiet zone of 10 modules
    return np.repeat(np.tile(row, (height, 1)), module, axis=1)


def zxing_symbol(text: str, format: str) -> np.ndarray:
    """A symbol python-barcode does not make (UPC-E), by zxing-cpp's writer, 2 px a module."""
    import zxingcpp

    barcode = zxingcpp.create_barcode(text, getattr(zxingcpp.BarcodeFormat, format))
    return np.pad(
        np.asarray(zxingcpp.write_barcode_to_image(barcode, scale=2)), 10, constant_values=255
    )


def frame(*codes: np.ndarray, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A W x H gray frame with the codes stacked top to bottom, centred, optionally noisy."""
    image = np.full((H, W), 235, dtype=np.uint8)  # paper under shop lighting, not pure white
    y = (H - sum(code.shape[0] + 8 for code in codes) + 8) // 2
    for code in codes:
        h, w = code.shape
        x = (W - w) // 2
        image[y : y + h, x : x + w] = code
        y += h + 8
    return noisy(image, noise, seed) if noise else image


def noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def blank() -> np.ndarray:
    return frame()


def ffmpeg(*args: str, input: bytes | None = None) -> None:
    done = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
        input=input, capture_output=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()


def write_png(path: Path, image: np.ndarray, filters: str = "") -> Path:
    h, w = image.shape
    vf = ["-vf", filters] if filters else []
    raw = ["-f", "rawvideo", "-pix_fmt", "gray", "-video_size", f"{w}x{h}", "-i", "-"]
    ffmpeg(*raw, *vf, "-frames:v", "1", str(path), input=image.tobytes())
    return path


def write_video(path: Path, frames: list[np.ndarray], codec: str = "ffv1") -> Path:
    """Frames at FPS into a real video file. ffv1 is lossless: what is drawn is decoded."""
    options = ["-c:v", "ffv1"] if codec == "ffv1" else ["-c:v", codec, "-pix_fmt", "yuv420p"]
    raw = ["-f", "rawvideo", "-pix_fmt", "gray", "-video_size", f"{W}x{H}"]
    ffmpeg(*raw, "-framerate", str(FPS), "-i", "-", *options, str(path),
           input=b"".join(f.tobytes() for f in frames))  # fmt: skip
    return path


def rotate(degrees: float) -> str:
    angle = f"{degrees}*PI/180"
    return f"rotate={angle}:ow=rotw({angle}):oh=roth({angle}):fillcolor=white"


def transformed(image: np.ndarray, filters: str) -> np.ndarray:
    """`image` after an ffmpeg filter chain (rotate, scale ...), as gray pixels."""
    h, w = image.shape
    raw = ["-f", "rawvideo", "-pix_fmt", "gray", "-video_size", f"{w}x{h}", "-i", "-"]
    done = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", *raw, "-vf", filters,
         "-frames:v", "1", "-f", "image2pipe", "-c:v", "pgm", "-"],
        input=image.tobytes(), capture_output=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    # A PGM: "P5\n<width> <height>\n255\n" then the pixels, one byte each.
    _, width, height = done.stdout.split(maxsplit=3)[:3]
    size = int(width) * int(height)
    return np.frombuffer(done.stdout[-size:], dtype=np.uint8).reshape(int(height), int(width))


# --- running the driver ----------------------------------------------------------------


def settings(device: Path | str, **extra: object) -> dict[str, object]:
    return {"device": str(device), "width": W, "height": H, "fps": FPS, **extra}


def scans_from(device: Path | str, **extra: object) -> list[Scan]:
    """Run the driver on a file until the file ends; the scans it emitted."""
    scans: list[Scan] = []
    state = DriverState("cam", "camera")
    CameraScanner("cam", settings(device, **extra)).run(scans.append, threading.Event(), state)
    assert state.state == "connected"  # it really read frames
    return scans


def codes(scans: list[Scan]) -> list[tuple[str | None, bytes]]:
    """(symbology, code) of each scan: the AIM identifier, as the ledger records it."""
    return [(s.symbology, s.code) for s in scans]


def ffmpeg_children() -> set[int]:
    """Pids of ffmpeg processes whose parent is this test process (zombies included)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("Name", "").strip() == "ffmpeg" and fields.get("PPid", "").strip() == str(
            os.getpid()
        ):
            found.add(int(entry.name))
    return found


# --- de-duplication, pure --------------------------------------------------------------

QR_CODE = ("QR-Code", b"DEMO-0001")  # as zbar reports it
QR_SCAN = ("]Q1", b"DEMO-0001")  # as the driver's Scan names it: the AIM identifier
EAN = ("EAN-13", b"5901234123457")


def test_code_held_in_view_is_one_scan():
    d = Deduper(rescan_after=2.0)
    emitted = [d.feed({QR_CODE}, at=i / 10) for i in range(100)]
    assert emitted[0] == [QR_CODE]
    assert all(e == [] for e in emitted[1:])


def test_code_scans_again_only_after_being_out_of_view_for_rescan_after():
    d = Deduper(rescan_after=2.0)
    assert d.feed({QR_CODE}, at=0.0) == [QR_CODE]
    assert d.feed(set(), at=1.0) == []
    assert d.feed({QR_CODE}, at=1.9) == []  # away 1.9 s: still the same sighting
    assert d.feed(set(), at=4.0) == []
    assert d.feed({QR_CODE}, at=4.1) == [QR_CODE]  # away 2.2 s: a new scan


def test_1d_code_needs_consistent_sightings_2d_code_does_not():
    d = Deduper(rescan_after=2.0, min_sightings_1d=2)
    assert d.feed({EAN, QR_CODE}, at=0.0) == [QR_CODE]
    assert d.feed({EAN, QR_CODE}, at=0.1) == [EAN]
    assert d.feed({EAN}, at=0.2) == []


def test_1d_code_seen_once_then_gone_never_counts():
    d = Deduper(rescan_after=2.0, min_sightings_1d=2)
    assert d.feed({EAN}, at=0.0) == []
    assert d.feed(set(), at=5.0) == []
    assert d.feed({EAN}, at=5.1) == []  # the earlier single sighting has been forgotten
    assert d.feed({EAN}, at=5.2) == [EAN]


def test_dedupe_memory_is_bounded_and_forgets_codes_out_of_view():
    d = Deduper(rescan_after=2.0, max_tracked=64)
    for i in range(10_000):
        d.feed({("QR-Code", str(i).encode())}, at=i / 1000)
    assert len(d) <= 64
    d.feed(set(), at=100.0)
    assert len(d) == 0


# --- frames into zbar ------------------------------------------------------------------


def test_strided_and_cropped_frames_are_decoded_as_contiguous_2d():
    scanner = camera.zbar_scanner()
    wide = np.full((H, 2 * W), 235, dtype=np.uint8)
    wide[:, ::2] = frame(qr("DEMO-0001"))  # every other column: a strided view below
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    assert decode_frame(scanner, strided) == {QR_CODE}
    rotated = np.rot90(frame(qr("DEMO-0001")))
    assert not rotated.flags.c_contiguous
    assert decode_frame(scanner, rotated) == {QR_CODE}
    with pytest.raises(ValueError, match="2-D"):
        decode_frame(scanner, np.zeros((H, W, 3), dtype=np.uint8))


def test_frame_is_assembled_from_short_reads(tmp_path):
    reader, writer = os.pipe()
    data = frame(qr("DEMO-0001")).tobytes()

    def trickle() -> None:
        for i in range(0, len(data), 1000):
            os.write(writer, data[i : i + 1000])
        os.close(writer)

    thread = threading.Thread(target=trickle)
    thread.start()
    buffer = bytearray(W * H)
    with os.fdopen(reader, "rb", buffering=0) as stream:
        assert camera.read_frame(stream, memoryview(buffer), threading.Event())
        assert bytes(buffer) == data
        assert not camera.read_frame(stream, memoryview(buffer), threading.Event())
    thread.join()


def test_camera_command_asks_v4l2_for_raw_gray_frames():
    command = ffmpeg_command("ffmpeg", "/dev/video0", 640, 480, 15, input_format="mjpeg")
    assert command[:4] == ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel"]
    joined = " ".join(command)
    assert "-f v4l2 -video_size 640x480 -framerate 15 -input_format mjpeg -i /dev/video0" in joined
    assert joined.endswith("-f rawvideo -pix_fmt gray -")
    assert "scale=640:480" in joined
    assert "fps=" not in joined  # a camera runs on its own clock


# --- the real pipe: videos made by ffmpeg ----------------------------------------------


def test_qr_held_in_view_is_one_scan_and_shown_again_after_a_gap_is_a_second(tmp_path):
    shown = frame(qr("DEMO-0001"))
    # 1 s nothing, 2 s the code, 3 s away (> rescan_after 2 s), 1 s the code again.
    video = write_video(
        tmp_path / "held.mkv", [blank()] * 10 + [shown] * 20 + [blank()] * 30 + [shown] * 10
    )
    scans = scans_from(video, rescan_after=2.0)
    assert codes(scans) == [QR_SCAN, QR_SCAN]
    assert {s.source for s in scans} == {"cam"}


def test_another_decoder_behind_the_frame_decoder_interface_replaces_zbar(tmp_path):
    """What issue 11 needs to put zxing-cpp in zbar's place: the driver asks only
    `decode(image)` of whatever `make_decoder` makes, once per frame, on every start."""

    class Counting:
        """zbar, counting the frames it is handed and naming its codes in upper case."""

        def __init__(self) -> None:
            self.frames = 0
            self.zbar = camera.ZbarDecoder()

        def decode(self, image):
            self.frames += 1
            return {(kind, data.upper()) for kind, data in self.zbar.decode(image)}

    decoders: list[Counting] = []

    def make() -> Counting:
        decoders.append(Counting())
        return decoders[-1]

    video = write_video(tmp_path / "held.mkv", [blank()] * 3 + [frame(qr("demo-0001"))] * 5)
    scans: list[Scan] = []
    driver = CameraScanner("cam", settings(video), make_decoder=make)
    driver.run(scans.append, threading.Event(), DriverState("cam", "camera"))
    assert codes(scans) == [("]Q1", b"DEMO-0001")]
    assert [d.frames for d in decoders] == [8]
    driver.run(scans.append, threading.Event(), DriverState("cam", "camera"))
    assert len(decoders) == 2  # a restart makes a new one


def test_qr_missed_for_a_few_frames_while_held_is_still_one_scan(tmp_path):
    shown = frame(qr("DEMO-0001"))
    # zbar misses a held code now and then (blur, glare): 0.5 s without it is not "away".
    video = write_video(tmp_path / "flicker.mkv", [shown] * 10 + [blank()] * 5 + [shown] * 10)
    assert codes(scans_from(video, rescan_after=2.0)) == [QR_SCAN]


def test_1d_code_in_a_single_frame_does_not_count_but_in_two_frames_does(tmp_path):
    once = frame(linear("ean13", EAN_A))
    twice = frame(linear("ean13", EAN_B))
    code128 = frame(linear("code128", "DEMO-0002"))
    frames = [blank()] * 3 + [once] + [blank()] * 30 + [twice] * 2 + [blank()] * 30 + [code128] * 2
    video = write_video(tmp_path / "linear.mkv", frames)

    assert codes(scans_from(video, min_sightings_1d=2)) == [
        ("]E0", b"4006381333931"),
        ("]C0", b"DEMO-0002"),
    ]
    # The single frame is readable: with one sighting enough it counts too.
    assert codes(scans_from(video, min_sightings_1d=1))[0] == ("]E0", b"5901234123457")


def test_frames_with_nothing_in_them_yield_nothing(tmp_path):
    frames = [blank()] * 5 + [noisy(blank(), 60, seed) for seed in range(10)]
    rng = np.random.default_rng(1)
    frames += [rng.integers(0, 256, (H, W), dtype=np.uint8) for _ in range(5)]  # static
    assert scans_from(write_video(tmp_path / "empty.mkv", frames)) == []


def test_lossy_video_of_two_codes_in_one_frame_gives_both(tmp_path):
    both = frame(qr("DEMO-0003", module=3), linear("code128", "DEMO-0004"))
    video = write_video(tmp_path / "both.mp4", [blank()] * 5 + [both] * 10, codec="libx264")
    assert sorted(codes(scans_from(video))) == [
        ("]C0", b"DEMO-0004"),
        ("]Q1", b"DEMO-0003"),
    ]


def test_rotated_qr_and_scaled_ean13_in_a_noisy_video_are_read_through_the_pipe(tmp_path):
    rotated_qr = transformed(qr("DEMO-0007", module=3), rotate(25))
    scaled_ean = transformed(linear("ean13", EAN_A), "scale=iw*1.3:-1:flags=bicubic")
    # Sensor noise differs from frame to frame, so no two frames of the code are alike.
    shown = [noisy(frame(rotated_qr, scaled_ean), 20, seed) for seed in range(15)]
    video = write_video(tmp_path / "rotated-scaled-noisy.mkv", [blank()] * 3 + shown)
    scans = scans_from(video)
    assert sorted(codes(scans)) == [("]E0", b"5901234123457"), ("]Q1", b"DEMO-0007")]
    assert all(isinstance(s, Scan) and s.source == "cam" for s in scans)


DECODERS = {"zxing": ZxingDecoder, "zbar": camera.ZbarDecoder}


def found_in(paths: list[Path], decoder: str) -> dict[str, set[tuple[str, str]]]:
    """decode_files with the named decoder: path -> {(symbology, text)}."""
    return {
        found.path: {(r.symbology, r.data.decode()) for r in found.reads}
        for found in decode_files(paths, DECODERS[decoder]())
    }


@pytest.mark.parametrize("decoder", DECODERS)
def test_ean13_with_a_book_prefix_decodes_as_all_13_digits_not_as_an_isbn(tmp_path, decoder):
    # A serial or HID scanner sends these as the 13 digits printed under the bars; zbar
    # would report 9780201379624 as ISBN-10 0201379627, another code for the same card.
    write_png(tmp_path / "978.png", frame(linear("ean13", "978020137962")))
    write_png(tmp_path / "979.png", frame(linear("ean13", "979100000001")))
    found = found_in(sorted(tmp_path.iterdir()), decoder)
    assert list(found.values()) == [{("ean-13", "9780201379624")}, {("ean-13", "9791000000015")}]
    scans = scans_from(tmp_path / "*.png", rescan_after=0.05, min_sightings_1d=1, decoder=decoder)
    assert codes(scans) == [("]E0", b"9780201379624"), ("]E0", b"9791000000015")]


@pytest.mark.parametrize("decoder", DECODERS)
def test_upc_a_and_upc_e_decode_as_the_13_digit_ean13_they_are(tmp_path, decoder):
    # UPC-A 036000291452 is EAN-13 0036000291452, UPC-E 01234565 is 0012345000065: one
    # code, whichever way and by whichever scanner it is read.
    write_png(tmp_path / "a.png", frame(linear("upca", "03600029145")))
    write_png(tmp_path / "e.png", frame(zxing_symbol("0123456", "UPCE")))
    found = found_in([tmp_path / "a.png", tmp_path / "e.png"], decoder)
    assert list(found.values()) == [{("upc-a", "0036000291452")}, {("upc-e", "0012345000065")}]
    scans = scans_from(tmp_path / "*.png", rescan_after=0.05, min_sightings_1d=1, decoder=decoder)
    assert codes(scans) == [("]E0", b"0036000291452"), ("]E0", b"0012345000065")]


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_switched_off_symbology_is_not_scanned(tmp_path, decoder):
    write_png(tmp_path / "a.png", frame(qr("DEMO-0005"), linear("ean13", EAN_A)))
    scans = scans_from(tmp_path / "a.png", min_sightings_1d=1, decoder=decoder, symbologies=["qr"])
    assert codes(scans) == [("]Q1", b"DEMO-0005")]


def test_glob_of_images_is_read_one_image_per_frame(tmp_path):
    write_png(tmp_path / "a.png", frame(qr("DEMO-0005")))
    write_png(tmp_path / "b.png", blank())
    write_png(tmp_path / "c.png", frame(qr("DEMO-0006")))
    scans = scans_from(tmp_path / "*.png", rescan_after=0.05)
    assert codes(scans) == [("]Q1", b"DEMO-0005"), ("]Q1", b"DEMO-0006")]


# --- still images: redeemd decode ------------------------------------------------------


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Generated images -> (symbology, text) each must yield."""
    made = {
        "qr-rotated-30.png": (qr("DEMO-0001", module=4), rotate(30), ("qr", "DEMO-0001")),
        "qr-small-noisy.png": (noisy(qr("DEMO-0002", module=2), 35, 3), "", ("qr", "DEMO-0002")),
        "qr-scaled-0.7.jpg": (qr("DEMO-0003", module=5), "scale=iw*0.7:-1:flags=bicubic", ("qr", "DEMO-0003")),
        "ean13-rotated-90.png": (np.rot90(linear("ean13", EAN_A)).copy(), "", ("ean-13", "5901234123457")),
        "ean13-tilted-8.png": (linear("ean13", EAN_B, module=3), rotate(8), ("ean-13", "4006381333931")),
        # zbar's Code 128 decoder gives up on per-pixel noise that no lens delivers; a
        # camera's optics and ISP smooth sensor noise, so the noisy bars are blurred too.
        "code128-noisy-blurred-scaled.png": (noisy(linear("code128", "DEMO-0004", module=3), 30, 4), "gblur=sigma=1,scale=iw*1.5:-1", ("code128", "DEMO-0004")),
    }  # fmt: skip
    out = {}
    for name, (image, filters, expected) in made.items():
        path = write_png(tmp_path / name, np.pad(image, 20, constant_values=255), filters)
        out[str(path)] = expected
    return out


@pytest.mark.parametrize("decoder", DECODERS)
def test_decode_files_finds_rotated_scaled_and_noisy_codes(photos, decoder):
    assert found_in(list(photos), decoder) == {path: {found} for path, found in photos.items()}


def test_redeemd_decode_prints_the_payloads(photos, tmp_path):
    nothing = write_png(tmp_path / "nothing.png", noisy(blank(), 40))
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "decode", *photos, str(nothing)],
        capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    aim = {"qr": "]Q1", "ean-13": "]E0", "code128": "]C0"}
    expected = [f"{p}: {s} {aim[s]}: {t}" for p, (s, t) in photos.items()]
    assert sorted(lines) == sorted([*expected, f"{nothing}: no code found"])


def test_redeemd_decode_json_gives_every_files_codes(photos, tmp_path):
    nothing = write_png(tmp_path / "nothing.png", blank())
    done = redeemd_decode("--json", *photos, nothing, tmp_path / "missing.png")
    assert done.returncode == 0, done.stderr.decode()
    files = json.loads(done.stdout)
    assert [f["path"] for f in files] == [*photos, str(nothing), str(tmp_path / "missing.png")]
    for found, (symbology, text) in zip(files, photos.values(), strict=False):
        assert [(c["symbology"], c["text"]) for c in found["codes"]] == [(symbology, text)]
        assert found["error"] is None
    assert files[-2] == {"path": str(nothing), "codes": [], "error": None}
    assert files[-1] == {
        "path": str(tmp_path / "missing.png"),
        "codes": [],
        "error": "no such file",
    }


def test_redeemd_decode_says_when_nothing_is_found(tmp_path):
    nothing = write_png(tmp_path / "nothing.png", blank())
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "decode", str(nothing), str(tmp_path / "missing.png")],
        capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert b"missing.png: no such file" in done.stderr
    assert b"no code found" in done.stderr


def redeemd_decode(*paths: Path | str, path_env: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path_env is not None:
        env["PATH"] = path_env
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "decode", *map(str, paths)],
        capture_output=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip


def test_redeemd_decode_reads_images_without_ffmpeg_and_says_what_a_video_needs(tmp_path):
    image = write_png(tmp_path / "qr.png", frame(qr("DEMO-0001")))
    video = write_video(tmp_path / "qr.mkv", [frame(qr("DEMO-0001"))] * 2)
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    # The interpreter is started by its absolute path: PATH only decides the ffmpeg lookup.
    done = redeemd_decode(image, path_env=str(no_tools))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == f"{image}: qr ]Q1: DEMO-0001\n"
    done = redeemd_decode(video, path_env=str(no_tools))
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.splitlines() == [
        "redeemd: ffmpeg not found (looked for 'ffmpeg'): install ffmpeg (apt install ffmpeg)"
    ]
    assert done.stdout == b""


def test_redeemd_decode_names_a_directory_and_why_ffmpeg_cannot_read_an_image(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    broken = tmp_path / "x.png"
    broken.write_bytes(np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    done = redeemd_decode(folder, broken)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert f"{folder}: is a directory" in err
    assert "no such file" not in err
    (complaint,) = [line for line in err.splitlines() if str(broken) in line]
    # ffmpeg's last line here is a consequence ("Error marking filters as finished"); the
    # cause comes before it and must reach the technician.
    assert "ffmpeg cannot read it" in complaint
    assert "Invalid data found when processing input" in complaint
    assert "Traceback" not in err


# --- failures and stopping -------------------------------------------------------------


def test_missing_camera_device_is_gone_not_an_error():
    driver = CameraScanner("cam", settings("/dev/video-redeemd-test-missing"))
    with pytest.raises(DeviceGone) as raised:
        driver.run(lambda scan: None, threading.Event(), DriverState("cam", "camera"))
    message = str(raised.value)
    assert "/dev/video-redeemd-test-missing" in message
    assert "redeemd devices" in message
    assert not ffmpeg_children()


def script(path: Path, body: str) -> Path:
    """An executable shell script standing in for ffmpeg (the `ffmpeg` setting)."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


REAL_FFMPEG = shutil.which("ffmpeg") or "ffmpeg"


def test_camera_unplugged_while_streaming_is_gone(tmp_path):
    # No camera on the test machine: a node under /dev that the stand-in removes, and
    # the line ffmpeg's V4L2 input logs when the camera goes (ENODEV), after real frames.
    node = Path("/dev/shm") / f"redeemd-test-video-{os.getpid()}-{tmp_path.name}"
    node.touch()
    video = write_video(tmp_path / "counter.mkv", [blank()] * 3 + [frame(qr("DEMO-0001"))] * 5)
    fake = script(
        tmp_path / "ffmpeg",
        f"""\
"{REAL_FFMPEG}" -hide_banner -nostdin -loglevel error -i "{video}" -f rawvideo -pix_fmt gray -
rm -f "{node}"
echo "[video4linux2,v4l2 @ 0x55d0c1a2b3c0] ioctl(VIDIOC_DQBUF): No such device" >&2
exit 1
""",
    )
    scans: list[Scan] = []
    state = DriverState("cam", "camera")
    try:
        with pytest.raises(DeviceGone) as raised:
            CameraScanner("cam", settings(node, ffmpeg=fake)).run(
                scans.append, threading.Event(), state
            )
    finally:
        node.unlink(missing_ok=True)
    assert state.state == "connected"  # it had streamed before it went
    assert codes(scans) == [QR_SCAN]
    message = str(raised.value)
    assert str(node) in message and "ffmpeg exited with status 1" in message
    assert "video4linux2,v4l2: ioctl(VIDIOC_DQBUF): No such device" in message


def test_ffmpeg_failing_mid_stream_is_reported_and_reading_resumes_after_restart(tmp_path):
    video = write_video(
        tmp_path / "counter.mkv", [blank()] * 10 + [frame(qr("DEMO-0001"))] * 10 + [blank()] * 5
    )
    failed_once = tmp_path / "failed-once"
    # The first run delivers 5 blank frames and dies; every later one is the real ffmpeg.
    fake = script(
        tmp_path / "ffmpeg",
        f"""\
if [ ! -e "{failed_once}" ]; then
    touch "{failed_once}"
    "{REAL_FFMPEG}" "$@" | head -c {5 * W * H}
    echo "fake-ffmpeg: lost the stream after 5 frames" >&2
    exit 1
fi
exec "{REAL_FFMPEG}" "$@"
""",
    )

    class Recording(CameraScanner):
        """Notes the state each run starts from: what the supervisor made of the last."""

        def __init__(self, *args):
            super().__init__(*args)
            self.found_at_start: list[tuple[str, str]] = []

        def run(self, emit, stop, state):
            self.found_at_start.append((state.state, state.message))
            super().run(emit, stop, state)

    driver = Recording("cam", settings(video, ffmpeg=fake))
    scans: list[Scan] = []
    supervisor = Supervisor(driver, scans.append, initial_backoff=0.01, max_backoff=0.02)
    supervisor.start()
    supervisor.thread.join(60)
    assert not supervisor.thread.is_alive()

    first, second = driver.found_at_start
    assert first == ("starting", "")
    state, message = second
    assert state == "error"
    assert message.startswith(f"camera {video}: ffmpeg exited with status 1: ")
    assert "fake-ffmpeg: lost the stream after 5 frames" in message
    assert codes(scans) == [QR_SCAN]  # the code comes after the failure: read by the restart
    assert (supervisor.state.state, supervisor.state.restarts) == ("ended", 1)


def test_camera_that_stops_delivering_frames_fails_after_its_no_frame_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    # A camera that opened and then sends nothing: no frame, no exit, no message.
    fake = script(tmp_path / "ffmpeg", f'echo $$ > "{pid_file}"\nexec sleep 600\n')
    driver = CameraScanner("cam", settings("/dev/null", ffmpeg=fake, no_frame_timeout=1))
    with pytest.raises(DriverError) as raised:
        driver.run(lambda scan: None, threading.Event(), DriverState("cam", "camera"))
    assert not isinstance(raised.value, DeviceGone)  # its node is there: it hung
    message = str(raised.value)
    assert message.startswith("camera /dev/null delivered no frame for 1 s; restarting it")
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()  # stopped and reaped


def test_missing_ffmpeg_says_what_to_install(tmp_path):
    driver = CameraScanner("cam", settings("/dev/video0", ffmpeg=str(tmp_path / "no-ffmpeg")))
    with pytest.raises(DriverError, match=r"install ffmpeg \(apt install ffmpeg\)"):
        driver.run(lambda scan: None, threading.Event(), DriverState("cam", "camera"))
    video = write_video(tmp_path / "x.mkv", [blank()])
    with pytest.raises(DriverError, match="apt install ffmpeg"):
        list(decode_files([video], ffmpeg=str(tmp_path / "no-ffmpeg")))


def test_unreadable_file_reports_what_ffmpeg_said(tmp_path):
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(DriverError, match="ffmpeg exited with status") as raised:
        scans_from(junk)
    assert not isinstance(raised.value, DeviceGone)  # a bad file, not an unplugged camera
    assert "Invalid data found when processing input" in str(raised.value)


class Y4mWriter(threading.Thread):
    """Streams a QR as an endless 'camera' into a FIFO, as YUV4MPEG (ffmpeg probes it)."""

    def __init__(self, fifo: Path):
        super().__init__(daemon=True)
        self.fifo = fifo
        self.image = frame(qr("DEMO-0007")).tobytes()

    def run(self) -> None:
        try:
            with open(self.fifo, "wb") as out:
                out.write(f"YUV4MPEG2 W{W} H{H} F{FPS}:1 Ip A1:1 Cmono\n".encode())
                while True:
                    out.write(b"FRAME\n" + self.image)
        except (BrokenPipeError, OSError):
            pass  # ffmpeg went away: that is the point of the test


def run_in_thread(driver: CameraScanner, stop: threading.Event, first_scan: threading.Event):
    errors: list[BaseException] = []

    def target() -> None:
        try:
            driver.run(lambda scan: first_scan.set(), stop, DriverState("cam", "camera"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


def test_stopping_a_streaming_driver_leaves_no_ffmpeg_child(tmp_path):
    fifo = tmp_path / "camera.fifo"
    os.mkfifo(fifo)
    writer = Y4mWriter(fifo)
    writer.start()
    driver = CameraScanner("cam", settings(fifo))
    stop, first_scan = threading.Event(), threading.Event()
    thread, errors = run_in_thread(driver, stop, first_scan)

    assert first_scan.wait(30), "no scan from the streaming FIFO"
    running = ffmpeg_children()
    assert len(running) == 1  # the check below can see ffmpeg when there is one

    stop.set()
    driver.close()  # what Supervisor.stop does
    thread.join(30)
    assert not thread.is_alive()
    assert errors == []
    assert not ffmpeg_children()  # no zombie: it was reaped
    assert not any(Path(f"/proc/{pid}").exists() for pid in running)  # no orphan
    writer.join(30)


def test_stopping_a_driver_whose_ffmpeg_is_stuck_opening_its_input_reaps_it(tmp_path):
    # A FIFO without a writer blocks ffmpeg inside open(), where SIGTERM does not end
    # it: the driver must escalate to SIGKILL and still reap it.
    fifo = tmp_path / "silent.fifo"
    os.mkfifo(fifo)
    driver = CameraScanner("cam", settings(fifo))
    stop, first_scan = threading.Event(), threading.Event()
    thread, errors = run_in_thread(driver, stop, first_scan)
    for _ in range(300):
        if ffmpeg_children():
            break
        threading.Event().wait(0.05)
    running = ffmpeg_children()
    assert len(running) == 1

    stop.set()
    driver.close()
    thread.join(30)
    assert not thread.is_alive()
    assert errors == []
    assert not ffmpeg_children()
    assert not any(Path(f"/proc/{pid}").exists() for pid in running)


# --- end to end: redeemd run with a camera scanner -------------------------------------


def test_redeemd_run_with_a_camera_accepts_a_demo_code_shown_to_it(loaded_box, tmp_path):
    demo1, demo2 = frame(qr("DEMO-0001")), frame(qr("DEMO-0002"), noise=10)
    video = write_video(
        tmp_path / "counter.mp4",
        [blank()] * 5 + [demo1] * 25 + [blank()] * 5 + [demo2] * 10 + [blank()] * 5,
        codec="libx264",
    )
    box = write_box(
        loaded_box.dir,
        loaded_box.keyset,
        extra=f"""
[[scanner]]
type = "camera"
name = "counter-cam"
device = "{video}"
width = {W}
height = {H}
fps = {FPS}
""",
    )
    assert [s.type for s in box.config.scanners] == ["camera"]  # the block parsed as a scanner

    ran = box.cli("run", "--json", timeout=120)
    assert ran.returncode == 0, ran.stderr.decode()
    verdicts = read_json_lines(ran.stdout)
    assert [v["verdict"] for v in verdicts] == ["accepted", "accepted"]
    assert [v["card_id"] for v in verdicts] == [1, 1]
    assert b"DEMO-000" not in ran.stdout  # verdicts carry digests, never the code

    status = json.loads((box.dir / "status.json").read_text())
    (driver,) = status["drivers"]
    assert (driver["name"], driver["kind"], driver["scans"]) == ("counter-cam", "camera", 2)


def test_docstring_examples_hold():
    import doctest

    from drivers import dedupe

    for module in (dedupe, camera):
        failed, _ = doctest.testmod(module)
        assert failed == 0, f"{module.__name__} docstring examples fail"


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_live_camera_faster_than_its_decoder_is_decoded_at_its_newest_frame(tmp_path, decoder):
    # Camera frames come at the camera's pace whatever the decoder does; when it is slower
    # the frames it has no time for are skipped, so what it decodes is what is in front
    # of the camera now. The stand-in "camera" delivers 40 frames at once (ffmpeg decodes
    # a file as fast as it can) and the decoder is made to take 0.2 s a frame: read in
    # step, the code at the end would be reached after 8 s; skipping, after a few frames.
    video = write_video(tmp_path / "live.mkv", [blank()] * 36 + [frame(qr("DEMO-0001"))] * 4)
    fake = script(
        tmp_path / "ffmpeg",
        f'exec "{REAL_FFMPEG}" -hide_banner -loglevel error -nostdin -i "{video}" '
        "-f rawvideo -pix_fmt gray -\n",
    )
    decoded: list[int] = []
    copies: list[bool] = []

    class Slow(DECODERS[decoder]):  # type: ignore[misc,valid-type]
        def decode(self, image):
            decoded.append(int(image.mean()))
            copies.append(image.flags.owndata)  # a view of the reader's buffer, not a copy
            time.sleep(0.2)
            return super().decode(image)

    node = Path("/dev/null")  # a /dev path is a live camera to the driver
    driver = CameraScanner("cam", settings(node, ffmpeg=fake), make_decoder=Slow)
    scans: list[Scan] = []
    state = DriverState("cam", "camera")
    with pytest.raises(DriverError):  # a live stream that ends is a failure, as for a camera
        driver.run(scans.append, threading.Event(), state)
    assert codes(scans) == [QR_SCAN]
    assert len(decoded) < 10  # 40 frames delivered; most of the blank ones skipped
    assert not any(copies)


def test_a_camera_failing_the_same_way_is_logged_once_and_status_keeps_the_cause(tmp_path, caplog):
    fake = script(
        tmp_path / "ffmpeg", 'echo "/dev/null: Permission denied" >&2\nexit 1\n'
    )  # what ffmpeg says for a camera the user may not open
    driver = CameraScanner("cam", settings("/dev/null", ffmpeg=fake))
    supervisor = Supervisor(driver, lambda scan: None, initial_backoff=0.01, max_backoff=0.02)
    with caplog.at_level(logging.WARNING, logger="redeemd.drivers"):
        supervisor.start()
        try:
            wait_for(lambda: supervisor.state.restarts >= 5, "five retries")
            # Between retries too: the cause, not "waiting for the first frame".
            for _ in range(20):
                assert "Permission denied" in supervisor.state.message
                assert supervisor.state.state == "error"
        finally:
            assert supervisor.stop(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if "scanner cam" in r.getMessage()]
    assert len(warnings) == 1 and "Permission denied" in warnings[0], warnings


def test_a_live_cameras_reader_threads_are_owned_not_daemon_threads_and_end_with_the_run(
    tmp_path,
):
    video = write_video(tmp_path / "live.mkv", [blank()] * 3 + [frame(qr("DEMO-0001"))] * 3)
    fake = script(
        tmp_path / "ffmpeg",
        f'exec "{REAL_FFMPEG}" -hide_banner -loglevel error -nostdin -i "{video}" '
        "-f rawvideo -pix_fmt gray -\n",
    )
    seen: dict[str, bool] = {}

    class Looking(camera.ZbarDecoder):
        """zbar, noting the driver's threads while it decodes."""

        def decode(self, image):
            for thread in threading.enumerate():
                if thread.name in ("camera-cam", "ffmpeg-stderr"):
                    seen[thread.name] = thread.daemon
            return super().decode(image)

    node = Path("/dev/null")  # a /dev path is a live camera to the driver
    driver = CameraScanner("cam", settings(node, ffmpeg=fake), make_decoder=Looking)
    with pytest.raises(DriverError):  # a live stream that ends is a failure
        driver.run(lambda scan: None, threading.Event(), DriverState("cam", "camera"))
    # The interpreter kills a daemon thread wherever it is at exit; these are joined.
    assert seen == {"camera-cam": False, "ffmpeg-stderr": False}
    names = {thread.name for thread in threading.enumerate()}
    assert not names & {"camera-cam", "ffmpeg-stderr"}
