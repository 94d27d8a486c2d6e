"""Central's alarm lifecycle and areas (DESIGN.md §7) on both backends: edge records through
`write_batches`, replays and backlog, flapping, incidents, the area tree, central's offline
rule, two workers racing, and the HTTP routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from central.alarms.desk import (
    AlarmStateError,
    UnknownAlarmError,
    acknowledge,
    alarm_history,
    apply_alarm_events,
    area_summary,
    clear_alarm,
    get_alarm,
    list_alarms,
)
from central.alarms.engine import BadAlarmRecordError, event_from_record
from central.alarms.lifecycle import AlarmEvent, AlarmPolicy, EdgeState
from central.alarms.rules import AlarmRules
from central.app import create_app
from central.areas.tree import (
    SEED_DIR,
    AreaLevel,
    AreaPlacementError,
    DuplicateAreaError,
    area_tree,
    assign_gateway,
    create_area,
    seed_areas,
)
from central.config.settings import Settings
from central.storage import Storage
from central.storage.program import Sql
from protocols.envelope import DataBatch, Record, RecordKind, State
from tests.identity import ADMIN, authorize
from tests.pg import BACKENDS, backend

T0 = 1_700_000_000_000
KEY = "gas-1/gas_lel/high"
GW = "gw-a"


def alarm(seq: int, state: str, level: int, *, ts: int | None = None, key: str = KEY,
          value: float = 30.0) -> Record:
    """An ALARM record as `edge_agent.alarms.rules.AlarmEvent.to_record` makes it."""
    device, point, rule = key.split("/")
    return Record(seq=seq, kind=RecordKind.ALARM, ts_ms=T0 + seq * 1000 if ts is None else ts,
                  point=f"{device}/{point}", value=value,
                  attrs={"alarm_id": key, "rule": rule, "state": state, "level": level,
                         "prev_level": 0, "threshold": 25.0 if level < 2 else 50.0,
                         "since_ms": T0})


def batch(*records: Record, gw: str = GW, stream: str = "s1") -> DataBatch:
    return DataBatch(gw=gw, stream=stream, records=records)


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    async with backend(request.param, tmp_path) as (st,):
        st.alarm_policy = AlarmPolicy(flap_max=3, flap_window_ms=60_000,
                                      incident_window_ms=30_000)
        yield st


async def only(storage: Storage, **kw: Any) -> Any:
    (a,) = await list_alarms(storage, **kw)
    return a


async def sites(storage: Storage) -> dict[str, int]:
    """A small tree: city / two districts / street / two sites, one gateway at each site and
    a second gateway at the first site. Returns area ids by code."""
    city = await create_area(storage, parent_id=None, level="city", code="c", name_zh="武汉市")
    d1 = await create_area(storage, parent_id=city.id, level="district", code="d1",
                           name_zh="江岸区")
    d2 = await create_area(storage, parent_id=city.id, level="district", code="d2",
                           name_zh="青山区")
    st = await create_area(storage, parent_id=d1.id, level="street", code="s1", name_zh="二七街道")
    s1 = await create_area(storage, parent_id=st.id, level="site", code="site1",
                           name_zh="示范企业", kind="enterprise")
    s2 = await create_area(storage, parent_id=d2.id, level="site", code="site2",
                           name_zh="监测站", kind="station")
    await assign_gateway(storage, GW, s1.id)
    await assign_gateway(storage, "gw-b", s1.id)
    await assign_gateway(storage, "gw-c", s2.id)
    return {"city": city.id, "d1": d1.id, "d2": d2.id, "street": st.id, "site1": s1.id,
            "site2": s2.id}


# --- lifecycle ----------------------------------------------------------------------------------


async def test_raise_then_severity_rise_then_clear(storage: Storage) -> None:
    """Raised at level 1, changed to level 2 (severity rises, notified), cleared by the edge."""
    await storage.write_batches([batch(alarm(1, "raised", 1))])
    a = await only(storage, state="active")
    assert (a.severity, a.level, a.ack_state, a.type, a.device, a.point) == (
        1, 1, "unacknowledged", "high", "gas-1", "gas-1/gas_lel")
    await storage.write_batches([batch(alarm(2, "changed", 2, value=55.0))])
    a = await get_alarm(storage, a.id)
    assert (a.severity, a.level, a.value, a.threshold) == (2, 2, 55.0, 50.0)
    await storage.write_batches([batch(alarm(3, "cleared", 0))])
    a = await get_alarm(storage, a.id)
    assert (a.state, a.severity, a.level, a.cleared_by, a.cleared_ms) == (
        "cleared", 2, 0, "edge", T0 + 3000)
    history = await alarm_history(storage, a.id)
    assert [(h.action, h.note, h.notify, h.seq) for h in history] == [
        ("raised", "opened", True, 1), ("changed", "severity_rose", True, 2),
        ("cleared", "closed", True, 3)]


async def test_ack_with_user_and_comment_and_re_ack_after_rise(storage: Storage) -> None:
    """Ack records who and why; acking twice is refused; a severity rise wants a new ack."""
    await storage.write_batches([batch(alarm(1, "raised", 1))])
    a = await only(storage)
    acked = await acknowledge(storage, a.id, user="张三", comment="已电话联系企业", now_ms=T0 + 5)
    assert (acked.ack_state, acked.acked_by, acked.ack_comment, acked.acked_ms) == (
        "acknowledged", "张三", "已电话联系企业", T0 + 5)
    with pytest.raises(AlarmStateError):
        await acknowledge(storage, a.id, user="李四")
    await storage.write_batches([batch(alarm(2, "changed", 2))])
    assert (await get_alarm(storage, a.id)).ack_state == "unacknowledged"
    assert await list_alarms(storage, ack="acknowledged") == []
    history = await alarm_history(storage, a.id)
    assert ("ack", "user", "张三", "已电话联系企业") in [
        (h.action, h.source, h.user, h.comment) for h in history]
    with pytest.raises(UnknownAlarmError):
        await acknowledge(storage, 999, user="x")


async def test_replayed_batches_change_nothing(storage: Storage) -> None:
    """The same batches again (a resend after a lost ack) add no history and no alarm."""
    batches = [batch(alarm(1, "raised", 1), alarm(2, "changed", 2)), batch(alarm(3, "cleared", 0))]
    for b in batches:
        await storage.write_batches([b])
    (a,) = await list_alarms(storage)
    before = await alarm_history(storage, a.id)
    for b in batches:
        await storage.write_batches([b])
    await storage.write_batches(batches)
    assert [x.id for x in await list_alarms(storage)] == [a.id]
    assert (await get_alarm(storage, a.id)).state == "cleared"
    assert await alarm_history(storage, a.id) == before


async def test_backlog_older_than_a_known_clear_does_not_reopen(storage: Storage) -> None:
    """After a live clear, backlog events from before it are history only ('stale')."""
    await storage.write_batches([batch(alarm(1, "raised", 1), alarm(4, "cleared", 0))])
    (a,) = await list_alarms(storage)
    # the outage's backlog arrives late: a level change and a re-raise older than the clear
    await storage.write_batches([batch(alarm(2, "changed", 2), alarm(3, "raised", 1))])
    a = await get_alarm(storage, a.id)
    assert (a.state, a.severity, a.last_event_ms) == ("cleared", 1, T0 + 4000)
    assert len(await list_alarms(storage)) == 1
    notes = [(h.seq, h.note, h.applied) for h in await alarm_history(storage, a.id)]
    assert (2, "stale", False) in notes and (3, "stale", False) in notes


async def test_clear_arriving_before_its_raise(storage: Storage) -> None:
    """A clear that overtakes its raise leaves no active alarm when the raise comes."""
    await storage.write_batches([batch(alarm(5, "cleared", 0))])
    await storage.write_batches([batch(alarm(4, "raised", 2))])
    assert await list_alarms(storage, state="active") == []


async def test_seq_orders_within_a_stream_time_across_streams(storage: Storage) -> None:
    """Within a stream seq wins over a clock stepped back; a new stream is ordered by time."""
    await storage.write_batches([batch(alarm(1, "raised", 1, ts=T0 + 10_000))])
    # clock stepped back on the edge: seq 2 carries an earlier time but is the newer event
    await storage.write_batches([batch(alarm(2, "cleared", 0, ts=T0 + 5_000))])
    assert await list_alarms(storage, state="active") == []
    # the outbox was replaced (new stream): an event older than the newest known is stale
    await storage.write_batches([batch(alarm(1, "raised", 1, ts=T0 + 4_000), stream="s2")])
    assert await list_alarms(storage, state="active") == []
    await storage.write_batches([batch(alarm(2, "raised", 1, ts=T0 + 20_000), stream="s2")])
    assert len(await list_alarms(storage, state="active")) == 1


async def test_flapping_counts_without_notifying_then_settles(storage: Storage) -> None:
    """More than 3 raise/clear transitions in 60 s: the alarm stays active and flapping, later
    transitions only count, and the rules tick clears it once the window passed quietly."""
    recs = [alarm(i, "raised" if i % 2 else "cleared", 1 if i % 2 else 0, ts=T0 + i * 1000)
            for i in range(1, 9)]
    await storage.write_batches([batch(*recs[:3])])  # raise, clear, raise: normal
    await storage.write_batches([batch(*recs[3:])])  # the 4th transition starts flapping
    active = await list_alarms(storage, state="active")
    assert len(active) == 1 and active[0].flapping
    a = active[0]
    history = await alarm_history(storage, a.id)
    assert [(h.seq, h.note, h.notify) for h in history] == [
        (3, "opened", True), (4, "flapping", False), (5, "flap_counted", False),
        (6, "flap_counted", False), (7, "flap_counted", False), (8, "flap_counted", False)]
    rules = AlarmRules(storage, offline_after_ms=10**12, interval_s=1,
                       policy=storage.alarm_policy)
    assert (await rules.tick(T0 + 30_000)).changes == ()  # still inside the window
    tick = await rules.tick(T0 + 8_000 + 61_000)
    assert [(c.alarm_id, c.outcome, c.notify) for c in tick.changes] == [(a.id, "closed", True)]
    a = await get_alarm(storage, a.id)
    assert (a.state, a.flapping, a.cleared_ms) == ("cleared", False, T0 + 8_000)


async def test_manual_clear_while_edge_still_active(storage: Storage) -> None:
    """A person may clear an alarm the edge still reports; the edge's next change opens anew."""
    await storage.write_batches([batch(alarm(1, "raised", 1))])
    a = await only(storage)
    cleared = await clear_alarm(storage, a.id, user="王五", comment="现场确认误报")
    assert (cleared.state, cleared.cleared_by, cleared.clear_comment) == (
        "cleared", "王五", "现场确认误报")
    assert (await alarm_history(storage, a.id))[-1].note == "edge_still_active"
    with pytest.raises(AlarmStateError):
        await clear_alarm(storage, a.id, user="王五")
    await storage.write_batches([batch(alarm(2, "changed", 2))])
    b = await only(storage, state="active")
    assert b.id != a.id and b.severity == 2
    await storage.write_batches([batch(alarm(3, "cleared", 0))])
    assert await list_alarms(storage, state="active") == []


async def test_bad_alarm_record_is_stored_but_moves_nothing(storage: Storage) -> None:
    """An ALARM record without alarm_id is kept in events and skipped by the lifecycle."""
    bad = Record(seq=1, kind=RecordKind.ALARM, ts_ms=T0, point="d/p", value=1.0,
                 attrs={"state": "raised", "level": 1})
    (res,) = await storage.write_batches([batch(bad, alarm(2, "raised", 1))])
    assert res.inserted == 2
    assert len(await list_alarms(storage)) == 1


# --- areas, propagation, incidents ------------------------------------------------------------


async def test_area_propagation_and_summary(storage: Storage) -> None:
    """A district sees the alarms of sites under it; a sibling district does not; the summary
    counts active alarms by severity for the area and each child."""
    ids = await sites(storage)
    await storage.write_batches([batch(alarm(1, "raised", 2)),
                                 batch(alarm(1, "raised", 1, key="tank-1/level/low"), gw="gw-c")])
    assert [a.gw for a in await list_alarms(storage, area_id=ids["d1"], state="active",
                                            ack="unacknowledged")] == [GW]
    assert [a.gw for a in await list_alarms(storage, area_id=ids["d2"])] == ["gw-c"]
    assert len(await list_alarms(storage, area_id=ids["city"])) == 2
    assert (await only(storage, area_id=ids["street"])).area_name == "示范企业"
    s = await area_summary(storage, ids["city"])
    assert (s.active, s.by_severity, s.unacknowledged) == (2, {1: 1, 2: 1}, 2)
    assert [(c.code, c.active, c.by_severity) for c in s.children] == [
        ("d1", 1, {2: 1}), ("d2", 1, {1: 1})]
    a = await only(storage, gw=GW)
    await acknowledge(storage, a.id, user="张三")
    assert (await area_summary(storage, ids["d1"])).unacknowledged == 0


async def test_area_rules_and_seed(storage: Storage) -> None:
    """Levels only go down, codes are unique, gateways stand at sites; the Wuhan seed is
    idempotent and holds the 13 districts and the demo gateways."""
    ids = await sites(storage)
    with pytest.raises(AreaPlacementError):
        await create_area(storage, parent_id=ids["site1"], level="site", code="x", name_zh="x")
    with pytest.raises(AreaPlacementError):
        await create_area(storage, parent_id=ids["d1"], level="street", code="y", name_zh="y",
                          kind="enterprise")
    with pytest.raises(DuplicateAreaError):
        await create_area(storage, parent_id=ids["d1"], level=AreaLevel.STREET, code="s1",
                          name_zh="重复")
    with pytest.raises(AreaPlacementError):
        await assign_gateway(storage, "gw-x", ids["d1"])
    first = await seed_areas(storage, SEED_DIR / "wuhan.yaml")
    assert await seed_areas(storage, SEED_DIR / "wuhan.yaml") == first
    wuhan = next(n for n in await area_tree(storage) if n.area.code == "420100")
    names = [c.area.name_zh for c in wuhan.children]
    assert len(names) == 13 and {"江岸区", "硚口区", "东西湖区", "新洲区"} <= set(names)

    def gateways(n: Any) -> list[str]:
        return [*n.gateways, *(g for c in n.children for g in gateways(c))]
    assert sorted(gateways(wuhan)) == ["wh-hongshan-03", "wh-jiangan-01", "wh-qingshan-02",
                                       "wh-xinzhou-04"]


async def test_incidents_group_alarms_of_one_site(storage: Storage) -> None:
    """Alarms at one site share an open incident; another site gets its own; an incident closes
    a window after its last alarm cleared, and the next alarm opens a new one."""
    await sites(storage)
    await storage.write_batches([batch(alarm(1, "raised", 1)),
                                 batch(alarm(1, "raised", 1), gw="gw-b"),
                                 batch(alarm(1, "raised", 1), gw="gw-c")], now_ms=T0)
    by_gw = {a.gw: a for a in await list_alarms(storage)}
    assert by_gw[GW].incident_id == by_gw["gw-b"].incident_id is not None
    assert by_gw["gw-c"].incident_id not in (None, by_gw[GW].incident_id)
    await storage.write_batches([batch(alarm(2, "cleared", 0)),
                                 batch(alarm(2, "cleared", 0), gw="gw-b")], now_ms=T0 + 100)
    rules = AlarmRules(storage, offline_after_ms=10**12, interval_s=1,
                       policy=storage.alarm_policy)
    assert (await rules.tick(T0 + 100 + 29_000)).incidents_closed == ()
    tick = await rules.tick(T0 + 100 + 31_000)
    assert tick.incidents_closed == (by_gw[GW].incident_id,)
    await storage.write_batches([batch(alarm(3, "raised", 2))], now_ms=T0 + 40_000)
    fresh = await only(storage, gw=GW, state="active")
    assert fresh.incident_id not in (None, by_gw[GW].incident_id)


# --- central's rule, concurrency ----------------------------------------------------------------


async def test_gateway_offline_rule(storage: Storage) -> None:
    """A gateway silent for offline_alarm_after_s gets a gateway_offline alarm; once heard
    again the next tick clears it; ticks that change nothing write nothing."""
    await storage.record_state("gw-off", State(online=True, boot_id="b", version="v",
                                               bearer="4g", backlog=0, ts_ms=T0), now_ms=T0)
    rules = AlarmRules(storage, offline_after_ms=60_000, interval_s=1,
                       policy=storage.alarm_policy)
    assert (await rules.tick(T0 + 60_000)).changes == ()
    (c,) = (await rules.tick(T0 + 61_000)).changes
    a = await only(storage, state="active")
    assert (a.id, a.gw, a.type, a.source, a.severity, a.device) == (
        c.alarm_id, "gw-off", "gateway_offline", "central", 1, "")
    assert (await rules.tick(T0 + 90_000)).changes == ()
    await storage.record_state("gw-off", State(online=True, boot_id="b2", version="v",
                                               bearer="4g", backlog=9, ts_ms=T0 + 95_000),
                               now_ms=T0 + 95_000)
    (c,) = (await rules.tick(T0 + 96_000)).changes
    assert (c.outcome, (await get_alarm(storage, a.id)).cleared_by) == ("closed", "central")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_two_workers_racing_on_one_alarm(kind: str, tmp_path: Path) -> None:
    """Two storage instances (two connections, as two workers) writing raise events for the
    same key at once — distinct and identical batches — end with exactly one active alarm,
    each record once in its history, and the central rule raised once."""
    async with backend(kind, tmp_path, n=2) as (w1, w2):
        raises = [batch(alarm(s, "raised" if s == 1 else "changed", 1 + s % 2)) for s in
                  range(1, 13)]
        other = [batch(alarm(s, "raised", 1), stream="s9") for s in range(1, 5)]
        jobs = [w.write_batches([b]) for i, b in enumerate(raises + other)
                for w in ((w1, w2) if i % 3 == 0 else ((w1, w2)[i % 2],))]
        await asyncio.gather(*jobs)
        active = await list_alarms(w1, state="active")
        assert len(active) == 1 and len(await list_alarms(w2)) == 1
        assert active[0].severity == 2
        seqs = [(h.stream, h.seq) for h in await alarm_history(w1, active[0].id)]
        assert len(seqs) == len(set(seqs)) == len(raises) + len(other)
        # Batches of one gateway also meet on its `gateways` row; events applied on their own
        # meet only on the alarm's key lock: race those, on a key with history, many rounds.
        for w in (w1, w2):
            w.alarm_policy = AlarmPolicy(flap_window_ms=1)
        for r in range(10):
            ts = T0 + r * 10_000
            await asyncio.gather(*(apply_alarm_events(w, [AlarmEvent(
                gw="gw-k", alarm_key=KEY, rule="high", state=EdgeState.RAISED, level=1 + i,
                ts_ms=ts + i, stream=f"w{i}", seq=r + 1)], now_ms=ts) for i, w in enumerate(
                    (w1, w2, w1, w2))))
            assert len(await list_alarms(w2, gw="gw-k", state="active")) == 1
            await apply_alarm_events(w1, [AlarmEvent(gw="gw-k", alarm_key=KEY, rule="high",
                                                     state=EdgeState.CLEARED, level=0,
                                                     ts_ms=ts + 5000)], now_ms=ts + 5000)
        assert len(await list_alarms(w1, gw="gw-k")) == 10
        await w1.record_state("gw-r", State(online=False, boot_id="b", version="v", bearer="",
                                            backlog=0, ts_ms=T0), now_ms=T0)
        r1, r2 = (AlarmRules(w, offline_after_ms=1000, interval_s=1, policy=AlarmPolicy())
                  for w in (w1, w2))
        await asyncio.gather(r1.tick(T0 + 5000), r2.tick(T0 + 5000), r1.tick(T0 + 5001))
        assert len(await list_alarms(w2, gw="gw-r", state="active")) == 1


async def test_partial_unique_index_refuses_a_second_active_alarm(storage: Storage) -> None:
    """The database itself refuses two active alarms for one (gw, alarm_key)."""
    await storage.write_batches([batch(alarm(1, "raised", 1))])

    def second() -> Any:
        yield Sql("INSERT INTO alarms (gw, alarm_key, type, source, severity, level, raised_ms,"
                  " last_event_ms, created_ms, updated_ms) VALUES (?, ?, 'high', 'edge', 1, 1,"
                  " 0, 0, 0, 0)", (GW, KEY))

    with pytest.raises(Exception, match="(?i)unique|rolled back"):
        await storage.run(second)


def test_event_from_record_reads_the_edge_attrs() -> None:
    """The edge's attrs map onto an event; a bad state or level is refused."""
    ev = event_from_record("g", "s", alarm(7, "changed", 2, value=51.5))
    assert (ev.alarm_key, ev.rule, ev.state, ev.level, ev.value, ev.threshold, ev.seq) == (
        KEY, "high", "changed", 2, 51.5, 50.0, 7)
    for attrs in ({"alarm_id": KEY, "state": "weird", "level": 1},
                  {"alarm_id": KEY, "state": "raised", "level": 0},
                  {"alarm_id": KEY, "state": "raised", "level": True}):
        with pytest.raises(BadAlarmRecordError):
            event_from_record("g", "s", Record(seq=1, kind=RecordKind.ALARM, ts_ms=T0,
                                               point="d/p", value=1.0, attrs=attrs))


# --- HTTP -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(db_url: str) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(Settings(db_url=db_url, offline_alarm_after_s=60), run_ingest=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        await authorize(app, c)
        yield app, c


async def test_api_areas_alarms_ack_clear(tmp_path: Path) -> None:
    """Areas are created and gateways placed over HTTP; alarms list by area, state and ack;
    ack and clear take a user and comment; wrong states and bad areas are problem JSON."""
    async with serve(f"sqlite:///{tmp_path}/c.db") as (app, c):
        async def post(path: str, body: dict[str, Any], status: int = 201) -> Any:
            r = await c.post(path, json=body)
            assert r.status_code == status, r.text
            return r.json()
        city = await post("/api/areas", {"level": "city", "code": "420100", "name_zh": "武汉市"})
        dist = await post("/api/areas", {"parent_id": city["id"], "level": "district",
                                         "code": "420102", "name_zh": "江岸区"})
        site = await post("/api/areas", {"parent_id": dist["id"], "level": "site",
                                         "code": "s-1", "name_zh": "示范企业",
                                         "kind": "enterprise"})
        bad = await post("/api/areas", {"parent_id": site["id"], "level": "district",
                                        "code": "x", "name_zh": "x"}, 422)
        assert "district" in bad["detail"]
        await post("/api/areas", {"level": "city", "code": "420100", "name_zh": "again"}, 409)
        r = await c.put(f"/api/gateways/{GW}/area", json={"area_id": site["id"]})
        assert r.json()["area"]["code"] == "s-1"
        assert (await c.put(f"/api/gateways/{GW}/area", json={"area_id": 999})).status_code == 404
        (tree,) = (await c.get("/api/areas")).json()
        assert tree["children"][0]["children"][0]["gateways"] == [GW]

        storage: Storage = app.state.storage
        await storage.write_batches([batch(alarm(1, "raised", 1), alarm(2, "changed", 2))])
        q = {"area": dist["id"], "state": "active", "ack": "unacknowledged"}
        (a,) = (await c.get("/api/alarms", params=q)).json()
        assert (a["severity"], a["area_name"], a["point_ref"]) == (2, "示范企业", f"{GW}:gas-1:gas_lel")
        s = (await c.get(f"/api/areas/{city['id']}/summary")).json()
        assert (s["active"], s["by_severity"], s["children"][0]["active"]) == (1, {"2": 1}, 1)

        acked = await post(f"/api/alarms/{a['id']}/ack", {"comment": "收到"}, 200)
        # who acknowledged is the logged-in user (DESIGN.md §8), not a name in the body
        assert (acked["ack_state"], acked["acked_by"]) == ("acknowledged", ADMIN)
        await post(f"/api/alarms/{a['id']}/ack", {}, 409)
        assert (await c.get("/api/alarms", params=q)).json() == []
        await post(f"/api/alarms/{a['id']}/ack", {"user": "张三"}, 422)
        cleared = await post(f"/api/alarms/{a['id']}/clear", {"comment": "误报"}, 200)
        assert (cleared["state"], cleared["cleared_by"]) == ("cleared", ADMIN)
        await post(f"/api/alarms/{a['id']}/clear", {}, 409)
        await post(f"/api/alarms/{a['id']}/comment", {"comment": ""}, 422)  # ack/clear need none
        detail = (await c.get(f"/api/alarms/{a['id']}")).json()
        assert [h["action"] for h in detail["history"]] == [
            "raised", "changed", "ack", "manual_clear"]
        r = await c.get("/api/alarms/12345")
        assert r.status_code == 404 and "alarm" in r.json()["detail"]
        assert (await c.get("/api/areas/777/summary")).status_code == 404

        # central's offline rule, ticked by hand (the loop runs only with ingest)
        await storage.record_state("gw-silent", State(online=True, boot_id="b", version="v",
                                                      bearer="4g", backlog=0, ts_ms=T0),
                                   now_ms=T0)
        await app.state.alarm_rules.rules.tick(T0 + 61_000)
        (off,) = (await c.get("/api/alarms", params={"gw": "gw-silent"})).json()
        assert (off["type"], off["state"]) == ("gateway_offline", "active")
