"""Which of the codes a camera sees in each frame are new scans: zbar-style de-duplication.

A camera sees the same code in every frame for as long as it is held up, so the raw
decode stream is "A A A A - - A A ..." at 10-30 frames a second. A person means one
scan by it. The rules, as zbar's own inter-frame cache applies them:

* A code held in view is one scan. It scans again only after it has been *out of view*
  for `rescan_after` seconds; a few frames in which zbar misses a code that is still
  there (motion blur, a reflection) do not end the sighting.
* 1-D symbologies (EAN, UPC, Code 128, Code 39, I2/5 ...) count only after
  `min_sightings_1d` consistent sightings: a single scanline across a photo, a shelf
  label or a blurred code can produce a wrong read that still passes the check digit,
  but not the same wrong read in consecutive frames. 2-D codes (QR) carry Reed-Solomon
  error correction and count on their first sighting.

Pure: no clock, no camera. The caller passes the frame time (monotonic seconds for a
camera, frame index / fps for a file)::

    >>> d = Deduper(rescan_after=2.0, min_sightings_1d=2)
    >>> d.feed({("]Q1", b"DEMO-0001")}, at=0.0)
    [(']Q1', b'DEMO-0001')]
    >>> d.feed({("]Q1", b"DEMO-0001")}, at=0.1)
    []
    >>> d.feed(set(), at=3.0)     # out of view for longer than rescan_after
    []
    >>> d.feed({("]Q1", b"DEMO-0001")}, at=3.1)
    [(']Q1', b'DEMO-0001')]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

Code = tuple[str, bytes]
"""(symbology, the decoded bytes). The camera's decoders name the symbology by its AIM
identifier ("]Q1", "]E0", "]C1" ...); zbar's own names ("QR-Code") are understood too."""

# Symbologies that carry their own error correction, by the AIM identifier's symbology
# character: QR and Micro QR, Aztec, PDF417, DataMatrix. Everything else the camera
# reads (EAN/UPC, Code 128, Code 39, Code 93, ITF, Codabar) is a 1-D code read along
# scanlines.
TWO_D_AIM = frozenset("QzLd")
# zbar's names for the same (SQ-Code is zbar's own 2-D symbology).
TWO_D = frozenset({"QR-Code", "SQ-Code", "PDF417"})

MAX_TRACKED = 64
"""More distinct codes than this in view at once is a poster, not a customer; the codes
seen longest ago are forgotten first, so memory stays bounded whatever the camera sees."""


@dataclass
class _Sighting:
    last: float
    count: int
    emitted: bool


class Deduper:
    def __init__(
        self, rescan_after: float = 2.0, min_sightings_1d: int = 2, max_tracked: int = MAX_TRACKED
    ):
        if min_sightings_1d < 1 or max_tracked < 1 or rescan_after < 0:
            raise ValueError("min_sightings_1d and max_tracked must be >= 1, rescan_after >= 0")
        self.rescan_after = rescan_after
        self.min_sightings_1d = min_sightings_1d
        self.max_tracked = max_tracked
        # Ordered by last sighting, oldest first: forgetting what has left the view and
        # enforcing the bound both pop from the front.
        self._seen: OrderedDict[Code, _Sighting] = OrderedDict()

    def needed(self, symbology: str) -> int:
        """Consistent sightings a code of this symbology needs before it counts."""
        two_d = symbology in TWO_D or (symbology[:1] == "]" and symbology[1:2] in TWO_D_AIM)
        return 1 if two_d else self.min_sightings_1d

    def feed(self, codes: Iterable[Code], at: float) -> list[Code]:
        """Codes decoded in one frame taken at `at` -> the ones that are new scans now.

        Frames must be fed in time order. A frame with no codes still matters: it is
        what lets a code that has left the view be forgotten.
        """
        self._forget(at)
        new: list[Code] = []
        for code in dict.fromkeys(codes):  # a code printed twice in one frame is one sighting
            sighting = self._seen.pop(code, None)
            if sighting is None:
                sighting = _Sighting(last=at, count=0, emitted=False)
            sighting.count += 1
            sighting.last = at
            self._seen[code] = sighting  # re-inserted at the end: most recently seen
            if not sighting.emitted and sighting.count >= self.needed(code[0]):
                sighting.emitted = True
                new.append(code)
        while len(self._seen) > self.max_tracked:
            self._seen.popitem(last=False)
        return new

    def _forget(self, now: float) -> None:
        # A code not seen for rescan_after has left the view: its next sighting starts
        # afresh, as a new scan (and, for 1-D, a new count of consistent sightings).
        while self._seen:
            code, sighting = next(iter(self._seen.items()))
            if now - sighting.last <= self.rescan_after:
                break
            del self._seen[code]

    def __len__(self) -> int:
        return len(self._seen)
