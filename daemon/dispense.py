"""Dispensing claim codes (派发): what a dispense produced, and how it is shown.

The engine (`Engine.dispense`) picks the grant and counter (`cards.claim_code.choose`)
and commits the `dispense` ledger record under its write lock; only after that COMMIT
does anything here see the claim code (durable before shown: a crash never reuses a
counter, and the quota holds). This module holds the result types, the claim URL, the
QR renderings (SVG, PNG, terminal text, with segno) and the JSON the local API sends.

A claim code is a bearer token until it is claimed, so its text goes only where the
customer must get it: the API answer and `dispensed` event (local socket, as payment
codes), the printer, the `redeemd dispense` output. The ledger, logs, status and the
outbox hold its keyed digest only (`digest_prefix` in words).

    dispensed = engine.dispense(card_id=7, count=1, box_key=key)
    for claim in dispensed.claims:
        claim.url                      # "https://claim.example.com/c/RC1..."
        claim.to_json()                # the API's object, with qr_svg, qr_png_b64, qr_text
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import queue
import struct
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import segno

from cards import claim_code
from cards.grant import Grant, GrantSet
from cards.verdict import Action, Outcome, Reason, Verdict
from drivers.printer import ClaimReceipt, PrinterError, ReceiptPrinter
from runtime.threads import OwnedThread

log = logging.getLogger("redeemd.dispense")

DAY = 86400
QR_ERROR = "m"
"""Error correction M: reads from a screen or a receipt that is a little creased."""


def claim_by(now: int, claim_days: int, grant: Grant) -> int:
    """When the customer must have claimed a code minted `now`: `claim_days` later,
    but no later than the claim service accepts for this grant."""
    return min(now + claim_days * DAY, grant.not_after + claim_code.CLAIM_GRACE, claim_code.MAX_U32)


@dataclass(frozen=True)
class Claim:
    """One claim code, committed in the ledger (verdict.record_id, verdict.box_seq)."""

    verdict: Verdict
    grant_id: str
    counter: int
    claim_by: int
    url: str = field(repr=False)
    """claim_url + the claim code: the customer's link, never logged."""
    card_title: str = ""

    @property
    def card_id(self) -> int:
        assert self.verdict.card_id is not None  # a dispense always names its card
        return self.verdict.card_id

    def qr(self) -> segno.QRCode:
        return segno.make(self.url, error=QR_ERROR, micro=False)

    def to_json(self, qr: segno.QRCode | None = None) -> dict[str, object]:
        """The local API's object for one claim code (docs/local-api.md, `dispense`)."""
        qr = qr or self.qr()
        return {
            "claim_url": self.url,
            "claim_code_digest_prefix": self.verdict.digest_prefix,
            "card_id": self.card_id,
            "card_title": self.card_title,
            "grant_id": self.grant_id,
            "counter": self.counter,
            "record_id": self.verdict.record_id,
            "box_seq": self.verdict.box_seq,
            "claim_by": self.claim_by,
            "claim_by_iso": iso(self.claim_by),
            "qr_svg": qr_svg(qr),
            "qr_png_b64": qr_png_b64(qr),
            "qr_text": qr_text(qr),
        }

    def record_json(self) -> dict[str, object]:
        """What an idempotency key keeps of this claim: no code, only what re-mints it
        (Ed25519 signatures are deterministic: the same fields give the same code)."""
        return {
            "card_title": self.card_title,
            "grant_id": self.grant_id,
            "counter": self.counter,
            "claim_by": self.claim_by,
            "verdict": self.verdict.to_json(),
        }


@dataclass(frozen=True)
class Dispensed:
    """What one dispense request produced: the claims committed, in counter order, and
    the refusal that stopped it short of `count` (also committed, as a `reject` record),
    or a storage error (nothing committed)."""

    claims: tuple[Claim, ...]
    refused: Verdict | None = None

    def record_json(self) -> dict[str, object]:
        return {
            "claims": [c.record_json() for c in self.claims],
            "refused": None if self.refused is None else self.refused.to_json(),
        }

    def describe(self) -> list[str]:
        """Console lines: digest prefixes only, never the code."""
        lines = [
            f"dispensed  card={c.card_id} grant={c.grant_id} counter={c.counter} "
            f"code={c.verdict.digest_prefix} claim_by={iso(c.claim_by)} seq={c.verdict.box_seq}"
            for c in self.claims
        ]
        if self.refused is not None:
            refused = self.refused
            reason = refused.reason.value if refused.reason else "unknown"
            seq = f" seq={refused.box_seq}" if refused.box_seq is not None else ""
            lines.append(
                f"dispense refused: {reason}  card={refused.card_id}{seq} ({refused.detail})"
            )
        return lines


def qr_svg(qr: segno.QRCode) -> str:
    """A standalone SVG document, 4 px per module with the standard 4-module border."""
    out = io.BytesIO()
    qr.save(out, kind="svg", scale=4, xmldecl=False, svgns=True)
    return out.getvalue().decode("utf-8")


def qr_png_b64(qr: segno.QRCode) -> str:
    """A PNG (4 px per module, the standard 4-module border), base64, for an
    <img src="data:image/png;base64,...">."""
    return base64.b64encode(qr_png(qr)).decode("ascii")


def qr_png(qr: segno.QRCode, scale: int = 4, border: int = 4) -> bytes:
    """A 1-bit greyscale PNG of `qr`, written here rather than by segno's writer:
    bench/dispense.py measured segno's PNG at 2.8 ms a code (a Python loop per pixel),
    a fifth of a dispense, against 0.2 ms for this. segno still encodes the symbol and
    writes the SVG. tests/test_dispense_box.py decodes the PNG with zxing-cpp."""
    size = len(qr.matrix) + 2 * border
    width = size * scale
    pad = -width % 8
    light = "1" * (scale * border)
    dark_px, light_px = "0" * scale, "1" * scale
    blank = b"\x00" + int("1" * (width + pad), 2).to_bytes((width + pad) // 8)
    rows = [blank] * (scale * border)
    for row in qr.matrix:
        bits = light + "".join(dark_px if m else light_px for m in row) + light + "1" * pad
        rows += [b"\x00" + int(bits, 2).to_bytes((width + pad) // 8)] * scale
    rows += [blank] * (scale * border)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, width, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 6))
        + chunk(b"IEND", b"")
    )


def qr_text(qr: segno.QRCode) -> str:
    """The QR in half-block characters (two modules per character row), dark on light
    whatever the terminal's colours, for `redeemd dispense` and a POS text screen."""
    matrix = [list(row) for row in qr.matrix]
    border = 2
    size = len(matrix)
    light = [0] * (size + 2 * border)
    rows = [light] * border + [[0] * border + row + [0] * border for row in matrix]
    rows += [light] * border
    if len(rows) % 2:
        rows.append(light)
    # Drawn with the light modules as blocks, so that a dark terminal shows a light
    # symbol with dark modules, which phones read; on a light terminal it is the same.
    glyphs = {(0, 0): "█", (0, 1): "▀", (1, 0): "▄", (1, 1): " "}
    return "\n".join(
        "".join(glyphs[(top, bottom)] for top, bottom in zip(rows[i], rows[i + 1], strict=True))
        for i in range(0, len(rows), 2)
    )


def iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def replayed(record: dict, private_key: bytes, claim_url: str) -> Dispensed:
    """The answer to a retried dispense request, from what its idempotency key kept
    (`Dispensed.record_json`): each code minted again from its grant, counter, card and
    claim_by, which gives the very same code, so nothing is minted twice."""
    claims = []
    for item in record.get("claims", []):
        verdict = verdict_of(item["verdict"])
        assert verdict.card_id is not None
        text = claim_code.mint(
            private_key, item["grant_id"], item["counter"], verdict.card_id, item["claim_by"]
        )
        claims.append(
            Claim(
                verdict,
                item["grant_id"],
                item["counter"],
                item["claim_by"],
                claim_url + text,
                item.get("card_title", ""),
            )
        )
    refused = record.get("refused")
    return Dispensed(tuple(claims), None if refused is None else verdict_of(refused))


def verdict_of(data: dict) -> Verdict:
    """A Verdict from its to_json() form (what an idempotency key kept)."""
    reason = data.get("reason")
    return Verdict(
        Outcome(data["verdict"]),
        Action(data["action"]),
        Reason(reason) if reason else None,
        data.get("detail", ""),
        data.get("digest_prefix", ""),
        data.get("card_id"),
        data.get("card_kind"),
        record_id=data.get("record_id"),
        box_seq=data.get("box_seq"),
        source=data.get("source", ""),
    )


def grants_status(
    grants: GrantSet | None, used: dict[str, int], problem: str = ""
) -> dict[str, object]:
    """The grant set as `redeemd status` and the local API's `status` show it."""
    if grants is None:
        return {"grant_seq": None, "grants": [], "problem": problem or None}
    return {
        "grant_seq": grants.seq,
        "grant_set_created_at": grants.created_at,
        "grants": [
            {**g.to_json(), "used": used.get(g.id, 0), "left": max(g.quota - used.get(g.id, 0), 0)}
            for g in grants.grants
        ],
        "problem": problem or None,
    }


class PrintQueue:
    """Claim receipts printed by one owned thread, off the engine thread: a printer
    that is slow, out of paper or unplugged never delays a verdict. Its state is asked
    every `check_every` seconds while idle, so `redeemd status` shows paper_out before
    the next receipt fails. A receipt that fails is not printed again later (the code
    is in the ledger and went to the POS application as a `dispensed` event); the
    failure is the printer's state and `last_error`, with the code's digest prefix.

        receipts = PrintQueue(ReceiptPrinter(config.printer))
        receipts.start()
        receipts.submit(claim)       # never blocks
        receipts.describe()          # {"state": "paper_out", "detail": ..., "printed": 3, ...}
        receipts.stop(timeout=2.0)
    """

    QUEUE = 50

    def __init__(self, printer: ReceiptPrinter, check_every: float = 30.0):
        self.printer = printer
        self.check_every = check_every
        self.printed = 0
        self.failed = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._queue: queue.Queue[Claim | None] = queue.Queue(maxsize=self.QUEUE)
        self._thread = OwnedThread("printer", self._run, wake=lambda: self._wake())

    def start(self) -> None:
        self._thread.start()

    def submit(self, claim: Claim) -> None:
        try:
            self._queue.put_nowait(claim)
        except queue.Full:
            self.dropped += 1
            self.last_error = (
                f"receipt for code {claim.verdict.digest_prefix} not printed: "
                f"{self.QUEUE} receipts already waiting for the printer"
            )
            log.warning("printer: %s", self.last_error)

    def describe(self) -> dict[str, object]:
        return {
            **self.printer.describe(),
            "waiting": self._queue.qsize(),
            "printed": self.printed,
            "failed": self.failed + self.dropped,
            "last_error": self.last_error,
        }

    def stop(self, timeout: float = 2.0) -> bool:
        ended = self._thread.stop(timeout)
        if ended:
            self.printer.close()
        return ended

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def _run(self) -> None:
        self.printer.check()
        while not self._thread.stopping.is_set():
            try:
                claim = self._queue.get(timeout=self.check_every)
            except queue.Empty:
                self.printer.check()
                continue
            if claim is None:
                continue
            self._print(claim)

    def _print(self, claim: Claim) -> None:
        receipt = ClaimReceipt(
            title=claim.card_title or f"Card {claim.card_id}",
            url=claim.url,
            claim_by=datetime.fromtimestamp(claim.claim_by, UTC).date(),
        )
        try:
            self.printer.print_claim(receipt)
        except (PrinterError, ValueError) as exc:
            # The printer's messages never hold the URL (drivers/printer.py); the
            # digest prefix says which code's receipt is missing.
            self.failed += 1
            self.last_error = f"receipt for code {claim.verdict.digest_prefix}: {exc}"
            log.warning("printer: %s", self.last_error)
            return
        self.printed += 1
