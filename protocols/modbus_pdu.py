"""The Modbus PDUs a serial bus carries (Modbus Application Protocol V1.1b3 §6, §7). Pure.

Read coils/discrete inputs/holding/input registers (1-4), write single coil (5), write single
register (6), write multiple coils (15) and registers (16), and exceptions (§7): what the edge
agent and the simulators use. The RTU frame around a PDU is in `protocols.modbus_rtu`, and so
are the errors both share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocols.modbus_rtu import PduError, RtuEncodeError, UnknownFunctionError

# §6.1-§6.4, §6.11, §6.12: the quantity limits of one request.
MAX_READ_BITS: Final = 2000
MAX_READ_REGISTERS: Final = 125
MAX_WRITE_BITS: Final = 1968
MAX_WRITE_REGISTERS: Final = 123

# §7: the exception codes a slave answers with.
ILLEGAL_FUNCTION: Final = 1
ILLEGAL_DATA_ADDRESS: Final = 2
ILLEGAL_DATA_VALUE: Final = 3
SERVER_DEVICE_FAILURE: Final = 4


# --- requests and responses ----------------------------------------------------------------

BIT_FUNCTIONS: Final = frozenset({1, 2})
READ_FUNCTIONS: Final = frozenset({1, 2, 3, 4})


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Functions 1-4: `count` bits or registers from `address`."""

    function: int
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteSingleRequest:
    """Function 5 (coil, `value` 0/1) or 6 (register, `value` 0..65535)."""

    function: int
    address: int
    value: int


@dataclass(frozen=True, slots=True)
class WriteMultipleRequest:
    """Function 15 (coils, values 0/1) or 16 (registers)."""

    function: int
    address: int
    values: tuple[int, ...]


Request: TypeAlias = ReadRequest | WriteSingleRequest | WriteMultipleRequest


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")  # §4.2: big-endian addresses and data


def pack_bits(bits: Sequence[int]) -> bytes:
    """§6.1: one bit per coil, LSB of the first byte first, the last byte padded with zeros."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def unpack_bits(data: bytes, count: int) -> list[int]:
    return [(data[i // 8] >> (i % 8)) & 1 for i in range(count)]


_QUANTITY_LIMIT: Final = {1: MAX_READ_BITS, 2: MAX_READ_BITS, 3: MAX_READ_REGISTERS,
                          4: MAX_READ_REGISTERS, 15: MAX_WRITE_BITS, 16: MAX_WRITE_REGISTERS}


def _quantity_problem(function: int, count: int) -> str | None:
    limit = _QUANTITY_LIMIT[function]
    return None if 1 <= count <= limit else f"quantity {count} is outside 1..{limit}"


def _check_quantity(function: int, count: int) -> None:
    if (problem := _quantity_problem(function, count)) is not None:
        raise RtuEncodeError(f"function {function}: {problem}")


def _check_address(address: int, count: int = 1) -> None:
    if not 0 <= address <= 0xFFFF or address + count - 1 > 0xFFFF:
        raise RtuEncodeError(f"address {address} (+{count}) is outside 0..65535")


def encode_request(request: Request) -> bytes:
    """The PDU of a request."""
    fc = request.function
    if isinstance(request, ReadRequest):
        if fc not in READ_FUNCTIONS:
            raise RtuEncodeError(f"function {fc} is not a read")
        _check_quantity(fc, request.count)
        _check_address(request.address, request.count)
        return bytes((fc,)) + _u16(request.address) + _u16(request.count)
    if isinstance(request, WriteSingleRequest):
        _check_address(request.address)
        if fc == 5:
            if request.value not in (0, 1):
                raise RtuEncodeError(f"a coil is 0 or 1, not {request.value}")
            coil = b"\xff\x00" if request.value else b"\x00\x00"
            return bytes((5,)) + _u16(request.address) + coil
        if fc == 6:
            if not 0 <= request.value <= 0xFFFF:
                raise RtuEncodeError(f"register value {request.value} is outside 0..65535")
            return bytes((6,)) + _u16(request.address) + _u16(request.value)
        raise RtuEncodeError(f"function {fc} is not a single write")
    values = request.values
    if fc not in (15, 16):
        raise RtuEncodeError(f"function {fc} is not a multiple write")
    _check_quantity(fc, len(values))
    _check_address(request.address, len(values))
    if fc == 15:
        if any(v not in (0, 1) for v in values):
            raise RtuEncodeError("coil values are 0 or 1")
        data = pack_bits(values)
    else:
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise RtuEncodeError("register values are 0..65535")
        data = b"".join(_u16(v) for v in values)
    return bytes((fc,)) + _u16(request.address) + _u16(len(values)) + bytes((len(data),)) + data


def decode_request(pdu: bytes) -> Request:
    """Parse a request PDU (slave side).

    `UnknownFunctionError` → answer exception 1; `PduError` → exception 3 (§7 and the
    state diagrams of §6: quantity out of range or byte count inconsistent).
    """
    if not pdu:
        raise PduError(0, "empty PDU")
    fc = pdu[0]
    if fc in READ_FUNCTIONS or fc in (5, 6):
        if len(pdu) != 5:
            raise PduError(fc, f"expected 5 bytes, got {len(pdu)}")
        address, word = int.from_bytes(pdu[1:3], "big"), int.from_bytes(pdu[3:5], "big")
        if fc in READ_FUNCTIONS:
            if (problem := _quantity_problem(fc, word)) is not None:
                raise PduError(fc, problem)
            return ReadRequest(fc, address, word)
        if fc == 5:
            if word not in (0xFF00, 0x0000):  # §6.5: any other value is illegal
                raise PduError(5, f"coil value {word:04X} is neither FF00 nor 0000")
            return WriteSingleRequest(5, address, 1 if word else 0)
        return WriteSingleRequest(6, address, word)
    if fc in (15, 16):
        if len(pdu) < 6:
            raise PduError(fc, "too short")
        address, count = int.from_bytes(pdu[1:3], "big"), int.from_bytes(pdu[3:5], "big")
        nbytes = pdu[5]
        if (problem := _quantity_problem(fc, count)) is not None:
            raise PduError(fc, problem)
        want = (count + 7) // 8 if fc == 15 else 2 * count
        if nbytes != want or len(pdu) != 6 + nbytes:
            raise PduError(fc, f"byte count {nbytes} does not fit quantity {count}")
        data = pdu[6:]
        if fc == 15:
            return WriteMultipleRequest(15, address, tuple(unpack_bits(data, count)))
        regs = tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
        return WriteMultipleRequest(16, address, regs)
    raise UnknownFunctionError(fc)


def encode_read_response(function: int, values: Sequence[int]) -> bytes:
    """The PDU answering a read: bits packed (§6.1/§6.2) or registers big-endian (§6.3/§6.4)."""
    if function not in READ_FUNCTIONS:
        raise RtuEncodeError(f"function {function} is not a read")
    _check_quantity(function, len(values))
    if function in BIT_FUNCTIONS:
        data = pack_bits(values)
    else:
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise RtuEncodeError("register values are 0..65535")
        data = b"".join(_u16(v) for v in values)
    return bytes((function, len(data))) + data


def decode_read_response(pdu: bytes, function: int, count: int) -> list[int]:
    """Registers (or bits 0/1) of a read response; `count` is what the request asked for."""
    if not pdu or pdu[0] != function:
        raise PduError(function, f"response is for function {pdu[0] if pdu else None}")
    want = (count + 7) // 8 if function in BIT_FUNCTIONS else 2 * count
    if len(pdu) < 2 or pdu[1] != want or len(pdu) != 2 + want:
        raise PduError(function, f"expected {want} data bytes for {count} items")
    data = pdu[2:]
    if function in BIT_FUNCTIONS:
        return unpack_bits(data, count)
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def encode_write_response(request: WriteSingleRequest | WriteMultipleRequest) -> bytes:
    """§6.5/§6.6 echo the request; §6.11/§6.12 answer address and quantity."""
    if isinstance(request, WriteSingleRequest):
        return encode_request(request)
    return bytes((request.function,)) + _u16(request.address) + _u16(len(request.values))


def encode_exception(function: int, code: int) -> bytes:
    """§7: function code with bit 7 set, then the exception code."""
    if not 1 <= function <= 0x7F or not 0 <= code <= 0xFF:
        raise RtuEncodeError(f"no exception PDU for function {function} code {code}")
    return bytes((function | 0x80, code))


__all__ = [
    "BIT_FUNCTIONS", "ILLEGAL_DATA_ADDRESS", "ILLEGAL_DATA_VALUE", "ILLEGAL_FUNCTION",
    "MAX_READ_BITS", "MAX_READ_REGISTERS", "MAX_WRITE_BITS", "MAX_WRITE_REGISTERS",
    "READ_FUNCTIONS", "SERVER_DEVICE_FAILURE", "ReadRequest", "Request", "WriteMultipleRequest",
    "WriteSingleRequest", "decode_read_response", "decode_request", "encode_exception",
    "encode_read_response", "encode_request", "encode_write_response", "pack_bits",
    "unpack_bits",
]
