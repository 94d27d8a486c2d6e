"""The BeiDou RDSS sentence model: one frozen dataclass per sentence kind, and the errors.

A dataclass checks its fields on construction, so anything that can be built can be sent and
decodes back equal. How each maps to bytes (field order, `Y|N`, hex, `A4`, mmss) and the framing
live in `protocols.beidou`, which re-exports everything here; import from there.

BD-2 ("RDSS 2.1", ASCII) [DOMAIN.md, BeiDou RDSS short messages]:
    $CCICA,kind,frame                        card query          -> Bd2CardQuery
    $BDICI,card,serial,bcast,type,interval,level,E|N,subs        -> Bd2CardInfo
    $CCTXA,recipient,0 express|1 normal,mode,content             -> Bd2Send
    $BDTXR,class,sender,mode,hhmm,content                        -> Bd2Message
    $BDFKI,TXA,Y|N,Y|N,suppression,mmss                          -> Bd2Feedback
BD-3:
    $CCICR,kind,frame                        card query          -> Bd3CardQuery
    $BDICP, 23 fields: [1] card, [14] interval, [15] level       -> Bd3CardInfo
    $BDPWI,hhmmss.ss,n2,beams…,n3,beams…     beam report         -> BeamReport
    $CCTCQ,recipient,freq,1|2,encoding,hex,interval              -> Bd3Send
    $BDTCI,sender,recipient,freq,hhmmss,encoding,flag,hex        -> Bd3Message
    $BDFKI,hhmmss,TCQ,Y|N,reason,wait                            -> Bd3Feedback
Anything else well framed is an `UnknownSentence` (terminals interleave NMEA GNSS lines).

Card ids stay strings: a published `$BDTCI` carries sender `04207733`, zero included. BD-2 cards
are 7 digits; BD-3 cards of 7 to 10 digits are taken (7 and 8 are seen). Comments marked [I]
are inferred from published sentences, not from a confirmed specification.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass
from typing import ClassVar, Final, NoReturn, TypeAlias

from protocols.errors import ChecksumMismatchError, DetailedError, ProtocolError


class BeidouError(ProtocolError):
    """Base of every BeiDou RDSS decode or encode error."""


class FramingError(BeidouError, DetailedError):
    """The bytes are not one `$…*hh` sentence (no `$`, no checksum, a stray separator)."""

    template = "{reason}"
    reason: str


class ChecksumError(BeidouError, ChecksumMismatchError):
    """The `*hh` of a sentence is not the XOR of its bytes between `$` and `*`."""

    template = "checksum mismatch: sentence gives {expected:02X}, carries {got:02X}"


class FieldError(BeidouError, DetailedError):
    """A well-framed sentence (or a dataclass being built) has a missing or malformed field."""

    template = "{sentence} {field}: {reason}"
    sentence: str
    field: str
    reason: str


class LineTooLongError(BeidouError, DetailedError):
    """The stream decoder saw no end of a sentence within `limit` bytes and dropped them."""

    template = "no end of sentence within {limit} bytes; dropped {length}"
    length: int
    limit: int


class Bd2Mode(enum.IntEnum):
    """BD-2 message form (`$CCTXA`/`$BDTXR` mode field)."""

    CHINESE = 0  # GB2312 text, sent as it is; 14 bits a character
    CODE = 1  # hex digits, 4 bits each
    MIXED = 2  # hex behind an `A4` lead byte: (bits - 8) / 8 bytes fit


class Bd3Encoding(enum.IntEnum):
    """BD-3 message encoding (`$CCTCQ`/`$BDTCI` encoding field); the payload is hex in all."""

    CHINESE = 1
    CODE = 2
    MIXED = 3


class Bd3Reason(enum.IntEnum):
    """Why a BD-3 terminal refused a send (`$BDFKI` reason); devices send others too."""

    NONE = 0
    INTERVAL = 1  # the service interval since the last send has not passed; wait says how long
    SUPPRESSED = 2
    SILENT = 3
    POWER_NOT_LOCKED = 4
    NO_CARD = 5
    NO_PERMISSION = 6


class Bd2Suppression(enum.IntEnum):
    """BD-2 `$BDFKI` transmit suppression field."""

    NONE = 0
    SYSTEM = 1
    LOW_BATTERY = 2
    RADIO_SILENCE = 3


SEPARATORS: Final = frozenset(b"$*,\r\n")  # bytes that end or split a sentence on the wire
MAX_NUMBER: Final = 999_999_999  # nine digits: no numeric field needs more
BD2_BEAM_LEVELS: Final = 2  # a BD-2 (RDSS-2) beam in $BDPWI: number + 2 levels [I]
BD3_BEAM_LEVELS: Final = 3  # a BD-3 beam: number + 3 levels, `2,51,44,0` [I]
_COMMAND = re.compile(r"[A-Z]{3}")
TAG_PATTERN: Final = re.compile(r"[A-Z][A-Z0-9]{1,9}")


def _fail(tag: str, field: str, reason: str) -> NoReturn:
    raise FieldError(tag, field, reason)


def _need_int(tag: str, field: str, value: object, lo: int = 0, hi: int = MAX_NUMBER) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(tag, field, f"must be an integer in {lo}..{hi}, not {value!r}")


def _need_bool(tag: str, field: str, value: object) -> None:
    if not isinstance(value, bool):
        _fail(tag, field, f"must be a bool, not {value!r}")


def _need_digits(tag: str, field: str, value: object, lo: int, hi: int) -> None:
    if not (isinstance(value, str) and lo <= len(value) <= hi and value.isascii()
            and value.isdigit()):
        _fail(tag, field, f"must be {lo}..{hi} decimal digits, not {value!r}")


def _need_command(tag: str, value: object) -> None:
    if not isinstance(value, str) or not _COMMAND.fullmatch(value):
        _fail(tag, "command", f"{value!r} is not three capitals")


def _need_text(tag: str, field: str, value: object) -> None:
    """One field as latin-1 text: any byte but the separators survives a round trip."""
    if not isinstance(value, str) or any(ord(c) > 0xFF or ord(c) in SEPARATORS for c in value):
        _fail(tag, field, f"{value!r} is not a field (latin-1, no $ * , CR LF)")


def _need_payload(tag: str, value: object, *, raw: bool = False) -> None:
    if not isinstance(value, bytes):
        _fail(tag, "payload", f"must be bytes, not {type(value).__name__}")
    if raw and any(b in SEPARATORS for b in value):
        _fail(tag, "payload", "Chinese-mode text is sent as it is: no $ * , CR LF in it")


def _need_time(tag: str, field: str, value: object, *, optional: bool = False,
               fraction: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, dt.time) or value.tzinfo is not None:
        _fail(tag, field, f"must be a naive datetime.time, not {value!r}")
    if value.microsecond and not fraction:
        _fail(tag, field, "carries whole seconds only")


def _need_enum(obj: object, tag: str, field: str, kind: type[enum.IntEnum]) -> None:
    """Check an enum field and store it as the enum member (an int 2 becomes CODE)."""
    value = getattr(obj, field)
    if isinstance(value, bool) or not isinstance(value, int) or value not in set(kind):
        _fail(tag, field, f"must be one of {[int(m) for m in kind]}, not {value!r}")
    object.__setattr__(obj, field, kind(value))


# ---------------------------------------------------------------------------- BD-2


@dataclass(frozen=True, slots=True)
class _CardQuery:
    kind: int = 0  # 0 this card; 1 its subordinate users, by frame
    frame: int = 0  # two digits on the wire: `00`

    TAG: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _need_int(self.TAG, "kind", self.kind, 0, 9)
        _need_int(self.TAG, "frame", self.frame, 0, 999)


@dataclass(frozen=True, slots=True)
class Bd2CardQuery(_CardQuery):
    """`$CCICA,0,00`: ask a BD-2 terminal for its card; it answers `$BDICI`."""

    TAG: ClassVar[str] = "CCICA"


@dataclass(frozen=True, slots=True)
class Bd2CardInfo:
    """`$BDICI`: the BD-2 card. Card `0000000` means no card in the terminal."""

    card_id: str  # 7 digits
    serial: str = "0"
    broadcast_id: str = "0"
    user_type: int = 0
    interval_s: int = 60  # service interval: at most one send per this many seconds
    level: int = 3  # communication level 1-4: sets the capacity, see bd2_capacity_bits()
    encrypted: bool = False  # E | N
    subordinates: int = 0

    TAG: ClassVar[str] = "BDICI"

    def __post_init__(self) -> None:
        _need_digits(self.TAG, "card_id", self.card_id, 7, 7)
        _need_digits(self.TAG, "serial", self.serial, 1, 9)
        _need_digits(self.TAG, "broadcast_id", self.broadcast_id, 1, 9)
        for name in ("user_type", "interval_s", "level", "subordinates"):
            _need_int(self.TAG, name, getattr(self, name))
        _need_bool(self.TAG, "encrypted", self.encrypted)

    @property
    def has_card(self) -> bool:
        return self.card_id != "0000000"


@dataclass(frozen=True, slots=True)
class Bd2Send:
    """`$CCTXA`: send a short message from a BD-2 terminal; it answers `$BDFKI` (TXA)."""

    recipient: str  # 7 digits
    payload: bytes  # the message bytes; the wire form follows `mode`
    mode: Bd2Mode = Bd2Mode.MIXED
    express: bool = False  # wire: 0 express | 1 normal

    TAG: ClassVar[str] = "CCTXA"

    def __post_init__(self) -> None:
        _need_digits(self.TAG, "recipient", self.recipient, 7, 7)
        _need_enum(self, self.TAG, "mode", Bd2Mode)
        _need_bool(self.TAG, "express", self.express)
        _need_payload(self.TAG, self.payload, raw=self.mode == Bd2Mode.CHINESE)


@dataclass(frozen=True, slots=True)
class Bd2Message:
    """`$BDTXR`: a short message a BD-2 terminal received."""

    sender: str  # 7 digits
    payload: bytes
    mode: Bd2Mode = Bd2Mode.MIXED
    kind: int = 1  # 1 normal | 2 express | 3 broadcast | 4, 5 answers to queries
    time: dt.time | None = None  # hhmm the message was sent; empty when the terminal omits it

    TAG: ClassVar[str] = "BDTXR"

    def __post_init__(self) -> None:
        _need_digits(self.TAG, "sender", self.sender, 7, 7)
        _need_enum(self, self.TAG, "mode", Bd2Mode)
        _need_int(self.TAG, "kind", self.kind, 0, 9)
        _need_time(self.TAG, "time", self.time, optional=True)
        if self.time is not None and self.time.second:
            _fail(self.TAG, "time", "carries hours and minutes only")
        _need_payload(self.TAG, self.payload, raw=self.mode == Bd2Mode.CHINESE)


@dataclass(frozen=True, slots=True)
class Bd2Feedback:
    """`$BDFKI,TXA,…`: a BD-2 terminal's answer to a command (the BD-2 form, no time)."""

    command: str = "TXA"
    executed: bool = True
    interval_ok: bool = True  # 频度设置指示 [I]: N when the send came before the interval
    suppression: int = Bd2Suppression.NONE  # 0..3 in the spec; devices send 4 too
    wait_s: int = 0  # mmss on the wire

    TAG: ClassVar[str] = "BDFKI"

    def __post_init__(self) -> None:
        _need_command(self.TAG, self.command)
        _need_bool(self.TAG, "executed", self.executed)
        _need_bool(self.TAG, "interval_ok", self.interval_ok)
        _need_int(self.TAG, "suppression", self.suppression, 0, 9)
        _need_int(self.TAG, "wait_s", self.wait_s, 0, 99 * 60 + 59)


# ---------------------------------------------------------------------------- BD-3


@dataclass(frozen=True, slots=True)
class Bd3CardQuery(_CardQuery):
    """`$CCICR,0,00`: ask a BD-3 terminal for its card; it answers `$BDICP`."""

    TAG: ClassVar[str] = "CCICR"


# The fields of `$BDICP` other than [1] card, [14] interval and [15] level, from a published
# `$BDICP,4238473,0,0,3,0,N,2,N,1,0,0,3,1,60,2,0,0,0,0,21,0,0,0*48` [I]: their meanings
# (authorisation, identity, priority, global service, groups) are kept as the terminal sent them.
ICP_OTHER_FIELDS: Final = ("0", "0", "3", "0", "N", "2", "N", "1", "0", "0", "3", "1",
                           "0", "0", "0", "0", "21", "0", "0", "0")
ICP_HEAD: Final = 12  # fields [2]..[13] come before the interval


@dataclass(frozen=True, slots=True)
class Bd3CardInfo:
    """`$BDICP` (23 fields): the BD-3 card: [1] card id, [14] interval, [15] level."""

    card_id: str
    interval_s: int = 60
    level_code: int = 3  # as sent: 0 means level 5 (see `level`)
    others: tuple[str, ...] = ICP_OTHER_FIELDS  # [2]..[13] then [16].., as sent

    TAG: ClassVar[str] = "BDICP"

    def __post_init__(self) -> None:
        _need_digits(self.TAG, "card_id", self.card_id, 7, 10)
        _need_int(self.TAG, "interval_s", self.interval_s)
        _need_int(self.TAG, "level_code", self.level_code, 0, 9)
        if not isinstance(self.others, tuple) or len(self.others) < ICP_HEAD:
            _fail(self.TAG, "others", f"needs at least {ICP_HEAD} fields")
        for i, value in enumerate(self.others):
            _need_text(self.TAG, f"others[{i}]", value)

    @property
    def level(self) -> int:
        """The card level, 1..5: the wire's 0 means 5."""
        return 5 if self.level_code == 0 else self.level_code

    @property
    def has_card(self) -> bool:
        return self.card_id.strip("0") != ""


@dataclass(frozen=True, slots=True)
class Beam:
    """One beam of a `$BDPWI`: its number and the signal levels reported for it [I]."""

    number: int
    levels: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BeamReport:
    """`$BDPWI` (about 1 Hz): UTC time and beams; time 000000.00 or no beams = cannot send."""

    time: dt.time
    bd2_beams: tuple[Beam, ...] = ()
    bd3_beams: tuple[Beam, ...] = ()

    TAG: ClassVar[str] = "BDPWI"

    def __post_init__(self) -> None:
        _need_time(self.TAG, "time", self.time, fraction=True)
        for name, beams, width in (("bd2_beams", self.bd2_beams, BD2_BEAM_LEVELS),
                                   ("bd3_beams", self.bd3_beams, BD3_BEAM_LEVELS)):
            if not isinstance(beams, tuple) or len(beams) > 99:
                _fail(self.TAG, name, "must be a tuple of at most 99 beams")
            for beam in beams:
                if not (isinstance(beam, Beam) and isinstance(beam.levels, tuple)
                        and len(beam.levels) == width):
                    _fail(self.TAG, name, f"each beam has a number and {width} levels")
                for value in (beam.number, *beam.levels):
                    _need_int(self.TAG, name, value)

    @property
    def has_time(self) -> bool:
        return self.time != dt.time(0)

    @property
    def ready(self) -> bool:
        """A send may go now: a valid time and at least one beam with signal."""
        beams = self.bd2_beams + self.bd3_beams
        return self.has_time and any(any(beam.levels) for beam in beams)


@dataclass(frozen=True, slots=True)
class Bd3Send:
    """`$CCTCQ`: send a short message from a BD-3 terminal; it answers `$BDFKI` (TCQ)."""

    recipient: str
    payload: bytes  # hex on the wire whatever the encoding
    encoding: Bd3Encoding = Bd3Encoding.MIXED
    freq_point: int = 2  # 1-5
    confirm: bool = False  # inbound confirmation: wire 1 no | 2 yes
    interval_s: int = 0  # the terminal repeats the send this often; 0 sends once

    TAG: ClassVar[str] = "CCTCQ"

    def __post_init__(self) -> None:
        _need_digits(self.TAG, "recipient", self.recipient, 7, 10)
        _need_payload(self.TAG, self.payload)
        _need_enum(self, self.TAG, "encoding", Bd3Encoding)
        _need_int(self.TAG, "freq_point", self.freq_point, 1, 5)
        _need_bool(self.TAG, "confirm", self.confirm)
        _need_int(self.TAG, "interval_s", self.interval_s)


@dataclass(frozen=True, slots=True)
class Bd3Message:
    """`$BDTCI`: a short message a BD-3 terminal received."""

    sender: str
    recipient: str
    payload: bytes
    encoding: Bd3Encoding = Bd3Encoding.MIXED
    freq_point: int = 2
    time: dt.time | None = None  # hhmmss; empty when the terminal omits it
    flag: int = 0  # [I] 0 in every published sentence

    TAG: ClassVar[str] = "BDTCI"

    def __post_init__(self) -> None:
        _need_digits(self.TAG, "sender", self.sender, 7, 10)
        _need_digits(self.TAG, "recipient", self.recipient, 7, 10)
        _need_payload(self.TAG, self.payload)
        _need_enum(self, self.TAG, "encoding", Bd3Encoding)
        _need_int(self.TAG, "freq_point", self.freq_point, 0, 9)
        _need_time(self.TAG, "time", self.time, optional=True)
        _need_int(self.TAG, "flag", self.flag, 0, 9)


@dataclass(frozen=True, slots=True)
class Bd3Feedback:
    """`$BDFKI,hhmmss,TCQ,…`: a BD-3 terminal's answer to a command (the BD-3 form)."""

    time: dt.time
    command: str = "TCQ"
    executed: bool = True
    reason: int = Bd3Reason.NONE  # 1..6 in the spec (Bd3Reason); devices send others
    wait_s: int = 0  # with reason 1: seconds until a send may go

    TAG: ClassVar[str] = "BDFKI"

    def __post_init__(self) -> None:
        _need_time(self.TAG, "time", self.time)
        _need_command(self.TAG, self.command)
        _need_bool(self.TAG, "executed", self.executed)
        _need_int(self.TAG, "reason", self.reason, 0, 99)
        _need_int(self.TAG, "wait_s", self.wait_s)


KNOWN_TAGS: Final = frozenset(cls.TAG for cls in (
    Bd2CardQuery, Bd2CardInfo, Bd2Send, Bd2Message, Bd2Feedback, Bd3CardQuery, Bd3CardInfo,
    BeamReport, Bd3Send, Bd3Message, Bd3Feedback))


@dataclass(frozen=True, slots=True)
class UnknownSentence:
    """A well-framed sentence of a type this codec does not model (`$GNRMC`, `$BDZDA`, …).

    Fields are latin-1 text, one character a byte, so any byte but the separators survives.
    """

    talker_type: str
    fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.talker_type, str) or not TAG_PATTERN.fullmatch(self.talker_type):
            _fail("?", "talker_type", f"{self.talker_type!r} is not 2-10 capitals and digits")
        if self.talker_type in KNOWN_TAGS:
            _fail(self.talker_type, "talker_type", "has its own dataclass")
        if not isinstance(self.fields, tuple):
            _fail(self.talker_type, "fields", "must be a tuple of str")
        for i, value in enumerate(self.fields):
            _need_text(self.talker_type, f"fields[{i}]", value)


Sentence: TypeAlias = (Bd2CardQuery | Bd2CardInfo | Bd2Send | Bd2Message | Bd2Feedback
                       | Bd3CardQuery | Bd3CardInfo | BeamReport | Bd3Send | Bd3Message
                       | Bd3Feedback | UnknownSentence)


def sentence_tag(sentence: Sentence) -> str:
    """The talker and type of a sentence: `CCTCQ`, or an unknown one's own."""
    if isinstance(sentence, UnknownSentence):
        return sentence.talker_type
    return sentence.TAG
