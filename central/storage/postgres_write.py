"""The PostgreSQL batch write (DESIGN.md §4.3, §9): lock the streams, ask which keys are held,
binary `COPY` the new rows straight into `readings` and `events`.

Why not `INSERT ... ON CONFLICT (gw, stream, seq) DO NOTHING`: measured on this machine with
22 batches of 500 rows per transaction, an insert-select from a COPY-filled staging table
(the conflict clause makes it probe the key and insert row by row) ran at about half the rate
of COPY into the table itself (which fills heap pages many rows at a time), and an insert from
`unnest` of arrays at about a quarter; central's ingest rate is bounded by this statement.

So the write first makes itself the only writer of its streams: `streams_program` creates or
locks every `streams` row the call writes to, in key order, before anything else. Nothing but
this module inserts readings and events, so until the transaction commits no one else inserts
under those (gw, stream) keys. One probe per run of staged seqs then finds the copies already
held, with their flags (its snapshot is taken after the locks: it sees every earlier writer's
commit); the rest cannot collide and is COPYed in. The primary key still guards the rule: a
collision would fail the write and roll it back (the batch comes again), never store a row
twice. The usual batch, plain readings, is staged and COPYed column by column without a
Python object per record (`central.storage.postgres_plain`); any other record by record.

Held means held by the stream's ranges, not only by a row: retention purges rows, never the
ranges. `streams_program` returns the held ranges the staged seqs touch, read under the same
locks before it adds the staged seqs; a staged seq inside them whose row is gone (a record
resent after retention purged it) is held as `PURGED`: not COPYed, not counted as inserted,
not aggregated, nothing to correct or merge, acked as a duplicate (`central.storage.writes`).
The usual batch only adjoins those ranges: no step per record.

Only the new rows count as inserted and feed the aggregates' pending set
(`central.storage.aggregates`); a held copy with a suspect time may be replaced by a corrected
one (`central.storage.timecheck`), a held narrowband copy of an event by the full record
(`central.storage.writes`); every staged seq goes to the stream accounting
(`central.storage.delivery`, which ignores seqs already counted). Row locks are taken in one
phase order, each phase in key order: points, streams, readings and events (new keys, so no
one waits for them; the held ones a correction updates), gateways, latest, alarms (the
aggregates are written by a flush of their own: `central.storage.aggregates`). A point
belongs to one gateway and only a holder of its gateway's row sets its latest value (this
write, or `central.storage.postgres_latest`'s flush of the values a write left pending), so
the gateway's row, locked before them, makes a transaction the only writer of its points'
latest values: they need no order of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from central.alarms.engine import ingest_program
from central.alarms.lifecycle import AlarmChange, AlarmPolicy
from central.storage.aggregates import AggSamples
from central.storage.base import WriteResult
from central.storage.delivery import (
    HeldRanges,
    StreamTally,
    held_before,
    streams_program,
    tally_rejected,
)
from central.storage.postgres_binary import (
    COPY_HEADER,
    COPY_TRAILER,
    READING_COLS,
    Float8Array,
    Int8Array,
)
from central.storage.postgres_latest import LatestColumns, write_latest
from central.storage.postgres_plain import (
    LatestValues,
    PlainReadings,
    hold_plain,
    plain_readings,
)
from central.storage.postgres_schema import Conn
from central.storage.program import run_async
from central.storage.timecheck import CENTRAL_TS_SUSPECT, CLOCK_SUSPECT, TimePolicy, replaces
from central.storage.writes import (
    PURGED,
    merge_alarms_program,
    merge_program,
    merges,
    replace_program,
    stage_records,
)
from protocols.envelope import DataBatch, Record

_COLS = {"readings": READING_COLS,
         "events": "gw, stream, seq, kind, point_id, ts_ms, value, text, flags, attrs,"
                   " received_ms"}
_TYPES = {"readings": ["text", "text", "int8", "int8", "int8", "float8", "text", "int4", "int8"],
          "events": ["text", "text", "int8", "int4", "int8", "int8", "float8", "text", "int4",
                     "jsonb", "int8"]}
# The held copies among runs of staged seqs, both tables in one round trip. A range scan of
# the primary key per run: OFFSET 0 keeps each lateral subquery apart, so the planner cannot
# turn the probe into a join that reads the whole table (it did for 8 runs over 2M rows).
_PROBE = ("WITH k AS (SELECT * FROM unnest(%b::text[], %b::text[], %b::int8[], %b::int8[])"
          " AS k(gw, stream, lo, hi)) " + " UNION ALL ".join(
              f"SELECT '{t}', k.gw, k.stream, x.seq, x.flags FROM k CROSS JOIN LATERAL"
              f" (SELECT seq, flags FROM {t} WHERE gw = k.gw AND stream = k.stream"
              " AND seq BETWEEN k.lo AND k.hi OFFSET 0) AS x" for t in ("readings", "events")))
_PENDING = ("INSERT INTO agg_pending (pids, tss, vals, n, created_ms)"
            " VALUES (%b, %b, %b, %s, %s)")
_TOUCH_GATEWAYS = ("INSERT INTO gateways (gw, stream, last_seen_ms)"
                   " SELECT * FROM unnest(%b::text[], %b::text[], %b::int8[]) ORDER BY 1"
                   " ON CONFLICT (gw) DO UPDATE SET stream = excluded.stream,"
                   " last_seen_ms = excluded.last_seen_ms")
# A write that leaves its latest values pending owes them for its gateways (`postgres_latest`).
_OWE = ("INSERT INTO latest_owed (gw, token, ms) SELECT gw, %s, %s FROM unnest(%b::text[]) AS gw"
        " ORDER BY 1 ON CONFLICT (gw, token) DO UPDATE SET ms = excluded.ms")

# Positions in a staged row (batch_no first).
_TS = {"readings": 5, "events": 6}
_FLAGS = {"readings": 8, "events": 9}


# Per table and (gw, stream): seq -> staged row.
StagedRows = dict[tuple[str, str], dict[int, tuple[Any, ...]]]
# A key of a row this call staged but the database already held -> the held copy's flags.
Held = dict[tuple[str, str, int], int | None]


@dataclass(slots=True)
class _Staged:
    """Every row one call stages, and what the rows add up to before any is written."""

    rows: dict[str, StagedRows] = field(default_factory=lambda: {"readings": {}, "events": {}})
    # Batches of plain readings still as columns, per (gw, stream) (`postgres_plain`).
    plain: dict[tuple[str, str], list[PlainReadings]] = field(default_factory=dict)
    # Those whose latest values and samples are not staged yet (`_settle`), in call order.
    unsettled: list[PlainReadings] = field(default_factory=list)
    latest: LatestValues = field(default_factory=LatestValues)
    touched: dict[str, str] = field(default_factory=dict)  # gw -> its current stream
    tally: StreamTally = field(default_factory=StreamTally)
    # The aggregates' samples, assuming every staged reading is new (the usual case).
    samples: tuple[list[int], list[int], list[float]] = field(
        default_factory=lambda: ([], [], []))


@dataclass(slots=True)
class _Outcome:
    """What the write did, counted per batch (by its position in the call)."""

    inserted: list[int]
    suspect: list[int]
    corrected: list[int]
    merged: list[int]
    merged_records: list[tuple[str, str, Record]] = field(default_factory=list)
    samples: AggSamples = field(default_factory=AggSamples)

    @classmethod
    def zeros(cls, n: int) -> _Outcome:
        return cls([0] * n, [0] * n, [0] * n, [0] * n)


def _stage(batches: Sequence[DataBatch], point_ids: Mapping[str, Mapping[str, int]],
           lo: int, hi: int, now: int) -> _Staged:
    """Sort the batches into rows; a key seen twice in the call keeps the first batch's copy,
    the later ones count as duplicates."""
    staged = _Staged()
    for n, batch in enumerate(batches):
        gw, stream = batch.gw, batch.stream
        readings = staged.rows["readings"].setdefault((gw, stream), {})
        events = staged.rows["events"].setdefault((gw, stream), {})
        plain = plain_readings(n, batch, point_ids[gw], lo, hi)
        if plain is not None and _apart(staged, plain, readings):
            staged.plain.setdefault((gw, stream), []).append(plain)
            staged.unsettled.append(plain)
            hold_plain(plain, staged.tally)
        else:
            _unplain(staged, (gw, stream), now)  # its rows first: the first copy stays
            _settle(staged)  # the earlier batches' latest values first: the first one stays
            staged.latest.before_records(gw)
            stage_records(gw, stream, batch.records, point_ids[gw], lo, hi, now,
                          readings=readings, events=events, latest=staged.latest.records,
                          tally=staged.tally, samples=staged.samples, lead=(n,))
        tally_rejected(staged.tally, batch, now)
        staged.touched[gw] = stream  # the last batch of a gateway names its current stream
    for by_stream in staged.rows.values():
        for (gw, stream), rows in by_stream.items():
            staged.tally.held(gw, stream, rows)
    return staged


def _apart(staged: _Staged, plain: PlainReadings, readings: dict[int, Any]) -> bool:
    """True if no seq of `plain` is staged already (by an earlier batch of the call)."""
    return (not any(p.overlaps(plain.first, plain.last)
                    for p in staged.plain.get((plain.gw, plain.stream), ()))
            and not (readings and any(map(readings.__contains__, plain.seqs))))


def _settle(staged: _Staged) -> None:
    """Stage the latest values and samples of the batches of plain readings that have not
    staged them yet (put off so that the COPY of the rows need not wait for them)."""
    pids, tss, vals = staged.samples
    for p in staged.unsettled:
        staged.latest.add_plain(p)
        pids.extend(p.pids)
        tss.extend(p.tss)
        vals.extend(p.values)
    staged.unsettled.clear()


def _unplain(staged: _Staged, key: tuple[str, str], now: int) -> None:
    """Turn the stream's batches of plain readings into staged rows."""
    readings = staged.rows["readings"][key]
    for p in staged.plain.pop(key, ()):
        readings.update(p.rows(now))


async def _probe_held(conn: Conn, staged: _Staged, now: int,
                      before: HeldRanges) -> dict[str, Held]:
    """Per table, the staged keys already held and their flags; run with the streams locked,
    `before` the held ranges `streams_program` read under those locks. A staged seq they
    hold with no row is held as `PURGED` (writes.py). If a reading is held, every batch of
    plain readings is staged as rows."""
    keys = sorted(staged.tally.seqs.keys() | staged.tally.spans.keys())
    by_key = {k: staged.tally.runs(k) for k in keys}
    runs = [(*k, a, b) for k, rs in by_key.items() for a, b in rs]
    held: dict[str, Held] = {"readings": {}, "events": {}}
    if not runs:
        return held
    cur = await conn.execute(_PROBE, [list(c) for c in zip(*runs, strict=True)])
    found = await cur.fetchall()
    was_held = [(*k, s) for k, rs in by_key.items() for s in held_before(before, *k, rs)]
    if was_held or any(table == "readings" for table, *_ in found):
        for key in list(staged.plain):
            _unplain(staged, key, now)
    for table, gw, stream, seq, flags in found:
        if seq in staged.rows[table].get((gw, stream), ()):  # not a refused record's seq
            held[table][(gw, stream, seq)] = flags
    for table, h in held.items():
        rows = staged.rows[table]
        for k in was_held:
            if k[2] in rows.get(k[:2], ()):
                h.setdefault(k, PURGED)
    return held


def _jsonb(text: str) -> Jsonb:
    """An event's attrs, already JSON text, as a `jsonb` COPY field."""
    return Jsonb(text, dumps=str)


async def _copy_rows(conn: Conn, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Binary COPY of staged rows (their batch number dropped) into `table`."""
    async with conn.cursor() as cur, cur.copy(
            f"COPY {table} ({_COLS[table]}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_TYPES[table])
        if table == "readings":
            for row in rows:
                await copy.write_row(row[1:])
        else:
            for row in rows:
                attrs = row[10]
                await copy.write_row((*row[1:10], attrs if attrs is None else _jsonb(attrs),
                                      row[11]))


async def _copy_plain(conn: Conn, staged: _Staged, plain: Sequence[PlainReadings],
                      now: int) -> None:
    """Binary COPY of batches of plain readings, their rows built column by column and sent
    batch by batch: the server takes one in while the next is built, and the latest values
    are staged (`_settle`) while it takes in the last ones."""
    async with conn.cursor() as cur, cur.copy(
            f"COPY readings ({READING_COLS}) FROM STDIN (FORMAT BINARY)") as copy:
        await copy.write(COPY_HEADER)
        for p in plain:
            await copy.write(p.copy_rows(now))
        _settle(staged)
        await copy.write(COPY_TRAILER)


async def _merge_narrowband(conn: Conn, held: Held, mine: dict[tuple[str, str, int], Any],
                            batches: Sequence[DataBatch], out: _Outcome) -> set[Any]:
    """Held narrowband copies of events that the full record now replaces (writes.py)."""
    flags_i = _FLAGS["events"]
    nb = [mine[k][1:11] for k, f in held.items() if merges(f, mine[k][flags_i])]
    if not nb:
        return set()
    done_nb = set(await run_async(conn, merge_program(nb)))
    for k in sorted(done_nb):
        n = mine[k][0]
        out.merged[n] += 1
        record = next(r for r in batches[n].records if r.seq == k[2])
        out.merged_records.append((k[0], k[1], record))
    return done_nb


async def _replace_suspect(conn: Conn, table: str, held: Held,
                           mine: dict[tuple[str, str, int], Any], done_nb: set[Any],
                           out: _Outcome) -> list[tuple[Any, ...]]:
    """Held copies with a suspect time that this call's copy corrects; the rows that did."""
    ts_i, flags_i = _TS[table], _FLAGS[table]
    again = [(*k, mine[k][ts_i], mine[k][flags_i]) for k, f in held.items()
             if k not in done_nb and replaces(f, mine[k][flags_i])]
    if not again:
        return []
    done = await run_async(conn, replace_program(table, again))
    fixed = [mine[k] for k in done]
    for row in fixed:
        out.corrected[row[0]] += 1
    return fixed


def _add_samples(out: _Outcome, staged: tuple[list[int], list[int], list[float]],
                 fresh: list[tuple[Any, ...]], fixed: list[tuple[Any, ...]], held: Held) -> None:
    """New readings with a trusted time go to the aggregates' pending set."""
    if not held:
        out.samples.extend(*staged)
    for part in ((fresh, fixed) if held else (fixed,)):
        for _, _, _, _, pid, ts, num, _, f, _ in part:
            if pid is not None and num is not None and not f & CLOCK_SUSPECT:
                out.samples.add(pid, ts, num)


async def _write_table(conn: Conn, table: str, staged: _Staged, held: Held,
                       batches: Sequence[DataBatch], out: _Outcome, now: int) -> None:
    """COPY one table's new rows in, then merge, correct and count what was already held."""
    by_stream = staged.rows[table]
    if table == "readings" and staged.plain:  # none if a reading is held (`_probe_held`)
        plain = [p for ps in staged.plain.values() for p in ps]
        await _copy_plain(conn, staged, plain, now)
        for p in plain:
            out.inserted[p.n] += len(p.seqs)
    fresh = [row for rows in by_stream.values() for row in rows.values()]
    if held:
        fresh = [row for row in fresh if (row[1], row[2], row[3]) not in held]
    if fresh:
        await _copy_rows(conn, table, fresh)
    flags_i = _FLAGS[table]
    for row in fresh:
        out.inserted[row[0]] += 1
        if row[flags_i] & CENTRAL_TS_SUSPECT:
            out.suspect[row[0]] += 1
    mine = {k: by_stream[k[:2]][k[2]] for k in held}
    done_nb = (await _merge_narrowband(conn, held, mine, batches, out)
               if table == "events" else set())
    fixed = await _replace_suspect(conn, table, held, mine, done_nb, out)
    if table == "readings":
        _settle(staged)
        _add_samples(out, staged.samples, fresh, fixed, held)


async def _write_tail(conn: Conn, staged: _Staged, samples: AggSamples, now: int,
                      defer_latest: tuple[int, int] | None) -> LatestColumns | None:
    """The aggregates' new samples, the gateways' last contact, then each point's latest
    value moved forward where the staged one is newer. With `defer_latest` (the worker's
    token and the write's stamp) the latest values are returned instead, and recorded as
    owed for their gateways (`postgres_latest`)."""
    _settle(staged)  # if no reading was written
    gws = sorted(staged.touched)
    latest = staged.latest.columns()
    async with conn.pipeline():
        if samples:
            await conn.execute(_PENDING, (Int8Array.of(samples.pids), Int8Array.of(samples.tss),
                                          Float8Array.of(samples.vals), len(samples), now))
        await conn.execute(_TOUCH_GATEWAYS,
                           (gws, [staged.touched[g] for g in gws], [now] * len(gws)))
        if defer_latest is not None:
            await conn.execute(_OWE, (*defer_latest, gws))
    if defer_latest is not None:
        return latest
    await write_latest(conn, latest)
    return None


async def write_batches(conn: Conn, batches: Sequence[DataBatch], now: int,
                        point_ids: Mapping[str, Mapping[str, int]], alarm_policy: AlarmPolicy,
                        time_policy: TimePolicy, *,
                        defer_latest: tuple[int, int] | None = None,
                        ) -> tuple[list[WriteResult], list[AlarmChange], LatestColumns | None]:
    """Write `batches` in the caller's transaction; `point_ids` covers every point named.
    With `defer_latest`, the worker's token and the write's stamp (strictly increasing per
    worker), the latest values are not written but returned (`postgres_latest`)."""
    lo, hi = time_policy.bounds(now)
    staged = _stage(batches, point_ids, lo, hi, now)
    out = _Outcome.zeros(len(batches))
    # The streams first: their row locks make this transaction their only writer (module doc).
    before = await run_async(conn, streams_program(staged.tally, now))
    held = await _probe_held(conn, staged, now, before)
    for table, by_stream in staged.rows.items():
        if any(by_stream.values()) or (table == "readings" and staged.plain):
            await _write_table(conn, table, staged, held[table], batches, out, now)
    latest = await _write_tail(conn, staged, out.samples, now, defer_latest)
    # Alarm records move alarms in this same transaction, their locks after the ones above
    # (alarm keys sorted, then incidents by area: see central.alarms.engine).
    changes = await run_async(conn, ingest_program(batches, alarm_policy, now))
    if out.merged_records:
        await run_async(conn, merge_alarms_program(out.merged_records))
    return [WriteResult(gw=b.gw, stream=b.stream, received=len(b.records),
                        inserted=out.inserted[n], clock_suspect=out.suspect[n],
                        corrected=out.corrected[n], merged=out.merged[n])
            for n, b in enumerate(batches)], changes, latest
