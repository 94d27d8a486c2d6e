"""The uplink envelope: versioned CBOR messages between gateway and central (DESIGN.md §4).

Every payload on a `fieldlink/v1/...` topic is one CBOR map with `v` (envelope version) and
`t` (message type). `decode()` turns bytes into one of the frozen message classes below or
raises an `EnvelopeError` subclass with a `reason`; it never raises anything else. Every field
is checked against `protocols.limits` (integer ranges, string lengths, records per batch,
attrs size, no shared references), so that whatever decodes can be stored; in a data batch a
record that breaks a rule is refused alone (`DataBatch.rejected`). `to_jsonable()` renders a
message for people (CLIs, logs).

Data records are compact arrays so that a 500-record batch stays small:
`[seq, kind, ts_ms, point_index, value, flags, attrs?]`, where `point_index` indexes the
batch's `pts` list of point keys (`device/point`), or is -1 for records without a point.

Version 2 (`protocols.columnar`) sends a data batch as columns, a third of the bytes; the other
message types are the same in both versions. `decode` takes both; `encode(batch, version=2)`
is for a central whose state announced `envelope >= 2` (`edge_agent.uplink.link`). The message
classes live in `protocols.messages`, the rendering for people in `protocols.envelope_json`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import cbor2

from protocols.columnar import (
    COLUMNAR_VERSION,
    ColumnRecords,
    Columns,
    columns_of,
    decode_columns,
    record_columns,
    to_wire,
)
from protocols.envelope_json import to_jsonable
from protocols.limits import (
    MAX_DEVICES_PER_BIRTH,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_POINT_KEY_CHARS,
    MAX_POINTS_PER_BATCH,
    MAX_POINTS_PER_BIRTH,
    MAX_RECORDS_PER_BATCH,
    MAX_TEXT_CHARS,
    ORDINAL_MAX,
    SEQ_MAX,
    TS_MAX_MS,
    Budget,
    EnvelopeError,
    IntRangeError,
    InvalidFieldError,
    MalformedEnvelopeError,
    NotCborError,
    NotFiniteError,
    PayloadTooLargeError,
    Reason,
    TooManyItemsError,
    check_attrs,
    check_count,
    check_int,
    check_point_key,
    check_str,
)
from protocols.messages import (
    DEVICE_POINT,
    Ack,
    Birth,
    DataBatch,
    DeviceInfo,
    Flag,
    Lane,
    Message,
    PointInfo,
    Record,
    RecordKind,
    RejectedRecord,
    State,
    Value,
)
from protocols.seq_ranges import (  # re-exported (__all__): the arithmetic of ack ranges
    count_in_ranges,
    merge_ranges,
    ranges_from_seqs,
    seqs_in_ranges,
    subtract_ranges,
)

VERSION = 1
# The versions this side decodes: 2 differs from 1 only in the data batch (protocols.columnar).
VERSIONS = (VERSION, COLUMNAR_VERSION)


class UnsupportedVersionError(EnvelopeError):
    reason = Reason.UNSUPPORTED_VERSION

    def __init__(self, version: object) -> None:
        small = isinstance(version, int) and abs(version) < 2**32
        shown = version if small else type(version).__name__
        super().__init__(f"unsupported envelope version {shown!r} (this side speaks {VERSIONS})")
        self.field = "v"
        self.version = version


class UnknownMessageTypeError(EnvelopeError):
    reason = Reason.UNKNOWN_TYPE

    def __init__(self, type_: object) -> None:
        shown = type_[:32] if isinstance(type_, str) else type(type_).__name__
        super().__init__(f"unknown message type {shown!r}")
        self.field = "t"
        self.type = type_


# --- encode -------------------------------------------------------------------------------


def encode(msg: Message, *, version: int = VERSION) -> bytes:
    """Encode one message to CBOR bytes; `version=2` encodes a data batch as columns
    (`protocols.columnar`, for a central whose state announced `envelope >= 2`)."""
    if version == COLUMNAR_VERSION and isinstance(msg, DataBatch):
        cols = msg.columns if msg.columns is not None else columns_of(msg.records)
        return encode_columns(msg.gw, msg.stream, msg.sent_ms, cols)
    try:
        return cbor2.dumps(_to_wire(msg))
    except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
        raise EnvelopeError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def encode_columns(gw: str, stream: str, sent_ms: int, cols: Columns) -> bytes:
    """A version 2 data batch straight from columns (the edge's backlog drain: no `Record`
    per record on the way from the outbox to the wire)."""
    try:
        return cbor2.dumps(to_wire(gw, stream, sent_ms, cols))
    except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
        raise EnvelopeError(f"cannot encode DataBatch: {exc}") from exc


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
        state = {"v": VERSION, "t": "state", "online": msg.online, "boot": msg.boot_id,
                 "ver": msg.version, "bearer": msg.bearer, "backlog": msg.backlog,
                 "ts": msg.ts_ms, "stream": msg.stream}
        return state | {"env": msg.envelope} if msg.envelope != VERSION else state
    if isinstance(msg, Birth):
        return {"v": VERSION, "t": "birth", "gw": msg.gw, "stream": msg.stream,
                "boot": msg.boot_id, "ver": msg.version,
                "devs": [{"id": d.id, "profile": d.profile, "hash": d.profile_hash,
                          "pts": [[p.ordinal, p.key, p.name_zh, p.unit] for p in d.points]}
                         for d in msg.devices]}
    raise EnvelopeError(f"not an envelope message: {type(msg).__name__}")


# --- decode -------------------------------------------------------------------------------


def decode(payload: bytes) -> Message:
    """Decode CBOR bytes into a message; raises only `EnvelopeError` subclasses, each with its
    `reason`. Every field is checked against `protocols.limits`; in a data batch a record
    that breaks a rule is refused alone (`DataBatch.rejected`), the rest of the batch kept."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(len(payload))
    try:
        obj = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise NotCborError("payload", f"not CBOR: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if type(obj) is not dict:
        raise MalformedEnvelopeError("payload", "top level is not a map")
    version = obj.get("v")
    if type(version) is not int or version not in VERSIONS:
        raise UnsupportedVersionError(version)
    kind = obj.get("t")
    if version == COLUMNAR_VERSION and kind == "data":
        return _decode_columnar(obj, Budget(len(payload)))
    decoder = _DECODERS.get(kind) if type(kind) is str else None
    if decoder is None:
        raise UnknownMessageTypeError(kind)
    return decoder(obj, Budget(len(payload)))


def _get(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str = "") -> Any:
    if key not in obj:
        raise MalformedEnvelopeError(f"{where}{key}", "missing")
    val = obj[key]
    if not isinstance(val, types) or (isinstance(val, bool) and bool not in _as_tuple(types)):
        raise MalformedEnvelopeError(
            f"{where}{key}", f"expected {_names(types)}, got {type(val).__name__}")
    return val


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: type | tuple[type, ...]) -> str:
    return "|".join(t.__name__ for t in _as_tuple(types))


def _str(obj: Mapping[str, Any], key: str, limit: int, where: str = "") -> str:
    if key not in obj:
        raise MalformedEnvelopeError(f"{where}{key}", "missing")
    return check_str(f"{where}{key}", obj[key], limit)


def _int(obj: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    if key not in obj:
        raise MalformedEnvelopeError(key, "missing")
    return check_int(key, obj[key], lo, hi)


def _decode_data(obj: Mapping[str, Any], budget: Budget) -> DataBatch:
    gw = _str(obj, "gw", MAX_ID_CHARS)
    stream = _str(obj, "stream", MAX_ID_CHARS)
    sent = _int(obj, "sent", 0, TS_MAX_MS)
    pts = check_count("pts", _get(obj, "pts", list), MAX_POINTS_PER_BATCH)
    rows = check_count("r", _get(obj, "r", list), MAX_RECORDS_PER_BATCH)
    # A bad point key refuses the records that name it, not the batch.
    bad_pts: dict[int, EnvelopeError] = {}
    for i, key in enumerate(pts):
        if (type(key) is not str or len(key) > MAX_POINT_KEY_CHARS or "\x00" in key
                or "/" not in key):
            try:
                check_point_key(f"pts[{i}]", key)
            except EnvelopeError as exc:
                bad_pts[i] = exc
        else:
            budget.spend(f"pts[{i}]", len(key))
    records: list[Record] = []
    rejected: list[RejectedRecord] = []
    for i, row in enumerate(rows):
        try:
            records.append(_decode_record(i, row, pts, bad_pts, budget))
        except EnvelopeError as exc:
            rejected.append(RejectedRecord(i, _valid_seq(row), exc))
    return DataBatch(gw=gw, stream=stream, records=tuple(records), sent_ms=sent,
                     rejected=tuple(rejected))


def _decode_columnar(obj: Mapping[str, Any], budget: Budget) -> DataBatch:
    got = decode_columns(obj, budget)
    cols = got.cols
    records = ColumnRecords(len(cols.seqs),
                            lambda: tuple(map(Record, *record_columns(cols, _KINDS, _FLAGS))))
    return DataBatch(gw=got.gw, stream=got.stream, records=records, sent_ms=got.sent_ms,
                     rejected=tuple(RejectedRecord(i, s, e) for i, s, e in got.rejected),
                     columns=got.cols)


def _valid_seq(row: object) -> int | None:
    """The seq of a refused record, when it has one the edge could have made."""
    if type(row) is list and row and type(row[0]) is int and 1 <= row[0] <= SEQ_MAX:
        return row[0]
    return None


_KINDS = {int(k): k for k in RecordKind}
_FLAGS = {int(f): Flag(f)
          for f in range(int(Flag.HISTORICAL | Flag.CLOCK_SUSPECT | Flag.BAD_QUALITY) + 1)}
_SCALARS = (int, float, str)
_INT64_MAX = 2**63 - 1  # what both databases store


def _decode_record(i: int, row: object, pts: Sequence[str],
                   bad_pts: Mapping[int, EnvelopeError], budget: Budget) -> Record:
    # The hot path of central's ingest: type checks by exact class and table look-ups
    # instead of enum constructors (bool is a subclass of int, so `type(x) is int` excludes it).
    if type(row) is not list or not 6 <= len(row) <= 7:
        raise MalformedEnvelopeError(
            f"r[{i}]", "expected [seq, kind, ts, point, value, flags, attrs?]")
    seq, kind, ts, pidx, value, flags = row[:6]
    if not (type(seq) is int and type(ts) is int and type(pidx) is int):
        for name, v in (("seq", seq), ("ts", ts), ("point", pidx)):
            if type(v) is not int:
                raise MalformedEnvelopeError(
                    f"r[{i}].{name}", f"expected int, got {type(v).__name__}")
    if not 1 <= seq <= SEQ_MAX:
        check_int(f"r[{i}].seq", seq, 1, SEQ_MAX)
    if not 0 <= ts <= TS_MAX_MS:
        check_int(f"r[{i}].ts", ts, 0, TS_MAX_MS)
    rkind = _KINDS.get(kind) if type(kind) is int else None
    if rkind is None:
        raise MalformedEnvelopeError(f"r[{i}].kind", f"unknown record kind {_short(kind)}")
    rflags = _FLAGS.get(flags) if type(flags) is int else None
    if rflags is None:
        raise MalformedEnvelopeError(f"r[{i}].flags", f"unknown flags {_short(flags)}")
    if pidx < -1 or pidx >= len(pts):
        raise MalformedEnvelopeError(f"r[{i}].point", f"index outside pts[{len(pts)}]")
    if bad_pts and pidx in bad_pts:
        raise bad_pts[pidx]
    if value is not None:
        _check_value(i, value, budget)
    attrs = None
    if len(row) == 7:
        attrs = check_attrs(f"r[{i}].attrs", row[6], budget)
    return Record(seq, rkind, ts, None if pidx == -1 else pts[pidx], value, rflags, attrs)


def _check_value(i: int, value: object, budget: Budget) -> None:
    """The rules of record `i`'s value: a finite float, a 64-bit int, a bool, a short str."""
    if type(value) is float:
        if not math.isfinite(value):
            raise NotFiniteError(f"r[{i}].value", "not finite")
    elif type(value) is int:
        if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise IntRangeError(f"r[{i}].value", "integer outside 64 bits")
    elif type(value) is str:
        if len(value) > MAX_TEXT_CHARS or "\x00" in value:
            check_str(f"r[{i}].value", value, MAX_TEXT_CHARS)
        budget.spend(f"r[{i}].value", len(value))
    elif not isinstance(value, _SCALARS):
        raise MalformedEnvelopeError(
            f"r[{i}].value", f"unsupported type {type(value).__name__}")


def _short(value: object) -> str:
    return repr(value) if type(value) is int and abs(value) < 2**32 else type(value).__name__


def _decode_ack(obj: Mapping[str, Any], budget: Budget) -> Ack:
    stream = _str(obj, "stream", MAX_ID_CHARS)
    raw = check_count("ranges", _get(obj, "ranges", list), MAX_RECORDS_PER_BATCH)
    ranges = []
    for i, r in enumerate(raw):
        if (type(r) is not list or len(r) != 2 or not all(type(x) is int for x in r)
                or r[0] < 1 or r[0] > r[1]):
            raise MalformedEnvelopeError(
                f"ranges[{i}]", "expected [first, last] with 1 <= first <= last")
        check_int(f"ranges[{i}]", r[1], 1, SEQ_MAX)
        ranges.append((r[0], r[1]))
    return Ack(stream=stream, ranges=tuple(ranges))


def _decode_state(obj: Mapping[str, Any], budget: Budget) -> State:
    stream = obj.get("stream", "")
    env = obj.get("env", VERSION)
    return State(envelope=env if type(env) is int and 0 < env < 2**16 else VERSION,
                 online=_get(obj, "online", bool), boot_id=_str(obj, "boot", MAX_ID_CHARS),
                 version=_str(obj, "ver", MAX_ID_CHARS), bearer=_str(obj, "bearer", MAX_ID_CHARS),
                 backlog=_int(obj, "backlog", 0, _INT64_MAX), ts_ms=_int(obj, "ts", 0, TS_MAX_MS),
                 stream=check_str("stream", stream, MAX_ID_CHARS) if type(stream) is str else "")


def _decode_birth(obj: Mapping[str, Any], budget: Budget) -> Birth:
    gw = _str(obj, "gw", MAX_ID_CHARS)
    stream = _str(obj, "stream", MAX_ID_CHARS)
    boot, ver = _str(obj, "boot", MAX_ID_CHARS), _str(obj, "ver", MAX_ID_CHARS)
    devs = []
    total = 0
    for i, d in enumerate(check_count("devs", _get(obj, "devs", list), MAX_DEVICES_PER_BIRTH)):
        where = f"devs[{i}]."
        if type(d) is not dict:
            raise MalformedEnvelopeError(f"devs[{i}]", "expected a map")
        raw = check_count(f"{where}pts", _get(d, "pts", list, where), MAX_POINTS_PER_BIRTH)
        total += len(raw)
        if total > MAX_POINTS_PER_BIRTH:
            raise TooManyItemsError("devs[].pts", total, MAX_POINTS_PER_BIRTH)
        points = []
        for j, p in enumerate(raw):
            at = f"{where}pts[{j}]"
            if type(p) is not list or len(p) != 4:
                raise MalformedEnvelopeError(at, "expected [ordinal, key, name_zh, unit]")
            points.append(PointInfo(ordinal=check_int(f"{at}.ordinal", p[0], 0, ORDINAL_MAX),
                                    key=check_str(f"{at}.key", p[1], MAX_POINT_KEY_CHARS),
                                    name_zh=check_str(f"{at}.name_zh", p[2], MAX_NAME_CHARS),
                                    unit=check_str(f"{at}.unit", p[3], MAX_NAME_CHARS)))
            budget.spend(at, len(p[1]) + len(p[2]) + len(p[3]))
        devs.append(DeviceInfo(id=_str(d, "id", MAX_ID_CHARS, where),
                               profile=_str(d, "profile", MAX_NAME_CHARS, where),
                               profile_hash=_str(d, "hash", MAX_NAME_CHARS, where),
                               points=tuple(points)))
    return Birth(gw=gw, stream=stream, boot_id=boot, version=ver, devices=tuple(devs))


_DECODERS: Final[Mapping[str, Callable[[Mapping[str, Any], Budget], Message]]] = {
    "data": _decode_data, "ack": _decode_ack, "state": _decode_state, "birth": _decode_birth}



__all__ = [
    "DEVICE_POINT", "VERSION", "VERSIONS", "Ack", "Birth", "Columns", "DataBatch", "DeviceInfo",
    "Flag", "Lane",
    "Message", "PointInfo", "Record", "RecordKind", "RejectedRecord", "State",
    "UnknownMessageTypeError", "UnsupportedVersionError", "Value", "decode", "encode",
    "encode_columns", "to_jsonable",
    # from protocols.limits: the errors decode() raises
    "EnvelopeError", "IntRangeError", "InvalidFieldError", "MalformedEnvelopeError",
    "NotCborError", "NotFiniteError", "PayloadTooLargeError", "Reason", "TooManyItemsError",
    # from protocols.seq_ranges: the arithmetic of an Ack's ranges
    "count_in_ranges", "merge_ranges", "ranges_from_seqs", "seqs_in_ranges", "subtract_ranges",
]
