"""Seqs reserved on disk ahead of use, so that a power cut never makes the outbox hand out a
seq twice (DESIGN.md §4.1: `(gw, stream, seq)` names a record for ever).

**The problem** (model/README.md, finding 1). Telemetry commits with `synchronous=NORMAL`, so
a power cut loses the transactions since the last WAL sync, and `sqlite_sequence` rolls back
with them: AUTOINCREMENT would hand the lost seqs out again after the reboot. Those seqs may
already be at central under the old records, so central drops the new records as duplicates,
or the old records' acks mark the new ones delivered: lost, and nothing says so.

**The fix.** The one-row table `seq_reserve` holds `reserved`, a seq at or above every seq
ever handed out, and the boot (`/proc/sys/kernel/random/boot_id`) that wrote it. A write
transaction that takes `sqlite_sequence` past `reserved` raises it by a block in the same
transaction and commits with `synchronous=FULL`, so the reservation is on disk before any seq
under it can leave the gateway (`Outbox._write` checks every write; `append` sees the crossing
coming and asks for FULL at once). Below the reservation appends stay NORMAL: one fsync per
block. The block starts at `MIN_BLOCK` seqs, doubles while a block lasts under `_GROW_S` and
halves when one lasts over `_SHRINK_S`, so a fast producer pays about one fsync every two
seconds and a slow one skips few seqs after a cut.

**At open**, `sqlite_sequence` below `reserved` means the last run did not stop cleanly.
- Same boot: only the process died. In WAL mode its commits are in the file (the kernel held
  the pages), so nothing was lost and nothing is skipped.
- Another boot: the machine went down with it, and the seqs `sqlite_sequence + 1 .. reserved`
  may have been handed out, sent, and lost. `sqlite_sequence` jumps to `reserved`, and an
  `outbox_dropped` EVENT (`reason: "power_cut"`, `first_seq`/`last_seq` the skipped range,
  `records` its size, counted in `dropped_total`) is appended in the same synced transaction.
  Central counts the seqs of that range it never received as reported lost and the ones it
  did receive as held (`central/storage/delivery.py`); the range is an upper bound, since
  some of its seqs were perhaps never handed out. (A crash followed by a clean reboot looks
  the same and is reported the same way: nothing tells the two apart. Without a kernel boot
  id every process counts as its own boot, `clock.current_boot_id`: every unclean stop skips.)

A clean stop shrinks the reservation to the last seq (`release`), so a clean restart, also
after a reboot, skips nothing. Seqs burned on a full disk (`outbox_ring.py`) move
`sqlite_sequence` in a FULL transaction like any other, and the reservation follows.

Why not start a new `stream` after an unclean stop instead: the rows that survived the cut
belong to the old stream, and some were perhaps already received by central without their
acks reaching the edge. Resent under a new name, central could not deduplicate them.

Every method runs on the outbox's executor thread, inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent import EdgeError
from protocols.outbox_events import LossReason, LossReport, OutboxEvent

MIN_BLOCK = 256
MAX_BLOCK = 65_536
_GROW_S = 2.0  # a block used up faster than this: the next one is twice as large
_SHRINK_S = 60.0  # ... slower than this: half as large
COUNTERS = ("power_cuts", "power_cut_seqs")


class SeqsUnreserved(EdgeError):
    """A write that was not synced would take `sqlite_sequence` past the reservation (the
    outbox rolls it back and writes it again with `synchronous=FULL`; it never escapes)."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """The seqs an open after a power cut skipped: perhaps handed out, certainly not here."""

    first_seq: int
    last_seq: int
    boot_id: str  # the boot that reserved them

    @property
    def records(self) -> int:
        return self.last_seq - self.first_seq + 1

    def report(self) -> LossReport:
        """Its loss report: an `outbox_dropped` EVENT with reason `power_cut`."""
        return LossReport(OutboxEvent.DROPPED, self.records, self.first_seq, self.last_seq,
                          reason=LossReason.POWER_CUT, reserved_by_boot=self.boot_id)


def create_table(conn: sqlite3.Connection) -> None:
    """Schema step (`outbox_db.py`, v4): the reservation starts at the seq in use."""
    conn.execute("CREATE TABLE seq_reserve (id INTEGER PRIMARY KEY CHECK (id = 1),"
                 " reserved INTEGER NOT NULL, boot_id TEXT NOT NULL)")
    conn.execute("INSERT INTO seq_reserve VALUES (1, ?, '')", (current_seq(conn),))
    conn.executemany("INSERT OR IGNORE INTO counters VALUES (?, 0)", [(n,) for n in COUNTERS])


def current_seq(conn: sqlite3.Connection) -> int:
    """`sqlite_sequence` of the records: the highest seq handed out or burned (0: none)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    return int(row[0]) if row else 0


class SeqReservation:
    """The outbox's side of `seq_reserve`; see the module doc."""

    def __init__(self, *, min_block: int = MIN_BLOCK, max_block: int = MAX_BLOCK,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.reserved = 0  # as committed (or as loaded, inside the open transaction)
        self.top = 0  # sqlite_sequence as last committed (or an over-estimate)
        self.block = min_block
        self._min, self._max = min_block, max_block
        self._monotonic = monotonic
        self._since: float | None = None  # when the current block was reserved
        self._pending: tuple[int, int] | None = None  # (top, reserved) of the open transaction
        self.boot_id = ""

    def needs_sync(self, count: int) -> bool:
        """Would `count` more seqs go past the reservation (the write must be FULL)?"""
        return self.top + count > self.reserved

    def recover(self, conn: sqlite3.Connection, boot_id: str) -> Skipped | None:
        """At open: load the reservation; after a power cut, jump `sqlite_sequence` past it
        and count the skipped seqs. The caller appends the report and commits with FULL."""
        self.boot_id = boot_id
        reserved, reserved_by = conn.execute(
            "SELECT reserved, boot_id FROM seq_reserve").fetchone()
        top = current_seq(conn)
        self.reserved, self.top = reserved, top
        if top >= reserved or reserved_by == boot_id:
            return None
        if conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'records'",
                        (reserved,)).rowcount == 0:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)",
                         (reserved,))
        skipped = Skipped(top + 1, reserved, reserved_by)
        conn.executemany("UPDATE counters SET value = value + ? WHERE name = ?", [
            (skipped.records, "dropped_total"), (skipped.records, "power_cut_seqs"),
            (1, "power_cuts")])
        self.top = reserved
        return skipped

    def cover(self, conn: sqlite3.Connection, *, synced: bool) -> None:
        """At the end of every write transaction: past the reservation, raise it (only a
        synced commit may; otherwise `SeqsUnreserved`)."""
        top = current_seq(conn)
        reserved = self._pending[1] if self._pending is not None else self.reserved
        if top <= reserved:
            self._pending = (top, reserved)
            return
        if not synced:
            raise SeqsUnreserved(f"seq {top} is past the reservation {reserved}")
        now = self._monotonic()
        if self._since is not None:
            if now - self._since < _GROW_S:
                self.block = min(self._max, self.block * 2)
            elif now - self._since > _SHRINK_S:
                self.block = max(self._min, self.block // 2)
        self._since = now
        reserved = top + self.block
        conn.execute("UPDATE seq_reserve SET reserved = ?, boot_id = ?", (reserved, self.boot_id))
        self._pending = (top, reserved)

    def release(self, conn: sqlite3.Connection) -> None:
        """A clean stop: reserve nothing beyond the last seq (commit with FULL)."""
        top = current_seq(conn)
        conn.execute("UPDATE seq_reserve SET reserved = ?, boot_id = ?", (top, self.boot_id))
        self._pending = (top, top)

    def committed(self) -> None:
        if self._pending is not None:
            self.top, self.reserved = self._pending
            self._pending = None

    def aborted(self) -> None:
        self._pending = None


__all__ = ["COUNTERS", "MAX_BLOCK", "MIN_BLOCK", "SeqReservation", "SeqsUnreserved", "Skipped",
           "create_table", "current_seq"]
