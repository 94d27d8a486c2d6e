"""BeiDou RDSS short messages: the sentences a BeiDou user terminal speaks on its serial line.

A sentence on the wire (DOMAIN.md, BeiDou RDSS short messages; the NMEA 0183 layout):

    $  talker+type  ,field,field…  *hh  \\r\\n

`hh` is the XOR of every byte between `$` and `*`, two upper-case hex digits: `$CCICA,0,00*7B`,
`$CCRMO,BSI,2,0*26`, `$BDFKI,082920,TCQ,Y,0,0*70`. Lower-case digits are accepted on input.
The same port carries two dialects: BD-2 ("RDSS 2.1", `$CCICA`/`$BDICI`, `$CCTXA`/`$BDTXR`,
`$BDFKI` TXA form) and BD-3 (`$CCICR`/`$BDICP`, `$BDPWI`, `$CCTCQ`/`$BDTCI`, `$BDFKI` TCQ form,
told apart from the BD-2 form by the hhmmss time in its field 1). The dataclasses, one per
sentence kind, are in `protocols.beidou_sentences` and re-exported here; this module maps them
to and from bytes.

Message content: BD-2 code mode is hex; mixed mode is hex behind an `A4` lead byte; Chinese mode
is the GB2312 text as it is. BD-3 content is hex in every encoding. Dataclasses carry the raw
payload bytes; hex digits may be lower case on input.

Capacity (BD-2, per card level, bits): unencrypted 110 / 408 / 628 / 848, encrypted
140 / 360 / 580 / 1680, express 188; Chinese mode 14 bits a character; mixed mode carries
(bits − 8) / 8 bytes, 77 at level 3, because of its `A4` lead byte. BD-3: regional service up to
14,000 bits, global 560. Read the level and the send interval from `$BDICI` / `$BDICP`.

`decode_sentence()` takes exactly one sentence; `BeidouDecoder` is the h11-style state machine
for a byte stream (`feed()` / `next_sentence()` → sentence or `NEED_DATA`) that resynchronises
on the next `$` after garbage and drops a line longer than `max_line`. Every error on bad input
is a `BeidouError`; nothing else escapes.

Leniency, because the device wins: `$BDICP` may carry more than 23 fields; the fraction of a
`$BDFKI` time is dropped; `$CCICA`'s frame may have three digits; a sentence may lack its CR LF.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Callable
from typing import Final, Literal, NoReturn, TypeVar

from protocols.beidou_sentences import (
    BD2_BEAM_LEVELS,
    BD3_BEAM_LEVELS,
    ICP_HEAD,
    ICP_OTHER_FIELDS,
    TAG_PATTERN,
    Bd2CardInfo,
    Bd2CardQuery,
    Bd2Feedback,
    Bd2Message,
    Bd2Mode,
    Bd2Send,
    Bd2Suppression,
    Bd3CardInfo,
    Bd3CardQuery,
    Bd3Encoding,
    Bd3Feedback,
    Bd3Message,
    Bd3Reason,
    Bd3Send,
    Beam,
    BeamReport,
    BeidouError,
    ChecksumError,
    FieldError,
    FramingError,
    LineTooLongError,
    Sentence,
    UnknownSentence,
    sentence_tag,
)
from protocols.stream import NEED_DATA, ByteStream, NeedData

HEADER: Final = b"$"
TRAILER: Final = b"\r\n"
MIXED_LEAD: Final = b"A4"  # BD-2 mixed mode: content is hex with an `A4` lead byte
# The longest BD-3 regional message is 14,000 bits = 1,750 bytes = 3,500 hex digits; with the
# other fields of `$BDTCI` a line stays well under this.
MAX_LINE: Final = 4096

# BD-2 capacity per card level, bits [DOMAIN.md, BD-2 capacity].
BD2_CAPACITY_BITS: Final = {1: 110, 2: 408, 3: 628, 4: 848}
BD2_ENCRYPTED_CAPACITY_BITS: Final = {1: 140, 2: 360, 3: 580, 4: 1680}
BD2_EXPRESS_BITS: Final = 188
BD2_CHINESE_CHAR_BITS: Final = 14  # a GB2312 character (two bytes) in Chinese mode
BD3_REGIONAL_MAX_BITS: Final = 14_000
BD3_GLOBAL_MAX_BITS: Final = 560

_HEX_DIGITS: Final = frozenset(b"0123456789ABCDEFabcdef")
_DIGITS = re.compile(rb"[0-9]{1,9}")  # nine digits at most: no field needs more
_HEX = re.compile(rb"(?:[0-9A-Fa-f]{2})*")
_TIME = re.compile(rb"([0-9]{2})([0-9]{2})([0-9]{2})(?:\.([0-9]{0,6}))?")
_HHMM = re.compile(rb"([0-9]{2})([0-9]{2})")
_FKI_TIME = re.compile(rb"[0-9]{6}(?:\.[0-9]*)?")  # the BD-3 form of `$BDFKI` starts so


def checksum(body: bytes) -> int:
    """XOR of every byte between `$` and `*`."""
    value = 0
    for byte in body:
        value ^= byte
    return value


# ---------------------------------------------------------------------------- fields in


_E = TypeVar("_E", bound=enum.IntEnum)


class _Fields:
    """The fields of one sentence being read, for errors that name the sentence and field."""

    def __init__(self, tag: str, fields: list[bytes], count: int | None = None) -> None:
        self.tag, self.raw = tag, fields
        if count is not None and len(fields) != count:
            self.fail("fields", f"has {len(fields)} fields, needs {count}")

    def fail(self, field: str, reason: str) -> NoReturn:
        raise FieldError(self.tag, field, reason)

    def number(self, i: int, field: str) -> int:
        if not _DIGITS.fullmatch(self.raw[i]):
            self.fail(field, f"{self.raw[i]!r} is not a decimal number")
        return int(self.raw[i])

    def digits(self, i: int, field: str) -> str:
        if not (self.raw[i].isdigit() and self.raw[i].isascii()):
            self.fail(field, f"{self.raw[i]!r} is not decimal digits")
        return self.raw[i].decode("ascii")

    def flag(self, i: int, field: str, yes: bytes = b"Y", no: bytes = b"N") -> bool:
        if self.raw[i] not in (yes, no):
            self.fail(field, f"{self.raw[i]!r} is neither {yes!r} nor {no!r}")
        return self.raw[i] == yes

    def hex_bytes(self, i: int, field: str, skip: int = 0) -> bytes:
        text = self.raw[i][skip:]
        if not _HEX.fullmatch(text):
            self.fail(field, "is not an even number of hex digits")
        return bytes.fromhex(text.decode("ascii"))

    def text(self, i: int) -> str:
        return self.raw[i].decode("latin-1")

    def command(self, i: int) -> str:
        if not self.raw[i].isascii():
            self.fail("command", f"{self.raw[i]!r} is not three capitals")
        return self.raw[i].decode("ascii")

    def time_of_day(self, i: int, field: str = "time", *, keep_fraction: bool = False) -> dt.time:
        match = _TIME.fullmatch(self.raw[i])
        if match is None:
            self.fail(field, f"{self.raw[i]!r} is not hhmmss[.ss]")
        hh, mm, ss = int(match[1]), int(match[2]), int(match[3])
        if hh > 23 or mm > 59 or ss > 59:
            self.fail(field, f"{self.raw[i]!r} is not a time of day")
        micro = int((match[4] or b"").ljust(6, b"0")) if keep_fraction else 0
        return dt.time(hh, mm, ss, micro)

    def bd2_content(self, i: int, mode: int) -> bytes:
        if mode == Bd2Mode.CHINESE:
            return self.raw[i]  # GB2312 bytes as they came
        if mode == Bd2Mode.MIXED:
            if self.raw[i][:2].upper() != MIXED_LEAD:
                self.fail("content", "mixed-mode content has no A4 lead byte")
            return self.hex_bytes(i, "content", skip=2)
        return self.hex_bytes(i, "content")

    def member(self, i: int, field: str, kind: type[_E]) -> _E:
        value = self.number(i, field)
        if value not in set(kind):
            self.fail(field, f"{value} is not one of {[int(m) for m in kind]}")
        return kind(value)


def _card_query(cls: type[Bd2CardQuery] | type[Bd3CardQuery], raw: list[bytes]) -> Sentence:
    f = _Fields(cls.TAG, raw, 2)
    return cls(f.number(0, "kind"), f.number(1, "frame"))


def _bd2_card_info(raw: list[bytes]) -> Bd2CardInfo:
    f = _Fields("BDICI", raw, 8)
    return Bd2CardInfo(f.digits(0, "card_id"), f.digits(1, "serial"), f.digits(2, "broadcast_id"),
                       f.number(3, "user_type"), f.number(4, "interval_s"), f.number(5, "level"),
                       f.flag(6, "encrypted", b"E", b"N"), f.number(7, "subordinates"))


def _bd2_send(raw: list[bytes]) -> Bd2Send:
    f = _Fields("CCTXA", raw, 4)
    mode = f.member(2, "mode", Bd2Mode)
    return Bd2Send(f.digits(0, "recipient"), f.bd2_content(3, mode), mode,
                   not f.flag(1, "type", b"1", b"0"))


def _bd2_message(raw: list[bytes]) -> Bd2Message:
    f = _Fields("BDTXR", raw, 5)
    mode = f.member(2, "mode", Bd2Mode)
    when: dt.time | None = None
    if raw[3]:
        match = _HHMM.fullmatch(raw[3])
        if match is None or int(match[1]) > 23 or int(match[2]) > 59:
            f.fail("time", f"{raw[3]!r} is not hhmm")
        when = dt.time(int(match[1]), int(match[2]))
    return Bd2Message(f.digits(1, "sender"), f.bd2_content(4, mode), mode, f.number(0, "kind"),
                      when)


def _feedback(raw: list[bytes]) -> Bd2Feedback | Bd3Feedback:
    f = _Fields("BDFKI", raw, 5)
    # The BD-2 and BD-3 `$BDFKI` differ: the BD-3 form has a hhmmss time in field 1.
    if _FKI_TIME.fullmatch(raw[0]):
        return Bd3Feedback(f.time_of_day(0), f.command(1), f.flag(2, "executed"),
                           f.number(3, "reason"), f.number(4, "wait_s"))
    wait = raw[4]  # mmss
    if not (len(wait) == 4 and _DIGITS.fullmatch(wait) and int(wait[2:]) < 60):
        f.fail("wait", f"{wait!r} is not mmss")
    return Bd2Feedback(f.command(0), f.flag(1, "executed"), f.flag(2, "interval"),
                       f.number(3, "suppression"), int(wait[:2]) * 60 + int(wait[2:]))


def _bd3_card_info(raw: list[bytes]) -> Bd3CardInfo:
    f = _Fields("BDICP", raw)
    if len(raw) < ICP_HEAD + 3:
        f.fail("fields", f"has {len(raw)} fields, needs 23")
    others = [*range(1, ICP_HEAD + 1), *range(ICP_HEAD + 3, len(raw))]
    return Bd3CardInfo(f.digits(0, "card_id"), f.number(ICP_HEAD + 1, "interval_s"),
                       f.number(ICP_HEAD + 2, "level_code"), tuple(f.text(i) for i in others))


def _beam_report(raw: list[bytes]) -> BeamReport:
    f = _Fields("BDPWI", raw)
    if len(raw) < 3:
        f.fail("fields", f"has {len(raw)} fields, needs at least 3")
    at, groups = 1, []
    for name, width in (("bd2_beams", BD2_BEAM_LEVELS), ("bd3_beams", BD3_BEAM_LEVELS)):
        if at >= len(raw):
            f.fail(name, "count is missing")
        count, at = f.number(at, name), at + 1
        if len(raw) < at + count * (width + 1):
            f.fail(name, f"{count} beams announced, fewer sent")
        values = [f.number(i, name) for i in range(at, at + count * (width + 1))]
        at += count * (width + 1)
        groups.append(tuple(Beam(values[i], tuple(values[i + 1 : i + width + 1]))
                            for i in range(0, len(values), width + 1)))
    if at != len(raw):
        f.fail("fields", f"{len(raw) - at} fields after the beams")
    return BeamReport(f.time_of_day(0, keep_fraction=True), groups[0], groups[1])


def _bd3_send(raw: list[bytes]) -> Bd3Send:
    f = _Fields("CCTCQ", raw, 6)
    return Bd3Send(f.digits(0, "recipient"), f.hex_bytes(4, "payload"),
                   f.member(3, "encoding", Bd3Encoding), f.number(1, "freq_point"),
                   f.flag(2, "confirm", b"2", b"1"), f.number(5, "interval_s"))


def _bd3_message(raw: list[bytes]) -> Bd3Message:
    f = _Fields("BDTCI", raw, 7)
    return Bd3Message(f.digits(0, "sender"), f.digits(1, "recipient"), f.hex_bytes(6, "payload"),
                      f.member(4, "encoding", Bd3Encoding), f.number(2, "freq_point"),
                      f.time_of_day(3) if raw[3] else None, f.number(5, "flag"))


_DECODERS: Final[dict[str, Callable[[list[bytes]], Sentence]]] = {
    "CCICA": lambda raw: _card_query(Bd2CardQuery, raw),
    "BDICI": _bd2_card_info,
    "CCTXA": _bd2_send,
    "BDTXR": _bd2_message,
    "BDFKI": _feedback,
    "CCICR": lambda raw: _card_query(Bd3CardQuery, raw),
    "BDICP": _bd3_card_info,
    "BDPWI": _beam_report,
    "CCTCQ": _bd3_send,
    "BDTCI": _bd3_message,
}


# ---------------------------------------------------------------------------- fields out


def _n(value: int) -> bytes:
    return b"%d" % value


def _yn(value: bool, yes: bytes = b"Y", no: bytes = b"N") -> bytes:
    return yes if value else no


def _hexout(payload: bytes) -> bytes:
    return payload.hex().upper().encode("ascii")


def _hhmmss(value: dt.time | None) -> bytes:
    return b"" if value is None else b"%02d%02d%02d" % (value.hour, value.minute, value.second)


def _hhmmss_ss(value: dt.time) -> bytes:
    micro = value.microsecond
    return _hhmmss(value) + (b".%02d" % (micro // 10_000) if micro % 10_000 == 0
                             else b".%06d" % micro)


def _bd2_content(mode: int, payload: bytes) -> bytes:
    if mode == Bd2Mode.CHINESE:
        return payload
    return (MIXED_LEAD if mode == Bd2Mode.MIXED else b"") + _hexout(payload)


def _to_fields(s: Sentence) -> list[bytes]:
    """The fields of a sentence between the commas, in wire order."""
    match s:
        case Bd2CardQuery() | Bd3CardQuery():
            return [_n(s.kind), b"%02d" % s.frame]
        case Bd2CardInfo():
            return [s.card_id.encode(), s.serial.encode(), s.broadcast_id.encode(),
                    _n(s.user_type), _n(s.interval_s), _n(s.level), _yn(s.encrypted, b"E"),
                    _n(s.subordinates)]
        case Bd2Send():
            return [s.recipient.encode(), _yn(s.express, b"0", b"1"), _n(s.mode),
                    _bd2_content(s.mode, s.payload)]
        case Bd2Message():
            hhmm = b"" if s.time is None else b"%02d%02d" % (s.time.hour, s.time.minute)
            return [_n(s.kind), s.sender.encode(), _n(s.mode), hhmm,
                    _bd2_content(s.mode, s.payload)]
        case Bd2Feedback():
            return [s.command.encode(), _yn(s.executed), _yn(s.interval_ok),
                    _n(s.suppression), b"%02d%02d" % divmod(s.wait_s, 60)]
        case Bd3CardInfo():
            others = [o.encode("latin-1") for o in s.others]
            return [s.card_id.encode(), *others[:ICP_HEAD], _n(s.interval_s), _n(s.level_code),
                    *others[ICP_HEAD:]]
        case BeamReport():
            out = [_hhmmss_ss(s.time)]
            for beams in (s.bd2_beams, s.bd3_beams):
                out.append(b"%02d" % len(beams))
                for beam in beams:
                    out += [_n(beam.number), *(_n(level) for level in beam.levels)]
            return out
        case Bd3Send():
            return [s.recipient.encode(), _n(s.freq_point), _yn(s.confirm, b"2", b"1"),
                    _n(s.encoding), _hexout(s.payload), _n(s.interval_s)]
        case Bd3Message():
            return [s.sender.encode(), s.recipient.encode(), _n(s.freq_point), _hhmmss(s.time),
                    _n(s.encoding), _n(s.flag), _hexout(s.payload)]
        case Bd3Feedback():
            return [_hhmmss(s.time), s.command.encode(), _yn(s.executed), _n(s.reason),
                    _n(s.wait_s)]
        case UnknownSentence():
            return [f.encode("latin-1") for f in s.fields]
    raise TypeError(f"not a BeiDou sentence: {s!r}")  # a programming error, not bad input


# ---------------------------------------------------------------------------- one sentence


def encode(sentence: Sentence) -> bytes:
    """The bytes of one sentence, `$` to `\\r\\n`, checksum in upper-case hex."""
    body = b",".join([sentence_tag(sentence).encode("ascii"), *_to_fields(sentence)])
    return b"$%s*%02X\r\n" % (body, checksum(body))


def decode_sentence(line: bytes) -> Sentence:
    """Decode exactly one sentence, `$…*hh` with or without its CR LF; raises only BeidouError."""
    if not line.startswith(HEADER):
        raise FramingError("does not start with $")
    framed = line[1:].rstrip(b"\r\n")
    star = framed.rfind(b"*")
    if star < 0:
        raise FramingError("no *hh checksum")
    body, digits = framed[:star], framed[star + 1 :]
    if len(digits) != 2 or not all(c in _HEX_DIGITS for c in digits):
        raise FramingError(f"checksum {digits[:8]!r} is not two hex digits")
    for forbidden in (b"$", b"*", b"\r", b"\n"):
        if forbidden in body:
            raise FramingError(f"{forbidden!r} inside the sentence")
    expected, got = checksum(body), int(digits, 16)
    if expected != got:
        raise ChecksumError(expected, got)
    tag_bytes, *fields = body.split(b",")
    tag = tag_bytes.decode("latin-1")
    if not TAG_PATTERN.fullmatch(tag):
        raise FramingError(f"{tag_bytes[:12]!r} is not a talker and sentence type")
    decoder = _DECODERS.get(tag)
    if decoder is None:
        return UnknownSentence(tag, tuple(f.decode("latin-1") for f in fields))
    return decoder(fields)


# ---------------------------------------------------------------------------- stream


class BeidouDecoder(ByteStream):
    """Incremental decoder for the byte stream of a terminal's serial line.

    `feed()` bytes as they come, then call `next_sentence()` until it returns `NEED_DATA`.
    A sentence ends at `\\n`, or just before the next `$` (a terminal that drops its CR LF, or
    a line cut off). Bytes before a `$` are dropped and counted in `discarded`. A bad sentence
    raises its `BeidouError` once, after the decoder has stepped past it (counted in
    `rejected`); call `next_sentence()` again to go on. With no end within `max_line` bytes of
    a `$`, those bytes are dropped with `LineTooLongError`, so the buffer stays bounded by what
    one `feed()` brings plus `max_line`.
    """

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        if max_line < 8:
            raise ValueError("max_line must be at least 8 bytes")  # a programming error
        super().__init__()
        self._max_line = max_line
        self.rejected = 0

    def next_sentence(self) -> Sentence | Literal[NeedData.NEED_DATA]:
        buf = self._buffer
        start = buf.find(HEADER)
        if start < 0:
            self._drop(len(buf))
            return NEED_DATA
        self._drop(start)
        window = min(len(buf), self._max_line)
        newline = buf.find(b"\n", 1, window)
        following = buf.find(HEADER, 1, window)
        if following >= 0 and (newline < 0 or following < newline):
            end = following  # cut short by the next sentence: decode what is there
        elif newline >= 0:
            end = newline + 1
        elif len(buf) >= self._max_line:
            self._drop(self._max_line)
            self.rejected += 1
            raise LineTooLongError(self._max_line, self._max_line)
        else:
            return NEED_DATA
        line = bytes(buf[:end])
        del buf[:end]
        try:
            return decode_sentence(line)
        except BeidouError:
            self.discarded += len(line)
            self.rejected += 1
            raise


# ---------------------------------------------------------------------------- capacity


def bd2_capacity_bits(level: int, encrypted: bool = False) -> int:
    """Bits one BD-2 message may carry at this card level (1-4)."""
    table = BD2_ENCRYPTED_CAPACITY_BITS if encrypted else BD2_CAPACITY_BITS
    if isinstance(level, bool) or level not in table:
        raise FieldError("BDICI", "level", f"no BD-2 capacity known for level {level!r}")
    return table[level]


def mixed_mode_payload_bytes(bits: int) -> int:
    """Payload bytes a BD-2 mixed-mode message carries in `bits`: (bits − 8) // 8."""
    return max(0, (bits - 8) // 8)  # the first 8 bits hold the A4 lead byte


def bd2_message_bits(mode: Bd2Mode | int, payload: bytes) -> int:
    """Bits of capacity a BD-2 message uses: 14 per Chinese character (two bytes), 8 per byte
    in code mode (two hex digits of 4 bits), and 8 more for the mixed mode's lead byte."""
    if mode == Bd2Mode.CHINESE:
        return BD2_CHINESE_CHAR_BITS * ((len(payload) + 1) // 2)
    if mode == Bd2Mode.CODE:
        return 8 * len(payload)
    if mode == Bd2Mode.MIXED:
        return 8 + 8 * len(payload)
    raise FieldError("CCTXA", "mode", f"{mode!r} is not a BD-2 mode")


__all__ = [
    "BD2_BEAM_LEVELS", "BD2_CAPACITY_BITS", "BD2_CHINESE_CHAR_BITS", "BD2_ENCRYPTED_CAPACITY_BITS",
    "BD2_EXPRESS_BITS", "BD3_BEAM_LEVELS", "BD3_GLOBAL_MAX_BITS", "BD3_REGIONAL_MAX_BITS",
    "HEADER", "ICP_OTHER_FIELDS", "MAX_LINE", "MIXED_LEAD", "NEED_DATA", "TRAILER",
    "Bd2CardInfo", "Bd2CardQuery", "Bd2Feedback", "Bd2Message", "Bd2Mode", "Bd2Send",
    "Bd2Suppression", "Bd3CardInfo", "Bd3CardQuery", "Bd3Encoding", "Bd3Feedback", "Bd3Message",
    "Bd3Reason", "Bd3Send", "Beam", "BeamReport", "BeidouDecoder", "BeidouError",
    "ChecksumError", "FieldError", "FramingError", "LineTooLongError", "NeedData", "Sentence",
    "UnknownSentence", "bd2_capacity_bits", "bd2_message_bits", "checksum", "decode_sentence",
    "encode", "mixed_mode_payload_bytes", "sentence_tag",
]
