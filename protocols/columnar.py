"""Envelope v2 data batch: the records of a batch as columns (DESIGN.md §4, issue 13).

Version 1 sends each record as a CBOR array (`[seq, kind, ts, point, value, flags]`, ~31-33
bytes a reading). Version 2 sends one CBOR map whose fields are columns, most of them packed
little-endian integer or float arrays (a byte string whose first byte is the `array`
typecode, then the items), so that both ends convert a whole column at C speed:

    v: 2, t: "data", gw, stream, sent, pts: [point keys]   (as in version 1)
    n:  the number of records
    s:  the first seq;  sd: the n-1 seq deltas (int array), absent when the seqs run 1 by 1
    k:  kinds (int array), absent when every record is telemetry
    t0: the first device time (ms); td: the n-1 time deltas (int array)
    p:  point index + 1 into `pts` (int array), 0 for a record without a point
    f:  flags (int array), or one int when every record has the same flags
    vf: values, when every value is a float (a float32 array when each one is exact as float32,
        else float64); or vl: the values as a CBOR list (any mix of float, int, bool, str, null)
    a:  {record index: attrs} for the records that have attrs, absent when none

A backlog batch of numeric readings (consecutive seqs, times a few seconds apart, < 256
points) costs 2 bytes of time, 1 of point and 4 or 8 of value: 7-11 bytes a reading.

`decode_columns` checks whole columns at once (lengths, ranges by min/max) and refuses a record
alone, as version 1 does (`DataBatch.rejected`), when its own value, time, kind, flags, point
key or attrs break a rule of `protocols.limits`; a column of the wrong shape refuses the batch.
The other message types (ack, state, birth) are the same in both versions.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import sub
from typing import Any, Final, overload

from protocols.limits import (
    INT64_MAX,
    INT64_MIN,
    MAX_ID_CHARS,
    MAX_POINT_KEY_CHARS,
    MAX_POINTS_PER_BATCH,
    MAX_RECORDS_PER_BATCH,
    MAX_TEXT_CHARS,
    SEQ_MAX,
    TS_MAX_MS,
    Budget,
    EnvelopeError,
    IntRangeError,
    MalformedEnvelopeError,
    NotFiniteError,
    check_attrs,
    check_count,
    check_int,
    check_point_key,
    check_str,
)

COLUMNAR_VERSION: Final = 2
_BIG = sys.byteorder == "big"
# Smallest first: the typecodes an int column may take, with the range each holds.
_INT_CODES: Final = tuple((c, -(2 ** (8 * array(c).itemsize - 1)),
                           2 ** (8 * array(c).itemsize - 1) - 1) for c in "bhiq")
_UINT_CODES: Final = tuple((c, 0, 2 ** (8 * array(c).itemsize) - 1) for c in "BHIQ")
_KNOWN_CODES: Final = {c: array(c).itemsize for c in "bhiqBHIQfd"}
_KINDS: Final = frozenset(range(4))  # protocols.envelope.RecordKind
_FLAG_MAX: Final = 7  # HISTORICAL | CLOCK_SUSPECT | BAD_QUALITY
_PLUS_ONE: Final = (1).__add__


@dataclass(frozen=True, slots=True)
class Columns:
    """The records of one batch, column by column (what `decode_columns` returns and
    `encode_columns` takes). `points` holds, per record, an index into `pts` or -1."""

    seqs: Sequence[int]
    kinds: Sequence[int] | None  # None: every record is telemetry
    ts: Sequence[int]
    pts: Sequence[str]
    points: Sequence[int]
    values: Sequence[Any]
    flags: Sequence[int] | int  # an int: every record's flags
    attrs: Mapping[int, Mapping[str, Any]]

    def __len__(self) -> int:
        return len(self.seqs)

    def flag_list(self) -> Sequence[int]:
        return list(repeat(self.flags, len(self.seqs))) if isinstance(self.flags, int) \
            else self.flags


# --- packed arrays ---------------------------------------------------------------------------


def pack_ints(values: Sequence[int], *, unsigned: bool = False) -> bytes:
    """`values` as the smallest int array that holds them all (typecode byte + items, LE)."""
    lo, hi = (min(values), max(values)) if values else (0, 0)
    for code, cmin, cmax in (_UINT_CODES if unsigned and lo >= 0 else _INT_CODES):
        if cmin <= lo and hi <= cmax:
            return _pack(code, values)
    raise MalformedEnvelopeError("column", "integer outside 64 bits")


def _pack(code: str, values: Sequence[Any]) -> bytes:
    arr = array(code, values)
    if _BIG:
        arr.byteswap()
    return code.encode() + arr.tobytes()


def unpack(field: str, raw: object, count: int, codes: str = "bhiqBHIQ") -> list[Any]:
    """The items of a packed array, checking its typecode and that it holds `count` items."""
    if type(raw) is not bytes or not raw:
        raise MalformedEnvelopeError(field, "expected a packed array")
    code = chr(raw[0])
    size = _KNOWN_CODES.get(code)
    if size is None or code not in codes:
        raise MalformedEnvelopeError(field, f"unknown array type {code!r}")
    if len(raw) - 1 != size * count:
        raise MalformedEnvelopeError(field, f"expected {count} items of {size} bytes")
    arr = array(code, raw[1:])
    if _BIG:
        arr.byteswap()
    return arr.tolist()


def _pack_values(values: Sequence[Any]) -> tuple[str, Any]:
    if set(map(type, values)) == {float}:
        narrow = array("f", values)
        if narrow.tolist() == list(values):  # every one exact as float32
            return "vf", _pack("f", values)
        return "vf", _pack("d", values)
    return "vl", list(values)


# --- encode ----------------------------------------------------------------------------------


def to_wire(gw: str, stream: str, sent_ms: int, cols: Columns) -> dict[str, Any]:
    """The CBOR map of a version 2 data batch (module doc)."""
    n = len(cols.seqs)
    wire: dict[str, Any] = {"v": COLUMNAR_VERSION, "t": "data", "gw": gw, "stream": stream,
                            "sent": sent_ms, "pts": list(cols.pts), "n": n}
    if not n:
        return wire
    seqs, ts = cols.seqs, cols.ts
    wire["s"] = seqs[0]
    if not _runs_by_one(seqs):
        wire["sd"] = pack_ints(list(map(sub, seqs[1:], seqs[:-1])))
    if cols.kinds is not None and any(cols.kinds):
        wire["k"] = pack_ints(cols.kinds, unsigned=True)
    wire["t0"] = ts[0]
    wire["td"] = pack_ints(list(map(sub, ts[1:], ts[:-1])))
    wire["p"] = pack_ints(list(map(_PLUS_ONE, cols.points)), unsigned=True)
    flags = cols.flags
    if not isinstance(flags, int) and min(flags) == max(flags):
        flags = flags[0]
    wire["f"] = flags if isinstance(flags, int) else pack_ints(flags, unsigned=True)
    key, packed = _pack_values(cols.values)
    wire[key] = packed
    if cols.attrs:
        wire["a"] = {i: dict(a) for i, a in cols.attrs.items()}
    return wire


def columns_of(records: Sequence[Sequence[Any]]) -> Columns:
    """Records (`protocols.envelope.Record`: seq, kind, ts, point, value, flags, attrs) as
    columns."""
    if not records:
        return Columns((), None, (), (), (), (), 0, {})
    seqs, kinds, ts, points, values, flags, attrs = zip(*records, strict=True)
    return columns_from(seqs, kinds, ts, points, values, flags,
                        {i: a for i, a in enumerate(attrs) if a})


def columns_from(seqs: Sequence[int], kinds: Sequence[int] | None, ts: Sequence[int],
                 points: Sequence[str | None], values: Sequence[Any], flags: Sequence[int] | int,
                 attrs: Mapping[int, Mapping[str, Any]]) -> Columns:
    """Columns from one list per field, the point keys given per record (None: no point)."""
    keys = [k for k in dict.fromkeys(points) if k is not None]
    index: dict[str | None, int] = {k: i for i, k in enumerate(keys)}
    index[None] = -1
    return Columns(seqs, kinds, ts, tuple(keys), list(map(index.__getitem__, points)), values,
                   flags, attrs)


def _runs_by_one(seqs: Sequence[int]) -> bool:
    if isinstance(seqs, range):
        return seqs.step == 1
    deltas = list(map(sub, seqs[1:], seqs[:-1]))
    return not deltas or min(deltas) == max(deltas) == 1


def record_columns(cols: Columns, kinds: Mapping[int, Any], flags: Mapping[int, Any]
                   ) -> tuple[Iterable[Any], ...]:
    """The seven fields of the records, each an iterable (for `map(Record, *...)`): kinds and
    flags through the given tables (int → enum member), point indexes as keys or None."""
    n = len(cols.seqs)
    table: list[str | None] = [*cols.pts, None]  # index -1: no point
    return (cols.seqs,
            repeat(kinds[0], n) if cols.kinds is None else map(kinds.__getitem__, cols.kinds),
            cols.ts, map(table.__getitem__, cols.points), cols.values,
            repeat(flags[cols.flags], n) if isinstance(cols.flags, int)
            else map(flags.__getitem__, cols.flags),
            repeat(None, n) if not cols.attrs else map(cols.attrs.get, range(n)))


class ColumnRecords(Sequence[Any]):
    """The records of a decoded version 2 batch, made only when first read: central writes a
    batch of readings from its columns and never reads a record of it (a tuple per reading
    was a tenth of its CPU during a backlog drain). `make` returns them all, in order."""

    __slots__ = ("_count", "_made", "_make")

    def __init__(self, count: int, make: Callable[[], tuple[Any, ...]]) -> None:
        self._count = count
        self._make: Callable[[], tuple[Any, ...]] | None = make
        self._made: tuple[Any, ...] = ()

    def _all(self) -> tuple[Any, ...]:
        if self._make is not None:
            self._made, self._make = self._make(), None
        return self._made

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Any, ...]: ...
    def __getitem__(self, i: int | slice) -> Any:
        return self._all()[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return self._all() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


# --- decode ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodedColumns:
    """A decoded version 2 batch: its columns (good records only) and the records refused
    one by one, as `(index, seq or None, error)`."""

    gw: str
    stream: str
    sent_ms: int
    cols: Columns
    rejected: tuple[tuple[int, int | None, EnvelopeError], ...]


def decode_columns(obj: Mapping[str, Any], budget: Budget) -> DecodedColumns:
    """Check a version 2 data map (module doc); raises `EnvelopeError` subclasses only."""
    gw = check_str("gw", _need(obj, "gw"), MAX_ID_CHARS)
    stream = check_str("stream", _need(obj, "stream"), MAX_ID_CHARS)
    sent = check_int("sent", _need(obj, "sent"), 0, TS_MAX_MS)
    pts = check_count("pts", _need(obj, "pts"), MAX_POINTS_PER_BATCH)
    n = check_int("n", _need(obj, "n"), 0, MAX_RECORDS_PER_BATCH)
    if n == 0:
        return DecodedColumns(gw, stream, sent, Columns((), None, (), (), (), (), 0, {}), ())
    seqs = _seqs(obj, n)
    kinds = unpack("k", obj["k"], n) if "k" in obj else None
    t0 = check_int("t0", _need(obj, "t0"), INT64_MIN, INT64_MAX)
    ts = list(accumulate(unpack("td", _need(obj, "td"), n - 1), initial=t0))
    points = [i - 1 for i in unpack("p", _need(obj, "p"), n)]
    raw_flags = _need(obj, "f")
    flags: list[int] | int = (check_int("f", raw_flags, 0, INT64_MAX) if type(raw_flags) is int
                              else unpack("f", raw_flags, n))
    values = _values(obj, n)
    attrs = _attrs(obj, n)
    bad: dict[int, EnvelopeError] = {}
    _check_records(bad, seqs, kinds, ts, points, pts, flags, values, budget)
    for i, a in attrs.items():
        try:
            check_attrs(f"a[{i}]", a, budget)
        except EnvelopeError as exc:
            bad.setdefault(i, exc)
    cols = Columns(seqs, kinds, ts, pts, points, values, flags, attrs)
    if not bad:
        return DecodedColumns(gw, stream, sent, cols, ())
    rejected = tuple((i, seqs[i] if 1 <= seqs[i] <= SEQ_MAX else None, bad[i])
                     for i in sorted(bad))
    return DecodedColumns(gw, stream, sent, _keep(cols, [i not in bad for i in range(n)]),
                          rejected)


def _need(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj:
        raise MalformedEnvelopeError(key, "missing")
    return obj[key]


def _seqs(obj: Mapping[str, Any], n: int) -> Sequence[int]:
    first = check_int("s", _need(obj, "s"), INT64_MIN, INT64_MAX)
    if "sd" not in obj:
        return range(first, first + n)
    return list(accumulate(unpack("sd", obj["sd"], n - 1), initial=first))


def _values(obj: Mapping[str, Any], n: int) -> list[Any]:
    if "vf" in obj:
        return unpack("vf", obj["vf"], n, codes="fd")
    vals = _need(obj, "vl")
    if type(vals) is not list or len(vals) != n:
        raise MalformedEnvelopeError("vl", f"expected a list of {n} values")
    return vals


def _attrs(obj: Mapping[str, Any], n: int) -> dict[int, Any]:
    raw = obj.get("a", {})
    if type(raw) is not dict or any(type(i) is not int or not 0 <= i < n for i in raw):
        raise MalformedEnvelopeError("a", "expected a map of record index to attrs")
    return raw


def _check_records(bad: dict[int, EnvelopeError], seqs: Sequence[int],
                   kinds: Sequence[int] | None, ts: Sequence[int], points: Sequence[int],
                   pts: Sequence[Any], flags: Sequence[int] | int, values: Sequence[Any],
                   budget: Budget) -> None:
    """Whole columns at once; only a column that fails is looked at record by record."""
    if min(seqs) < 1 or max(seqs) > SEQ_MAX:
        _each(bad, seqs, lambda i, s: check_int(f"r[{i}].seq", s, 1, SEQ_MAX))
    if min(ts) < 0 or max(ts) > TS_MAX_MS:
        _each(bad, ts, lambda i, t: check_int(f"r[{i}].ts", t, 0, TS_MAX_MS))
    if kinds is not None and not _KINDS.issuperset(kinds):
        _each(bad, kinds, lambda i, k: _member(f"r[{i}].kind", k, _KINDS, "record kind"))
    if isinstance(flags, int):
        if flags > _FLAG_MAX:
            raise MalformedEnvelopeError("f", f"unknown flags {flags}")
    elif max(flags) > _FLAG_MAX:
        _each(bad, flags, lambda i, f: _member(f"r[{i}].flags", f, range(_FLAG_MAX + 1),
                                                  "flags"))
    if min(points) < -1 or max(points) >= len(pts):
        _each(bad, points, lambda i, p: _member(f"r[{i}].point", p, range(-1, len(pts)),
                                                   "point index"))
    bad_keys = _bad_keys(pts, budget)
    if bad_keys:
        for i, p in enumerate(points):
            if p in bad_keys:
                bad.setdefault(i, bad_keys[p])
    if not all(map(_plain_finite, values)):
        _each(bad, values, lambda i, v: _check_value(f"r[{i}].value", v, budget))
    else:
        for i, v in enumerate(values):
            if v.__class__ is str:
                budget.spend(f"r[{i}].value", len(v))


def _each(bad: dict[int, EnvelopeError], column: Sequence[Any], check: Any) -> None:
    for i, v in enumerate(column):
        try:
            check(i, v)
        except EnvelopeError as exc:
            bad.setdefault(i, exc)


def _member(field: str, value: int, allowed: Any, what: str) -> None:
    if value not in allowed:
        raise MalformedEnvelopeError(field, f"unknown {what} {value}")


def _bad_keys(pts: Sequence[Any], budget: Budget) -> dict[int, EnvelopeError]:
    bad: dict[int, EnvelopeError] = {}
    for i, key in enumerate(pts):
        if (key.__class__ is str and "/" in key and len(key) <= MAX_POINT_KEY_CHARS
                and "\x00" not in key):  # the usual key, without the checks' calls
            budget.spend(f"pts[{i}]", len(key))
            continue
        try:
            check_point_key(f"pts[{i}]", key)
        except EnvelopeError as exc:
            bad[i] = exc
    return bad


def _plain_finite(v: Any) -> bool:
    """True for what needs no closer look: a finite float, an int within 64 bits, a bool,
    None or a short str without NUL."""
    cls = v.__class__
    if cls is float:
        return math.isfinite(v)
    if cls is int:
        return bool(INT64_MIN <= v <= INT64_MAX)
    if cls is str:
        return len(v) <= MAX_TEXT_CHARS and "\x00" not in v
    return cls is bool or v is None


def _check_value(field: str, v: Any, budget: Budget) -> None:
    if v.__class__ is float and not math.isfinite(v):
        raise NotFiniteError(field, "not finite")
    if v.__class__ is int and not INT64_MIN <= v <= INT64_MAX:
        raise IntRangeError(field, "integer outside 64 bits")
    if v.__class__ is str:
        budget.spend(field, len(check_str(field, v, MAX_TEXT_CHARS)))
    elif not (v is None or v.__class__ in (bool, int, float)):
        raise MalformedEnvelopeError(field, f"unsupported type {type(v).__name__}")


def _keep(cols: Columns, keep: list[bool]) -> Columns:
    """The columns of the records `keep` marks (the others were refused)."""
    index = list(compress(range(len(keep)), keep))
    flags = cols.flags if isinstance(cols.flags, int) else list(compress(cols.flags, keep))
    return Columns(list(compress(cols.seqs, keep)),
                   None if cols.kinds is None else list(compress(cols.kinds, keep)),
                   list(compress(cols.ts, keep)), cols.pts, list(compress(cols.points, keep)),
                   list(compress(cols.values, keep)), flags,
                   {j: cols.attrs[i] for j, i in enumerate(index) if i in cols.attrs})


__all__ = ["COLUMNAR_VERSION", "ColumnRecords", "Columns", "DecodedColumns", "columns_from",
           "columns_of", "decode_columns", "pack_ints", "record_columns", "to_wire", "unpack"]
