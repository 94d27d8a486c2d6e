"""Live reads and verified writes of one Modbus point: the one code path that both central's
signed `write_point` command (`edge_agent.commands.executor`) and the technician's
`edge-agent write` (the control socket, `edge_agent.control.server`) go through.

Every request goes through the device's own transport (the one its poller uses), which takes
one request at a time: a live read or a write waits for the poller's current request and
never talks over it on the wire.

`write_point` encodes the value with the point's `PointSpec`, writes it (coils: function 15,
holding registers: function 16), reads the registers back and compares the decoded read-back
with the decoded form of the words written, so scaling and float rounding are within
tolerance. A bool or bitfield that shares its holding register is read first and merged
(read-modify-write), so the other bits keep their value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from device_profiles import Profile, ProfilePoint
from edge_agent import EdgeError
from edge_agent.field.errors import TransportError
from edge_agent.field.transports import ModbusTransport
from protocols.modbus_points import (
    BIT_FUNCTIONS,
    DataType,
    ModbusPointError,
    PointSpec,
    PointValue,
    decode_point,
    encode_point,
    register_count,
)

_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})
_INTEGER_TYPES = frozenset({DataType.U16, DataType.I16, DataType.U32, DataType.I32,
                            DataType.U64, DataType.I64, DataType.BITFIELD})


class PointIoError(EdgeError):
    """Base of the point read/write errors; `kind` is a stable snake_case name for reports."""

    kind = "point_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _DevicePointError(PointIoError):
    """About one point of one device; `template` words the message."""

    template = "{device}/{point}"

    def __init__(self, device: str, point: str) -> None:
        super().__init__(self.template.format(device=device, point=point))
        self.device = device
        self.point = point


class UnknownPointError(_DevicePointError):
    kind = "unknown_point"
    template = "{device} has no point {point!r}"


class NotWritableError(_DevicePointError):
    kind = "not_writable"
    template = "{device}/{point} is not writable"


class BadValueError(PointIoError):
    """The value does not fit the point (type, range, length)."""

    kind = "bad_value"


class PointTransportError(PointIoError):
    """The device did not take the request (timeout, exception response, link down)."""

    kind = "transport_error"


class ReadbackMismatchError(PointIoError):
    """The write was acknowledged but the registers read back hold another value."""

    kind = "readback_mismatch"

    def __init__(self, message: str, readback: PointValue | None = None) -> None:
        super().__init__(message)
        self.readback = readback


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    written: PointValue  # the value the words sent encode (after scaling and rounding)
    readback: PointValue
    words: tuple[int, ...]


def find_point(profile: Profile, device: str, key: str) -> ProfilePoint:
    try:
        return profile.point(key)
    except KeyError:
        raise UnknownPointError(device, key) from None


def writable_point(profile: Profile, device: str, key: str) -> ProfilePoint:
    """The point, if it exists and the profile marks it writable."""
    point = find_point(profile, device, key)
    if not point.writable:
        raise NotWritableError(device, key)
    return point


def parse_value(spec: PointSpec, raw: object) -> PointValue:
    """A value typed by a person or sent as JSON, as the point's Python type.

    Text is parsed by the point's type: bools take 1/0, true/false, on/off, yes/no; integers
    must be whole (unless the point is scaled, when the engineering value may be a float).
    """
    dtype = spec.dtype
    if dtype is DataType.STRING:
        if not isinstance(raw, str):
            raise BadValueError(f"{spec.key}: expected text, got {raw!r}")
        return raw
    if dtype is DataType.BOOL:
        return _parse_bool(spec, raw)
    number = _parse_number(spec, raw)
    if not math.isfinite(number):
        raise BadValueError(f"{spec.key}: not a finite number")
    if dtype in _INTEGER_TYPES and not spec.scaled:
        if isinstance(number, float):
            if not number.is_integer():
                raise BadValueError(f"{spec.key}: {dtype} takes whole numbers, got {raw!r}")
            number = int(number)
    return number


def _parse_bool(spec: PointSpec, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise BadValueError(f"{spec.key}: expected 1/0, true/false or on/off, got {raw!r}")


def _parse_number(spec: PointSpec, raw: object) -> int | float:
    """An int or float as given (JSON) or as written (text); a bool is not a number here."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            pass
    raise BadValueError(f"{spec.key}: expected a number, got {raw!r}")


def check_value(spec: PointSpec, value: PointValue) -> list[int]:
    """The words `value` encodes to (without the other bits of a shared register)."""
    try:
        return encode_point(spec, value)
    except ModbusPointError as exc:
        raise BadValueError(str(exc)) from exc


async def read_point(transport: ModbusTransport, device_id: int, spec: PointSpec) -> PointValue:
    """Read and decode one point now."""
    try:
        words = await transport.read(spec.function, spec.address, register_count(spec),
                                     device_id=device_id)
    except TransportError as exc:
        raise PointTransportError(exc.message) from exc
    try:
        return decode_point(spec, words)
    except ModbusPointError as exc:
        raise BadValueError(f"{spec.key}: {exc}") from exc


async def write_point(transport: ModbusTransport, device_id: int, spec: PointSpec,
                      value: PointValue) -> WriteOutcome:
    """Write `value`, read it back and check it; raises a `PointIoError` on any failure."""
    if spec.function not in (1, 3):
        raise NotWritableError(f"unit {device_id}", spec.key)
    count = register_count(spec)
    try:
        current = None
        if spec.function not in BIT_FUNCTIONS and spec.dtype in (DataType.BOOL, DataType.BITFIELD) \
                and spec.bit is not None:
            # The point shares its register: keep the other bits (read-modify-write).
            current = await transport.read(spec.function, spec.address, 1, device_id=device_id)
        try:
            words = encode_point(spec, value, current=current)
        except ModbusPointError as exc:
            raise BadValueError(str(exc)) from exc
        await transport.write(spec.function, spec.address, words, device_id=device_id)
        back = await transport.read(spec.function, spec.address, count, device_id=device_id)
    except TransportError as exc:
        raise PointTransportError(exc.message) from exc
    try:
        readback = decode_point(spec, back)
        expected = decode_point(spec, words)
    except ModbusPointError as exc:
        raise ReadbackMismatchError(f"read-back does not decode: {exc}") from exc
    if not readback_matches(expected, readback):
        raise ReadbackMismatchError(f"wrote {expected!r}, read back {readback!r}", readback)
    return WriteOutcome(written=expected, readback=readback, words=tuple(words))


def readback_matches(expected: PointValue, got: PointValue) -> bool:
    """Whether the value read back is the value the written registers encode.

    `expected` is the decoded form of the words written, so a scaled point compares after the
    same rounding; floats compare within a relative 1e-9 (they round-trip exactly anyway).
    """
    if isinstance(expected, float) or isinstance(got, float):
        if isinstance(expected, bool) or isinstance(got, bool):
            return False
        if not isinstance(expected, int | float) or not isinstance(got, int | float):
            return False
        return math.isclose(float(expected), float(got), rel_tol=1e-9, abs_tol=1e-12)
    return type(expected) is type(got) and expected == got


__all__ = ["BadValueError", "NotWritableError", "PointIoError", "PointTransportError",
           "ReadbackMismatchError", "UnknownPointError", "WriteOutcome", "check_value",
           "find_point", "parse_value", "read_point", "readback_matches", "writable_point",
           "write_point"]
