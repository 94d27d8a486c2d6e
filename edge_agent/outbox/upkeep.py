"""The outbox's executor-thread upkeep: delivery marks, pruning, the disk budget, the WAL and
vacuum, and the full-disk degradation (holding, then writing what was held).

A mixin of `Outbox` (split from `outbox.py` to keep each file readable); every method runs on
the outbox's single SQLite thread and reaches the rest of the outbox through the attributes
and methods declared below. The public coroutines that call these live in `outbox.py`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from edge_agent.health.clock import ClockFix, ClockGuard, ClockState, Stamp
from edge_agent.outbox.budget import DiskBudget, Eviction
from edge_agent.outbox.db import (
    INSERT,
    MAX_SEQ,
    add_counter,
    apply_cap,
    correct_clock,
    is_full,
    rollback,
    used_bytes,
)
from edge_agent.outbox.disk import DiskUsage, DiskWatch
from edge_agent.outbox.lanes import LaneReader, last_seq
from edge_agent.outbox.ring import HoldRing
from edge_agent.outbox.seqs import SeqReservation, SeqsUnreserved
from protocols.envelope import merge_ranges
from protocols.outbox_events import OutboxReport
from runtime.sqlite import SqliteOwner

log = structlog.get_logger(__name__)

T = TypeVar("T")

_ACK_RATE_WINDOW_MS = 30_000
_HELD_RETRY_S = 1.0  # while the disk is full, try to write what is held at most this often
_ROOM_BYTES = 256 * 1024  # ... unless this much room has appeared since


@dataclass(frozen=True, slots=True)
class Refused:
    """An append the full disk refused: what was held in memory, dropped, or given up."""

    held: int
    dropped: int
    lost: int
    error: str


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What one budget pass removed (rows already delivered are not counted)."""

    thinned: int = 0
    dropped: int = 0
    event_seqs: tuple[int, ...] = ()


class OutboxUpkeep:
    """Executor-thread bodies of `Outbox` (see the module doc)."""

    _sqlite: SqliteOwner
    _budget: DiskBudget
    _disk: DiskWatch
    _ring: HoldRing
    _lanes: LaneReader
    _acks: deque[tuple[int, int]]
    _ring_tried: float
    _reclaiming: bool
    _reclaim_failing: bool
    clock: ClockGuard
    max_bytes: int | None
    keep_delivered_ms: int
    live_window_ms: int

    _seqs: SeqReservation
    _sync_full: bool | None

    if TYPE_CHECKING:
        def _event_row(self, ev: Eviction, stamp: Stamp) -> tuple[Any, ...]: ...

        def _report_row(self, report: OutboxReport, stamp: Stamp) -> tuple[Any, ...]: ...

    def _set_sync(self, full: bool) -> None:
        if self._sync_full is not full:  # a pragma per commit is cheap, but skip it when unchanged
            self._sqlite.conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
            self._sync_full = full

    def _write(self, full: bool, body: Callable[[sqlite3.Connection], T]) -> T:
        """`body(conn)` in one write transaction, synced if `full`. A transaction that takes
        `sqlite_sequence` past the seq reservation raises it and must be synced
        (`outbox_seqs.py`): the callers that can hand out seqs ask for FULL then; should one
        not, its transaction is rolled back and written again with FULL."""
        try:
            return self._write_once(full, body)
        except SeqsUnreserved:
            return self._write_once(True, body)

    def _write_once(self, full: bool, body: Callable[[sqlite3.Connection], T]) -> T:
        self._set_sync(full)

        def covered(conn: sqlite3.Connection) -> T:
            result = body(conn)
            self._seqs.cover(conn, synced=full)
            return result

        try:
            result = self._sqlite.transaction(covered)
        except BaseException:
            self._seqs.aborted()
            raise
        self._seqs.committed()
        return result

    def _open_state(self, conn: sqlite3.Connection) -> None:
        state_row = conn.execute("SELECT value FROM meta WHERE key = 'clock_state'").fetchone()
        self.clock.restore(ClockState.from_json(state_row[0] if state_row else None))
        now = self.clock.now()
        # Synced: a jump past the seqs a power cut may have taken must be on disk before any
        # seq above it is handed out (`outbox_seqs.py`).
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            skipped = self._seqs.recover(conn, self.clock.boot_id)
            self._lanes.next_seq = self._seqs.top + 1
            conn.execute("INSERT OR IGNORE INTO boots (boot_id, first_seq, first_wall_ms)"
                         " VALUES (?, ?, ?)", (self.clock.boot_id, self._lanes.next_seq,
                                               now.wall_ms))
            self._lanes.boot = conn.execute("SELECT id FROM boots WHERE boot_id = ?",
                                      (self.clock.boot_id,)).fetchone()[0]
            if skipped is not None:
                conn.execute(INSERT, self._report_row(skipped.report(), self.clock.stamp()))
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("live_window_s", str(self.live_window_ms / 1000)),
                ("max_bytes", str(self.max_bytes or ""))])
            self._seqs.cover(conn, synced=True)
            conn.execute("COMMIT")
        except BaseException:
            self._seqs.aborted()
            rollback(conn)
            raise
        self._seqs.committed()
        if skipped is not None:
            self._lanes.appended(now.mono_ms, skipped.last_seq + 1, 1)
            log.warning("outbox_power_cut_seqs_skipped", first_seq=skipped.first_seq,
                        last_seq=skipped.last_seq, records=skipped.records,
                        reserved_by_boot=skipped.boot_id, boot=self.clock.boot_id)
        self._budget.load(conn)

    def _clock_fix_sync(self, fix: ClockFix, clock_state: str) -> int:
        def body(conn: sqlite3.Connection) -> int:
            n = correct_clock(conn, fix.boot_id, fix.offset_ms, self.clock.max_step_ms)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('clock_state', ?)", (clock_state,))
            return n
        return self._write(True, body)

    def _set_meta_sync(self, key: str, value: str) -> None:
        self._write(False, lambda conn: conn.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))

    def _get_meta_sync(self, key: str) -> str | None:
        row = self._sqlite.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _room_sync(self) -> bool:
        """Worth trying to write now: the file system has room above the reserve, or pages
        were freed inside the file (acks, pruning)."""
        if used_bytes(self._sqlite.conn)[1] >= _ROOM_BYTES:
            return True
        return self._disk.usage().fs_free_bytes >= self._disk.reserve_bytes + _ROOM_BYTES

    def _limit(self) -> int | None:
        """Page bytes the budget allows now (executor thread; `outbox_disk.py`)."""
        return self._disk.page_limit(self.max_bytes)

    def _disk_status_sync(self) -> dict[str, Any]:
        usage: DiskUsage = self._disk.usage()
        return {**usage.to_jsonable(), **self._ring.status(), "max_bytes": self.max_bytes}

    def _hold_sync(self, rows: list[tuple[Any, ...]], stamp: Stamp, error: str) -> Refused:
        starting = not self._ring.active
        self._ring.start(stamp.wall_ms, error)
        held, dropped, lost = self._ring.take(rows)
        if starting:
            self._ring_tried = time.monotonic()
            log.error("outbox_disk_full", error=error, **self._disk.usage().to_jsonable())
        if lost and self._ring.lost == lost:  # the first of this episode; status counts on
            log.error("outbox_held_given_up", records=lost, held=self._ring.held,
                      capacity=self._ring.capacity)
        return Refused(held, dropped, lost, error)

    def _flush_held_sync(self, stamp: Stamp, force: bool) -> bool:
        """Write the held records, burned seqs and reports in one transaction, and the
        pending delivery marks; True when nothing is held any more."""
        if not self._ring.active:
            return True
        now = time.monotonic()
        if not force and now - self._ring_tried < _HELD_RETRY_S and not self._room_sync():
            return False
        self._ring_tried = now
        try:
            if self._ring.marks:
                marks = self._ring.marks
                self._write(False, partial(self._mark_body, marks, stamp))
                self._ring.marks = ()
                self._ring.marks_retried += sum(b - a + 1 for a, b in marks)
            wall_ms = self.clock.now().wall_ms
            status = self._ring.status()
            flushed = self._write(True, lambda conn: self._ring.flush(
                conn, wall_ms, lambda report: self._report_row(report, stamp)))
        except (sqlite3.Error, OSError) as exc:
            if not is_full(exc):
                raise
            self._ring.last_error = str(exc)
            return False
        self._ring.done()
        last = last_seq(self._sqlite.conn)
        first = flushed.inserted[0][0] if flushed.inserted else flushed.event_seqs[0]
        self._lanes.appended(stamp.mono_ms, first, last - first + 1)
        log.warning("outbox_disk_writable", written=len(flushed.inserted),
                    burned=flushed.burned, since_ms=status["since_ms"],
                    telemetry_dropped=status["telemetry_dropped"], held_lost=status["held_lost"])
        return True

    def _mark_sync(self, ranges: list[tuple[int, int]], now: Stamp) -> int:
        if self._ring.marks:
            ranges = list(merge_ranges([*ranges, *self._ring.marks]))
        try:
            marked = self._write(False, partial(self._mark_body, ranges, now))
        except (sqlite3.Error, OSError) as exc:
            if not is_full(exc):
                raise
            # Kept and retried; meanwhile these records are not handed out again.
            self._ring.start(now.wall_ms, str(exc))
            self._ring.hold_marks(ranges)
            return 0
        if self._ring.marks:
            self._ring.marks_retried += sum(b - a + 1 for a, b in self._ring.marks)
            self._ring.marks = ()
        return marked

    def _mark_body(self, ranges: Sequence[tuple[int, int]], now: Stamp,
                   conn: sqlite3.Connection) -> int:
        if self.keep_delivered_ms:
            cur = conn.executemany(
                "UPDATE records SET delivered = ? WHERE seq BETWEEN ? AND ? AND delivered = 0",
                [(now.wall_ms, a, b) for a, b in ranges])
        else:
            # Nothing is kept once delivered: delete now (one change per row) rather than
            # mark now and prune later (two), which halves the drain's write load here.
            cur = conn.executemany("DELETE FROM records WHERE seq BETWEEN ? AND ?"
                                   " AND delivered = 0", ranges)
        marked = max(cur.rowcount, 0)
        add_counter(conn, "delivered_total", marked)
        meta = [("last_ack_ms", str(now.wall_ms))]
        if marked:
            meta.append(("ack_rate", self._ack_rate(now, marked)))
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
        return marked

    def _ack_rate(self, now: Stamp, marked: int) -> str:
        self._acks.append((now.mono_ms, marked))
        while self._acks and self._acks[0][0] < now.mono_ms - _ACK_RATE_WINDOW_MS:
            self._acks.popleft()
        span_s = max(1.0, (now.mono_ms - self._acks[0][0]) / 1000)
        rate = sum(n for _, n in self._acks) / span_s
        return json.dumps({"per_s": round(rate, 1), "at_ms": now.wall_ms})

    def _prune_sync(self, now: int, *, everything: bool = False, chunk: int = 5000) -> int:
        # Small transactions so that appends never wait long behind a big delete. With no
        # retention every delivered row goes, even if the wall clock has stepped back since.
        keep = self.keep_delivered_ms and not everything
        cutoff = now - self.keep_delivered_ms if keep else MAX_SEQ
        total = 0
        while True:
            n = self._write(False, lambda conn: conn.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE delivered != 0"
                " AND delivered <= ? LIMIT ?)", (cutoff, chunk)).rowcount)
            total += n
            if n < chunk:
                return total

    def _budget_sync(self, stamp: Stamp, force: bool, *, need_bytes: int = 0,
                     urgent: bool = False) -> Reclaimed:
        conn = self._sqlite.conn
        horizon = self._lanes.horizon(stamp.mono_ms)
        if self._budget.reset_if_drained(conn, horizon):
            self._write(False, self._budget.save)
        limit = self._limit()
        if not (force or urgent or self._reclaiming or self._budget.over_high(conn, limit)):
            return Reclaimed()
        if urgent or self._budget.over_high(conn, limit):
            # The WAL counts: fold it into the main file before evicting. PASSIVE never waits
            # for a reader (RESTART and TRUNCATE would, for the busy timeout, on every append),
            # and once it has copied every frame the next commit starts the WAL file over; its
            # size at rest is held to `journal_size_limit` (`DiskWatch.tune_wal`). The file is
            # not given back: another process would take that room and the next write need it.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            limit = self._limit()
        # Delivered rows are free to go first, whatever keep_delivered_s says.
        self._prune_sync(stamp.wall_ms, everything=True)

        def body(conn: sqlite3.Connection) -> tuple[Eviction, Eviction, list[int]]:
            thinned, dropped = self._budget.reclaim(
                conn, horizon=horizon, limit=limit, need_bytes=need_bytes, urgent=urgent)
            seqs = []
            for ev in (thinned, dropped):
                if ev.records:
                    conn.execute(INSERT, self._event_row(ev, stamp))
                    seqs.append(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
            add_counter(conn, "budget_events", len(seqs))
            add_counter(conn, "full_retries", int(urgent))
            return thinned, dropped, seqs

        thinned, dropped, seqs = self._write(True, body)
        if seqs:
            self._lanes.appended(stamp.mono_ms, seqs[0], len(seqs))
        self._reclaiming = not self._budget.enough(conn, limit=limit)
        for ev in (thinned, dropped):
            if ev.records:
                log.warning(ev.event, records=ev.records, first_seq=ev.first_seq,
                            last_seq=ev.last_seq, points=len(ev.points), urgent=urgent)
        return Reclaimed(thinned.records, dropped.records, tuple(seqs))

    def _vacuum_sync(self) -> None:
        """Give free pages back to the file system once the freelist is large and idle (after
        a drain), not while thinning keeps reusing it."""
        conn = self._sqlite.conn
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2 or self._reclaiming:
            return
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free > 256 and free > pages // 4:
            give = free - pages // 10
            self._write(False, lambda c: c.execute(
                f"PRAGMA incremental_vacuum({int(give)})").fetchall())
            # The file shrinks only when the WAL is checkpointed; a busy reader just defers it.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            apply_cap(conn, self.max_bytes)
            log.info("outbox_vacuumed", pages=give)


__all__ = ["OutboxUpkeep", "Reclaimed", "Refused"]
