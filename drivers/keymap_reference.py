"""The plain decoder of wedge-scanner key events: what `drivers.keymap.KeyDecoder` must do.

`KeyDecoder` is fast because it leaves libxkbcommon out of most keys (per-state tables
of what a key types, a Shift that xkb is not told about, calls straight into the
binding's cffi module). This module is the same decoding written the obvious way, with
nothing but xkbcommon's public API: every key press and release goes to xkb, every
character is asked of xkb, one method per event. It is the reference the differential
test in tests/test_keymap.py compares `KeyDecoder` against, event by event, over random
key sequences on every layout; bench/drivers.py prints its time per scan beside
`KeyDecoder`'s (the "plain" line) to show what the tricks buy.

It is not used by the daemon. Change the decoding rules here first, then in `KeyDecoder`,
and let the differential test show they agree.

>>> from evdev import InputEvent, ecodes as e
>>> def tap(t, code):
...     return [InputEvent(0, t, e.EV_KEY, code, 1), InputEvent(0, t + 1, e.EV_KEY, code, 0)]
>>> keys = [e.KEY_A, e.KEY_B, e.KEY_C, e.KEY_1, e.KEY_ENTER]
>>> ReferenceKeyDecoder("us").feed([ev for i, k in enumerate(keys) for ev in tap(i * 10, k)])
[b'abc1']
"""

from __future__ import annotations

from collections.abc import Iterable

from evdev import InputEvent, ecodes
from xkbcommon import xkb

from cards.normalize import OVERSIZED
from drivers.keymap import (
    GAP,
    GS,
    MAX_CHARS,
    MIN_LENGTH,
    TERMINATOR_SYMS,
    TERMINATOR_TEXT,
    alt_code,
    compiled_keymap,
    compose_table,
    is_dead_key,
)

_DOWN = xkb.KeyDirection.XKB_KEY_DOWN
_UP = xkb.KeyDirection.XKB_KEY_UP
_DEPRESSED = xkb.StateComponent.XKB_STATE_MODS_DEPRESSED
_KEYPAD_DIGITS = {getattr(ecodes, f"KEY_KP{digit}"): str(digit) for digit in range(10)}
_XKB_OFFSET = 8  # xkb keycodes are evdev keycodes + 8


class ReferenceKeyDecoder:
    """Decoder state for one input device, with the interface of `KeyDecoder`."""

    def __init__(
        self,
        layout: str = "us",
        *,
        gap: float = GAP,
        min_length: int = MIN_LENGTH,
        numlock: bool = True,
    ):
        self.layout = layout
        self.gap = gap
        self.min_length = min_length
        self.numlock = numlock
        self._keymap = compiled_keymap(layout)
        self._ctrl = self._keymap.mod_get_index("Control")
        self._alt = self._keymap.mod_get_index("Mod1")
        table = compose_table()
        self._compose = table.compose_state_new() if table is not None else None
        self._chars: list[str] = []
        self._last_key = InputEvent(0, 0, ecodes.EV_KEY, 0, 0)
        self.reset()

    def reset(self) -> None:
        """Forget the partial code and all modifier state (as after SYN_DROPPED)."""
        self._chars.clear()
        self.state = self._keymap.state_new()
        if self.numlock:
            self.state.update_key(ecodes.KEY_NUMLOCK + _XKB_OFFSET, _DOWN)
            self.state.update_key(ecodes.KEY_NUMLOCK + _XKB_OFFSET, _UP)
        self._pressed: set[int] = set()
        self._alt_digits = ""
        self._dropping = False
        self._reset_compose()

    @property
    def pending(self) -> bool:
        return bool(self._chars or self._alt_digits)

    @property
    def deadline(self) -> float | None:
        if not self.pending:
            return None
        return self._last_key.sec + self._last_key.usec / 1_000_000 + self.gap

    def feed(self, events: Iterable[InputEvent]) -> list[bytes]:
        out: list[bytes] = []
        for event in events:
            if event.type == ecodes.EV_KEY and not self._dropping:
                if event.value == 1:
                    self._key_down(event, out)
                elif event.value == 0:
                    self._key_up(event, out)
                # 2 is the kernel's autorepeat, not the scanner.
            elif event.type == ecodes.EV_SYN:
                if event.code == ecodes.SYN_REPORT:
                    self._dropping = False
                elif event.code == ecodes.SYN_DROPPED:
                    # Events were lost, a Shift release maybe among them: drop everything
                    # up to the next SYN_REPORT and start clean.
                    self.reset()
                    self._dropping = True
        return out

    def flush(self, now: float) -> list[bytes]:
        deadline = self.deadline
        if deadline is None or now <= deadline:
            return []
        out: list[bytes] = []
        self.finish(out)
        return out

    def finish(self, out: list[bytes]) -> None:
        """End the code in progress, appending it to `out` if it is one."""
        if self._alt_digits:
            char = self._take_alt_code()
            if char not in TERMINATOR_TEXT:
                self._append(char)
        if len(self._chars) > MAX_CHARS:
            out.append(OVERSIZED)
        elif self._chars and len(self._chars) >= self.min_length:
            out.append("".join(self._chars).encode("utf-8"))
        self._chars.clear()
        self._alt_digits = ""
        self._reset_compose()

    def _key_down(self, event: InputEvent, out: list[bytes]) -> None:
        code = event.code
        if code in self._pressed or not 0 <= code <= ecodes.KEY_MAX:
            return
        if self.pending and self._micros_since_last_key(event) > round(self.gap * 1_000_000):
            self.finish(out)
        self._last_key = event
        keycode = code + _XKB_OFFSET
        # What the key types is read before xkb is told of it: a modifier does not
        # modify itself.
        text = self.state.key_get_string(keycode)
        sym = self.state.key_get_one_sym(keycode)
        self.state.update_key(keycode, _DOWN)
        self._pressed.add(code)
        if self._held(self._alt):
            # Alt + keypad digits is Alt-code entry, ended by Alt's release; Alt + any
            # other key is a shortcut, not text.
            if code in _KEYPAD_DIGITS:
                self._alt_digits = (self._alt_digits + _KEYPAD_DIGITS[code])[-4:]
            return
        if sym in TERMINATOR_SYMS or text in TERMINATOR_TEXT:
            self.finish(out)
            return
        if code == ecodes.KEY_RIGHTBRACE and self._held(self._ctrl):
            text = GS  # Ctrl + the US ] key, whatever the layout
        elif self._composing or (self._compose is not None and is_dead_key(sym)):
            text = self._composed(sym, text)
        self._append(text)

    def _key_up(self, event: InputEvent, out: list[bytes]) -> None:
        code = event.code
        if code not in self._pressed:
            return
        self._pressed.remove(code)
        self.state.update_key(code + _XKB_OFFSET, _UP)
        self._last_key = event
        if self._alt_digits and not self._held(self._alt):
            char = self._take_alt_code()
            if char in TERMINATOR_TEXT:
                self.finish(out)
            else:
                self._append(char)

    def _micros_since_last_key(self, event: InputEvent) -> int:
        last = self._last_key
        return (event.sec - last.sec) * 1_000_000 + event.usec - last.usec

    def _held(self, modifier: int) -> bool:
        return self.state.mod_index_is_active(modifier, _DEPRESSED)

    def _composed(self, sym: int, text: str) -> str:
        assert self._compose is not None
        self._compose.feed(sym)
        status = self._compose.get_status()
        if status == xkb.ComposeStatus.XKB_COMPOSE_COMPOSING:
            self._composing = True
            return ""
        result = (
            self._compose.get_utf8() if status == xkb.ComposeStatus.XKB_COMPOSE_COMPOSED else text
        )
        self._reset_compose()
        return result

    def _reset_compose(self) -> None:
        self._composing = False
        if self._compose is not None:
            self._compose.reset()

    def _take_alt_code(self) -> str:
        digits, self._alt_digits = self._alt_digits, ""
        return alt_code(digits)

    def _append(self, text: str) -> None:
        if text and len(self._chars) <= MAX_CHARS:
            self._chars.append(text)
