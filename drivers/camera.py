"""Camera scanners: V4L2 webcams (or video and image files) read through ffmpeg, decoded by
zxing-cpp (`drivers.zxing_decoder`) or zbar.

One `ffmpeg` subprocess turns whatever the source delivers (YUYV or MJPEG from a
webcam, H.264 from a file, PNG/JPEG images) into raw 8-bit grayscale frames of exactly
width x height on a pipe::

    ffmpeg -f v4l2 -video_size 640x480 -framerate 10 -i /dev/video0 \\
           -vf scale=...,pad=... -f rawvideo -pix_fmt gray -

Files go through the very same pipe (only the input options differ), so what the tests
decode from a generated video is what the box decodes from its camera. Each frame is
read into one reused buffer, viewed as a C-contiguous 2-D uint8 numpy array without a
copy and handed to the decoder: zxing-cpp reads it in place; zbar-py silently misses
non-contiguous arrays and fails on 3-D ones. `drivers.dedupe` turns the per-frame
decodes into scans.

`CameraScanner.run` wires four jobs, each replaceable on its own: `FfmpegFrames` (the
frame source), a `FrameDecoder` (`ZxingDecoder` or `ZbarDecoder`, as `decoder` in the
settings says; `make_decoder` takes another, one `decode(image)` method), `Deduper`
(codes seen -> new scans) and `_Progress` (the state and the frames/s message `redeemd
status` shows).

Config (a [[scanner]] block with type = "camera"; docs/scanners.md)::

    [[scanner]]
    type = "camera"
    name = "counter-cam"
    device = "/dev/video0"      # or a video file, an image file or a glob of images
    width = 640
    height = 480
    fps = 10
    decoder = "zxing"           # or "zbar"
    symbologies = ["qr", "ean-13", "code128"]   # all 14 by default

A camera whose device node is missing (unplugged, or not plugged in yet) raises
`DeviceGone`, which `redeemd status` shows as `disconnected`; a missing ffmpeg or decoder,
a node that is not a capture device or refused permissions raise `DriverError` (`error`).

`redeemd decode FILE...` uses `decode_files()` to show a technician what the camera
finds in photos taken at the counter: images are read by Pillow, ffmpeg starts only for
video.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import numpy as np

from cards.scan import Scan
from drivers.dedupe import Code, Deduper
from drivers.settings import CameraSettings
from drivers.supervisor import DeviceGone, DriverError, DriverState, Status
from drivers.zxing_decoder import SYMBOLOGIES, Read, ZxingDecoder, check_symbologies, ean13_form
from runtime.threads import OwnedThread

if TYPE_CHECKING:
    import PIL.Image

log = logging.getLogger("redeemd.drivers.camera")

INSTALL_FFMPEG = "install ffmpeg (apt install ffmpeg)"
INSTALL_ZBAR = "install zbar-py (pip install 'redeemd[drivers]'; it bundles libzbar)"
INSTALL_PILLOW = "install Pillow (pip install 'redeemd[drivers]')"

STOP_POLL = 0.5
"""How often a read waiting for a frame looks at the stop flag."""

RATE_EVERY = 10.0
"""How often, in seconds, the scanner's state message gives the frames decoded a second."""


def is_camera(device: str) -> bool:
    """True for a V4L2 device node; anything else is a file (video, image or glob)."""
    return device.startswith("/dev/")


def ffmpeg_command(
    binary: str, device: str, width: int, height: int, fps: int, input_format: str = ""
) -> list[str]:
    """The ffmpeg command line that delivers `device` as raw gray frames of width x height.

    >>> ffmpeg_command("ffmpeg", "/dev/video0", 640, 480, 10)[5:13]
    ['-f', 'v4l2', '-video_size', '640x480', '-framerate', '10', '-i', '/dev/video0']
    """
    # -nostdin: ffmpeg would otherwise read commands ('q') from our stdin.
    command = [binary, "-hide_banner", "-nostdin", "-loglevel", "error"]
    if is_camera(device):
        command += ["-f", "v4l2", "-video_size", f"{width}x{height}", "-framerate", str(fps)]
        if input_format:
            command += ["-input_format", input_format]
    elif glob.has_magic(device):
        command += ["-f", "image2", "-pattern_type", "glob", "-framerate", str(fps)]
    command += ["-i", device]
    # The frame size must be exactly what we read, whatever the source delivers: a V4L2
    # driver may silently pick another resolution than the one asked for, and a file
    # has its own. Scaling keeps the aspect ratio and pads with white, which also gives
    # a code at the edge of a photo its quiet zone.
    filters = (
        f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
        f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:white"
    )
    if not is_camera(device):
        # Files decode as fast as the CPU allows, so their time is the frame index / fps:
        # resample them to the configured rate. eof_action=pass keeps a single image,
        # which would otherwise end before the first output tick and give no frame.
        filters = f"fps={fps}:eof_action=pass,{filters}"
    return [*command, "-vf", filters, "-f", "rawvideo", "-pix_fmt", "gray", "-"]


def find_ffmpeg(binary: str = "ffmpeg") -> str:
    path = shutil.which(binary)
    if path is None:
        raise DriverError(f"ffmpeg not found (looked for {binary!r}): {INSTALL_FFMPEG}")
    return path


def zbar_scanner():
    """A zbar-py Scanner with every symbology enabled except the ISBN and UPC-A views of
    EAN-13 (libzbar's other defaults, position recording included, are kept)."""
    try:
        import zbar
    except (ImportError, OSError, RuntimeError) as exc:
        raise DriverError(f"zbar is not usable ({exc}): {INSTALL_ZBAR}") from None
    # zbar reports an EAN-13 starting 978/979 as an ISBN with other digits (9780201379624
    # becomes ISBN-10 0201379627), while a serial or HID scanner sends all 13 digits: the
    # same card would be two codes. With ISBN off zbar reports it as the EAN-13 it is.
    # Likewise a UPC-A is an EAN-13 with a leading 0: with UPC-A on, zbar drops the 0
    # (0036000291452 becomes 036000291452), where ]E0, the AIM identifier recorded
    # for both, means the 13 digits. Order matters: ZBAR_NONE applies to every
    # symbology, so it comes first.
    return zbar.Scanner(
        [
            ("ZBAR_NONE", "ZBAR_CFG_ENABLE", 1),
            ("ZBAR_ISBN10", "ZBAR_CFG_ENABLE", 0),
            ("ZBAR_ISBN13", "ZBAR_CFG_ENABLE", 0),
            ("ZBAR_UPCA", "ZBAR_CFG_ENABLE", 0),
        ]
    )


# zbar's symbology names -> the config name (drivers.zxing_decoder.SYMBOLOGIES) and the
# AIM identifier (ISO/IEC 15424) a hardware scanner sends for the same symbol in its plain
# form. zbar reports no modifiers (a GS1-128 is "CODE-128" like any other), so these are
# the plain ones; zxing-cpp reports the real ones. What is missing here (zbar's DataBar)
# is not among the symbologies the camera reads.
ZBAR_SYMBOLOGIES = {
    "QR-Code": ("qr", "]Q1"),
    "EAN-13": ("ean-13", "]E0"),
    "UPC-E": ("upc-e", "]E0"),
    "EAN-8": ("ean-8", "]E4"),
    "CODE-128": ("code128", "]C0"),
    "CODE-39": ("code39", "]A0"),
    "CODE-93": ("code93", "]G0"),
    "I2/5": ("itf", "]I0"),
    "Codabar": ("codabar", "]F0"),
}
AIM_IDENTIFIERS = {name: aim for name, (_, aim) in ZBAR_SYMBOLOGIES.items()}
"""zbar's raw names (what `decode_frame` gives) -> AIM identifiers."""


def decode_frame(scanner, image: np.ndarray) -> set[tuple[str, bytes]]:
    """(symbology, data) of every code zbar finds in one 2-D uint8 frame."""
    # zbar-py reads the raw buffer: a strided view (a crop, a transposed or 3-D array)
    # would be scanned as garbage or rejected, so insist on the layout it needs.
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"a frame must be 2-D grayscale, got shape {image.shape}")
    return {(symbol.type, symbol.data) for symbol in scanner.scan(image)}


# "[png @ 0x5571df8890c0] Invalid PNG signature": the address tells a technician nothing
# and makes repeats of one message look different.
_CONTEXT = re.compile(r"^\[([^\]@]+?) @ 0x[0-9a-fA-F]+\]\s*")


class _StderrTail:
    """Drains ffmpeg's stderr in a thread, keeping its last lines for error messages.

    Without a reader, an ffmpeg that logs a lot (a flaky camera logs a line per corrupt
    frame) would fill the pipe and block, and the camera would look hung."""

    def __init__(self, stream: IO[bytes], keep: int = 20):
        self.lines: deque[str] = deque(maxlen=keep)
        self._stream = stream
        self._thread = OwnedThread("ffmpeg-stderr", self._drain)
        self._thread.start()

    def _drain(self) -> None:
        for raw in self._stream:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self.lines.append(line)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def summary(self, count: int = 3) -> str:
        """ffmpeg's last `count` different lines, joined with "; ".

        Its last line alone is often a consequence ("Error marking filters as finished")
        while the cause ("Invalid data found when processing input") comes just before.
        A line another kept line contains ("/dev/video0: No such file or directory"
        after "Cannot open video device /dev/video0: No such file or directory") is left
        out."""
        kept: list[str] = []
        for line in reversed(self.lines):
            line = _CONTEXT.sub(lambda m: f"{m.group(1)}: ", line)
            if any(line in other for other in kept):
                continue
            kept = [other for other in kept if other not in line]
            kept.insert(0, line)
            if len(kept) == count:
                break
        return "; ".join(kept) if kept else "(no message)"


def _stop_process(process: subprocess.Popen, timeout: float = 2.0) -> None:
    """Terminate ffmpeg if it still runs and always reap it: no zombie, no orphan."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Blocked in a driver ioctl or in open() on a FIFO: SIGTERM is not enough.
            process.kill()
            process.wait()


class FrameDecoder(Protocol):
    """Finds the codes in one frame: `ZxingDecoder` (drivers/zxing_decoder.py) or
    `ZbarDecoder`; another decoder goes behind the same method, and nothing else in the
    driver changes."""

    def decode(self, image: np.ndarray) -> set[Code]:
        """(AIM identifier, data) of every code in a 2-D uint8 frame: what the ledger
        records and what a hardware scanner sends (docs/scanners.md, "What the camera
        sends"). `drivers.dedupe` decides by the identifier which codes need several
        sightings."""
        ...


class ZbarDecoder:
    """zbar-py with the driver's configuration (`zbar_scanner`) as a `FrameDecoder`,
    reading the switched-on `symbologies` that zbar knows, by the same rules as
    `ZxingDecoder` where zbar allows (UPC-A/UPC-E as EAN-13). Raises DriverError when
    zbar is not usable."""

    def __init__(self, symbologies: Iterable[str] = tuple(SYMBOLOGIES)) -> None:
        self.symbologies = frozenset(check_symbologies(symbologies))
        self._scanner = zbar_scanner()

    def reads(self, image: np.ndarray) -> list[Read]:
        """Every code zbar finds in a 2-D uint8 frame, as `Read`s."""
        reads = []
        for name, data in sorted(decode_frame(self._scanner, image)):
            if name not in ZBAR_SYMBOLOGIES:
                continue
            symbology, aim = ZBAR_SYMBOLOGIES[name]
            if symbology == "ean-13" and data.startswith(b"0"):
                symbology = "upc-a"  # zbar's UPC-A view is off: it reports EAN-13
            if symbology not in self.symbologies:
                continue
            if symbology == "upc-e":
                data = ean13_form(data.decode("ascii")).encode("ascii")
            reads.append(Read(symbology, aim, data))
        return reads

    def decode(self, image: np.ndarray) -> set[Code]:
        return {(read.aim, read.data) for read in self.reads(image)}


def make_decoder_for(settings: CameraSettings) -> ZxingDecoder | ZbarDecoder:
    """The decoder `settings.decoder` names, reading `settings.symbologies`."""
    if settings.decoder == "zbar":
        return ZbarDecoder(settings.symbologies)
    return ZxingDecoder(settings.symbologies)


class CameraScanner:
    """A camera (or a video or image file) as a scanner: frames from ffmpeg
    (`FfmpegFrames`), codes from a `FrameDecoder`, scans from `Deduper`, and what the
    scanner's state shows from `_Progress`. `make_decoder` (by default the decoder the
    settings name) is called on every start."""

    kind = "camera"

    def __init__(
        self,
        name: str,
        settings: CameraSettings | Mapping[str, object],
        make_decoder: Callable[[], FrameDecoder] | None = None,
    ):
        self.name = name
        # Keys and defaults: drivers/settings.py. Read from here, not copied: one source.
        self.settings = s = CameraSettings.of(settings)
        self.make_decoder = make_decoder or (lambda: make_decoder_for(s))
        self._frames: FfmpegFrames | None = None
        self._lock = threading.Lock()

    def command(self) -> list[str]:
        s = self.settings
        return ffmpeg_command(s.ffmpeg, s.device, s.width, s.height, s.fps, s.input_format)

    def run(self, emit: Callable[[Scan], None], stop: threading.Event, state: DriverState) -> None:
        s = self.settings
        decoder = self.make_decoder()
        command = self.command()
        command[0] = find_ffmpeg(s.ffmpeg)
        deduper = Deduper(s.rescan_after, s.min_sightings_1d)
        # After the checks above: a box without ffmpeg or its decoder needs fixing (error)
        # whether or not its camera is plugged in.
        shape = (s.height, s.width)
        frames = FfmpegFrames(self.name, s.device, command, shape, s.fps, stop, s.no_frame_timeout)
        with self._lock:
            self._frames = frames
        progress = _Progress(state, s.device, s.width, s.height)
        try:
            while not stop.is_set() and (image := frames.next()) is not None:
                progress.frame(frames.skipped)
                for aim, data in deduper.feed(decoder.decode(image), frames.time()):
                    emit(Scan(code=data, source=self.name, symbology=aim, at=time.time()))
            if not stop.is_set():
                frames.ended()
        finally:
            with self._lock:
                self._frames = None
            frames.close()

    def feedback(self, accepted: bool) -> None:
        pass  # a webcam has no beeper; the POS shows the verdict

    def close(self) -> None:
        # Called from the service thread. Ending ffmpeg closes the pipe, so a read in
        # progress returns at once; run() reaps the process in its finally block.
        with self._lock:
            frames = self._frames
        if frames is not None:
            frames.terminate()


class _Progress:
    """What the scanner's state says while frames come: `connected` from the first frame
    on, and every RATE_EVERY seconds how many frames a second are decoded."""

    def __init__(self, state: DriverState, device: str, width: int, height: int):
        self._state = state
        self._what = f"{device} {width}x{height}"
        self._connected = False
        self._frames = 0
        self._since = time.monotonic()
        if state.state is Status.STARTING:
            # On a retry the state keeps saying why the last attempt failed until a
            # frame arrives: that is what a technician needs to read.
            state.message = f"waiting for the first frame from {device}"

    def frame(self, skipped: int | None) -> None:
        """One more frame is about to be decoded; `skipped` counts those dropped so far."""
        if not self._connected:
            self._connected = True
            self._state.state = Status.CONNECTED
            self._state.message = ""
        self._frames += 1
        elapsed = time.monotonic() - self._since
        if elapsed >= RATE_EVERY:
            note = f", {skipped} skipped in all" if skipped is not None else ""
            rate = self._frames / elapsed
            self._state.message = f"{self._what}, {rate:.1f} frames/s decoded{note}"
            self._since, self._frames = time.monotonic(), 0


class FfmpegFrames:
    """The frames of one ffmpeg run, each a 2-D uint8 array of the configured size.

    A live camera's frames are read in a thread of their own and `next` gives the newest
    (`_NewestFrame`); a file's are read in turn, every one of them. `ended` says why the
    stream ended (it raises unless a file was read to its end) and `close`, called in
    every case, stops ffmpeg and reaps it. `terminate` may be called from another thread.
    """

    def __init__(
        self,
        name: str,
        device: str,
        command: list[str],
        shape: tuple[int, int],
        fps: int,
        stop: threading.Event,
        no_frame_timeout: float,
    ):
        self.name = name
        self.device = device
        self.live = is_camera(device)
        self.count = 0
        self._fps = fps
        self._stop = stop
        if self.live and not os.path.exists(device):
            raise DeviceGone(
                f"camera {device} is not there (unplugged? wrong number?); "
                "`redeemd devices` lists the cameras on this box"
            )
        try:
            # Own session: a Ctrl-C in the terminal reaches redeemd, which stops ffmpeg
            # in order, instead of killing ffmpeg under a running driver. If redeemd dies
            # outright, ffmpeg gets EPIPE on its next frame and exits by itself.
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                start_new_session=True,
            )
        except OSError as exc:
            raise DriverError(f"cannot start {command[0]}: {exc}; {INSTALL_FFMPEG}") from None
        log.debug("scanner %s: %s", name, " ".join(command))
        self._process = process
        assert process.stdout is not None and process.stderr is not None
        self._stdout = stdout = process.stdout
        self._stderr = _StderrTail(process.stderr)
        self._newest: _NewestFrame | None = None
        if self.live:
            timeout = no_frame_timeout
            self._newest = _NewestFrame(
                shape, lambda view: read_frame(stdout, view, stop, timeout, device), name
            )
        else:
            # A file has no "now": every frame is decoded, in order. One buffer for every
            # frame; `_whole` is a 2-D view of it, so reading a frame into the buffer is
            # the only copy between the pipe and the decoder.
            buffer = bytearray(shape[0] * shape[1])
            self._view = memoryview(buffer)
            self._whole = np.frombuffer(buffer, dtype=np.uint8).reshape(shape)

    def next(self) -> np.ndarray | None:
        """The next frame, valid until the following call; None at the end or on stop."""
        if self._newest is not None:
            image = self._newest.take(self._stop)
        elif read_frame(self._stdout, self._view, self._stop):
            image = self._whole
        else:
            image = None
        if image is not None:
            self.count += 1
        return image

    def time(self) -> float:
        """When the last frame was taken, in seconds: now for a camera, its place in a file."""
        return time.monotonic() if self.live else (self.count - 1) / self._fps

    @property
    def skipped(self) -> int | None:
        """Frames of a live camera dropped because the decoder was busy; None for a file."""
        return self._newest.skipped if self._newest is not None else None

    def ended(self) -> None:
        """After `next` gave None without a stop: log a file read to its end, or raise
        the error that says why the stream ended (from ffmpeg's status and stderr)."""
        # The pipe ended: ffmpeg has exited or is about to. Its status says why.
        try:
            status = self._process.wait(5)
        except subprocess.TimeoutExpired:
            status = None
        self._stderr.join(1.0)
        if status == 0 and not self.live:
            log.info("scanner %s: %s: %d frames read", self.name, self.device, self.count)
            return
        raise self._failure(status, self._stderr.summary())

    def terminate(self) -> None:
        """Ask ffmpeg to end, which ends the stream; `close` still has to be called."""
        if self._process.poll() is None:
            self._process.terminate()

    def close(self) -> None:
        _stop_process(self._process)
        # The reader ends at the pipe's end, then its pipe may close; closed under a
        # reader still inside read(), the descriptor could be reused by the next
        # ffmpeg's pipe. A stuck reader keeps the pipe (OwnedThread logs it by name).
        if self._newest is None or self._newest.join(2.0):
            self._stdout.close()
        else:
            log.error("scanner %s: frame reader did not end; leaving its pipe open", self.name)
        self._stderr.join(2.0)
        self._process.stderr.close()  # type: ignore[union-attr]

    def _failure(self, status: int | None, said: str) -> DriverError:
        """The error for an ffmpeg that ended; `said` is the end of its stderr."""
        if status is None:
            what = "ffmpeg stopped sending frames"
        elif status == 0:
            what = "the camera stream ended"
        else:
            what = f"ffmpeg exited with status {status}"
        message = f"camera {self.device}: {what}: {said}"
        # Unplugged while streaming, V4L2 answers ENODEV ("No such device"); udev may
        # remove the node only after ffmpeg has exited, so either sign means gone.
        if self.live and (
            not os.path.exists(self.device)
            or "No such device" in said
            or "No such file or directory" in said
        ):
            return DeviceGone(
                message + " (is the camera plugged in? `redeemd devices` lists cameras)"
            )
        if "Permission denied" in said:
            message += " (add the redeemd user to the 'video' group)"
        elif "Inappropriate ioctl" in said or "Not a video capture" in said:
            message += " (this node is not a capture device; a UVC camera's capture node is usually the lower /dev/videoN)"
        return DriverError(message)


def read_frame(
    stream: IO[bytes],
    view: memoryview,
    stop: threading.Event,
    no_frame_timeout: float | None = None,
    device: str = "",
) -> bool:
    """Fill `view` with exactly one frame. False at the end of the stream or on stop.

    With `no_frame_timeout` (a live camera), raises DriverError when no byte came for
    that long; a file's ffmpeg may take as long as it needs."""
    filled, size = 0, len(view)
    waiting_since = time.monotonic()
    fd = stream.fileno()
    while filled < size:
        # select() first so that a camera that stops sending cannot hold the thread
        # past a stop request or unnoticed forever.
        ready, _, _ = select.select([fd], [], [], STOP_POLL)
        if stop.is_set():
            return False
        if not ready:
            if no_frame_timeout is not None and time.monotonic() - waiting_since > no_frame_timeout:
                raise DriverError(
                    f"camera {device} delivered no frame for "
                    f"{no_frame_timeout:g} s; restarting it "
                    "(check the USB cable and `redeemd devices`)"
                )
            continue
        # The pipe hands over at most 64 KiB at a time: a frame takes several reads.
        count = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not count:
            return False  # a partial frame at the end is dropped
        filled += count
    return True


class _NewestFrame:
    """A live camera's frames, read in a thread of their own; `take` gives the newest.

    When zbar takes longer than a frame period (a grainy picture, a slow box), frames
    read in step with decoding would queue up in ffmpeg and in the kernel's capture
    buffers (uvcvideo keeps up to 32), and each decode would show the counter as it was
    seconds ago: the customer's phone long gone, its code read late or never. Here the
    frames zbar has no time for are skipped (counted in `skipped`), and what it decodes
    is at most one frame old. Three buffers: one being filled, the newest complete one,
    the one being decoded.
    """

    def __init__(self, shape: tuple[int, int], read_frame: Callable[[memoryview], bool], name: str):
        size = shape[0] * shape[1]
        buffers = [bytearray(size) for _ in range(3)]
        self._images = {id(b): np.frombuffer(b, dtype=np.uint8).reshape(shape) for b in buffers}
        self._free = buffers
        self._newest: bytearray | None = None
        self._decoding: bytearray | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self.skipped = 0
        self._thread = OwnedThread(f"camera-{name}", lambda: self._read(read_frame))
        self._thread.start()

    def _read(self, read_frame: Callable[[memoryview], bool]) -> None:
        with self._changed:
            filling = self._free.pop()
        try:
            while read_frame(memoryview(filling)):
                with self._changed:
                    if self._newest is not None:
                        self.skipped += 1
                        self._free.append(self._newest)
                    self._newest, filling = filling, self._free.pop()
                    self._changed.notify()
        except BaseException as exc:  # the no-frame timeout: raised again by `take`
            self._error = exc
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify()

    def take(self, stop: threading.Event) -> np.ndarray | None:
        """The newest frame not yet taken, waiting for one; None at the end of the
        stream or on stop. The frame stays valid until the next call."""
        with self._changed:
            while self._newest is None:
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    return None
                if stop.is_set():
                    return None
                self._changed.wait(STOP_POLL)
            if self._decoding is not None:
                self._free.append(self._decoding)
            self._decoding, self._newest = self._newest, None
            return self._images[id(self._decoding)]

    def join(self, timeout: float) -> bool:
        """Wait for the reader to end; False if it has not."""
        return self._thread.join(timeout)


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def _read_pgm(stream: IO[bytes]) -> np.ndarray | None:
    """One binary PGM ("P5") image from `stream`, as ffmpeg's pgm encoder writes it; None at EOF."""
    tokens: list[bytes] = []
    token = b""
    while len(tokens) < 4:
        byte = stream.read(1)
        if not byte:
            return None
        if byte.isspace():
            if token:
                tokens.append(token)
                token = b""
        else:
            token += byte
    # The single whitespace after maxval was consumed by the loop above.
    magic, width, height, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    if magic != b"P5" or maxval > 255:
        raise ValueError(f"unexpected image stream from ffmpeg: {magic!r} maxval {maxval}")
    data = _read_exact(stream, width * height)
    if data is None:
        return None
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width)


@dataclass(frozen=True)
class FileReads:
    """What `decode_files` found in one file: its distinct codes, or why it was not read."""

    path: str
    reads: tuple[Read, ...]
    error: str | None = None


def decode_files(
    paths: Iterable[str | os.PathLike[str]],
    decoder: ZxingDecoder | ZbarDecoder | None = None,
    ffmpeg: str = "ffmpeg",
) -> Iterator[FileReads]:
    """The distinct codes in each image or video file, in the order given.

    Images (any format Pillow reads: PNG, JPEG, WebP, BMP, TIFF, GIF ...) are read at their
    own size in this process: 50 photos take well under a second. Anything Pillow does not
    recognise is handed to ffmpeg and decoded frame by frame as a video; ffmpeg is looked
    for only then, so checking photos needs no ffmpeg. A file that cannot be read gets an
    `error`. The decoder is the camera's default (zxing-cpp, every symbology)::

        >>> for found in decode_files(["counter.png"]):  # doctest: +SKIP
        ...     print(found.path, [(r.symbology, r.aim, r.data) for r in found.reads])
        counter.png [('qr', ']Q1', b'DEMO-0001')]

    Raises DriverError when the decoder, Pillow, or (for a video) ffmpeg is missing.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise DriverError(f"Pillow is not usable ({exc}): {INSTALL_PILLOW}") from None
    reader = decoder if decoder is not None else ZxingDecoder()
    for path in paths:
        name = str(path)
        if Path(name).is_dir():
            example = Path(name) / "*.png"
            yield FileReads(name, (), f"is a directory; give the image files in it, e.g. {example}")
            continue
        if not Path(name).is_file():
            yield FileReads(name, (), "no such file")
            continue
        try:
            picture = Image.open(name)
        except UnidentifiedImageError:
            yield _decode_video(name, reader, find_ffmpeg(ffmpeg))
            continue
        except OSError as exc:
            yield FileReads(name, (), f"cannot read it: {exc}")
            continue
        try:
            with picture:
                found: dict[tuple[str, bytes], Read] = {}
                for image in _grey_frames(picture):
                    for read in reader.reads(image):
                        found.setdefault((read.aim, read.data), read)
        except (OSError, ValueError) as exc:  # a truncated or corrupt image
            yield FileReads(name, (), f"cannot read it: {exc}")
            continue
        yield FileReads(name, tuple(found.values()))


def _grey_frames(picture: PIL.Image.Image) -> Iterator[np.ndarray]:
    """Each frame of an image (one, or several in an animated GIF/WebP) as 8-bit grey.
    Transparent parts become white, as on a screen: a QR code drawn on a transparent
    background would otherwise be black on black."""
    from PIL import Image

    for index in range(getattr(picture, "n_frames", 1)):
        picture.seek(index)
        frame = picture
        if frame.mode in ("RGBA", "LA", "PA") or "transparency" in frame.info:
            rgba = frame.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            frame = Image.alpha_composite(white, rgba)
        yield np.asarray(frame.convert("L"))


def _decode_video(name: str, reader: ZxingDecoder | ZbarDecoder, binary: str) -> FileReads:
    """The distinct codes in any frame of a video file, decoded by ffmpeg at its own size."""
    # Each frame as a binary PGM at its own size, one after another.
    command = [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", name]
    command += ["-f", "image2pipe", "-c:v", "pgm", "-pix_fmt", "gray", "-"]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = _StderrTail(process.stderr)
    found: dict[tuple[str, bytes], Read] = {}
    try:
        while (image := _read_pgm(process.stdout)) is not None:
            for read in reader.reads(image):
                found.setdefault((read.aim, read.data), read)
        process.wait(10)
    finally:
        _stop_process(process)
        process.stdout.close()
        stderr.join(2.0)
        process.stderr.close()
    if process.returncode not in (0, None) and not found:
        return FileReads(name, (), f"ffmpeg cannot read it: {stderr.summary()}")
    return FileReads(name, tuple(found.values()))
