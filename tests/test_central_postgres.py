"""PostgreSQL-only behaviour of central's storage: concurrent workers, migrations under the
advisory lock, reconnects, connection errors. The shared behaviour tests run on both backends
in test_central_storage.py."""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest

from central.storage import DatabaseWriteError, Storage, StorageError, open_storage
from central.storage.postgres import PostgresStorage
from central.storage.postgres_schema import MIGRATIONS
from protocols.envelope import DataBatch, Record, RecordKind
from tests.helpers import free_port
from tests.pg import PG_URL, admin_connect, pg_schema, url_with_schema

pytestmark = pytest.mark.postgres

T0 = 1_700_000_000_000


def make_batch(gw: str, first: int, size: int, points: int = 30) -> DataBatch:
    return DataBatch(gw=gw, stream=f"s-{gw}", records=tuple(
        Record(seq=s, kind=RecordKind.TELEMETRY, ts_ms=T0 + s, point=f"dev{s % 3}/p{s % points}",
               value=float(s)) for s in range(first, first + size)))


def schema_rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


async def test_two_workers_writing_overlapping_batches_store_each_record_once() -> None:
    """Three workers writing the same batches concurrently, in different orders and groups,
    end with every record once, inserted counts summing to the total, one row per point."""
    batches = [make_batch(f"gw-{g}", 1 + k * 200, 200) for g in range(4) for k in range(10)]
    total = sum(len(b.records) for b in batches)
    with pg_schema() as url:
        async with open_storage(url) as w1, open_storage(url) as w2, open_storage(url) as w3:

            async def work(st: Storage, order: list[DataBatch], group: int) -> int:
                done = 0
                for i in range(0, len(order), group):
                    done += sum(r.inserted for r in await st.write_batches(order[i:i + group]))
                return done

            rng = random.Random(7)
            shuffled = rng.sample(batches, len(batches))
            inserted = await asyncio.gather(work(w1, batches, 5), work(w2, shuffled, 3),
                                            work(w3, list(reversed(batches)), 7))
            assert sum(inserted) == total
            assert (await w1.count_records()).readings == total
            # every gateway's last batch (seqs 1801..2000, rising ts) holds each point's newest
            newest = {r.point: r.value for r in make_batch("any", 1801, 200).records}
            for g in range(4):
                pts = await w2.latest_values(f"gw-{g}")
                assert {f"{p.device}/{p.point}": p.latest and p.latest.value
                        for p in pts} == newest
        (n_points,) = schema_rows(url, "SELECT count(*) FROM points")[0]
        assert n_points == 4 * 30


async def test_workers_starting_together_migrate_once() -> None:
    """Several workers opening a fresh schema at once apply each migration exactly once."""
    with pg_schema() as url:
        storages = [PostgresStorage(url) for _ in range(4)]
        try:
            await asyncio.gather(*(s.open() for s in storages))
            assert all([await s.ping() for s in storages])
        finally:
            for s in storages:
                await s.close()
        versions = [v for (v,) in schema_rows(url, "SELECT version FROM schema_version ORDER BY 1")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))


async def test_reopen_keeps_data_and_schema_version() -> None:
    """Reopening a schema keeps its rows and does not re-run migrations."""
    with pg_schema() as url:
        async with open_storage(url) as st:
            await st.write_batches([make_batch("gw-1", 1, 1)])
        async with open_storage(url) as st:
            (res,) = await st.write_batches([make_batch("gw-1", 1, 2)])
            assert res.inserted == 1
        assert schema_rows(url, "SELECT count(*) FROM schema_version") == [(len(MIGRATIONS),)]


async def test_dropped_connections_fail_one_write_then_reconnect() -> None:
    """When the server drops central's connections the write in flight fails (no ack) and
    the next one reconnects; reads and ping recover too."""
    with pg_schema() as base:
        app = f"fl-test-{random.randrange(1 << 30)}"
        url = f"{base}&application_name={app}"
        async with open_storage(url) as st:
            await st.write_batches([make_batch("gw-1", 1, 10)])
            with admin_connect() as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = %s", (app,)).fetchone()
            assert killed == (2,)  # the writer and the reader
            with pytest.raises(DatabaseWriteError):
                await st.write_batches([make_batch("gw-1", 11, 10)])
            (res,) = await st.write_batches([make_batch("gw-1", 11, 10)])
            assert res.inserted == 10
            assert await st.ping() is True  # a read retries once on a fresh connection
            assert (await st.count_records("gw-1")).readings == 20


async def test_cancelled_write_is_all_or_nothing_and_storage_stays_usable() -> None:
    """A write cancelled mid-flight leaves none or all of its records and later writes work."""
    big = make_batch("gw-1", 1, 20_000, points=200)
    with pg_schema() as url:
        async with open_storage(url) as st:
            task = asyncio.create_task(st.write_batches([big]))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await st.count_records("gw-1")).readings in (0, 20_000)
            (res,) = await st.write_batches([make_batch("gw-1", 1, 20_001, points=200)])
            assert (await st.count_records("gw-1")).readings == 20_001
            assert res.inserted in (1, 20_001)


@pytest.mark.parametrize("bad", [{"seq": 2**70}, {"value": 10**400}, {"value": "a\x00b"},
                                 {"point": "d/p\x00"}])
async def test_unstorable_record_rolls_back_with_database_write_error(
        bad: dict[str, object]) -> None:
    """A record PostgreSQL cannot hold fails its transaction as DatabaseWriteError (so ingest
    retries the batches alone) and leaves the storage working."""
    fields: dict[str, object] = {"seq": 2, "kind": RecordKind.TELEMETRY, "ts_ms": T0,
                                 "point": "d/p", "value": 1.0, **bad}
    poisoned = DataBatch(gw="gw-1", stream="s",
                         records=(Record(**fields),))  # type: ignore[arg-type]
    with pg_schema() as url:
        async with open_storage(url) as st:
            with pytest.raises(DatabaseWriteError):
                await st.write_batches([make_batch("gw-1", 100, 5), poisoned])
            (res,) = await st.write_batches([make_batch("gw-1", 100, 5)])
            assert res.inserted == 5


async def test_unreachable_server_raises_storage_error() -> None:
    """A server that does not answer gives a StorageError naming the address, not a hang."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with pytest.raises(StorageError, match=r"cannot connect to postgresql://postgres@127\.0\.0\.1"):
        async with open_storage(url):
            pass


async def test_missing_schema_raises_storage_error() -> None:
    """A search_path naming no existing schema is refused with a clear message."""
    admin_connect().close()  # fail clearly if the server is down
    url = url_with_schema(PG_URL, "fl_no_such_schema")
    with pytest.raises(StorageError, match="no existing schema"):
        async with open_storage(url):
            pass
