"""HJ 212-2017 frames: the uplink of environmental stations (forest-fire-risk weather, air, water).

A frame on the wire (HJ 212-2017, 通讯包结构 / communication packet structure):

    ##  LLLL  data segment  CCCC  \\r\\n

`LLLL` is the byte length of the data segment in four decimal digits, `CCCC` the CRC of the
data segment alone in four hex digits, high byte first. The data segment is
`QN=…;ST=…;CN=…;PW=…;MN=…;Flag=…;[PNUM=…;PNO=…;]CP=&&…&&`, and inside `CP`, groups separated
by `;` hold items separated by `,`: `DataTime=20240601120000;a01001-Rtd=12.3,a01001-Flag=N`.

The CRC (HJ 212-2017, CRC 校验算法) is *not* the Modbus CRC16, although it uses the same reflected
polynomial 0xA001 and the same 0xFFFF start: HJ 212 folds each byte in as
`crc = (crc >> 8) ^ byte` where Modbus does `crc ^= byte`. The standard's own example data
segment (Appendix A sample, length 0101) has HJ 212 CRC 0x1C80; a Modbus CRC gives 0x0759.

`decode_frame()` takes exactly one frame; `Hj212Decoder` is the h11-style state machine for a
byte stream (`feed()` / `next_frame()` → frame or `NEED_DATA`) that resynchronises on the next
`##` after garbage. Every error is an `Hj212Error`; nothing else escapes on bad input.

Leniency, because the device wins: `QN`, `Flag` (absent in the 2005 edition) and `PNUM`/`PNO`
may be missing; header fields may come in any order; CRC hex digits may be lower case. Field
widths (PW, MN) are not enforced: real stations differ from the table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final, Literal

from protocols.errors import (
    ChecksumMismatchError,
    DeclaredLengthError,
    FieldError,
    ProtocolError,
)
from protocols.stream import NEED_DATA as NEED_DATA  # re-exported: what next_frame() answers
from protocols.stream import ByteStream, NeedData

HEADER: Final = b"##"
TRAILER: Final = b"\r\n"
MAX_DATA_LEN: Final = 1024  # packet structure table: the data segment is 0..1024 bytes
_LENGTH_DIGITS = 4
_CRC_DIGITS = 4
_OVERHEAD = len(HEADER) + _LENGTH_DIGITS + _CRC_DIGITS + len(TRAILER)

# Command codes (CN), from the HJ 212-2017 command code table.
CN_SET_RTD_INTERVAL: Final = "1062"
CN_REALTIME: Final = "2011"  # 实时数据
CN_DAILY: Final = "2031"  # 日历史数据
CN_MINUTE: Final = "2051"  # 分钟数据
CN_HOURLY: Final = "2061"  # 小时数据
CN_REQUEST_REPLY: Final = "9011"  # 请求应答
CN_EXECUTION_RESULT: Final = "9012"  # 执行结果
CN_DATA_REPLY: Final = "9014"  # 数据应答

# Flag bits (data segment table, "Flag"): A = the sender wants an answer, D = the packet is one
# of several (PNUM/PNO present), bits 2..7 the protocol version, 1 for HJ 212-2017.
FLAG_ACK: Final = 0x01
FLAG_SPLIT: Final = 0x02
VERSION_2017: Final = 1


@dataclass(frozen=True, slots=True)
class FactorInfo:
    code: str
    name_zh: str
    name_en: str


# Monitoring factor codes of a forest-fire-risk weather station (HJ 212-2017 factor code table).
TEMPERATURE: Final = FactorInfo("a01001", "温度", "air temperature")
HUMIDITY: Final = FactorInfo("a01002", "湿度", "relative humidity")
PRESSURE: Final = FactorInfo("a01006", "气压", "air pressure")
WIND_SPEED: Final = FactorInfo("a01007", "风速", "wind speed")
WIND_DIRECTION: Final = FactorInfo("a01008", "风向", "wind direction")
FACTORS: Final = {f.code: f for f in (TEMPERATURE, HUMIDITY, PRESSURE, WIND_SPEED, WIND_DIRECTION)}

# Data flags (`xxx-Flag=`), HJ 212-2017 data flag table.
DATA_FLAGS: Final = {
    "N": "正常 normal",
    "F": "停运 stopped",
    "M": "维护 maintenance",
    "S": "手工输入 manual value",
    "D": "故障 fault",
    "C": "校准 calibration",
    "T": "超限 over range",
    "B": "通讯异常 communication fault",
}


class Hj212Error(ProtocolError):
    """Base of every HJ 212 decode or encode error."""


class Hj212CrcError(Hj212Error, ChecksumMismatchError):
    """The CRC in the frame is not the CRC of its data segment."""

    template = "CRC mismatch: data gives {expected:04X}, frame carries {got:04X}"


class Hj212LengthError(Hj212Error, DeclaredLengthError):
    """The length field is not four digits, is too large, or does not match the frame."""


class Hj212FormatError(Hj212Error, FieldError):
    """A field of the frame or of its data segment is missing, repeated or malformed."""


def hj212_crc(data: bytes) -> int:
    """CRC of HJ 212-2017 Appendix A over `data` (the data segment only)."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ byte  # Modbus would do `crc ^= byte` here
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


# ---------------------------------------------------------------------------- model

_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_CODE = re.compile(r"[A-Za-z0-9]+")  # a01001, w01018; the 2005 edition used B02, 011
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_SEPARATORS = frozenset(";,=&")
_NUMERIC_FIELDS = ("Rtd", "Avg", "Min", "Max", "Cou")


def _check_text(field: str, value: str) -> None:
    if not value:
        raise Hj212FormatError(field, "is empty")
    for ch in value:
        if ch in _SEPARATORS or not ch.isprintable():
            raise Hj212FormatError(field, f"contains {ch!r}")


def _check_number(field: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Hj212FormatError(field, f"{value!r} is not a finite number")


@dataclass(frozen=True, slots=True)
class Hj212Factor:
    """The values of one monitoring factor in a CP group: `a01001-Rtd=12.3,a01001-Flag=N`."""

    code: str
    rtd: float | None = None
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    cou: float | None = None
    flag: str | None = None  # one of DATA_FLAGS, kept as sent
    extra: tuple[tuple[str, str], ...] = ()  # other fields (SampleTime, ZsRtd, EFlag, Info...)

    def __post_init__(self) -> None:
        if not _CODE.fullmatch(self.code):
            raise Hj212FormatError("CP", f"bad factor code {self.code!r}")
        for name in _NUMERIC_FIELDS:
            _check_number(f"{self.code}-{name}", getattr(self, name.lower()))
        if self.flag is not None:
            _check_text(f"{self.code}-Flag", self.flag)
        seen = {*_NUMERIC_FIELDS, "Flag"}
        for name, value in self.extra:
            if not _NAME.fullmatch(name) or name in seen:
                raise Hj212FormatError(f"{self.code}-{name}", "bad or repeated field name")
            seen.add(name)
            _check_text(f"{self.code}-{name}", value)
        if self.flag is None and not self.extra and all(
            getattr(self, name.lower()) is None for name in _NUMERIC_FIELDS
        ):
            raise Hj212FormatError(self.code, "a factor needs at least one value")


@dataclass(frozen=True, slots=True)
class Hj212Data:
    """The CP part: the data time, the factors in order, and other `key=value` parameters."""

    data_time: datetime | None = None
    factors: tuple[Hj212Factor, ...] = ()
    params: tuple[tuple[str, str], ...] = ()  # e.g. ("RtdInterval", "30"), ("QnRtn", "1")

    def __post_init__(self) -> None:
        if self.data_time is not None and (self.data_time.tzinfo is not None
                                           or self.data_time.microsecond):
            # DataTime is local station time to the second, with no zone on the wire
            raise Hj212FormatError("DataTime", "must be naive and whole seconds")
        codes = [f.code for f in self.factors]
        if len(set(codes)) != len(codes):
            raise Hj212FormatError("CP", "a factor appears twice")
        keys = [k for k, _ in self.params]
        if len(set(keys)) != len(keys) or "DataTime" in keys:
            raise Hj212FormatError("CP", "a parameter appears twice")
        for key, value in self.params:
            if not _NAME.fullmatch(key):
                raise Hj212FormatError("CP", f"bad parameter name {key!r}")
            _check_text(key, value)

    def factor(self, code: str) -> Hj212Factor | None:
        return next((f for f in self.factors if f.code == code), None)


@dataclass(frozen=True, slots=True)
class Hj212Frame:
    """One HJ 212 packet. `st`, `cn` stay strings ("32", "2011") so they round-trip as sent."""

    qn: str | None  # yyyyMMddHHmmssSSS, the request id; None if the station omits it
    st: str
    cn: str
    pw: str
    mn: str
    flag: int | None
    cp: Hj212Data
    pnum: int | None = None  # with the D flag: packet count and number
    pno: int | None = None

    def __post_init__(self) -> None:
        if self.qn is not None and not (_DIGITS.fullmatch(self.qn) and len(self.qn) <= 20):
            raise Hj212FormatError("QN", "must be up to 20 digits (yyyyMMddHHmmssSSS)")
        for name, value, width in (("ST", self.st, 5), ("CN", self.cn, 7)):
            if not (_DIGITS.fullmatch(value) and len(value) <= width):
                raise Hj212FormatError(name, f"must be 1..{width} digits")
        _check_text("PW", self.pw)
        _check_text("MN", self.mn)
        for name, number, top in (("Flag", self.flag, 255), ("PNUM", self.pnum, 9999),
                                  ("PNO", self.pno, 9999)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, int)
                                       or not 0 <= number <= top):
                raise Hj212FormatError(name, f"must be an integer in 0..{top}")

    @property
    def needs_ack(self) -> bool:
        return self.flag is not None and bool(self.flag & FLAG_ACK)

    @property
    def version(self) -> int | None:
        return None if self.flag is None else self.flag >> 2


def make_qn(when: datetime) -> str:
    """The QN for a moment: yyyyMMddHHmmssSSS."""
    return f"{when:%Y%m%d%H%M%S}{when.microsecond // 1000:03d}"


# ---------------------------------------------------------------------------- encoding


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    # Shortest round-trip digits, never an exponent: the standard's N fields are plain decimals.
    return format(Decimal(repr(value)), "f")


def _timestamp(when: datetime) -> str:
    return (f"{when.year:04d}{when.month:02d}{when.day:02d}"
            f"{when.hour:02d}{when.minute:02d}{when.second:02d}")


def encode_cp(data: Hj212Data) -> str:
    groups: list[str] = []
    if data.data_time is not None:
        groups.append(f"DataTime={_timestamp(data.data_time)}")
    groups += [f"{key}={value}" for key, value in data.params]
    for factor in data.factors:
        items = [f"{factor.code}-{name}={_number(value)}" for name in _NUMERIC_FIELDS
                 if (value := getattr(factor, name.lower())) is not None]
        items += [f"{factor.code}-{name}={value}" for name, value in factor.extra]
        if factor.flag is not None:
            items.append(f"{factor.code}-Flag={factor.flag}")
        groups.append(",".join(items))
    return ";".join(groups)


def encode_data_segment(frame: Hj212Frame) -> bytes:
    fields = [("QN", frame.qn), ("ST", frame.st), ("CN", frame.cn), ("PW", frame.pw),
              ("MN", frame.mn), ("Flag", frame.flag), ("PNUM", frame.pnum), ("PNO", frame.pno)]
    head = "".join(f"{name}={value};" for name, value in fields if value is not None)
    return f"{head}CP=&&{encode_cp(frame.cp)}&&".encode()


def encode_frame(frame: Hj212Frame, *, max_data_len: int = MAX_DATA_LEN) -> bytes:
    """The bytes of one frame, `##` to `\\r\\n`; `Hj212LengthError` if the data is too long."""
    segment = encode_data_segment(frame)
    if len(segment) > min(max_data_len, 9999):
        raise Hj212LengthError(f"data segment of {len(segment)} bytes is over {max_data_len}",
                               len(segment))
    return b"%s%04d%s%04X%s" % (HEADER, len(segment), segment, hj212_crc(segment), TRAILER)


# ---------------------------------------------------------------------------- decoding


def _int(field: str, text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise Hj212FormatError(field, f"{text!r} is not a decimal number")
    return int(text)


def _parse_time(text: str) -> datetime:
    if not (_DIGITS.fullmatch(text) and len(text) == 14):
        raise Hj212FormatError("DataTime", f"{text!r} is not yyyyMMddHHmmss")
    try:
        return datetime(int(text[:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]),
                        int(text[10:12]), int(text[12:14]))
    except ValueError as exc:
        raise Hj212FormatError("DataTime", f"{text!r}: {exc}") from exc


def _split_pair(item: str, where: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise Hj212FormatError(where, f"{item!r} is not key=value")
    return key, value


def decode_cp(text: str) -> Hj212Data:
    """Parse the text between `CP=&&` and `&&`."""
    if "&" in text:
        raise Hj212FormatError("CP", "contains '&' inside the data area")
    data_time: datetime | None = None
    params: list[tuple[str, str]] = []
    fields: dict[str, dict[str, str]] = {}  # factor code -> field -> raw value, in order
    for group in text.split(";"):
        if not group:
            continue  # a stray `;` before `&&` carries nothing
        for item in group.split(","):
            key, value = _split_pair(item, "CP")
            code, dash, name = key.partition("-")
            if dash:
                if not name:
                    raise Hj212FormatError("CP", f"{key!r} has no field name")
                bucket = fields.setdefault(code, {})
                if name in bucket:
                    raise Hj212FormatError(key, "appears twice")
                bucket[name] = value
            elif key == "DataTime":
                if data_time is not None:
                    raise Hj212FormatError("DataTime", "appears twice")
                data_time = _parse_time(value)
            else:
                params.append((key, value))
    factors = []
    for code, raw in fields.items():
        numbers: dict[str, float] = {}
        for name in _NUMERIC_FIELDS:
            if name in raw:
                value = raw.pop(name)
                if not _NUMBER.fullmatch(value):
                    raise Hj212FormatError(f"{code}-{name}", f"{value!r} is not a number")
                numbers[name.lower()] = float(value)
        flag = raw.pop("Flag", None)
        factors.append(Hj212Factor(code, flag=flag, extra=tuple(raw.items()), **numbers))
    return Hj212Data(data_time, tuple(factors), tuple(params))


_HEADER_FIELDS = ("QN", "ST", "CN", "PW", "MN", "Flag", "PNUM", "PNO")


def decode_data_segment(segment: bytes) -> Hj212Frame:
    try:
        text = segment.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Hj212FormatError("data", f"not UTF-8 at byte {exc.start}") from exc
    at = text.find("CP=&&")
    if at < 0 or (at > 0 and text[at - 1] != ";"):
        raise Hj212FormatError("CP", "no CP=&& field")
    if not text.endswith("&&") or len(text) < at + 7:
        raise Hj212FormatError("CP", "does not end with &&")
    head: dict[str, str] = {}
    for item in text[: max(at - 1, 0)].split(";") if at else ():
        key, value = _split_pair(item, "data")
        if key not in _HEADER_FIELDS:
            raise Hj212FormatError(key, "unknown field before CP")
        if key in head:
            raise Hj212FormatError(key, "appears twice")
        head[key] = value
    for key in ("ST", "CN", "PW", "MN"):
        if key not in head:
            raise Hj212FormatError(key, "missing")
    flag, pnum, pno = (None if head.get(k) is None else _int(k, head[k])
                       for k in ("Flag", "PNUM", "PNO"))
    cp = decode_cp(text[at + 5 : -2])
    return Hj212Frame(head.get("QN"), head["ST"], head["CN"], head["PW"], head["MN"], flag, cp,
                      pnum=pnum, pno=pno)


def _declared_length(frame: bytes | bytearray, max_data_len: int) -> int | None:
    """The length field at frame[2:6]; None while it is incomplete, an error once it is bad."""
    field = bytes(frame[2:6])
    if not all(0x30 <= c <= 0x39 for c in field):
        raise Hj212LengthError(f"{field!r} is not four decimal digits")
    if len(field) < _LENGTH_DIGITS:
        return None
    declared = int(field)
    if declared > max_data_len:
        raise Hj212LengthError(f"{declared} is over the limit of {max_data_len}", declared)
    return declared


def decode_frame(frame: bytes, *, max_data_len: int = MAX_DATA_LEN) -> Hj212Frame:
    """Decode exactly one frame, `##` to `\\r\\n`; raises only `Hj212Error`."""
    if not frame.startswith(HEADER):
        raise Hj212FormatError("header", "does not start with ##")
    declared = _declared_length(frame, max_data_len)
    if declared is None:
        raise Hj212LengthError(f"frame of {len(frame)} bytes has no length field")
    if len(frame) != declared + _OVERHEAD:
        raise Hj212LengthError(f"declared {declared} bytes of data, frame holds "
                               f"{len(frame) - _OVERHEAD}", declared)
    end = 6 + declared
    if not frame.endswith(TRAILER):
        raise Hj212FormatError("trailer", "does not end with \\r\\n")
    crc_field = frame[end : end + _CRC_DIGITS]
    if not all(c in b"0123456789ABCDEFabcdef" for c in crc_field):
        raise Hj212FormatError("CRC", f"{crc_field!r} is not four hex digits")
    segment = frame[6:end]
    expected, got = hj212_crc(segment), int(crc_field, 16)
    if expected != got:
        raise Hj212CrcError(expected, got)
    return decode_data_segment(segment)


class Hj212Decoder(ByteStream):
    """Incremental decoder for a byte stream of frames (TCP or serial).

    `feed()` bytes as they come, then call `next_frame()` until it returns `NEED_DATA`. Bytes
    before a `##` are dropped (counted in `discarded`). A bad frame raises its `Hj212Error`
    once, after the decoder has stepped past its `##`; call `next_frame()` again to go on.
    """

    def __init__(self, *, max_data_len: int = MAX_DATA_LEN) -> None:
        super().__init__()
        self._max_data_len = max_data_len

    def next_frame(self) -> Hj212Frame | Literal[NeedData.NEED_DATA]:
        buf = self._buffer
        start = buf.find(HEADER)
        if start < 0:
            self._drop(len(buf) - (1 if buf.endswith(b"#") else 0))
            return NEED_DATA
        while buf[start + 2 : start + 3] == b"#":
            start += 1  # in `###0101`, the header is the last two: no length begins with `#`
        self._drop(start)
        try:
            declared = _declared_length(buf, self._max_data_len)
            if declared is None:
                return NEED_DATA
            end = declared + _OVERHEAD
            # No CR/LF may sit inside a frame: one before the trailer means the length lies,
            # and waiting for the declared bytes would swallow the next good frame.
            if buf.find(TRAILER, 6, end - len(TRAILER)) >= 0:
                raise Hj212LengthError(f"frame ends before its declared {declared} bytes",
                                       declared)
            if len(buf) < end:
                return NEED_DATA
            if buf[end - len(TRAILER) : end] != TRAILER:
                # a cut-off frame followed by the next one: its length runs into the next frame
                raise Hj212LengthError(f"no \\r\\n where the declared {declared} bytes end",
                                       declared)
            frame = decode_frame(bytes(buf[:end]), max_data_len=self._max_data_len)
        except Hj212Error:
            self._drop(1)  # step past this `##` only: a real frame may start inside the bad one
            raise
        del buf[:end]
        return frame
