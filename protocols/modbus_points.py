"""Modbus point codec: registers (or bits) <-> engineering values. Pure, no I/O.

A `PointSpec` says where a value lives (function code, address) and how its bytes are laid out
(type, byte order, word order, bit position, scale and offset). `decode_point()` turns the
registers a read returned into a value; `encode_point()` turns a value into the registers a
write must send. Every failure raises a `ModbusPointError` subclass, never anything else.

Modbus Application Protocol V1.1b3 §4.2: "MODBUS uses a 'big-Endian' representation for
addresses and data items": the high byte of each 16-bit register goes first. The spec says
nothing about values wider than one register, so devices differ in which register holds the
high word ("word order") and some even swap the bytes inside each register ("byte order");
both are per-point settings here and default to big/big ("ABCD").
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from protocols.errors import DetailedError, ProtocolError

PointValue: TypeAlias = float | int | bool | str

# Modbus Application Protocol V1.1b3 §6.1-§6.4: function codes 1 read coils, 2 read discrete
# inputs, 3 read holding registers, 4 read input registers. Coils/discrete inputs are bits.
BIT_FUNCTIONS = frozenset({1, 2})
REGISTER_FUNCTIONS = frozenset({3, 4})
# §4.4: the data model addresses 0..65535 in each table.
MAX_ADDRESS = 65535


class DataType(enum.StrEnum):
    U16 = "u16"
    I16 = "i16"
    U32 = "u32"
    I32 = "i32"
    U64 = "u64"
    I64 = "i64"
    F32 = "f32"
    F64 = "f64"
    BOOL = "bool"
    BITFIELD = "bitfield"
    STRING = "string"


class Order(enum.StrEnum):
    BIG = "big"
    LITTLE = "little"


class ModbusPointError(ProtocolError):
    """Base of every error of the Modbus point codec."""


class _PointKeyError(ModbusPointError, DetailedError):
    """An error about the point `key`; `reason` says what."""

    template = "{key}: {reason}"
    key: str
    reason: str


class PointSpecError(_PointKeyError):
    """A point description is inconsistent (e.g. a bitfield without a bit, a 5-register u32)."""


class PointDecodeError(_PointKeyError):
    """The registers read for a point cannot be turned into a value."""


class PointEncodeError(ModbusPointError, DetailedError):
    """A value cannot be written to a point (wrong type, out of range, too long)."""

    template = "{key}: cannot encode {value!r}: {reason}"
    key: str
    value: object
    reason: str


# struct format and register count of the numeric types.
_NUMERIC: dict[DataType, tuple[str, int]] = {
    DataType.U16: ("H", 1),
    DataType.I16: ("h", 1),
    DataType.U32: ("I", 2),
    DataType.I32: ("i", 2),
    DataType.U64: ("Q", 4),
    DataType.I64: ("q", 4),
    DataType.F32: ("f", 2),
    DataType.F64: ("d", 4),
}
_INT_RANGES: dict[DataType, tuple[int, int]] = {
    DataType.U16: (0, 2**16 - 1),
    DataType.I16: (-(2**15), 2**15 - 1),
    DataType.U32: (0, 2**32 - 1),
    DataType.I32: (-(2**31), 2**31 - 1),
    DataType.U64: (0, 2**64 - 1),
    DataType.I64: (-(2**63), 2**63 - 1),
}
_UNSCALED = frozenset({DataType.BOOL, DataType.BITFIELD, DataType.STRING})


@dataclass(frozen=True, slots=True)
class PointSpec:
    """Where a point lives and how its registers encode it.

    `bit` picks a bit of a register for `bool` (None means "the register is non-zero") and the
    lowest bit of a `bitfield` that is `bit_count` wide. `length` is the register count of a
    `string` (two bytes each). Coils and discrete inputs (function 1/2) are always `bool`.
    Strings honour `byte_order` (some devices swap the bytes of each register) but not
    `word_order`: their registers are in reading order.
    """

    key: str
    function: int
    address: int
    dtype: DataType
    byte_order: Order = Order.BIG
    word_order: Order = Order.BIG
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = None
    bit_count: int = 1
    length: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise PointSpecError(str(self.key), "key must be a non-empty string")
        try:
            object.__setattr__(self, "dtype", DataType(self.dtype))
            object.__setattr__(self, "byte_order", Order(self.byte_order))
            object.__setattr__(self, "word_order", Order(self.word_order))
        except ValueError as exc:
            raise self._bad(str(exc)) from exc
        if self.function not in BIT_FUNCTIONS | REGISTER_FUNCTIONS:
            raise self._bad(f"function {self.function!r} is not 1, 2, 3 or 4")
        if not isinstance(self.address, int) or not 0 <= self.address <= MAX_ADDRESS:
            raise self._bad(f"address {self.address!r} is outside 0..{MAX_ADDRESS}")
        self._check_layout()
        self._check_scaling()
        if self.address + register_count(self) - 1 > MAX_ADDRESS:
            raise self._bad(f"registers run past address {MAX_ADDRESS}")

    def _bad(self, reason: str) -> PointSpecError:
        return PointSpecError(self.key, reason)

    def _check_layout(self) -> None:
        """length, bit_count and bit against the type and the function code."""
        bad = self._bad
        if not isinstance(self.length, int) or self.length < 1:
            raise bad("length must be a positive integer")
        if self.length != 1 and self.dtype is not DataType.STRING:
            raise bad("length applies only to string points")
        if not isinstance(self.bit_count, int) or self.bit_count < 1:
            raise bad("bit_count must be a positive integer")
        if self.bit_count != 1 and self.dtype is not DataType.BITFIELD:
            raise bad("bit_count applies only to bitfield points")
        if self.function in BIT_FUNCTIONS:
            if self.dtype is not DataType.BOOL:
                raise bad(f"function {self.function} reads bits: type must be bool")
            if self.bit is not None:
                raise bad("bit applies only to register points (function 3/4)")
        if self.dtype is DataType.BITFIELD and self.bit is None:
            raise bad("a bitfield needs bit (its lowest bit)")
        if self.bit is not None:
            if self.dtype not in (DataType.BOOL, DataType.BITFIELD):
                raise bad("bit applies only to bool and bitfield points")
            if not isinstance(self.bit, int) or not 0 <= self.bit <= 15:
                raise bad(f"bit {self.bit!r} is outside 0..15")
            if self.bit + self.bit_count > 16:
                raise bad(f"bits {self.bit}..{self.bit + self.bit_count - 1} leave the register")

    def _check_scaling(self) -> None:
        bad = self._bad
        for name in ("scale", "offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(f"{name} must be a number")
            if not math.isfinite(value):
                raise bad(f"{name} must be finite")
        if self.scale == 0:
            raise bad("scale must not be 0")
        if self.dtype in _UNSCALED and (self.scale != 1 or self.offset != 0):
            raise bad(f"{self.dtype} points take no scale or offset")

    @property
    def scaled(self) -> bool:
        return self.scale != 1 or self.offset != 0


def register_count(spec: PointSpec) -> int:
    """How many registers (or bits, for function 1/2) the point occupies."""
    if spec.function in BIT_FUNCTIONS:
        return 1
    if spec.dtype is DataType.STRING:
        return spec.length
    numeric = _NUMERIC.get(spec.dtype)
    return numeric[1] if numeric else 1


def _byteorder(spec: PointSpec) -> Literal["big", "little"]:
    return "big" if spec.byte_order is Order.BIG else "little"


def _words_to_bytes(spec: PointSpec, words: Sequence[int]) -> bytes:
    ordered = list(words)
    if spec.word_order is Order.LITTLE and spec.dtype is not DataType.STRING:
        ordered.reverse()  # little word order: the first register holds the low word
    return b"".join(w.to_bytes(2, _byteorder(spec)) for w in ordered)


def _bytes_to_words(spec: PointSpec, data: bytes) -> list[int]:
    byteorder = _byteorder(spec)
    words = [int.from_bytes(data[i : i + 2], byteorder) for i in range(0, len(data), 2)]
    if spec.word_order is Order.LITTLE and spec.dtype is not DataType.STRING:
        words.reverse()
    return words


def _check_words(spec: PointSpec, words: Sequence[int]) -> list[int]:
    expected = register_count(spec)
    try:
        count = len(words)
    except TypeError as exc:
        raise PointDecodeError(spec.key, "words is not a sequence") from exc
    if count != expected:
        raise PointDecodeError(spec.key, f"expected {expected} words, got {count}")
    limit = 1 if spec.function in BIT_FUNCTIONS else 0xFFFF
    checked: list[int] = []
    for word in words:
        if not isinstance(word, int) or not 0 <= word <= limit:
            raise PointDecodeError(spec.key, f"word {word!r} is outside 0..{limit}")
        checked.append(int(word))
    return checked


def decode_point(spec: PointSpec, words: Sequence[int]) -> PointValue:
    """Decode the registers (or bits 0/1 for function 1/2) of one point into its value.

    Numeric values are `raw * scale + offset`; an unscaled integer stays an `int`. A float
    that is NaN or infinite (often a device's "no reading") raises `PointDecodeError`.
    """
    checked = _check_words(spec, words)
    if spec.function in BIT_FUNCTIONS:
        return bool(checked[0])
    dtype = spec.dtype
    if dtype is DataType.BOOL:
        word = checked[0]
        if spec.bit is None:
            return word != 0
        return bool((word >> spec.bit) & 1)
    if dtype is DataType.BITFIELD:
        assert spec.bit is not None  # checked by PointSpec
        return (checked[0] >> spec.bit) & ((1 << spec.bit_count) - 1)
    data = _words_to_bytes(spec, checked)
    if dtype is DataType.STRING:
        text = data.split(b"\x00", 1)[0].rstrip(b" ")
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PointDecodeError(spec.key, f"not UTF-8 text: {exc.reason}") from exc
    fmt, _ = _NUMERIC[dtype]
    raw: int | float = struct.unpack(">" + fmt, data)[0]
    if isinstance(raw, float) and not math.isfinite(raw):
        raise PointDecodeError(spec.key, f"value is {raw} (not a finite number)")
    if not spec.scaled:
        return raw
    value = raw * spec.scale + spec.offset
    if not math.isfinite(value):
        raise PointDecodeError(spec.key, "scaled value is not a finite number")
    return float(value)


def encode_point(
    spec: PointSpec, value: PointValue, *, current: Sequence[int] | None = None
) -> list[int]:
    """Encode a value into the registers (or one bit 0/1 for function 1/2) a write sends.

    `bool` with `bit` and `bitfield` points share their register with other data: pass the
    register's `current` contents to keep the other bits (read-modify-write); without it they
    are zero. Scaled integer points round `(value - offset) / scale` to the nearest integer.
    """
    if spec.dtype is DataType.BOOL:
        return [_encode_bool(spec, value, current)]
    if spec.dtype is DataType.BITFIELD:
        return [_encode_bitfield(spec, value, current)]
    if spec.dtype is DataType.STRING:
        return _encode_string(spec, value)
    return _encode_number(spec, value)


def _encode_bool(spec: PointSpec, value: PointValue, current: Sequence[int] | None) -> int:
    if not isinstance(value, bool | int) or (not isinstance(value, bool) and value not in (0, 1)):
        raise PointEncodeError(spec.key, value, "expected a bool")
    if spec.function in BIT_FUNCTIONS or spec.bit is None:
        return int(bool(value))
    return _merge_bits(spec, current, spec.bit, 1, int(bool(value)))


def _encode_bitfield(spec: PointSpec, value: PointValue, current: Sequence[int] | None) -> int:
    assert spec.bit is not None  # checked by PointSpec
    if isinstance(value, bool) or not isinstance(value, int):
        raise PointEncodeError(spec.key, value, "expected an integer")
    if not 0 <= value < (1 << spec.bit_count):
        raise PointEncodeError(spec.key, value, f"outside 0..{(1 << spec.bit_count) - 1}")
    return _merge_bits(spec, current, spec.bit, spec.bit_count, value)


def _encode_string(spec: PointSpec, value: PointValue) -> list[int]:
    def bad(reason: str) -> PointEncodeError:
        return PointEncodeError(spec.key, value, reason)

    if not isinstance(value, str):
        raise bad("expected a string")
    if "\x00" in value:
        raise bad("contains NUL")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not text a device can hold
        raise bad("not valid Unicode text") from None
    size = 2 * spec.length
    if len(data) > size:
        raise bad(f"{len(data)} bytes do not fit in {spec.length} registers")
    return _bytes_to_words(spec, data.ljust(size, b"\x00"))


def _encode_number(spec: PointSpec, value: PointValue) -> list[int]:
    def bad(reason: str) -> PointEncodeError:
        return PointEncodeError(spec.key, value, reason)

    dtype = spec.dtype
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"expected a number for {dtype}")
    if not math.isfinite(value):
        raise bad("not a finite number")
    raw: int | float = (value - spec.offset) / spec.scale if spec.scaled else value
    fmt, _ = _NUMERIC[dtype]
    if dtype in _INT_RANGES:
        if not math.isfinite(raw):
            raise bad("not a finite number after scaling")
        raw = round(raw)
        low, high = _INT_RANGES[dtype]
        if not low <= raw <= high:
            raise bad(f"raw value {raw} is outside {low}..{high} of {dtype}")
    else:
        raw = float(raw)
    try:
        data = struct.pack(">" + fmt, raw)
    except (struct.error, OverflowError) as exc:
        raise bad(f"out of range for {dtype}") from exc
    return _bytes_to_words(spec, data)


def _merge_bits(
    spec: PointSpec, current: Sequence[int] | None, bit: int, width: int, value: int
) -> int:
    base = 0
    if current is not None:
        if len(current) != 1 or not isinstance(current[0], int) or not 0 <= current[0] <= 0xFFFF:
            raise PointEncodeError(spec.key, value, "current must be one register 0..65535")
        base = current[0]
    mask = ((1 << width) - 1) << bit
    return (base & ~mask) | ((value << bit) & mask)
