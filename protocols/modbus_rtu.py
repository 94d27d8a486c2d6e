"""Modbus RTU framing and the PDUs a serial bus carries. Pure: bytes in, frames out, no I/O.

An RTU frame (Modbus over Serial Line V1.02 §2.5.1) is `address | PDU | CRC16`, at most 256
bytes, with the CRC's low byte first (§2.5.1.2, §6.2.2). On a real line frames are delimited by
a silent interval of 3.5 character times (§2.5.1.1); a pseudo-terminal or a USB adapter keeps no
timing, so `RtuDecoder` finds frame ends from the function code and byte counts instead, as
every practical master and slave does, and hunts past bytes that cannot start a frame.

The decoder follows h11: `feed(bytes)`, then call `next_frame()` until it returns `NEED_DATA`.
A bad frame raises an error of this module after the decoder has dropped the offending bytes,
so the caller may count it and keep calling.

PDU helpers cover what the edge agent and the simulators use (Modbus Application Protocol
V1.1b3 §6): read coils/discrete inputs/holding/input registers (1-4), write single coil (5),
write single register (6), write multiple coils (15) and registers (16), and exceptions (§7).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocols.errors import ProtocolError

MAX_ADU: Final = 256  # §2.5.1: "The maximum size of a MODBUS RTU frame is 256 bytes."
MIN_ADU: Final = 4  # address, function, CRC (an exception response is 5)
BROADCAST: Final = 0  # §2.2: address 0 is broadcast; slaves never answer it
# §6.1-§6.4, §6.11, §6.12: the quantity limits of one request.
MAX_READ_BITS: Final = 2000
MAX_READ_REGISTERS: Final = 125
MAX_WRITE_BITS: Final = 1968
MAX_WRITE_REGISTERS: Final = 123
# §2.5.1.1: above 19200 baud the spec fixes t3.5 at 1.750 ms (and t1.5 at 750 µs), because
# UART timing at high rates is too coarse for per-character timers.
FIXED_GAP_ABOVE_BAUD: Final = 19200
FIXED_GAP_S: Final = 0.00175

# §7: the exception codes a slave answers with.
ILLEGAL_FUNCTION: Final = 1
ILLEGAL_DATA_ADDRESS: Final = 2
ILLEGAL_DATA_VALUE: Final = 3
SERVER_DEVICE_FAILURE: Final = 4


# --- errors -------------------------------------------------------------------------------


class ModbusRtuError(ProtocolError):
    """Base of every error of the Modbus RTU codec."""


class FrameError(ModbusRtuError):
    """Bytes that cannot start a frame (an impossible length); the decoder dropped one byte."""


class UnknownFunctionError(FrameError):
    """A function code this codec cannot size or parse."""

    def __init__(self, function: int) -> None:
        super().__init__(f"unknown function code {function}")
        self.function = function


class CrcMismatchError(ModbusRtuError):
    """A whole frame arrived but its CRC is wrong; the decoder dropped the frame."""

    def __init__(self, expected: int, got: int, frame: bytes) -> None:
        super().__init__(f"CRC mismatch: expected {expected:04X}, got {got:04X} "
                         f"({len(frame)}-byte frame)")
        self.expected = expected
        self.got = got
        self.frame = frame


class PduError(ModbusRtuError):
    """A PDU of a known function with inconsistent fields (byte count, quantity, value)."""

    def __init__(self, function: int, reason: str) -> None:
        super().__init__(f"function {function}: {reason}")
        self.function = function
        self.reason = reason


class RtuEncodeError(ModbusRtuError):
    """Arguments that do not fit a frame or PDU (address, quantity, value out of range)."""


# --- CRC and timing -----------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (§6.2.2: init 0xFFFF, reflected polynomial 0xA001).

    The frame carries it low byte first: `crc16(b"\\x01\\x03\\x00\\x00\\x00\\x0a") == 0xCDC5`
    is sent as `C5 CD`.
    """
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def char_bits(bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Bits on the wire per character: start bit, data bits, parity bit if any, stop bits."""
    if bytesize not in (5, 6, 7, 8):
        raise RtuEncodeError(f"bytesize {bytesize} is not 5..8")
    if parity not in ("N", "E", "O", "M", "S"):
        raise RtuEncodeError(f"parity {parity!r} is not one of N, E, O, M, S")
    if stopbits not in (1, 1.5, 2):
        raise RtuEncodeError(f"stopbits {stopbits} is not 1, 1.5 or 2")
    return 1 + bytesize + (0 if parity == "N" else 1) + stopbits


def char_time_s(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Seconds one character takes on the wire."""
    if baudrate <= 0:
        raise RtuEncodeError(f"baudrate {baudrate} must be positive")
    return char_bits(bytesize, parity, stopbits) / baudrate


def inter_frame_gap_s(baudrate: int, bytesize: int = 8, parity: str = "N",
                      stopbits: float = 1) -> float:
    """The silent interval t3.5 between frames (§2.5.1.1).

    3.5 character times, counted with the line's real character length (the spec's 11 bits
    assume a parity bit or two stop bits; an 8N1 line sends 10); above 19200 baud the fixed
    1.750 ms the spec recommends.
    """
    if baudrate > FIXED_GAP_ABOVE_BAUD:
        char_bits(bytesize, parity, stopbits)  # still reject a bad line setting
        return FIXED_GAP_S
    return 3.5 * char_time_s(baudrate, bytesize, parity, stopbits)


# --- frames -------------------------------------------------------------------------------


class NeedData:
    """`next_frame()` needs more bytes (a singleton, `NEED_DATA`)."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class Direction(enum.Enum):
    """Which side's frames a decoder reads: a slave reads requests, the master responses."""

    REQUEST = "request"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class RtuFrame:
    """One RTU frame: slave `address` (0 broadcast, 1..247) and the PDU (function + data)."""

    address: int
    pdu: bytes

    @property
    def function(self) -> int:
        """The function code as sent (with bit 7 set on an exception response)."""
        return self.pdu[0]

    @property
    def is_exception(self) -> bool:
        return bool(self.pdu[0] & 0x80)

    @property
    def exception_code(self) -> int | None:
        """§7: the code of an exception response, None for a normal one."""
        return self.pdu[1] if self.is_exception and len(self.pdu) >= 2 else None

    def encode(self) -> bytes:
        return encode_frame(self.address, self.pdu)


def encode_frame(address: int, pdu: bytes) -> bytes:
    """`address | pdu | CRC` with the CRC low byte first (§2.5.1.2)."""
    if not 0 <= address <= 255:
        raise RtuEncodeError(f"address {address} is outside 0..255")
    if not 1 <= len(pdu) <= MAX_ADU - 3:
        raise RtuEncodeError(f"a PDU is 1..253 bytes, not {len(pdu)}")
    body = bytes((address,)) + bytes(pdu)
    return body + crc16(body).to_bytes(2, "little")


def decode_frame(data: bytes) -> RtuFrame:
    """Exactly one frame (its bytes already delimited); checks length and CRC."""
    if not MIN_ADU <= len(data) <= MAX_ADU:
        raise FrameError(f"an RTU frame is {MIN_ADU}..{MAX_ADU} bytes, not {len(data)}")
    expected = crc16(data[:-2])
    got = int.from_bytes(data[-2:], "little")
    if got != expected:
        raise CrcMismatchError(expected, got, bytes(data))
    return RtuFrame(data[0], bytes(data[1:-2]))


# Frame lengths that follow from the function code alone, including address and CRC.
_FIXED_REQUEST = {1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 7: 4, 8: 8, 11: 4, 12: 4, 17: 4, 22: 10}
_FIXED_RESPONSE = {5: 8, 6: 8, 8: 8, 11: 8, 15: 8, 16: 8, 22: 10}
# Where the byte count sits, and how many bytes precede the counted data (address included).
_COUNTED_REQUEST = {15: (6, 7), 16: (6, 7), 23: (10, 11)}
_COUNTED_RESPONSE = {1: (2, 3), 2: (2, 3), 3: (2, 3), 4: (2, 3), 12: (2, 3), 17: (2, 3),
                     23: (2, 3)}


def frame_length(buf: bytes | bytearray, direction: Direction) -> int | None:
    """Length of the frame at the start of `buf`, or None when more bytes are needed to tell.

    Raises `UnknownFunctionError` for a function code it cannot size and `FrameError` for a
    byte count that makes the frame longer than 256 bytes.
    """
    if len(buf) < 2:
        return None
    function = buf[1]
    if direction is Direction.RESPONSE and function & 0x80:
        return 5  # §7: address, function | 0x80, exception code, CRC (for any function)
    fixed = (_FIXED_REQUEST if direction is Direction.REQUEST else _FIXED_RESPONSE)
    counted = (_COUNTED_REQUEST if direction is Direction.REQUEST else _COUNTED_RESPONSE)
    if direction is Direction.RESPONSE and function == 7:
        return 5  # §6.7 read exception status: one data byte
    if function in fixed:
        return fixed[function]
    if function in counted:
        at, head = counted[function]
        if len(buf) <= at:
            return None
        length = head + buf[at] + 2
        if length > MAX_ADU:
            raise FrameError(f"byte count {buf[at]} makes a {length}-byte frame")
        return length
    raise UnknownFunctionError(function)


class RtuDecoder:
    """Splits a byte stream into RTU frames (h11 style: `feed()`, then `next_frame()`).

    Errors leave the decoder usable: `FrameError` (incl. `UnknownFunctionError`) after it
    dropped the bytes that cannot start a frame (one at a time while hunting, or all of them up
    to a valid frame found behind them), `CrcMismatchError` after it dropped the whole bad
    frame. A frame with a function code it cannot size is still returned when the
    buffer holds exactly that one CRC-valid frame (the sender fell silent after it), so a slave
    can answer it with exception 1. `flush()` drops a partial frame after a silent interval.
    """

    def __init__(self, direction: Direction, *, max_buffer: int = 4 * MAX_ADU) -> None:
        self.direction = direction
        self._buf = bytearray()
        self._max_buffer = max_buffer

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if len(self._buf) > self._max_buffer:
            # Nobody drained: keep the newest bytes, the oldest cannot become a frame now.
            del self._buf[: len(self._buf) - self._max_buffer]

    def flush(self) -> bytes:
        """Drop and return whatever is buffered (a partial frame the line gave up on)."""
        dropped = bytes(self._buf)
        self._buf.clear()
        return dropped

    def next_frame(self) -> RtuFrame | NeedData:
        buf = self._buf
        try:
            length = frame_length(buf, self.direction)
        except UnknownFunctionError:
            if len(buf) >= MIN_ADU and crc16(buf[:-2]) == int.from_bytes(buf[-2:], "little"):
                frame = RtuFrame(buf[0], bytes(buf[1:-2]))
                buf.clear()
                return frame
            del buf[0]
            raise
        except FrameError:
            del buf[0]
            raise
        if length is None or len(buf) < length:
            return NEED_DATA
        frame_bytes = bytes(buf[:length])
        try:
            frame = decode_frame(frame_bytes)
        except CrcMismatchError:
            # Garbage before a frame can look like a frame start whose length swallows the
            # real one: if a whole valid frame starts inside the candidate, the candidate was
            # noise. Otherwise it was one corrupted frame, dropped whole.
            skip = self._valid_frame_inside(length)
            if skip:
                del buf[:skip]
                raise FrameError(f"{skip} byte(s) of noise before a frame") from None
            del buf[:length]
            raise
        del buf[:length]
        return frame

    def _valid_frame_inside(self, length: int) -> int:
        """Offset (1..length-1) of a whole CRC-valid frame in the buffer, or 0 if none."""
        buf = self._buf
        for k in range(1, length):
            try:
                n = frame_length(buf[k:], self.direction)
            except FrameError:
                continue
            if n is not None and k + n <= len(buf) and \
                    crc16(buf[k : k + n - 2]) == int.from_bytes(buf[k + n - 2 : k + n], "little"):
                return k
        return 0


# --- PDUs (Modbus Application Protocol V1.1b3 §6) ------------------------------------------

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
            return bytes((5,)) + _u16(request.address) + (b"\xff\x00" if request.value else b"\x00\x00")
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
        address, count, nbytes = int.from_bytes(pdu[1:3], "big"), int.from_bytes(pdu[3:5], "big"), pdu[5]
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
