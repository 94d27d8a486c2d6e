"""The outbox's disk budget (DESIGN.md §4.6): thin, then drop, telemetry; never alarms or events.

Size is what SQLite holds in pages, `(page_count - freelist_count) × page_size`; deleted rows
go to the freelist and new rows reuse it, so the file stops growing without a VACUUM. The
limit it is measured against is worked out per pass by `outbox_disk.DiskWatch.page_limit`:
`max_bytes` less the WAL and `-shm` files, or less if the file system's free space is down to
its reserve. When the size passes `high` × that limit (90 %), the WAL is checkpointed and
truncated, and if that is not enough a reclaim pass runs until it is under `low` (80 %):

1. rows already delivered go, whatever `keep_delivered_s` says (done by the outbox);
2. **thinning**: the oldest undelivered backlog telemetry is read in windows of
   `window_rows` rows (seq order, from a cursor); per point within a window only every
   `keep_every`-th sample plus the window's minimum and maximum value are kept. When the cursor
   reaches the live horizon, a new round starts over from the oldest (which thins the oldest
   data again: resolution falls with age). After `max_rounds` rounds
3. **dropping**: the oldest backlog telemetry goes, a window at a time.

Never touched: alarm and event records, telemetry inside the live window, and the newest
record of each point (the `latest` table: central must learn the current state). Each pass
is one transaction together with the EVENT records that report it upstream
(`outbox_thinned` / `outbox_dropped`, with the number of records, the first and last seq
removed and the points affected), and with persistent counters; so a thinning is never
without its report. The cursor and round survive restarts (meta `thin_state`) and reset
once the backlog has drained.

Every function here runs on the outbox's executor thread, inside a transaction it owns.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

import structlog

from edge_agent.outbox.db import TELEMETRY_LANE, add_counter, used_bytes
from protocols.outbox_events import LossReport, OutboxEvent

log = structlog.get_logger(__name__)

_NOT_LATEST = "seq NOT IN (SELECT seq FROM latest)"


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    max_bytes: int | None  # None: no cap of its own; the disk reserve and ENOSPC still reclaim
    high: float = 0.9
    low: float = 0.8
    keep_every: int = 4
    max_rounds: int = 2
    window_rows: int = 5000
    rows_per_pass: int = 50_000  # bounds one pass (one transaction) outside an emergency

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high <= 1:
            raise ValueError("budget thresholds need 0 < low < high <= 1")
        if self.keep_every < 2 or self.max_rounds < 0 or self.window_rows < 1:
            raise ValueError("keep_every >= 2, max_rounds >= 0, window_rows >= 1")


@dataclass(slots=True)
class Eviction:
    """What one pass removed of one kind ("thinned" or "dropped")."""

    kind: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    points: set[str] = field(default_factory=set)

    def add(self, seqs: list[int], points: set[str]) -> None:
        if not seqs:
            return
        self.records += len(seqs)
        lo, hi = min(seqs), max(seqs)
        self.first_seq = lo if self.first_seq is None else min(self.first_seq, lo)
        self.last_seq = hi if self.last_seq is None else max(self.last_seq, hi)
        self.points |= points

    @property
    def event(self) -> OutboxEvent:
        return OutboxEvent(f"outbox_{self.kind}")

    def report(self, keep_every: int | None = None) -> LossReport:
        """Its report upstream (`protocols.outbox_events`); only for a pass that removed
        records."""
        if self.first_seq is None or self.last_seq is None:
            raise ValueError("an eviction of no records has no report")  # a programming error
        return LossReport.naming(self.event, self.records, self.first_seq, self.last_seq,
                                 self.points, keep_every=keep_every)


class DiskBudget:
    """Decides when the outbox is too big and removes telemetry until it is not."""

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy
        self.round = 0
        self.cursor = 0  # thinning has passed every backlog seq up to here in this round

    # --- state ------------------------------------------------------------------------------

    def load(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'thin_state'").fetchone()
        if row:
            try:
                r, c = (int(x) for x in row[0].split())
                self.round, self.cursor = r, c
            except ValueError:
                self.round, self.cursor = 0, 0

    def save(self, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('thin_state', ?)",
                     (f"{self.round} {self.cursor}",))

    def reset_if_drained(self, conn: sqlite3.Connection, horizon: int) -> bool:
        """Start thinning afresh once no backlog telemetry is left; True if it reset."""
        if (self.round, self.cursor) == (0, 0):
            return False
        if conn.execute("SELECT 1 FROM records WHERE delivered = 0 AND lane = ? AND seq < ?"
                        " LIMIT 1", (TELEMETRY_LANE, horizon)).fetchone():
            return False
        self.round, self.cursor = 0, 0
        return True

    # --- measuring ---------------------------------------------------------------------------

    def over_high(self, conn: sqlite3.Connection, limit: int | None = None) -> bool:
        """More pages in use than `high` × `limit` (the page bytes allowed now, from
        `DiskWatch.page_limit`; None: the policy's `max_bytes`, if any)."""
        limit = self.policy.max_bytes if limit is None else limit
        if limit is None:
            return False
        return used_bytes(conn)[0] > self.policy.high * limit

    def enough(self, conn: sqlite3.Connection, need_bytes: int = 0,
               limit: int | None = None) -> bool:
        used, free = used_bytes(conn)
        limit = self.policy.max_bytes if limit is None else limit
        if limit is None:
            return free >= need_bytes
        return used + need_bytes <= self.policy.low * limit

    # --- one pass ----------------------------------------------------------------------------

    def reclaim(self, conn: sqlite3.Connection, *, horizon: int, limit: int | None = None,
                need_bytes: int = 0, urgent: bool = False) -> tuple[Eviction, Eviction]:
        """Thin or drop backlog telemetry (seq < `horizon`) until `enough` under `limit`; the
        caller holds the transaction and appends the report events. `urgent` (the disk is
        full): no row limit for this pass."""
        thinned, dropped = Eviction("thinned"), Eviction("dropped")
        examined = 0
        while (not self.enough(conn, need_bytes, limit)
               and (urgent or examined < self.policy.rows_per_pass)):
            if self.round < self.policy.max_rounds:
                n = self._thin_window(conn, horizon, thinned)
                if n == 0:
                    if self.cursor == 0:
                        break  # nothing older than the live window (yet): nothing to thin
                    self.round, self.cursor = self.round + 1, 0
                examined += n
            else:
                n = self._drop_window(conn, horizon, dropped)
                if n == 0:
                    break  # only alarms, events, live data and latest values are left
                examined += n
        add_counter(conn, "thinned_total", thinned.records)
        add_counter(conn, "dropped_total", dropped.records)
        self.save(conn)
        return thinned, dropped

    def _thin_window(self, conn: sqlite3.Connection, horizon: int, acc: Eviction) -> int:
        rows = conn.execute(
            "SELECT seq, point, value, value_is_bool FROM records WHERE delivered = 0"
            f" AND lane = ? AND seq > ? AND seq < ? AND {_NOT_LATEST} ORDER BY seq LIMIT ?",
            (TELEMETRY_LANE, self.cursor, horizon, self.policy.window_rows)).fetchall()
        if not rows:
            return 0
        by_point: dict[str | None, list[tuple[int, Any, int]]] = {}
        for seq, point, value, is_bool in rows:
            by_point.setdefault(point, []).append((seq, value, is_bool))
        k = self.policy.keep_every
        gone: list[int] = []
        points: set[str] = set()
        for point, samples in by_point.items():
            keep = set(range(0, len(samples), k))
            numeric = [(v, i) for i, (_, v, b) in enumerate(samples)
                       if not b and isinstance(v, (int, float))]
            if numeric:
                keep.add(min(numeric)[1])
                keep.add(max(numeric)[1])
            drop = [s for i, (s, _, _) in enumerate(samples) if i not in keep]
            if drop:
                gone.extend(drop)
                if point is not None:
                    points.add(point)
        conn.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in gone])
        acc.add(gone, points)
        self.cursor = rows[-1][0]
        return len(rows)

    def _drop_window(self, conn: sqlite3.Connection, horizon: int, acc: Eviction) -> int:
        rows = conn.execute(
            "SELECT seq, point FROM records WHERE delivered = 0"
            f" AND lane = ? AND seq < ? AND {_NOT_LATEST} ORDER BY seq LIMIT ?",
            (TELEMETRY_LANE, horizon, self.policy.window_rows)).fetchall()
        seqs = [s for s, _ in rows]
        conn.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in seqs])
        acc.add(seqs, {p for _, p in rows if p is not None})
        return len(seqs)


__all__ = ["BudgetPolicy", "DiskBudget", "Eviction"]
