"""The usual batch staged column by column for the PostgreSQL write (`postgres_write`).

A batch of plain readings (every record numeric TELEMETRY with a point, distinct seqs,
trusted and plausible times: a live or backlog batch) needs no Python object per record: its
columns (as a version 2 batch was decoded, else taken from its records) become the binary
`COPY` rows at once (`postgres_binary.readings_rows`), and only the latest values are
looked at per record. It ends the same as `central.storage.writes.stage_records` would:
the same rows, latest values, aggregate samples and held seqs.

Until the write knows that none of its keys is held, such a batch stays columns; if one is
(a resent batch), or a later batch of the call repeats one of its seqs, it turns into the
rows `stage_records` would have made (`rows`), and the record-by-record write takes over.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice, repeat
from operator import attrgetter, eq, le, lt
from typing import Any

from central.storage.delivery import StreamTally
from central.storage.postgres_binary import readings_rows
from central.storage.timecheck import CENTRAL_BITS
from protocols.envelope import DataBatch, RecordKind, ranges_from_seqs

_TELEMETRY = RecordKind.TELEMETRY
_RECORD_COLS = attrgetter("seq", "kind", "ts_ms", "point", "value", "flags")
_NUMERIC = frozenset((float, int, bool))


@dataclass(frozen=True, slots=True)
class PlainReadings:
    """One batch of plain readings as columns; `n` is its position in the write's call."""

    n: int
    gw: str
    stream: str
    seqs: Sequence[int]
    pids: Sequence[int]
    tss: Sequence[int]
    values: array[float]
    flags: Sequence[int] | int
    first: int  # lowest and highest seq
    last: int

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.first <= hi and lo <= self.last

    def copy_rows(self, now: int) -> bytes:
        return readings_rows(self.gw, self.stream, self.seqs, self.pids, self.tss, self.values,
                             self.flags, now)

    def rows(self, now: int) -> dict[int, tuple[Any, ...]]:
        """seq -> the row `stage_records` makes (with the batch number in front)."""
        flags = (repeat(self.flags, len(self.seqs)) if isinstance(self.flags, int)
                 else self.flags)
        n, gw, stream = self.n, self.gw, self.stream
        return {seq: (n, gw, stream, seq, pid, ts, v, None, f, now) for seq, pid, ts, v, f
                in zip(self.seqs, self.pids, self.tss, self.values, flags, strict=True)}


def plain_readings(n: int, batch: DataBatch, ids: Mapping[str, int], lo: int,
                   hi: int) -> PlainReadings | None:
    """`batch` as columns if it is plain readings (module doc) with times in `lo..hi`; None
    for any other batch (staged record by record)."""
    cols = batch.columns
    if not len(batch.records):
        return None
    if cols is not None:
        if (cols.kinds is not None and any(cols.kinds)) or min(cols.points) < 0:
            return None
        seqs, tss, values, flags = cols.seqs, cols.ts, cols.values, cols.flags
        by_index = list(map(ids.get, cols.pts))
        pids: Sequence[Any] = list(map(by_index.__getitem__, cols.points))
    else:
        seqs, kinds, tss, points, values, flags = zip(*map(_RECORD_COLS, batch.records),
                                                      strict=True)
        if kinds.count(_TELEMETRY) != len(kinds) or None in points:
            return None
        pids = list(map(ids.__getitem__, points))
    if (not _NUMERIC.issuperset(map(type, values)) or min(tss) < lo or max(tss) > hi
            or any(f & CENTRAL_BITS for f in ({flags} if isinstance(flags, int)
                                              else set(flags)))):
        return None
    if not (isinstance(seqs, range) or all(map(lt, seqs, islice(seqs, 1, None)))):
        ordered = sorted(seqs)
        if any(map(eq, ordered, islice(ordered, 1, None))):
            return None  # a seq twice: the record-by-record write keeps its first copy
    return PlainReadings(n, batch.gw, batch.stream, seqs, pids, tss, array("d", values),
                         flags if isinstance(flags, int) else list(map(int, flags)),
                         min(seqs), max(seqs))


def hold_plain(p: PlainReadings, tally: StreamTally) -> None:
    """The seqs these readings add to their stream (what the write locks and probes by)."""
    seqs = p.seqs
    tally.held_ranges(p.gw, p.stream, ((p.first, p.last),) if p.last - p.first + 1 == len(seqs)
                      else ranges_from_seqs(sorted(seqs)))


class LatestValues:
    """The latest values one write stages, per point: `records` as `stage_records` keeps
    them (point id -> (ts, number, text)), and those of plain readings per gateway as two
    dicts of plain numbers, times and values (`add_plain`): a tuple per point would be one
    more object for the garbage collector to track, 10,000 of them a write.

    A point belongs to one gateway, so the two parts never hold the same point: once a
    gateway has records staged by `stage_records` (`before_records`), its plain readings'
    values move to `records`, and later ones are added there too."""

    __slots__ = ("records", "_times", "_values", "_newest", "_mixed")

    def __init__(self) -> None:
        self.records: dict[int, tuple[int, float | None, str | None]] = {}
        self._times: dict[str, dict[int, int]] = {}
        self._values: dict[str, dict[int, float]] = {}
        self._newest: dict[str, int] = {}  # the newest time in _times[gw]
        self._mixed: set[str] = set()

    def add_plain(self, p: PlainReadings) -> None:
        """What `stage_records` adds for these readings, batch after batch in call order:
        each point's newest value, the first record on a tie."""
        pids, tss, values = p.pids, p.tss, p.values
        if p.gw in self._mixed:
            records = self.records
            for pid, ts, v in zip(pids, tss, values, strict=True):
                held = records.get(pid)
                if held is None or ts > held[0]:
                    records[pid] = (ts, v, None)
            return
        times = self._times.setdefault(p.gw, {})
        vals = self._values.setdefault(p.gw, {})
        top = self._newest.get(p.gw, -1)
        if tss[0] > top and _in_time_order(pids, tss):  # the usual batch: all at once
            times.update(zip(pids, tss, strict=True))
            vals.update(zip(pids, values, strict=True))
        else:
            for pid, ts, v in zip(pids, tss, values, strict=True):
                prev = times.get(pid)
                if prev is None or ts > prev:
                    times[pid] = ts
                    vals[pid] = v
        self._newest[p.gw] = max(top, max(tss))

    def before_records(self, gw: str) -> None:
        """`stage_records` is about to stage records of `gw` into `records`."""
        times = self._times.pop(gw, None)
        if times is not None:
            vals = self._values.pop(gw)
            self.records.update((pid, (ts, vals[pid], None)) for pid, ts in times.items())
        self._mixed.add(gw)

    def columns(self) -> tuple[array[int], array[int], list[float | None], list[str | None]]:
        """Point ids, times, numbers and texts, one item per point."""
        rows = list(self.records.values())
        pids, tss = array("q", self.records), array("q", [r[0] for r in rows])
        nums, texts = [r[1] for r in rows], [r[2] for r in rows]
        for gw, times in self._times.items():
            pids.extend(times)
            tss.extend(times.values())
            nums.extend(map(self._values[gw].__getitem__, times))
        texts.extend([None] * (len(pids) - len(texts)))
        return pids, tss, nums, texts


def _in_time_order(pids: Sequence[int], tss: Sequence[int]) -> bool:
    """True if the times never fall and no point has two records at one time: a point's
    last record is then its newest, the one `stage_records` keeps."""
    n = len(pids)
    return (all(map(le, tss, islice(tss, 1, None)))
            and (len(set(pids)) == n or len(set(zip(pids, tss, strict=True))) == n))
