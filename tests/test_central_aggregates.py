"""1-minute / 1-hour aggregates, retention and series resolution, on both backends: the
aggregates must equal a recomputation from the raw rows whatever the arrival order."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from central.app import create_app
from central.config.settings import Settings
from central.storage import RetentionPolicy, Storage, open_storage
from central.storage.aggregates import HOUR_MS, MINUTE_MS, choose_resolution
from central.storage.program import Program, Sql
from protocols.envelope import DataBatch, Flag, Record, RecordKind
from tests.identity import authorize
from tests.pg import BACKENDS, backend

NOW = time.time_ns() // 1_000_000
DAY = 86_400_000
POINTS = ("d1/gas", "d1/o2", "d2/t")
Row = tuple[Any, ...]


def tel(seq: int, point: str, value: object, ts: int, flags: Flag = Flag.NONE) -> Record:
    return Record(seq=seq, kind=RecordKind.TELEMETRY, ts_ms=ts, point=point,
                  value=value, flags=flags)  # type: ignore[arg-type]


def batch(records: list[Record], stream: str = "s1") -> DataBatch:
    return DataBatch(gw="gw-1", stream=stream, records=tuple(records))


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with backend(request.param, tmp_path) as (st,):
        yield st


def select(sql: str) -> Program[list[Row]]:
    rows = yield Sql(sql)
    return rows


def recompute(raw: list[Row], width: int) -> list[Row]:
    """Aggregates from scratch: numeric readings of trusted time, per (point, bucket)."""
    acc: dict[tuple[int, int], list[Any]] = {}
    for pid, ts, v, flags in raw:
        if pid is None or v is None or flags & int(Flag.CLOCK_SUSPECT):
            continue
        b = acc.setdefault((pid, ts - ts % width), [])
        b.append((ts, v))
    out = []
    for (pid, bucket), xs in sorted(acc.items()):
        vs = [v for _, v in xs]
        last_ts, last_v = max(xs)  # latest time; the larger value on a tie
        out.append((pid, bucket, len(xs), min(vs), max(vs), sum(vs), min(t for t, _ in xs),
                    last_ts, last_v))
    return out


async def aggregates(storage: Storage, table: str) -> list[Row]:
    await storage.flush_aggregates()
    return await storage.run(lambda: select(
        f"SELECT point_id, bucket_ms, count, min, max, sum, first_ts, last_ts, last_value"
        f" FROM {table} ORDER BY point_id, bucket_ms"), write=False)


async def test_aggregates_equal_recomputation_after_duplicates_and_backlog(
        storage: Storage) -> None:
    """Live batches, resends, out-of-order backlog, suspect times and their corrections,
    flushed at odd moments: agg_1m and agg_1h equal a recomputation from the raw rows."""
    rng = random.Random(7)
    start = NOW - 3 * HOUR_MS
    records = []
    for seq in range(1, 901):
        # every 7th shares its time with the point's previous sample: ties for last_value
        ts = start + (seq - 3 if seq % 7 == 0 else seq) * 11_000
        value: object = rng.randrange(-40, 200) / 2  # halves: sums stay exact
        if seq % 97 == 0:
            value = "fault"
        flags = Flag.CLOCK_SUSPECT if seq % 50 == 0 else Flag.NONE
        if seq % 61 == 0:
            ts = NOW + 2 * DAY  # central will judge this one
        records.append(tel(seq, POINTS[seq % 3], value, ts, flags))
    # live from seq 600 on, then the backlog 1..599 newest first in odd chunks, resent often
    live = records[599:]
    for i in range(0, len(live), 40):
        await storage.write_batches([batch(live[i:i + 40])])
    backlog = records[:599]
    cuts = sorted(rng.sample(range(1, 599), 20))
    chunks = [backlog[a:b] for a, b in zip([0, *cuts], [*cuts, 599], strict=True)][::-1]
    for n, chunk in enumerate(chunks):
        group = [batch(chunk)]
        if n % 3 == 0:
            group.append(batch(chunk[: len(chunk) // 2]))  # a resend within the same commit
        await storage.write_batches(group)
        if n % 4 == 1:
            await storage.write_batches([batch(chunks[n - 1])])  # a resend of an old batch
        if n % 5 == 2:
            await storage.flush_aggregates()
    # the edge corrects the suspect ones it flagged itself
    fixes = [tel(r.seq, r.point or "", r.value, r.ts_ms + 5, Flag.HISTORICAL)
             for r in records if r.flags & Flag.CLOCK_SUSPECT]
    await storage.write_batches([batch(fixes), batch(fixes)])
    raw = await storage.run(lambda: select("SELECT point_id, ts_ms, value, flags FROM readings"),
                            write=False)
    assert len(raw) == 900
    minute = await aggregates(storage, "agg_1m")
    hour = await aggregates(storage, "agg_1h")
    assert minute == recompute(raw, MINUTE_MS)
    assert hour == recompute(raw, HOUR_MS)
    assert sum(r[2] for r in hour) == 900 - 9 - 14  # no text, no central-judged time
    assert await storage.flush_aggregates() == 0  # nothing left pending


async def test_purge_removes_only_what_retention_no_longer_keeps(storage: Storage) -> None:
    """Raw rows past raw retention and 1-minute buckets past theirs go (in small chunks);
    younger rows and the kept-for-ever hour buckets stay."""
    ages = (500 * DAY, 40 * DAY, 2 * DAY, HOUR_MS)
    await storage.write_batches([batch([
        tel(i * 3 + k + 1, POINTS[k], float(i), NOW - age)
        for i, age in enumerate(ages) for k in range(3)])])
    await storage.flush_aggregates()
    result = await storage.purge(RetentionPolicy(raw_days=30, minute_days=400, hour_days=0,
                                                 chunk_rows=2), NOW)
    assert result.deleted == {"readings": 6, "agg_1m": 3}
    kept = await storage.run(lambda: select("SELECT ts_ms FROM readings"), write=False)
    assert sorted({NOW - t for (t,) in kept}) == [HOUR_MS, 2 * DAY]
    minutes = await aggregates(storage, "agg_1m")
    assert len(minutes) == 9 and min(r[1] for r in minutes) >= NOW - 41 * DAY
    assert len(await aggregates(storage, "agg_1h")) == 12
    again = await storage.purge(RetentionPolicy(raw_days=30, chunk_rows=2), NOW)
    assert again.deleted == {"readings": 0, "agg_1m": 0}


async def test_purge_deletes_only_at_the_points_that_hold_old_rows(storage: Storage) -> None:
    """A purge looks for the points holding rows past retention in a few statements and runs
    its deleting transactions only at those: not one per point of a city's fleet."""
    from central.storage.aggregates import PURGE_SCAN_POINTS, purge_chunk_program

    await storage.write_batches([batch([tel(1, POINTS[0], 1.0, NOW - 40 * DAY)]
                                       + [tel(k + 2, POINTS[k], 1.0, NOW) for k in range(3)])])
    await storage.run(lambda: select(f"INSERT INTO points (id, gw, device, point) VALUES"
                                     f" ({PURGE_SCAN_POINTS * 2 + 5}, 'gw-1', 'd7', 'p')"
                                     f" RETURNING id"))  # a second and a third scan
    await storage.write_batches([batch([tel(9, "d7/p", 1.0, NOW - 41 * DAY)])])
    (old,), (far,) = await storage.run(lambda: select(
        "SELECT point_id FROM readings WHERE ts_ms < 0 + " + str(NOW - 30 * DAY)
        + " ORDER BY point_id"), write=False)
    at: list[int | None] = []
    run = storage.run

    async def watched(program: Any, *, write: bool = True) -> Any:
        if getattr(program, "func", None) is purge_chunk_program:
            at.append(program.args[2])
        return await run(program, write=write)

    storage.run = watched  # type: ignore[method-assign]
    result = await storage.purge(RetentionPolicy(raw_days=30, minute_days=0, hour_days=0), NOW)
    assert result.deleted == {"readings": 2}
    assert at == [None, old, far]


def test_auto_resolution_by_span() -> None:
    """auto: raw up to 6 h, 1m up to 7 days, 1h beyond."""
    assert choose_resolution(0, 6 * HOUR_MS) == "raw"
    assert choose_resolution(0, 6 * HOUR_MS + 1) == "1m"
    assert choose_resolution(0, 7 * DAY) == "1m"
    assert choose_resolution(0, 7 * DAY + 1) == "1h"


async def test_series_api_picks_resolution_and_returns_buckets(tmp_path: Path) -> None:
    """The series endpoint says which resolution it used and gives avg/min/max/count per
    bucket; a window retention purged of raw rows falls back to 1-minute buckets."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db")
    base = NOW - NOW % HOUR_MS - 3 * HOUR_MS  # an hour boundary three hours ago
    old = base - 45 * DAY  # older than raw retention
    async with open_storage(settings.db_url) as st:
        await st.write_batches([batch([
            tel(1, "d1/gas", 1.0, base + 1000), tel(2, "d1/gas", 3.0, base + 2000),
            tel(3, "d1/gas", 8.0, base + MINUTE_MS + 5), tel(4, "d1/gas", 2.0, old + 10),
            tel(5, "d1/gas", 4.0, old + 20)])])
        await st.purge(RetentionPolicy(raw_days=30), NOW)
    app = create_app(settings, run_ingest=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        await authorize(app, c)
        url = "/api/points/gw-1:d1:gas/series"

        async def get(**params: object) -> dict[str, Any]:
            r = await c.get(url, params=params)
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

        raw = await get(**{"from": base, "to": base + HOUR_MS})
        assert raw["resolution"] == "raw"
        assert [s["value"] for s in raw["samples"]] == [1.0, 3.0, 8.0]
        minute = await get(**{"from": base, "to": base + DAY})
        assert minute["resolution"] == "1m"
        assert minute["samples"] == [
            {"ts_ms": base, "value": 2.0, "min": 1.0, "max": 3.0, "count": 2},
            {"ts_ms": base + MINUTE_MS, "value": 8.0, "min": 8.0, "max": 8.0, "count": 1}]
        hour = await get(**{"from": base - 20 * DAY, "to": base + DAY})
        assert hour["resolution"] == "1h"
        assert hour["samples"] == [{"ts_ms": base, "value": 4.0, "min": 1.0, "max": 8.0,
                                    "count": 3}]
        forced = await get(**{"from": base, "to": base + DAY, "resolution": "raw", "limit": 2})
        assert forced["resolution"] == "raw" and forced["truncated"]
        purged = await get(**{"from": old, "to": old + HOUR_MS})
        assert purged["resolution"] == "1m"
        assert purged["samples"][0]["count"] == 2 and purged["samples"][0]["value"] == 3.0
        bad = await c.get(url, params={"resolution": "5m"})
        assert bad.status_code == 422


async def test_history_upkeep_applies_settings_and_counts(tmp_path: Path) -> None:
    """The storage applies the settings' time tolerance (given at construction); start_history's
    flush and purge feed the metrics."""
    from central.health.metrics import Metrics
    from central.storage.history import start_history, time_policy_from

    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db", future_tolerance_s=10,
                        retention_raw_days=1)
    metrics = Metrics()
    async with open_storage(settings.db_url, time_policy=time_policy_from(settings)) as st:
        runtime = start_history(settings, st, metrics, run=False)
        (res,) = await st.write_batches([batch([
            tel(1, "d1/gas", 1.0, NOW + 60_000), tel(2, "d1/gas", 2.0, NOW - 2 * DAY),
            tel(3, "d1/gas", 3.0, NOW - 1000)])], now_ms=NOW)
        assert res.clock_suspect == 1
        assert await runtime.history.flush() == 2 and metrics.samples_aggregated == 2
        await runtime.history.purge(NOW)
        assert metrics.purged["readings"] == 1
        await runtime.stop()
    text = metrics.render()
    assert 'fieldlink_central_purged_rows_total{table="readings"} 1.0' in text
    assert "fieldlink_central_samples_aggregated_total 2.0" in text


async def test_a_flush_folds_what_was_pending_when_it_began(storage: Storage) -> None:
    """A flush folds the sample sets pending when it starts and leaves those written while it
    runs for the next one: chasing them, it folded each block again every commit or two."""
    loop = asyncio.get_running_loop()
    began = asyncio.Event()
    flush = storage._flush_program

    def first_step(upto: int) -> Program[int]:  # runs on the database's thread
        loop.call_soon_threadsafe(began.set)
        return flush(upto)

    storage._flush_program = first_step  # type: ignore[method-assign]
    seq = 0

    async def write(n: int) -> None:
        nonlocal seq
        for _ in range(n):  # one write transaction, one pending set, per batch
            seq += 1
            await storage.write_batches([batch([tel(seq, POINTS[0], 1.0, NOW - seq * 1000)])])

    await write(3)
    running = asyncio.create_task(storage.flush_aggregates())
    await began.wait()
    await write(5)
    assert await running == 3
    assert await storage.flush_aggregates() == 5
    assert (await aggregates(storage, "agg_1h"))[0][2] == 8


async def test_a_spread_flush_paces_its_transactions_by_the_samples_folded(
        storage: Storage) -> None:
    """With `spread_s` a flush starts each transaction when the share of the pending samples
    folded so far is due, so an interval's samples do not hold the database in one burst;
    after the last one it does not wait."""
    for w in range(3):  # three write transactions: three pending rows of 10 samples
        await storage.write_batches([batch([tel(w * 10 + i + 1, POINTS[0], 1.0,
                                                NOW - (w * 10 + i) * 1000) for i in range(10)])])
    starts: list[float] = []
    flush = storage._flush_program

    def one_row_each(upto: int) -> Program[int]:
        starts.append(time.monotonic())
        return flush(upto, 1)  # max_pending: one row per transaction, on either backend

    storage._flush_program = one_row_each  # type: ignore[method-assign]
    began = time.monotonic()
    assert await storage.flush_aggregates(spread_s=0.6) == 30
    at = [t - began for t in starts]
    assert len(at) == 4  # three rows, then the call that finds nothing
    assert at[1] >= 0.2 and at[2] >= 0.4  # a third of 0.6 s per third of the samples
    assert at[3] - at[2] < 0.2  # nothing to wait for after the last


async def test_a_read_after_a_spread_flush_folds_what_came_during_it(storage: Storage) -> None:
    """A spread flush counts as having folded what was pending when it began, not when it
    ended: a read right after it still folds the samples written meanwhile."""
    for w in range(3):
        await storage.write_batches([batch([tel(w + 1, POINTS[0], 1.0, NOW - 60_000 + w)])])
    flush = storage._flush_program
    storage._flush_program = lambda upto: flush(upto, 1)  # type: ignore[method-assign]
    storage.read_flush_age_s = 0.5
    running = asyncio.create_task(storage.flush_aggregates(spread_s=1.2))
    await asyncio.sleep(0.1)
    await storage.write_batches([batch([tel(9, POINTS[0], 5.0, NOW - 59_000)])])
    assert await running == 3
    got = await storage.buckets(f"gw-1:{POINTS[0].replace('/', ':')}", "1m", NOW - HOUR_MS,
                                NOW + MINUTE_MS, 10)
    assert sum(b.count for b in got) == 4


async def test_sqlite_flush_takes_a_bounded_number_of_samples_per_transaction(
        tmp_path: Path) -> None:
    """The SQLite flush folds pending sets up to its sample bound per transaction (at least
    one set), so a drained backlog does not hold the database thread for seconds; all of
    them are folded in the end, each once."""
    from central.storage.aggregates import flush_program

    async with open_storage(f"sqlite:///{tmp_path}/c.db") as st:
        for g in range(3):  # three write transactions: three pending sets of 10 samples
            await st.write_batches([batch([tel(g * 10 + i + 1, POINTS[0], float(i),
                                               NOW - HOUR_MS + (g * 10 + i) * 1000)
                                           for i in range(10)])])
        folded = []
        while n := await st.run(lambda: flush_program(1 << 62, max_samples=15)):
            folded.append(n)
        assert folded == [10, 10, 10]
        ((count,),) = await st.run(lambda: select("SELECT sum(count) FROM agg_1m"))
        assert count == 30


async def test_sqlite_flush_folds_one_block_of_points_over_every_write(tmp_path: Path) -> None:
    """Pending samples are kept per block of point ids: a flush folds one block's samples
    from every write since the last flush (many samples per bucket), each sample once; a
    row with samples of another block (as before the blocks, part 0) still folds right."""
    from central.storage.aggregates import PART_BITS, AggSamples

    far = 3 << PART_BITS  # a point id in block 3
    async with open_storage(f"sqlite:///{tmp_path}/c.db") as st:
        await st.run(lambda: select(f"INSERT INTO points (id, gw, device, point) VALUES"
                                    f" (1, 'gw-1', 'd1', 'gas'), (2, 'gw-1', 'd1', 'o2'),"
                                    f" ({far}, 'gw-1', 'd9', 'far') RETURNING id"))
        seq = 0
        for _ in range(4):  # four writes, each with samples of block 0 and block 3
            recs = []
            for point in (POINTS[0], "d9/far", POINTS[1]):
                seq += 1
                recs.append(tel(seq, point, float(seq), NOW - HOUR_MS + seq * 1000))
            await st.write_batches([batch(recs)])
        old = AggSamples()  # a row from before the blocks, holding block 3's samples
        old.extend([far, far], [NOW - HOUR_MS, NOW - HOUR_MS + 1], [0.5, 1.5])
        await st.run(lambda: select("INSERT INTO agg_pending (samples, n, created_ms) VALUES"
                                    f" (x'{old.pack().hex()}', 2, 0) RETURNING id"))
        parts = await st.run(lambda: select("SELECT part, n FROM agg_pending ORDER BY id"))
        assert parts == [(0, 2), (3, 1)] * 4 + [(0, 2)]
        folded = []
        while n := await st.run(flush_program_default):
            folded.append(n)
        assert folded == [8 + 2, 4]  # block 0 (with the old row), then block 3
        rows = await st.run(lambda: select(f"SELECT count(*), sum(count) FROM agg_1m"
                                           f" WHERE point_id = {far}"))
        assert rows[0][1] == 4 + 2
        raw = await st.run(lambda: select("SELECT point_id, ts_ms, value, flags FROM readings"),
                           write=False)
        minute = await aggregates(st, "agg_1m")
        assert sum(r[2] for r in minute) == len(raw) + 2


def flush_program_default() -> Program[int]:
    from central.storage.aggregates import flush_program

    return flush_program(1 << 62)


async def test_pending_samples_survive_the_migration_to_ids_never_reused(
        tmp_path: Path) -> None:
    """A database from before `m009` keeps its pending samples, ids and blocks through the
    migration and folds them; after it, deleting the newest pending rows frees no id."""
    import sqlite3

    from central.storage.aggregates import AggSamples
    from central.storage.sqlite_schema import MIGRATIONS, m009_pending_ids_never_reused

    path = tmp_path / "c.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, fn in enumerate(MIGRATIONS[:MIGRATIONS.index(m009_pending_ids_never_reused)],
                                 start=1):
        fn(conn)
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute("INSERT INTO points (id, gw, device, point) VALUES (7, 'gw-1', 'd1', 'gas')")
    old = AggSamples()
    old.extend([7, 7], [NOW - 2000, NOW - 1000], [1.0, 3.0])
    conn.execute("INSERT INTO agg_pending (id, samples, n, created_ms, part) VALUES"
                 " (41, ?, 2, 0, 0)", (old.pack(),))
    conn.close()
    async with open_storage(f"sqlite:///{path}") as st:
        assert await st.run(lambda: select("SELECT id, n, part FROM agg_pending")) == [(41, 2, 0)]
        assert await st.flush_aggregates() == 2
        assert (await aggregates(st, "agg_1m"))[0][2:6] == (2, 1.0, 3.0, 4.0)
        await st.write_batches([batch([tel(1, POINTS[0], 5.0, NOW)])])
        assert await st.run(lambda: select("SELECT id FROM agg_pending")) == [(42,)]


async def test_a_read_of_buckets_folds_only_its_points_block(tmp_path: Path) -> None:
    """Reading a point's buckets folds the pending samples of that point's block (SQLite) and
    leaves the rest of the fleet's for the paced flush; the read still sees every sample."""
    from central.storage.aggregates import PART_BITS

    async with open_storage(f"sqlite:///{tmp_path}/c.db") as st:
        await st.run(lambda: select("INSERT INTO points (id, gw, device, point) VALUES"
                                    f" ({3 << PART_BITS}, 'gw-1', 'd3', 'a'),"
                                    f" ({5 << PART_BITS}, 'gw-1', 'd5', 'b') RETURNING id"))
        await st.write_batches([batch([tel(i + 1, f"d{3 + 2 * (i % 2)}/{'ab'[i % 2]}",
                                           float(i), NOW - 60_000 + i) for i in range(6)])])
        got = await st.buckets("gw-1:d3:a", "1m", NOW - HOUR_MS, NOW + MINUTE_MS, 10)
        assert sum(b.count for b in got) == 3 and sum(b.sum for b in got) == 0 + 2 + 4
        left = await st.run(lambda: select("SELECT part, n FROM agg_pending"), write=False)
        assert left == [(5, 3)]
