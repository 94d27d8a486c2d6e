"""The 叫应 terminal protocol, FLT/1: frames between a gateway and its warning terminals.

No public wire protocol exists for these terminals (../shared/DOMAIN.md), so Fieldlink defines
one; docs/terminal-protocol.md is its specification (the § numbers below are that page's).
A frame, the same on TCP and on a serial line (§3):

    FB 4A  version:u8  type:u8  seq:u16  length:u16  hcrc:u16  body[length]  crc:u16

`hcrc` is the CRC of bytes 2..7 (version to length), `crc` the CRC of the body; both are
CRC-16/IBM-3740 (poly 0x1021, init 0xFFFF, not reflected, no final XOR; check value 0x29B1 for
"123456789"; Greg Cook, "Catalogue of parametrised CRC algorithms", reveng.sourceforge.io,
also known as CRC-16/CCITT-FALSE), which Python's `binascii.crc_hqx(data, 0xFFFF)` computes.
The header check lets a receiver drop a false start (a body may hold FB 4A) as soon as it has
ten bytes, instead of waiting for a length that is noise.

`TerminalDecoder` is the h11-style state machine (`feed()` / `next_frame()` → frame or
`NEED_DATA`) that resynchronises after garbage. Message bodies are in
`protocols.terminal_messages`. Every error on bad input is a `TerminalError`.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Final, Literal

from protocols.errors import ChecksumMismatchError, DeclaredLengthError, DetailedError
from protocols.stream import NEED_DATA, FramedStream, NeedData
from protocols.terminal_messages import (
    BATTERY_UNKNOWN,
    Ack,
    CameraState,
    Display,
    ErrorCode,
    ErrorReport,
    Heartbeat,
    Message,
    MessageType,
    Play,
    Receipt,
    TerminalError,
    TerminalFormatError,
    WarningLevel,
    decode_body,
    encode_body,
    message_type,
    needs_receipt,
    receipt_id,
)

SYNC: Final = b"\xfb\x4a"  # §3.1: 0xFB never occurs in UTF-8 text; 0x4A is "J" (叫)
VERSION: Final = 1
HEADER_LEN: Final = 10  # sync, version, type, seq, length, hcrc
TRAILER_LEN: Final = 2
OVERHEAD: Final = HEADER_LEN + TRAILER_LEN
DEFAULT_MAX_BODY: Final = 1024  # §3.3: every receiver takes at least this much
MAX_BODY: Final = 0xFFFF


class TerminalCrcError(TerminalError, ChecksumMismatchError):
    """A CRC does not match; `part` is "header" or "body"."""

    template = "{part} CRC mismatch: data gives {expected:#06x}, frame carries {got:#06x}"

    def __init__(self, part: str, expected: int, got: int) -> None:
        self.part = part  # before the generated __init__, which formats the message
        super().__init__(expected, got)


class TerminalLengthError(TerminalError, DeclaredLengthError):
    """A frame is shorter than its header says, longer, or declares too long a body."""


class TerminalFrameRefused(TerminalError, DetailedError):
    """A frame arrived whole with good CRCs but cannot be taken: its version or type is unknown
    or its body is malformed. It carries what an ERROR answer needs (§4.3): `seq`,
    `message_type` (the raw byte) and `code`."""

    template = "frame {seq} of type {message_type:#04x} refused: {reason}"
    seq: int
    message_type: int
    code: ErrorCode
    reason: str


def crc16(data: bytes | bytearray, crc: int = 0xFFFF) -> int:
    """CRC-16/IBM-3740 (a.k.a. CCITT-FALSE): poly 0x1021, init 0xFFFF, MSB first, no XOR out."""
    return binascii.crc_hqx(data, crc)


@dataclass(frozen=True, slots=True)
class TerminalFrame:
    """One frame: the sender's sequence number (§4.2) and the message."""

    seq: int
    message: Message

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) \
                or not 0 <= self.seq <= 0xFFFF:
            raise TerminalFormatError("seq", f"{self.seq!r} is not an integer in 0..65535")
        if not isinstance(self.message, Play | Display | Receipt | Ack | Heartbeat
                          | ErrorReport):
            raise TerminalFormatError("message", f"{self.message!r} is not a message")

    @property
    def type(self) -> MessageType:
        return message_type(self.message)


def encode_frame(frame: TerminalFrame, *, max_body: int = MAX_BODY) -> bytes:
    """The bytes of one frame, sync to CRC. A body over `max_body` is a TerminalLengthError."""
    body = encode_body(frame.message)
    if len(body) > max_body:
        raise TerminalLengthError(f"body of {len(body)} bytes is over {max_body}", len(body))
    header = bytes((VERSION, frame.type)) + frame.seq.to_bytes(2, "big") \
        + len(body).to_bytes(2, "big")
    return SYNC + header + crc16(header).to_bytes(2, "big") + body \
        + crc16(body).to_bytes(2, "big")


def encode(seq: int, message: Message, *, max_body: int = MAX_BODY) -> bytes:
    """Shorthand: `encode_frame(TerminalFrame(seq, message))`."""
    return encode_frame(TerminalFrame(seq, message), max_body=max_body)


def _body_length(header: bytes | bytearray, max_body: int) -> int:
    """Check a whole header (from its sync); the body length it declares."""
    got = int.from_bytes(header[8:10], "big")
    expected = crc16(header[2:8])
    if got != expected:
        raise TerminalCrcError("header", expected, got)
    declared = int.from_bytes(header[6:8], "big")
    if declared > max_body:
        raise TerminalLengthError(f"body of {declared} bytes is over {max_body}", declared)
    return declared


def _frame_from(data: bytes | bytearray, length: int) -> TerminalFrame:
    """The frame in `data` (exactly one, header checked, `length` its body length)."""
    body = bytes(data[HEADER_LEN : HEADER_LEN + length])
    got = int.from_bytes(data[HEADER_LEN + length : HEADER_LEN + length + 2], "big")
    expected = crc16(body)
    if got != expected:
        raise TerminalCrcError("body", expected, got)
    version, kind, seq = data[2], data[3], int.from_bytes(data[4:6], "big")
    if version != VERSION:
        # §3.4: the header never changes between versions, so a whole frame can be skipped
        raise TerminalFrameRefused(seq, kind, ErrorCode.UNSUPPORTED_VERSION,
                                   f"version {version}")
    if kind not in _TYPES:
        raise TerminalFrameRefused(seq, kind, ErrorCode.UNKNOWN_TYPE, "unknown type")
    try:
        return TerminalFrame(seq, decode_body(kind, body))
    except TerminalFormatError as exc:
        raise TerminalFrameRefused(seq, kind, ErrorCode.MALFORMED, str(exc)) from exc


_TYPES: Final = frozenset(int(t) for t in MessageType)


def decode_frame(data: bytes, *, max_body: int = DEFAULT_MAX_BODY) -> TerminalFrame:
    """Decode exactly one frame; raises only `TerminalError`."""
    if not data.startswith(SYNC):
        raise TerminalFormatError("sync", "does not start with FB 4A")
    if len(data) < OVERHEAD:
        raise TerminalLengthError(f"{len(data)} bytes are shorter than a frame")
    length = _body_length(data[:HEADER_LEN], max_body)
    if len(data) != OVERHEAD + length:
        raise TerminalLengthError(f"declared a {length}-byte body, got "
                                  f"{len(data) - OVERHEAD}", length)
    return _frame_from(data, length)


class TerminalDecoder(FramedStream):
    """Incremental decoder for the byte stream of one connection or serial line.

    `feed()` bytes as they come, then call `next_frame()` until it returns `NEED_DATA`. Bytes
    before a sync are dropped and counted in `discarded`. A false start (bad header CRC, too
    long) or a bad body CRC raises its error once, after the decoder has stepped one byte past
    the sync (a frame may start inside the bad one), and counts it in `errors`. A whole frame
    with good CRCs that cannot be taken raises `TerminalFrameRefused` after it is consumed:
    the stream stays in step and the caller can answer with an ERROR. A frame cut off (the
    sender lost power) is found out when the bytes after it fail its body CRC; when the line
    goes quiet instead, the I/O loop calls `skip_partial()`. Memory stays bounded as in h11:
    once `next_frame()` has answered NEED_DATA, the buffer holds less than one frame of at
    most `max_body` (a longer one is refused on its header).
    """

    def __init__(self, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        if not 0 <= max_body <= MAX_BODY:
            raise ValueError(f"max_body must be in 0..{MAX_BODY}")
        super().__init__()
        self._max_body = max_body
        self.refused = 0

    def next_frame(self) -> TerminalFrame | Literal[NeedData.NEED_DATA]:
        buf = self._buffer
        start = buf.find(SYNC)
        if start < 0:  # keep a last FB: it may be the first half of a sync
            self._drop(len(buf) - 1 if buf.endswith(SYNC[:1]) else len(buf))
            return NEED_DATA
        self._drop(start)
        if len(buf) < HEADER_LEN:
            return NEED_DATA
        try:
            length = _body_length(buf[:HEADER_LEN], self._max_body)
            if len(buf) < OVERHEAD + length:
                return NEED_DATA
            frame = _frame_from(buf, length)
        except TerminalFrameRefused:
            self.refused += 1
            del buf[: OVERHEAD + length]
            raise
        except TerminalError:
            self._step_past_bad()
            raise
        del buf[: OVERHEAD + length]
        return frame


__all__ = [
    "BATTERY_UNKNOWN", "DEFAULT_MAX_BODY", "HEADER_LEN", "NEED_DATA", "OVERHEAD", "SYNC",
    "VERSION", "Ack", "CameraState", "Display", "ErrorCode", "ErrorReport", "Heartbeat",
    "Message", "MessageType", "Play", "Receipt", "TerminalCrcError", "TerminalDecoder",
    "TerminalError", "TerminalFormatError", "TerminalFrame", "TerminalFrameRefused",
    "TerminalLengthError", "WarningLevel", "crc16", "decode_frame", "encode", "encode_frame",
    "needs_receipt", "receipt_id",
]
