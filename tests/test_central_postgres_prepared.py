"""PostgreSQL stages a group of batches before its transaction (`prepare_write`), while the
group before is written: what it staged is used only if it still holds. The readings'
`received_ms` shows which staging a write used: the prepared one was made at T1, the write
is called at T2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from central.storage import Storage, UnstorableValueError
from central.storage.program import Program, Sql
from protocols import envelope as env
from protocols.envelope import DataBatch, Record, RecordKind
from tests.pg import backend

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
