"""Modbus point codec: byte vectors both ways, round-trips, garbage."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ProtocolError
from protocols.modbus_points import (
    DataType,
    Order,
    PointDecodeError,
    PointEncodeError,
    PointSpec,
    PointSpecError,
    decode_point,
    encode_point,
    register_count,
)

B, L = Order.BIG, Order.LITTLE


def spec(dtype: str, *, fc: int = 3, bo: Order = B, wo: Order = B, **kw: object) -> PointSpec:
    return PointSpec(
        "p", fc, 0, DataType(dtype), byte_order=bo, word_order=wo, **kw  # type: ignore[arg-type]
    )


VECTORS = [
    # (dtype, byte order, word order, extra, value, words)
    ("u16", B, B, {}, 0x1234, [0x1234]),
    ("u16", L, B, {}, 0x1234, [0x3412]),
    ("i16", B, B, {}, -2, [0xFFFE]),
    ("i16", L, B, {}, -2, [0xFEFF]),
    ("u32", B, B, {}, 0x12345678, [0x1234, 0x5678]),
    ("u32", B, L, {}, 0x12345678, [0x5678, 0x1234]),
    ("u32", L, B, {}, 0x12345678, [0x3412, 0x7856]),
    ("u32", L, L, {}, 0x12345678, [0x7856, 0x3412]),
    ("i32", B, B, {}, -1, [0xFFFF, 0xFFFF]),
    ("i32", B, L, {}, -65536, [0x0000, 0xFFFF]),
    ("u64", B, B, {}, 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
    ("u64", B, L, {}, 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
    ("i64", L, B, {}, -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF]),
    ("i64", L, L, {}, -2, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    ("f32", B, B, {}, 1.0, [0x3F80, 0x0000]),
    ("f32", B, L, {}, 1.0, [0x0000, 0x3F80]),
    ("f32", L, B, {}, 1.0, [0x803F, 0x0000]),
    ("f32", L, L, {}, 1.0, [0x0000, 0x803F]),
    ("f32", B, B, {}, -2.5, [0xC020, 0x0000]),
    ("f64", B, B, {}, 1.0, [0x3FF0, 0, 0, 0]),
    ("f64", B, L, {}, 1.0, [0, 0, 0, 0x3FF0]),
    ("f64", L, B, {}, 1.0, [0xF03F, 0, 0, 0]),
    ("f64", L, L, {}, 1.0, [0, 0, 0, 0xF03F]),
    ("bool", B, B, {"bit": 3}, True, [0x0008]),
    ("bool", B, B, {}, True, [0x0001]),
    ("bitfield", B, B, {"bit": 4, "bit_count": 3}, 5, [0x0050]),
    ("string", B, B, {"length": 3}, "GT-20", [0x4754, 0x2D32, 0x3000]),
    ("string", L, B, {"length": 2}, "AB", [0x4241, 0x0000]),
]


@pytest.mark.parametrize(("dtype", "bo", "wo", "extra", "value", "words"), VECTORS)
def test_vectors_both_ways(dtype, bo, wo, extra, value, words):
    """Each type and order decodes its exact register vector and encodes back to it."""
    s = spec(dtype, bo=bo, wo=wo, **extra)
    assert register_count(s) == len(words)
    decoded = decode_point(s, words)
    assert decoded == value and type(decoded) is type(value)
    assert encode_point(s, value) == words


def test_scale_and_offset():
    """Scaled points decode to raw*scale+offset as float and encode back by rounding."""
    s = spec("i16", scale=0.1, offset=-40.0)
    assert decode_point(s, [650]) == pytest.approx(25.0)
    assert encode_point(s, 25.0) == [650]
    assert encode_point(s, 25.04) == [650]
    assert isinstance(decode_point(spec("u16"), [7]), int)


def test_bits_for_coils_and_discrete_inputs():
    """Function 1/2 points are one bit 0/1 each way."""
    s = spec("bool", fc=2)
    assert decode_point(s, [1]) is True and decode_point(s, [0]) is False
    assert encode_point(spec("bool", fc=1), True) == [1]
    with pytest.raises(PointDecodeError):
        decode_point(s, [2])


def test_bit_merge_keeps_other_bits():
    """Encoding a bool bit or bitfield with `current` keeps the register's other bits."""
    assert encode_point(spec("bool", bit=0), False, current=[0xFFFF]) == [0xFFFE]
    assert encode_point(spec("bitfield", bit=4, bit_count=4), 0xA, current=[0xF00F]) == [0xF0AF]


def test_string_strips_trailing_nul_and_spaces():
    """Strings stop at the first NUL and lose trailing spaces."""
    s = spec("string", length=3)
    assert decode_point(s, [0x4142, 0x2020, 0x0043]) == "AB"


@pytest.mark.parametrize(
    ("s", "value"),
    [
        (spec("u16"), 65536),
        (spec("i16"), -32769),
        (spec("u32"), -1),
        (spec("u16", scale=0.1), 6553.6),
        (spec("f32"), 1e39),
        (spec("f32"), math.nan),
        (spec("u16"), "12"),
        (spec("bool", bit=1), 2),
        (spec("bitfield", bit=0, bit_count=2), 4),
        (spec("string", length=1), "abc"),
        (spec("string", length=2), "a\x00b"),
    ],
)
def test_encode_out_of_range_raises(s, value):
    """Out-of-range or wrongly typed values raise PointEncodeError."""
    with pytest.raises(PointEncodeError) as info:
        encode_point(s, value)
    assert info.value.key == "p"


def test_decode_nan_and_wrong_length():
    """A NaN float and a wrong word count are PointDecodeErrors naming the point."""
    with pytest.raises(PointDecodeError, match="finite"):
        decode_point(spec("f32"), [0x7FC0, 0])
    with pytest.raises(PointDecodeError, match="expected 2 words"):
        decode_point(spec("u32"), [1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"function": 5},
        {"address": 65536},
        {"address": 65535, "dtype": DataType.U32},
        {"function": 1, "dtype": DataType.U16},
        {"dtype": DataType.BITFIELD},
        {"dtype": DataType.BOOL, "bit": 16},
        {"dtype": DataType.BITFIELD, "bit": 12, "bit_count": 5},
        {"dtype": DataType.U16, "length": 2},
        {"dtype": DataType.U16, "scale": 0},
        {"dtype": DataType.BOOL, "scale": 2},
        {"dtype": "f33"},
    ],
)
def test_bad_specs_rejected(kwargs):
    """Inconsistent point descriptions raise PointSpecError."""
    base = {"key": "p", "function": 3, "address": 0, "dtype": DataType.U16}
    with pytest.raises(PointSpecError):
        PointSpec(**(base | kwargs))


INT_TYPES = {
    "u16": (0, 2**16 - 1), "i16": (-(2**15), 2**15 - 1), "u32": (0, 2**32 - 1),
    "i32": (-(2**31), 2**31 - 1), "u64": (0, 2**64 - 1), "i64": (-(2**63), 2**63 - 1),
}
orders = st.sampled_from([B, L])


@given(st.sampled_from(sorted(INT_TYPES)), orders, orders, st.data())
def test_int_round_trip(dtype, bo, wo, data):
    """decode(encode(x)) == x for every integer type and order."""
    low, high = INT_TYPES[dtype]
    value = data.draw(st.integers(low, high))
    s = spec(dtype, bo=bo, wo=wo)
    assert decode_point(s, encode_point(s, value)) == value


@given(orders, orders, st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_f32_round_trip(bo, wo, value):
    """decode(encode(x)) == x for every finite float32."""
    s = spec("f32", bo=bo, wo=wo)
    assert decode_point(s, encode_point(s, value)) == value


@given(orders, orders, st.floats(allow_nan=False, allow_infinity=False))
def test_f64_round_trip(bo, wo, value):
    """decode(encode(x)) == x for every finite float64."""
    s = spec("f64", bo=bo, wo=wo)
    assert decode_point(s, encode_point(s, value)) == value


@given(st.integers(0, 15), st.data())
def test_bit_types_round_trip(bit, data):
    """bool bits and bitfields round-trip for every position and width."""
    count = data.draw(st.integers(1, 16 - bit))
    s = spec("bitfield", bit=bit, bit_count=count)
    value = data.draw(st.integers(0, 2**count - 1))
    assert decode_point(s, encode_point(s, value)) == value
    b = spec("bool", bit=bit)
    flag = data.draw(st.booleans())
    assert decode_point(b, encode_point(b, flag)) is flag


@given(orders, st.text(st.characters(blacklist_characters="\x00",
                                     blacklist_categories=("Cs",)), max_size=8))
def test_string_round_trip(bo, text):
    """Strings without trailing spaces round-trip when they fit."""
    text = text.rstrip(" ")
    s = spec("string", bo=bo, length=16)
    assert decode_point(s, encode_point(s, text)) == text


def test_string_with_a_lone_surrogate_is_a_typed_error():
    with pytest.raises(PointEncodeError, match="not valid Unicode"):
        encode_point(spec("string", length=4), "a\ud800")


@given(st.sampled_from(["u16", "i16", "u32", "i32"]), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF))
def test_scaled_registers_re_encode(dtype, w0, w1):
    """Scaled integer points: encode(decode(words)) gives the same words back."""
    s = spec(dtype, scale=0.1, offset=-5.0)
    words = [w0, w1][: register_count(s)]
    assert encode_point(s, decode_point(s, words)) == words


@given(
    st.sampled_from(list(DataType)),
    orders,
    orders,
    st.lists(st.integers(-5, 0x10005) | st.booleans() | st.none(), max_size=6),
)
def test_garbage_words_raise_only_protocol_errors(dtype, bo, wo, words):
    """Arbitrary words decode to a value or raise a ProtocolError subclass, nothing else."""
    extra: dict[str, int] = {}
    if dtype is DataType.BITFIELD:
        extra = {"bit": 2, "bit_count": 3}
    if dtype is DataType.STRING:
        extra = {"length": 3}
    s = spec(dtype, bo=bo, wo=wo, **extra)
    try:
        decode_point(s, words)  # type: ignore[arg-type]
    except ProtocolError:
        pass
