"""PostgreSQL's held-back latest values (`central.storage.postgres_latest`): a worker writes
them after their readings, its own readers see them at once, another worker's within the
interval, and a worker killed while holding them loses nothing: the gateways it marked are
repaired from their readings by the next worker to open the database."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from central.storage import Storage, open_storage, postgres_latest, postgres_write
from central.storage.postgres import PostgresStorage
from central.storage.postgres_latest import PendingLatest
from protocols.envelope import Birth, DataBatch, DeviceInfo, PointInfo, Record, RecordKind
from tests.fakegw import FakeGateway, ThreadedFleet, expected_record
from tests.fleet import Central
from tests.helpers import Mosquitto, until, wait_for
from tests.pg import pg_schema

pytestmark = pytest.mark.postgres

NOW = 1_700_000_000_000
KEYS = [f"d/p{i}" for i in range(5)]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_schema("fl_latest") as url:
        yield url


def rows(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def latest_table(url: str, gw: str) -> dict[str, float]:
    """`gw`'s rows in `latest`, as they are in the table."""
    return {f"{d}/{p}": v for d, p, v in rows(
        url, "SELECT p.device, p.point, l.value FROM latest l JOIN points p ON p.id = l.point_id"
        " WHERE p.gw = %s", (gw,))}


def owed(url: str) -> set[tuple[str, int]]:
    """(gateway, worker token) of every latest value held back."""
    return {(gw, token) for gw, token in rows(url, "SELECT gw, token FROM latest_owed")}


def batch(gw: str, first: int, value: float, n: int = 5, stream: str = "s1") -> DataBatch:
    return DataBatch(gw=gw, stream=stream, records=tuple(
        Record(s, RecordKind.TELEMETRY, NOW + s * 1000, KEYS[s % len(KEYS)], value + s)
        for s in range(first, first + n)))


async def values(st: Storage, gw: str) -> dict[str, float | None]:
    return {f"{p.device}/{p.point}": p.latest and p.latest.value
            for p in await st.latest_values(gw)}


def birth(gw: str) -> Birth:
    return Birth(gw=gw, stream="s1", boot_id="b", version="1", devices=(DeviceInfo(
        id="d", profile="p", profile_hash="h", points=tuple(
            PointInfo(ordinal=i, key=k, name_zh=k, unit="") for i, k in enumerate(KEYS))),))


def test_pending_latest_keeps_the_newest_and_a_failed_flush_wins_ties() -> None:
    """Newest per point, the first on a tie; what a failed flush puts back is older than
    anything added since, so it wins a tie and loses to a newer value."""
    p = PendingLatest()
    p.add(([1, 2], [10, 10], [1.0, 2.0], [None, None]), ["gw-a"], 100)
    p.add(([1, 2], [10, 11], [9.0, 3.0], [None, None]), ["gw-a"], 90)
    assert p.values == {1: (10, 1.0, None), 2: (11, 3.0, None)} and p.due == {"gw-a": 100}
    taken = p.take()
    assert len(p) == 0 and p.due == {}
    p.add(([1, 2, 3], [10, 12, 5], [7.0, 4.0, 5.0], [None, None, "x"]), ["gw-b"], 200)
    p.put_back(taken)
    assert p.values == {1: (10, 1.0, None), 2: (12, 4.0, None), 3: (5, 5.0, "x")}
    assert p.due == {"gw-a": 100, "gw-b": 200}


async def test_a_worker_holds_latest_values_reads_its_own_and_writes_them_in_time(
        pg_url: str) -> None:
    """The write leaves `latest` alone and marks its gateway with the worker's token; the
    worker's own read writes them first; another worker sees them within the interval."""
    async with open_storage(pg_url, latest_interval_s=30) as a, \
            open_storage(pg_url, latest_interval_s=0) as b:
        assert isinstance(a, PostgresStorage)
        await a.record_birth("gw-1", birth("gw-1"), now_ms=NOW)
        await a.write_batches([batch("gw-1", 1, 0.0)], now_ms=NOW)
        assert latest_table(pg_url, "gw-1") == {}
        assert owed(pg_url) == {("gw-1", a._token)}
        assert set((await values(b, "gw-1")).values()) == {None}  # not written yet
        assert await values(a, "gw-1") == {k: float(s) for s, k in
                                           ((s, KEYS[s % 5]) for s in range(1, 6))}
        assert owed(pg_url) == set()
        assert latest_table(pg_url, "gw-1") == await values(b, "gw-1")

    async with open_storage(pg_url, latest_interval_s=0.05) as a, \
            open_storage(pg_url, latest_interval_s=0) as b:
        await a.write_batches([batch("gw-1", 6, 100.0)], now_ms=NOW)
        want = {KEYS[s % 5]: 100.0 + s for s in range(6, 11)}
        await until(lambda: _equal(values(b, "gw-1"), want), "b to see a's values",
                    timeout=10)


async def _equal(got: Any, want: dict[str, float]) -> bool:
    return bool(await got == want)


async def test_a_flush_that_fails_keeps_the_values_for_the_next(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush rolled back by the server keeps what it took: the next one writes it, newer
    values added meanwhile included."""
    async with open_storage(pg_url, latest_interval_s=30) as a:
        assert isinstance(a, PostgresStorage)
        await a.write_batches([batch("gw-1", 1, 0.0)], now_ms=NOW)
        real = postgres_latest.flush

        async def failing(conn: Any, prepared: postgres_latest.Flush, token: int) -> None:
            await real(conn, prepared, token)
            await conn.execute("SELECT 1/0")  # after writing: the rollback must undo it

        monkeypatch.setattr(postgres_latest, "flush", failing)
        with pytest.raises(Exception, match="division by zero"):
            await a.settle_latest()
        assert latest_table(pg_url, "gw-1") == {} and len(a._pending) == 5
        monkeypatch.setattr(postgres_latest, "flush", real)
        await a.write_batches([batch("gw-1", 8, 50.0, n=1)], now_ms=NOW + 1)
        await a.settle_latest()
        assert latest_table(pg_url, "gw-1") == {"d/p1": 1.0, "d/p2": 2.0, "d/p3": 58.0, "d/p4": 4.0,
                                        "d/p0": 5.0}
        assert owed(pg_url) == set()


@pytest.mark.parametrize("later_ms", [1, 0], ids=["next-ms", "same-ms"])
async def test_a_flush_does_not_hold_the_writer(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, later_ms: int) -> None:
    """A flush runs on a connection of its own: the next batch write commits while a flush
    is stopped inside its transaction, and the flush then writes what it took; that write
    stays owed, even when it came in the same millisecond as the one the flush took."""
    async with open_storage(pg_url, latest_interval_s=30) as a:
        assert isinstance(a, PostgresStorage)
        await a.write_batches([batch("gw-1", 1, 0.0)], now_ms=NOW)
        real, inside, go_on = postgres_latest.flush, asyncio.Event(), asyncio.Event()

        async def stopped(conn: Any, prepared: postgres_latest.Flush, token: int) -> None:
            inside.set()
            await go_on.wait()
            await real(conn, prepared, token)

        monkeypatch.setattr(postgres_latest, "flush", stopped)
        flushing = asyncio.create_task(a.settle_latest())
        await asyncio.wait_for(inside.wait(), 10)
        await asyncio.wait_for(a.write_batches([batch("gw-1", 6, 100.0)],
                                               now_ms=NOW + later_ms), 10)
        go_on.set()
        await flushing
        assert latest_table(pg_url, "gw-1") == {KEYS[s % 5]: float(s) for s in range(1, 6)}
        assert owed(pg_url) == {("gw-1", a._token)}  # the second write's values: still owed


async def test_a_write_committed_while_a_flush_waits_stays_owed(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that waits for a write holding its gateway's row discharges only what it took:
    the write, committed meanwhile, stays owed and its values pending, and the next flush
    writes them."""
    async with open_storage(pg_url, latest_interval_s=30) as a:
        assert isinstance(a, PostgresStorage)
        await a.write_batches([batch("gw-1", 1, 0.0)], now_ms=NOW)
        real, tail_done, go_on = postgres_write._write_tail, asyncio.Event(), asyncio.Event()

        async def paused(*args: Any, **kwargs: Any) -> Any:
            latest = await real(*args, **kwargs)  # the gateway's row is locked now
            tail_done.set()
            await go_on.wait()
            return latest

        monkeypatch.setattr(postgres_write, "_write_tail", paused)
        writing = asyncio.create_task(
            a.write_batches([batch("gw-1", 6, 100.0)], now_ms=NOW + 1))
        await asyncio.wait_for(tail_done.wait(), 10)
        flushing = asyncio.create_task(a.settle_latest())
        await asyncio.sleep(0.3)
        assert not flushing.done(), "the flush did not wait for the write's gateway lock"
        go_on.set()
        await writing
        await flushing
        assert latest_table(pg_url, "gw-1") == {KEYS[s % 5]: float(s) for s in range(1, 6)}
        assert owed(pg_url) == {("gw-1", a._token)}
        await a.settle_latest()
        assert latest_table(pg_url, "gw-1") == {KEYS[s % 5]: 100.0 + s for s in range(6, 11)}
        assert owed(pg_url) == set()


async def test_opening_repairs_what_a_dead_worker_owed_and_leaves_a_live_ones(
        pg_url: str) -> None:
    """A worker gone without writing its values (its connection closed, its memory lost)
    leaves owed rows nobody's lock covers: the next worker to open repairs those gateways
    from their readings, a gateway the dead and a live worker both wrote (a shared
    subscription splits a gateway's batches) included, and leaves alone what a live worker
    owes."""
    async with open_storage(pg_url, latest_interval_s=30) as live:
        dead = open_storage(pg_url, latest_interval_s=30)
        assert isinstance(dead, PostgresStorage) and isinstance(live, PostgresStorage)
        await dead.open()
        await dead.write_batches([batch("gw-dead", 1, 0.0), batch("gw-dead", 6, 10.0),
                                  batch("gw-both", 1, 0.0)], now_ms=NOW)
        await live.write_batches([batch("gw-live", 1, 0.0),
                                  batch("gw-both", 6, 100.0, n=1, stream="s2")], now_ms=NOW)
        dead._pending = PendingLatest()  # what a kill -9 loses
        await dead.close()
        await live.settle_latest()  # gw-both's value from live: not what dead owed
        assert latest_table(pg_url, "gw-both") == {"d/p1": 106.0}
        await live.write_batches([batch("gw-live", 6, 10.0)], now_ms=NOW)
        assert owed(pg_url) == {("gw-dead", dead._token), ("gw-both", dead._token),
                                ("gw-live", live._token)}

        async with open_storage(pg_url, latest_interval_s=0) as fresh:
            assert owed(pg_url) == {("gw-live", live._token)}
            newest = {KEYS[s % 5]: 10.0 + s for s in range(6, 11)}
            assert await values(fresh, "gw-dead") == newest
            assert await values(fresh, "gw-both") == {**{KEYS[s % 5]: float(s)
                                                         for s in range(1, 6)}, "d/p1": 106.0}
            # live's first values only: what it still owes is its to write, not repaired
            assert await values(fresh, "gw-live") == {KEYS[s % 5]: float(s) for s in range(1, 6)}
    assert owed(pg_url) == set()  # written on close


def test_central_killed_holding_latest_values_repairs_them_on_restart(
        tmp_path: Path, mosquitto: Mosquitto, pg_url: str) -> None:
    """`central serve` on PostgreSQL, holding its latest values (a long interval), acks a
    gateway's batches and is SIGKILLed: the readings are stored, the latest values not. The
    next central repairs them from the readings as it starts and logs it once."""
    held = Central(tmp_path, mosquitto.port, db_url=pg_url, name="central-held",
                   env={"FIELDLINK_CENTRAL_PG_LATEST_INTERVAL_S": "60"})
    fleet = ThreadedFleet([FakeGateway("gw-kill", mosquitto.host, mosquitto.port, points=4,
                                       ack_timeout_s=5.0)], interval_s=0.2)
    again: Central | None = None
    try:
        held.start()
        fleet.start()
        wait_for(lambda: fleet.gateways[0].counters.acks >= 3, timeout=30, what="3 acks")
        fleet.stop_producing()
        wait_for(fleet.all_acked, timeout=30, what="every batch acked")
        held.kill()
        n = fleet.gateways[0].last_seq
        assert rows(pg_url, "SELECT count(*) FROM readings WHERE gw = 'gw-kill'") == [(n,)]
        assert latest_table(pg_url, "gw-kill") == {}, "the values were written before the kill"
        assert {gw for gw, _ in owed(pg_url)} == {"gw-kill"}

        again = Central(tmp_path, mosquitto.port, db_url=pg_url, name="central-again")
        again.start()
        newest = {key: value for key, _, value in (expected_record(s, 4)
                                                   for s in range(1, n + 1))}
        assert latest_table(pg_url, "gw-kill") == newest
        assert owed(pg_url) == set()
        assert again.tail(1000).count("latest_values_repaired") == 1
        got = httpx.get(f"{again.base_url}/api/gateways/gw-kill",
                        headers=again.auth_headers(), timeout=10)
        assert got.status_code == 200, got.text
        assert {p["device"] + "/" + p["point"]: p["latest"]["value"]
                for d in got.json()["devices"] for p in d["points"]} == newest
    finally:
        fleet.close()
        for child in (again, held):
            if child is not None:
                child.stop()
