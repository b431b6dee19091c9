"""Key-event decoding for USB-HID keyboard-wedge scanners (drivers/keymap.py).

The sequences are built the way a scanner's keyboard interface reports them through
evdev: EV_MSC/MSC_SCAN with the HID usage, then EV_KEY, then SYN_REPORT, one report per
key change, a few milliseconds apart; modifiers pressed before and released after the key
they modify. Time only exists in the events' timestamps.
"""

from __future__ import annotations

from evdev import InputEvent
from evdev import ecodes as e
from hypothesis import given, settings
from hypothesis import strategies as st
from xkbcommon import xkb

from cards.normalize import OVERSIZED, normalize
from drivers import keymap
from drivers.keymap import KeyDecoder, decode
from drivers.keymap_reference import ReferenceKeyDecoder

STEP_US = 2_000  # 2 ms between reports: a fast scanner


class Keyboard:
    """Records what a scanner would send, with advancing timestamps."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.t_us = int(start * 1_000_000)
        self.events: list[InputEvent] = []

    def _report(self, code: int, value: int) -> None:
        sec, usec = divmod(self.t_us, 1_000_000)
        self.events.append(InputEvent(sec, usec, e.EV_MSC, e.MSC_SCAN, 0x70000 + code))
        self.events.append(InputEvent(sec, usec, e.EV_KEY, code, value))
        self.events.append(InputEvent(sec, usec, e.EV_SYN, e.SYN_REPORT, 0))
        self.t_us += STEP_US

    def down(self, code: int) -> Keyboard:
        self._report(code, 1)
        return self

    def up(self, code: int) -> Keyboard:
        self._report(code, 0)
        return self

    def tap(self, code: int, *mods: int) -> Keyboard:
        for mod in mods:
            self.down(mod)
        self.down(code).up(code)
        for mod in reversed(mods):
            self.up(mod)
        return self

    def keys(self, *codes: int) -> Keyboard:
        for code in codes:
            self.tap(code)
        return self

    def type_us(self, text: str) -> Keyboard:
        """Letters and digits as a scanner set to the US layout types them."""
        for char in text:
            if char.isdigit():
                self.tap(getattr(e, f"KEY_{char}"))
            elif char.isupper():
                self.tap(getattr(e, f"KEY_{char}"), e.KEY_LEFTSHIFT)
            else:
                self.tap(getattr(e, f"KEY_{char.upper()}"))
        return self

    def enter(self) -> Keyboard:
        return self.tap(e.KEY_ENTER)

    def wait(self, seconds: float) -> Keyboard:
        self.t_us += int(seconds * 1_000_000)
        return self

    def syn_dropped(self) -> Keyboard:
        sec, usec = divmod(self.t_us, 1_000_000)
        self.events.append(InputEvent(sec, usec, e.EV_SYN, e.SYN_DROPPED, 0))
        self.events.append(InputEvent(sec, usec, e.EV_SYN, e.SYN_REPORT, 0))
        self.t_us += STEP_US
        return self

    @property
    def now(self) -> float:
        return self.t_us / 1_000_000


def scans(kb: Keyboard, layout: str = "us", **kw) -> list[bytes]:
    return KeyDecoder(layout, **kw).feed(kb.events)


# --- characters and modifiers -------------------------------------------------------


def test_letters_and_digits_end_on_enter():
    assert scans(Keyboard().type_us("abc123").enter()) == [b"abc123"]


def test_shift_gives_capitals_with_either_shift_key():
    kb = Keyboard().type_us("Ab").tap(e.KEY_C, e.KEY_RIGHTSHIFT).enter()
    assert scans(kb) == [b"AbC"]


def test_shift_release_ends_the_capitals():
    kb = Keyboard().down(e.KEY_LEFTSHIFT).keys(e.KEY_A, e.KEY_B).up(e.KEY_LEFTSHIFT)
    assert scans(kb.keys(e.KEY_C, e.KEY_D).enter()) == [b"ABcd"]


def test_capslock_toggles_case_until_pressed_again():
    kb = Keyboard().tap(e.KEY_CAPSLOCK).keys(e.KEY_A, e.KEY_B).tap(e.KEY_CAPSLOCK)
    assert scans(kb.keys(e.KEY_C, e.KEY_ENTER)) == [b"ABc"]


def test_us_and_de_layouts_swap_y_and_z():
    kb = Keyboard().keys(e.KEY_Y, e.KEY_Z, e.KEY_Y, e.KEY_ENTER)
    assert scans(kb, "us") == [b"yzy"]
    assert scans(kb, "de") == [b"zyz"]


def test_de_altgr_q_is_at_sign():
    kb = Keyboard().type_us("ab").tap(e.KEY_Q, e.KEY_RIGHTALT).type_us("cd").enter()
    assert scans(kb, "de") == [b"ab@cd"]
    # The same keys on a US keymap: right Alt is Alt there, and Alt+Q is a shortcut.
    assert scans(kb, "us") == [b"abcd"]


def test_fr_digits_need_shift():
    digits = Keyboard()
    for code in (e.KEY_1, e.KEY_2, e.KEY_3, e.KEY_0):
        digits.tap(code, e.KEY_LEFTSHIFT)
    assert scans(digits.enter(), "fr") == [b"1230"]
    unshifted = Keyboard().keys(e.KEY_1, e.KEY_3, e.KEY_0, e.KEY_ENTER)
    assert scans(unshifted, "fr") == ['&"à'.encode()]


def test_fr_azerty_letters():
    kb = Keyboard().keys(e.KEY_Q, e.KEY_W, e.KEY_A, e.KEY_Z, e.KEY_SEMICOLON, e.KEY_ENTER)
    assert scans(kb, "fr") == [b"azqwm"]


def test_uk_shift_2_is_double_quote_and_shift_3_is_pound():
    kb = Keyboard().tap(e.KEY_2, e.KEY_LEFTSHIFT).tap(e.KEY_3, e.KEY_LEFTSHIFT)
    kb.tap(e.KEY_9).enter()
    assert scans(kb, "uk") == ['"£9'.encode()]
    assert scans(kb, "us") == [b"@#9"]


def test_keypad_digits_with_numlock_on():
    kb = Keyboard().keys(e.KEY_KP1, e.KEY_KP2, e.KEY_KP0, e.KEY_KPDOT, e.KEY_KP9, e.KEY_ENTER)
    assert scans(kb) == [b"120.9"]


def test_numlock_key_toggles_keypad_digits_off_and_on():
    kb = Keyboard().tap(e.KEY_NUMLOCK).keys(e.KEY_KP1, e.KEY_KP2)  # navigation keys now
    kb.tap(e.KEY_NUMLOCK).keys(e.KEY_KP3, e.KEY_KP4, e.KEY_KP5, e.KEY_KPENTER)
    assert scans(kb) == [b"345"]


def test_decoder_starting_with_numlock_off_reads_keypad_as_navigation():
    kb = Keyboard().keys(e.KEY_KP1, e.KEY_KP2, e.KEY_KP3, e.KEY_ENTER)
    assert scans(kb, numlock=False) == []


def test_de_dead_circumflex_then_space_types_the_caret():
    kb = Keyboard().type_us("ab").keys(e.KEY_GRAVE, e.KEY_SPACE).type_us("c").enter()
    assert scans(kb, "de") == [b"ab^c"]


# --- end of a scan --------------------------------------------------------------------


def test_tab_ends_a_scan():
    assert scans(Keyboard().type_us("4711").tap(e.KEY_TAB)) == [b"4711"]


def test_keypad_enter_ends_a_scan():
    assert scans(Keyboard().type_us("4711").tap(e.KEY_KPENTER)) == [b"4711"]


def test_ctrl_m_ends_a_scan_like_enter():
    assert scans(Keyboard().type_us("4711").tap(e.KEY_M, e.KEY_LEFTCTRL)) == [b"4711"]


def test_two_codes_in_a_row():
    kb = Keyboard().type_us("first").enter().type_us("second").tap(e.KEY_TAB)
    assert scans(kb) == [b"first", b"second"]


def test_key_after_gap_longer_than_setting_ends_previous_scan():
    kb = Keyboard().type_us("abc").wait(0.25).type_us("def").enter()
    assert scans(kb, gap=0.1) == [b"abc", b"def"]


def test_pause_shorter_than_gap_keeps_one_scan():
    kb = Keyboard().type_us("abc").wait(0.05).type_us("def").enter()
    assert scans(kb, gap=0.1) == [b"abcdef"]


def test_gap_is_measured_exactly_in_the_kernels_microseconds_across_a_second():
    # "c" is released at .960 s; "d" is pressed exactly `gap` later, in the next second
    # (the same scan), or 1 us more (a new one). Float seconds since 1970 are 0.2 us
    # coarse, and their difference is off by as much.
    for extra_us, expected in ((0, [b"abcdef"]), (1, [b"abc", b"def"])):
        kb = Keyboard(start=1_700_000_000.95)
        kb.type_us("abc")  # 6 reports; the next one is 100 ms after the last
        kb.wait((100_000 - STEP_US + extra_us) / 1_000_000).type_us("def").enter()
        assert scans(kb, gap=0.1) == expected, extra_us


def test_flush_returns_code_only_once_gap_has_elapsed():
    kb = Keyboard().type_us("12345")
    decoder = KeyDecoder("us", gap=0.1)
    assert decoder.feed(kb.events) == []
    assert decoder.pending
    assert decoder.flush(kb.now + 0.05) == []
    assert decoder.flush(kb.now + 0.2) == [b"12345"]
    assert not decoder.pending
    assert decoder.flush(kb.now + 1.0) == []


def test_deadline_is_last_key_plus_gap():
    kb = Keyboard().type_us("12")
    decoder = KeyDecoder("us", gap=0.1)
    assert decoder.deadline is None
    decoder.feed(kb.events)
    last = kb.events[-1].timestamp()
    assert decoder.deadline is not None
    assert abs(decoder.deadline - (last + 0.1)) < 1e-6


def test_burst_shorter_than_min_length_is_ignored():
    kb = Keyboard().type_us("ab").enter().type_us("abc").enter()
    assert scans(kb, min_length=3) == [b"abc"]


def test_lone_enter_is_not_a_scan():
    assert scans(Keyboard().enter().enter(), min_length=1) == []


def test_overlong_burst_without_terminator_is_one_oversized_read_then_scanning_goes_on():
    kb = Keyboard()
    for _ in range(5000):
        kb.tap(e.KEY_7)
    kb.enter().type_us("ok1").enter()
    assert scans(kb) == [OVERSIZED, b"ok1"]


# --- lost events ----------------------------------------------------------------------


def test_syn_dropped_mid_code_discards_partial_code_and_resets_shift():
    # Shift goes down, two letters, then the kernel's buffer overflows and the Shift
    # release is among the lost events.
    kb = Keyboard().down(e.KEY_LEFTSHIFT).keys(e.KEY_A, e.KEY_B).syn_dropped()
    kb.type_us("cde").enter()
    assert scans(kb) == [b"cde"]


def test_events_after_syn_dropped_are_ignored_until_the_next_report():
    kb = Keyboard().type_us("ab")
    sec, usec = divmod(kb.t_us, 1_000_000)
    kb.events += [
        InputEvent(sec, usec, e.EV_SYN, e.SYN_DROPPED, 0),
        InputEvent(sec, usec, e.EV_KEY, e.KEY_X, 1),  # half of a lost report
        InputEvent(sec, usec, e.EV_SYN, e.SYN_REPORT, 0),
    ]
    kb.t_us += STEP_US
    kb.up(e.KEY_X).type_us("xyz").enter()
    assert scans(kb) == [b"xyz"]


def test_syn_dropped_resets_capslock():
    kb = Keyboard().tap(e.KEY_CAPSLOCK).type_us("ab").syn_dropped().type_us("cde").enter()
    assert scans(kb) == [b"cde"]


# --- GS1 separator and AIM prefixes ---------------------------------------------------


def test_gs_sent_as_ctrl_right_bracket_is_0x1d():
    kb = Keyboard().type_us("0104012345678901").tap(e.KEY_RIGHTBRACE, e.KEY_LEFTCTRL)
    kb.type_us("10ABC").enter()
    assert scans(kb) == [b"0104012345678901\x1d10ABC"]


def test_gs_as_ctrl_right_bracket_position_works_on_de_and_fr_layouts():
    kb = Keyboard().type_us("10").tap(e.KEY_RIGHTBRACE, e.KEY_LEFTCTRL).enter()
    # On fr the digit row needs Shift, so only the separator is compared there.
    assert scans(kb, "de") == [b"10\x1d"]
    assert scans(kb, "fr", min_length=1) == ["&à\x1d".encode()]


def test_gs_as_ctrl_altgr_9_on_de_layout():
    kb = Keyboard().type_us("10").tap(e.KEY_9, e.KEY_LEFTCTRL, e.KEY_RIGHTALT).enter()
    assert scans(kb, "de") == [b"10\x1d"]


def test_gs_sent_as_alt_keypad_029_is_0x1d():
    kb = Keyboard().type_us("10AB").down(e.KEY_LEFTALT).keys(e.KEY_KP0, e.KEY_KP2, e.KEY_KP9)
    kb.up(e.KEY_LEFTALT).type_us("21X").enter()
    assert scans(kb) == [b"10AB\x1d21X"]


def test_alt_code_works_with_numlock_off_and_on_any_layout():
    kb = Keyboard().tap(e.KEY_NUMLOCK).type_us("10")
    kb.down(e.KEY_LEFTALT).keys(e.KEY_KP2, e.KEY_KP9).up(e.KEY_LEFTALT).enter()
    assert scans(kb, "de") == [b"10\x1d"]


def test_alt_codes_use_cp1252_with_leading_zero_and_cp437_without():
    kb = Keyboard().type_us("x")
    kb.down(e.KEY_LEFTALT).keys(e.KEY_KP0, e.KEY_KP2, e.KEY_KP2, e.KEY_KP8).up(e.KEY_LEFTALT)
    kb.down(e.KEY_LEFTALT).keys(e.KEY_KP1, e.KEY_KP3, e.KEY_KP2).up(e.KEY_LEFTALT)
    kb.down(e.KEY_LEFTALT).keys(e.KEY_KP6, e.KEY_KP5).up(e.KEY_LEFTALT).enter()
    assert scans(kb) == ["xääA".encode()]


def test_aim_prefix_passes_through_the_keymap():
    us = Keyboard().tap(e.KEY_RIGHTBRACE).tap(e.KEY_Q, e.KEY_LEFTSHIFT).type_us("1HELLO42")
    assert scans(us.enter()) == [b"]Q1HELLO42"]
    # A scanner set to German types ] as AltGr+9 and Q as Shift+Q.
    de = Keyboard().tap(e.KEY_9, e.KEY_RIGHTALT).tap(e.KEY_Q, e.KEY_LEFTSHIFT).type_us("1HELLO42")
    [code] = scans(de.enter(), "de")
    assert code == b"]Q1HELLO42"
    assert normalize(code).text == "HELLO42"
    assert normalize(code).symbology == "]Q1"


# --- odd input ------------------------------------------------------------------------


def test_autorepeat_events_do_not_type_extra_characters():
    kb = Keyboard().down(e.KEY_A)
    sec, usec = divmod(kb.t_us, 1_000_000)
    kb.events += [InputEvent(sec, usec, e.EV_KEY, e.KEY_A, 2)] * 3
    kb.up(e.KEY_A).type_us("bc").enter()
    assert scans(kb) == [b"abc"]


def test_unknown_keys_and_releases_without_press_are_ignored():
    kb = Keyboard().up(e.KEY_LEFTSHIFT).up(e.KEY_B).type_us("ab")
    kb.keys(e.KEY_F13, e.KEY_VOLUMEUP, 0x2FE).type_us("c").enter()
    sec, usec = divmod(kb.t_us, 1_000_000)
    kb.events += [
        InputEvent(sec, usec, e.EV_KEY, 0xFFFF, 1),
        InputEvent(sec, usec, e.EV_LED, e.LED_NUML, 1),
        InputEvent(sec, usec, e.EV_REL, e.REL_X, 5),
    ]
    assert scans(kb) == [b"abc"]


def test_each_decoder_keeps_its_own_modifiers():
    first, second = KeyDecoder("us"), KeyDecoder("us")
    first.feed(Keyboard().down(e.KEY_LEFTSHIFT).events)
    assert second.feed(Keyboard().type_us("abc").enter().events) == [b"abc"]
    assert first.feed(Keyboard().keys(e.KEY_A, e.KEY_B, e.KEY_C, e.KEY_ENTER).events) == [b"ABC"]


def test_decode_returns_a_trailing_unterminated_code():
    assert decode(Keyboard().type_us("abc").enter().type_us("tail").events) == [b"abc", b"tail"]


def test_unknown_layout_is_refused_with_the_allowed_ones():
    try:
        KeyDecoder("xx")
    except ValueError as exc:
        assert "us, uk, de, fr" in str(exc)
    else:
        raise AssertionError("KeyDecoder accepted layout 'xx'")


_key_event = st.builds(
    lambda dt, type_, code, value: (dt, type_, code, value),
    st.integers(0, 300_000),
    st.sampled_from([e.EV_KEY] * 8 + [e.EV_SYN, e.EV_MSC, e.EV_LED, e.EV_REL]),
    st.one_of(
        st.sampled_from(
            [
                e.KEY_A,
                e.KEY_Q,
                e.KEY_1,
                e.KEY_9,
                e.KEY_ENTER,
                e.KEY_KPENTER,
                e.KEY_TAB,
                e.KEY_LEFTSHIFT,
                e.KEY_RIGHTALT,
                e.KEY_LEFTALT,
                e.KEY_LEFTCTRL,
                e.KEY_CAPSLOCK,
                e.KEY_NUMLOCK,
                e.KEY_KP0,
                e.KEY_KP2,
                e.KEY_KP9,
                e.KEY_RIGHTBRACE,
                e.KEY_GRAVE,
                e.KEY_SPACE,
                e.KEY_M,
                e.KEY_J,
                e.KEY_I,
                e.SYN_DROPPED,
            ]
        ),
        st.integers(-5, 0x3FF),
    ),
    st.integers(-1, 3),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(_key_event, max_size=120),
    layout=st.sampled_from(["us", "uk", "de", "fr"]),
    min_length=st.integers(1, 4),
)
def test_any_key_sequence_never_raises_nor_yields_a_terminator(steps, layout, min_length):
    decoder = KeyDecoder(layout, gap=0.1, min_length=min_length)
    t_us = 1_700_000_000_000_000
    out: list[bytes] = []
    for dt, type_, code, value in steps:
        t_us += dt
        sec, usec = divmod(t_us, 1_000_000)
        out += decoder.feed([InputEvent(sec, usec, type_, code, value)])
        out += decoder.flush(t_us / 1_000_000)
    out += decoder.flush(t_us / 1_000_000 + 1)
    for code in out:
        assert len(code.decode("utf-8")) >= min_length
        assert not set(code) & set(b"\r\n\t")


# --- leaving xkb out ------------------------------------------------------------------


def _xkb_components(decoder: KeyDecoder) -> tuple[int, ...]:
    """xkb's state as it would be had the decoder told it everything: with a Shift held
    that xkb was not told of, its state plus Shift depressed."""
    components = keymap.components(decoder._state_obj)
    if decoder._virtual_shift < 0:
        return components
    assert components[0] == 0
    return (1 << decoder._keymap.mod_get_index("Shift"), *components[1:])


def _reference_components(decoder: ReferenceKeyDecoder) -> tuple[int, ...]:
    """The reference decoder's xkb state, read through xkbcommon's public API."""
    component = xkb.StateComponent
    state = decoder.state
    return (
        state.serialize_mods(component.XKB_STATE_MODS_DEPRESSED),
        state.serialize_mods(component.XKB_STATE_MODS_LATCHED),
        state.serialize_mods(component.XKB_STATE_MODS_LOCKED),
        state.serialize_layout(component.XKB_STATE_LAYOUT_DEPRESSED),
        state.serialize_layout(component.XKB_STATE_LAYOUT_LATCHED),
        state.serialize_layout(component.XKB_STATE_LAYOUT_LOCKED),
    )


def test_plain_keys_and_capitals_are_decoded_without_asking_xkb(monkeypatch):
    decoder = KeyDecoder("us")
    decoder.feed(Keyboard().type_us("abc123A").enter().events)  # tables learned
    calls = []
    real = keymap._update_key
    monkeypatch.setattr(keymap, "_update_key", lambda *a: calls.append(a) or real(*a))
    assert decoder.feed(Keyboard().type_us("abc123").enter().events) == [b"abc123"]
    assert len(calls) == 2  # Enter, which ends the code, down and up
    calls.clear()
    # Either Shift, and the keys typed while it is held, need no xkb either.
    kb = Keyboard().type_us("abcA").tap(e.KEY_B, e.KEY_RIGHTSHIFT).tap(e.KEY_2, e.KEY_LEFTSHIFT)
    kb.down(e.KEY_LEFTSHIFT).keys(e.KEY_C, e.KEY_D).up(e.KEY_LEFTSHIFT)
    assert decoder.feed(kb.enter().events) == [b"abcAB@CD"]
    assert len(calls) == 2
    calls.clear()
    # A key that means more than text with Shift goes to xkb, and the Shift before it.
    assert decoder.feed(Keyboard().type_us("abc").tap(e.KEY_TAB, e.KEY_LEFTSHIFT).events) == [
        b"abc"
    ]
    assert [(code - 8, down) for _, code, down in calls] == [
        (e.KEY_LEFTSHIFT, keymap._DOWN),
        (e.KEY_TAB, keymap._DOWN),
        (e.KEY_TAB, keymap._UP),
        (e.KEY_LEFTSHIFT, keymap._UP),
    ]


def test_shift_held_then_ctrl_right_bracket_is_still_gs():
    kb = Keyboard().type_us("10").down(e.KEY_LEFTSHIFT).keys(e.KEY_A)
    kb.tap(e.KEY_RIGHTBRACE, e.KEY_LEFTCTRL).keys(e.KEY_B).up(e.KEY_LEFTSHIFT)
    assert scans(kb.type_us("c").enter()) == [b"10A\x1dBc"]


def test_shift_with_capslock_locked_types_lowercase():
    kb = Keyboard().tap(e.KEY_CAPSLOCK).type_us("aB").tap(e.KEY_CAPSLOCK).type_us("cD").enter()
    assert scans(kb) == [b"AbcD"]


def test_both_shift_keys_held_then_one_released_keeps_capitals():
    kb = Keyboard().down(e.KEY_LEFTSHIFT).keys(e.KEY_A).down(e.KEY_RIGHTSHIFT).keys(e.KEY_B)
    kb.up(e.KEY_LEFTSHIFT).keys(e.KEY_C).up(e.KEY_RIGHTSHIFT).keys(e.KEY_D).enter()
    assert scans(kb) == [b"ABCd"]


_DIFFERENTIAL_KEYS = [
    e.KEY_A,
    e.KEY_Q,
    e.KEY_Y,
    e.KEY_Z,
    e.KEY_M,
    e.KEY_J,
    e.KEY_I,
    e.KEY_1,
    e.KEY_2,
    e.KEY_7,
    e.KEY_9,
    e.KEY_0,
    e.KEY_MINUS,
    e.KEY_EQUAL,  # de: dead acute
    e.KEY_LEFTBRACE,  # fr: dead circumflex
    e.KEY_RIGHTBRACE,
    e.KEY_SEMICOLON,
    e.KEY_APOSTROPHE,
    e.KEY_GRAVE,  # de: dead circumflex
    e.KEY_BACKSLASH,
    e.KEY_102ND,
    e.KEY_COMMA,
    e.KEY_DOT,
    e.KEY_SLASH,
    e.KEY_SPACE,
    e.KEY_ENTER,
    e.KEY_TAB,
    e.KEY_KP0,
    e.KEY_KP2,
    e.KEY_KP9,
    e.KEY_KPDOT,
    e.KEY_KPENTER,
    e.KEY_KPSLASH,
    e.KEY_F13,
    0x2FE,  # in range, in no keymap
    e.KEY_MAX + 1,
]
_DIFFERENTIAL_MODIFIERS = [
    e.KEY_LEFTSHIFT,
    e.KEY_RIGHTSHIFT,
    e.KEY_CAPSLOCK,
    e.KEY_NUMLOCK,
    e.KEY_RIGHTALT,  # AltGr on uk, de, fr
    e.KEY_LEFTALT,
    e.KEY_LEFTCTRL,
]


@st.composite
def _sessions(draw) -> list[tuple]:
    """Steps typed with a few keys and modifiers, so that keys come back (a key is
    decoded differently once its state's tables know it)."""
    keys = draw(st.lists(st.sampled_from(_DIFFERENTIAL_KEYS), min_size=1, max_size=4, unique=True))
    mods = draw(st.lists(st.sampled_from(_DIFFERENTIAL_MODIFIERS), max_size=3, unique=True))
    any_key = st.sampled_from(keys + mods)
    step = st.one_of(
        # A key tapped with modifiers held around it, as a scanner sends it.
        st.tuples(st.just("tap"), any_key, st.lists(st.sampled_from(mods or keys), max_size=2)),
        # Single events in any order: rollover, held modifiers, unmatched releases, repeats.
        st.tuples(st.just("key"), any_key, st.sampled_from([1, 1, 0, 0, 2])),
        st.tuples(st.just("dropped"), st.none(), st.none()),
        st.tuples(st.just("wait"), st.integers(0, 300_000), st.none()),
    )
    return draw(st.lists(step, min_size=20, max_size=80))


_SHIFT_KEYS = [e.KEY_LEFTSHIFT, e.KEY_RIGHTSHIFT]
# What comes with or during a held Shift besides characters.
_WITH_SHIFT = [e.KEY_CAPSLOCK, e.KEY_NUMLOCK, e.KEY_LEFTCTRL, e.KEY_RIGHTALT, e.KEY_LEFTALT]


@st.composite
def _shift_sessions(draw) -> list[tuple]:
    """Steps heavy on Shift: capitals and shifted symbols, Shift held across several
    keys, with CapsLock locked, with Ctrl, Alt or AltGr or the other Shift pressed in
    between, autorepeated, or with events lost while it is held."""
    keys = draw(st.lists(st.sampled_from(_DIFFERENTIAL_KEYS), min_size=1, max_size=6, unique=True))
    key = st.sampled_from(keys)
    shift = st.sampled_from(_SHIFT_KEYS)
    other = st.sampled_from(_WITH_SHIFT + _SHIFT_KEYS)
    anything = st.one_of(key, other, st.sampled_from(keys + _SHIFT_KEYS))
    dropped = st.tuples(st.just("dropped"), st.none(), st.none())
    # Inside a held Shift; "repeat" is an autorepeat of that Shift.
    inner = st.one_of(
        st.tuples(st.just("tap"), key, st.just([])),
        st.tuples(st.just("tap"), key, st.lists(other, max_size=2)),
        st.tuples(st.just("tap"), other, st.just([])),
        st.tuples(st.just("key"), anything, st.sampled_from([1, 0, 2])),
        st.tuples(st.just("repeat"), st.none(), st.none()),
        dropped,
        st.tuples(st.just("wait"), st.integers(0, 150_000), st.none()),
    )
    step = st.one_of(
        st.tuples(st.just("tap"), key, shift.map(lambda code: [code])),
        st.tuples(st.just("tap"), key, st.just([])),
        st.tuples(st.just("held"), shift, st.lists(inner, max_size=6)),
        st.tuples(st.just("tap"), other, st.just([])),
        st.tuples(st.just("key"), anything, st.sampled_from([1, 0, 2])),
        dropped,
        st.tuples(st.just("wait"), st.integers(0, 300_000), st.none()),
    )
    steps = []
    for what, a, b in draw(st.lists(step, min_size=10, max_size=50)):
        if what != "held":
            steps.append((what, a, b))
            continue
        steps.append(("key", a, 1))
        for inner_what, x, y in b:
            steps.append(("key", a, 2) if inner_what == "repeat" else (inner_what, x, y))
        steps.append(("key", a, 0))
    return steps


@settings(max_examples=600, deadline=None)
@given(
    steps=st.one_of(_sessions(), _shift_sessions()),
    layout=st.sampled_from(["us", "uk", "de", "fr"]),
    numlock=st.booleans(),
)
def test_fast_decoder_decodes_as_the_plain_reference_decoder_event_by_event(steps, layout, numlock):
    ours = KeyDecoder(layout, numlock=numlock, min_length=1)
    reference = ReferenceKeyDecoder(layout, numlock=numlock, min_length=1)
    kb = Keyboard()
    for what, a, b in steps:
        kb.events = []
        if what == "tap":
            kb.tap(a, *dict.fromkeys(b))
        elif what == "key":
            kb._report(a, b)
        elif what == "dropped":
            kb.syn_dropped()
        else:
            kb.wait(a / 1_000_000)
        for event in kb.events:
            assert ours.feed([event]) == reference.feed([event])
            assert _xkb_components(ours) == _reference_components(reference)
        assert ours.flush(kb.now) == reference.flush(kb.now)
        assert (ours.pending, ours.deadline) == (reference.pending, reference.deadline)
    assert ours.flush(kb.now + 1) == reference.flush(kb.now + 1)


def test_docstring_examples_hold():
    import doctest

    from drivers import keymap_reference

    for module in (keymap, keymap_reference):
        failed, _ = doctest.testmod(module)
        assert failed == 0, f"{module.__name__} docstring examples fail"
