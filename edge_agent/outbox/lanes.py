"""Reading the outbox in lane order (DESIGN.md §4.2); runs on the outbox's executor thread.

All telemetry is stored in the live lane; *backlog* is the part appended longer than the
live window ago. `LaneReader` keeps, from the boot-time clock, the first seq appended inside
the window (the *horizon*) and serves, highest first:

    snapshot   the newest undelivered record of each point, only while there is backlog
    alarm      oldest first
    event      events and command results, oldest first
    live       telemetry at or above the horizon, oldest first
    backlog    telemetry below the horizon, oldest first; the uplink reads it apart, paced
               (`LaneReader.backlog`)

Telemetry older than the window when read (by the boot-time clock within one boot, by the
wall clock across boots) is flagged HISTORICAL.

The backlog is most of what a drain after an outage reads, so `LaneReader.backlog` reads it
as columns (`protocols.columnar.Columns`, what envelope v2 sends): SQLite computes the
HISTORICAL flag, and each column comes out of the fetched rows at C speed, with no object per
record. The lanes read for the priority part are small and come as `Record`s.
"""

from __future__ import annotations

import bisect
import sqlite3
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

import cbor2

from edge_agent.health.clock import Stamp
from edge_agent.outbox.db import MAX_SEQ, ROW, SELECT_LANE, TELEMETRY_LANE
from protocols.columnar import Columns, columns_from, columns_of, record_columns
from protocols.envelope import Flag, Lane, Record, RecordKind, Value, merge_ranges

Part = Literal["all", "priority"]
Ranges = tuple[tuple[int, int], ...]
_SNAPSHOT = (f"SELECT {', '.join('r.' + c.strip() for c in ROW.split(','))}"
             " FROM latest l JOIN records r ON r.seq = l.seq WHERE r.delivered = 0 ORDER BY r.seq")


@dataclass(frozen=True, slots=True)
class NewRecord:
    """What producers hand in; the outbox assigns `seq`."""

    kind: RecordKind
    ts_ms: int
    point: str | None
    value: Value
    flags: Flag = Flag.NONE
    attrs: Mapping[str, Any] | None = None


def lane_of(kind: RecordKind) -> Lane:
    """The lane a record is stored in; backlog is a view of the live lane by age."""
    if kind is RecordKind.ALARM:
        return Lane.ALARM
    if kind is RecordKind.TELEMETRY:
        return Lane.LIVE
    return Lane.EVENT  # events and command results


# Stored lanes in send order; Lane.BACKLOG is the old part of Lane.LIVE (see module doc).
SEND_ORDER: tuple[Lane, ...] = (Lane.ALARM, Lane.EVENT, Lane.LIVE)


_KINDS = {int(k): k for k in RecordKind}
_ALL_FLAGS = int(Flag.HISTORICAL | Flag.CLOCK_SUSPECT | Flag.BAD_QUALITY)
_FLAGS = {f: Flag(f) for f in range(_ALL_FLAGS + 1)}
_HISTORICAL = int(Flag.HISTORICAL)
_TELEMETRY = int(RecordKind.TELEMETRY)
# The backlog's columns; the flags as `LaneReader.is_old` would set them (bound: this boot,
# now by the boot-time and by the wall clock, the live window), then the walk's four.
_BACKLOG = ("SELECT seq, ts_ms, point, value, value_is_bool, flags | CASE WHEN"
            " (CASE WHEN boot = ? AND mono_ms IS NOT NULL THEN ? - mono_ms ELSE ? - created_ms END)"
            f" > ? THEN {_HISTORICAL} ELSE 0 END, attrs FROM records"
            " WHERE delivered = 0 AND lane = ? AND seq > ? AND seq < ? ORDER BY seq LIMIT ?")


def to_record(row: tuple[Any, ...], flags: int) -> Record:
    # Called once per record sent: table look-ups instead of enum constructors.
    seq, kind, ts_ms, point, value, is_bool, _, attrs = row[:8]
    rkind, flag = _KINDS.get(kind), _FLAGS.get(flags)
    return Record(seq, RecordKind(kind) if rkind is None else rkind, ts_ms, point,
                  bool(value) if is_bool else value, Flag(flags) if flag is None else flag,
                  cbor2.loads(attrs) if attrs else None)


class LaneReader:
    """The live horizon and the lane-ordered read; owned by one outbox, one thread."""

    def __init__(self, live_window_ms: int) -> None:
        self.live_window_ms = live_window_ms
        self.boot = 0  # boots.id of this boot
        self.next_seq = 1
        self._marks: deque[tuple[int, int]] = deque()  # (mono_ms, first seq) of appends

    def appended(self, mono_ms: int, first: int, count: int) -> None:
        # Coarse marks (1 % of the window) keep the deque short at any append rate.
        if not self._marks or mono_ms - self._marks[-1][0] >= self.live_window_ms / 100:
            self._marks.append((mono_ms, first))
        self.next_seq = max(self.next_seq, first + count)

    def horizon(self, now_mono: int) -> int:
        """First seq of the live window: telemetry below it is backlog. After a restart
        everything older counts as backlog until new appends arrive."""
        cutoff = now_mono - self.live_window_ms
        while self._marks and self._marks[0][0] < cutoff:
            self._marks.popleft()
        return self._marks[0][1] if self._marks else self.next_seq

    def is_old(self, row: tuple[Any, ...], now: Stamp) -> bool:
        created, mono, boot = row[8], row[9], row[10]
        if boot == self.boot and mono is not None:
            return now.mono_ms - mono > self.live_window_ms
        return now.wall_ms - created > self.live_window_ms

    def read(self, conn: sqlite3.Connection, limit: int, skip: Ranges, now: Stamp,
             part: Part) -> list[Record]:
        horizon = self.horizon(now.mono_ms)
        rows: list[tuple[Any, ...]] = []
        behind = conn.execute("SELECT 1 FROM records WHERE delivered = 0 AND lane = ?"
                              " AND seq < ? LIMIT 1", (TELEMETRY_LANE, horizon)).fetchone()
        if behind:
            starts = [a for a, _ in skip]
            for row in conn.execute(_SNAPSHOT):
                if len(rows) < limit and not _in_ranges(skip, starts, row[0]):
                    rows.append(row)
            if rows:
                skip = merge_ranges([*skip, *((r[0], r[0]) for r in rows)])
        for lane, lo, hi in ((Lane.ALARM, 0, MAX_SEQ), (Lane.EVENT, 0, MAX_SEQ),
                             (Lane.LIVE, horizon - 1, MAX_SEQ)):
            rows += walk(conn, lane, lo, hi, limit - len(rows), skip)
        if part == "all":
            rows += walk(conn, Lane.LIVE, 0, horizon, limit - len(rows), skip)
        is_old = self.is_old
        return [to_record(row, row[6] | _HISTORICAL if row[1] == _TELEMETRY and is_old(row, now)
                          else row[6]) for row in rows]

    def backlog(self, conn: sqlite3.Connection, limit: int, skip: Ranges, now: Stamp) -> Columns:
        """Backlog telemetry alone, oldest first, as columns (module doc): the uplink's paced
        read, apart from the priority part."""
        aged = (self.boot, now.mono_ms, now.wall_ms, self.live_window_ms)
        return backlog_columns(walk(conn, Lane.LIVE, 0, self.horizon(now.mono_ms), limit, skip,
                                    select=_BACKLOG, bind=aged))


def records_of(cols: Columns) -> list[Record]:
    """The records of outbox columns (`LaneReader.backlog`)."""
    return list(map(Record, *record_columns(cols, _KINDS, _FLAGS)))


def backlog_columns(rows: Sequence[tuple[Any, ...]]) -> Columns:
    """Rows of `_BACKLOG` (telemetry, by seq) as columns; a run of seqs becomes a range."""
    if not rows:
        return columns_of(())
    first, last = rows[0][0], rows[-1][0]
    seqs = (range(first, last + 1) if last - first + 1 == len(rows)
            else list(map(itemgetter(0), rows)))
    ts, points, values, is_bool, flags, attrs = (list(map(itemgetter(i), rows))
                                                 for i in range(1, 7))
    if any(is_bool):
        values = [bool(v) if b else v for v, b in zip(values, is_bool, strict=True)]
    return columns_from(seqs, None, ts, points, values, flags,
                        {i: cbor2.loads(a) for i, a in enumerate(attrs) if a} if any(attrs)
                        else {})


def walk(conn: sqlite3.Connection, lane: Lane, lo: int, hi: int, need: int, skip: Ranges, *,
         select: str = SELECT_LANE, bind: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Undelivered rows of `lane` with lo < seq < hi, oldest first, outside `skip`: walked in
    seq windows between excluded ranges, so that thousands of in-flight seqs cost a few
    index seeks instead of a huge NOT IN list. `select` takes `bind`, then lane, the two
    exclusive seq bounds and the row limit."""
    out: list[tuple[Any, ...]] = []
    cursor, i = lo, 0
    while need > 0 and cursor + 1 < hi:
        while i < len(skip) and skip[i][0] <= cursor + 1:
            cursor = max(cursor, skip[i][1])
            i += 1
        upper = min(skip[i][0] if i < len(skip) else MAX_SEQ, hi)
        if cursor + 1 < upper:
            rows = conn.execute(select, (*bind, int(lane), cursor, upper, need)).fetchall()
            out += rows
            need -= len(rows)
        if upper >= hi or i >= len(skip):
            break
        cursor = upper - 1
    return out


def alarms_after(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[Record]:
    """Undelivered alarm records with seq > `after_seq`, oldest first (the narrowband read)."""
    rows = conn.execute(SELECT_LANE, (int(Lane.ALARM), max(0, after_seq), MAX_SEQ, limit))
    return [to_record(row, row[6]) for row in rows]


def events_after(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[Record]:
    """Undelivered event-lane records (events, command results) with seq > `after_seq`,
    oldest first (the narrowband read of 叫应 acknowledgements)."""
    rows = conn.execute(SELECT_LANE, (int(Lane.EVENT), max(0, after_seq), MAX_SEQ, limit))
    return [to_record(row, row[6]) for row in rows]


def last_seq(conn: sqlite3.Connection) -> int:
    """The highest seq ever handed out; AUTOINCREMENT keeps it in `sqlite_sequence`."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    return row[0] if row else 0


def _in_ranges(ranges: Ranges, starts: list[int], seq: int) -> bool:
    i = bisect.bisect_right(starts, seq) - 1
    return i >= 0 and seq <= ranges[i][1]


__all__ = ["LaneReader", "Part", "alarms_after", "backlog_columns", "events_after", "last_seq",
           "records_of", "to_record", "walk"]
