"""Modbus RTU framing. Pure: bytes in, frames out, no I/O.

An RTU frame (Modbus over Serial Line V1.02 §2.5.1) is `address | PDU | CRC16`, at most 256
bytes, with the CRC's low byte first (§2.5.1.2, §6.2.2). On a real line frames are delimited by
a silent interval of 3.5 character times (§2.5.1.1); a pseudo-terminal or a USB adapter keeps no
timing, so `RtuDecoder` finds frame ends from the function code and byte counts instead, as
every practical master and slave does, and hunts past bytes that cannot start a frame.

The decoder follows h11: `feed(bytes)`, then call `next_frame()` until it returns `NEED_DATA`.
A bad frame raises an error of this module after the decoder has dropped the offending bytes,
so the caller may count it and keep calling.

The PDUs inside the frames are in `protocols.modbus_pdu`; the errors of both are here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

from protocols.errors import ChecksumMismatchError, DetailedError, ProtocolError
from protocols.stream import NEED_DATA as NEED_DATA  # re-exported: what next_frame() answers
from protocols.stream import NeedData

MAX_ADU: Final = 256  # §2.5.1: "The maximum size of a MODBUS RTU frame is 256 bytes."
MIN_ADU: Final = 4  # address, function, CRC (an exception response is 5)
BROADCAST: Final = 0  # §2.2: address 0 is broadcast; slaves never answer it
# §2.5.1.1: above 19200 baud the spec fixes t3.5 at 1.750 ms (and t1.5 at 750 µs), because
# UART timing at high rates is too coarse for per-character timers.
FIXED_GAP_ABOVE_BAUD: Final = 19200
FIXED_GAP_S: Final = 0.00175


# --- errors -------------------------------------------------------------------------------


class ModbusRtuError(ProtocolError):
    """Base of every error of the Modbus RTU codec."""


class FrameError(ModbusRtuError):
    """Bytes that cannot start a frame (an impossible length); the decoder dropped one byte."""


class UnknownFunctionError(FrameError, DetailedError):
    """A function code this codec cannot size or parse."""

    template = "unknown function code {function}"
    function: int


class CrcMismatchError(ModbusRtuError, ChecksumMismatchError):
    """A whole frame arrived but its CRC is wrong; the decoder dropped the frame."""

    template = "CRC mismatch: expected {expected:04X}, got {got:04X} ({frame_length}-byte frame)"
    frame: bytes

    @property
    def frame_length(self) -> int:
        return len(self.frame)


class PduError(ModbusRtuError, DetailedError):
    """A PDU of a known function with inconsistent fields (byte count, quantity, value)."""

    template = "function {function}: {reason}"
    function: int
    reason: str


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

    def next_frame(self) -> RtuFrame | Literal[NeedData.NEED_DATA]:
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
