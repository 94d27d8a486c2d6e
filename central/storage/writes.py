"""Pieces of the batch write that both backends share (portable SQL programs).

A batch write must know which of its records it newly inserted: only those are aggregated,
and only a held copy whose time was suspect may be replaced by a corrected one
(`central.storage.timecheck`). SQLite asks before inserting (`held_flags_program`: in the
usual case one index range probe that finds nothing); PostgreSQL probes the runs of staged
seqs (`central.storage.postgres_write`). Both then run `replace_program` for the few
candidates.

A held seq is one the stream's held ranges hold (`central.storage.delivery`), not only one
with a row: retention purges rows older than raw retention but never their seqs' ranges. A
staged seq the ranges held before the write but whose row is gone counts as held with the
flags `PURGED`: not inserted, not aggregated, not counted as inserted, still acked and
counted as a duplicate. Nothing of the purged copy is left to correct or merge, so a later
copy with a trusted time or the full record of a narrowband copy is dropped too: storing it
would store the seq again (and retention would purge it again).

Narrowband merge (DESIGN.md §5): an event that came by narrowband carries the central-only bit
`NARROWBAND_COPY`, set by `central.narrowband.receiver` on the records it builds (never on the wire:
the envelope rejects unknown flags, so an IP record cannot claim it). When the full
record arrives over IP under the same (gw, stream, seq), `merge_program` replaces the held
copy's columns with it (exact value, threshold and the rest of the attrs) instead of dropping
it as a duplicate; `merge_alarms_program` then fixes the value and threshold its alarm shows.
The alarm transition is not run again: `alarm_events` already holds that seq. Any other
duplicate is still dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from central.alarms.engine import BadAlarmRecordError, event_from_record
from central.storage.delivery import StreamTally, loss_report
from central.storage.program import Program, Sql, placeholders
from central.storage.timecheck import (
    CENTRAL_BITS,
    CENTRAL_TS_SUSPECT,
    CLOCK_SUSPECT,
    NARROWBAND_COPY,
)
from protocols.envelope import Record, RecordKind

_IN_CHUNK = 500
# The flags a held seq whose row is gone counts with (module doc): no bit, so neither
# `merges` nor `replaces` lets a later copy take its place.
PURGED = 0
_TELEMETRY = RecordKind.TELEMETRY
_EVENT = RecordKind.EVENT
_ALARM = RecordKind.ALARM


def stage_records(gw: str, stream: str, records: Sequence[Record], ids: Mapping[str, int],
                  lo: int, hi: int, now: int, *, readings: dict[int, tuple[Any, ...]],
                  events: dict[int, tuple[Any, ...]],
                  latest: dict[int, tuple[int, float | None, str | None]], tally: StreamTally,
                  samples: tuple[list[int], list[int], list[float]],
                  lead: tuple[Any, ...] = ()) -> None:
    """Sort one batch's records into rows, record by record (both backends):

    - `readings[seq]` = `(*lead, gw, stream, seq, point_id, ts, num, text, flags, now)`,
      `events[seq]` = `(*lead, gw, stream, seq, kind, point_id, ts, num, text, flags,
      attrs_json, now)`; a seq already staged keeps its first copy.
    - Numbers as floats (what both databases' REAL / double columns hold); a time outside
      `lo..hi` gets the central suspect bits.
    - `latest[point_id]`, the newest trusted value; `samples` (point ids, times, values) of
      the readings for the aggregates, assuming each is new; reported losses into `tally`.
    """
    pids, tss, vals = samples
    for r in records:
        v, ts, seq = r.value, r.ts_ms, r.seq
        num, text = (None, v) if v.__class__ is str else (None if v is None else float(v), None)
        pid = None if r.point is None else ids[r.point]
        f = int(r.flags)
        if ts < lo or ts > hi:
            f |= CENTRAL_BITS
        if r.kind is _TELEMETRY:
            if seq not in readings:
                readings[seq] = (*lead, gw, stream, seq, pid, ts, num, text, f, now)
                if pid is not None and num is not None and not f & CLOCK_SUSPECT:
                    pids.append(pid)
                    tss.append(ts)
                    vals.append(num)
            if pid is not None and not f & CENTRAL_TS_SUSPECT:
                prev = latest.get(pid)
                if prev is None or ts > prev[0]:
                    latest[pid] = (ts, num, text)
        elif seq not in events:
            attrs = (json.dumps(dict(r.attrs), ensure_ascii=False, default=str)
                     if r.attrs else None)
            events[seq] = (*lead, gw, stream, seq, int(r.kind), pid, ts, num, text, f, attrs,
                           now)
            if r.kind is _EVENT:
                report = loss_report(seq, ts, r.attrs)
                if report is not None:
                    tally.lost(gw, stream, report)


def held_flags_program(table: str, gw: str, stream: str,
                       seqs: Sequence[int]) -> Program[dict[int, int]]:
    """`{seq: stored flags}` for the sorted `seqs` already in `table`."""
    if not seqs:
        return {}
    lo, hi = seqs[0], seqs[-1]
    if hi - lo < 2 * len(seqs) + 64:  # dense: one range probe
        rows = yield Sql(f"SELECT seq, flags FROM {table} WHERE gw = ? AND stream = ?"
                         " AND seq >= ? AND seq <= ?", (gw, stream, lo, hi))
        if not rows:
            return {}
        want = set(seqs)
        return {s: f for s, f in rows if s in want}
    out: dict[int, int] = {}
    for i in range(0, len(seqs), _IN_CHUNK):
        part = seqs[i:i + _IN_CHUNK]
        rows = yield Sql(f"SELECT seq, flags FROM {table} WHERE gw = ? AND stream = ?"
                         f" AND seq IN ({placeholders(len(part))})", (gw, stream, *part))
        out.update(rows)
    return out


def replace_program(table: str, rows: Sequence[tuple[str, str, int, int, int]]
                    ) -> Program[list[tuple[str, str, int]]]:
    """The one allowed update: `(gw, stream, seq, ts_ms, flags)` replaces the held copy's
    time and flags where that copy is `CLOCK_SUSPECT` (and the caller checked the new one is
    not). Key order: the lock order on PostgreSQL. Returns the keys replaced."""
    done = []
    for gw, stream, seq, ts, flags in sorted(rows):
        hit = yield Sql(f"UPDATE {table} SET ts_ms = ?, flags = ? WHERE gw = ? AND stream = ?"
                        " AND seq = ? AND (flags & ?) <> 0 RETURNING seq",
                        (ts, flags, gw, stream, seq, CLOCK_SUSPECT))
        if hit:
            done.append((gw, stream, seq))
    return done


def merges(stored: int | None, incoming: int) -> bool:
    """True when an incoming copy of a held event is the full record of a narrowband copy;
    `stored=None` means "held, flags not seen" (the UPDATE's own check then decides)."""
    return not incoming & NARROWBAND_COPY and (stored is None or bool(stored & NARROWBAND_COPY))


def merge_program(rows: Sequence[tuple[Any, ...]]) -> Program[list[tuple[str, str, int]]]:
    """Replace held narrowband copies of events: each row is `(gw, stream, seq, kind,
    point_id, ts_ms, value, text, flags, attrs_json)` of the IP copy. Key order: the lock
    order on PostgreSQL. Returns the keys replaced."""
    done = []
    for gw, stream, seq, kind, pid, ts, num, text, flags, attrs in sorted(rows, key=_key3):
        hit = yield Sql("UPDATE events SET kind = ?, point_id = ?, ts_ms = ?, value = ?,"
                        " text = ?, flags = ?, attrs = ? WHERE gw = ? AND stream = ?"
                        " AND seq = ? AND (flags & ?) <> 0 RETURNING seq",
                        (kind, pid, ts, num, text, flags, attrs, gw, stream, seq,
                         NARROWBAND_COPY))
        if hit:
            done.append((gw, stream, seq))
    return done


def merge_alarms_program(merged: Sequence[tuple[str, str, Record]]) -> Program[None]:
    """After the alarm transitions of the same transaction (which hold these alarms' key locks:
    the IP copies were in the batch): give the history line and, if it is still the alarm's
    latest event, the alarm itself the full record's value and threshold."""
    for gw, stream, r in sorted(merged, key=lambda m: (m[0], m[1], m[2].seq)):
        if r.kind is not _ALARM:
            continue
        try:
            ev = event_from_record(gw, stream, r)
        except BadAlarmRecordError:
            continue  # the alarm engine has logged it
        rows = yield Sql("UPDATE alarm_events SET value = ?, attrs = ? WHERE gw = ?"
                         " AND stream = ? AND seq = ? RETURNING alarm_id, ts_ms",
                         (ev.value, ev.attrs_json, gw, stream, r.seq))
        if rows and rows[0][0] is not None:
            yield Sql("UPDATE alarms SET value = coalesce(?, value),"
                      " threshold = coalesce(?, threshold) WHERE id = ? AND last_seq = ?"
                      " AND last_event_ms = ?",
                      (ev.value, ev.threshold, rows[0][0], r.seq, rows[0][1]))


def _key3(row: tuple[Any, ...]) -> tuple[str, str, int]:
    return row[0], row[1], row[2]
