"""The uplink envelope: versioned CBOR messages between gateway and central (DESIGN.md §4).

Every payload on a `fieldlink/v1/...` topic is one CBOR map with `v` (envelope version) and
`t` (message type). `decode()` turns bytes into one of the frozen message classes below or
raises an `EnvelopeError` subclass; it never raises anything else. `to_jsonable()` renders a
message for people (CLIs, logs).

Data records are compact arrays so that a 500-record batch stays small:
`[seq, kind, ts_ms, point_index, value, flags, attrs?]`, where `point_index` indexes the
batch's `pts` list of point keys (`device/point`), or is -1 for records without a point.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

import cbor2

from protocols.errors import ProtocolError

VERSION = 1
Value: TypeAlias = float | int | bool | str | None


class EnvelopeError(ProtocolError):
    """Base of every envelope decode or encode error."""


class MalformedEnvelopeError(EnvelopeError):
    """The bytes are not CBOR, or a field has the wrong shape."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UnsupportedVersionError(EnvelopeError):
    def __init__(self, version: object) -> None:
        super().__init__(f"unsupported envelope version {version!r} (this side speaks {VERSION})")
        self.version = version


class UnknownMessageTypeError(EnvelopeError):
    def __init__(self, type_: object) -> None:
        super().__init__(f"unknown message type {type_!r}")
        self.type = type_


# The pseudo point of device-level alarms (device offline): `<device>/_device`.
DEVICE_POINT = "_device"


class RecordKind(enum.IntEnum):
    TELEMETRY = 0
    ALARM = 1
    EVENT = 2
    CMD_RESULT = 3


class Lane(enum.IntEnum):
    """Send priority, lowest value first (DESIGN.md §4.2)."""

    ALARM = 0
    EVENT = 1
    LIVE = 2
    BACKLOG = 3


class Flag(enum.IntFlag):
    NONE = 0
    HISTORICAL = 1  # sent from backlog, not live
    CLOCK_SUSPECT = 2  # wall clock was not trusted when the record was made (§4.7)
    BAD_QUALITY = 4  # the device reported a fault for this value


class Record(NamedTuple):
    """One outbox record. A named tuple, not a dataclass: both sides make hundreds of
    thousands of these per second while a backlog drains, and a tuple is built 3x faster."""

    seq: int
    kind: RecordKind
    ts_ms: int
    point: str | None
    value: Value
    flags: Flag = Flag.NONE
    attrs: Mapping[str, Any] | None = None

    @property
    def historical(self) -> bool:
        return bool(self.flags & Flag.HISTORICAL)


@dataclass(frozen=True, slots=True)
class DataBatch:
    gw: str
    stream: str
    records: tuple[Record, ...]
    sent_ms: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    stream: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class State:
    online: bool
    boot_id: str
    version: str
    bearer: str
    backlog: int
    ts_ms: int = 0
    stream: str = ""


@dataclass(frozen=True, slots=True)
class PointInfo:
    ordinal: int
    key: str  # device/point
    name_zh: str = ""
    unit: str = ""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    profile: str
    profile_hash: str
    points: tuple[PointInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class Birth:
    gw: str
    stream: str
    boot_id: str
    version: str
    devices: tuple[DeviceInfo, ...] = field(default_factory=tuple)


Message: TypeAlias = DataBatch | Ack | State | Birth


# --- ranges -------------------------------------------------------------------------------


def ranges_from_seqs(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Collapse sequence numbers into sorted inclusive `[first, last]` ranges."""
    ordered = sorted(set(seqs))
    if not ordered:
        return ()
    first, last = ordered[0], ordered[-1]
    if last - first + 1 == len(ordered):  # one run: the usual batch
        return ((first, last),)
    out: list[tuple[int, int]] = []
    start = prev = first
    for s in ordered[1:]:
        if s != prev + 1:
            out.append((start, prev))
            start = s
        prev = s
    out.append((start, prev))
    return tuple(out)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint inclusive ranges covering the same seqs (touching ranges join)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def subtract_ranges(ranges: Sequence[tuple[int, int]],
                    minus: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The seqs of `ranges` that are not in `minus`; both sorted and disjoint."""
    out: list[tuple[int, int]] = []
    j = 0
    for a, b in ranges:
        while j < len(minus) and minus[j][1] < a:
            j += 1
        k = j
        while a <= b:
            if k >= len(minus) or minus[k][0] > b:
                out.append((a, b))
                break
            ma, mb = minus[k]
            if ma > a:
                out.append((a, ma - 1))
            a = max(a, mb + 1)
            k += 1
    return tuple(out)


def count_in_ranges(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def seqs_in_ranges(ranges: Iterable[tuple[int, int]]) -> Iterable[int]:
    for a, b in ranges:
        yield from range(a, b + 1)


# --- encode -------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Encode one message to CBOR bytes."""
    try:
        return cbor2.dumps(_to_wire(msg))
    except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
        raise EnvelopeError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def _to_wire(msg: Message) -> dict[str, Any]:
    if isinstance(msg, DataBatch):
        index: dict[str, int] = {}
        recs = []
        for r in msg.records:
            pidx = -1 if r.point is None else index.setdefault(r.point, len(index))
            row: list[Any] = [r.seq, int(r.kind), r.ts_ms, pidx, r.value, int(r.flags)]
            if r.attrs:
                row.append(dict(r.attrs))
            recs.append(row)
        return {"v": VERSION, "t": "data", "gw": msg.gw, "stream": msg.stream,
                "sent": msg.sent_ms, "pts": list(index), "r": recs}
    if isinstance(msg, Ack):
        return {"v": VERSION, "t": "ack", "stream": msg.stream,
                "ranges": [[a, b] for a, b in msg.ranges]}
    if isinstance(msg, State):
        return {"v": VERSION, "t": "state", "online": msg.online, "boot": msg.boot_id,
                "ver": msg.version, "bearer": msg.bearer, "backlog": msg.backlog,
                "ts": msg.ts_ms, "stream": msg.stream}
    if isinstance(msg, Birth):
        return {"v": VERSION, "t": "birth", "gw": msg.gw, "stream": msg.stream,
                "boot": msg.boot_id, "ver": msg.version,
                "devs": [{"id": d.id, "profile": d.profile, "hash": d.profile_hash,
                          "pts": [[p.ordinal, p.key, p.name_zh, p.unit] for p in d.points]}
                         for d in msg.devices]}
    raise EnvelopeError(f"not an envelope message: {type(msg).__name__}")


# --- decode -------------------------------------------------------------------------------


def decode(payload: bytes) -> Message:
    """Decode CBOR bytes into a message; raises only `EnvelopeError` subclasses."""
    try:
        obj = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise MalformedEnvelopeError("payload", f"not CBOR: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedEnvelopeError("payload", "top level is not a map")
    if obj.get("v") != VERSION:
        raise UnsupportedVersionError(obj.get("v"))
    kind = obj.get("t")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise UnknownMessageTypeError(kind)
    return decoder(obj)


def _get(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str = "") -> Any:
    if key not in obj:
        raise MalformedEnvelopeError(f"{where}{key}", "missing")
    val = obj[key]
    if not isinstance(val, types) or (isinstance(val, bool) and bool not in _as_tuple(types)):
        raise MalformedEnvelopeError(f"{where}{key}", f"expected {_names(types)}, got {type(val).__name__}")
    return val


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: type | tuple[type, ...]) -> str:
    return "|".join(t.__name__ for t in _as_tuple(types))


def _decode_data(obj: Mapping[str, Any]) -> DataBatch:
    gw = _get(obj, "gw", str)
    stream = _get(obj, "stream", str)
    sent = _get(obj, "sent", int)
    pts = _get(obj, "pts", list)
    if not all(isinstance(p, str) for p in pts):
        raise MalformedEnvelopeError("pts", "point keys must be strings")
    rows = _get(obj, "r", list)
    records = tuple(_decode_record(i, row, pts) for i, row in enumerate(rows))
    return DataBatch(gw=gw, stream=stream, records=records, sent_ms=sent)


_KINDS = {int(k): k for k in RecordKind}
_FLAGS = {int(f): Flag(f) for f in range(int(Flag.HISTORICAL | Flag.CLOCK_SUSPECT | Flag.BAD_QUALITY) + 1)}
_SCALARS = (int, float, str)
_INT64_MAX = 2**63 - 1  # what both databases store; a larger seq is a broken sender


def _decode_record(i: int, row: object, pts: Sequence[str]) -> Record:
    # The hot path of central's ingest: type checks by exact class and table look-ups
    # instead of enum constructors (bool is a subclass of int, so `type(x) is int` excludes it).
    if type(row) is not list or not 6 <= len(row) <= 7:
        raise MalformedEnvelopeError(f"r[{i}]", "expected [seq, kind, ts, point, value, flags, attrs?]")
    seq, kind, ts, pidx, value, flags = row[:6]
    if not (type(seq) is int and type(ts) is int and type(pidx) is int):
        for name, v in (("seq", seq), ("ts", ts), ("point", pidx)):
            if type(v) is not int:
                raise MalformedEnvelopeError(f"r[{i}].{name}", f"expected int, got {type(v).__name__}")
    if not 1 <= seq <= _INT64_MAX:
        raise MalformedEnvelopeError(f"r[{i}].seq", f"must be in 1..2**63-1, got {seq}")
    if not 0 <= ts <= _INT64_MAX:
        raise MalformedEnvelopeError(f"r[{i}].ts", f"must be in 0..2**63-1, got {ts}")
    rkind = _KINDS.get(kind) if type(kind) is int else None
    if rkind is None:
        raise MalformedEnvelopeError(f"r[{i}].kind", f"unknown record kind {kind!r}")
    rflags = _FLAGS.get(flags) if type(flags) is int else None
    if rflags is None:
        raise MalformedEnvelopeError(f"r[{i}].flags", f"unknown flags {flags!r}")
    if pidx < -1 or pidx >= len(pts):
        raise MalformedEnvelopeError(f"r[{i}].point", f"index {pidx} outside pts[{len(pts)}]")
    if value is not None:
        if type(value) is float:
            if not math.isfinite(value):
                raise MalformedEnvelopeError(f"r[{i}].value", "not finite")
        elif type(value) is int:
            if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
                raise MalformedEnvelopeError(f"r[{i}].value", "integer outside 64 bits")
        elif not isinstance(value, _SCALARS):
            raise MalformedEnvelopeError(f"r[{i}].value", f"unsupported type {type(value).__name__}")
    attrs = None
    if len(row) == 7:
        attrs = row[6]
        if type(attrs) is not dict or not all(type(k) is str for k in attrs):
            raise MalformedEnvelopeError(f"r[{i}].attrs", "expected a map with string keys")
    return Record(seq, rkind, ts, None if pidx == -1 else pts[pidx], value, rflags, attrs)


def _decode_ack(obj: Mapping[str, Any]) -> Ack:
    stream = _get(obj, "stream", str)
    raw = _get(obj, "ranges", list)
    ranges = []
    for i, r in enumerate(raw):
        if (not isinstance(r, list) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or r[0] < 1 or r[0] > r[1]):
            raise MalformedEnvelopeError(f"ranges[{i}]", "expected [first, last] with 1 <= first <= last")
        ranges.append((r[0], r[1]))
    return Ack(stream=stream, ranges=tuple(ranges))


def _decode_state(obj: Mapping[str, Any]) -> State:
    return State(online=_get(obj, "online", bool), boot_id=_get(obj, "boot", str),
                 version=_get(obj, "ver", str), bearer=_get(obj, "bearer", str),
                 backlog=_get(obj, "backlog", int), ts_ms=_get(obj, "ts", int),
                 stream=obj.get("stream", "") if isinstance(obj.get("stream", ""), str) else "")


def _decode_birth(obj: Mapping[str, Any]) -> Birth:
    devs = []
    for i, d in enumerate(_get(obj, "devs", list)):
        where = f"devs[{i}]."
        if not isinstance(d, dict):
            raise MalformedEnvelopeError(f"devs[{i}]", "expected a map")
        points = []
        for j, p in enumerate(_get(d, "pts", list, where)):
            if (not isinstance(p, list) or len(p) != 4 or not isinstance(p[0], int)
                    or isinstance(p[0], bool) or not all(isinstance(x, str) for x in p[1:])):
                raise MalformedEnvelopeError(f"{where}pts[{j}]", "expected [ordinal, key, name_zh, unit]")
            points.append(PointInfo(ordinal=p[0], key=p[1], name_zh=p[2], unit=p[3]))
        devs.append(DeviceInfo(id=_get(d, "id", str, where), profile=_get(d, "profile", str, where),
                               profile_hash=_get(d, "hash", str, where), points=tuple(points)))
    return Birth(gw=_get(obj, "gw", str), stream=_get(obj, "stream", str),
                 boot_id=_get(obj, "boot", str), version=_get(obj, "ver", str), devices=tuple(devs))


_DECODERS = {"data": _decode_data, "ack": _decode_ack, "state": _decode_state, "birth": _decode_birth}


# --- for people ---------------------------------------------------------------------------


def to_jsonable(msg: Message) -> dict[str, Any]:
    """A JSON-ready rendering of a message, for CLIs and logs."""
    if isinstance(msg, DataBatch):
        return {"type": "data", "gw": msg.gw, "stream": msg.stream, "sent_ms": msg.sent_ms,
                "records": [{"seq": r.seq, "kind": r.kind.name.lower(), "ts_ms": r.ts_ms,
                             "point": r.point, "value": r.value,
                             "flags": [f.name.lower() for f in Flag if f and f in r.flags],
                             **({"attrs": dict(r.attrs)} if r.attrs else {})}
                            for r in msg.records]}
    if isinstance(msg, Ack):
        return {"type": "ack", "stream": msg.stream, "ranges": [list(r) for r in msg.ranges]}
    if isinstance(msg, State):
        return {"type": "state", "online": msg.online, "boot_id": msg.boot_id,
                "version": msg.version, "bearer": msg.bearer, "backlog": msg.backlog,
                "ts_ms": msg.ts_ms, "stream": msg.stream}
    return {"type": "birth", "gw": msg.gw, "stream": msg.stream, "boot_id": msg.boot_id,
            "version": msg.version,
            "devices": [{"id": d.id, "profile": d.profile, "profile_hash": d.profile_hash,
                         "points": [{"ordinal": p.ordinal, "key": p.key, "name_zh": p.name_zh,
                                     "unit": p.unit} for p in d.points]} for d in msg.devices]}
