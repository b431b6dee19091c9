"""Key events from a USB-HID keyboard-wedge scanner, turned back into the codes it read.

A wedge scanner "types" each code: for every character a key press and release (with
Shift, AltGr or Ctrl around it as its keyboard-layout setting dictates), then Enter or
Tab. This module undoes that, as a pure function of `evdev.InputEvent` values: no device,
no clock (time comes from the events' own timestamps), so it is tested with the exact
sequences a scanner produces.

>>> from evdev import InputEvent, ecodes as e
>>> def tap(t, code):
...     return [InputEvent(0, t, e.EV_KEY, code, 1), InputEvent(0, t, e.EV_SYN, 0, 0),
...             InputEvent(0, t + 1, e.EV_KEY, code, 0), InputEvent(0, t + 1, e.EV_SYN, 0, 0)]
>>> keys = [e.KEY_A, e.KEY_B, e.KEY_C, e.KEY_1, e.KEY_ENTER]
>>> KeyDecoder("us").feed([ev for i, k in enumerate(keys) for ev in tap(i * 10, k)])
[b'abc1']

Characters come from libxkbcommon and the system's xkeyboard-config (keymap compiled from
the layout name, evdev keycode + 8 = xkb keycode), so Shift, CapsLock, NumLock, AltGr and
dead keys behave as they do on a desktop with that layout; nothing here is a hand-written
table. On top of xkb, three things that scanners do and desktops don't care about:

- GS1 group separator (0x1D) sent as Ctrl+] or as Alt + keypad 0 2 9 (Alt-code entry,
  Windows style: with a leading 0 the number is a cp1252 character, without it cp437;
  below 32 it is the control character itself);
- a scan ends on Enter, keypad Enter or Tab (and Ctrl+M / Ctrl+J / Ctrl+I), or when the
  next key comes after a gap longer than `gap` seconds; `flush(now)` ends it when the
  gap has elapsed with no more keys;
- reads shorter than `min_length` are dropped (a person touching a key), a burst longer
  than MAX_CHARS becomes one `cards.normalize.OVERSIZED` read (rejected as malformed), and
  `SYN_DROPPED` (the kernel's buffer overflowed) discards the partial code and resets
  the modifiers, since the release of Shift may have been among the lost events.

Codes are returned as UTF-8 bytes with terminators removed and nothing else changed (AIM
prefixes and GS pass through; `cards.normalize` deals with them for every driver).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from functools import cache, lru_cache
from types import MappingProxyType

from evdev import InputEvent, ecodes
from xkbcommon import xkb

# The per-key path (`KeyDecoder.feed`, `_state_changed`) calls libxkbcommon through the
# binding's private cffi module and the C state of its KeyboardState (`._state`): the
# public methods build an enum.IntFlag per call. What runs once per state or per key
# learned uses the public API. The private calls and the tables below are kept because
# bench/drivers.py shows they matter: its "plain" line, drivers/keymap_reference.py
# doing the same decoding through the public API, is 4-5x slower than KeyDecoder and
# misses the 50 us/scan target on its own (docs/decisions.md, "Hot paths", has each
# trick's share). tests/test_keymap.py holds KeyDecoder to that reference event by event.
from xkbcommon._ffi import lib

from cards.normalize import OVERSIZED
from drivers.settings import HidSettings

# Config name -> xkeyboard-config layout name.
LAYOUTS = {"us": "us", "uk": "gb", "de": "de", "fr": "fr"}
# A decoder made without them runs with a [[scanner]] type = "hid" block's defaults.
GAP = HidSettings.default("gap")
MIN_LENGTH = HidSettings.default("min_length")

GS = "\x1d"
# Longer than any code normalize accepts: past this the burst is junk, and the rest of it
# up to the next terminator or gap is dropped too rather than delivered as a "code".
MAX_CHARS = 4096

_XKB_OFFSET = 8  # xkb keycodes are evdev keycodes + 8 (an X11 legacy)
_DOWN = lib.XKB_KEY_DOWN
_UP = lib.XKB_KEY_UP
_DEPRESSED = lib.XKB_STATE_MODS_DEPRESSED
_LATCHED = lib.XKB_STATE_MODS_LATCHED
_LOCKED = lib.XKB_STATE_MODS_LOCKED
_LAYOUT_DEPRESSED = lib.XKB_STATE_LAYOUT_DEPRESSED
_LAYOUT_LATCHED = lib.XKB_STATE_LAYOUT_LATCHED
_LAYOUT_LOCKED = lib.XKB_STATE_LAYOUT_LOCKED
# The state components other than the depressed modifiers; Shift, Ctrl, Alt and AltGr
# change none of them, so on a change reported without these bits only one is re-read.
_PUBLIC = xkb.StateComponent  # for the paths that run once per state or per key learned
_OTHER_COMPONENTS = _LATCHED | _LOCKED | _LAYOUT_DEPRESSED | _LAYOUT_LATCHED | _LAYOUT_LOCKED
_TABLE_LIMIT = 64  # modifier states remembered per decoder
# Bound once: attribute lookups on the cffi module cost as much as the calls themselves
# on the per-key path.
_update_key = lib.xkb_state_update_key
_serialize_mods = lib.xkb_state_serialize_mods
_serialize_layout = lib.xkb_state_serialize_layout
_EV_KEY = ecodes.EV_KEY
_EV_SYN = ecodes.EV_SYN
_SYN_REPORT = ecodes.SYN_REPORT
_SYN_DROPPED = ecodes.SYN_DROPPED
_KEY_RIGHTBRACE = ecodes.KEY_RIGHTBRACE
_COMPOSING = xkb.ComposeStatus.XKB_COMPOSE_COMPOSING
_COMPOSED = xkb.ComposeStatus.XKB_COMPOSE_COMPOSED
TERMINATOR_SYMS = frozenset(
    xkb.keysym_from_name(name) for name in ("Return", "KP_Enter", "Tab", "ISO_Left_Tab")
)
# What xkb's Control transformation makes of Ctrl+M, Ctrl+J, Ctrl+I: scanners in
# "control character" mode send their terminator that way.
TERMINATOR_TEXT = frozenset("\r\n\t")
_KEYPAD_DIGITS = {getattr(ecodes, f"KEY_KP{digit}"): str(digit) for digit in range(10)}
# Dead keysyms (dead_grave ... dead_currency and friends) start a compose sequence.
_DEAD_FIRST, _DEAD_LAST = 0xFE50, 0xFE93
_KEY_MAX = ecodes.KEY_MAX
_SHIFT_KEYS = (ecodes.KEY_LEFTSHIFT, ecodes.KEY_RIGHTSHIFT)

_context_lock = threading.Lock()

# Per xkb state: keycode -> text it adds, keycode -> (text, keysym), Alt held, Ctrl held,
# keycode -> text it adds without xkb being told, Shift keycode -> the same with that
# Shift held without xkb being told (see KeyDecoder.__init__).
_StateTables = tuple[
    dict[int, str],
    dict[int, tuple[str, int]],
    bool,
    bool,
    Mapping[int, str],
    Mapping[int, Mapping[int, str]],
]
# `_plain` while xkb must see every key; read-only, so no key is ever learned into it.
_NOTHING: Mapping[int, str] = MappingProxyType({})
_NO_SHIFTS: Mapping[int, Mapping[int, str]] = MappingProxyType({})


def components(state: xkb.KeyboardState) -> tuple[int, int, int, int, int, int]:
    """Everything xkb serializes about a state: depressed, latched and locked modifiers,
    then depressed, latched and locked layout (the effective ones follow from these)."""
    return (
        state.serialize_mods(_PUBLIC.XKB_STATE_MODS_DEPRESSED),
        state.serialize_mods(_PUBLIC.XKB_STATE_MODS_LATCHED),
        state.serialize_mods(_PUBLIC.XKB_STATE_MODS_LOCKED),
        state.serialize_layout(_PUBLIC.XKB_STATE_LAYOUT_DEPRESSED),
        state.serialize_layout(_PUBLIC.XKB_STATE_LAYOUT_LATCHED),
        state.serialize_layout(_PUBLIC.XKB_STATE_LAYOUT_LOCKED),
    )


def _components(state) -> tuple[int, int, int, int, int, int]:
    """`components` of a C state, for `KeyDecoder._state_changed` on the per-key path."""
    return (
        _serialize_mods(state, _DEPRESSED),
        _serialize_mods(state, _LATCHED),
        _serialize_mods(state, _LOCKED),
        _serialize_layout(state, _LAYOUT_DEPRESSED),
        _serialize_layout(state, _LAYOUT_LATCHED),
        _serialize_layout(state, _LAYOUT_LOCKED),
    )


@cache
def compiled_keymap(layout: str) -> xkb.Keymap:
    """The xkb keymap of a configured layout name ("us", "uk", "de", "fr")."""
    try:
        xkb_layout = LAYOUTS[layout]
    except KeyError:
        raise ValueError(
            f"unknown keyboard layout {layout!r}; allowed: {', '.join(LAYOUTS)}"
        ) from None
    # A compiled keymap is immutable and may be shared by states in several threads; the
    # context used to compile it is not thread-safe, hence the lock. The environment's
    # XKB_DEFAULT_* must not change what a configured layout means.
    with _context_lock:
        context = xkb.Context(no_environment_names=True)
        return context.keymap_new_from_names(rules="evdev", model="pc105", layout=xkb_layout)


@cache
def compose_table() -> xkb.ComposeTable | None:
    """The X11 compose table (libx11-data), for dead keys; None if the box has none."""
    with _context_lock:
        try:
            return xkb.Context(no_environment_names=True).compose_table_new_from_locale("C")
        except xkb.XKBError:
            return None


@lru_cache(maxsize=_TABLE_LIMIT)
def _shift_tables(layout: str, where: tuple[int, ...]) -> Mapping[int, Mapping[int, str]]:
    """Shift keycode -> keycode -> text, for the Shift keys that xkb can be left out of
    in the state `where` (its `_components`, one with no filter: see `_changes_nothing`),
    and the keys it can be left out of while that Shift is held; {} if none.

    A Shift key qualifies if, on a fresh state with these components, its press makes
    the depressed modifiers Shift and nothing else and its release restores `where`.
    A key qualifies if it types text (not a terminator, not a dead key) and on a fresh
    state with that Shift pressed its press and release change nothing, and after
    them, or between them, the Shift release restores `where`: with and without a key
    cancelling Shift's clearLocks, which is all such a key can do to xkb's filters.
    """
    keymap = compiled_keymap(layout)
    shifted = (1 << keymap.mod_get_index("Shift"), *where[1:])
    dead_keys_compose = compose_table() is not None
    down, up = xkb.KeyDirection.XKB_KEY_DOWN, xkb.KeyDirection.XKB_KEY_UP

    def pressed(shift: int) -> xkb.KeyboardState | None:
        """A fresh state in `where` with `shift` pressed, if that gives `shifted`."""
        state = keymap.state_new()
        state.update_mask(*where)
        if components(state) != where:
            return None
        state.update_key(shift, down)
        return state if components(state) == shifted else None

    tables = {}
    for shift_code in _SHIFT_KEYS:
        shift = shift_code + _XKB_OFFSET
        alone = pressed(shift)
        if alone is None:
            continue
        alone.update_key(shift, up)
        if components(alone) != where:
            continue
        reader = pressed(shift)
        if reader is None:
            continue
        # A plain dict, for the speed of `feed`'s lookup: it becomes `_plain`, which
        # nothing writes to (keys are learned into `_quiet`).
        table = {}
        for code in range(_KEY_MAX + 1):
            keycode = code + _XKB_OFFSET
            text = reader.key_get_string(keycode)
            if code == shift_code or not text:
                continue
            sym = reader.key_get_one_sym(keycode)
            if sym in TERMINATOR_SYMS or text in TERMINATOR_TEXT:
                continue
            if dead_keys_compose and is_dead_key(sym):
                continue
            # The key released before Shift, and after it.
            before, after = pressed(shift), pressed(shift)
            if (
                before is None
                or after is None
                or before.update_key(keycode, down)
                or before.update_key(keycode, up)
                or after.update_key(keycode, down)
            ):
                continue
            before.update_key(shift, up)
            after.update_key(shift, up)
            if components(before) != where or components(after) != where:
                continue
            if after.update_key(keycode, up) or components(after) != where:
                continue
            table[code] = text
        tables[shift_code] = table
    return MappingProxyType(tables)


def is_dead_key(sym: int) -> bool:
    """Whether a keysym is a dead key (dead_grave ... dead_currency and friends)."""
    return _DEAD_FIRST <= sym <= _DEAD_LAST


def alt_code(digits: str) -> str:
    """The character typed by Alt + these keypad digits ("" for Alt+0)."""
    number = int(digits) % 256
    if number == 0:
        return ""
    if number < 32:
        return chr(number)
    # Windows Alt codes: with a leading zero the ANSI code page, without it the OEM one.
    codec = "cp1252" if digits.startswith("0") else "cp437"
    return bytes([number]).decode(codec, errors="replace")


class KeyDecoder:
    """Decoder state for ONE input device: its buffer, modifiers and timing.

    `feed(events)` returns the codes completed by those events; `flush(now)` returns the
    code in progress once `gap` seconds (on the events' clock) have passed since the last
    key. Never raises on odd input: unknown keys, unmatched releases and stray event
    types are ignored.
    """

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
        self._gap_us = round(gap * 1_000_000)
        self.min_length = min_length
        self.numlock = numlock
        self._keymap = compiled_keymap(layout)
        self._ctrl = self._keymap.mod_get_index("Control")
        self._alt = self._keymap.mod_get_index("Mod1")  # Alt in every xkb layout
        table = compose_table()
        self._compose = table.compose_state_new() if table is not None else None
        # What a key types depends only on the keycode and the state's modifiers and
        # layout group, and a scanner types the same few dozen keys in two or three
        # modifier states (none, Shift): so per state (all its serialized components,
        # so that a latched modifier is not mistaken for a locked one), tables filled as
        # keys are first seen. `_meanings`: keycode -> (text, keysym) for every key seen
        # in the state; `_texts`: keycode -> text for the keys whose press does nothing
        # but add that text; `_quiet`: those of them xkb need not be told about at all
        # (see `_changes_nothing`), or `_NOTHING` in a state with a modifier depressed
        # or latched. The current state's tables are swapped in only when xkb reports a
        # change, and `_plain` is `_quiet` while no key xkb saw go down is still held:
        # so an ordinary character costs one dict lookup. Keyed by the other components,
        # then by the depressed modifiers: Shift, Ctrl, Alt and AltGr only change the
        # latter, so most changes cost one xkb call. `_shifts`: in a state whose
        # `_quiet` is a table, Shift keycode -> the `_quiet` of "that Shift held", for
        # the Shift keys xkb need not be told about either (see `_shift_tables`): so
        # a capital costs four dict operations, not four xkb calls and two swaps.
        self._tables: dict[tuple[int, ...], dict[int, _StateTables]] = {}
        self._table_count = 0
        # Past MAX_CHARS items the burst is junk: one item more marks it (see `_append`).
        self._chars: list[str] = []
        # The last key event: its time is read only when the next key comes, and the gap
        # is checked in the kernel's integer seconds and microseconds, which within one
        # second is two small-int operations (a float time made per key cost more than
        # a tenth of the decoding).
        self._last_key = InputEvent(0, 0, _EV_KEY, 0, 0)
        self._reset_keys()

    def _reset_keys(self) -> None:
        self._state_obj = self._keymap.state_new()  # owns the C state (freed with it)
        self._state = self._state_obj._state
        # A kiosk has nobody to press NumLock, and a scanner that types keypad digits
        # expects them to be digits: start with it on (a NumLock key event toggles it).
        if self.numlock:
            self._state_obj.update_key(ecodes.KEY_NUMLOCK + _XKB_OFFSET, _DOWN)
            self._state_obj.update_key(ecodes.KEY_NUMLOCK + _XKB_OFFSET, _UP)
        # Key down -> whether xkb was left out of its press (see `_changes_nothing`).
        self._pressed: dict[int, bool] = {}
        self._held = 0  # keys down whose press xkb saw
        self._virtual_shift = -1  # the Shift key down that xkb was not told of, if any
        self._alt_digits = ""
        self._dropping = False
        self._reset_compose()
        self._state_changed()

    def _state_changed(self, changed: int = -1) -> None:
        """Swap in the tables for xkb's new state; `changed` is what `update_key` said
        changed (everything, by default)."""
        state = self._state
        if changed & _OTHER_COMPONENTS:
            self._others = others = _components(state)[1:]
            siblings = self._tables.get(others)
            if siblings is None:
                siblings = {}
                if self._table_count < _TABLE_LIMIT:
                    self._tables[others] = siblings
            self._siblings = siblings
        tables = self._siblings.get(_serialize_mods(state, _DEPRESSED))
        if tables is None:
            tables = self._new_tables()
        (
            self._texts,
            self._meanings,
            self._alt_down,
            self._ctrl_down,
            self._quiet,
            self._shifts,
        ) = tables
        self._plain = self._quiet if not self._held and not self._composing else _NOTHING

    def _new_tables(self) -> _StateTables:
        state = self._state
        depressed = _serialize_mods(state, _DEPRESSED)
        latched, _, layout_depressed, layout_latched, _ = self._others
        busy = depressed or latched or layout_depressed or layout_latched
        tables: _StateTables = (
            {},
            {},
            self._state_obj.mod_index_is_active(self._alt, _PUBLIC.XKB_STATE_MODS_DEPRESSED),
            self._state_obj.mod_index_is_active(self._ctrl, _PUBLIC.XKB_STATE_MODS_DEPRESSED),
            _NOTHING if busy else {},
            _NO_SHIFTS if busy else self._shift_tables((depressed, *self._others)),
        )
        # Junk input can visit many states; past the limit a state's tables live only
        # while it lasts (each holds at most KEY_MAX + 1 keys).
        if self._table_count < _TABLE_LIMIT:
            self._table_count += 1
            self._siblings[depressed] = tables
        return tables

    def _changes_nothing(self, code: int) -> bool:
        """Whether xkb can be left out of a press and release of `code` in this state.

        Only called in a state with no modifier depressed or latched. Beyond its
        serialized components libxkbcommon keeps one filter per held modifier key and
        per pending latch, which other keys act on (Shift's clearLocks is cancelled by
        any key pressed while Shift is down; a latch is broken by the next key), so a
        key is left out only while no key xkb saw go down is held (`feed` sees to
        that): then xkb has no filter and its state is exactly these components, which
        `update_mask` gives a fresh state. If on that copy the key's press and its
        release each change nothing (no component, no LED), the key has no modifier,
        lock or group action, creates no filter, and telling xkb about it is a no-op,
        in this state and on its release in any state with no filter either.
        """
        scratch = self._keymap.state_new()
        where = (self._state_obj.serialize_mods(_PUBLIC.XKB_STATE_MODS_DEPRESSED), *self._others)
        scratch.update_mask(*where)
        if components(scratch) != where:
            return False
        keycode = code + _XKB_OFFSET
        return not scratch.update_key(keycode, xkb.KeyDirection.XKB_KEY_DOWN) and not (
            scratch.update_key(keycode, xkb.KeyDirection.XKB_KEY_UP)
        )

    def _shift_tables(self, where: tuple[int, ...]) -> Mapping[int, Mapping[int, str]]:
        """`_shifts` for the state `where`, one with no modifier depressed or latched."""
        return _shift_tables(self.layout, where)

    def _tell_xkb_of_shift(self) -> None:
        """Tell xkb of the press of the Shift held without it, as `feed` would have:
        its state is then what it would be had it been told all along (the keys typed
        since changed nothing, see `_shift_tables`)."""
        code, self._virtual_shift = self._virtual_shift, -1
        self._pressed[code] = False
        self._held += 1
        self._state_changed(_update_key(self._state, code + _XKB_OFFSET, _DOWN))

    def _reset_compose(self) -> None:
        self._composing = False
        if self._compose is not None:
            self._compose.reset()

    def reset(self) -> None:
        """Forget the partial code and all modifier state (as after SYN_DROPPED)."""
        self._chars.clear()
        self._reset_keys()

    @property
    def pending(self) -> bool:
        """True while a code is in progress."""
        return bool(self._chars or self._alt_digits)

    @property
    def deadline(self) -> float | None:
        """Event-clock time after which `flush` ends the code in progress, or None."""
        if not self.pending:
            return None
        return self._last_key.sec + self._last_key.usec / 1_000_000 + self.gap

    def feed(self, events: Iterable[InputEvent]) -> list[bytes]:
        """Codes completed by these events, in order."""
        out: list[bytes] = []
        # One loop with the common cases inline: a scanner sends three events per key
        # change (MSC_SCAN, the key, SYN_REPORT) and a method call per event would cost
        # more than the decoding itself.
        for event in events:
            kind = event.type
            if kind == _EV_KEY:
                if self._dropping:
                    continue
                code = event.code
                value = event.value
                if value == 1:
                    # A press of a key already down (after a resync) is ignored so xkb's
                    # state stays balanced.
                    pressed = self._pressed
                    if code in pressed:
                        continue
                    text = self._plain.get(code)
                    if text is None and not 0 <= code <= _KEY_MAX:
                        continue
                    if self._chars or self._alt_digits:
                        last = self._last_key
                        sec = event.sec
                        if (
                            event.usec - last.usec
                            if sec == last.sec
                            else (sec - last.sec) * 1_000_000 + event.usec - last.usec
                        ) > self._gap_us:
                            self._finish(out)
                    self._last_key = event
                    if text is not None:
                        # A key xkb has nothing to do with here (see `_changes_nothing`).
                        pressed[code] = True
                        chars = self._chars
                        if len(chars) <= MAX_CHARS:
                            chars.append(text)
                        continue
                    if self._virtual_shift >= 0:
                        # A key with Shift held that xkb has to see: first the Shift.
                        self._tell_xkb_of_shift()
                    elif self._plain is self._quiet:
                        # No modifier depressed or latched, no key xkb saw held, no
                        # compose sequence: `_shifts` has the Shift keys xkb need not be
                        # told of here, each with the keys it need not be told of while
                        # that Shift is held (see `_shift_tables`).
                        shifted = self._shifts.get(code)
                        if shifted is not None:
                            pressed[code] = True
                            self._virtual_shift = code
                            self._plain = shifted
                            continue
                    pressed[code] = False
                    self._held += 1
                    self._plain = _NOTHING
                    # From here every key goes through xkb, even one whose text is known:
                    # xkb keeps per-key state (a latch broken by the next key, Shift's
                    # clearLocks cancelled by a key pressed while it is held) that
                    # skipping would get wrong. Its answer says what in the state changed.
                    text = self._texts.get(code)
                    if text is not None and not self._composing:
                        changed = _update_key(self._state, code + _XKB_OFFSET, _DOWN)
                        if not changed:
                            chars = self._chars
                            if len(chars) <= MAX_CHARS:
                                chars.append(text)
                            continue
                        # A key that types and also changes the state: the text was read
                        # before the change, what it means is decided after it.
                        meaning = self._meanings[code]
                        self._state_changed(changed)
                    else:
                        # Read the key's meaning before updating the state with it (xkb's
                        # convention: a modifier key does not modify itself).
                        meaning = self._meanings.get(code) or self._learn(code)
                        changed = _update_key(self._state, code + _XKB_OFFSET, _DOWN)
                        if changed:
                            self._state_changed(changed)
                    self._press(code, meaning, out)
                elif value == 0:
                    left_out = self._pressed.pop(code, None)
                    if left_out is None:
                        continue
                    if not left_out:
                        self._held -= 1
                        changed = _update_key(self._state, code + _XKB_OFFSET, _UP)
                        if changed:
                            self._state_changed(changed)
                        elif not self._held and not self._composing:
                            self._plain = self._quiet
                    elif self._plain is _NOTHING:
                        # Pressed while xkb had no filter, released while it may have one
                        # (a modifier went down since): the filters must see the release.
                        # The key made no filter of its own, so this is what telling xkb
                        # of both would have done.
                        changed = _update_key(self._state, code + _XKB_OFFSET, _UP)
                        if changed:
                            self._state_changed(changed)
                    elif code == self._virtual_shift:
                        # Had xkb been told of this Shift and of the keys typed with it,
                        # its state would now be the one it still has. The keys changed
                        # no component and made no filter; Shift's own filter breaks
                        # latches, and nothing was latched; its clearLocks clears a
                        # locked Shift, and what is locked here (NumLock, CapsLock) is not
                        # Shift: `_shift_tables` checked that the release restores the
                        # state both with clearLocks cancelled by a key and without. The
                        # filter ends with the release, so none is left behind.
                        self._virtual_shift = -1
                        self._plain = self._quiet
                    self._last_key = event
                    if self._alt_digits and not self._alt_down:
                        char = self._alt_code()
                        if char in TERMINATOR_TEXT:
                            self._finish(out)
                        else:
                            self._append(char)
                # value 2 is the kernel's software autorepeat, not the scanner: a scanner
                # sends a release and a press for a doubled character.
            elif kind == _EV_SYN:
                code = event.code
                if code == _SYN_REPORT:
                    self._dropping = False
                elif code == _SYN_DROPPED:
                    # The kernel lost events: the code is incomplete and a Shift release
                    # may be among the lost ones. Ignore everything up to the next
                    # SYN_REPORT (evdev's documented resync rule) and start clean.
                    self.reset()
                    self._dropping = True
            # EV_MSC (scan codes), EV_LED, EV_REP ...: nothing to decode.
        return out

    def flush(self, now: float) -> list[bytes]:
        """The code in progress if the gap has elapsed at `now` (event clock), else []."""
        deadline = self.deadline
        if deadline is None or now <= deadline:
            return []
        out: list[bytes] = []
        self._finish(out)
        return out

    def _finish(self, out: list[bytes]) -> None:
        if self._alt_digits:
            char = self._alt_code()
            if char not in TERMINATOR_TEXT:
                self._append(char)
        chars = self._chars
        if len(chars) > MAX_CHARS:
            # As the serial and stdin framers do: one stand-in that the engine rejects as
            # malformed, so the cashier sees a refused read rather than nothing.
            out.append(OVERSIZED)
        elif chars and len(chars) >= self.min_length:
            out.append("".join(chars).encode("utf-8"))
        chars.clear()
        self._alt_digits = ""
        self._reset_compose()

    def _learn(self, code: int) -> tuple[str, int]:
        """What `code` types in the current state, remembered in the state's tables."""
        keycode = code + _XKB_OFFSET
        text = self._state_obj.key_get_string(keycode)
        sym = self._state_obj.key_get_one_sym(keycode)
        self._meanings[code] = (text, sym)
        # What `_press` would do with this key in this state, when the press leaves
        # the state as it is: plain text for `feed` to add without asking.
        if self._alt_down or sym in TERMINATOR_SYMS or text in TERMINATOR_TEXT:
            return text, sym
        if code == _KEY_RIGHTBRACE and self._ctrl_down:
            self._texts[code] = GS
        elif text and not (self._compose is not None and is_dead_key(sym)):
            self._texts[code] = text
            if self._quiet is not _NOTHING and self._changes_nothing(code):
                self._quiet[code] = text  # type: ignore[index]  # a dict unless _NOTHING
        return text, sym

    def _press(self, code: int, meaning: tuple[str, int], out: list[bytes]) -> None:
        """A key press, xkb's state already updated with it; `meaning` read before."""
        text, sym = meaning
        if self._alt_down:
            # Alt (not AltGr, which is another modifier in xkb) + keypad digits is
            # Alt-code entry; the character comes when Alt is released. Alt + anything
            # else is a shortcut, not text.
            if code in _KEYPAD_DIGITS:
                self._alt_digits = (self._alt_digits + _KEYPAD_DIGITS[code])[-4:]
            return
        if sym in TERMINATOR_SYMS or text in TERMINATOR_TEXT:
            self._finish(out)
            return
        if code == _KEY_RIGHTBRACE and self._ctrl_down:
            # Scanners send "Ctrl+]" as the HID usage of the US ] key whatever layout
            # they are set to (on de/fr that key is + or $, whose Ctrl form is nothing).
            text = GS
        elif self._composing or (self._compose is not None and is_dead_key(sym)):
            text = self._composed(sym, text)
        self._append(text)

    def _composed(self, sym: int, text: str) -> str:
        compose = self._compose
        assert compose is not None
        compose.feed(sym)
        status = compose.get_status()
        if status == _COMPOSING:
            self._composing = True
            return ""
        result = compose.get_utf8() if status == _COMPOSED else text
        # Cancelled (a dead key followed by a key it does not combine with) drops the
        # dead key and keeps the key, as X11 and Wayland clients do.
        self._reset_compose()
        return result

    def _alt_code(self) -> str:
        digits, self._alt_digits = self._alt_digits, ""
        return alt_code(digits)

    def _append(self, text: str) -> None:
        # A burst that overflowed keeps MAX_CHARS + 1 items until it ends, and `_finish`
        # drops it: the memory is bounded and nothing of it becomes a code.
        if text and len(self._chars) <= MAX_CHARS:
            self._chars.append(text)


def decode(
    events: Iterable[InputEvent],
    layout: str = "us",
    *,
    gap: float = GAP,
    min_length: int = MIN_LENGTH,
    numlock: bool = True,
) -> list[bytes]:
    """Every code in a finished sequence of events, including one left unterminated at
    the end (as if the gap had elapsed).

    >>> from evdev import InputEvent, ecodes as e
    >>> decode([InputEvent(0, 0, e.EV_KEY, e.KEY_Z, 1), InputEvent(0, 1, e.EV_KEY, e.KEY_Z, 0)],
    ...        "de", min_length=1)
    [b'y']
    """
    decoder = KeyDecoder(layout, gap=gap, min_length=min_length, numlock=numlock)
    out = decoder.feed(events)
    decoder._finish(out)
    return out
