"""Central's storage interface (DESIGN.md §4.3, §9): the `Storage` base class every backend
implements, the value types it returns, and the refs the API uses (its errors:
`central.storage.errors`).

Refs are path-safe names used by the API: a device is `"{gw}:{device}"` and a point
`"{gw}:{device}:{point}"`. Data keys on the wire are `"device/point"`.

The backends (`central.storage.sqlite`, `central.storage.postgres`) import this module, never
the package: the package's `open_storage` imports them.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar

from central.alarms.lifecycle import AlarmPolicy
from central.storage.aggregates import (
    PURGE_SCAN_POINTS,
    Bucket,
    RetentionPolicy,
    buckets_program,
    flush_program,
    pending_top_program,
    point_id_program,
    points_top_program,
    purge_chunk_program,
    purge_points_program,
)
from central.storage.delivery import (
    DeliverySummary,
    GatewayDelivery,
    delivery_program,
    summary_program,
)
from central.storage.errors import (
    BadRefError,
    UnknownDeviceError,
    UnknownGatewayError,
    UnknownPointError,
)
from central.storage.program import Program, Sql
from central.storage.retire_schema import in_service
from central.storage.timecheck import TimePolicy
from protocols.envelope import Birth, DataBatch, State

T = TypeVar("T")
# A gateway's state or birth message, and whether it was heard live (not a retained state).
GatewayInfo = tuple[str, State | Birth, bool]

# --- values returned by a backend ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch did: `inserted` new records, the rest were already held."""

    gw: str
    stream: str
    received: int
    inserted: int
    clock_suspect: int = 0  # of the inserted, how many central judged implausible (§4.7)
    corrected: int = 0  # held suspect copies whose time this batch corrected
    merged: int = 0  # held narrowband copies this batch replaced with the full record (§5)

    @property
    def duplicates(self) -> int:
        return self.received - self.inserted


@dataclass(frozen=True, slots=True)
class Gateway:
    gw: str
    stream: str | None
    online: bool  # the flag of its last state message, not yet aged by `offline_after_s`
    boot_id: str | None
    version: str | None
    bearer: str | None
    backlog: int | None
    last_seen_ms: int | None  # when central last heard anything live from it
    state_ts_ms: int | None  # the gateway's own timestamp of its last state


@dataclass(frozen=True, slots=True)
class Latest:
    ts_ms: int
    value: float | None
    text: str | None


@dataclass(frozen=True, slots=True)
class Point:
    gw: str
    device: str
    point: str
    name_zh: str
    unit: str
    profile: str
    latest: Latest | None

    @property
    def ref(self) -> str:
        return point_ref(self.gw, self.device, self.point)

    @property
    def device_ref(self) -> str:
        return device_ref(self.gw, self.device)


@dataclass(frozen=True, slots=True)
class Device:
    gw: str
    device: str
    profile: str
    points: int

    @property
    def ref(self) -> str:
        return device_ref(self.gw, self.device)


@dataclass(frozen=True, slots=True)
class Sample:
    ts_ms: int
    value: float | None
    text: str | None
    flags: int


@dataclass(frozen=True, slots=True)
class RecordCounts:
    readings: int
    events: int


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """Rows deleted by one retention pass, per table."""

    deleted: dict[str, int]


# --- refs -------------------------------------------------------------------------------------


def device_ref(gw: str, device: str) -> str:
    return f"{gw}:{device}"


def point_ref(gw: str, device: str, point: str) -> str:
    return f"{gw}:{device}:{point}"


def parse_device_ref(ref: str) -> tuple[str, str]:
    gw, sep, device = ref.partition(":")
    if not sep or not gw or not device:
        raise BadRefError(ref, "gw:device")
    return gw, device


def parse_point_ref(ref: str) -> tuple[str, str, str]:
    gw, sep, rest = ref.partition(":")
    device, sep2, point = rest.partition(":")
    if not (sep and sep2 and gw and device and point):
        raise BadRefError(ref, "gw:device:point")
    return gw, device, point


def split_key(key: str) -> tuple[str, str]:
    """`"device/point"` → `("device", "point")`; a key without a device has device `""`."""
    device, sep, point = key.partition("/")
    return (device, point) if sep else ("", key)


# --- reads both backends run as portable programs --------------------------------------------

_GATEWAY_COLS = "gw, stream, online, boot_id, version, bearer, backlog, last_seen_ms, state_ts_ms"
_POINTS = ("SELECT p.gw, p.device, p.point, p.name_zh, p.unit, p.profile, l.ts_ms, l.value,"
           " l.text FROM points p LEFT JOIN latest l ON l.point_id = p.id")


def _gateway_row(row: Sequence[Any]) -> Gateway:
    return Gateway(gw=row[0], stream=row[1], online=bool(row[2]), boot_id=row[3], version=row[4],
                   bearer=row[5], backlog=row[6], last_seen_ms=row[7], state_ts_ms=row[8])


def _point_row(row: Sequence[Any]) -> Point:
    latest = None if row[6] is None else Latest(ts_ms=row[6], value=row[7], text=row[8])
    return Point(gw=row[0], device=row[1], point=row[2], name_zh=row[3], unit=row[4],
                 profile=row[5], latest=latest)


def gateways_program() -> Program[list[Gateway]]:
    rows = yield Sql(f"SELECT {_GATEWAY_COLS} FROM gateways WHERE {in_service()} ORDER BY gw")
    return [_gateway_row(r) for r in rows]


def gateway_program(gw: str) -> Program[Gateway]:
    rows = yield Sql(f"SELECT {_GATEWAY_COLS} FROM gateways WHERE gw = ?", (gw,))
    if not rows:
        raise UnknownGatewayError(gw)
    return _gateway_row(rows[0])


def devices_program(gw: str) -> Program[list[Device]]:
    yield from gateway_program(gw)
    rows = yield Sql("SELECT device, max(profile), count(*) FROM points WHERE gw = ?"
                     " GROUP BY device ORDER BY device", (gw,))
    return [Device(gw=gw, device=d, profile=prof, points=n) for d, prof, n in rows]


def device_points_program(device_ref: str, gw: str, device: str) -> Program[list[Point]]:
    rows = yield Sql(_POINTS + " WHERE p.gw = ? AND p.device = ? ORDER BY p.point", (gw, device))
    if not rows:
        raise UnknownDeviceError(device_ref)
    return [_point_row(r) for r in rows]


def latest_values_program(gw: str) -> Program[list[Point]]:
    yield from gateway_program(gw)
    rows = yield Sql(_POINTS + " WHERE p.gw = ? ORDER BY p.device, p.point", (gw,))
    return [_point_row(r) for r in rows]


def series_program(point_ref: str, key: tuple[str, str, str], from_ms: int, to_ms: int,
                   limit: int) -> Program[list[Sample]]:
    pid = yield from point_id_program(*key)
    if pid is None:
        raise UnknownPointError(point_ref)
    rows = yield Sql("SELECT ts_ms, value, text, flags FROM readings WHERE point_id = ?"
                     " AND ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms LIMIT ?",
                     (pid, from_ms, to_ms, limit))
    return [Sample(ts_ms=t, value=v, text=x, flags=f) for t, v, x, f in rows]


def count_records_program(gw: str | None) -> Program[RecordCounts]:
    where, args = ("WHERE gw = ?", (gw,)) if gw is not None else ("", ())
    ((r,),) = yield Sql(f"SELECT count(*) FROM readings {where}", args)
    ((e,),) = yield Sql(f"SELECT count(*) FROM events {where}", args)
    return RecordCounts(readings=r, events=e)


def record_state_program(gw: str, state: State, seen_ms: int | None) -> Program[None]:
    """Upsert the gateway's row from its state message; `seen_ms` None keeps its last contact."""
    yield Sql("INSERT INTO gateways (gw, stream, online, boot_id, version, bearer, backlog,"
              " state_ts_ms, last_seen_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
              " ON CONFLICT (gw) DO UPDATE SET"
              " stream = coalesce(excluded.stream, gateways.stream),"
              " online = excluded.online, boot_id = excluded.boot_id,"
              " version = excluded.version, bearer = excluded.bearer,"
              " backlog = excluded.backlog, state_ts_ms = excluded.state_ts_ms,"
              " last_seen_ms = coalesce(excluded.last_seen_ms, gateways.last_seen_ms)",
              (gw, state.stream or None, state.online, state.boot_id, state.version,
               state.bearer, state.backlog, state.ts_ms, seen_ms))


# --- the interface ----------------------------------------------------------------------------


class OpenClose(abc.ABC):
    """A store used as an async context manager: `open()` on entry, `close()` on exit."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class Storage(OpenClose):
    """What central needs from a database. Implementations: `sqlite.SqliteStorage`,
    `postgres.PostgresStorage`."""

    # Flapping and incident windows applied while batches are written (`central.alarms.engine`),
    # and plausible record times (central.storage.timecheck): given at construction.
    alarm_policy: AlarmPolicy
    time_policy: TimePolicy
    # The aggregate flush (PostgreSQL: `pg_flush_program`, server-side).
    _flush_program: Callable[[int], Program[int]] = staticmethod(flush_program)
    # A read of aggregates first flushes what is pending, unless a flush ran this recently:
    # a dashboard polling every few seconds must not force a bucket write per sample.
    read_flush_age_s: float = 5.0
    _flushed_at: float = float("-inf")

    def __init__(self, *, alarm_policy: AlarmPolicy | None = None,
                 time_policy: TimePolicy | None = None) -> None:
        self.alarm_policy = alarm_policy if alarm_policy is not None else AlarmPolicy()
        self.time_policy = time_policy if time_policy is not None else TimePolicy()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and migrate the schema to the current version."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the database answers."""

    @abc.abstractmethod
    async def write_batches(self, batches: Sequence[DataBatch], *,
                            now_ms: int | None = None) -> list[WriteResult]:
        """Write all `batches` in ONE transaction, deduplicated on (gw, stream, seq); a held
        narrowband copy of an event is replaced by its full record (`writes.merge_program`).

        Returns one `WriteResult` per batch, in order, once the transaction is durable.
        Raises `DatabaseWriteError` after a rollback.
        """

    async def record_state(self, gw: str, state: State, *, seen: bool = True,
                           now_ms: int | None = None) -> None:
        """Store a gateway's state; `seen=False` for a retained (old) state message."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        await self.run(lambda: record_state_program(gw, state, now if seen else None))

    @abc.abstractmethod
    async def record_birth(self, gw: str, birth: Birth, *, now_ms: int | None = None) -> None:
        """Store a gateway's inventory and enrich its points (name_zh, unit, profile)."""

    async def record_gateway_infos(self, infos: Sequence[GatewayInfo], *,
                                   now_ms: int | None = None) -> None:
        """Store states and births `(gw, message, seen)` in order, as `record_state` and
        `record_birth` do. A backend may write them in one transaction (SQLite: a fleet
        connecting at once is thousands of them, each a commit otherwise); this default
        writes them one by one. Each write is an upsert, so a caller may redo them all."""
        for gw, msg, seen in infos:
            if isinstance(msg, Birth):
                await self.record_birth(gw, msg, now_ms=now_ms)
            else:
                await self.record_state(gw, msg, seen=seen, now_ms=now_ms)

    async def list_gateways(self) -> list[Gateway]:
        return await self.run(gateways_program, write=False)

    async def get_gateway(self, gw: str) -> Gateway:
        """Raises `UnknownGatewayError`."""
        return await self.run(lambda: gateway_program(gw), write=False)

    async def list_devices(self, gw: str) -> list[Device]:
        """Raises `UnknownGatewayError`."""
        return await self.run(lambda: devices_program(gw), write=False)

    async def settle_latest(self) -> None:
        """Write the latest values this process holds back (PostgreSQL's
        `central.storage.postgres_latest`); a read of latest values calls it first. SQLite
        writes them with their readings."""

    async def device_points(self, device_ref: str) -> list[Point]:
        """Points of a device with their latest values; raises `UnknownDeviceError`."""
        gw, device = parse_device_ref(device_ref)
        await self.settle_latest()
        return await self.run(lambda: device_points_program(device_ref, gw, device), write=False)

    async def latest_values(self, gw: str) -> list[Point]:
        """Every point of a gateway with its latest value; raises `UnknownGatewayError`."""
        await self.settle_latest()
        return await self.run(lambda: latest_values_program(gw), write=False)

    async def series(self, point_ref: str, from_ms: int, to_ms: int, limit: int) -> list[Sample]:
        """Readings of a point with from_ms <= ts < to_ms, oldest first, at most `limit`."""
        key = parse_point_ref(point_ref)
        return await self.run(lambda: series_program(point_ref, key, from_ms, to_ms, limit),
                              write=False)

    async def count_records(self, gw: str | None = None) -> RecordCounts:
        return await self.run(lambda: count_records_program(gw), write=False)

    @abc.abstractmethod
    async def run(self, program: Callable[[], Program[T]], *, write: bool = True) -> T:
        """Run a portable SQL program (`central.storage.program`): in one write transaction
        (`write=True`; rolled back if it raises), or as reads outside one. `program` is a
        factory, since a read may be retried on a fresh connection. Driver errors become
        `DatabaseWriteError` / `StorageError`; the program's own errors pass through."""

    async def record_heartbeat(self, gw: str, *, bearer: str, backlog: int, ts_ms: int,
                               now_ms: int | None = None) -> None:
        """A gateway heard on another bearer than MQTT (a narrowband heartbeat, DESIGN.md §5):
        it is seen now and, unless a newer state came meanwhile, online on `bearer` with this
        backlog. Raises `UnknownGatewayError` for a gateway that never sent a birth or state."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        found = await self.run(lambda: _heartbeat_program(gw, bearer, backlog, ts_ms, now))
        if not found:
            raise UnknownGatewayError(gw)

    # -- delivery, aggregates and retention: portable programs, the same on every backend ----

    async def delivery(self, gw: str) -> GatewayDelivery:
        """Per stream of `gw`: held, missing, gaps, reported lost (`central.storage.delivery`);
        raises `UnknownGatewayError`."""
        out = await self.run(lambda: delivery_program(gw), write=False)
        if out is None:
            raise UnknownGatewayError(gw)
        return out

    async def delivery_summary(self, gw: str | None = None) -> dict[str, DeliverySummary]:
        """Held / missing / reported lost per gateway, summed over its streams."""
        return await self.run(lambda: summary_program(gw), write=False)

    async def buckets(self, point_ref: str, resolution: str, from_ms: int, to_ms: int,
                      limit: int) -> list[Bucket]:
        """Aggregates (`"1m"` or `"1h"`) of a point whose bucket starts in
        [floor(from_ms), to_ms), oldest first; raises `UnknownPointError`. Complete up to
        `read_flush_age_s` before the call."""
        gw, device, point = parse_point_ref(point_ref)
        pid = await self.run(lambda: point_id_program(gw, device, point), write=False)
        if pid is None:
            raise UnknownPointError(point_ref)
        if time.monotonic() - self._flushed_at > self.read_flush_age_s:
            await self.flush_point(pid)
        return await self.run(lambda: buckets_program(pid, resolution, from_ms, to_ms, limit),
                              write=False)

    async def flush_point(self, pid: int) -> None:
        """Fold what a read of point `pid`'s buckets needs: here every pending sample
        (PostgreSQL folds on the server); SQLite folds only the point's block."""
        await self.flush_aggregates()

    async def flush_aggregates(self, *, spread_s: float = 0.0) -> int:
        """Fold every sample set pending now into the aggregate tables (one transaction per
        `flush_program` call); returns the number of samples folded. With `spread_s` the
        transactions are paced over about that many seconds, in step with the samples they
        fold: a whole interval's samples folded at once held the one database thread (and
        the GIL) for seconds, which every gateway saw as ack lag."""
        started = time.monotonic()
        total = await self._fold(self._flush_program, spread_s)
        # What was pending when it began: a spread flush ends long after.
        self._flushed_at = max(self._flushed_at, started)
        return total

    async def _fold(self, program: Callable[[int], Program[int]], spread_s: float = 0.0) -> int:
        """Run `program(upto)` until it folds nothing, `upto` the newest row pending now,
        paced over `spread_s` (`flush_aggregates`); returns the samples folded."""
        started = time.monotonic()
        top, pending = await self.run(pending_top_program, write=False)
        total = 0
        while top and (n := await self.run(partial(program, top))):
            total += n
            if spread_s > 0 and total < pending:
                await asyncio.sleep(started + spread_s * total / pending - time.monotonic())
        return total

    async def purge(self, policy: RetentionPolicy, now_ms: int, *,
                    spread_s: float = 0.0) -> PurgeResult:
        """Delete raw readings and aggregates older than `policy` keeps them, point by point
        (only the points that hold such rows: `purge_points_program`), at most
        `policy.chunk_rows` rows per transaction; first the pending samples are folded (over
        `spread_s`, as `flush_aggregates`), so that the buckets they make are purged too."""
        deleted: dict[str, int] = {}
        cutoffs = policy.cutoffs(now_ms)
        if not cutoffs:
            return PurgeResult(deleted)
        await self.flush_aggregates(spread_s=spread_s)
        top = await self.run(points_top_program, write=False)
        for table, col, before in cutoffs:
            total = await self._purge_point(table, col, None, before, policy.chunk_rows)
            for after in range(0, top, PURGE_SCAN_POINTS):
                for pid in await self.run(partial(purge_points_program, table, col, before,
                                                  after), write=False):
                    total += await self._purge_point(table, col, pid, before, policy.chunk_rows)
            deleted[table] = total
        return PurgeResult(deleted)

    async def _purge_point(self, table: str, col: str, pid: int | None, before: int,
                           chunk: int) -> int:
        total = 0
        while True:
            n = await self.run(partial(purge_chunk_program, table, col, pid, before, chunk))
            total += n
            if n < chunk:
                return total


def _heartbeat_program(gw: str, bearer: str, backlog: int, ts_ms: int,
                       now: int) -> Program[bool]:
    # A heartbeat that overtook nothing: an older one (narrowband is slow) must not hide the
    # state message that came after it.
    newer = "coalesce(state_ts_ms, 0) <= ?"
    rows = yield Sql(f"UPDATE gateways SET last_seen_ms = ?,"
                     f" online = CASE WHEN {newer} THEN ? ELSE online END,"
                     f" bearer = CASE WHEN {newer} THEN ? ELSE bearer END,"
                     f" backlog = CASE WHEN {newer} THEN ? ELSE backlog END,"
                     f" state_ts_ms = CASE WHEN {newer} THEN ? ELSE state_ts_ms END"
                     " WHERE gw = ? RETURNING gw",
                     (now, ts_ms, True, ts_ms, bearer, ts_ms, backlog, ts_ms, ts_ms, gw))
    return bool(rows)
