"""The module's answers in the Tiantong AT subset (`protocols.at_commands` has the commands and
the syntax both directions share): result codes, `+CREG`, `+CSQ`, `+CMGS`, `+CMTI`, `+CMGR`
and `+CMT` with their PDU lines (3GPP TS 27.005, TS 27.007, ITU-T V.250 §5.7.1).

`ResponseDecoder` is the host's side, an h11-style state machine (`feed()` / `next_event()` →
event or `NEED_DATA`); `encode_response()` is what a module (the simulator) sends. Every error on
bad input is an `AtError`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final, Literal

from protocols.at_commands import (
    CRLF,
    DEFAULT_MAX_LINE,
    PROMPT,
    AtFormatError,
    AtLengthError,
    split_args,
)
from protocols.stream import NEED_DATA, ByteStream, NeedData


class CmsError(enum.IntEnum):
    """TS 27.005 §3.2.5 `<err>` values this project meets (0..255 are network causes)."""

    ME_FAILURE = 300
    OPERATION_NOT_ALLOWED = 302
    OPERATION_NOT_SUPPORTED = 303
    INVALID_PDU_PARAMETER = 304
    SIM_NOT_INSERTED = 310
    SIM_PIN_REQUIRED = 311
    MEMORY_FAILURE = 320
    INVALID_MEMORY_INDEX = 321
    MEMORY_FULL = 322
    SMSC_ADDRESS_UNKNOWN = 330
    NO_NETWORK_SERVICE = 331
    NETWORK_TIMEOUT = 332
    UNKNOWN_ERROR = 500


class RegStatus(enum.IntEnum):
    """TS 27.007 §7.2 `<stat>`."""

    NOT_SEARCHING = 0
    HOME = 1
    SEARCHING = 2
    DENIED = 3
    UNKNOWN = 4
    ROAMING = 5

    @property
    def registered(self) -> bool:
        return self in (RegStatus.HOME, RegStatus.ROAMING)


_STATS: Final = frozenset(int(s) for s in RegStatus)
_ALPHA: Final = re.compile(r"[ !#-+\--~]*")


def _check(field: str, value: object, allowed: range | frozenset[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise AtFormatError(f"{field}={value!r}", "out of range")


@dataclass(frozen=True, slots=True)
class Result:
    """A final result code: `OK` or `ERROR`."""

    ok: bool


@dataclass(frozen=True, slots=True)
class CmsErrorResult:
    """`+CMS ERROR: <err>` (27.005 §3.2.5): a final result of an SMS command."""

    code: int


@dataclass(frozen=True, slots=True)
class CmeErrorResult:
    """`+CME ERROR: <err>` (27.007 §9.2)."""

    code: int


@dataclass(frozen=True, slots=True)
class Prompt:
    """The `> ` that asks for the PDU of `AT+CMGS`."""


@dataclass(frozen=True, slots=True)
class Creg:
    """`+CREG: <n>,<stat>` (read answer, `n` set) or `+CREG: <stat>` (unsolicited)."""

    stat: RegStatus
    n: int | None = None

    def __post_init__(self) -> None:
        _check("stat", self.stat, _STATS)
        object.__setattr__(self, "stat", RegStatus(self.stat))
        if self.n is not None:
            _check("n", self.n, range(3))


@dataclass(frozen=True, slots=True)
class Csq:
    """`+CSQ: <rssi>,<ber>`: rssi 0..31 (−113..−51 dBm) or 99, ber 0..7 or 99."""

    rssi: int
    ber: int = 99

    def __post_init__(self) -> None:
        _check("rssi", self.rssi, frozenset([*range(32), 99]))
        _check("ber", self.ber, frozenset([*range(8), 99]))


@dataclass(frozen=True, slots=True)
class Cmgs:
    """`+CMGS: <mr>`: the message went to the network with TP-MR `mr`."""

    mr: int

    def __post_init__(self) -> None:
        _check("mr", self.mr, range(256))


@dataclass(frozen=True, slots=True)
class Cmti:
    """`+CMTI: <mem>,<index>`: a message arrived and is stored at `index`."""

    mem: str
    index: int


@dataclass(frozen=True, slots=True)
class Cmgr:
    """`+CMGR: <stat>,[<alpha>],<length>` and the PDU line; `length` counts the TPDU."""

    stat: int
    length: int
    pdu: bytes
    alpha: str = ""

    def __post_init__(self) -> None:
        _check("stat", self.stat, range(4))
        _check_pdu(self.length, self.pdu, self.alpha)


@dataclass(frozen=True, slots=True)
class Cmt:
    """`+CMT: [<alpha>],<length>` and the PDU line: a message routed straight to the host."""

    length: int
    pdu: bytes
    alpha: str = ""

    def __post_init__(self) -> None:
        _check_pdu(self.length, self.pdu, self.alpha)


def _check_pdu(length: int, pdu: bytes, alpha: str) -> None:
    _check("length", length, range(256))
    if not isinstance(pdu, bytes) or not pdu:
        raise AtFormatError(repr(pdu), "a PDU is at least one octet")
    if not isinstance(alpha, str) or not _ALPHA.fullmatch(alpha):
        raise AtFormatError(repr(alpha), "alpha is printable ASCII without quotes or commas")


@dataclass(frozen=True, slots=True)
class InfoLine:
    """Any other line: an echoed command, `+CPIN: READY`, a vendor's notice."""

    text: str


Response = (Result | CmsErrorResult | CmeErrorResult | Prompt | Creg | Csq | Cmgs | Cmti | Cmgr
            | Cmt | InfoLine)
_FINAL = (Result, CmsErrorResult, CmeErrorResult)


def is_final(response: Response) -> bool:
    return isinstance(response, _FINAL)


def _line(text: str) -> bytes:
    return CRLF + text.encode("ascii") + CRLF


def encode_response(response: Response) -> bytes:
    """The bytes a module sends for `response` (verbose form, V.250 §5.7.1)."""
    match response:
        case Result(ok):
            return _line("OK" if ok else "ERROR")
        case CmsErrorResult(code):
            return _line(f"+CMS ERROR: {code}")
        case CmeErrorResult(code):
            return _line(f"+CME ERROR: {code}")
        case Prompt():
            return CRLF + PROMPT
        case Creg(stat, None):
            return _line(f"+CREG: {int(stat)}")
        case Creg(stat, n):
            return _line(f"+CREG: {n},{int(stat)}")
        case Csq(rssi, ber):
            return _line(f"+CSQ: {rssi},{ber}")
        case Cmgs(mr):
            return _line(f"+CMGS: {mr}")
        case Cmti(mem, index):
            return _line(f'+CMTI: "{mem}",{index}')
        case Cmgr(stat, length, pdu, alpha):
            return _line(f'+CMGR: {stat},"{alpha}",{length}') + pdu.hex().upper().encode() \
                + CRLF
        case Cmt(length, pdu, alpha):
            return _line(f'+CMT: "{alpha}",{length}') + pdu.hex().upper().encode() + CRLF
        case InfoLine(text):
            return _line(text)
    raise AtFormatError(repr(response), "not a response")


def _ints(line: str, values: list[str], count: int) -> list[int]:
    if len(values) != count or not all(v.strip().isdigit() and len(v.strip()) <= 9
                                       for v in values):
        raise AtFormatError(line, f"expected {count} numbers")
    return [int(v) for v in values]


def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def _hex(line: str) -> bytes:
    try:
        return bytes.fromhex(line)
    except ValueError:
        raise AtFormatError(line, "the PDU line is not hex") from None


class ResponseDecoder(ByteStream):
    """The host's side: what the module sends, one event at a time.

    A `+CMGR` or `+CMT` header waits for its PDU line and comes out as one event. A line that
    names a known response but does not parse raises AtFormatError once (consumed); the
    stream goes on with the next line."""

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        super().__init__()
        self._max_line = max_line
        self._header: tuple[str, int, int, str] | None = None  # kind, stat, length, alpha

    def next_event(self) -> Response | Literal[NeedData.NEED_DATA]:
        buf = self._buffer
        while True:
            while buf and buf[0] in b"\r\n":
                self._drop(1)
            if self._header is None and buf.startswith(PROMPT):
                del buf[:2]
                return Prompt()
            end = min((i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0), default=-1)
            if end < 0:
                if len(buf) > self._max_line:
                    self._drop(len(buf))
                    self._header = None
                    raise AtLengthError(self._max_line)
                return NEED_DATA
            raw = bytes(buf[:end])
            del buf[: end + 1]
            if not raw.isascii():
                self._header = None
                raise AtFormatError(raw.decode("latin-1"), "not ASCII")
            text = raw.decode("ascii").strip()
            if text and (event := self._parse(text)) is not None:
                return event

    def _parse(self, line: str) -> Response | None:
        """The event of one line; None after a +CMGR / +CMT header (its PDU line follows)."""
        if self._header is not None:
            kind, stat, length, alpha = self._header
            self._header = None
            pdu = _hex(line)
            return Cmgr(stat, length, pdu, alpha) if kind == "+CMGR" else Cmt(length, pdu, alpha)
        if line in ("OK", "ERROR"):
            return Result(line == "OK")
        name, colon, rest = line.partition(":")
        if not colon or not name.startswith("+"):
            return InfoLine(line)
        values = [v.strip() for v in split_args(rest.strip())] if rest.strip() else []
        match name:
            case "+CMGR":
                if len(values) != 3:
                    raise AtFormatError(line, "not +CMGR: <stat>,[<alpha>],<length>")
                stat, length = _ints(line, [values[0], values[2]], 2)
                self._header = ("+CMGR", stat, length, _unquote(values[1]))
                return None
            case "+CMT":
                if len(values) != 2:
                    raise AtFormatError(line, "not +CMT: [<alpha>],<length>")
                self._header = ("+CMT", 0, _ints(line, values[1:], 1)[0], _unquote(values[0]))
                return None
        return _one_line_response(name, line, values)


def _one_line_response(name: str, line: str, values: list[str]) -> Response:
    """The response of a `+NAME: values` line that stands alone (no PDU line follows)."""
    match name:
        case "+CMS ERROR":
            return CmsErrorResult(_ints(line, values, 1)[0])
        case "+CME ERROR":
            return CmeErrorResult(_ints(line, values, 1)[0])
        case "+CREG":
            numbers = _ints(line, values[:2], min(len(values), 2)) if values else []
            if not 1 <= len(numbers) <= 2 or numbers[-1] not in _STATS:
                raise AtFormatError(line, "not +CREG: [<n>,]<stat>")
            if len(numbers) == 1:
                return Creg(RegStatus(numbers[0]))
            return Creg(RegStatus(numbers[1]), numbers[0])
        case "+CSQ":
            rssi, ber = _ints(line, values, 2)
            return Csq(rssi, ber)
        case "+CMGS":
            return Cmgs(_ints(line, values[:1], 1)[0])
        case "+CMTI":
            if len(values) != 2:
                raise AtFormatError(line, "not +CMTI: <mem>,<index>")
            return Cmti(_unquote(values[0]), _ints(line, values[1:], 1)[0])
    return InfoLine(line)


__all__ = [
    "CmeErrorResult", "Cmgr", "Cmgs", "CmsError", "CmsErrorResult", "Cmt", "Cmti", "Creg",
    "Csq", "InfoLine", "Prompt", "RegStatus", "Response", "ResponseDecoder", "Result",
    "encode_response", "is_final",
]
