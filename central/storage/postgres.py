"""PostgreSQL backend (DESIGN.md §9): the same tables and semantics as SQLite, for several
central workers sharing one database.

Three connections: a writer (ingest, state, birth), a reader (the API), so reads never queue
behind a large ingest transaction, and one for the flush of the latest values held back
(`postgres_latest`, opened at the first flush): on the writer a flush (15-30 ms, twice a
second) held the next batch write back for as long, about 5 % of the writer's time in
`bench/ingest.py --backend postgres`. (On a 2-core machine the bench's rate moved little,
median 148k to 151k points/s over 25 and 35 alternated rounds: the flush's server work still
shares the cores.) Each is used by one task at a time and reopened after the server drops it.
A batch write locks its streams' rows, asks which keys are held, and binary `COPY`s the new
rows straight into `readings` and `events` (`postgres_write`, which says why not
`INSERT ... ON CONFLICT`). Schema and migrations: `postgres_schema`.

Several workers write at once, so every statement that takes row locks visits its rows in one
global order (points by key, streams by (gw, stream), readings and events by (gw, stream,
seq), gateways by gw; then latest values, which the gateways' rows guard) and every
transaction takes them in that phase order (the aggregate flush: pending rows by id, then
buckets by (point, bucket)): two workers writing overlapping batches wait for each other (on
the streams' or the gateways' rows) but never deadlock.
Migrations run under a transaction-scoped advisory lock so workers starting together migrate
once. Commits use `synchronous_commit = on`: the ack that follows tells the gateway it may
forget the records.

The schema is the connection's `current_schema()`; choose one with the URL, e.g.
`postgresql://central@db/fieldlink?options=-csearch_path%3Dcity1`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from operator import attrgetter
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from central.alarms.engine import log_changes
from central.alarms.lifecycle import AlarmChange, AlarmPolicy
from central.storage import postgres_latest
from central.storage.aggregates import pg_flush_program
from central.storage.base import Storage, WriteResult, split_key
from central.storage.errors import DatabaseWriteError, StorageError, UnstorableValueError
from central.storage.postgres_binary import register_dumpers
from central.storage.postgres_latest import LatestColumns, PendingLatest
from central.storage.postgres_schema import Conn, migrate
from central.storage.postgres_write import write_batches
from central.storage.program import Program, run_async
from central.storage.timecheck import TimePolicy
from protocols.envelope import Birth, DataBatch, to_jsonable
from runtime import tasks

log = structlog.get_logger(__name__)
T = TypeVar("T")

# How long a worker may hold latest values before writing them (`postgres_latest`); 0 writes
# them in each ingest transaction.
LATEST_INTERVAL_S = 0.5

# --- SQL --------------------------------------------------------------------------------------

_INSERT_POINTS = ("INSERT INTO points (gw, device, point)"
                  " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[]) ORDER BY 1, 2, 3"
                  " ON CONFLICT (gw, device, point) DO NOTHING")
_SELECT_POINTS = ("SELECT p.id, p.gw, p.device, p.point FROM points p"
                  " JOIN unnest(%b::text[], %b::text[], %b::text[]) AS k(gw, device, point)"
                  " ON p.gw = k.gw AND p.device = k.device AND p.point = k.point")


_POINT = attrgetter("point")


def _points_named(batches: Sequence[DataBatch]) -> dict[str, set[str]]:
    """The points each gateway's records name (`map`, not a generator: it runs per record);
    a version 2 batch's from its columns, without making its records."""
    keys: dict[str, set[Any]] = {}
    for b in batches:
        cols = b.columns
        named = keys.setdefault(b.gw, set())
        if cols is None:
            named.update(map(_POINT, b.records))
        else:
            used = set(cols.points)
            used.discard(-1)
            pts = cols.pts
            named.update(pts if len(used) == len(pts) else map(pts.__getitem__, used))
    for names in keys.values():
        names.discard(None)
    return keys


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _key(device: str, point: str) -> str:
    return f"{device}/{point}" if device else point


def _log_repaired(gws: list[str]) -> None:
    if gws:
        log.warning("latest_values_repaired", gateways=len(gws), first=gws[0],
                    why="a worker stopped before writing the latest values it owed")


def _storage_error(exc: BaseException, what: str) -> StorageError | None:
    """`exc` as the storage error callers handle; None for any other (raised as it is).
    Data errors (class 22: out of range, NUL in text, bad json) and what the driver refuses
    to bind fail the same way again: the caller may isolate the bad record."""
    if isinstance(exc, (psycopg.DataError, OverflowError, ValueError)):
        return UnstorableValueError(f"{what}: {exc}")
    if isinstance(exc, psycopg.Error):
        return DatabaseWriteError(f"{what}: {exc}")
    return None


def describe_url(url: str) -> str:
    """`user@host:port/dbname` without the password, for logs and errors."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://?"
    user = f"{d['user']}@" if d.get("user") else ""
    return f"postgresql://{user}{d.get('host', '')}:{d.get('port', 5432)}/{d.get('dbname', '')}"


class _Link:
    """One connection used by one task at a time; reopened after the server drops it."""

    def __init__(self, url: str, role: str, setup: Sequence[str] = (),
                 **connect_kwargs: Any) -> None:
        self.url = url
        self.role = role
        self.setup = tuple(setup)
        self.connect_kwargs = connect_kwargs
        self.conn: Conn | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> Conn:
        try:
            conn = await AsyncConnection.connect(self.url, autocommit=True, connect_timeout=10,
                                                 **self.connect_kwargs)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to {describe_url(self.url)}: {exc}") from exc
        register_dumpers(conn)
        try:
            for sql in self.setup:
                await conn.execute(sql)
        except BaseException:
            await conn.close()
            raise
        return conn

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Conn]:
        async with self._lock:
            if self.conn is None or self.conn.closed:
                if self.conn is not None:
                    log.warning("db_reconnecting", role=self.role)
                self.conn = await self.connect()
            try:
                yield self.conn
            except psycopg.Error:
                if self.conn is not None and self.conn.broken:
                    await self.close_conn()
                raise
            except Exception:
                raise  # our own errors between statements leave the session as it was
            except BaseException:
                # Cancelled mid-statement: the session state is unknown, start afresh.
                await self.close_conn()
                raise

    async def close_conn(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


class PostgresStorage(Storage):
    """Storage on PostgreSQL; `url` is a libpq URL (`postgresql://` or `postgres://`)."""

    _flush_program = staticmethod(pg_flush_program)

    def __init__(self, url: str, *, alarm_policy: AlarmPolicy | None = None,
                 time_policy: TimePolicy | None = None,
                 latest_interval_s: float = LATEST_INTERVAL_S) -> None:
        super().__init__(alarm_policy=alarm_policy, time_policy=time_policy)
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StorageError(f"bad database URL: {exc}") from exc
        self.url = url
        # Named in pg_stat_activity unless the URL names it already.
        self._connect_kwargs: dict[str, Any] = (
            {} if "application_name" in params else {"application_name": "fieldlink-central"})
        self._writer: _Link | None = None
        self._reader: _Link | None = None
        self._latest: _Link | None = None  # the latest values' flush (module doc)
        # (gw) -> {"device/point": point id}; only touched inside the writer's lock.
        self._point_ids: dict[str, dict[str, int]] = {}
        # Latest values committed but not written yet, unless the interval is 0
        # (`postgres_latest`); the task that writes them every interval.
        self.latest_interval_s = latest_interval_s
        self._token = postgres_latest.new_token()
        self._pending = PendingLatest()
        self._owed_ms = 0  # the stamp of the last write whose latest values this worker owes
        self._latest_task: asyncio.Task[None] | None = None

    # -- plumbing ------------------------------------------------------------------------------

    def _links(self) -> tuple[_Link, _Link]:
        if self._writer is None or self._reader is None:
            raise StorageError("storage is not open")
        return self._writer, self._reader

    def _latest_link(self) -> _Link:
        if self._latest is None:
            raise StorageError("storage is not open")
        return self._latest

    async def open(self) -> None:
        if self._writer is not None:
            return
        # No JIT for the writer: its statements are short, and compiling a probe over many
        # runs (estimated, not found, to return rows) cost more than running it.
        writer = _Link(self.url, "writer",
                       ("SET synchronous_commit = on", "SET jit = off",
                        postgres_latest.token_lock(self._token)),
                       **self._connect_kwargs)
        reader = _Link(self.url, "reader", **self._connect_kwargs)
        # Connects at its first flush: a worker writing latest values at once never does.
        latest = _Link(self.url, "latest", ("SET synchronous_commit = on", "SET jit = off"),
                       **self._connect_kwargs)
        try:
            async with writer.use() as conn:
                version = await migrate(conn)
                async with conn.transaction():
                    repaired = await postgres_latest.repair(conn)
            async with reader.use():
                pass
        except BaseException as exc:
            await writer.close_conn()
            await reader.close_conn()
            if isinstance(exc, psycopg.Error):
                raise StorageError(f"cannot open {describe_url(self.url)}: {exc}") from exc
            raise
        self._writer, self._reader, self._latest = writer, reader, latest
        log.info("db_opened", url=describe_url(self.url), version=version)
        _log_repaired(repaired)
        if self.latest_interval_s > 0:
            self._latest_task = tasks.start("pg-latest", self._write_latest_every_interval)

    async def close(self) -> None:
        if self._latest_task is not None:
            await tasks.stop(self._latest_task)
            self._latest_task = None
            try:
                await self.settle_latest()
            except StorageError as exc:  # marked: the next worker to open repairs them
                log.warning("latest_values_left", points=len(self._pending), error=str(exc))
        links = [x for x in (self._writer, self._reader, self._latest) if x is not None]
        self._writer = self._reader = self._latest = None
        self._point_ids.clear()
        for link in links:
            await link.close_conn()

    async def ping(self) -> bool:
        async def q(conn: Conn) -> bool:
            return await self._rows(conn, "SELECT 1") == [(1,)]
        try:
            return await self._read(q)
        except StorageError:
            return False

    async def _transaction(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """`body` in a transaction on the writer."""
        writer, _ = self._links()
        try:
            return await self._transaction_on(writer, body)
        except BaseException:
            self._point_ids.clear()  # ids made in the rolled-back transaction are gone
            raise

    @staticmethod
    async def _transaction_on(link: _Link, body: Callable[[Conn], Awaitable[T]]) -> T:
        """`body` in a transaction on `link`; the database's errors as storage errors."""
        try:
            async with link.use() as conn, conn.transaction():
                return await body(conn)
        except BaseException as exc:
            if (err := _storage_error(exc, "transaction rolled back")) is None:
                raise
            raise err from exc

    # -- points --------------------------------------------------------------------------------

    async def _ids_for(self, conn: Conn, keys: dict[str, set[str]]) -> None:
        """Fill the id cache for every (gw, key) in `keys`, creating unseen points. Two workers
        racing on a new point both insert with DO NOTHING; the second waits for the first's
        commit, then both select the one row."""
        unloaded = [gw for gw in keys if gw not in self._point_ids]
        if unloaded:
            for gw in unloaded:
                self._point_ids[gw] = {}
            cur = await conn.execute("SELECT id, gw, device, point FROM points"
                                     " WHERE gw = ANY(%s)", (unloaded,))
            for pid, gw, d, p in await cur.fetchall():
                self._point_ids[gw][_key(d, p)] = pid
        missing = sorted((gw, *split_key(k)) for gw, ks in keys.items()
                         for k in ks.difference(self._point_ids[gw]))
        if not missing:
            return
        cols = [list(c) for c in zip(*missing, strict=True)]
        await conn.execute(_INSERT_POINTS, cols)
        cur = await conn.execute(_SELECT_POINTS, cols)
        for pid, gw, d, p in await cur.fetchall():
            self._point_ids[gw][_key(d, p)] = pid

    # -- writes --------------------------------------------------------------------------------

    async def write_batches(self, batches: Sequence[DataBatch], *,
                            now_ms: int | None = None) -> list[WriteResult]:
        if not batches:
            return []
        now = _now_ms() if now_ms is None else now_ms
        results, changes, latest, stamp = await self._transaction(
            lambda c: self._write(c, batches, now))
        if latest is not None:  # committed: now they are owed
            self._pending.add(latest, {b.gw for b in batches}, stamp)
        log_changes(changes)
        return results

    async def _write(self, conn: Conn, batches: Sequence[DataBatch], now: int,
                     ) -> tuple[list[WriteResult], list[AlarmChange], LatestColumns | None, int]:
        await self._ids_for(conn, _points_named(batches))
        owed = None
        if self._latest_task:
            # Taken under the writer, strictly increasing: a flush discharges what its
            # gateways owe up to the stamp of the newest write it took, never a later write's
            # in the same millisecond (`postgres_latest`).
            self._owed_ms = max(now, self._owed_ms + 1)
            owed = (self._token, self._owed_ms)
        results, changes, latest = await write_batches(
            conn, batches, now, self._point_ids, self.alarm_policy, self.time_policy,
            defer_latest=owed)
        return results, changes, latest, self._owed_ms

    async def settle_latest(self) -> None:
        """Write the latest values this worker holds (`postgres_latest`) on the connection
        of the flush (module doc); on failure they stay held for the next try."""
        if not self._pending:
            return
        link = self._latest_link()
        taken = self._pending.take()
        try:
            prepared = postgres_latest.flush_of(taken)  # encoded before taking the connection
            await self._transaction_on(
                link, lambda c: postgres_latest.flush(c, prepared, self._token))
        except BaseException as exc:
            self._pending.put_back(taken)
            if (err := _storage_error(exc, "latest values not encoded")) is None:
                raise  # the transaction's own errors are storage errors already
            raise err from exc

    async def repair_latest(self) -> list[str]:
        """Move forward the latest values a dead worker owed (`postgres_latest`); returns the
        gateways repaired."""
        repaired = await self._transaction_on(self._latest_link(), postgres_latest.repair)
        _log_repaired(repaired)
        return repaired

    async def _write_latest_every_interval(self) -> None:
        """Write the held latest values every interval and repair a dead worker's every
        `REPAIR_EVERY_S`; a failing write is logged once per outage (the values stay held)."""
        repaired_at = time.monotonic()

        async def step() -> None:
            nonlocal repaired_at
            await self.settle_latest()
            if time.monotonic() - repaired_at >= postgres_latest.REPAIR_EVERY_S:
                await self.repair_latest()
                repaired_at = time.monotonic()

        await tasks.every(self.latest_interval_s, step, name="latest_values",
                          errors=StorageError)

    async def record_birth(self, gw: str, birth: Birth, *, now_ms: int | None = None) -> None:
        now = _now_ms() if now_ms is None else now_ms
        # One row per key (DO UPDATE may touch a row once per statement), the last one winning
        # as in SQLite; sorted like every other points statement.
        by_key: dict[tuple[str, str], tuple[str, str, str, int]] = {}
        for dev in birth.devices:
            for p in dev.points:
                d, name = split_key(p.key)
                by_key[(d or dev.id, name)] = (p.name_zh, p.unit, dev.profile, p.ordinal)
        keys = sorted(by_key)
        cols = ([gw] * len(keys), [k[0] for k in keys], [k[1] for k in keys],
                *([by_key[k][i] for k in keys] for i in range(4)))
        blob = json.dumps(to_jsonable(birth), ensure_ascii=False)

        async def body(conn: Conn) -> None:
            # Points before the gateway row: the order write_batches takes its locks in.
            if keys:
                await conn.execute(
                    "INSERT INTO points (gw, device, point, name_zh, unit, profile, ordinal)"
                    " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[],"
                    " %b::text[], %b::text[], %b::int4[]) ORDER BY 1, 2, 3"
                    " ON CONFLICT (gw, device, point) DO UPDATE SET"
                    " name_zh = excluded.name_zh, unit = excluded.unit,"
                    " profile = excluded.profile, ordinal = excluded.ordinal", cols)
            await conn.execute(
                "INSERT INTO gateways (gw, stream, boot_id, version, birth, last_seen_ms)"
                " VALUES (%s, %s, %s, %s, %s::jsonb, %s) ON CONFLICT (gw) DO UPDATE SET"
                " stream = excluded.stream, boot_id = excluded.boot_id,"
                " version = excluded.version, birth = excluded.birth,"
                " last_seen_ms = excluded.last_seen_ms",
                (gw, birth.stream, birth.boot_id, birth.version, blob, now))
            self._point_ids.pop(gw, None)  # reload ids, new points may exist

        await self._transaction(body)

    async def run(self, program: Callable[[], Program[T]], *, write: bool = True) -> T:
        if write:
            return await self._transaction(lambda c: run_async(c, program()))
        return await self._read(lambda c: run_async(c, program()))

    # -- reads ---------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        _, reader = self._links()
        for attempt in (1, 2):
            try:
                async with reader.use() as conn:
                    return await fn(conn)
            except psycopg.OperationalError as exc:
                # A read is safe to repeat: once, on a fresh connection, if the old one died
                # (a server restart or failover), so the API does not fail the first request.
                if attempt == 1 and reader.conn is None:
                    continue
                raise StorageError(f"read failed: {exc}") from exc
            except psycopg.Error as exc:
                raise StorageError(f"read failed: {exc}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    async def _rows(conn: Conn, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = await conn.execute(sql, args)
        return await cur.fetchall()
