"""Narrowband frames: what a gateway says over BeiDou, PDT or Tiantong while IP is gone (DESIGN §5).

A frame is the payload of one short message; the radio codec (`protocols.beidou`,
`protocols.hrnp`) carries it. It must fit the terminal's real limit, which the agent reads from
the terminal (`$BDICI`/`$BDICP` card level): BD-2 level 3 gives 628 bits, 77 usable bytes in
mixed mode. Nothing here hard-codes a limit; the encoders take one.

Layout, every integer big-endian or LEB128 (`varint`); `zigzag` maps signed to unsigned:

    byte 0        version (high nibble, 1) | kind (low nibble)
    bytes 1..4    frame time, u32 Unix seconds (the gateway's wall clock when it sent)
    body          kind-specific, below
    last m bytes  MAC: HMAC-SHA256(key, b"fieldlink-nb1" + stream + bytes 0..end of body)[:m]

- The MAC is truncated (`mac_len`, default 4 bytes = 32 bits: a forger has one chance in 4e9
  per message, and a message costs a minute of the terminal's send interval). The stream id
  is in the MAC but not on the air: central knows each gateway's stream from its birth, and a
  frame from an earlier stream does not verify. Central checks the MAC before it parses.
- Records are named by `seq`, the key the full record will have when it arrives over IP, so
  central merges the two instead of keeping both; points by their ordinal in the birth
  inventory (`protocols.envelope.PointInfo.ordinal`), not by name. A device-level alarm
  (`DEVICE_OFFLINE`, raised on the pseudo point `<device>/_device`, which has no ordinal)
  names the ordinal of the device's first point; central turns it back into `<device>/_device`.

Kinds:

- `ALARMS` (1): alarm records, each
  `zigzag(seq - previous seq)` (the first against 0), `varint(point ordinal)`,
  one code byte `rule << 4 | level << 2 | state`, `zigzag(frame time - record time)` and the
  value as an IEEE-754 float32 (NaN: no value). float32 keeps 7 significant digits, enough for
  a sensor reading; the exact value comes with the full record over IP.
- `HEARTBEAT` (2): `varint(last seq)`, `varint(backlog)`, `varint(active alarms)`,
  `varint(seconds since the IP uplink went down)`, one power byte and one battery byte
  (0..100 %, 255 unknown).

Kind 3 is kept for 叫应 acknowledgements (DESIGN §7), which this codec does not carry yet.

Text form (`to_text` / `from_text`): a PDT radio carries text only (UTF-16LE, `protocols.hrnp`),
so a frame goes as the ASCII text `"FL1:" + base64(frame)` (RFC 4648 standard alphabet, with
padding). The prefix lets central tell a Fieldlink frame from what a person types on the same
channel. A text of `max_text_bytes` carries `text_frame_bytes(max_text_bytes)` frame bytes: 45
for 128 bytes (64 UTF-16 units, 4 for the prefix, 60 base64 characters).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from protocols.alarm_attrs import AlarmState, RuleKind
from protocols.errors import DetailedError, ProtocolError
from protocols.limits import INT64_MAX, SEQ_MAX, TS_MAX_MS

VERSION: Final = 1
MAC_DOMAIN: Final = b"fieldlink-nb1"
DEFAULT_MAC_LEN: Final = 4
MIN_MAC_LEN: Final = 4
MAX_MAC_LEN: Final = 32  # all of HMAC-SHA256
HEADER_LEN: Final = 5  # version/kind byte + u32 time
MAX_U32: Final = 0xFFFFFFFF
BATTERY_UNKNOWN: Final = 255
TEXT_PREFIX: Final = "FL1:"  # text form, version 1 of this frame layout


class NarrowbandError(ProtocolError):
    """A narrowband frame that cannot be made or cannot be trusted."""


class FrameTooShortError(NarrowbandError, DetailedError):
    template = "narrowband frame of {length} bytes, at least {needed} needed"
    length: int
    needed: int


class MacMismatchError(NarrowbandError):
    """The MAC does not verify: a wrong key, a wrong stream, or bytes changed on the way."""

    def __init__(self) -> None:
        super().__init__("narrowband frame MAC does not verify")


class NarrowbandVersionError(NarrowbandError):
    def __init__(self, version: int) -> None:
        super().__init__(f"narrowband frame version {version}, this codec knows {VERSION}")
        self.version = version


class UnknownFrameKindError(NarrowbandError, DetailedError):
    template = "unknown narrowband frame kind {kind}"
    kind: int


class MalformedFrameError(NarrowbandError):
    """The MAC verified but the body does not parse (a bug on the sending side)."""


class FrameCapacityError(NarrowbandError, DetailedError):
    """Not even one entry fits the terminal's limit."""

    template = "narrowband limit is {limit} bytes, the smallest frame needs {needed}"
    limit: int
    needed: int


class FrameTextError(NarrowbandError, DetailedError):
    """A text that is not the text form of a frame: `reason` says how."""

    template = "narrowband frame text: {reason}"
    reason: str


class NotFrameTextError(FrameTextError):
    """The text does not start with `TEXT_PREFIX`: a person's message, not a frame."""

    def __init__(self) -> None:
        super().__init__(f"does not start with {TEXT_PREFIX!r}")


class FrameKind(enum.IntEnum):
    ALARMS = 1
    HEARTBEAT = 2
    CALL_ACKS = 3  # reserved for 叫应 acknowledgements


class AlarmRule(enum.IntEnum):
    """The edge rule kinds (`protocols.alarm_attrs.RuleKind`) by wire code; 4 bits."""

    HIGH = 0
    LOW = 1
    RATE = 2
    STALE = 3
    DEVICE_OFFLINE = 4


class AlarmTransition(enum.IntEnum):
    """2 bits: what the record says happened."""

    RAISED = 0
    CHANGED = 1
    CLEARED = 2


# The names an alarm record's attrs use for these codes (`rule`, `state`): the edge turns
# records into entries by them, central entries back into records, so both read them here.
RULE_NAMES: Final = {AlarmRule.HIGH: RuleKind.HIGH, AlarmRule.LOW: RuleKind.LOW,
                     AlarmRule.RATE: RuleKind.RATE, AlarmRule.STALE: RuleKind.STALE,
                     AlarmRule.DEVICE_OFFLINE: RuleKind.OFFLINE}
TRANSITION_NAMES: Final = {AlarmTransition.RAISED: AlarmState.RAISED,
                           AlarmTransition.CHANGED: AlarmState.CHANGED,
                           AlarmTransition.CLEARED: AlarmState.CLEARED}


class PowerState(enum.IntEnum):
    UNKNOWN = 0
    MAINS = 1
    BATTERY = 2
    LOW_BATTERY = 3


@dataclass(frozen=True, slots=True)
class AlarmEntry:
    seq: int
    point: int  # ordinal in the gateway's birth inventory
    rule: AlarmRule
    state: AlarmTransition
    level: int  # 0 (cleared), 1 or 2
    ts: int  # Unix seconds
    value: float | None  # sent as float32; None is NaN on the air

    def __post_init__(self) -> None:
        if not 1 <= self.seq <= SEQ_MAX:  # what central can store (protocols.limits)
            raise ValueError(f"seq must be in 1..{SEQ_MAX}")
        if not 0 <= self.ts <= TS_MAX_MS // 1000:
            raise ValueError(f"ts must be in 0..{TS_MAX_MS // 1000} s")
        if self.point < 0:
            raise ValueError(f"point ordinal must be >= 0, not {self.point}")
        if not 0 <= self.level <= 2:
            raise ValueError(f"level must be 0, 1 or 2, not {self.level}")


@dataclass(frozen=True, slots=True)
class AlarmsFrame:
    ts: int
    entries: tuple[AlarmEntry, ...]


@dataclass(frozen=True, slots=True)
class HeartbeatFrame:
    ts: int
    last_seq: int
    backlog: int
    active_alarms: int
    ip_down_s: int
    power: PowerState = PowerState.UNKNOWN
    battery_pct: int | None = None


Frame = AlarmsFrame | HeartbeatFrame


# --- varints ------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"varint of a negative number {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _zigzag(n: int) -> bytes:
    return _varint(n * 2 if n >= 0 else -n * 2 - 1)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def varint(self) -> int:
        n = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise MalformedFrameError("narrowband frame body ends inside a number")
            byte = self.data[self.pos]
            self.pos += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if n > INT64_MAX:  # a BIGINT at central (protocols.limits)
                    raise MalformedFrameError("narrowband varint above 2**63-1")
                return n
            shift += 7
            if shift > 63:
                raise MalformedFrameError("narrowband varint longer than 64 bits")

    def zigzag(self) -> int:
        n = self.varint()
        return n >> 1 if not n & 1 else -(n >> 1) - 1

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedFrameError("narrowband frame body is cut short")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


# --- MAC ----------------------------------------------------------------------------------------

def _check_mac_len(mac_len: int) -> None:
    if not MIN_MAC_LEN <= mac_len <= MAX_MAC_LEN:
        raise ValueError(f"mac_len must be {MIN_MAC_LEN}..{MAX_MAC_LEN}, not {mac_len}")


def _mac(key: bytes, stream: str, signed: bytes, mac_len: int) -> bytes:
    return hmac.new(key, MAC_DOMAIN + stream.encode() + signed, hashlib.sha256).digest()[:mac_len]


def _header(kind: FrameKind, ts: int) -> bytes:
    if not 0 <= ts <= MAX_U32:
        raise ValueError(f"frame time {ts} does not fit u32 seconds")
    return bytes([VERSION << 4 | kind]) + ts.to_bytes(4, "big")


# --- encoding -----------------------------------------------------------------------------------

def _alarm_entry(entry: AlarmEntry, previous_seq: int, frame_ts: int) -> bytes:
    value = math.nan if entry.value is None else entry.value
    try:
        packed = struct.pack(">f", value)
    except OverflowError as exc:  # beyond float32: a bug upstream, not a radio problem
        raise ValueError(f"alarm value {entry.value} does not fit float32") from exc
    code = int(entry.rule) << 4 | entry.level << 2 | int(entry.state)
    return (_zigzag(entry.seq - previous_seq) + _varint(entry.point) + bytes([code])
            + _zigzag(frame_ts - entry.ts) + packed)


def encode_alarms(ts: int, entries: Sequence[AlarmEntry], *, key: bytes, stream: str,
                  limit: int, mac_len: int = DEFAULT_MAC_LEN) -> tuple[bytes, int]:
    """As many of `entries` as fit in `limit` bytes, in the order given (most important
    first); returns the frame and how many went in. Raises `FrameCapacityError` if not even
    the first one fits, `ValueError` for entries that no frame can carry."""
    _check_mac_len(mac_len)
    if not entries:
        raise ValueError("an alarms frame needs at least one entry")
    body = bytearray(_header(FrameKind.ALARMS, ts))
    previous, count = 0, 0
    for entry in entries:
        chunk = _alarm_entry(entry, previous, ts)
        if len(body) + len(chunk) + mac_len > limit:
            break
        body += chunk
        previous, count = entry.seq, count + 1
    if count == 0:
        needed = HEADER_LEN + len(_alarm_entry(entries[0], 0, ts)) + mac_len
        raise FrameCapacityError(limit, needed)
    signed = bytes(body)
    return signed + _mac(key, stream, signed, mac_len), count


def encode_heartbeat(frame: HeartbeatFrame, *, key: bytes, stream: str,
                     mac_len: int = DEFAULT_MAC_LEN) -> bytes:
    _check_mac_len(mac_len)
    battery = BATTERY_UNKNOWN if frame.battery_pct is None else frame.battery_pct
    if not 0 <= battery <= 100 and battery != BATTERY_UNKNOWN:
        raise ValueError(f"battery_pct must be 0..100 or None, not {frame.battery_pct}")
    signed = (_header(FrameKind.HEARTBEAT, frame.ts) + _varint(frame.last_seq)
              + _varint(frame.backlog) + _varint(frame.active_alarms) + _varint(frame.ip_down_s)
              + bytes([int(frame.power), battery]))
    return signed + _mac(key, stream, signed, mac_len)


# --- decoding -----------------------------------------------------------------------------------

def decode_frame(data: bytes, *, key: bytes, stream: str,
                 mac_len: int = DEFAULT_MAC_LEN) -> Frame:
    """Verify the MAC with the gateway's key and stream, then parse. Every failure is a
    `NarrowbandError`; a frame that does not verify is never parsed."""
    _check_mac_len(mac_len)
    if len(data) < HEADER_LEN + mac_len:
        raise FrameTooShortError(len(data), HEADER_LEN + mac_len)
    signed, mac = data[:-mac_len], data[-mac_len:]
    if not hmac.compare_digest(mac, _mac(key, stream, signed, mac_len)):
        raise MacMismatchError()
    version, kind = signed[0] >> 4, signed[0] & 0x0F
    if version != VERSION:
        raise NarrowbandVersionError(version)
    ts = int.from_bytes(signed[1:5], "big")
    body = _Reader(signed[HEADER_LEN:])
    if kind == FrameKind.ALARMS:
        return AlarmsFrame(ts, _decode_alarms(body, ts))
    if kind == FrameKind.HEARTBEAT:
        return _decode_heartbeat(body, ts)
    raise UnknownFrameKindError(kind)


def _decode_alarms(body: _Reader, frame_ts: int) -> tuple[AlarmEntry, ...]:
    entries: list[AlarmEntry] = []
    previous = 0
    while not body.done:
        seq = previous + body.zigzag()
        point = body.varint()
        code = body.take(1)[0]
        ts = frame_ts - body.zigzag()
        (value,) = struct.unpack(">f", body.take(4))
        try:
            entries.append(AlarmEntry(
                seq=seq, point=point, rule=AlarmRule(code >> 4),
                state=AlarmTransition(code & 0x03), level=code >> 2 & 0x03, ts=ts,
                value=None if math.isnan(value) else value))
        except ValueError as exc:
            raise MalformedFrameError(f"narrowband alarm entry: {exc}") from exc
        previous = seq
    if not entries:
        raise MalformedFrameError("narrowband alarms frame without entries")
    return tuple(entries)


def _decode_heartbeat(body: _Reader, ts: int) -> HeartbeatFrame:
    last_seq, backlog, active, down = body.varint(), body.varint(), body.varint(), body.varint()
    power, battery = body.take(2)
    if not body.done:
        raise MalformedFrameError("narrowband heartbeat has bytes after its end")
    try:
        power_state = PowerState(power)
    except ValueError as exc:
        raise MalformedFrameError(f"narrowband heartbeat power state {power}") from exc
    if battery > 100 and battery != BATTERY_UNKNOWN:
        raise MalformedFrameError(f"narrowband heartbeat battery {battery} %")
    return HeartbeatFrame(ts=ts, last_seq=last_seq, backlog=backlog, active_alarms=active,
                          ip_down_s=down, power=power_state,
                          battery_pct=None if battery == BATTERY_UNKNOWN else battery)


# --- text form (PDT text messages) --------------------------------------------------------------

def to_text(frame: bytes) -> str:
    """The text a radio carries for `frame`: `"FL1:"` and its base64 (standard, padded)."""
    return TEXT_PREFIX + base64.b64encode(frame).decode("ascii")


def from_text(text: str) -> bytes:
    """The frame in a text made by `to_text`. `NotFrameTextError` without the prefix,
    `FrameTextError` for anything but canonical base64 after it (other characters, missing
    padding, stray bits), so that `to_text(from_text(t)) == t`."""
    if not text.startswith(TEXT_PREFIX):
        raise NotFrameTextError()
    body = text[len(TEXT_PREFIX):]
    if not body.isascii():
        raise FrameTextError("characters outside base64")
    try:
        frame = base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise FrameTextError(f"bad base64: {exc}") from exc
    if base64.b64encode(frame).decode("ascii") != body:
        raise FrameTextError("base64 is not canonical")  # stray bits in the last character
    return frame


def text_frame_bytes(max_text_bytes: int) -> int:
    """The longest frame whose text form fits a UTF-16 text of at most `max_text_bytes`."""
    if max_text_bytes < 0:
        raise ValueError("max_text_bytes must not be negative")
    chars = max_text_bytes // 2 - len(TEXT_PREFIX)  # one UTF-16 unit per ASCII character
    return max(0, chars // 4 * 3)
