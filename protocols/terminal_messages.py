"""The messages of the 叫应 terminal protocol (FLT/1) and their body codecs; framing is in
`protocols.terminal`, the specification in docs/terminal-protocol.md (§ numbers below are its).

Each message type is a frozen dataclass checked on construction; `encode_body()` gives the
bytes between a frame's header and its CRC, `decode_body(type, body)` the message back. All
integers are big-endian; strings are UTF-8 with no terminator. Every error on bad input is a
`TerminalError` (a `ProtocolError`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final, TypeVar

from protocols.errors import FieldError, ProtocolError

MAX_TERMINAL_ID_LEN: Final = 32  # §4.4: bytes of printable ASCII
_TERMINAL_ID = re.compile(rb"[\x21-\x7e]{1,32}")
BATTERY_UNKNOWN: Final = 0xFF  # §5.5: no battery, or the terminal cannot measure it
U16: Final = 0xFFFF
U32: Final = 0xFFFFFFFF
E = TypeVar("E", bound=enum.IntEnum)


class TerminalError(ProtocolError):
    """Base of every 叫应 terminal protocol decode or encode error."""


class TerminalFormatError(TerminalError, FieldError):
    """A field is missing, out of range or of an unknown kind."""


class MessageType(enum.IntEnum):
    """§4.1: the type byte of a frame."""

    PLAY = 0x01
    DISPLAY = 0x02
    RECEIPT = 0x03
    ACK = 0x04
    HEARTBEAT = 0x05
    ERROR = 0x06


class WarningLevel(enum.IntEnum):
    """§5.1: the four levels of a Chinese warning, I (red, most severe) to IV (blue)."""

    RED = 1
    ORANGE = 2
    YELLOW = 3
    BLUE = 4


class CameraState(enum.IntEnum):
    """§5.5: the camera of a video 叫应 terminal; NONE on an audio-only terminal."""

    NONE = 0
    OK = 1
    FAULT = 2
    OBSTRUCTED = 3


class ErrorCode(enum.IntEnum):
    """§5.6: known error codes. A receiver keeps an unknown code as its number."""

    UNSUPPORTED_VERSION = 0x01
    UNKNOWN_TYPE = 0x02
    MALFORMED = 0x03
    SPEAKER_FAULT = 0x10
    DISPLAY_FAULT = 0x11
    TEXT_TOO_LONG = 0x12
    BUSY = 0x13
    LOW_POWER = 0x14
    OTHER = 0xFF


# Heartbeat status bits, §5.5. The other bits are reserved: zero on send, rejected on receipt.
MAINS: Final = 0x01
SPEAKER_FAULT: Final = 0x02
DISPLAY_FAULT: Final = 0x04
TAMPER: Final = 0x08
_STATUS_BITS: Final = MAINS | SPEAKER_FAULT | DISPLAY_FAULT | TAMPER


def _check_int(field: str, value: object, low: int, top: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
        raise TerminalFormatError(field, f"{value!r} is not an integer in {low}..{top}")


def _check_text(field: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise TerminalFormatError(field, "must be a str")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise TerminalFormatError(field, f"not encodable as UTF-8: {exc.reason}") from exc


def _decode_text(field: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TerminalFormatError(field, f"not UTF-8 at byte {exc.start}") from exc


def _check_terminal_id(value: object) -> bytes:
    raw = _check_text("terminal_id", value)
    if not _TERMINAL_ID.fullmatch(raw):
        raise TerminalFormatError("terminal_id", f"{value!r} is not 1..32 printable ASCII "
                                  "characters without spaces")
    return raw


def _enum(kind: type[E], field: str, value: object) -> E:
    try:
        return kind(value)  # type: ignore[arg-type]  # checked here: that is the point
    except ValueError:
        raise TerminalFormatError(field, f"{value!r} is not a {kind.__name__}") from None


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Play:
    """§5.1 PLAY (gateway → terminal): sound and show warning `warning_id` `repeat` times."""

    warning_id: int
    level: WarningLevel
    repeat: int
    text: str

    def __post_init__(self) -> None:
        _check_int("warning_id", self.warning_id, 1, U32)
        object.__setattr__(self, "level", _enum(WarningLevel, "level", self.level))
        _check_int("repeat", self.repeat, 1, 0xFF)
        _check_text("text", self.text)


@dataclass(frozen=True, slots=True)
class Display:
    """§5.2 DISPLAY (gateway → terminal): show `text` silently for `seconds` (0: until
    replaced); `display_id` names it in the receipt."""

    display_id: int
    seconds: int
    text: str

    def __post_init__(self) -> None:
        _check_int("display_id", self.display_id, 1, U32)
        _check_int("seconds", self.seconds, 0, U16)
        _check_text("text", self.text)


@dataclass(frozen=True, slots=True)
class Receipt:
    """§5.3 RECEIPT (either way): frame `ref_seq` of type `ref_type` arrived and is accepted.
    `id` is the PLAY's warning id, the DISPLAY's display id, the ACK's warning id, or 0 for a
    HEARTBEAT; `time` the sender's clock (Unix seconds UTC, 0: not set)."""

    ref_seq: int
    ref_type: MessageType
    id: int
    time: int

    def __post_init__(self) -> None:
        _check_int("ref_seq", self.ref_seq, 0, U16)
        object.__setattr__(self, "ref_type", _enum(MessageType, "ref_type", self.ref_type))
        if self.ref_type not in _NEEDS_RECEIPT:
            raise TerminalFormatError("ref_type", f"a {self.ref_type.name} gets no receipt")
        _check_int("id", self.id, 0, U32)
        _check_int("time", self.time, 0, U32)


@dataclass(frozen=True, slots=True)
class Ack:
    """§5.4 ACK (terminal → gateway): a person pressed `button` on `terminal_id` at `time`
    (Unix seconds UTC, 0: clock not set) for warning `warning_id` (0: none was pending)."""

    warning_id: int
    time: int
    button: int
    terminal_id: str

    def __post_init__(self) -> None:
        _check_int("warning_id", self.warning_id, 0, U32)
        _check_int("time", self.time, 0, U32)
        _check_int("button", self.button, 1, 0xFF)
        _check_terminal_id(self.terminal_id)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """§5.5 HEARTBEAT (terminal → gateway): who it is, its clock, when the next one comes,
    and its state. `battery` is a percentage or None (0xFF: none / unknown)."""

    terminal_id: str
    time: int
    interval_s: int
    battery: int | None
    mains: bool
    speaker_fault: bool = False
    display_fault: bool = False
    tamper: bool = False
    camera: CameraState = CameraState.NONE

    def __post_init__(self) -> None:
        _check_terminal_id(self.terminal_id)
        _check_int("time", self.time, 0, U32)
        _check_int("interval_s", self.interval_s, 1, U16)
        if self.battery is not None:
            _check_int("battery", self.battery, 0, 100)
        for name in ("mains", "speaker_fault", "display_fault", "tamper"):
            if not isinstance(getattr(self, name), bool):
                raise TerminalFormatError(name, "must be a bool")
        object.__setattr__(self, "camera", _enum(CameraState, "camera", self.camera))

    @property
    def status(self) -> int:
        return ((MAINS if self.mains else 0) | (SPEAKER_FAULT if self.speaker_fault else 0)
                | (DISPLAY_FAULT if self.display_fault else 0) | (TAMPER if self.tamper else 0))


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """§5.6 ERROR (either way): frame `ref_seq` of type `ref_type` was refused with `code`
    (an `ErrorCode` or another number); `detail` is for people."""

    ref_seq: int
    ref_type: int
    code: int
    detail: str = ""

    def __post_init__(self) -> None:
        _check_int("ref_seq", self.ref_seq, 0, U16)
        _check_int("ref_type", self.ref_type, 0, 0xFF)  # may name a type this side lacks
        _check_int("code", self.code, 0, 0xFF)
        if self.code in _KNOWN_CODES:
            object.__setattr__(self, "code", ErrorCode(self.code))
        _check_text("detail", self.detail)


Message = Play | Display | Receipt | Ack | Heartbeat | ErrorReport
_NEEDS_RECEIPT: Final = frozenset({MessageType.PLAY, MessageType.DISPLAY, MessageType.ACK,
                                   MessageType.HEARTBEAT})
_KNOWN_CODES: Final = frozenset(int(c) for c in ErrorCode)
_TYPES: Final[dict[type, MessageType]] = {
    Play: MessageType.PLAY, Display: MessageType.DISPLAY, Receipt: MessageType.RECEIPT,
    Ack: MessageType.ACK, Heartbeat: MessageType.HEARTBEAT, ErrorReport: MessageType.ERROR,
}


def needs_receipt(message_type: int) -> bool:
    """§4.3: frames of these types are answered by a RECEIPT (or an ERROR)."""
    return message_type in _NEEDS_RECEIPT


def message_type(message: Message) -> MessageType:
    return _TYPES[type(message)]


def receipt_id(message: Message) -> int:
    """The `id` a receipt for `message` carries (§5.3)."""
    match message:
        case Play() | Ack():
            return message.warning_id
        case Display():
            return message.display_id
        case _:
            return 0


# ---------------------------------------------------------------------------- bodies


def _u(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def _terminal_id_field(terminal_id: str) -> bytes:
    raw = terminal_id.encode("ascii")
    return bytes((len(raw),)) + raw


def encode_body(message: Message) -> bytes:
    """The body of `message` (§5), without framing."""
    match message:
        case Play(warning_id, level, repeat, text):
            return _u(warning_id, 4) + bytes((level, repeat)) + text.encode("utf-8")
        case Display(display_id, seconds, text):
            return _u(display_id, 4) + _u(seconds, 2) + text.encode("utf-8")
        case Receipt(ref_seq, ref_type, id_, time):
            return _u(ref_seq, 2) + bytes((ref_type,)) + _u(id_, 4) + _u(time, 4)
        case Ack(warning_id, time, button, terminal_id):
            return (_u(warning_id, 4) + _u(time, 4) + bytes((button,))
                    + _terminal_id_field(terminal_id))
        case Heartbeat():
            battery = BATTERY_UNKNOWN if message.battery is None else message.battery
            return (_terminal_id_field(message.terminal_id) + _u(message.time, 4)
                    + _u(message.interval_s, 2)
                    + bytes((battery, message.status, message.camera)))
        case ErrorReport(ref_seq, ref_type, code, detail):
            return _u(ref_seq, 2) + bytes((ref_type, code)) + detail.encode("utf-8")
    raise TerminalFormatError("message", f"{type(message).__name__} is not a message")


class _Reader:
    """Fields off the front of a body; a short body is a TerminalFormatError."""

    def __init__(self, kind: str, body: bytes) -> None:
        self._kind, self._body, self._at = kind, body, 0

    def take(self, field: str, size: int) -> bytes:
        if self._at + size > len(self._body):
            raise TerminalFormatError(field, f"{self._kind} body of {len(self._body)} bytes "
                                      "ends before it")
        part = self._body[self._at : self._at + size]
        self._at += size
        return part

    def int(self, field: str, size: int) -> int:
        return int.from_bytes(self.take(field, size), "big")

    def terminal_id(self) -> str:
        raw = self.take("terminal_id", self.int("terminal_id", 1))
        if not _TERMINAL_ID.fullmatch(raw):
            raise TerminalFormatError("terminal_id", "not 1..32 printable ASCII characters")
        return raw.decode("ascii")

    def rest(self) -> bytes:
        part, self._at = self._body[self._at :], len(self._body)
        return part

    def end(self) -> None:
        if self._at != len(self._body):
            raise TerminalFormatError("body", f"{len(self._body) - self._at} bytes after the "
                                      f"last field of a {self._kind}")


def decode_body(kind: int, body: bytes) -> Message:
    """The message of a frame of type `kind` with `body`; raises only `TerminalError`."""
    r = _Reader(f"{kind:#04x}", body)
    match kind:
        case MessageType.PLAY:
            # The enum fields take the wire's int: __post_init__ checks and converts it.
            message: Message = Play(r.int("warning_id", 4), r.int("level", 1),  # type: ignore[arg-type]
                                    r.int("repeat", 1), _decode_text("text", r.rest()))
        case MessageType.DISPLAY:
            message = Display(r.int("display_id", 4), r.int("seconds", 2),
                              _decode_text("text", r.rest()))
        case MessageType.RECEIPT:
            message = Receipt(r.int("ref_seq", 2), r.int("ref_type", 1),  # type: ignore[arg-type]
                              r.int("id", 4), r.int("time", 4))
        case MessageType.ACK:
            message = Ack(r.int("warning_id", 4), r.int("time", 4), r.int("button", 1),
                          r.terminal_id())
        case MessageType.HEARTBEAT:
            terminal_id = r.terminal_id()
            time, interval = r.int("time", 4), r.int("interval_s", 2)
            battery, status, camera = r.int("battery", 1), r.int("status", 1), r.int("camera", 1)
            if status & ~_STATUS_BITS:
                raise TerminalFormatError("status", f"reserved bits set in {status:#04x}")
            if battery != BATTERY_UNKNOWN and battery > 100:
                raise TerminalFormatError("battery", f"{battery} is not a percentage or 0xFF")
            message = Heartbeat(terminal_id, time, interval,
                                None if battery == BATTERY_UNKNOWN else battery,
                                bool(status & MAINS), bool(status & SPEAKER_FAULT),
                                bool(status & DISPLAY_FAULT), bool(status & TAMPER),
                                camera)  # type: ignore[arg-type]
        case MessageType.ERROR:
            message = ErrorReport(r.int("ref_seq", 2), r.int("ref_type", 1), r.int("code", 1),
                                  _decode_text("detail", r.rest()))
        case _:
            raise TerminalFormatError("type", f"{kind:#04x} is not a message type")
    r.end()
    return message


__all__ = [
    "BATTERY_UNKNOWN", "Ack", "CameraState", "Display", "ErrorCode", "ErrorReport", "Heartbeat",
    "Message", "MessageType", "Play", "Receipt", "TerminalError", "TerminalFormatError",
    "WarningLevel", "decode_body", "encode_body", "message_type", "needs_receipt", "receipt_id",
]
