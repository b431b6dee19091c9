"""Log lines for journald or a terminal.

Under systemd, stderr is a stream into the journal and $JOURNAL_STREAM names it
(device:inode). Then each line starts with its syslog priority, `<4>` for a warning,
as sd-daemon(3) describes, so `journalctl -u redeemd -p warning` finds the problems
and the journal does not repeat the level word. In a terminal the level is spelled
out. Either way one event is one line: `LEVEL logger: message`. Messages never carry
a plaintext code (the engine logs digest prefixes only).

    >>> setup(verbose=False)
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        # A traceback is several lines: each needs the prefix, or the journal files
        # the continuation lines as separate info messages.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def to_journal(stream: TextIO) -> bool:
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup(verbose: bool, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    if to_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
