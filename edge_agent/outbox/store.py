"""The edge outbox: every record is committed here before it may travel (DESIGN.md §4).

One SQLite file in WAL mode (new files get `auto_vacuum=INCREMENTAL`). The file gets a random
`stream` id when it is created, and each record a `seq` from `INTEGER PRIMARY KEY
AUTOINCREMENT`, so `(gw, stream, seq)` names a record for ever: AUTOINCREMENT never hands out
a seq again, not even after the row is pruned, thinned or dropped, and the seq reservation
(`outbox_seqs.py`) keeps it so across a power cut.

Threading: one thread owns the connection (a single-worker executor); every public method is
a coroutine that awaits it, so the event loop never blocks on the disk.

**Durability.** A record is accepted when the transaction of its `append` commits; `append`
returns only after that. A commit that holds an alarm, event or command result runs with
`synchronous=FULL`: the WAL is fsynced before COMMIT returns, so once `append` has returned
the record survives a power cut. Telemetry-only commits (and delivery marks) run with
`synchronous=NORMAL`, i.e. group commit: WAL mode never corrupts the file and a killed
*process* loses nothing, but a *power cut* loses the telemetry committed since the last WAL
sync, which happens at each FULL commit and each checkpoint (every ~1000 pages, a few MB;
typically a few seconds of readings, at most the readings since the last alarm/event or
checkpoint). A lost delivery mark means the record is sent again; central deduplicates.
The seqs such a cut takes are never handed out again: seqs are reserved on disk a block
ahead (one synced commit per block), and the first start in a new boot after an unclean
stop skips the rest of the block and reports it (`outbox_seqs.py`).

**Lanes** (§4.2), see `outbox_lanes.py`: after an outage `next_batch` serves the newest
value of each point first, then alarms, events, live telemetry, and backlog telemetry
(appended longer than `live_window_s` ago) oldest first, flagged HISTORICAL; the uplink asks
for backlog separately (`next_backlog`) and paces it.

**Disk budget** (§4.6): see `outbox_budget.py`. It counts the main file, the WAL and the
`-shm` file, and keeps `disk_reserve_bytes` free on the file system (`outbox_disk.py`), so a
filling disk is met by checkpointing the WAL and thinning/dropping telemetry (reported) long
before SQLite sees ENOSPC. A full disk or cap (ENOSPC, SQLITE_FULL) during `append` still
thins/drops backlog telemetry and retries once; when that frees nothing, the outbox degrades
as `outbox_ring.py` defines: alarm, event and command-result records are held in memory (in
order, bounded, counted when given up) and written as soon as the disk has room, telemetry is
dropped and counted (`OutboxDiskFullError` tells the caller), delivery marks are retried, and
the episode is reported upstream when it ends. Nothing of a refused transaction is committed.

**Clock** (§4.7): see `clock.py`. Every append is stamped with the wall clock, CLOCK_BOOTTIME
and the boot; records stamped while the wall clock is suspect get CLOCK_SUSPECT, and
`clock_ok()` corrects the undelivered ones of the same boot.

Records are delivered only on central's `down/ack` (`mark_delivered`); the column `delivered`
holds the wall-clock ms of that ack (0 = not yet). A background task (`maintenance_loop`,
supervised with restart back-off) prunes delivered rows older than `keep_delivered_s`
(default 0: as soon as it runs), enforces the budget, gives free pages back to the file
system, and applies clock confirmations. The newest telemetry
value per point is kept in the `latest` table, also after its record is pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import structlog

from edge_agent.health.clock import ClockGuard, Stamp
from edge_agent.outbox.budget import BudgetPolicy, DiskBudget, Eviction
from edge_agent.outbox.db import (
    INSERT,
    SCHEMA_VERSION,
    UPSERT_LATEST,
    OutboxCorruptError,
    OutboxDiskFullError,
    OutboxError,
    OutboxFullError,
    OutboxRecordError,
    OutboxVersionError,
    backlog_from_counters,
    connect,
    is_full,
    translate,
    used_bytes,
)
from edge_agent.outbox.disk import DiskWatch
from edge_agent.outbox.lanes import (
    SEND_ORDER,
    LaneReader,
    NewRecord,
    Part,
    alarms_after,
    events_after,
    lane_of,
    last_seq,
)
from edge_agent.outbox.maintenance import MAINTENANCE_TASK, OutboxMaintenance
from edge_agent.outbox.ring import HoldRing
from edge_agent.outbox.seqs import SeqReservation
from edge_agent.outbox.status import LaneStats, OutboxStats, read_status, request_clock_ok, stats
from edge_agent.outbox.upkeep import Reclaimed, Refused
from protocols.columnar import Columns, columns_of
from protocols.envelope import (
    Flag,
    Record,
    RecordKind,
    merge_ranges,
    ranges_from_seqs,
)
from protocols.outbox_events import LossReport, OutboxEvent, OutboxReport
from runtime.sqlite import SqliteOwner
from runtime.tasks import stop, supervise

log = structlog.get_logger(__name__)

T = TypeVar("T")


_DURABLE_KINDS = frozenset({RecordKind.ALARM, RecordKind.EVENT, RecordKind.CMD_RESULT})
_ROW_BYTES = 160  # a generous estimate of one record's pages (row + index entries)


class Outbox(OutboxMaintenance):
    """The durable queue of records waiting for central's acknowledgement.

    Example::

        async with Outbox.open(Path("/var/lib/fieldlink/outbox.db"), max_bytes=2**30) as ob:
            seqs = await ob.append([NewRecord(RecordKind.TELEMETRY, ts, "d1/gas", 12.5)])
    """

    def __init__(self, path: Path, *, live_window_s: float, keep_delivered_s: float,
                 prune_interval_s: float, max_bytes: int | None, budget: BudgetPolicy,
                 clock: ClockGuard, disk: DiskWatch, hold_records: int) -> None:
        # Use `Outbox.open()`; the constructor does no I/O.
        self.path = Path(path)
        self.stream = ""
        self.live_window_ms = int(live_window_s * 1000)
        self.keep_delivered_ms = int(keep_delivered_s * 1000)
        self.prune_interval_s = prune_interval_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._budget = DiskBudget(budget)
        self._disk = disk
        self._ring = HoldRing(hold_records)  # executor-thread state, like _lanes
        self._ring_tried = -math.inf  # monotonic time of the last attempt to write it
        self._reclaim_failing = False
        self._sqlite = SqliteOwner(thread_name="outbox", error=OutboxError,
                                   closed_message="outbox is closed", wrap=translate)
        self._sync_full: bool | None = None
        self._seqs = SeqReservation()  # executor-thread state, like _lanes
        self._listeners: list[Callable[[], None]] = []
        self._lanes = LaneReader(self.live_window_ms)  # executor-thread state from here on
        self._reclaiming = False
        self._acks: deque[tuple[int, int]] = deque()  # (mono_ms, records) for the ack rate
        self.maintenance_errors = 0  # OutboxErrors of the maintenance loop (the disk failing)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, *, live_window_s: float = 300.0,
                   keep_delivered_s: float = 0.0, prune_interval_s: float = 5.0,
                   max_bytes: int | None = None, thin_at: float = 0.9, thin_to: float = 0.8,
                   thin_keep_every: int = 4, thin_max_rounds: int = 2,
                   clock: ClockGuard | None = None, disk_reserve_bytes: int = 0,
                   ballast_bytes: int = 0, hold_records: int = 1000,
                   maintain: bool = True) -> AsyncIterator[Outbox]:
        """Open (creating if needed) the outbox file; maintains it in the background.

        `live_window_s`: telemetry older than this is backlog (sent after the live lanes,
        flagged HISTORICAL). `keep_delivered_s`: how long delivered rows stay before pruning.
        `max_bytes`: the disk budget; past `thin_at` × it telemetry is thinned (every
        `thin_keep_every`-th sample plus min/max, `thin_max_rounds` times), then dropped,
        until it is under `thin_to` × it. It is also a hard cap (SQLite `max_page_count`).
        `clock`: the wall-clock guard (tests inject fake clocks). `disk_reserve_bytes`: free
        space the budget keeps on the file system; `ballast_bytes`: the emergency file
        (`outbox_disk.py`); `hold_records`: alarm/event records held in memory on a full disk.
        `maintain=False`: no background task; the caller runs `maintenance_loop()` under its
        own supervisor (the agent does).
        """
        policy = BudgetPolicy(max_bytes, high=thin_at, low=thin_to, keep_every=thin_keep_every,
                              max_rounds=thin_max_rounds)
        ob = cls(path, live_window_s=live_window_s, keep_delivered_s=keep_delivered_s,
                 prune_interval_s=prune_interval_s, max_bytes=max_bytes, budget=policy,
                 clock=clock or ClockGuard(),
                 disk=DiskWatch(path, reserve_bytes=disk_reserve_bytes,
                                ballast_bytes=ballast_bytes),
                 hold_records=hold_records)
        async with ob._sqlite.running(ob._open_sync):
            maintainer = (asyncio.create_task(supervise(MAINTENANCE_TASK, ob.maintenance_loop),
                                              name=MAINTENANCE_TASK) if maintain else None)
            try:
                yield ob
            finally:
                await stop(maintainer)
                try:  # a stop must not lose what the full disk made us hold
                    await ob.flush_held(spend_ballast=True)
                except OutboxError as exc:
                    log.error("outbox_held_flush_failed", error=str(exc))
                try:  # a clean stop: the next start, also after a reboot, skips no seq
                    await ob._sqlite.call(ob._write, True, ob._seqs.release)
                except OutboxError as exc:
                    log.warning("outbox_seqs_release_failed", error=str(exc))
        # Closed: keep the room the -wal and -shm files gave back for the next start.
        await asyncio.to_thread(ob._disk.lay_ballast, partial=True)

    # --- public API --------------------------------------------------------------------

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        """Commit `records` in one transaction and return their seqs, in order.

        On a full disk (module doc): a call of alarm, event and command-result records only
        is held in memory and returns `[]` (they get seqs once written); a call with telemetry
        drops that and raises `OutboxDiskFullError` (its other records are held)."""
        if not records:
            return []
        stamp = self.clock.stamp()
        rows = [self._row(i, r, stamp) for i, r in enumerate(records)]
        durable = any(r.kind in _DURABLE_KINDS for r in records)
        first = await self._sqlite.call(self._append_sync, rows, durable, stamp,
                                 self.clock.state().to_json())
        if isinstance(first, Refused):
            # Durable records alone are held, not refused: they get seqs once written.
            if first.dropped:
                raise OutboxDiskFullError(
                    f"disk full: {first.dropped} telemetry record(s) dropped, {first.held}"
                    f" held in memory ({first.error})", held=first.held, dropped=first.dropped,
                    lost=first.lost)
            return []
        self._notify()
        return list(range(first, first + len(rows)))

    async def next_batch(self, limit: int, exclude: Collection[int] = (), *,
                         part: Part = "all",
                         skip: tuple[tuple[int, int], ...] | None = None) -> list[Record]:
        """Up to `limit` undelivered records in lane order (module doc), leaving out the seqs
        in `exclude` or in the sorted, disjoint ranges `skip` (those in flight).
        `part="priority"`: everything but backlog (backlog alone: `next_backlog`)."""
        if limit <= 0:
            return []
        # Snapshot on the loop thread: the caller's set may change while the thread reads.
        if skip is None:
            skip = ranges_from_seqs(exclude)
        elif exclude:
            skip = merge_ranges([*skip, *ranges_from_seqs(exclude)])
        skip = self._ring.skip(skip)  # acked, the marks not yet written: not again
        return await self._sqlite.call(lambda: self._lanes.read(self._sqlite.conn, limit, skip,
                                                         self.clock.now(), part))

    async def next_backlog(self, limit: int, *,
                           skip: tuple[tuple[int, int], ...] = ()) -> Columns:
        """Up to `limit` undelivered backlog telemetry records, oldest first, outside the
        ranges `skip`, as columns, without an object per record: what the uplink drains the
        backlog with (envelope v2 sends columns)."""
        if limit <= 0:
            return columns_of(())
        skip = self._ring.skip(skip)  # acked, the marks not yet written: not again
        return await self._sqlite.call(lambda: self._lanes.backlog(self._sqlite.conn, limit, skip,
                                                            self.clock.now()))

    async def undelivered_alarms(self, after_seq: int, limit: int) -> list[Record]:
        """Up to `limit` undelivered alarm records with seq above `after_seq`, oldest first:
        what the narrowband fallback has not yet sent past its own watermark."""
        if limit <= 0:
            return []
        return await self._sqlite.call(lambda: alarms_after(self._sqlite.conn, after_seq, limit))

    async def undelivered_events(self, after_seq: int, limit: int) -> list[Record]:
        """As `undelivered_alarms`, for the event lane (叫应 acknowledgements by radio)."""
        if limit <= 0:
            return []
        return await self._sqlite.call(lambda: events_after(self._sqlite.conn, after_seq, limit))

    async def last_seq(self) -> int:
        """The highest seq ever handed out (0 for a new outbox)."""
        return await self._sqlite.call(lambda: last_seq(self._sqlite.conn))

    async def mark_delivered(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Mark the seqs in inclusive `ranges` delivered; idempotent; returns rows newly marked.
        On a full disk the marks are kept in memory and retried (returns 0 meanwhile)."""
        clean = [(int(a), int(b)) for a, b in ranges if a <= b]
        return await self._sqlite.call(self._mark_sync, clean, self.clock.now())

    async def set_meta(self, key: str, value: str) -> None:
        await self._sqlite.call(self._set_meta_sync, key, value)

    async def get_meta(self, key: str) -> str | None:
        return await self._sqlite.call(self._get_meta_sync, key)

    async def stats(self) -> OutboxStats:
        return await self._sqlite.call(lambda: stats(self._sqlite.conn, self.path,
                                              live_window_ms=self.live_window_ms))

    async def backlog(self) -> int:
        """Undelivered records, from the counters in O(1) (`stats()` counts rows): every seq
        handed out is undelivered, delivered, thinned or dropped."""
        return await self._sqlite.call(lambda: backlog_from_counters(self._sqlite.conn))

    async def latest(self) -> dict[str, Record]:
        """The newest telemetry record per point (kept after its row is pruned)."""
        return await self._sqlite.call(self._latest_sync)

    async def prune(self) -> int:
        """Delete delivered rows older than `keep_delivered_s` now; returns rows deleted."""
        return await self._sqlite.call(self._prune_sync, self.clock.now().wall_ms)

    async def flush_held(self, *, spend_ballast: bool = False) -> bool:
        """Write what a full disk made the outbox hold, now; True when nothing is held any
        more. `spend_ballast`: if the disk is still full, give the ballast file back to the
        file system and try once more (the daemon does this when it stops)."""
        stamp = self.clock.stamp()
        done = await self._sqlite.call(self._flush_held_sync, stamp, True)
        if not done and spend_ballast and self._disk.release_ballast("held records at stop"):
            done = await self._sqlite.call(self._flush_held_sync, stamp, True)
        if not done:
            log.error("outbox_held_unwritten", **self._ring.status())
        else:
            self._notify()
        return done

    async def disk_status(self) -> dict[str, Any]:
        """The outbox on its file system, and any full-disk episode going on (for `status`)."""
        return await self._sqlite.call(self._disk_status_sync)

    async def used_bytes(self) -> int:
        """Bytes in pages that hold data (the file minus its freelist): what the budget counts."""
        return await self._sqlite.call(lambda: used_bytes(self._sqlite.conn)[0])

    async def reclaim(self, *, force: bool = False) -> Reclaimed:
        """Run the disk budget now (the maintenance task does this by itself); `force` runs a
        pass even below the high-water mark."""
        result = await self._sqlite.call(self._budget_sync, self.clock.stamp(), force)
        if result.event_seqs:
            self._notify()
        return result

    async def clock_ok(self, source: str = "manual", reference: Stamp | None = None) -> int:
        """A good time source is back: trust the wall clock again and correct the undelivered
        records of this boot by the monotonic offset; returns the records corrected."""
        fix = self.clock.clock_ok(source, reference)
        n = await self._sqlite.call(self._clock_fix_sync, fix, self.clock.state().to_json())
        log.info("clock_corrected", source=source, records=n, offset_ms=fix.offset_ms)
        return n

    def add_append_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn()` (on the event loop) after every committed append; returns a remover."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    # --- plumbing ----------------------------------------------------------------------

    def _notify(self) -> None:
        for notify in list(self._listeners):
            notify()

    def _row(self, i: int, r: NewRecord, stamp: Stamp) -> tuple[Any, ...]:
        value, flags = r.value, r.flags | stamp.flags
        if isinstance(value, float) and not math.isfinite(value):
            # The envelope refuses NaN/inf; keep the reading's place and say it is bad.
            value, flags = None, flags | Flag.BAD_QUALITY
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise OutboxRecordError(i, f"unsupported value type {type(value).__name__}")
        try:
            attrs = cbor2.dumps(dict(r.attrs)) if r.attrs else None
        except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
            raise OutboxRecordError(i, f"attrs not encodable: {exc}") from exc
        return (int(r.kind), int(lane_of(r.kind)), int(r.ts_ms), r.point, value,
                int(isinstance(value, bool)), int(flags), attrs, stamp.wall_ms, stamp.mono_ms,
                self._lanes.boot)

    def _report_row(self, report: OutboxReport, stamp: Stamp) -> tuple[Any, ...]:
        """The EVENT row of an outbox report; its value: the records it is about."""
        value = report.records if isinstance(report, LossReport) else report.telemetry_dropped
        return self._row(0, NewRecord(RecordKind.EVENT, stamp.wall_ms, None, value,
                                      attrs=report.to_attrs()), stamp)

    def _event_row(self, ev: Eviction, stamp: Stamp) -> tuple[Any, ...]:
        keep = self._budget.policy.keep_every if ev.event is OutboxEvent.THINNED else None
        return self._report_row(ev.report(keep), stamp)

    # --- executor-thread bodies: open, write -----------------------------------------------

    def _open_sync(self) -> sqlite3.Connection:
        try:
            conn = self._connect_sync()
        except (sqlite3.Error, OSError) as exc:
            # A full disk cannot even make the `-shm` file: spend the ballast to start.
            if not is_full(exc) or not self._disk.release_ballast("open on a full disk"):
                raise
            conn = self._connect_sync()
        self._sync_full = True  # `_open_state` committed with FULL
        self._disk.tune_wal(conn)
        log.info("outbox_opened", path=str(self.path), stream=self.stream,
                 max_bytes=self.max_bytes, boot=self._lanes.boot)
        self._disk.lay_ballast()
        return conn

    def _connect_sync(self) -> sqlite3.Connection:
        conn = connect(self.path, self.max_bytes)
        try:
            self.stream = conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()[0]
            self._open_state(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _append_sync(self, rows: list[tuple[Any, ...]], durable: bool, stamp: Stamp,
                     clock_state: str) -> int | Refused:
        if self._ring.active and not self._flush_held_sync(stamp, False):
            return self._hold_sync(rows, stamp, self._ring.last_error)  # keep the order
        body = partial(self._insert_body, rows, clock_state)
        # Past the seq reservation the commit is synced too (`outbox_seqs.py`).
        durable = durable or self._seqs.needs_sync(len(rows))
        try:
            first = self._write(durable, body)
        except (sqlite3.Error, OSError) as exc:
            if not is_full(exc):
                raise
            # A full disk or cap: make room from telemetry and try once more. The second
            # failure (nothing left to evict) degrades as outbox_ring.py defines.
            need = sum(_ROW_BYTES + len(r[7] or b"") + len(str(r[4])) for r in rows)
            log.warning("outbox_full", error=str(exc), records=len(rows), need_bytes=need)
            try:
                self._budget_sync(stamp, True, need_bytes=need, urgent=True)
                first = self._write(durable, body)
            except (sqlite3.Error, OSError) as again:
                if not is_full(again):
                    raise
                return self._hold_sync(rows, stamp, str(again))
        self._lanes.appended(stamp.mono_ms, first, len(rows))
        if self._reclaiming or self._budget.over_high(self._sqlite.conn, self._limit()):
            try:
                self._budget_sync(stamp, True)
            except (sqlite3.Error, OSError) as exc:  # the append itself has committed
                if not self._reclaim_failing:  # once per run of failures, not per append
                    log.warning("outbox_reclaim_failed", error=str(exc))
                self._reclaim_failing = True
            else:
                self._reclaim_failing = False
        return first

    def _insert_body(self, rows: list[tuple[Any, ...]], clock_state: str,
                     conn: sqlite3.Connection) -> int:
        conn.executemany(INSERT, rows)
        # One writer inside BEGIN IMMEDIATE: AUTOINCREMENT hands out consecutive seqs.
        last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        first = last - len(rows) + 1
        newest: dict[str, tuple[Any, ...]] = {}
        for i, (kind, _, ts, point, value, is_bool, flags, *_) in enumerate(rows):
            if kind == RecordKind.TELEMETRY and point is not None:
                prev = newest.get(point)
                if prev is None or ts >= prev[2] or flags & Flag.CLOCK_SUSPECT:
                    newest[point] = (point, first + i, ts, value, is_bool, flags)
        if newest:
            conn.executemany(UPSERT_LATEST, newest.values())
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('clock_state', ?)", (clock_state,))
        return first

    # --- executor-thread bodies: acks, pruning, budget, clock ------------------------------

    def _latest_sync(self) -> dict[str, Record]:
        rows = self._sqlite.conn.execute(
            "SELECT seq, ts_ms, point, value, value_is_bool, flags FROM latest ORDER BY point")
        return {p: Record(seq=s, kind=RecordKind.TELEMETRY, ts_ms=ts, point=p,
                          value=bool(v) if b else v, flags=Flag(f))
                for s, ts, p, v, b, f in rows}


__all__ = ["LaneStats", "NewRecord", "Outbox", "OutboxCorruptError", "OutboxDiskFullError",
           "OutboxError", "OutboxFullError", "OutboxRecordError", "OutboxStats",
           "OutboxVersionError", "Reclaimed", "SCHEMA_VERSION", "SEND_ORDER", "lane_of",
           "read_status", "request_clock_ok"]
