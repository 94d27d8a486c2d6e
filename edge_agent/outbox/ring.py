"""What the outbox keeps in memory while the disk is full (ENOSPC / SQLITE_FULL even after
thinning and dropping telemetry, e.g. because another process filled the file system).

The degradation is defined, in this order of priority:

1. **Alarm, event and command-result records are held**, in the order they came, in a ring of
   `capacity` records. When it overflows the oldest held record is given up and counted
   (`lost`); the newest transitions are the ones that say what the state is now.
2. **Telemetry is dropped** and counted, per run between held records.
3. **Delivery marks** (central's acks) that cannot be written are kept here and retried; the
   records they name are not handed out again meanwhile, so they are neither lost nor resent
   endlessly (after a restart they may go once more; central deduplicates).

As soon as a write works again, `flush` writes everything in one transaction, in the original
order: each held record gets the next seq, and each run of dropped records *burns* as many
seqs as it had records (`sqlite_sequence` is advanced), so the loss shows at central as a gap
of exactly that size. The same transaction appends an `outbox_dropped` EVENT (the loss report
central already reads: `records`, `first_seq`, `last_seq`, `points`, plus `reason:
"disk_full"`) and an `outbox_disk_full` EVENT with the episode's counts. Nothing here is
written to disk before that, so a SIGKILL loses what is held (a clean stop spends the ballast
to write it, see `outbox_disk.py`).

Every method runs on the outbox's executor thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.outbox.db import INSERT, add_counter
from protocols.envelope import RecordKind, merge_ranges
from protocols.outbox_events import (
    DiskFullEpisode,
    LossReason,
    LossReport,
    OutboxEvent,
    OutboxReport,
)

_DURABLE = frozenset({int(RecordKind.ALARM), int(RecordKind.EVENT), int(RecordKind.CMD_RESULT)})


@dataclass(frozen=True, slots=True)
class Held:
    row: tuple[Any, ...]  # an outbox INSERT row, stamped when it was appended


@dataclass(slots=True)
class Gap:
    telemetry: int = 0  # telemetry records dropped here
    lost: int = 0  # held records given up here when the ring overflowed
    points: set[str] = field(default_factory=set)

    @property
    def records(self) -> int:
        return self.telemetry + self.lost


@dataclass(frozen=True, slots=True)
class Flushed:
    """What one successful flush wrote."""

    inserted: tuple[tuple[int, int], ...]  # (seq, mono_ms) of each record written, in order
    burned: int
    event_seqs: tuple[int, ...]


class HoldRing:
    """The in-memory side of a full disk; see the module doc."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the hold ring needs room for at least one record")
        self.capacity = capacity
        self._entries: list[Held | Gap] = []
        self.held = 0  # records in the ring now
        self.since_ms: int | None = None  # wall clock of the first refused write of the episode
        self.episode_held = 0  # records held during this episode (flushed or not)
        self.telemetry_dropped = 0
        self.lost = 0
        self.marks: tuple[tuple[int, int], ...] = ()  # delivery marks not yet written
        self.marks_retried = 0
        self.last_error = ""

    @property
    def active(self) -> bool:
        """A full-disk episode is going on: something waits to be written."""
        return self.since_ms is not None

    def start(self, wall_ms: int, error: str) -> None:
        if self.since_ms is None:
            self.since_ms = wall_ms
        self.last_error = error

    def take(self, rows: Sequence[tuple[Any, ...]]) -> tuple[int, int, int]:
        """Hold the durable rows, drop the telemetry; returns (held, dropped, given up)."""
        held = dropped = 0
        lost_before = self.lost
        for row in rows:
            if row[0] in _DURABLE:
                self._entries.append(Held(row))
                self.held += 1
                self.episode_held += 1
                held += 1
                if self.held > self.capacity:
                    self._give_up_oldest()
            else:
                gap = self._tail_gap()
                gap.telemetry += 1
                if row[3] is not None:
                    gap.points.add(row[3])
                self.telemetry_dropped += 1
                dropped += 1
        return held, dropped, self.lost - lost_before

    def hold_marks(self, ranges: Collection[tuple[int, int]]) -> None:
        self.marks = tuple(merge_ranges([*self.marks, *ranges]))

    def skip(self, skip: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        """`skip` plus the seqs whose delivery marks are pending (already acked)."""
        return tuple(merge_ranges([*skip, *self.marks])) if self.marks else skip

    def _tail_gap(self) -> Gap:
        if self._entries and isinstance(self._entries[-1], Gap):
            return self._entries[-1]
        gap = Gap()
        self._entries.append(gap)
        return gap

    def _give_up_oldest(self) -> None:
        i = next(i for i, e in enumerate(self._entries) if isinstance(e, Held))
        row = self._entries[i].row  # type: ignore[union-attr]
        gap = Gap(lost=1, points={row[3]} if row[3] is not None else set())
        # Merge with neighbouring gaps so that the ring stays at most 2 × capacity + 1 long.
        lo, hi = i, i + 1
        if lo > 0 and isinstance(self._entries[lo - 1], Gap):
            lo -= 1
            self._merge(gap, self._entries[lo])  # type: ignore[arg-type]
        if hi < len(self._entries) and isinstance(self._entries[hi], Gap):
            self._merge(gap, self._entries[hi])  # type: ignore[arg-type]
            hi += 1
        self._entries[lo:hi] = [gap]
        self.held -= 1
        self.lost += 1

    @staticmethod
    def _merge(into: Gap, other: Gap) -> None:
        into.telemetry += other.telemetry
        into.lost += other.lost
        into.points |= other.points

    # --- writing it out ----------------------------------------------------------------------

    def flush(self, conn: sqlite3.Connection, until_ms: int,
              event_row: Callable[[OutboxReport], tuple[Any, ...]]) -> Flushed:
        """Write the ring, the burned seqs and the reports (inside the caller's transaction).
        The ring is emptied only by `done()`, after the caller's COMMIT."""
        inserted: list[tuple[int, int]] = []
        burned = telemetry = lost = 0
        first_burned: int | None = None
        last_burned = 0
        points: set[str] = set()
        for entry in self._entries:
            if isinstance(entry, Held):
                conn.execute(INSERT, entry.row)
                seq = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                inserted.append((seq, entry.row[9]))
                continue
            start = _current_seq(conn) + 1
            _advance_seq(conn, entry.records)
            first_burned = start if first_burned is None else first_burned
            last_burned = start + entry.records - 1
            burned += entry.records
            telemetry += entry.telemetry
            lost += entry.lost
            points |= entry.points
        events: list[int] = []
        if burned and first_burned is not None:
            conn.execute(INSERT, event_row(LossReport.naming(
                OutboxEvent.DROPPED, burned, first_burned, last_burned, points,
                reason=LossReason.DISK_FULL, telemetry=telemetry, held_lost=lost)))
            events.append(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
            add_counter(conn, "dropped_total", burned)
            add_counter(conn, "budget_events", 1)
        conn.execute(INSERT, event_row(DiskFullEpisode(
            since_ms=self.since_ms, until_ms=until_ms, held=self.episode_held,
            telemetry_dropped=self.telemetry_dropped, held_lost=self.lost,
            marks_retried=self.marks_retried, error=self.last_error)))
        events.append(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        add_counter(conn, "disk_full_episodes", 1)
        add_counter(conn, "disk_full_telemetry_dropped", self.telemetry_dropped)
        add_counter(conn, "disk_full_held", self.episode_held)
        add_counter(conn, "disk_full_held_lost", self.lost)
        return Flushed(tuple(inserted), burned, tuple(events))

    def done(self) -> None:
        """The flush committed: the episode is over."""
        self._entries.clear()
        self.held = self.episode_held = self.telemetry_dropped = self.lost = 0
        self.marks_retried = 0
        self.since_ms = None
        self.last_error = ""

    def status(self) -> dict[str, Any]:
        return {"full": self.active, "since_ms": self.since_ms, "held": self.held,
                "capacity": self.capacity, "telemetry_dropped": self.telemetry_dropped,
                "held_lost": self.lost, "marks_pending": sum(b - a + 1 for a, b in self.marks),
                "error": self.last_error or None}


def _current_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    return int(row[0]) if row else 0


def _advance_seq(conn: sqlite3.Connection, n: int) -> None:
    """Burn `n` seqs: AUTOINCREMENT never hands them out, so central sees the gap."""
    if conn.execute("UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'records'",
                    (n,)).rowcount == 0:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)", (n,))


__all__ = ["Flushed", "HoldRing"]
