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

- `CALL_ACKS` (3): 叫应 receipts and acknowledgements (DESIGN §7), the outbox EVENT records
  of `protocols.callresp`, each `zigzag(seq - previous seq)`, one flags byte (bit 0: 1 ack,
  0 delivered; bit 1: `by` follows), the warning id and the terminal id as packed ids (below),
  `zigzag(frame time * 1000 - at_ms)` (milliseconds, so the radio copy equals the IP copy) and,
  with bit 1, `varint(length)` and the UTF-8 of `by`.
- `WARNING` (4): the downlink, central → gateway: a segment of a signed warning
  (`protocols.narrowband_down`); it has no MAC of its own (the Ed25519 signature of the whole
  warning is its check), so `decode_frame` refuses it as `UnknownFrameKindError`.

A packed id (`pack_id`): an id whose part after its last `-` (or all of it) is lowercase hex
of even length goes as `varint(len(prefix) << 1 | 1)`, the prefix, `varint(hex bytes)` and
the bytes (`w-5f0c1a2b3c4d5e6f`: 12 bytes, not 19); any other as `varint(len << 1)` and its
ASCII. Full layouts with examples: docs/narrowband-frames.md.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from protocols.alarm_attrs import AlarmState, RuleKind
from protocols.limits import SEQ_MAX, TS_MAX_MS
from protocols.narrowband_wire import (
    MAX_ID_CHARS,
    TEXT_PREFIX,
    VERSION,
    FrameCapacityError,
    FrameTextError,
    FrameTooShortError,
    MacMismatchError,
    MalformedFrameError,
    NarrowbandError,
    NarrowbandVersionError,
    NotFrameTextError,
    UnknownFrameKindError,
    pack_id,
)
from protocols.narrowband_wire import Reader as _Reader
from protocols.narrowband_wire import varint as _varint
from protocols.narrowband_wire import zigzag as _zigzag

MAC_DOMAIN: Final = b"fieldlink-nb1"
DEFAULT_MAC_LEN: Final = 4
MIN_MAC_LEN: Final = 4
MAX_MAC_LEN: Final = 32  # all of HMAC-SHA256
HEADER_LEN: Final = 5  # version/kind byte + u32 time
MAX_U32: Final = 0xFFFFFFFF
BATTERY_UNKNOWN: Final = 255


class FrameKind(enum.IntEnum):
    ALARMS = 1
    HEARTBEAT = 2
    CALL_ACKS = 3  # 叫应 receipts and acknowledgements, gateway → central
    WARNING = 4  # a segment of a signed 叫应 warning, central → gateway (narrowband_down)


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


class CallAckType(enum.IntEnum):
    """Bit 0 of a CALL_ACKS entry's flags: `protocols.callresp.EventType` on the air."""

    DELIVERED = 0
    ACK = 1


MAX_BY_BYTES: Final = 255


@dataclass(frozen=True, slots=True)
class CallAckEntry:
    """One 叫应 event record of the outbox (`protocols.callresp.CallRespEvent`), by its seq."""

    seq: int
    type: CallAckType
    warning_id: str
    terminal: str
    at_ms: int
    by: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.seq <= SEQ_MAX:
            raise ValueError(f"seq must be in 1..{SEQ_MAX}")
        if not 0 <= self.at_ms <= TS_MAX_MS:
            raise ValueError(f"at_ms must be in 0..{TS_MAX_MS}")
        for name in (self.warning_id, self.terminal):
            if not name or len(name) > MAX_ID_CHARS or not name.isascii():
                raise ValueError(f"an id is 1..{MAX_ID_CHARS} ASCII characters, not {name!r}")
        if self.by is not None and len(self.by.encode()) > MAX_BY_BYTES:
            raise ValueError(f"by is longer than {MAX_BY_BYTES} UTF-8 bytes")


@dataclass(frozen=True, slots=True)
class CallAcksFrame:
    ts: int
    entries: tuple[CallAckEntry, ...]


Frame = AlarmsFrame | HeartbeatFrame | CallAcksFrame


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


_E = TypeVar("_E", AlarmEntry, CallAckEntry)


def _fill(kind: FrameKind, ts: int, entries: Sequence[_E],
          chunk_of: Callable[[_E, int, int], bytes], key: bytes, stream: str, limit: int,
          mac_len: int) -> tuple[bytes, int]:
    """The frame of as many `entries` as fit in `limit` bytes, and how many went in."""
    _check_mac_len(mac_len)
    if not entries:
        raise ValueError(f"an {kind.name.lower()} frame needs at least one entry")
    body = bytearray(_header(kind, ts))
    previous, count = 0, 0
    for entry in entries:
        chunk = chunk_of(entry, previous, ts)
        if len(body) + len(chunk) + mac_len > limit:
            break
        body += chunk
        previous, count = entry.seq, count + 1
    if count == 0:
        needed = HEADER_LEN + len(chunk_of(entries[0], 0, ts)) + mac_len
        raise FrameCapacityError(limit, needed)
    signed = bytes(body)
    return signed + _mac(key, stream, signed, mac_len), count


def encode_alarms(ts: int, entries: Sequence[AlarmEntry], *, key: bytes, stream: str,
                  limit: int, mac_len: int = DEFAULT_MAC_LEN) -> tuple[bytes, int]:
    """As many of `entries` as fit in `limit` bytes, in the order given (most important
    first); returns the frame and how many went in. Raises `FrameCapacityError` if not even
    the first one fits, `ValueError` for entries that no frame can carry."""
    return _fill(FrameKind.ALARMS, ts, entries, _alarm_entry, key, stream, limit, mac_len)


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


def _call_ack_entry(entry: CallAckEntry, previous_seq: int, frame_ts: int) -> bytes:
    by = b"" if entry.by is None else entry.by.encode()
    flags = int(entry.type) | (2 if entry.by is not None else 0)
    out = (_zigzag(entry.seq - previous_seq) + bytes([flags]) + pack_id(entry.warning_id)
           + pack_id(entry.terminal) + _zigzag(frame_ts * 1000 - entry.at_ms))
    return out + (_varint(len(by)) + by if entry.by is not None else b"")


def encode_call_acks(ts: int, entries: Sequence[CallAckEntry], *, key: bytes, stream: str,
                     limit: int, mac_len: int = DEFAULT_MAC_LEN) -> tuple[bytes, int]:
    """As `encode_alarms`, for 叫应 receipts and acknowledgements (kind `CALL_ACKS`)."""
    return _fill(FrameKind.CALL_ACKS, ts, entries, _call_ack_entry, key, stream, limit,
                 mac_len)


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
        return AlarmsFrame(ts, _entries(body, ts, _read_alarm, "alarms"))
    if kind == FrameKind.HEARTBEAT:
        return _decode_heartbeat(body, ts)
    if kind == FrameKind.CALL_ACKS:
        return CallAcksFrame(ts, _entries(body, ts, _read_call_ack, "call-acks"))
    raise UnknownFrameKindError(kind)


def _entries(body: _Reader, frame_ts: int, read_entry: Callable[[_Reader, int, int], _E],
             what: str) -> tuple[_E, ...]:
    """The entries of an alarms or call-acks body: each starts with its seq as a zigzag delta
    from the one before (the first from 0); `read_entry(body, seq, frame_ts)` reads the rest."""
    entries: list[_E] = []
    seq = 0
    while not body.done:
        seq += body.zigzag()
        entries.append(read_entry(body, seq, frame_ts))
    if not entries:
        raise MalformedFrameError(f"narrowband {what} frame without entries")
    return tuple(entries)


def _read_call_ack(body: _Reader, seq: int, frame_ts: int) -> CallAckEntry:
    flags = body.take(1)[0]
    if flags > 3:
        raise MalformedFrameError(f"narrowband call-ack flags {flags:#x}")
    warning_id, terminal = body.packed_id(), body.packed_id()
    at_ms = frame_ts * 1000 - body.zigzag()
    by = None
    if flags & 2:
        try:
            by = body.take(body.varint()).decode()
        except UnicodeDecodeError as exc:
            raise MalformedFrameError("narrowband call-ack `by` is not UTF-8") from exc
    try:
        return CallAckEntry(seq=seq, type=CallAckType(flags & 1), warning_id=warning_id,
                            terminal=terminal, at_ms=at_ms, by=by)
    except ValueError as exc:
        raise MalformedFrameError(f"narrowband call-ack entry: {exc}") from exc


def _read_alarm(body: _Reader, seq: int, frame_ts: int) -> AlarmEntry:
    point = body.varint()
    code = body.take(1)[0]
    ts = frame_ts - body.zigzag()
    (value,) = struct.unpack(">f", body.take(4))
    try:
        return AlarmEntry(seq=seq, point=point, rule=AlarmRule(code >> 4),
                          state=AlarmTransition(code & 0x03), level=code >> 2 & 0x03, ts=ts,
                          value=None if math.isnan(value) else value)
    except ValueError as exc:
        raise MalformedFrameError(f"narrowband alarm entry: {exc}") from exc


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


__all__ = ["BATTERY_UNKNOWN", "DEFAULT_MAC_LEN", "HEADER_LEN", "MAC_DOMAIN", "MAX_BY_BYTES",
           "MAX_ID_CHARS", "MAX_MAC_LEN", "MAX_U32", "MIN_MAC_LEN", "RULE_NAMES", "TEXT_PREFIX",
           "TRANSITION_NAMES", "VERSION", "AlarmEntry", "AlarmRule", "AlarmTransition",
           "AlarmsFrame", "CallAckEntry", "CallAckType", "CallAcksFrame", "Frame",
           "FrameCapacityError", "FrameKind", "FrameTextError", "FrameTooShortError",
           "HeartbeatFrame", "MacMismatchError", "MalformedFrameError", "NarrowbandError",
           "NarrowbandVersionError", "NotFrameTextError", "PowerState", "UnknownFrameKindError",
           "decode_frame", "encode_alarms", "encode_call_acks", "encode_heartbeat",
           "from_text", "pack_id", "text_frame_bytes", "to_text"]
