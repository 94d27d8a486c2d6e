"""SMS PDUs for the Tiantong (天通) bearer: SMS-SUBMIT and SMS-DELIVER in UCS2, concatenated.

A Tiantong satellite module is a 3GPP-style AT modem (`protocols.at_commands`); in PDU mode
(3GPP TS 27.005 §3.1, `AT+CMGF=0`) a message is hex of the service-centre address (TS 24.011
§8.2.5.2, the RP-SC address; a zero length octet means "the one stored in the SIM") followed
by a TPDU of TS 23.040. Cited clauses are TS 23.040 (V17) and TS 23.038 unless said otherwise:

- SMS-SUBMIT §9.2.2.2: first octet (TP-MTI 01, TP-RD, TP-VPF, TP-SRR, TP-UDHI, TP-RP),
  TP-MR, TP-DA, TP-PID, TP-DCS, TP-VP (relative form only, §9.2.3.12.1), TP-UDL, TP-UD;
- SMS-DELIVER §9.2.2.1: first octet (TP-MTI 00, TP-MMS, TP-LP, TP-SRI, TP-UDHI, TP-RP),
  TP-OA, TP-PID, TP-DCS, TP-SCTS (§9.2.3.11), TP-UDL, TP-UD;
- addresses §9.1.2.5: digit count, type of address (0x91 international, 0x81 unknown, both
  ISDN numbering plan), BCD digits low nibble first, an odd count padded with F;
- TP-DCS 0x08 (TS 23.038 §4: general data coding, uncompressed, no class, UCS2): the text is
  UCS2 (written as UTF-16BE, so a character beyond the BMP takes two units); 140 octets a
  message, so 70 characters (§9.2.3.16 TP-UDL counts octets for UCS2);
- concatenation §9.2.3.24.1 (IEI 00, 8-bit reference) and §9.2.3.24.8 (IEI 08, 16-bit): the
  UDH (UDHL, IEs) is counted in TP-UDL; with the 6-octet 8-bit header a part holds
  (140 − 6) / 2 = 67 characters. `split_text` never splits a surrogate pair. Other IEs are
  skipped on receipt (§9.2.3.24: "shall ignore").

Every error on bad input is an `SmsError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from protocols.errors import FieldError, ProtocolError

DCS_UCS2: Final = 0x08
MAX_UD_OCTETS: Final = 140  # §9.2.3.16 with an 8-bit or UCS2 alphabet
SINGLE_CHARS: Final = 70  # UCS2 units in one message
PART_CHARS: Final = 67  # UCS2 units in a part with the 8-bit-reference UDH (6 octets)
IEI_CONCAT_8: Final = 0x00
IEI_CONCAT_16: Final = 0x08
TOA_INTERNATIONAL: Final = 0x91
TOA_UNKNOWN: Final = 0x81
_MTI_DELIVER, _MTI_SUBMIT = 0b00, 0b01
_VPF_NONE, _VPF_RELATIVE = 0b00, 0b10
_UDHI, _RP = 0x40, 0x80
_NUMBER = re.compile(r"\+?[0-9]{1,20}")


class SmsError(ProtocolError):
    """Base of every SMS PDU decode or encode error."""


class SmsFormatError(SmsError, FieldError):
    """A field is missing, out of range, or not what this codec supports."""


def _check_int(field: str, value: object, top: int, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
        raise SmsFormatError(field, f"{value!r} is not an integer in {low}..{top}")


def ucs2_units(text: str) -> int:
    """UTF-16 code units of `text`: what a UCS2 message counts."""
    return len(_ucs2(text)) // 2


def _ucs2(text: str) -> bytes:
    try:
        return text.encode("utf-16-be")
    except UnicodeEncodeError as exc:
        raise SmsFormatError("text", f"not encodable as UCS2: {exc.reason}") from exc


def _text(data: bytes) -> str:
    if len(data) % 2:
        raise SmsFormatError("text", f"{len(data)} octets of UCS2 is an odd count")
    try:
        return data.decode("utf-16-be")
    except UnicodeDecodeError as exc:
        raise SmsFormatError("text", f"not UCS2 at octet {exc.start}") from exc


@dataclass(frozen=True, slots=True)
class Concat:
    """A concatenated message's part (§9.2.3.24.1 / .8): `seq` of `total`, under `ref`."""

    ref: int
    total: int
    seq: int
    wide: bool = False  # a 16-bit reference (IEI 08)

    def __post_init__(self) -> None:
        _check_int("ref", self.ref, 0xFFFF if self.wide else 0xFF)
        _check_int("total", self.total, 255, 1)
        _check_int("seq", self.seq, self.total, 1)

    def encode(self) -> bytes:
        if self.wide:
            return bytes((IEI_CONCAT_16, 4)) + self.ref.to_bytes(2, "big") \
                + bytes((self.total, self.seq))
        return bytes((IEI_CONCAT_8, 3, self.ref, self.total, self.seq))


def _check_address(field: str, number: object) -> None:
    if not isinstance(number, str) or not _NUMBER.fullmatch(number):
        raise SmsFormatError(field, f"{number!r} is not a phone number (+ and 1..20 digits)")


def _check_text(text: object, concat: Concat | None) -> None:
    if not isinstance(text, str):
        raise SmsFormatError("text", "must be a str")
    room = MAX_UD_OCTETS - (len(concat.encode()) + 1 if concat else 0)
    if len(_ucs2(text)) > room:
        raise SmsFormatError("text", f"{ucs2_units(text)} UCS2 units are more than "
                             f"{room // 2} fit")


@dataclass(frozen=True, slots=True)
class SmsSubmit:
    """An SMS-SUBMIT (§9.2.2.2) of UCS2 `text` to `destination`; `reference` is TP-MR,
    `validity` the relative TP-VP octet (§9.2.3.12.1; 167 = 24 h) or None for none."""

    destination: str
    text: str
    reference: int = 0
    concat: Concat | None = None
    validity: int | None = 167
    status_report: bool = False
    reject_duplicates: bool = False
    pid: int = 0

    def __post_init__(self) -> None:
        _check_address("destination", self.destination)
        _check_int("reference", self.reference, 0xFF)
        if self.validity is not None:
            _check_int("validity", self.validity, 0xFF)
        _check_int("pid", self.pid, 0xFF)
        _check_text(self.text, self.concat)


@dataclass(frozen=True, slots=True)
class SmsDeliver:
    """An SMS-DELIVER (§9.2.2.1) of UCS2 `text` from `originator`, stamped `timestamp`
    (aware; §9.2.3.11 keeps whole seconds and quarter-hour offsets) by the centre."""

    originator: str
    text: str
    timestamp: datetime
    concat: Concat | None = None
    more_messages: bool = False
    status_report: bool = False
    pid: int = 0

    def __post_init__(self) -> None:
        _check_address("originator", self.originator)
        _check_int("pid", self.pid, 0xFF)
        ts = self.timestamp
        offset = ts.utcoffset() if isinstance(ts, datetime) else None
        if offset is None or ts.microsecond or not 2000 <= ts.year <= 2099 \
                or offset % timedelta(minutes=15) or abs(offset) >= timedelta(hours=20):
            raise SmsFormatError("timestamp", f"{ts!r}: an aware time in 2000..2099, whole "
                                 "seconds, offset in quarter hours under 20 h")
        _check_text(self.text, self.concat)


# ---------------------------------------------------------------------------- fields


def encode_address(number: str) -> bytes:
    """§9.1.2.5: digit count, type of address, swapped BCD digits (F-padded)."""
    _check_address("address", number)
    digits = number.lstrip("+")
    toa = TOA_INTERNATIONAL if number.startswith("+") else TOA_UNKNOWN
    padded = digits + "F" * (len(digits) % 2)
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    return bytes((len(digits), toa)) + bytes.fromhex(swapped)


def encode_sca(number: str | None) -> bytes:
    """TS 24.011 §8.2.5.2 as TS 27.005 §3.1 prefixes it: octet count (type + digits), or 00
    for "use the centre stored in the SIM"."""
    if number is None:
        return b"\x00"
    address = encode_address(number)
    return bytes((len(address) - 1,)) + address[1:]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, field: str, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise SmsFormatError(field, f"the PDU ends before it ({len(self.data)} octets)")
        part = self.data[self.at : self.at + size]
        self.at += size
        return part

    def octet(self, field: str) -> int:
        return self.take(field, 1)[0]

    def end(self) -> None:
        if self.at != len(self.data):
            raise SmsFormatError("pdu", f"{len(self.data) - self.at} octets after TP-UD")


def _bcd_digits(field: str, data: bytes, count: int) -> str:
    digits = "".join(f"{b & 0x0F:X}{b >> 4:X}" for b in data)
    if not digits[:count].isdigit() or any(c != "F" for c in digits[count:]):
        raise SmsFormatError(field, f"{data.hex()} is not {count} BCD digits")
    return digits[:count]


def _address(r: _Reader, field: str) -> str:
    count = r.octet(field)
    toa = r.octet(field)
    if toa & 0x70 == 0x50:  # TON 101: alphanumeric, GSM 7-bit packed (§9.1.2.5)
        raise SmsFormatError(field, "alphanumeric addresses are not supported")
    if not toa & 0x80 or count > 20:
        raise SmsFormatError(field, f"type {toa:#04x} / {count} digits is not an address")
    digits = _bcd_digits(field, r.take(field, (count + 1) // 2), count)
    if not digits:
        raise SmsFormatError(field, "no digits")
    return ("+" if toa & 0x70 == 0x10 else "") + digits


def decode_sca(r: _Reader) -> str | None:
    size = r.octet("sca")
    if size == 0:
        return None
    toa = r.octet("sca")
    body = r.take("sca", size - 1)
    if not toa & 0x80 or not body:
        raise SmsFormatError("sca", f"type {toa:#04x} is not a centre address")
    digits = _bcd_digits("sca", body, len(body) * 2 - (body[-1] >> 4 == 0xF))
    return ("+" if toa & 0x70 == 0x10 else "") + digits


def _semi(value: int) -> int:
    return ((value % 10) << 4) | (value // 10)


def _unsemi(field: str, octet: int) -> int:
    low, high = octet & 0x0F, octet >> 4
    if low > 9 or high > 9:
        raise SmsFormatError(field, f"{octet:#04x} is not two BCD digits")
    return low * 10 + high


def encode_timestamp(ts: datetime) -> bytes:
    """§9.2.3.11: YY MM DD hh mm ss TZ, each two swapped BCD digits; TZ in quarter hours
    with bit 3 (of the first digit) the sign."""
    offset = ts.utcoffset() or timedelta(0)
    quarters = int(abs(offset) / timedelta(minutes=15))
    tz = _semi(quarters) | (0x08 if offset < timedelta(0) else 0)
    return bytes(_semi(v) for v in (ts.year % 100, ts.month, ts.day, ts.hour, ts.minute,
                                    ts.second)) + bytes((tz,))


def decode_timestamp(data: bytes) -> datetime:
    tz = data[6]
    quarters = _unsemi("timestamp", tz & 0xF7)
    sign = -1 if tz & 0x08 else 1
    fields = [_unsemi("timestamp", b) for b in data[:6]]
    try:
        zone = timezone(sign * timedelta(minutes=15 * quarters)) if quarters else UTC
        y, mo, d, h, mi, sec = fields
        return datetime(2000 + y, mo, d, h, mi, sec, tzinfo=zone)
    except ValueError as exc:
        raise SmsFormatError("timestamp", str(exc)) from exc


def _user_data(text: str, concat: Concat | None) -> bytes:
    body = _ucs2(text)
    if concat is None:
        return bytes((len(body),)) + body
    udh = concat.encode()
    return bytes((len(udh) + 1 + len(body), len(udh))) + udh + body


def _decode_user_data(r: _Reader, udhi: bool) -> tuple[str, Concat | None]:
    udl = r.octet("udl")
    if udl > MAX_UD_OCTETS:
        raise SmsFormatError("udl", f"{udl} octets is over {MAX_UD_OCTETS}")
    ud = r.take("ud", udl)
    concat = None
    if udhi:
        if not ud:
            raise SmsFormatError("udh", "TP-UDHI set but no user data")
        udhl = ud[0]
        header, ud = ud[1 : 1 + udhl], ud[1 + udhl :]
        if len(header) != udhl:
            raise SmsFormatError("udh", f"UDHL {udhl} is longer than the user data")
        at = 0
        while at < len(header):
            if at + 2 > len(header) or at + 2 + header[at + 1] > len(header):
                raise SmsFormatError("udh", "an information element runs past the header")
            iei, value = header[at], header[at + 2 : at + 2 + header[at + 1]]
            at += 2 + len(value)
            try:
                if iei == IEI_CONCAT_8 and len(value) == 3:
                    concat = Concat(value[0], value[1], value[2])
                elif iei == IEI_CONCAT_16 and len(value) == 4:
                    concat = Concat(int.from_bytes(value[:2], "big"), value[2], value[3], True)
            except SmsFormatError:
                raise SmsFormatError("udh", f"bad concatenation element {value.hex()}") from None
    return _text(ud), concat


def _dcs(r: _Reader) -> None:
    dcs = r.octet("dcs")
    if dcs != DCS_UCS2:
        raise SmsFormatError("dcs", f"{dcs:#04x}: only UCS2 (0x08, TS 23.038 §4) is supported")


# ---------------------------------------------------------------------------- PDUs


def encode_submit(message: SmsSubmit, sca: str | None = None) -> tuple[bytes, int]:
    """The PDU for `AT+CMGS` (SCA + TPDU) and the TPDU length that command names."""
    first = _MTI_SUBMIT | (0x04 if message.reject_duplicates else 0) \
        | ((_VPF_RELATIVE if message.validity is not None else _VPF_NONE) << 3) \
        | (0x20 if message.status_report else 0) | (_UDHI if message.concat else 0)
    tpdu = bytes((first, message.reference)) + encode_address(message.destination) \
        + bytes((message.pid, DCS_UCS2))
    if message.validity is not None:
        tpdu += bytes((message.validity,))
    tpdu += _user_data(message.text, message.concat)
    return encode_sca(sca) + tpdu, len(tpdu)


def decode_submit(pdu: bytes) -> tuple[str | None, SmsSubmit]:
    """The centre address and the SMS-SUBMIT of a PDU (SCA + TPDU); raises only SmsError."""
    r = _Reader(pdu)
    sca = decode_sca(r)
    first = r.octet("first octet")
    if first & 0x03 != _MTI_SUBMIT:
        raise SmsFormatError("tp-mti", f"{first & 3} is not SMS-SUBMIT (1)")
    vpf = (first >> 3) & 0x03
    if vpf not in (_VPF_NONE, _VPF_RELATIVE):
        raise SmsFormatError("tp-vpf", f"{vpf}: only none and relative are supported")
    reference = r.octet("tp-mr")
    destination = _address(r, "tp-da")
    pid = r.octet("tp-pid")
    _dcs(r)
    validity = r.octet("tp-vp") if vpf == _VPF_RELATIVE else None
    text, concat = _decode_user_data(r, bool(first & _UDHI))
    r.end()
    return sca, SmsSubmit(destination, text, reference, concat, validity,
                          bool(first & 0x20), bool(first & 0x04), pid)


def encode_deliver(message: SmsDeliver, sca: str | None = None) -> bytes:
    """The PDU of `+CMGR` / `+CMT` (SCA + TPDU). TP-MMS set means "no more messages"."""
    first = _MTI_DELIVER | (0 if message.more_messages else 0x04) \
        | (0x20 if message.status_report else 0) | (_UDHI if message.concat else 0)
    tpdu = bytes((first,)) + encode_address(message.originator) \
        + bytes((message.pid, DCS_UCS2)) + encode_timestamp(message.timestamp) \
        + _user_data(message.text, message.concat)
    return encode_sca(sca) + tpdu


def decode_deliver(pdu: bytes) -> tuple[str | None, SmsDeliver]:
    """The centre address and the SMS-DELIVER of a PDU (SCA + TPDU); raises only SmsError."""
    r = _Reader(pdu)
    sca = decode_sca(r)
    first = r.octet("first octet")
    if first & 0x03 != _MTI_DELIVER:
        raise SmsFormatError("tp-mti", f"{first & 3} is not SMS-DELIVER (0)")
    originator = _address(r, "tp-oa")
    pid = r.octet("tp-pid")
    _dcs(r)
    timestamp = decode_timestamp(r.take("tp-scts", 7))
    text, concat = _decode_user_data(r, bool(first & _UDHI))
    r.end()
    return sca, SmsDeliver(originator, text, timestamp, concat, not first & 0x04,
                           bool(first & 0x20), pid)


# ---------------------------------------------------------------------------- long texts


def split_text(text: str) -> list[str]:
    """One part if it fits 70 UCS2 units, else parts of at most 67 (no surrogate pair split)."""
    if ucs2_units(text) <= SINGLE_CHARS:
        return [text]
    parts, current, units = [], "", 0
    for char in text:
        size = 2 if ord(char) > 0xFFFF else 1
        if units + size > PART_CHARS:
            parts.append(current)
            current, units = "", 0
        current += char
        units += size
    parts.append(current)
    if len(parts) > 255:
        raise SmsFormatError("text", f"{len(parts)} parts: a message has at most 255")
    return parts


def submits_for(destination: str, text: str, *, ref: int, first_reference: int = 0,
                validity: int | None = 167) -> list[SmsSubmit]:
    """The SMS-SUBMITs that carry `text`: one, or parts sharing concatenation `ref`; each
    part has its own TP-MR (`first_reference`, then +1, mod 256)."""
    parts = split_text(text)
    if len(parts) == 1:
        return [SmsSubmit(destination, text, first_reference % 256, validity=validity)]
    return [SmsSubmit(destination, part, (first_reference + i) % 256,
                      Concat(ref, len(parts), i + 1), validity)
            for i, part in enumerate(parts)]


class Reassembler:
    """Puts concatenated SMS-DELIVER parts back together, keyed by (originator, ref, total).
    Keeps at most `max_pending` unfinished messages (the oldest goes first)."""

    def __init__(self, max_pending: int = 64) -> None:
        self._pending: dict[tuple[str, int, int], dict[int, str]] = {}
        self._max = max_pending
        self.dropped = 0

    def add(self, message: SmsDeliver) -> str | None:
        """The whole text once every part is in, else None. A repeated part is ignored."""
        if message.concat is None:
            return message.text
        c = message.concat
        key = (message.originator, c.ref, c.total)
        parts = self._pending.setdefault(key, {})
        parts.setdefault(c.seq, message.text)
        if len(parts) == c.total:
            del self._pending[key]
            return "".join(parts[i] for i in range(1, c.total + 1))
        while len(self._pending) > self._max:
            del self._pending[next(iter(self._pending))]
            self.dropped += 1
        return None


__all__ = [
    "DCS_UCS2", "PART_CHARS", "SINGLE_CHARS", "Concat", "Reassembler", "SmsDeliver", "SmsError",
    "SmsFormatError", "SmsSubmit", "decode_deliver", "decode_submit", "decode_timestamp",
    "encode_address", "encode_deliver", "encode_sca", "encode_submit", "encode_timestamp",
    "split_text", "submits_for", "ucs2_units",
]
