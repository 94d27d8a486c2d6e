"""A record resent after retention purged its row (its ack was lost) is held, not stored or
aggregated again (`stream_ranges` still holds its seq), on both backends and both write paths:
the usual batch of plain readings and a batch written record by record."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from central.storage import RetentionPolicy, Storage
from central.storage.aggregates import HOUR_MS
from central.storage.delivery import held_seqs
from central.storage.program import Program, Sql
from protocols.envelope import DataBatch, Flag, Record, RecordKind
from tests.pg import BACKENDS, backend

NOW = time.time_ns() // 1_000_000
DAY = 86_400_000
OLD = NOW - 40 * DAY  # past the default 30 days of raw retention
RECENT = NOW - HOUR_MS
RETENTION = RetentionPolicy(raw_days=30)
# "plain": numeric readings only, the column-by-column write; "records": a text reading and
# an event make the write go record by record.
PATHS = ("plain", "records")


def tel(seq: int, ts: int, value: object = None, flags: Flag = Flag.NONE) -> Record:
    return Record(seq=seq, kind=RecordKind.TELEMETRY, ts_ms=ts + seq * 1000, point="d1/gas",
                  value=float(seq) if value is None else value,  # type: ignore[arg-type]
                  flags=flags)


def old_records(path: str, flags: Flag = Flag.NONE) -> list[Record]:
    """Seqs 1..6, 40 days old; on the "records" path seq 3 is text and seq 6 an event."""
    out = [tel(s, OLD, flags=flags) for s in range(1, 7)]
    if path == "records":
        out[2] = tel(3, OLD, "fault", flags)
        out[5] = Record(seq=6, kind=RecordKind.EVENT, ts_ms=OLD + 6000, point="d1/gas",
                        value=None, attrs={"event": "door_open"})
    return out


def batch(records: list[Record]) -> DataBatch:
    return DataBatch(gw="gw-1", stream="s1", records=tuple(records))


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with backend(request.param, tmp_path) as (st,):
        yield st


def select(sql: str) -> Program[list[tuple[Any, ...]]]:
    rows = yield Sql(sql)
    return rows


async def readings(storage: Storage) -> list[int]:
    rows = await storage.run(lambda: select("SELECT seq FROM readings ORDER BY seq"),
                             write=False)
    return [s for (s,) in rows]


async def hour_counts(storage: Storage) -> dict[int, int]:
    """agg_1h's sample count per bucket, after folding every pending sample in."""
    await storage.flush_aggregates()
    rows = await storage.run(lambda: select("SELECT bucket_ms, count FROM agg_1h"), write=False)
    return {b: c for b, c in rows}


async def stored_then_purged(storage: Storage, records: list[Record]) -> dict[int, int]:
    """Write `records`, fold their samples in, purge their raw rows; agg_1h's counts then."""
    (first,) = await storage.write_batches([batch(records)], now_ms=NOW)
    assert first.inserted == len(records)
    counts = await hour_counts(storage)
    await storage.purge(RETENTION, NOW)
    assert await readings(storage) == []  # the event stays: retention keeps events
    return counts


@pytest.mark.parametrize("path", PATHS)
async def test_resent_purged_batch_is_held_not_stored_again(storage: Storage,
                                                            path: str) -> None:
    """A batch resent after its rows were purged inserts nothing, adds no sample to agg_1h
    and is written (so acked) with every record a duplicate; the delivery view is unchanged."""
    records = old_records(path)
    counts = await stored_then_purged(storage, records)
    assert counts
    held = (await storage.delivery("gw-1")).streams[0].held
    (res,) = await storage.write_batches([batch(records)], now_ms=NOW)
    assert (res.received, res.inserted, res.duplicates) == (6, 0, 6)
    assert await readings(storage) == []
    assert await hour_counts(storage) == counts
    assert (await storage.delivery("gw-1")).streams[0].held == held == 6


@pytest.mark.parametrize("path", PATHS)
async def test_batch_mixing_purged_and_new_seqs_stores_only_the_new(storage: Storage,
                                                                    path: str) -> None:
    """Purged seqs 1..6 resent with new seqs 7..9, and a new batch beside them in the same
    call: only the new records are stored and aggregated."""
    records = old_records(path)
    counts = await stored_then_purged(storage, records)
    new = [tel(s, RECENT) for s in range(7, 10)]
    other = DataBatch(gw="gw-1", stream="s1", records=tuple(tel(s, RECENT)
                                                            for s in range(10, 12)))
    mixed, more = await storage.write_batches([batch(records + new), other], now_ms=NOW)
    assert (mixed.received, mixed.inserted, mixed.duplicates) == (9, 3, 6)
    assert more.inserted == 2
    assert await readings(storage) == [7, 8, 9, 10, 11]
    after = await hour_counts(storage)
    assert {b: c for b, c in after.items() if b in counts} == counts
    assert sum(after.values()) == sum(counts.values()) + 5
    assert (await storage.delivery("gw-1")).streams[0].held == 11


async def test_purged_suspect_copy_is_not_corrected(storage: Storage) -> None:
    """A purged copy with a suspect time has nothing left to correct: its corrected resend is
    held like any other, not stored nor aggregated (chosen rule: purged means held)."""
    counts = await stored_then_purged(storage, old_records("plain", Flag.CLOCK_SUSPECT))
    assert counts == {}
    (res,) = await storage.write_batches([batch(old_records("plain"))], now_ms=NOW)
    assert (res.inserted, res.corrected, res.duplicates) == (0, 0, 6)
    assert await readings(storage) == []
    assert await hour_counts(storage) == {}


async def test_purged_seqs_among_many_gaps_are_held(storage: Storage) -> None:
    """Purged odd seqs (21 held ranges) resent as 23 runs (more than a write probes one by
    one) and then inside one run with the even seqs: only the new seqs are stored."""
    counts = await stored_then_purged(storage, [tel(s, OLD) for s in range(1, 42, 2)])
    (odd,) = await storage.write_batches([batch([tel(s, OLD) for s in range(1, 46, 2)])],
                                         now_ms=NOW)
    assert (odd.received, odd.inserted) == (23, 2)
    (every,) = await storage.write_batches([batch([tel(s, OLD) for s in range(1, 47)])],
                                           now_ms=NOW)
    assert (every.received, every.inserted) == (46, 23)
    assert await readings(storage) == [*range(2, 43, 2), 43, 44, 45, 46]
    assert sum((await hour_counts(storage)).values()) == sum(counts.values()) + 25


def test_held_seqs_are_the_runs_inside_the_ranges() -> None:
    """`held_seqs` walks sorted runs against held ranges given in any order."""
    ranges = {20: 25, 1: 3, 8: 8, 30: 40}
    runs = [(2, 9), (12, 21), (24, 31), (45, 50)]
    assert list(held_seqs(runs, ranges)) == [2, 3, 8, 20, 21, 24, 25, 30, 31]
    assert list(held_seqs([(41, 60)], ranges)) == []
