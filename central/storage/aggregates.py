"""Downsampled history (1-minute and 1-hour buckets), series by resolution, and retention.

`agg_1m` / `agg_1h` hold per (point_id, bucket_ms): count, min, max, sum (avg = sum/count),
first_ts, last_ts and last_value (the value at last_ts; the larger one on a tie, so the
result does not depend on arrival order). Only numeric readings with a trusted time (no
`CLOCK_SUSPECT`) are aggregated, and only the rows a write newly inserted (or whose time it
corrected): a duplicate is never counted twice, and out-of-order backlog lands in its own old
bucket.

How they stay cheap: the write transaction records its new samples as packed rows in
`agg_pending` (point ids, times, values; `AggSamples`), so they commit or roll back with the
raw rows. `flush_program` later folds many such rows per (point, bucket) (`AggFold`; on
PostgreSQL `PG_FLUSH`, server-side) and merges each bucket with one upsert, then deletes them,
in one transaction: exactly once
per sample, crash or not. A point polled every few seconds arrives once per batch, so an upsert
per bucket in every write transaction costs two aggregate row writes per reading (measured with
bench/ingest.py: -37 % SQLite, -46 % PostgreSQL ingest rate); folded over a flush interval
(default 30 s) it is a few per point and minute. The flush cost is the bucket upserts (SQLite
~2 us, PostgreSQL ~8 us each): it falls with the samples a bucket gets per flush. Readers
flush first unless a flush ran in the last few seconds (`Storage.buckets`), so a series misses
at most those seconds; the flush task (`central.storage.history`) keeps the pending set small.
A flush folds the rows pending when it starts (`pending_top_program`), not those the ingest
adds while it runs: chasing them, it folded each block again every commit or two, a few
samples per bucket (bench/fleet.py at 5,000 gateways: 1,927 flush transactions and 21 s of
central's CPU in one run; they wait for the next interval).

On SQLite a write stores one pending row per block of point ids (`part`, `PART_BITS`) and a
flush folds one block at a time, all its rows since the last flush: with thousands of
gateways each commit holds a few samples of many points, and a flush bounded by samples over
every point folded nothing (two upserts per sample, a quarter of central's CPU at 20,000
points/s), while one block's rows over a whole interval fold to a few upserts per point.
The block is only where a flush looks first: any row folds correctly in any flush.

Retention deletes in bounded chunks, one short transaction per chunk, per point through the
(point_id, ts_ms) / (point_id, bucket_ms) indexes.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

from central.storage.program import Program, Sql

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
AGG_TABLES: tuple[tuple[str, int], ...] = (("agg_1m", MINUTE_MS), ("agg_1h", HOUR_MS))
AGG_COLS = "point_id, bucket_ms, count, min, max, sum, first_ts, last_ts, last_value"
PART_BITS = 11  # point ids per pending block: 2,048

Resolution = Literal["raw", "1m", "1h"]
RESOLUTION_TABLE: dict[str, tuple[str, int]] = {"1m": AGG_TABLES[0], "1h": AGG_TABLES[1]}
# `auto` picks the finest resolution whose span limit covers the window.
AUTO_SPAN_MS: tuple[tuple[Resolution, int], ...] = (("raw", 6 * HOUR_MS), ("1m", 7 * DAY_MS))


def merge_set(table: str) -> str:
    """The DO UPDATE clause merging an incoming partial aggregate into a stored one; every
    right-hand side reads the row as it was, in both databases."""
    t = table
    return (f"count = {t}.count + excluded.count, sum = {t}.sum + excluded.sum,"
            f" min = CASE WHEN excluded.min < {t}.min THEN excluded.min ELSE {t}.min END,"
            f" max = CASE WHEN excluded.max > {t}.max THEN excluded.max ELSE {t}.max END,"
            f" first_ts = CASE WHEN excluded.first_ts < {t}.first_ts THEN excluded.first_ts"
            f" ELSE {t}.first_ts END,"
            f" last_value = CASE WHEN excluded.last_ts > {t}.last_ts OR (excluded.last_ts ="
            f" {t}.last_ts AND excluded.last_value > {t}.last_value) THEN excluded.last_value"
            f" ELSE {t}.last_value END,"
            f" last_ts = CASE WHEN excluded.last_ts > {t}.last_ts THEN excluded.last_ts"
            f" ELSE {t}.last_ts END")


class AggSamples:
    """The samples one write transaction adds to the aggregates, packed for `agg_pending`."""

    __slots__ = ("pids", "tss", "vals")

    def __init__(self) -> None:
        self.pids = array("q")
        self.tss = array("q")
        self.vals = array("d")

    def __len__(self) -> int:
        return len(self.pids)

    def add(self, pid: int, ts: int, v: float) -> None:
        self.pids.append(pid)
        self.tss.append(ts)
        self.vals.append(v)

    def extend(self, pids: Iterable[int], tss: Iterable[int], vals: Iterable[float]) -> None:
        self.pids.extend(pids)
        self.tss.extend(tss)
        self.vals.extend(vals)

    def pack(self) -> bytes:
        parts: list[array[Any]] = [self.pids, self.tss, self.vals]
        if sys.byteorder != "little":
            parts = [array(a.typecode, a) for a in parts]
            for a in parts:
                a.byteswap()
        return _HEADER.pack(len(self.pids)) + b"".join(a.tobytes() for a in parts)

    def rows(self, now: int) -> list[Sql]:
        """SQLite: one packed row per block of point ids (`PART_BITS`)."""
        return [Sql("INSERT INTO agg_pending (samples, n, created_ms, part) VALUES (?, ?, ?, ?)",
                    (s.pack(), len(s), now, part)) for part, s in self._parts().items()]

    def _parts(self) -> dict[int, AggSamples]:
        pids = self.pids
        keys = [p >> PART_BITS for p in pids]
        if min(keys) == max(keys):
            return {keys[0]: self}
        out: dict[int, AggSamples] = {}
        start, n = 0, len(keys)
        for i in range(1, n + 1):  # runs of one block (a batch's points mostly are one)
            if i == n or keys[i] != keys[start]:
                part = out.get(keys[start])
                if part is None:
                    part = out[keys[start]] = AggSamples()
                part.extend(pids[start:i], self.tss[start:i], self.vals[start:i])
                start = i
        return out


_HEADER = struct.Struct("<I")


def unpack_samples(blob: bytes) -> tuple[array[int], array[int], array[float]]:
    (n,) = _HEADER.unpack_from(blob)
    out: list[array[Any]] = []
    pos = _HEADER.size
    for code in "qqd":
        a = array(code)
        a.frombytes(blob[pos:pos + 8 * n])
        if sys.byteorder != "little":
            a.byteswap()
        out.append(a)
        pos += 8 * n
    return out[0], out[1], out[2]


class AggFold:
    """Partial aggregates per (point_id, bucket_ms): 1-minute buckets folded from samples,
    1-hour buckets rolled up from those."""

    __slots__ = ("minute",)

    def __init__(self) -> None:
        # (pid, minute) -> [count, min, max, sum, first_ts, last_ts, last_value]
        self.minute: dict[tuple[int, int], list[Any]] = {}

    def add(self, pids: Iterable[int], tss: Iterable[int], vals: Iterable[float]) -> None:
        acc = self.minute
        for pid, ts, v in zip(pids, tss, vals, strict=True):
            key = (pid, ts - ts % MINUTE_MS)
            a = acc.get(key)
            if a is None:
                acc[key] = [1, v, v, v, ts, ts, v]
                continue
            a[0] += 1
            a[3] += v
            if v < a[1]:
                a[1] = v
            elif v > a[2]:
                a[2] = v
            if ts < a[4]:
                a[4] = ts
            elif ts > a[5] or (ts == a[5] and v > a[6]):
                a[5] = ts
                a[6] = v

    def hours(self) -> dict[tuple[int, int], list[Any]]:
        out: dict[tuple[int, int], list[Any]] = {}
        for (pid, m), a in self.minute.items():
            key = (pid, m - m % HOUR_MS)
            h = out.get(key)
            if h is None:
                out[key] = list(a)
                continue
            h[0] += a[0]
            h[3] += a[3]
            h[1] = min(h[1], a[1])
            h[2] = max(h[2], a[2])
            h[4] = min(h[4], a[4])
            if a[5] > h[5] or (a[5] == h[5] and a[6] > h[6]):
                h[5] = a[5]
                h[6] = a[6]
        return out

    def rows(self) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """`(table, rows)` with rows sorted by key: the lock order on PostgreSQL."""
        return [(table, [(*k, *acc[k]) for k in sorted(acc)])
                for (table, _), acc in zip(AGG_TABLES, (self.minute, self.hours()), strict=True)]


def values_upsert(table: str, rows: list[tuple[Any, ...]], chunk: int = 400) -> Iterator[Sql]:
    """Merge `rows` into an aggregate table with multi-row VALUES."""
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(part))
        yield Sql(f"INSERT INTO {table} ({AGG_COLS}) VALUES {values}"
                  f" ON CONFLICT (point_id, bucket_ms) DO UPDATE SET {merge_set(table)}",
                  tuple(chain.from_iterable(part)))


def point_parts(pid: int) -> set[int]:
    """The blocks whose pending rows may hold samples of point `pid`: its own, and block 0,
    where rows from before the blocks (`m006`) hold samples of any point."""
    return {pid >> PART_BITS, 0}


def pending_top_program() -> Program[tuple[int, int]]:
    """The newest pending row's id (0: none), which `Storage.flush_aggregates` folds up to,
    and the samples pending."""
    rows = yield Sql("SELECT max(id), CAST(coalesce(sum(n), 0) AS BIGINT) FROM agg_pending")
    top, samples = rows[0]
    return top or 0, int(samples)


def flush_program(upto: int, max_pending: int = 5_000, max_samples: int = 20_000,
                  part: int | None = None) -> Program[int]:
    """Fold the pending rows (ids up to `upto`) of one block of points (`part`, else the one
    with the oldest row), up to `max_pending` rows and no more than `max_samples` samples
    (but at least one row), into the aggregate tables and delete them, in one transaction;
    returns the number of samples folded (0: nothing pending). SQLite; PostgreSQL runs
    `pg_flush_program` (the same, server-side). The sample bound keeps each transaction short
    (~3 us a sample): the flush shares central's one database thread with the ingest writes,
    and after a backlog drain a 50-set flush held it for seconds, which the gateways saw as
    ack round trips over their pacing target."""
    if part is None:
        oldest = yield Sql("SELECT part FROM agg_pending WHERE id <= ? ORDER BY id LIMIT 1",
                           (upto,))
        if not oldest:
            return 0
        part = oldest[0][0]
    sizes = yield Sql("SELECT id, n FROM agg_pending WHERE part = ? AND id <= ? ORDER BY id"
                      " LIMIT ?", (part, upto, max_pending))
    if not sizes:
        return 0
    last = sizes[0][0]
    total = 0
    for pending_id, n in sizes:
        if total and total + n > max_samples:
            break
        last = pending_id
        total += n
    rows = yield Sql("SELECT samples FROM agg_pending WHERE part = ? AND id <= ? ORDER BY id",
                     (part, last))
    fold = AggFold()
    n = 0
    for (blob,) in rows:
        pids, tss, vals = unpack_samples(bytes(blob))
        fold.add(pids, tss, vals)
        n += len(pids)
    for table, aggs in fold.rows():
        for stmt in values_upsert(table, aggs):
            yield stmt
    yield Sql("DELETE FROM agg_pending WHERE part = ? AND id <= ?", (part, last))
    return n


def _pg_merge(table: str, source: str) -> str:
    return (f"INSERT INTO {table} ({AGG_COLS}) SELECT * FROM {source} ORDER BY 1, 2"
            f" ON CONFLICT (point_id, bucket_ms) DO UPDATE SET {merge_set(table)} RETURNING 1")


# On PostgreSQL the pending samples are arrays (`pids`, `tss`, `vals`) and one statement takes
# them (locking them in id order: workers flushing at once queue), groups them per minute, rolls
# the minutes up per hour and merges both, sorted by key. Measured: ~3x less time than folding
# in Python, and no transfer. The same tie rule as `AggFold`: the larger value at the last time.
PG_FLUSH = (
    "WITH taken AS (DELETE FROM agg_pending WHERE id IN (SELECT id FROM agg_pending"
    " WHERE id <= ? ORDER BY id LIMIT ? FOR UPDATE) RETURNING n, pids, tss, vals),"
    " s AS (SELECT u.pid, u.ts, u.v FROM taken, unnest(taken.pids, taken.tss, taken.vals)"
    " AS u(pid, ts, v)),"
    f" m AS (SELECT pid, ts - mod(ts, {MINUTE_MS}) AS bucket, count(*) AS n, min(v) AS lo,"
    " max(v) AS hi, sum(v) AS total, min(ts) AS first_ts, max(ts) AS last_ts,"
    " (array_agg(v ORDER BY ts DESC, v DESC))[1] AS last_value FROM s GROUP BY 1, 2),"
    f" h AS (SELECT pid, bucket - mod(bucket, {HOUR_MS}) AS bucket, sum(n) AS n, min(lo) AS lo,"
    " max(hi) AS hi, sum(total) AS total, min(first_ts) AS first_ts, max(last_ts) AS last_ts,"
    " (array_agg(last_value ORDER BY last_ts DESC, last_value DESC))[1] AS last_value"
    " FROM m GROUP BY 1, 2),"
    f" m_up AS ({_pg_merge('agg_1m', 'm')}), h_up AS ({_pg_merge('agg_1h', 'h')})"
    " SELECT CAST(coalesce(sum(n), 0) AS BIGINT) FROM taken")


def pg_flush_program(upto: int, max_pending: int = 50) -> Program[int]:
    rows = yield Sql(PG_FLUSH, (upto, max_pending))
    return int(rows[0][0])


# --- reads ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    ts_ms: int  # bucket start
    count: int
    min: float
    max: float
    sum: float
    first_ts: int
    last_ts: int
    last_value: float

    @property
    def avg(self) -> float:
        return self.sum / self.count


def choose_resolution(from_ms: int, to_ms: int) -> Resolution:
    """`auto`: raw up to 6 h, 1m up to 7 days, 1h beyond."""
    span = to_ms - from_ms
    for res, limit in AUTO_SPAN_MS:
        if span <= limit:
            return res
    return "1h"


def coarser(res: Resolution, from_ms: int, now_ms: int,
            keep_days: dict[str, float]) -> Resolution | None:
    """The next resolution to try when `res` found nothing because retention has already
    purged the window's start (`keep_days[res]`, 0 = for ever); None if that is not why."""
    days = keep_days.get(res, 0)
    if res == "1h" or days <= 0 or from_ms >= now_ms - days * DAY_MS:
        return None
    return "1m" if res == "raw" else "1h"


def point_id_program(gw: str, device: str, point: str) -> Program[int | None]:
    rows = yield Sql("SELECT id FROM points WHERE gw = ? AND device = ? AND point = ?",
                     (gw, device, point))
    return rows[0][0] if rows else None


def buckets_program(pid: int, resolution: str, from_ms: int, to_ms: int,
                    limit: int) -> Program[list[Bucket]]:
    """Buckets of a point that start in [floor(from), to), oldest first, at most `limit`."""
    table, width = RESOLUTION_TABLE[resolution]
    start = from_ms - from_ms % width
    rows = yield Sql(f"SELECT bucket_ms, count, min, max, sum, first_ts, last_ts, last_value"
                     f" FROM {table} WHERE point_id = ? AND bucket_ms >= ? AND bucket_ms < ?"
                     f" ORDER BY bucket_ms LIMIT ?", (pid, start, to_ms, limit))
    return [Bucket(*r) for r in rows]


# --- retention --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Days to keep each resolution; 0 keeps for ever."""

    raw_days: float = 30
    minute_days: float = 400
    hour_days: float = 0
    chunk_rows: int = 5000

    def cutoffs(self, now_ms: int) -> list[tuple[str, str, int]]:
        """`(table, time column, delete-before ms)` for every resolution with a limit."""
        out = []
        for table, col, days in (("readings", "ts_ms", self.raw_days),
                                 ("agg_1m", "bucket_ms", self.minute_days),
                                 ("agg_1h", "bucket_ms", self.hour_days)):
            if days > 0:
                out.append((table, col, now_ms - int(days * DAY_MS)))
        return out


def purge_keys(table: str) -> str:
    return "gw, stream, seq" if table == "readings" else "point_id, bucket_ms"


def purge_chunk_program(table: str, col: str, pid: int | None, before_ms: int,
                        chunk: int) -> Program[int]:
    """Delete at most `chunk` rows of one point older than `before_ms`; returns how many."""
    keys = purge_keys(table)
    where = "point_id IS NULL" if pid is None else "point_id = ?"
    args: tuple[object, ...] = () if pid is None else (pid,)
    rows = yield Sql(f"DELETE FROM {table} WHERE ({keys}) IN (SELECT {keys} FROM {table}"
                     f" WHERE {where} AND {col} < ? ORDER BY {keys} LIMIT ?) RETURNING 1",
                     (*args, before_ms, chunk))
    return len(rows)


PURGE_SCAN_POINTS = 4096  # point ids one `purge_points_program` looks at


def points_top_program() -> Program[int]:
    rows = yield Sql("SELECT max(id) FROM points")
    return rows[0][0] or 0


def purge_points_program(table: str, col: str, before_ms: int, after_id: int,
                         span: int = PURGE_SCAN_POINTS) -> Program[list[int]]:
    """The points with an id in (after_id, after_id + span] that hold rows of `table` older
    than `before_ms`: one index probe each, so a purge with nothing to delete costs a few
    statements, not a transaction per point (100,000 points: ~10 s of central's one
    SQLite thread every purge interval, which the gateways saw as ack lag)."""
    rows = yield Sql(f"SELECT id FROM points WHERE id > ? AND id <= ? AND EXISTS (SELECT 1"
                     f" FROM {table} WHERE point_id = points.id AND {col} < ?) ORDER BY id",
                     (after_id, after_id + span, before_ms))
    return [r[0] for r in rows]
