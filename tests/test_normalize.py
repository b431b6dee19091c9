"""cards.normalize: the same code from any scanner gives the same text, junk is refused."""

from __future__ import annotations

import pytest

from cards.normalize import DEFAULT_MAX_LENGTH, GS, MalformedCode, Normalized, normalize

# ------------------------------------------------------------------ AIM identifiers


@pytest.mark.parametrize(
    ("raw", "symbology"),
    [
        (b"]Q1HELLO-42", "]Q1"),
        (b"]C0HELLO-42", "]C0"),
        (b"]A0HELLO-42", "]A0"),
        (b"]d1HELLO-42", "]d1"),
        (b"]Z0HELLO-42", "]Z0"),
    ],
)
def test_aim_identifier_is_stripped_and_remembered(raw, symbology):
    result = normalize(raw)
    assert result.text == "HELLO-42"
    assert result.symbology == symbology


def test_same_code_with_and_without_aim_prefix_normalises_the_same():
    assert normalize(b"]Q1DEMO-0001\r\n").text == normalize(b"DEMO-0001").text == "DEMO-0001"


def test_ean13_aim_prefix_is_stripped_and_digits_kept():
    result = normalize(b"]E04006381333931")
    assert result.text == "4006381333931"
    assert result.symbology == "]E0"


def test_text_without_a_valid_aim_identifier_is_kept_whole():
    # `]` followed by something that is not a symbology identifier is part of the code.
    assert normalize(b"]]]ABC").text == "]]]ABC"
    assert normalize(b"]x").text == "]x"


# ------------------------------------------------------------------ ECI escapes


def test_eci_utf8_designator_is_removed_after_eci_modifier():
    assert normalize(b"]Q2\\000026HELLO").text == "HELLO"


def test_doubled_backslash_is_undoubled_when_eci_protocol_is_announced():
    result = normalize(b"]Q2\\000026A\\\\B")
    assert result.text == "A\\B"


def test_single_backslash_is_kept_without_eci_protocol():
    assert normalize(b"A\\B").text == "A\\B"
    assert normalize(b"]Q1A\\\\B").text == "A\\\\B"


def test_latin1_eci_decodes_latin1_bytes():
    result = normalize(b"]Q2\\000003caf\xe9")
    assert result.text == "caf\u00e9"


def test_gb18030_eci_decodes_chinese_text():
    result = normalize(b"]Q2\\000029" + "\u4e2d\u6587".encode("gb18030"))
    assert result.text == "\u4e2d\u6587"


def test_latin1_and_utf8_reads_of_the_same_code_normalise_the_same():
    latin1 = normalize(b"]Q2\\000003caf\xe9")
    utf8 = normalize(b"]Q2\\000026" + "caf\u00e9".encode())
    assert latin1.text == utf8.text


def test_leading_eci_escape_without_aim_prefix_is_removed():
    assert normalize(b"\\000003caf\xe9").text == "caf\u00e9"


def test_latin1_bytes_without_eci_are_not_utf8_and_are_malformed():
    with pytest.raises(MalformedCode):
        normalize(b"caf\xe9")


# ------------------------------------------------------------------ framing


@pytest.mark.parametrize(
    "raw",
    [
        b"DEMO-0001\r\n",
        b"DEMO-0001\n",
        b"DEMO-0001\r",
        b"DEMO-0001\t",
        b"  DEMO-0001  ",
        b"\x02DEMO-0001\x03",
        b"\x02DEMO-0001\x03\r\n",
        b"DEMO-0001\x04",
        b"DEMO-0001\x00",
        b"]Q1DEMO-0001\r\n",
    ],
)
def test_terminators_whitespace_and_stx_etx_framing_are_stripped(raw):
    assert normalize(raw).text == "DEMO-0001"


# ------------------------------------------------------------------ GS1


def test_gs1_group_separator_between_fields_is_kept():
    result = normalize(b"]C1010950110153000310ABC\x1d17250101")
    assert result.text == "010950110153000310ABC" + GS + "17250101"
    assert result.gs1 == (("01", "09501101530003"), ("10", "ABC"), ("17", "250101"))


def test_trailing_gs1_separator_does_not_change_the_code():
    with_gs = normalize(b"]C1010950110153000310ABC\x1d")
    without = normalize(b"]C1010950110153000310ABC")
    assert with_gs.text == without.text == "010950110153000310ABC"
    assert with_gs.gs1 == (("01", "09501101530003"), ("10", "ABC"))


def test_superfluous_separator_after_fixed_length_field_is_removed():
    # AI 01 is fixed length, so the separator after it is not required.
    result = normalize(b"]C10109501101530003\x1d10ABC")
    assert result.text == "010950110153000310ABC"


def test_gs1_without_aim_prefix_is_canonicalised_when_it_contains_gs():
    result = normalize(b"10ABC\x1d17250101\x1d")
    assert result.text == "10ABC" + GS + "17250101"
    assert result.gs1 == (("10", "ABC"), ("17", "250101"))


def test_gs1_datamatrix_and_qr_give_the_same_text():
    data = b"010950110153000310ABC\x1d17250101"
    assert normalize(b"]d2" + data).text == normalize(b"]Q3" + data).text
    assert normalize(b"]d2" + data).text == normalize(b"]C1" + data).text


def test_unparseable_gs1_keeps_text_but_drops_trailing_separator():
    result = normalize(b"]C1NOT-GS1\x1d")
    assert result.text == "NOT-GS1"
    assert result.gs1 == ()


def test_aim_like_text_inside_gs1_data_is_kept():
    # Only the first three bytes can be a symbology identifier; a second one is data.
    assert normalize(b"]C1]C110ABC").text == "]C110ABC"
    assert normalize(b"]C1]Q1").text == "]Q1"


def test_leading_fnc1_separator_is_not_part_of_the_code():
    assert normalize(b"]C1\x1d10ABC\x1d").text == "10ABC"


# ------------------------------------------------------------------ refusals


def test_empty_read_is_malformed():
    with pytest.raises(MalformedCode):
        normalize(b"")


@pytest.mark.parametrize("raw", [b"\r\n", b"   ", b"\x02\x03", b"]Q1", b"]Q1\r\n", b"]Q2\\000026"])
def test_read_with_only_framing_is_malformed(raw):
    with pytest.raises(MalformedCode):
        normalize(raw)


def test_code_longer_than_the_limit_is_malformed():
    with pytest.raises(MalformedCode, match="longer"):
        normalize(b"A" * (DEFAULT_MAX_LENGTH + 1))


def test_code_exactly_at_the_limit_is_accepted():
    assert normalize(b"A" * DEFAULT_MAX_LENGTH).text == "A" * DEFAULT_MAX_LENGTH


def test_custom_max_length_is_respected():
    assert normalize(b"ABCDE", max_length=5).text == "ABCDE"
    with pytest.raises(MalformedCode):
        normalize(b"ABCDEF", max_length=5)


def test_one_megabyte_of_junk_is_malformed():
    with pytest.raises(MalformedCode, match="longer than any code"):
        normalize(bytes(range(256)) * 4096)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"ABC\xc3", b"\xc0\xafABC", b"AB\xed\xa0\x80C"])
def test_invalid_utf8_is_malformed(raw):
    with pytest.raises(MalformedCode, match="utf-8"):
        normalize(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"AB\x00CD",  # NUL inside the code (framing NULs are only stripped at the ends)
        b"AB\x1bCD",  # ESC: a scanner's keyboard-mode control sequence
        b"AB\x7fCD",  # DEL
        b"AB\x01CD",
        b"AB\x1eCD",  # RS
        b"AB\x1fCD",
        b"AB\rCD",
        b"AB\nCD",
        "AB\u0085CD".encode(),  # C1 NEL
        "AB\u009bCD".encode(),  # C1 CSI
    ],
)
def test_control_characters_inside_a_code_are_malformed(raw):
    with pytest.raises(MalformedCode, match="control character"):
        normalize(raw)


def test_c1_control_from_latin1_eci_is_malformed():
    with pytest.raises(MalformedCode, match="control character"):
        normalize(b"]Q2\\000003AB\x9bCD")


def test_group_separator_is_not_a_refused_control_character():
    result = normalize(b"10ABC\x1d17250101")
    assert GS in result.text


def test_malformed_code_is_a_value_error():
    assert issubclass(MalformedCode, ValueError)


def test_normalize_returns_a_frozen_value():
    result = normalize(b"DEMO-0001")
    assert isinstance(result, Normalized)
    with pytest.raises(AttributeError):
        result.text = "other"  # type: ignore[misc]


def test_precomputed_digester_equals_code_digest():
    from cards.digest import CodeDigester, code_digest

    key = bytes(range(32))
    digester = CodeDigester(key)
    for text in ("DEMO-0001", "你好", "0107032069804988\x1d10ABC"):
        assert digester(text) == code_digest(key, text)
