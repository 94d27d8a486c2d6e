"""What central holds of each gateway's stream, and what it knows is missing (DESIGN.md §4.6).

Three tables, written in the batch's own transaction by `streams_program` (portable SQL, run
by either backend):

- `streams`: per (gw, stream) the counters the API reads without scanning: `held` (distinct
  seqs ever stored: retention purges rows, not this), `max_seq`, `lost_reported` (sum of the
  `records` the edge said it evicted), first/last write time.
- `stream_ranges`: the seqs held, as disjoint, non-adjacent `[first_seq, last_seq]` ranges.
  A healthy stream is one row; each gap adds one. Gaps are its complement in `1..max_seq`,
  found with `lag()` over the ranges (the raw tables are purged by time, so they cannot
  answer "was this seq ever here").
- `stream_losses`: the edge's `outbox_thinned` / `outbox_dropped` reports (EVENT records,
  `protocols.outbox_events.LossReport`), one row per report record. An
  `outbox_dropped` with `reason: "power_cut"` (the seqs an outbox skipped after a power cut,
  `edge_agent/outbox/seqs.py`) is kept as kind `power_cut`; some seqs of its range may have
  reached central before the cut, and those count as held, not lost.

A missing seq is `reported lost` when a loss report covers it, up to the number of records the
reports name (thinning keeps some records inside a reported range; those still come);
everything else missing is `pending`: not arrived yet, or lost without a word.

Writers on PostgreSQL lock the `streams` rows (sorted) before they read the ranges, so the
range merge of one stream is serialised across workers.

The ranges are also what a write asks whether a staged seq was ever held: retention purges
the row, not its seq's range, so a record resent after its row was purged (its ack was lost)
finds its seq here (`held_ranges_program`, `held_seqs`) and is not stored again
(`central.storage.writes`, `PURGED`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from central.storage.program import Program, Sql, placeholders
from protocols.envelope import DataBatch, count_in_ranges, merge_ranges, ranges_from_seqs
from protocols.limits import INT64_MAX
from protocols.outbox_events import LossReport as OutboxLoss
from protocols.outbox_events import parse_outbox_event
from protocols.record_attrs import AttrsError

GAP_LIMIT = 100
# A record central refused (protocols.limits) and acknowledged: the edge forgets it, so the
# delivery view counts its seq as reported lost, not as pending for ever.
REJECTED = "rejected"
_RUNS_PER_STREAM = 16  # more runs in one write: delete the span they cover, merge in Python
# The held ranges of a stream that a run of seqs [a, b] overlaps or adjoins: (gw, stream,
# a - 1, b + 1, gw, stream, a, a). The one range starting below `a` that can reach it is the
# last such range.
_RANGES_AT = ("SELECT gw, stream, first_seq, last_seq FROM stream_ranges WHERE gw = ?"
              " AND stream = ? AND last_seq >= ? AND first_seq <= ? AND first_seq >= coalesce("
              "(SELECT max(first_seq) FROM stream_ranges WHERE gw = ? AND stream = ?"
              " AND first_seq < ?), ?)")
_CHUNK = 200  # rows per multi-row statement


@dataclass(frozen=True, slots=True)
class LossReport:
    seq: int  # of the report record itself
    kind: str  # thinned | dropped | power_cut (`OutboxLoss.kind`) | rejected
    first_seq: int
    last_seq: int
    records: int
    ts_ms: int


def loss_report(seq: int, ts_ms: int, attrs: Mapping[str, Any] | None) -> LossReport | None:
    """The loss report an EVENT record's attrs carry (`protocols.outbox_events`), or None if
    they are not one or not a valid one (ingest counts those: `count_bad_attrs`)."""
    try:
        r = parse_outbox_event(attrs)
    except AttrsError:
        return None
    if not isinstance(r, OutboxLoss):
        return None
    return LossReport(seq, r.kind, r.first_seq, r.last_seq, r.records, ts_ms)


def tally_rejected(tally: StreamTally, batch: DataBatch, now: int) -> None:
    """Count each refused record with a valid seq as a one-record `rejected` loss report
    under its own seq (a resent copy finds it held and counts nothing)."""
    for rj in batch.rejected:
        if rj.seq is not None:
            tally.lost(batch.gw, batch.stream, LossReport(rj.seq, REJECTED, rj.seq, rj.seq, 1, now))


class StreamTally:
    """What one write transaction adds to each stream: seqs now held and loss reports."""

    __slots__ = ("seqs", "spans", "losses")

    def __init__(self) -> None:
        self.seqs: dict[tuple[str, str], set[int]] = {}
        # Whole ranges held, so a batch of consecutive seqs costs no set of its seqs.
        self.spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.losses: dict[tuple[str, str], list[LossReport]] = {}

    def __bool__(self) -> bool:
        return bool(self.seqs or self.spans or self.losses)

    def held(self, gw: str, stream: str, seqs: Iterable[int]) -> None:
        self.seqs.setdefault((gw, stream), set()).update(seqs)

    def held_ranges(self, gw: str, stream: str, ranges: Iterable[tuple[int, int]]) -> None:
        """Like `held`, for inclusive `[first, last]` ranges."""
        self.spans.setdefault((gw, stream), []).extend(ranges)

    def lost(self, gw: str, stream: str, report: LossReport) -> None:
        self.losses.setdefault((gw, stream), []).append(report)

    def runs(self, key: tuple[str, str]) -> list[tuple[int, int]]:
        """The stream's held seqs as sorted, disjoint, non-adjacent ranges."""
        seqs, spans = self.seqs.get(key), self.spans.get(key)
        if not spans:
            return list(ranges_from_seqs(seqs or ()))
        if not seqs and len(spans) == 1:
            return list(spans)
        return list(merge_ranges([*ranges_from_seqs(seqs or ()), *spans]))


def _chunks(rows: Sequence[tuple[Any, ...]],
            n: int = _CHUNK) -> Iterable[Sequence[tuple[Any, ...]]]:
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


def _values(rows: Sequence[tuple[Any, ...]]) -> tuple[str, tuple[Any, ...]]:
    row = f"({placeholders(len(rows[0]))})"
    return ", ".join([row] * len(rows)), tuple(x for r in rows for x in r)


# Per stream, some of its held ranges as {first_seq: last_seq} (`held_ranges_program`).
HeldRanges = dict[tuple[str, str], dict[int, int]]


def held_ranges_program(runs: Mapping[tuple[str, str], Sequence[tuple[int, int]]]
                        ) -> Program[HeldRanges]:
    """Per stream of `runs` (its seqs as sorted, disjoint ranges), the held ranges they
    overlap or adjoin: every range that holds one of their seqs. A stream with none is
    absent."""
    # One branch per run, each a range scan of the key (an OR of them had PostgreSQL scan
    # the table and run the subquery per row: a tenth of an ingest transaction's time).
    args: list[Any] = []
    for (gw, s), rs in runs.items():
        probe = rs if len(rs) <= _RUNS_PER_STREAM else ((rs[0][0], rs[-1][1]),)
        for a, b in probe:
            args += (gw, s, a - 1, b + 1, gw, s, a, a)
    taken: HeldRanges = {}
    for i in range(0, len(args), 50 * 8):
        part = args[i:i + 50 * 8]
        rows = yield Sql(" UNION ALL ".join([_RANGES_AT] * (len(part) // 8)), tuple(part))
        for gw, s, a, b in rows:
            taken.setdefault((gw, s), {})[a] = b
    return taken


def held_seqs(runs: Sequence[tuple[int, int]], ranges: Mapping[int, int]) -> Iterator[int]:
    """The seqs of `runs` (sorted, disjoint) that `ranges` ({first_seq: last_seq}, disjoint)
    hold. The usual write's runs only adjoin the held ranges: no seq, no step per seq."""
    spans = sorted(ranges.items())
    j = 0
    for a, b in runs:
        while j < len(spans) and spans[j][1] < a:
            j += 1
        k = j
        while k < len(spans) and spans[k][0] <= b:
            yield from range(max(a, spans[k][0]), min(b, spans[k][1]) + 1)
            k += 1


def batch_ranges_program(batches: Sequence[DataBatch]) -> Program[HeldRanges]:
    """`held_ranges_program` for every seq of `batches`, each batch as its seq span (merged
    per stream): read once for a write before it records its own seqs (SQLite's single
    writer), not once per batch."""
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for b in batches:
        if b.records:
            seqs = b.columns.seqs if b.columns is not None else [r.seq for r in b.records]
            spans.setdefault((b.gw, b.stream), []).append((min(seqs), max(seqs)))
    return held_ranges_program({k: merge_ranges(v) for k, v in spans.items()})


def held_before(before: HeldRanges, gw: str, stream: str,
                runs: Sequence[tuple[int, int]]) -> set[int]:
    """The seqs of `runs` (sorted, disjoint) that the stream's ranges in `before` hold."""
    ranges = before.get((gw, stream))
    return set(held_seqs(runs, ranges)) if ranges else set()


def streams_program(tally: StreamTally, now: int | None) -> Program[HeldRanges]:
    """Record in the write transaction what `tally` says; see the module docstring.
    `now=None` (a backfill) leaves the write times alone. Returns the held ranges it read
    before adding the tally's seqs: every range holding one of them (`held_ranges_program`),
    read under the streams' row locks on PostgreSQL."""
    runs = {k: rs for k in sorted(tally.seqs.keys() | tally.spans.keys())
            if (rs := tally.runs(k))}
    # A stream may have only loss reports in this write (a batch of refused records).
    keys = sorted(runs.keys() | {k for k, v in tally.losses.items() if v})
    if not keys:
        return {}
    # 1. Create or lock every stream row, in key order (PostgreSQL: the lock order).
    for chunk in _chunks([(gw, s, now, now) for gw, s in keys]):
        values, params = _values(chunk)
        yield Sql("INSERT INTO streams (gw, stream, first_ms, last_ms) VALUES " + values
                  + " ON CONFLICT (gw, stream) DO UPDATE SET"
                  " last_ms = coalesce(excluded.last_ms, streams.last_ms)", params)
    # 2. The held ranges each run touches (overlaps or adjoins), merged with the runs. The
    #    usual write extends one range: an UPDATE of last_seq (no index change: PostgreSQL
    #    updates it in place, so these hot rows do not bloat).
    taken = yield from held_ranges_program(runs)
    gone: list[tuple[Any, ...]] = []
    longer: list[tuple[Any, ...]] = []
    new: list[tuple[Any, ...]] = []
    delta: dict[tuple[str, str], list[int]] = {}
    for k in keys:
        had = taken.get(k, {})
        merged = merge_ranges([*runs.get(k, ()), *had.items()])
        firsts = {a for a, _ in merged}
        gone += [(*k, a) for a in had if a not in firsts]
        longer += [(*k, a, b) for a, b in merged if a in had and had[a] != b]
        new += [(*k, a, b) for a, b in merged if a not in had]
        delta[k] = [count_in_ranges(merged) - count_in_ranges(had.items()),
                    merged[-1][1] if merged else 0, 0]
    for chunk in _chunks(gone):
        values, params = _values(chunk)
        yield Sql(f"DELETE FROM stream_ranges WHERE (gw, stream, first_seq) IN (VALUES {values})",
                  params)
    for chunk in _chunks(longer):
        values, params = _values(chunk)
        yield Sql("UPDATE stream_ranges SET last_seq = v.column4 FROM (VALUES " + values
                  + ") AS v WHERE stream_ranges.gw = v.column1 AND stream_ranges.stream ="
                  " v.column2 AND stream_ranges.first_seq = v.column3", params)
    for chunk in _chunks(new):
        values, params = _values(chunk)
        yield Sql("INSERT INTO stream_ranges (gw, stream, first_seq, last_seq) VALUES " + values,
                  params)
    # 3. Loss reports, each once (the report record may arrive twice).
    reports = [(*k, r.seq, r.kind, r.first_seq, r.last_seq, r.records, r.ts_ms,
                r.ts_ms if now is None else now) for k in keys for r in tally.losses.get(k, ())]
    for chunk in _chunks(reports):
        values, params = _values(chunk)
        rows = yield Sql("INSERT INTO stream_losses (gw, stream, seq, kind, first_seq, last_seq,"
                         " records, ts_ms, received_ms) VALUES " + values
                         + " ON CONFLICT (gw, stream, seq) DO NOTHING RETURNING gw, stream,"
                         " records", params)
        for gw, s, n in rows:
            # Saturating: reports may overlap, and their sum must stay a BIGINT.
            delta[(gw, s)][2] = min(INT64_MAX, delta[(gw, s)][2] + n)
    # 4. The counters.
    for chunk in _chunks([(*k, *delta[k]) for k in keys]):
        values, params = _values(chunk)
        yield Sql("UPDATE streams SET held = streams.held + v.column3,"
                  " max_seq = CASE WHEN v.column4 > streams.max_seq THEN v.column4"
                  " ELSE streams.max_seq END, lost_reported = CASE WHEN v.column5 >"
                  f" {INT64_MAX} - streams.lost_reported THEN {INT64_MAX}"
                  " ELSE streams.lost_reported + v.column5 END"
                  " FROM (VALUES " + values + ") AS v"
                  " WHERE streams.gw = v.column1 AND streams.stream = v.column2", params)
    return taken


# --- reads ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamDelivery:
    stream: str
    current: bool  # the stream the gateway names now (older ones: a replaced outbox)
    held: int
    max_seq: int
    missing: int  # seqs in 1..max_seq not held
    gaps: tuple[tuple[int, int], ...]  # the first GAP_LIMIT missing ranges
    gap_count: int
    reported_lost: int  # missing seqs the edge reported evicted
    pending: int  # missing seqs not (yet) explained: may still come
    lost_records_reported: int  # sum of `records` over the stream's loss reports
    lost_ranges: tuple[tuple[int, int], ...]  # the reports' ranges, merged (first GAP_LIMIT)
    first_ms: int | None
    last_ms: int | None


@dataclass(frozen=True, slots=True)
class GatewayDelivery:
    gw: str
    stream: str | None
    last_seen_ms: int | None
    backlog: int | None
    streams: tuple[StreamDelivery, ...]


@dataclass(frozen=True, slots=True)
class DeliverySummary:
    """A gateway's delivery over all its streams, for listings."""

    gw: str
    held: int
    missing: int
    reported_lost: int


def _loss_ranges(gw: str, stream: str, max_seq: int) -> Program[list[tuple[int, int]]]:
    rows = yield Sql("SELECT first_seq, last_seq FROM stream_losses WHERE gw = ? AND stream = ?",
                     (gw, stream))
    return list(merge_ranges((a, min(b, max_seq)) for a, b in rows if a <= max_seq))


def _reported_lost(gw: str, stream: str, missing: int, lost_records: int,
                   ranges: list[tuple[int, int]]) -> Program[int]:
    """Missing seqs inside reported ranges, at most the number of records reported."""
    if missing <= 0 or lost_records <= 0 or not ranges:
        return 0
    held_inside = 0
    for i in range(0, len(ranges), _CHUNK):
        chunk = ranges[i:i + _CHUNK]
        values, params = _values(chunk)
        rows = yield Sql(
            f"WITH v(a, b) AS (VALUES {values}) SELECT CAST(coalesce(sum("
            "CASE WHEN r.last_seq < v.b THEN r.last_seq ELSE v.b END"
            " - CASE WHEN r.first_seq > v.a THEN r.first_seq ELSE v.a END + 1), 0) AS BIGINT)"
            " FROM v JOIN stream_ranges r ON r.gw = ? AND r.stream = ? AND r.first_seq <= v.b"
            " AND r.last_seq >= v.a AND r.first_seq >= coalesce((SELECT max(first_seq)"
            " FROM stream_ranges r2 WHERE r2.gw = ? AND r2.stream = ? AND r2.first_seq <= v.a),"
            " v.a)", (*params, gw, stream, gw, stream))
        held_inside += int(rows[0][0])
    covered_missing = count_in_ranges(ranges) - held_inside
    return max(0, min(covered_missing, lost_records, missing))


def _gaps(gw: str, stream: str, limit: int) -> Program[tuple[list[tuple[int, int]], int]]:
    rows = yield Sql("SELECT prev + 1, first_seq - 1 FROM (SELECT first_seq,"
                     " lag(last_seq, 1, 0) OVER (ORDER BY first_seq) AS prev FROM stream_ranges"
                     " WHERE gw = ? AND stream = ?) AS r WHERE first_seq > prev + 1"
                     " ORDER BY first_seq LIMIT ?", (gw, stream, limit))
    ((n, lowest),) = yield Sql("SELECT count(*), min(first_seq) FROM stream_ranges"
                               " WHERE gw = ? AND stream = ?", (gw, stream))
    return [(a, b) for a, b in rows], n - (1 if lowest == 1 else 0)


def delivery_program(gw: str, gap_limit: int = GAP_LIMIT) -> Program[GatewayDelivery | None]:
    """The delivery view of one gateway; None if central has never heard of it."""
    g = yield Sql("SELECT stream, last_seen_ms, backlog FROM gateways WHERE gw = ?", (gw,))
    if not g:
        return None
    current, last_seen, backlog = g[0]
    rows = yield Sql("SELECT stream, held, max_seq, lost_reported, first_ms, last_ms FROM streams"
                     " WHERE gw = ? ORDER BY stream", (gw,))
    out = []
    for stream, held, max_seq, lost_records, first_ms, last_ms in rows:
        missing = max(0, max_seq - held)
        gaps: list[tuple[int, int]] = []
        gap_count = 0
        if missing:
            gaps, gap_count = yield from _gaps(gw, stream, gap_limit)
        lost_ranges = ((yield from _loss_ranges(gw, stream, max_seq)) if lost_records else [])
        lost = yield from _reported_lost(gw, stream, missing, lost_records, lost_ranges)
        out.append(StreamDelivery(
            stream=stream, current=stream == current, held=held, max_seq=max_seq,
            missing=missing, gaps=tuple(gaps), gap_count=gap_count, reported_lost=lost,
            pending=missing - lost, lost_records_reported=lost_records,
            lost_ranges=tuple(lost_ranges[:gap_limit]), first_ms=first_ms, last_ms=last_ms))
    out.sort(key=lambda s: (not s.current, -(s.last_ms or 0), s.stream))
    return GatewayDelivery(gw=gw, stream=current, last_seen_ms=last_seen, backlog=backlog,
                           streams=tuple(out))


def summary_program(gw: str | None = None) -> Program[dict[str, DeliverySummary]]:
    """Per gateway, summed over its streams: held, missing, reported lost. Reads the counters;
    only a stream with both missing seqs and loss reports costs a ranges query."""
    where, args = ("WHERE gw = ?", (gw,)) if gw is not None else ("", ())
    rows = yield Sql("SELECT gw, stream, held, max_seq, lost_reported FROM streams "
                     + where, args)
    acc: dict[str, list[int]] = {}
    for g, stream, held, max_seq, lost_records in rows:
        missing = max(0, max_seq - held)
        lost = 0
        if missing and lost_records:
            ranges = yield from _loss_ranges(g, stream, max_seq)
            lost = yield from _reported_lost(g, stream, missing, lost_records, ranges)
        a = acc.setdefault(g, [0, 0, 0])
        a[0] += held
        a[1] += missing
        a[2] += lost
    return {g: DeliverySummary(g, *a) for g, a in acc.items()}
