"""Several scanners of different kinds in one `redeemd run`: a serial scanner on a real
pseudo-terminal, a camera reading a real video through ffmpeg, and a FIFO the POS
machine writes to. Each read is decided once, credited to its own scanner, and each
scanner's count and state are in `redeemd status`."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from conftest import Box, wait_for
from ptys import Pty
from test_camera import blank, camera_tools, frame, qr, write_video  # noqa: F401  (fixture)
from test_service import Daemon, daemons  # noqa: F401  (fixture)


def _drivers(box: Box) -> dict[str, dict]:
    status = json.loads(box.cli("status", "--json").stdout)
    return {d["name"]: d for d in status.get("drivers", [])}


def test_serial_camera_and_fifo_scanners_read_side_by_side(
    loaded_box: Box,
    daemons,  # noqa: F811
    tmp_path: Path,
):
    pty = Pty()
    video = write_video(
        tmp_path / "counter-cam.mkv", [blank()] * 3 + [frame(qr("DEMO-0002"))] * 6 + [blank()] * 3
    )
    fifo = tmp_path / "pos.fifo"
    os.mkfifo(fifo)
    with loaded_box.config_path.open("a") as config:
        config.write(
            f'\n[[scanner]]\ntype = "serial"\nname = "counter"\nport = "{pty.path}"\n'
            f'\n[[scanner]]\ntype = "camera"\nname = "cam"\ndevice = "{video}"\n'
            f'\n[[scanner]]\ntype = "stdin"\nname = "pos"\npath = "{fifo}"\n'
        )
    daemon = daemons(loaded_box)
    try:
        # pyserial flushes the input when it opens the port: send once it is open.
        wait_for(
            lambda: _drivers(loaded_box).get("counter", {}).get("state") == "connected",
            "the serial scanner connected",
            every=0.5,
        )
        pty.send(b"DEMO-0001\r")
        # Opening a FIFO for writing waits for its reader, the driver.
        writer = threading.Thread(target=fifo.write_bytes, args=(b"DEMO-0003\n",))
        writer.start()
        verdicts = daemon.wait_verdicts(3)
        writer.join(10)
        assert sorted((v["source"], v["verdict"]) for v in verdicts) == [
            ("cam", "accepted"),
            ("counter", "accepted"),
            ("pos", "accepted"),
        ]

        def camera_done() -> dict[str, dict] | None:
            drivers = _drivers(loaded_box)
            return drivers if drivers.get("cam", {}).get("state") == "ended" else None

        drivers = wait_for(camera_done, "the camera's video read to the end", every=0.5)
        assert {name: d["scans"] for name, d in drivers.items()} == {
            "counter": 1,
            "cam": 1,
            "pos": 1,
        }
        assert drivers["counter"]["state"] == "connected"
        assert daemon.stop() == 0
        assert len(daemon.verdicts) == 3  # the camera's code held in view was one scan
    finally:
        pty.unplug()
