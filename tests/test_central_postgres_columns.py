"""PostgreSQL's column-by-column write of plain readings (central/storage/postgres_plain.py)
ends the same as SQLite's for a random mix of batches: version 2 (columns) and version 1
(records), resent ones, seqs repeated in one call, shuffled seqs, backlog times, ties, suspect
times, text values and events (which take the record-by-record path) in the same calls."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from central.storage import Storage, WriteResult, open_storage, postgres_write
from central.storage.program import Program, Sql
from protocols import envelope as env
from protocols.envelope import Birth, DataBatch, DeviceInfo, Flag, PointInfo, Record, RecordKind
from tests.helpers import until
from tests.pg import backend, pg_schema

pytestmark = pytest.mark.postgres

NOW = 1_700_000_000_000
STREAMS = [("gw-1", "s1"), ("gw-1", "s2"), ("gw-2", "s1")]  # gw-1's points in two streams


def _record(gw: str, stream: str, seq: int, corrected: bool) -> Record:
    """The record an edge sends under (gw, stream, seq): the same every time it is resent,
    except that a suspect time may come corrected. Most seqs are plain numeric readings;
    every fourth run of 50 mixes in events, texts and suspect or implausible times, and every
    fourth run of 60 is backlog (older times)."""
    rng = random.Random(f"{gw}/{stream}/{seq}")
    point = f"d{seq % 3}/p{seq % 7}"
    ts = NOW - (3_600_000 if (seq // 60) % 4 == 1 else 0) + (seq // 2) * 1000  # ties on time
    value: float | int | bool = rng.choice([rng.uniform(-5, 5), rng.randrange(100), True])
    roll = rng.random() if (seq // 50) % 4 == 0 else 1.0
    if roll < 0.1:
        return Record(seq, RecordKind.EVENT, ts, point, 1.0, attrs={"why": "test"})
    if roll < 0.2:
        return Record(seq, RecordKind.TELEMETRY, ts, point, "text")
    if roll < 0.3:
        return (Record(seq, RecordKind.TELEMETRY, ts + 500, point, value) if corrected else
                Record(seq, RecordKind.TELEMETRY, ts, point, value, Flag.CLOCK_SUSPECT))
    if roll < 0.35:
        return Record(seq, RecordKind.TELEMETRY, NOW + 86_400_000, point, value)  # future
    return Record(seq, RecordKind.TELEMETRY, ts, point, value,
                  Flag.HISTORICAL if rng.random() < 0.5 else Flag.NONE)


def _batch(rng: random.Random, sent: dict[tuple[str, str], int],
           before: dict[tuple[str, str], int]) -> DataBatch:
    """A new batch of a random stream, or (one in three) a resend from its start; `before`:
    the highest seq of each stream sent in earlier calls (only those may come corrected)."""
    gw, stream = rng.choice(STREAMS)
    top = sent.get((gw, stream), 0)
    first = rng.randrange(1, top + 1) if top and rng.random() < 0.3 else top + 1
    n = rng.randrange(1, 40)
    seqs = list(range(first, first + n))
    if rng.random() < 0.2:
        rng.shuffle(seqs)
    if rng.random() < 0.1:
        seqs.append(seqs[0])  # a seq twice in the batch
    sent[(gw, stream)] = max(top, first + n - 1)
    old = before.get((gw, stream), 0)
    batch = DataBatch(gw=gw, stream=stream, records=tuple(
        _record(gw, stream, s, corrected=s <= old) for s in seqs))
    if rng.random() < 0.6:  # as central decodes version 2: columns
        decoded = env.decode(env.encode(batch, version=2))
        assert isinstance(decoded, DataBatch) and decoded.columns is not None
        return decoded
    return batch


def _state_program() -> Program[dict[str, Any]]:
    point = "p.gw, p.device, p.point"
    out: dict[str, Any] = {}
    out["readings"] = yield Sql(
        f"SELECT r.gw, r.stream, r.seq, {point}, r.ts_ms, r.value, r.text, r.flags"
        " FROM readings r LEFT JOIN points p ON p.id = r.point_id ORDER BY 1, 2, 3")
    out["events"] = yield Sql("SELECT gw, stream, seq, kind, ts_ms, value, flags FROM events"
                              " ORDER BY 1, 2, 3")
    out["latest"] = yield Sql(f"SELECT {point}, l.ts_ms, l.value, l.text FROM latest l"
                              " JOIN points p ON p.id = l.point_id ORDER BY 1, 2, 3")
    out["streams"] = yield Sql("SELECT gw, stream, held, max_seq FROM streams ORDER BY 1, 2")
    out["ranges"] = yield Sql("SELECT gw, stream, first_seq, last_seq FROM stream_ranges"
                              " ORDER BY 1, 2, 3")
    out["agg"] = yield Sql(f"SELECT {point}, a.bucket_ms, a.count, a.sum, a.min, a.max,"
                           " a.first_ts, a.last_ts, a.last_value FROM agg_1m a"
                           " JOIN points p ON p.id = a.point_id ORDER BY 1, 2, 3, 4")
    return out


async def _play(st: Storage, calls: list[list[DataBatch]]) -> tuple[list[WriteResult],
                                                                      dict[str, Any]]:
    results = []
    for call in calls:
        results += await st.write_batches(call, now_ms=NOW)
    await st.flush_aggregates()
    await st.settle_latest()
    state = await st.run(_state_program, write=False)
    # Sums in the order each backend adds the samples up: equal to the last few bits.
    state["agg"] = [(*a[:5], round(a[5], 9), *a[6:]) for a in state["agg"]]
    return results, state


@pytest.mark.parametrize("latest_s", [0, 0.5], ids=["latest-in-txn", "latest-held"])
@pytest.mark.parametrize("seed", range(6))
async def test_column_write_ends_like_sqlite(seed: int, latest_s: float, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same calls on both backends give the same per-batch counts and the same rows,
    latest values, held ranges and aggregates; nothing is stored twice; and the column path
    really wrote some of it (else the record-by-record path would pass this alone). On
    PostgreSQL, with latest values written in each transaction and held back
    (`postgres_latest`)."""
    copied: list[int] = []
    real_copy = postgres_write._copy_plain

    async def counting_copy(conn: Any, staged: Any, plain: Any, now: int) -> Any:
        copied.append(len(plain))
        return await real_copy(conn, staged, plain, now)

    monkeypatch.setattr(postgres_write, "_copy_plain", counting_copy)
    rng = random.Random(seed)
    sent: dict[tuple[str, str], int] = {}
    calls = []
    for _ in range(25):
        before = dict(sent)
        call = [_batch(rng, sent, before) for _ in range(rng.randrange(1, 6))]
        if rng.random() < 0.2:
            call.append(call[0])  # the same batch twice in one call
        calls.append(call)
    async with backend("sqlite", tmp_path) as (lite,), \
            backend("postgres", tmp_path, latest_interval_s=latest_s) as (pg,):
        want = await _play(lite, calls)
        got = await _play(pg, calls)
    assert got[0] == want[0]
    for table, rows in want[1].items():
        assert got[1][table] == rows, table
    keys = [r[:3] for r in got[1]["readings"]]
    assert len(keys) == len(set(keys))
    assert sum(copied) > 0, "no batch went the column path"


@pytest.mark.parametrize("version", [1, 2])
async def test_latest_tie_between_batches_keeps_the_first(version: int, tmp_path: Path) -> None:
    """Two batches of one call (two streams of a gateway) with a point's reading at the same
    time: its latest value is the first batch's, as SQLite keeps it."""
    def batch(stream: str, value: float) -> DataBatch:
        b = DataBatch(gw="gw-1", stream=stream, records=(
            Record(1, RecordKind.TELEMETRY, NOW - 10_000, "d/p1", value),))
        got = env.decode(env.encode(b, version=version)) if version == 2 else b
        assert isinstance(got, DataBatch)
        return got

    for kind in ("sqlite", "postgres"):
        async with backend(kind, tmp_path / kind) as (st,):
            await st.write_batches([batch("s1", 1.0), batch("s2", 2.0)], now_ms=NOW)
            assert [(p.point, p.latest and p.latest.value)
                    for p in await st.latest_values("gw-1")] == [("p1", 1.0)], kind


async def _waiting(observer: psycopg.AsyncConnection[Any], app: str, n: int,
                   writes: list[asyncio.Task[list[WriteResult]]]) -> bool:
    """True once `n` of the workers' connections (`application_name` `app`) wait for a lock;
    none of their `writes` may end meanwhile (the test holds a row each of them needs)."""
    assert not any(w.done() for w in writes), "a write ended without the gateway's row"
    cur = await observer.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = %s AND wait_event_type = 'Lock'", (app,))
    row = await cur.fetchone()
    return row is not None and row[0] >= n


async def test_workers_writing_streams_of_one_gateway_keep_the_newest_latest(
        tmp_path: Path) -> None:
    """Three workers each writing its own stream of one gateway at once, the same points
    (born before, so none has a latest value yet), the third always newest: every record
    once, and each point's latest value is the third stream's (a worker inserting a latest
    value must not miss another's, nor deadlock on them).

    The race is forced every round: the test holds the gateway's row while the workers
    write, so all three are inside their transactions, readings written and uncommitted,
    before any can touch the gateway; the newest stream comes last, once the other two are
    waiting. A write that set latest values before locking the gateway's row would find no
    latest row of the others' (uncommitted), insert its own and lose it to theirs."""
    keys = [f"d/p{i}" for i in range(400)]
    birth = Birth(gw="gw-1", stream="s0", boot_id="b", version="1", devices=(
        DeviceInfo(id="d", profile="p", profile_hash="h", points=tuple(
            PointInfo(ordinal=i, key=k, name_zh=k, unit="") for i, k in enumerate(keys))),))

    def batch(stream: int, first: int) -> DataBatch:
        b = DataBatch(gw="gw-1", stream=f"s{stream}", records=tuple(
            Record(s, RecordKind.TELEMETRY, NOW - 100_000 + s * 10 + stream, keys[s % 400],
                   float(stream)) for s in range(first, first + 50)))
        got = env.decode(env.encode(b, version=2))
        assert isinstance(got, DataBatch)
        return got

    app = f"fl_race_{uuid.uuid4().hex[:8]}"
    with pg_schema() as url:
        async with contextlib.AsyncExitStack() as stack:
            # Latest values in each write's transaction: the race this forces is that
            # path's (held-back values are written under the gateway's row the same way).
            storages = [await stack.enter_async_context(
                open_storage(f"{url}&application_name={app}", latest_interval_s=0))
                for _ in range(3)]
            holder = await stack.enter_async_context(
                await psycopg.AsyncConnection.connect(url, autocommit=True))
            observer = await stack.enter_async_context(
                await psycopg.AsyncConnection.connect(url, autocommit=True))
            await storages[0].record_birth("gw-1", birth)

            async def race(first: int) -> list[int]:
                """One round: every worker writes seqs `first`.. (50 points no worker has
                written yet) while the test holds the gateway's row; inserted per worker."""
                async with holder.transaction():
                    # What the write's upsert of the gateway takes, so nothing before it waits.
                    await holder.execute("SELECT 1 FROM gateways WHERE gw = 'gw-1'"
                                         " FOR NO KEY UPDATE")
                    writes = [asyncio.create_task(st.write_batches([batch(i, first)]))
                              for i, st in enumerate(storages[:2])]
                    await until(lambda: _waiting(observer, app, 2, writes),
                                "two workers waiting", interval=0.01)
                    writes.append(asyncio.create_task(storages[2].write_batches(
                        [batch(2, first)])))
                    await until(lambda: _waiting(observer, app, 3, writes),
                                "three workers waiting", interval=0.01)
                return [sum(r.inserted for r in results)
                        for results in await asyncio.gather(*writes)]

            inserted = [sum(n) for n in zip(*[await race(1 + k * 50) for k in range(8)],
                                            strict=True)]
            assert inserted == [400, 400, 400]
            assert (await storages[0].count_records()).readings == 1200
            assert {p.latest and p.latest.value
                    for p in await storages[1].latest_values("gw-1")} == {2.0}
