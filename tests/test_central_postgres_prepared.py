"""PostgreSQL stages a group of batches before its transaction (`prepare_write`), while the
group before is written: what it staged is used only if it still holds. The readings'
`received_ms` shows which staging a write used: the prepared one was made at T1, the write
is called at T2."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from psycopg import AsyncConnection

from central.storage import Storage, UnstorableValueError, open_storage
from central.storage.postgres import _Prepared
from central.storage.postgres_binary import register_dumpers
from central.storage.postgres_write import write_latest
from central.storage.program import Program, Sql
from protocols import envelope as env
from protocols.envelope import DataBatch, Record, RecordKind
from tests.pg import backend, pg_schema

pytestmark = pytest.mark.postgres

T1 = 1_700_000_000_000
T2 = T1 + 5_000


def _batch(gw: str, first: int, n: int = 20, point: str = "d/p") -> DataBatch:
    b = DataBatch(gw=gw, stream="s", records=tuple(
        Record(s, RecordKind.TELEMETRY, T1 - 60_000 + s, f"{point}{s % 4}", float(s))
        for s in range(first, first + n)))
    got = env.decode(env.encode(b, version=2))
    assert isinstance(got, DataBatch)
    return got


def _received(gw: str) -> Program[set[int]]:
    rows = yield Sql("SELECT DISTINCT received_ms FROM readings WHERE gw = ?", (gw,))
    return {r[0] for r in rows}


async def _received_by(st: Storage, gw: str) -> set[int]:
    return await st.run(lambda: _received(gw), write=False)


def _failing() -> Program[None]:
    yield Sql("SELECT 1")
    raise ValueError("injected: this transaction rolls back")


async def _write(st: Storage, call: list[DataBatch], prepared: Any) -> int:
    results = await st.write_batches(call, now_ms=T2, prepared=prepared)
    return sum(r.inserted for r in results)


async def test_prepared_write_is_used_while_it_holds(tmp_path: Path) -> None:
    """Staged ahead once the gateway's point ids are cached, and the write uses it (the
    records received when staged, the gateway seen when written)."""
    async with backend("postgres", tmp_path) as (st,):
        assert st.prepare_write([_batch("gw-1", 1)], now_ms=T1) is None  # no ids cached yet
        await st.write_batches([_batch("gw-1", 1)], now_ms=T1)  # caches gw-1's ids

        call = [_batch("gw-1", 21), _batch("gw-2", 1)]  # gw-2's ids unknown: not prepared
        assert st.prepare_write(call, now_ms=T1) is None

        call = [_batch("gw-1", 21)]
        prepared = st.prepare_write(call, now_ms=T1)
        assert prepared is not None
        assert await _write(st, call, prepared) == 20
        assert await _received_by(st, "gw-1") == {T1}
        # The gateway was last seen when written: a state stored just before is not newer.
        assert (await st.get_gateway("gw-1")).last_seen_ms == T2


async def test_a_rollback_after_preparing_means_staging_again(tmp_path: Path) -> None:
    """A rollback may take away ids the prepared staging used (made by a transaction that
    was still open when it was staged): the write stages again."""
    async with backend("postgres", tmp_path) as (st,):
        await st.write_batches([_batch("gw-1", 1)], now_ms=T1)
        call = [_batch("gw-1", 21)]
        prepared = st.prepare_write(call, now_ms=T1)
        assert prepared is not None
        with pytest.raises(UnstorableValueError):
            await st.run(_failing)
        assert await _write(st, call, prepared) == 20
        assert await _received_by(st, "gw-1") == {T1, T2}


async def test_a_call_that_is_not_the_prepared_one_is_staged_again(tmp_path: Path) -> None:
    """The ingest may drop batches after preparing (a retired gateway's): the write is of
    other batches, so it stages them itself, even if the list prepared is changed in place."""
    async with backend("postgres", tmp_path) as (st,):
        await st.write_batches([_batch("gw-1", 1), _batch("gw-2", 1)], now_ms=T1)
        call = [_batch("gw-1", 21), _batch("gw-2", 21)]
        prepared = st.prepare_write(call, now_ms=T1)
        assert prepared is not None
        del call[1:]
        assert await _write(st, call, prepared) == 20
        assert await _received_by(st, "gw-1") == {T1, T2}
        assert await _received_by(st, "gw-2") == {T1}


async def test_a_value_staging_refuses_is_left_to_the_write(tmp_path: Path) -> None:
    """Staging ahead runs in the ingest's receive loop, outside the transaction that turns a
    bad value into `UnstorableValueError` (the subscriber then isolates the record): it must
    not raise, whatever a batch holds (here a seq the decoder would have refused)."""
    async with backend("postgres", tmp_path) as (st,):
        await st.write_batches([_batch("gw-1", 1)], now_ms=T1)
        bad = DataBatch(gw="gw-1", stream="s", records=(
            Record(2**63, RecordKind.TELEMETRY, T1 - 1, "d/p0", 1.0),))
        assert st.prepare_write([bad], now_ms=T1) is None
        with pytest.raises(UnstorableValueError):
            await st.write_batches([bad], now_ms=T2)
        assert await _write(st, [_batch("gw-1", 21)], None) == 20


class _PausedAfterUpdate:
    """A real connection that stops after its first statement (the latest values' UPDATE)
    until `go` is set: what a second worker's write does in between is then certain."""

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self.conn, self.paused, self.go = conn, asyncio.Event(), asyncio.Event()

    async def execute(self, *args: Any) -> Any:
        cur = await self.conn.execute(*args)
        if not self.paused.is_set():
            self.paused.set()
            await self.go.wait()
        return cur


async def test_latest_values_written_beside_keep_the_newest_of_two_workers() -> None:
    """Two workers' latest values for points that have none yet: the newer one finds no row
    to update, the older one is inserted meanwhile, then the newer one's insert must replace
    it (with DO NOTHING the older value would stay)."""
    def batch(first: int, value: float) -> DataBatch:
        return DataBatch(gw="gw-1", stream="s", records=tuple(
            Record(s, RecordKind.TELEMETRY, T1 - 60_000 + s, f"d/p{s % 4}", value)
            for s in range(first, first + 4)))

    with pg_schema() as url:
        async with open_storage(url) as st:
            await st.write_batches([batch(1, 0.0)], now_ms=T1)  # the ids; latest at seq 1..4
            await st.run(lambda: _clear_latest(), write=True)
            newer = st.prepare_write([batch(9, 2.0)], now_ms=T1)
            older = st.prepare_write([batch(5, 1.0)], now_ms=T1)
            assert isinstance(newer, _Prepared) and isinstance(older, _Prepared)
            async with await AsyncConnection.connect(url, autocommit=True) as a, \
                    await AsyncConnection.connect(url, autocommit=True) as b:
                register_dumpers(a)
                register_dumpers(b)
                paused = _PausedAfterUpdate(a)

                async def write_newer() -> None:
                    async with a.transaction():
                        await write_latest(cast(Any, paused), newer.staged)

                task = asyncio.create_task(write_newer())
                await paused.paused.wait()
                async with b.transaction():
                    await write_latest(b, older.staged)
                paused.go.set()
                await task
            assert {p.latest and p.latest.value for p in await st.latest_values("gw-1")} == {2.0}


def _clear_latest() -> Program[None]:
    yield Sql("DELETE FROM latest")
