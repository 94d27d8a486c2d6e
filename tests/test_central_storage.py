"""Central's storage on both backends (a SQLite file, a PostgreSQL schema): dedup, latest
values, points, birth, reads. The same assertions run on each."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from central.storage import (
    BadRefError,
    RecordCounts,
    Storage,
    UnknownDeviceError,
    UnknownGatewayError,
    UnknownPointError,
    UnsupportedDatabaseError,
    open_storage,
)
from central.storage.sqlite_schema import MIGRATIONS
from protocols.envelope import (
    Birth,
    DataBatch,
    DeviceInfo,
    Flag,
    PointInfo,
    Record,
    RecordKind,
    State,
)
from tests.pg import BACKENDS, backend

T0 = 1_700_000_000_000


def tel(seq: int, point: str | None, value: object, ts: int | None = None,
        flags: Flag = Flag.NONE) -> Record:
    return Record(seq=seq, kind=RecordKind.TELEMETRY, ts_ms=T0 + seq if ts is None else ts,
                  point=point, value=value, flags=flags)  # type: ignore[arg-type]


def batch(*records: Record, gw: str = "gw-1", stream: str = "s1") -> DataBatch:
    return DataBatch(gw=gw, stream=stream, records=records)


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with backend(request.param, tmp_path) as (st,):
        yield st


async def test_same_batch_twice_is_stored_once(storage: Storage) -> None:
    """Writing a batch again inserts nothing and reports every record as a duplicate."""
    b = batch(tel(1, "d1/gas", 10.0), tel(2, "d1/gas", 11.0), tel(3, "d1/o2", 20.9))
    (first,) = await storage.write_batches([b])
    (again,) = await storage.write_batches([b])
    assert (first.inserted, first.duplicates) == (3, 0)
    assert (again.inserted, again.duplicates) == (0, 3)
    assert (await storage.count_records("gw-1")).readings == 3


async def test_same_batch_twice_in_one_call_counts_once(storage: Storage) -> None:
    """A batch repeated within one call is inserted by its first copy only."""
    b = batch(tel(1, "d1/gas", 10.0), tel(2, "d1/run", True), tel(3, "d1/n", 7))
    res = await storage.write_batches([b, b])
    assert [(r.inserted, r.duplicates) for r in res] == [(3, 0), (0, 3)]
    assert (await storage.count_records("gw-1")).readings == 3
    assert [(p.point, p.latest and p.latest.value) for p in await storage.device_points(
        "gw-1:d1")] == [("gas", 10.0), ("n", 7.0), ("run", 1.0)]


async def test_batches_in_one_call_report_per_batch(storage: Storage) -> None:
    """Several batches in one transaction each get their own inserted/duplicate counts."""
    await storage.write_batches([batch(tel(1, "d1/gas", 1.0))])
    res = await storage.write_batches([
        batch(tel(1, "d1/gas", 1.0), tel(2, "d1/gas", 2.0)),
        batch(tel(1, "d1/gas", 5.0), stream="s2"),
        batch(tel(1, "d9/t", 5.0), gw="gw-2"),
    ])
    assert [(r.gw, r.stream, r.inserted, r.duplicates) for r in res] == [
        ("gw-1", "s1", 1, 1), ("gw-1", "s2", 1, 0), ("gw-2", "s1", 1, 0)]
    assert (await storage.count_records()).readings == 4


async def test_latest_moves_only_forward_in_time(storage: Storage) -> None:
    """An older (backlog) reading arriving later does not overwrite a fresher latest value."""
    await storage.write_batches([batch(tel(10, "d1/gas", 42.0, ts=T0 + 10_000))])
    old = tel(3, "d1/gas", 7.0, ts=T0 + 3_000, flags=Flag.HISTORICAL)
    await storage.write_batches([batch(old)])
    (p,) = await storage.device_points("gw-1:d1")
    assert p.latest is not None and (p.latest.ts_ms, p.latest.value) == (T0 + 10_000, 42.0)
    await storage.write_batches([batch(tel(11, "d1/gas", 43.5, ts=T0 + 11_000))])
    (p,) = await storage.device_points("gw-1:d1")
    assert p.latest is not None and p.latest.value == 43.5


async def test_latest_within_one_batch_takes_newest_ts(storage: Storage) -> None:
    """Within a batch the newest timestamp wins, whatever the record order."""
    await storage.write_batches([batch(tel(1, "d1/gas", 2.0, ts=T0 + 500),
                                       tel(2, "d1/gas", 1.0, ts=T0 + 100))])
    (p,) = await storage.device_points("gw-1:d1")
    assert p.latest is not None and p.latest.value == 2.0


async def test_points_are_created_from_data_keys(storage: Storage) -> None:
    """Keys `device/point` create points on first sight, grouped into devices."""
    await storage.write_batches([batch(tel(1, "tank-3/gas", 1.0), tel(2, "tank-3/o2", 20.9),
                                       tel(3, "pump/run", "on"))])
    devices = await storage.list_devices("gw-1")
    assert [(d.ref, d.points) for d in devices] == [("gw-1:pump", 1), ("gw-1:tank-3", 2)]
    pts = await storage.latest_values("gw-1")
    assert [p.ref for p in pts] == ["gw-1:pump:run", "gw-1:tank-3:gas", "gw-1:tank-3:o2"]
    assert pts[0].latest is not None and (pts[0].latest.value, pts[0].latest.text) == (None, "on")


async def test_birth_enriches_points_and_gateway(storage: Storage) -> None:
    """A birth sets name_zh, unit and profile on existing points and adds the missing ones."""
    await storage.write_batches([batch(tel(1, "tank-3/gas", 12.0))])
    birth = Birth(gw="gw-1", stream="s1", boot_id="b1", version="0.1.0", devices=(
        DeviceInfo(id="tank-3", profile="gas-detector-v1", profile_hash="h", points=(
            PointInfo(ordinal=0, key="tank-3/gas", name_zh="可燃气体浓度", unit="%LEL"),
            PointInfo(ordinal=1, key="tank-3/o2", name_zh="氧气浓度", unit="%VOL"))),))
    await storage.record_birth("gw-1", birth)
    pts = await storage.device_points("gw-1:tank-3")
    assert [(p.point, p.name_zh, p.unit, p.profile) for p in pts] == [
        ("gas", "可燃气体浓度", "%LEL", "gas-detector-v1"), ("o2", "氧气浓度", "%VOL", "gas-detector-v1")]
    assert pts[0].latest is not None and pts[0].latest.value == 12.0
    # the point created by birth receives data under the same id
    await storage.write_batches([batch(tel(2, "tank-3/o2", 20.8))])
    pts = await storage.device_points("gw-1:tank-3")
    assert pts[1].latest is not None and pts[1].latest.value == 20.8
    gw = await storage.get_gateway("gw-1")
    assert (gw.boot_id, gw.version) == ("b1", "0.1.0")


async def test_state_and_retained_state(storage: Storage) -> None:
    """A live state updates last_seen; a retained one updates the flags but not last_seen."""
    st = State(online=True, boot_id="b1", version="1.0", bearer="4g", backlog=17, ts_ms=T0)
    await storage.record_state("gw-1", st, now_ms=T0 + 5)
    await storage.record_state("gw-1", State(online=False, boot_id="b1", version="1.0",
                                             bearer="4g", backlog=3, ts_ms=T0 + 9),
                               seen=False, now_ms=T0 + 99)
    g = await storage.get_gateway("gw-1")
    assert (g.online, g.backlog, g.bearer, g.last_seen_ms, g.state_ts_ms) == (
        False, 3, "4g", T0 + 5, T0 + 9)
    assert [x.gw for x in await storage.list_gateways()] == ["gw-1"]


async def test_states_and_births_in_one_call_apply_in_order(storage: Storage) -> None:
    """`record_gateway_infos` (one transaction on SQLite) does what the single calls do, in
    the order given: the later state wins, a retained one leaves last_seen alone."""
    birth = Birth(gw="gw-2", stream="s2", boot_id="b2", version="0.2.0", devices=(
        DeviceInfo(id="d", profile="p", profile_hash="h", points=(
            PointInfo(ordinal=0, key="d/x", name_zh="甲", unit="m"),)),))
    live = State(online=True, boot_id="b1", version="1.0", bearer="4g", backlog=17, ts_ms=T0)
    old = State(online=False, boot_id="b1", version="1.0", bearer="eth", backlog=3,
                ts_ms=T0 + 9)
    await storage.record_gateway_infos([("gw-1", live, True), ("gw-2", birth, True),
                                        ("gw-1", old, False)], now_ms=T0 + 5)
    g1, g2 = await storage.list_gateways()
    assert (g1.online, g1.backlog, g1.bearer, g1.last_seen_ms) == (False, 3, "eth", T0 + 5)
    assert (g2.stream, g2.boot_id, g2.last_seen_ms) == ("s2", "b2", T0 + 5)
    assert [(p.point, p.name_zh) for p in await storage.device_points("gw-2:d")] == [("x", "甲")]


async def test_events_go_to_their_own_table(storage: Storage) -> None:
    """Alarm, event and command-result records land in `events` with their attrs."""
    await storage.write_batches([batch(
        tel(1, "d1/gas", 30.0),
        Record(seq=2, kind=RecordKind.ALARM, ts_ms=T0, point="d1/gas", value=30.0,
               attrs={"level": 2, "rule": "hi2"}),
        Record(seq=3, kind=RecordKind.CMD_RESULT, ts_ms=T0, point=None, value="succeeded"))])
    assert await storage.count_records("gw-1") == RecordCounts(readings=1, events=2)


async def test_series_window_and_limit(storage: Storage) -> None:
    """A series returns readings inside [from, to), oldest first, at most `limit`."""
    await storage.write_batches([batch(*(tel(i, "d1/gas", float(i), ts=T0 + i * 1000)
                                         for i in range(1, 11)))])
    s = await storage.series("gw-1:d1:gas", T0 + 3000, T0 + 8000, 100)
    assert [x.value for x in s] == [3.0, 4.0, 5.0, 6.0, 7.0]
    s = await storage.series("gw-1:d1:gas", 0, T0 + 100_000, 2)
    assert [x.ts_ms for x in s] == [T0 + 1000, T0 + 2000]


async def test_unknown_refs_raise_narrow_errors(storage: Storage) -> None:
    """Unknown gateway, device or point and malformed refs raise their own classes."""
    with pytest.raises(UnknownGatewayError):
        await storage.get_gateway("nope")
    with pytest.raises(UnknownDeviceError):
        await storage.device_points("nope:dev")
    with pytest.raises(UnknownPointError):
        await storage.series("nope:dev:p", 0, 1, 1)
    with pytest.raises(BadRefError):
        await storage.device_points("no-colon")
    with pytest.raises(UnsupportedDatabaseError):
        open_storage("mysql://x")


async def test_reopen_keeps_data_and_schema_version(tmp_path: Path) -> None:
    """Reopening a file keeps its rows and does not re-run migrations."""
    url = f"sqlite:///{tmp_path}/c.db"
    async with open_storage(url) as st:
        await st.write_batches([batch(tel(1, "d1/gas", 1.0))])
    async with open_storage(url) as st:
        (res,) = await st.write_batches([batch(tel(1, "d1/gas", 1.0), tel(2, "d1/gas", 2.0))])
        assert res.inserted == 1
    conn = sqlite3.connect(tmp_path / "c.db")
    try:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
