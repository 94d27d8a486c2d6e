"""SQLite backend: one connection owned by one thread, WAL, migrations (`sqlite_schema`).

Every blocking call runs on a single-thread executor that owns the connection (STYLE.md §4);
callers await it, so writes are serialised without locks. The ingest commit uses
`synchronous=FULL`: central acks a batch right after the commit, and the ack tells the gateway
it may forget those records, so the commit must survive a power cut, not only a crash.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from itertools import chain, islice, repeat
from operator import attrgetter, eq, lt
from pathlib import Path
from typing import Any, TypeVar

import structlog

from central.alarms.engine import ingest_program, log_changes
from central.alarms.lifecycle import AlarmChange, AlarmPolicy
from central.storage.aggregates import AggSamples, flush_program, point_parts
from central.storage.base import GatewayInfo, Storage, WriteResult, record_state_program, split_key
from central.storage.delivery import (
    HeldRanges,
    StreamTally,
    batch_ranges_program,
    held_before,
    streams_program,
    tally_rejected,
)
from central.storage.errors import DatabaseWriteError, StorageError, UnstorableValueError
from central.storage.program import Program, run_sync
from central.storage.sqlite_schema import migrate
from central.storage.timecheck import CENTRAL_TS_SUSPECT, CLOCK_SUSPECT, TimePolicy, replaces
from central.storage.writes import (
    PURGED,
    held_flags_program,
    merge_alarms_program,
    merge_program,
    merges,
    replace_program,
    stage_records,
)
from protocols.envelope import (
    Birth,
    DataBatch,
    Record,
    RecordKind,
    ranges_from_seqs,
    to_jsonable,
)
from runtime.sqlite import SqliteOwner

log = structlog.get_logger(__name__)
T = TypeVar("T")

# --- SQL --------------------------------------------------------------------------------------

_READING_COLS = 8  # reading_rows: sid, seq, point_id, ts_ms, value, text, flags, received_ms
_ROWS_PER_INSERT = 500  # 4,500 parameters; fewer if the library's limit is lower


def _execute_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]],
                  max_params: int) -> None:
    """`sql` (with `{}` for its VALUES) for all `rows`, as few multi-row statements as the
    parameter limit allows: SQLite steps each without the GIL, where executemany takes it
    back for every row."""
    width = len(rows[0])
    per = max(1, max_params // width)
    for i in range(0, len(rows), per):
        part = rows[i:i + per]
        conn.execute(sql.format(_row_marks(width, len(part))), list(chain.from_iterable(part)))


@functools.lru_cache(maxsize=1024)
def _row_marks(width: int, rows: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return ", ".join([one] * rows)


@functools.lru_cache(maxsize=_ROWS_PER_INSERT + 1)
def _multi_insert_reading(rows: int) -> str:
    return ("INSERT INTO reading_rows (sid, seq, point_id, ts_ms, value, text, flags,"
            f" received_ms) VALUES {_row_marks(_READING_COLS, rows)}"
            " ON CONFLICT (sid, seq) DO NOTHING")


_INSERT_EVENT = ("INSERT INTO events (gw, stream, seq, kind, point_id, ts_ms, value, text, flags,"
                 " attrs, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT (gw, stream, seq) DO NOTHING")
# Only a newer sample replaces the latest value, so backlog never hides fresher data.
_UPSERT_LATEST = ("INSERT INTO latest (point_id, ts_ms, value, text) VALUES {}"
                  " ON CONFLICT (point_id) DO UPDATE SET ts_ms = excluded.ts_ms,"
                  " value = excluded.value, text = excluded.text"
                  " WHERE excluded.ts_ms > latest.ts_ms")
_TOUCH_GATEWAYS = ("INSERT INTO gateways (gw, stream, last_seen_ms) VALUES {}"
                   " ON CONFLICT (gw) DO UPDATE SET stream = excluded.stream,"
                   " last_seen_ms = excluded.last_seen_ms")

_TELEMETRY = RecordKind.TELEMETRY
# What the column-by-column write reads of each record (a dataclass or a named tuple alike).
_RECORD_COLS = attrgetter("seq", "kind", "ts_ms", "point", "value", "flags")
_NUMERIC = frozenset((float, int, bool))


def _columns(batch: DataBatch) -> tuple[bool, Sequence[int], Sequence[int], Sequence[Any],
                                        Sequence[Any], Sequence[int]]:
    """(every record is telemetry, seqs, times, point keys, values, flags) of a batch: a
    version 2 batch's columns as they were decoded, else taken from its records."""
    cols = batch.columns
    if cols is None:
        seqs, kinds, tss, points, values, flags = zip(*map(_RECORD_COLS, batch.records),
                                                      strict=True)
        return kinds.count(_TELEMETRY) == len(seqs), seqs, tss, points, values, flags
    table: list[str | None] = [*cols.pts, None]  # point index -1: no point
    return (cols.kinds is None or not any(cols.kinds), cols.seqs, cols.ts,
            list(map(table.__getitem__, cols.points)), cols.values,
            [cols.flags] * len(cols.seqs) if isinstance(cols.flags, int) else cols.flags)


def _held(conn: sqlite3.Connection, table: str, gw: str, stream: str,
          rows: dict[int, tuple[Any, ...]], before: set[int]) -> dict[int, int]:
    """`{seq: stored flags}` of the staged `rows` already held: by a row in `table`, or only
    by the stream's ranges (`before`: retention purged the row, writes.py's `PURGED`)."""
    held = run_sync(conn, held_flags_program(table, gw, stream, sorted(rows)))
    return {s: PURGED for s in before if s in rows} | held if before else held


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqliteStorage(Storage):
    """Storage on one SQLite file (WAL); `path` may be `:memory:` for throwaway use."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL",
                 alarm_policy: AlarmPolicy | None = None,
                 time_policy: TimePolicy | None = None) -> None:
        super().__init__(alarm_policy=alarm_policy, time_policy=time_policy)
        if synchronous.upper() not in ("FULL", "NORMAL", "OFF", "EXTRA"):
            raise StorageError(f"bad synchronous mode {synchronous!r}")
        self.path = str(path)
        self.synchronous = synchronous.upper()
        # Driver errors stay sqlite3.Error here: `_transaction` and `ping` tell them apart.
        self._thread = SqliteOwner(thread_name="central-sqlite", error=StorageError,
                                   closed_message="storage is not open", translate=())
        self._conn: sqlite3.Connection | None = None
        # (gw) -> {"device/point": point id}; only touched on the db thread.
        self._point_ids: dict[str, dict[str, int]] = {}
        # (gw, stream) -> its id in reading_streams (sqlite_schema); only on the db thread.
        self._stream_ids: dict[tuple[str, str], int] = {}
        self._max_params = _ROWS_PER_INSERT * _READING_COLS

    # -- plumbing ------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._thread.call(fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("storage is not open")
        return self._conn

    async def open(self) -> None:
        await self._thread.open(self._open_sync)

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            migrate(conn)
            self._max_params = min(self._max_params,
                                   conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        self._conn = conn
        log.info("db_opened", path=self.path, synchronous=self.synchronous)

    async def close(self) -> None:
        await self._thread.close(self._close_sync)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def ping(self) -> bool:
        try:
            return await self._call(lambda: self._db().execute("SELECT 1").fetchone() == (1,))
        except (sqlite3.Error, StorageError):
            return False

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                self._point_ids.clear()  # ids made in the rolled-back transaction are gone
                self._stream_ids.clear()
                raise
        except (sqlite3.DataError, sqlite3.IntegrityError, OverflowError, ValueError) as exc:
            # A value the envelope let through but the database cannot hold (an int past
            # 64 bits, attrs json cannot render): the same write fails again.
            raise UnstorableValueError(f"transaction rolled back: {exc}") from exc
        except sqlite3.Error as exc:
            raise DatabaseWriteError(f"transaction rolled back: {exc}") from exc
        return result

    # -- points --------------------------------------------------------------------------------

    def _ids_for(self, conn: sqlite3.Connection, gw: str, keys: set[str]) -> dict[str, int]:
        """Point ids of a gateway by key, creating points seen for the first time."""
        ids = self._point_ids.get(gw)
        if ids is None:
            ids = self._point_ids[gw] = {
                (f"{d}/{p}" if d else p): i for i, d, p in
                conn.execute("SELECT id, device, point FROM points WHERE gw = ?", (gw,))}
        missing = keys.difference(ids)
        if missing:
            conn.executemany(
                "INSERT INTO points (gw, device, point) VALUES (?, ?, ?)"
                " ON CONFLICT (gw, device, point) DO NOTHING",
                [(gw, *split_key(k)) for k in missing])
            for k in missing:
                d, p = split_key(k)
                ids[k] = conn.execute("SELECT id FROM points WHERE gw = ? AND device = ?"
                                      " AND point = ?", (gw, d, p)).fetchone()[0]
        return ids

    def _stream_id(self, conn: sqlite3.Connection, gw: str, stream: str) -> int:
        """The integer key of a stream's readings (`reading_rows.sid`), made when first seen."""
        sid = self._stream_ids.get((gw, stream))
        if sid is None:
            conn.execute("INSERT INTO reading_streams (gw, stream) VALUES (?, ?)"
                         " ON CONFLICT (gw, stream) DO NOTHING", (gw, stream))
            sid = self._stream_ids[gw, stream] = conn.execute(
                "SELECT id FROM reading_streams WHERE gw = ? AND stream = ?",
                (gw, stream)).fetchone()[0]
        return sid

    # -- writes --------------------------------------------------------------------------------

    async def write_batches(self, batches: Sequence[DataBatch], *,
                            now_ms: int | None = None) -> list[WriteResult]:
        if not batches:
            return []
        now = _now_ms() if now_ms is None else now_ms
        results, changes = await self._call(self._transaction,
                                            lambda c: self._write_sync(c, batches, now))
        log_changes(changes)
        return results

    def _write_sync(self, conn: sqlite3.Connection, batches: Sequence[DataBatch],
                    now: int) -> tuple[list[WriteResult], list[AlarmChange]]:
        lo, hi = self.time_policy.bounds(now)
        results: list[WriteResult] = []
        latest: dict[int, tuple[int, Any, Any]] = {}
        samples = AggSamples()
        tally = StreamTally()
        merged: list[tuple[str, str, Record]] = []  # narrowband copies replaced (writes.py)
        seen: dict[str, str] = {}  # gw -> the stream its last batch here names
        before = run_sync(conn, batch_ranges_program(batches))
        for batch in batches:
            res = self._write_plain_telemetry(conn, batch, now, lo, hi, latest, samples, tally,
                                              before)
            if res is None:
                res = self._write_batch(conn, batch, now, lo, hi, latest, samples, tally,
                                        merged, before)
            tally_rejected(tally, batch, now)
            seen[batch.gw] = batch.stream
            results.append(res)
        limit = self._max_params
        _execute_rows(conn, _TOUCH_GATEWAYS, [(gw, s, now) for gw, s in seen.items()], limit)
        if samples:
            for stmt in samples.rows(now):
                conn.execute(stmt.text, stmt.params)
        if latest:
            _execute_rows(conn, _UPSERT_LATEST, [(pid, *vals) for pid, vals in latest.items()],
                          limit)
        run_sync(conn, streams_program(tally, now))
        # Alarm records move alarms in this same transaction (central.alarms.engine).
        changes = run_sync(conn, ingest_program(batches, self.alarm_policy, now))
        if merged:
            run_sync(conn, merge_alarms_program(merged))
        return results, changes

    def _write_plain_telemetry(self, conn: sqlite3.Connection, batch: DataBatch, now: int,
                               lo: int, hi: int, latest: dict[int, tuple[int, Any, Any]],
                               samples: AggSamples, tally: StreamTally,
                               before: HeldRanges) -> WriteResult | None:
        """The usual batch (backlog or live telemetry) column by column, without a Python
        step per record: only numeric TELEMETRY with a point, distinct seqs, trusted and
        plausible times, none of it held yet. Returns None, having written nothing, for any
        other batch; `_write_batch` then takes it (the same result, record by record)."""
        gw, stream, records = batch.gw, batch.stream, batch.records
        n = len(records)
        if not n:
            return None
        telemetry, seqs, tss, points, values, flags = _columns(batch)
        if (not telemetry or None in points
                or not _NUMERIC.issuperset(map(type, values))
                or min(tss) < lo or max(tss) > hi):
            return None
        flag_set = set(flags)
        if any(f & CLOCK_SUSPECT for f in flag_set):
            return None
        if isinstance(seqs, range) or all(map(lt, seqs, islice(seqs, 1, None))):
            ordered: Sequence[int] = seqs
        else:
            ordered = sorted(seqs)
            if any(map(eq, ordered, islice(ordered, 1, None))):
                return None  # a seq twice: the record-by-record path keeps its first copy
        first, last = ordered[0], ordered[-1]
        runs = ((first, last),) if last - first + 1 == n else ranges_from_seqs(ordered)
        if (run_sync(conn, held_flags_program("readings", gw, stream, ordered))
                or held_before(before, gw, stream, runs)):
            return None  # (part of) a resent batch, maybe of rows retention purged
        ids = self._ids_for(conn, gw, set(points))
        pids = list(map(ids.__getitem__, points))
        # Plain ints: sqlite3 binds an IntFlag member only after a slow adapter look-up.
        params = list(chain.from_iterable(zip(repeat(self._stream_id(conn, gw, stream)), seqs,
                                              pids, tss, values, repeat(None),
                                              map(int, flags), repeat(now))))
        inserted = self._insert_readings(conn, params)
        samples.extend(pids, tss, values)
        # Latest per point: the largest time, the first record on a tie.
        for pid, ts, value in zip(pids, tss, values, strict=True):
            prev = latest.get(pid)
            if prev is None or ts > prev[0]:
                latest[pid] = (ts, value, None)
        tally.held_ranges(gw, stream, runs)
        return WriteResult(gw=gw, stream=stream, received=n, inserted=inserted)

    def _insert_readings(self, conn: sqlite3.Connection, params: list[Any]) -> int:
        """Insert readings given as flat column values, many rows per statement: SQLite
        then holds the GIL-free step for a whole chunk, so a thread decoding the next
        message does not stall the insert row by row (executemany takes the GIL per row)."""
        rows = len(params) // _READING_COLS
        per = max(1, self._max_params // _READING_COLS)
        inserted = 0
        for i in range(0, rows, per):
            k = min(per, rows - i)
            sql = _multi_insert_reading(k)
            inserted += conn.execute(sql, params[i * _READING_COLS:(i + k) * _READING_COLS]
                                     ).rowcount
        return inserted

    def _write_batch(self, conn: sqlite3.Connection, batch: DataBatch, now: int, lo: int,
                     hi: int, latest: dict[int, tuple[int, Any, Any]], samples: AggSamples,
                     tally: StreamTally, merged: list[tuple[str, str, Record]],
                     before: HeldRanges) -> WriteResult:
        """Any batch, record by record."""
        gw, stream, records = batch.gw, batch.stream, batch.records
        ids = self._ids_for(conn, gw, {r.point for r in records if r.point is not None})
        # seq -> row; a seq twice in one batch keeps its first copy.
        readings: dict[int, tuple[Any, ...]] = {}
        events: dict[int, tuple[Any, ...]] = {}
        # The aggregates' samples, assuming every reading is new (the usual case).
        pids: list[int] = []
        tss: list[int] = []
        vals: list[float] = []
        stage_records(gw, stream, records, ids, lo, hi, now, readings=readings, events=events,
                      latest=latest, tally=tally, samples=(pids, tss, vals))
        in_ranges = held_before(before, gw, stream,
                                ranges_from_seqs(readings.keys() | events.keys()))
        inserted = suspect = corrected = n_merged = 0
        for table, rows, ts_i, flags_i in (("readings", readings, 4, 7),
                                           ("events", events, 5, 8)):
            if not rows:
                continue
            held = _held(conn, table, gw, stream, rows, in_ranges)
            fresh = list(rows.values()) if not held else [
                row for s, row in rows.items() if s not in held]
            if fresh:
                if table == "readings":
                    sid = self._stream_id(conn, gw, stream)
                    inserted += self._insert_readings(conn, list(chain.from_iterable(
                        (sid, *row[2:]) for row in fresh)))
                else:
                    inserted += conn.executemany(_INSERT_EVENT, fresh).rowcount
                suspect += sum(1 for row in fresh if row[flags_i] & CENTRAL_TS_SUSPECT)
            fixed: list[tuple[Any, ...]] = []
            if held:
                done_nb: set[int] = set()
                if table == "events":
                    nb = [rows[s][:10] for s, f in held.items() if merges(f, rows[s][flags_i])]
                    if nb:
                        done_nb = {s for _, _, s in run_sync(conn, merge_program(nb))}
                        n_merged += len(done_nb)
                        first: dict[int, Record] = {}
                        for r in records:
                            first.setdefault(r.seq, r)
                        merged.extend((gw, stream, first[s]) for s in sorted(done_nb))
                again = [(gw, stream, s, rows[s][ts_i], rows[s][flags_i])
                         for s, f in held.items()
                         if s not in done_nb and replaces(f, rows[s][flags_i])]
                if again:
                    done = run_sync(conn, replace_program(table, again))
                    fixed = [rows[s] for _, _, s in done]
                    corrected += len(fixed)
            if table == "readings":
                if not held:
                    samples.extend(pids, tss, vals)
                for part in ((fresh, fixed) if held else (fixed,)):
                    for _, _, _, pid, ts, num, _, f, _ in part:
                        if pid is not None and num is not None and not f & CLOCK_SUSPECT:
                            samples.add(pid, ts, float(num))
        tally.held(gw, stream, readings)
        tally.held(gw, stream, events)
        return WriteResult(gw=gw, stream=stream, received=len(records), inserted=inserted,
                           clock_suspect=suspect, corrected=corrected, merged=n_merged)

    async def record_birth(self, gw: str, birth: Birth, *, now_ms: int | None = None) -> None:
        now = _now_ms() if now_ms is None else now_ms
        await self._call(self._transaction, lambda c: self._birth_sync(c, gw, birth, now))

    async def record_gateway_infos(self, infos: Sequence[GatewayInfo], *,
                                   now_ms: int | None = None) -> None:
        now = _now_ms() if now_ms is None else now_ms

        def body(conn: sqlite3.Connection) -> None:
            for gw, msg, seen in infos:
                if isinstance(msg, Birth):
                    self._birth_sync(conn, gw, msg, now)
                else:
                    run_sync(conn, record_state_program(gw, msg, now if seen else None))

        await self._call(self._transaction, body)

    def _birth_sync(self, conn: sqlite3.Connection, gw: str, birth: Birth, now: int) -> None:
        rows = []
        for dev in birth.devices:
            for p in dev.points:
                d, name = split_key(p.key)
                rows.append((gw, d or dev.id, name, p.name_zh, p.unit, dev.profile, p.ordinal))
        conn.execute(
            "INSERT INTO gateways (gw, stream, boot_id, version, birth, last_seen_ms)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (gw) DO UPDATE SET"
            " stream = excluded.stream, boot_id = excluded.boot_id,"
            " version = excluded.version, birth = excluded.birth,"
            " last_seen_ms = excluded.last_seen_ms",
            (gw, birth.stream, birth.boot_id, birth.version,
             json.dumps(to_jsonable(birth), ensure_ascii=False), now))
        conn.executemany(
            "INSERT INTO points (gw, device, point, name_zh, unit, profile, ordinal)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gw, device, point) DO UPDATE SET"
            " name_zh = excluded.name_zh, unit = excluded.unit,"
            " profile = excluded.profile, ordinal = excluded.ordinal", rows)
        self._point_ids.pop(gw, None)  # reload ids, new points may exist

    async def flush_point(self, pid: int) -> None:
        """Fold the pending samples of the point's block only: a read must not fold the
        whole fleet's (5,000 gateways: ~600,000 samples every 30 s, seconds of the one
        database thread, which every gateway would see as ack lag)."""
        for part in sorted(point_parts(pid)):
            await self._fold(functools.partial(flush_program, part=part))

    async def run(self, program: Callable[[], Program[T]], *, write: bool = True) -> T:
        if write:
            return await self._call(self._transaction, lambda c: run_sync(c, program()))
        return await self._read(lambda c: run_sync(c, program()))

    # -- reads ---------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return fn(self._db())
            except sqlite3.Error as exc:
                raise StorageError(f"read failed: {exc}") from exc
        return await self._call(run)
