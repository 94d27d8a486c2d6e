"""Per-gateway delivery (what central holds, what is missing, what the edge said it evicted)
and implausible record times (§4.7), on both backends; the API view on SQLite."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from central.app import create_app
from central.config.settings import Settings
from central.storage import RetentionPolicy, Storage, open_storage
from central.storage.program import Program, Sql
from central.storage.timecheck import CENTRAL_TS_SUSPECT, FLOOR_MS
from protocols.envelope import DataBatch, Flag, Record, RecordKind, State
from tests.identity import authorize
from tests.pg import BACKENDS, backend, pg_schema

NOW = time.time_ns() // 1_000_000
T0 = NOW - 3_600_000  # an hour ago: plausible, inside every retention
SUSPECT = int(Flag.CLOCK_SUSPECT)


def tel(seq: int, value: float = 1.0, ts: int | None = None, point: str = "d1/gas",
        flags: Flag = Flag.NONE) -> Record:
    return Record(seq=seq, kind=RecordKind.TELEMETRY, ts_ms=T0 + seq * 1000 if ts is None else ts,
                  point=point, value=value, flags=flags)


def evicted(seq: int, kind: str, first: int, last: int, records: int) -> Record:
    """The edge's report that its disk budget thinned or dropped telemetry."""
    return Record(seq=seq, kind=RecordKind.EVENT, ts_ms=T0 + seq * 1000, point=None, value=None,
                  attrs={"event": f"outbox_{kind}", "records": records, "first_seq": first,
                         "last_seq": last, "points": ["d1/gas"]})


def batch(*records: Record, gw: str = "gw-1", stream: str = "s1") -> DataBatch:
    return DataBatch(gw=gw, stream=stream, records=records)


def span(a: int, b: int, **kw: Any) -> list[Record]:
    return [tel(s, float(s), **kw) for s in range(a, b + 1)]


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with backend(request.param, tmp_path) as (st,):
        yield st


def select(sql: str, args: tuple[Any, ...] = ()) -> Program[list[tuple[Any, ...]]]:
    rows = yield Sql(sql, args)
    return rows


# --- gaps ---------------------------------------------------------------------------------------


async def test_gaps_split_into_reported_lost_and_pending(storage: Storage) -> None:
    """A thinned range the edge reported counts as lost; a range not yet arrived as pending."""
    await storage.record_state("gw-1", State(online=True, boot_id="b", version="1", bearer="4g",
                                             backlog=250, ts_ms=NOW, stream="s1"), now_ms=NOW)
    # 11..20 were thinned away at the edge (reported by seq 41); 21..30 are still on their way.
    await storage.write_batches([batch(*span(1, 10)), batch(*span(31, 40))])
    await storage.write_batches([batch(evicted(41, "thinned", 11, 20, 10))])
    d = await storage.delivery("gw-1")
    assert (d.backlog, d.stream) == (250, "s1") and d.last_seen_ms is not None
    (s,) = d.streams
    assert (s.stream, s.current, s.held, s.max_seq, s.missing) == ("s1", True, 21, 41, 20)
    assert s.gaps == ((11, 30),) and s.gap_count == 1
    assert (s.reported_lost, s.pending, s.lost_records_reported) == (10, 10, 10)
    assert s.lost_ranges == ((11, 20),)
    # the pending range arrives, newest first, in two pieces: nothing pending any more
    await storage.write_batches([batch(*span(26, 30))])
    (s,) = (await storage.delivery("gw-1")).streams
    assert s.gaps == ((11, 25),) and (s.reported_lost, s.pending) == (10, 5)
    await storage.write_batches([batch(*span(21, 25))])
    (s,) = (await storage.delivery("gw-1")).streams
    assert (s.held, s.missing, s.gaps, s.reported_lost, s.pending) == (31, 10, ((11, 20),), 10, 0)


async def test_thinning_keeps_some_records_of_its_range(storage: Storage) -> None:
    """Inside a reported range only as many seqs as the report names are lost; the kept ones
    are pending until they come, and gaps list every hole."""
    await storage.write_batches([batch(*span(1, 10), evicted(21, "thinned", 11, 20, 5))])
    (s,) = (await storage.delivery("gw-1")).streams
    assert (s.missing, s.reported_lost, s.pending) == (10, 5, 5)
    await storage.write_batches([batch(*(tel(x) for x in (12, 14, 16, 18, 20)))])
    (s,) = (await storage.delivery("gw-1")).streams
    assert s.gaps == ((11, 11), (13, 13), (15, 15), (17, 17), (19, 19)) and s.gap_count == 5
    assert (s.held, s.missing, s.reported_lost, s.pending) == (16, 5, 5, 0)
    # a drop that overlaps what is already held counts only the missing part
    await storage.write_batches([batch(evicted(22, "dropped", 1, 13, 13))])
    (s,) = (await storage.delivery("gw-1")).streams
    assert (s.missing, s.reported_lost, s.pending, s.lost_records_reported) == (5, 5, 0, 18)
    assert s.lost_ranges == ((1, 20),)


async def test_power_cut_report_counts_only_the_seqs_never_received(storage: Storage) -> None:
    """The seqs an outbox skipped after a power cut are reported lost, except the ones that
    reached central before the cut (held, not lost); nothing is left pending."""
    # 1 (an alarm) and 2 (a reading whose row the cut took at the edge) reached central; the
    # outbox came back at 1, skipped 2..257 (its reservation), reported them as 258, went on.
    cut = Record(seq=258, kind=RecordKind.EVENT, ts_ms=T0 + 258_000, point=None, value=256,
                 attrs={"event": "outbox_dropped", "records": 256, "first_seq": 2,
                        "last_seq": 257, "points": [], "reason": "power_cut"})
    await storage.write_batches([batch(tel(1), tel(2))])
    await storage.write_batches([batch(cut, tel(259))])
    (s,) = (await storage.delivery("gw-1")).streams
    assert (s.held, s.max_seq, s.missing, s.gaps) == (4, 259, 255, ((3, 257),))
    assert (s.reported_lost, s.pending, s.lost_ranges) == (255, 0, ((2, 257),))
    kinds = await storage.run(lambda: select("SELECT kind FROM stream_losses"), write=False)
    assert kinds == [("power_cut",)]


async def test_duplicates_and_disorder_count_each_seq_once(storage: Storage) -> None:
    """Resent, reordered and overlapping batches leave held = distinct seqs and no gap."""
    await storage.write_batches([batch(*span(20, 30)), batch(*span(1, 5))])
    await storage.write_batches([batch(*span(1, 5)), batch(*span(4, 19)), batch(*span(25, 31))])
    await storage.write_batches([batch(tel(31), tel(31))])
    (s,) = (await storage.delivery("gw-1")).streams
    assert (s.held, s.max_seq, s.missing, s.gaps, s.gap_count) == (31, 31, 0, (), 0)
    ranges = await storage.run(lambda: select("SELECT first_seq, last_seq FROM stream_ranges"),
                               write=False)
    assert ranges == [(1, 31)]


async def test_summary_sums_streams_and_survives_purge(storage: Storage) -> None:
    """The listing sums held/missing/lost over a gateway's streams, and retention purging raw
    rows takes nothing from what central counts as delivered."""
    old = T0 - 60 * 86_400_000  # older than raw retention
    await storage.write_batches([
        batch(*span(1, 5, ts=old)),
        batch(*span(1, 3), tel(6), evicted(7, "dropped", 4, 5, 2), stream="s2"),
        batch(*span(2, 4), gw="gw-2")])
    await storage.purge(RetentionPolicy(raw_days=30, chunk_rows=2), NOW)
    summary = await storage.delivery_summary()
    assert {g: (x.held, x.missing, x.reported_lost) for g, x in summary.items()} == {
        "gw-1": (5 + 5, 2, 2), "gw-2": (3, 1, 0)}
    assert list(await storage.delivery_summary("gw-2")) == ["gw-2"]
    d = await storage.delivery("gw-1")
    assert [(s.stream, s.held, s.missing) for s in sorted(d.streams, key=lambda s: s.stream)] == [
        ("s1", 5, 0), ("s2", 5, 2)]
    assert (await storage.count_records("gw-1")).readings == 4  # s1's old rows are gone


# --- implausible times ---------------------------------------------------------------------------


async def test_implausible_times_are_flagged_and_counted(storage: Storage) -> None:
    """Future (past tolerance) and pre-2020 times are stored CLOCK_SUSPECT, counted, and keep
    the latest value from jumping to the future; plausible edge-flagged records stay flagged."""
    future = NOW + 3_600_000
    (res,) = await storage.write_batches([batch(
        tel(1, 1.0, ts=NOW - 1000), tel(2, 2.0, ts=future), tel(3, 3.0, ts=FLOOR_MS - 1),
        tel(4, 4.0, ts=NOW - 500, flags=Flag.CLOCK_SUSPECT),
        tel(5, 5.0, ts=NOW + 60_000))], now_ms=NOW)
    assert (res.inserted, res.clock_suspect) == (5, 2)
    rows = dict(await storage.run(lambda: select("SELECT seq, flags FROM readings"),
                                  write=False))
    assert rows[1] == 0 and rows[5] == 0  # a minute ahead is within tolerance
    assert rows[2] == rows[3] == SUSPECT | CENTRAL_TS_SUSPECT
    assert rows[4] == SUSPECT
    (p,) = await storage.device_points("gw-1:d1")
    assert p.latest is not None and (p.latest.ts_ms, p.latest.value) == (NOW + 60_000, 5.0)


async def test_corrected_copy_replaces_suspect_time_and_nothing_else_overwrites(
        storage: Storage) -> None:
    """An unflagged copy of a suspect record replaces its ts and flags, once; every other
    duplicate (suspect over good, good over good, suspect over suspect) is ignored."""
    bad_ts = FLOOR_MS - 86_400_000  # the RTC fell back before NTP/BeiDou time
    await storage.write_batches([batch(
        tel(1, 10.0, ts=bad_ts),  # central judges it
        tel(2, 20.0, ts=NOW - 9000, flags=Flag.CLOCK_SUSPECT),  # the edge said so
        tel(3, 30.0, ts=NOW - 8000))], now_ms=NOW)
    (res,) = await storage.write_batches([batch(
        tel(1, 99.0, ts=NOW - 7000, flags=Flag.HISTORICAL),  # corrected: replaces ts + flags
        tel(2, 98.0, ts=bad_ts, flags=Flag.CLOCK_SUSPECT),  # still suspect: ignored
        tel(3, 97.0, ts=NOW - 1, flags=Flag.CLOCK_SUSPECT))], now_ms=NOW)  # over good: ignored
    assert (res.inserted, res.duplicates, res.corrected) == (0, 3, 1)
    (res,) = await storage.write_batches([batch(
        tel(1, 96.0, ts=NOW - 2), tel(2, 95.0, ts=NOW - 6000))], now_ms=NOW)
    assert res.corrected == 1  # seq 1 is good now and stays; seq 2 gets its correction
    rows = await storage.run(lambda: select(
        "SELECT seq, ts_ms, value, flags FROM readings ORDER BY seq"), write=False)
    assert rows == [(1, NOW - 7000, 10.0, int(Flag.HISTORICAL)), (2, NOW - 6000, 20.0, 0),
                    (3, NOW - 8000, 30.0, 0)]
    (s,) = (await storage.delivery("gw-1")).streams
    assert (s.held, s.missing) == (3, 0)


async def test_corrected_event_time_replaces_suspect_event(storage: Storage) -> None:
    """The same replacement rule holds for event records."""
    ev = Record(seq=1, kind=RecordKind.EVENT, ts_ms=NOW + 86_400_000, point=None, value="boot",
                attrs={"event": "booted"})
    await storage.write_batches([batch(ev)], now_ms=NOW)
    fixed = Record(seq=1, kind=RecordKind.EVENT, ts_ms=NOW - 5, point=None, value="boot",
                   attrs={"event": "booted"})
    (res,) = await storage.write_batches([batch(fixed)], now_ms=NOW)
    assert res.corrected == 1
    rows = await storage.run(lambda: select("SELECT ts_ms, flags FROM events"), write=False)
    assert rows == [(NOW - 5, 0)]


# --- API ------------------------------------------------------------------------------------------


async def test_delivery_api_and_gateway_list(tmp_path: Path) -> None:
    """GET /api/gateways/{gw}/delivery shows streams with gaps; the list carries the counts."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db")
    async with open_storage(settings.db_url) as st:
        await st.record_state("gw-1", State(online=True, boot_id="b", version="1", bearer="4g",
                                            backlog=7, ts_ms=NOW, stream="s1"))
        await st.write_batches([batch(*span(1, 3), *span(9, 10),
                                      evicted(11, "thinned", 4, 6, 3))])
    app = create_app(settings, run_ingest=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        await authorize(app, c)
        body = (await c.get("/api/gateways/gw-1/delivery")).json()
        assert body["backlog"] == 7 and body["last_seen_ms"] is not None
        (s,) = body["streams"]
        assert (s["stream"], s["held"], s["max_seq"], s["missing"], s["gaps"]) == (
            "s1", 6, 11, 5, [[4, 8]])
        assert (s["reported_lost"], s["pending"]) == (3, 2)
        (g,) = (await c.get("/api/gateways")).json()
        assert (g["held"], g["missing"], g["reported_lost"]) == (6, 5, 3)
        detail = (await c.get("/api/gateways/gw-1")).json()
        assert (detail["held"], detail["missing"], detail["reported_lost"]) == (6, 5, 3)
        r = await c.get("/api/gateways/nope/delivery")
        assert r.status_code == 404 and "nope" in r.json()["detail"]


# --- migrating an older database ------------------------------------------------------------------


async def _older_database(backend: str, tmp_path: Path, url: str) -> None:
    """A database at schema version 2 holding readings, a loss report and a far-future time."""
    rows = [("gw-1", "s1", s, 1, NOW - 9000 + s, float(s), None, 0, NOW) for s in (1, 2, 3)]
    rows.append(("gw-1", "s1", 5, 1, NOW + 86_400_000, 5.0, None, 0, NOW))
    event = ("gw-1", "s1", 6, int(RecordKind.EVENT), None, NOW, 1.0, None, 0,
             '{"event": "outbox_dropped", "records": 1, "first_seq": 4, "last_seq": 4}', NOW)
    if backend == "sqlite":
        import sqlite3

        from central.storage.sqlite_schema import MIGRATIONS

        conn = sqlite3.connect(tmp_path / "central.db", isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, fn in enumerate(MIGRATIONS[:2], start=1):
            fn(conn)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("INSERT INTO points (id, gw, device, point) VALUES (1, 'gw-1', 'd1', 'gas')")
        conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", event)
        conn.execute("INSERT INTO gateways (gw, stream) VALUES ('gw-1', 's1')")
        conn.close()
        return
    from psycopg import AsyncConnection

    from central.storage.postgres_schema import MIGRATIONS as PG_MIGRATIONS

    async with await AsyncConnection.connect(url, autocommit=True) as pg:
        await pg.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                         " applied_ms BIGINT NOT NULL)")
        for version, step in enumerate(PG_MIGRATIONS[:2], start=1):
            await step(pg)
            await pg.execute("INSERT INTO schema_version VALUES (%s, 0)", (version,))
        await pg.execute("INSERT INTO points (id, gw, device, point)"
                         " VALUES (1, 'gw-1', 'd1', 'gas')")
        async with pg.cursor() as cur:
            await cur.executemany("INSERT INTO readings VALUES"
                                  " (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
        await pg.execute("INSERT INTO events VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
                         " %s::jsonb, %s)", event)
        await pg.execute("INSERT INTO gateways (gw, stream) VALUES ('gw-1', 's1')")


@pytest.mark.parametrize("backend", ["sqlite",
                                     pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_migration_backfills_delivery_and_aggregates(backend: str, tmp_path: Path) -> None:
    """Opening a version-2 database fills streams, ranges, loss reports and aggregates from
    the rows it holds, and flags the times central would not have trusted."""
    async def check(url: str) -> None:
        await _older_database(backend, tmp_path, url)
        async with open_storage(url) as st:
            (s,) = (await st.delivery("gw-1")).streams
            assert (s.held, s.max_seq, s.gaps, s.reported_lost, s.pending) == (5, 6, ((4, 4),),
                                                                                1, 0)
            flags = dict(await st.run(lambda: select("SELECT seq, flags FROM readings"),
                                      write=False))
            assert flags == {1: 0, 2: 0, 3: 0, 5: SUSPECT | CENTRAL_TS_SUSPECT}
            (b,) = await st.buckets("gw-1:d1:gas", "1h", NOW - 86_400_000, NOW + 1, 10)
            assert (b.count, b.min, b.max, b.sum) == (3, 1.0, 3.0, 6.0)
            # new data continues the same stream accounting
            await st.write_batches([batch(tel(4))])
            (s,) = (await st.delivery("gw-1")).streams
            assert (s.held, s.missing, s.gaps) == (6, 0, ())

    if backend == "sqlite":
        await check(f"sqlite:///{tmp_path}/central.db")
        return
    with pg_schema() as url:
        await check(url)
