"""The 叫应 board's data (GET /api/console/board), in process on SQLite: re-sends, escalation
to the person in charge, answers, deadlines, and the area filter."""

from __future__ import annotations

from pathlib import Path

from central.callresp.service import CallRespService
from protocols.callresp import EventType
from protocols.envelope import DataBatch
from tests.test_callresp_workflow import (
    DEADLINE_S,
    GW1,
    GW2,
    event,
    ok,
    serve,
    street,
    street_warning,
)


async def test_board_counts_answers_resends_and_escalations(tmp_path: Path) -> None:
    """5 street terminals: t-1 answers, the rest are re-sent 3 times and escalated to the
    district's person in charge; the board says who answered, how often each was re-sent,
    whom it went to, and the open target's deadline; another district's area shows nothing."""
    async with serve("sqlite", tmp_path) as (app, c):
        areas = await street(app, c)
        svc: CallRespService = app.state.callresp
        w = await ok(c.post("/api/callresp/warnings", json={
            "level": "red", "text": "暴雨红色预警", "areas": [areas["street"]["id"]]}), 201)
        wid, t0 = w["id"], w["created_ms"]
        await svc.apply_batch(DataBatch(gw=GW1, stream="s1", records=(
            event(1, EventType.DELIVERED, wid, "t-1", t0 + 100),
            event(2, EventType.ACK, wid, "t-1", t0 + 2000))))
        board = await ok(c.get("/api/console/board"))
        (b,) = board["warnings"]
        assert (b["id"], b["level"], b["open"], b["answered"], b["waiting"]) == (
            wid, "red", True, 1, 4)
        by = {t["ref"]: t for t in b["targets"]}
        assert by["t-1"]["state"] == "answered" and by["t-1"]["due_ms"] is None
        assert by["t-2"]["due_ms"] == t0 + int(DEADLINE_S * 1000)

        d = DEADLINE_S * 1000
        for k in range(1, 4):
            await svc.fire_due(now_ms=t0 + int(k * d) + 5 * k)
        await svc.fire_due(now_ms=t0 + int(4 * d) + 100)
        (b,) = (await ok(c.get("/api/console/board")))["warnings"]
        by = {t["ref"]: t for t in b["targets"]}
        assert (b["resends"], b["escalations"], b["answered"], b["waiting"]) == (12, 4, 1, 1)
        assert [by[f"t-{i}"]["state"] for i in range(2, 6)] == ["escalated"] * 4
        assert by["t-3"]["attempts"] == 4
        boss = by["p-dist"]
        assert (boss["kind"], boss["name"], boss["state"]) == ("person", "区长", "sent")
        assert by["t-3"]["escalated_to"] == boss["id"] and boss["escalated_from"] is not None
        assert boss["area_name"] == "区" and by["t-3"]["area_name"] == "街道"

        await svc.apply_batch(DataBatch(gw=GW2, stream="s2", records=(
            event(1, EventType.ACK, wid, "d-1", t0 + int(4 * d) + 2000),)))
        (b,) = (await ok(c.get("/api/console/board")))["warnings"]
        assert (b["open"], b["answered"], b["waiting"]) == (False, 2, 0)  # kept an hour

        other = await ok(c.post("/api/areas", json={
            "parent_id": areas["city"]["id"], "level": "district", "code": "d2",
            "name_zh": "另一区"}), 201)
        assert (await ok(c.get("/api/console/board", params={"area": other["id"]}))
                )["warnings"] == []
        street_only = await ok(c.get("/api/console/board",
                                     params={"area": areas["street"]["id"]}))
        assert {t["ref"] for t in street_only["warnings"][0]["targets"]} == {
            f"t-{i}" for i in range(1, 6)}  # the person in charge stands in the district


async def test_terminals_stand_at_their_own_position_else_their_areas(tmp_path: Path) -> None:
    """On the overview: a terminal with its own lat/lon stands there, one without stands at
    its area's position, one whose area has none is left off; a district filter keeps only
    the terminals under it."""
    async with serve("sqlite", tmp_path) as (app, c):
        areas = await street(app, c)
        await ok(c.put(f"/api/areas/{areas['street']['id']}/position",
                       json={"lat": 30.60, "lon": 114.30}))
        await ok(c.put("/api/callresp/terminals/t-1", json={
            "gw": GW1, "area_id": areas["street"]["id"], "lat": 30.61, "lon": 114.31}))
        listed = {t["id"]: t for t in await ok(c.get("/api/callresp/terminals"))}
        assert (listed["t-1"]["lat"], listed["t-1"]["lon"], listed["t-2"]["lat"]) == (
            30.61, 114.31, None)
        marks = {t["id"]: t["position"] for t in
                 (await ok(c.get("/api/console/overview")))["terminals"]}
        assert marks["t-1"] == {"lat": 30.61, "lon": 114.31}
        assert marks["t-2"] == {"lat": 30.60, "lon": 114.30}
        assert "d-1" not in marks  # the district has no position
        assert sorted(marks) == ["t-1", "t-2", "t-3", "t-4", "t-5"]
        other = await ok(c.post("/api/areas", json={
            "parent_id": areas["city"]["id"], "level": "district", "code": "d2",
            "name_zh": "另一区"}), 201)
        assert (await ok(c.get("/api/console/overview", params={"area": other["id"]}))
                )["terminals"] == []


async def test_a_retired_gateways_terminals_leave_the_map_and_its_targets_show_cancelled(
        tmp_path: Path) -> None:
    """Gateway 1 retired mid-warning: on the board its open targets stand cancelled with the
    reason and no deadline, waiting for nobody; its terminals leave the map (as the gateway
    does) and come back with an unretire."""
    async with serve("sqlite", tmp_path) as (app, c):
        areas = await street(app, c)
        await ok(c.put(f"/api/areas/{areas['street']['id']}/position",
                       json={"lat": 30.60, "lon": 114.30}))
        svc: CallRespService = app.state.callresp
        await street_warning(c, areas)
        await ok(c.post(f"/api/gateways/{GW1}/retire", json={"reason": "decommissioned"}))
        await svc.step()
        (b,) = (await ok(c.get("/api/console/board")))["warnings"]
        by = {t["ref"]: t for t in b["targets"]}
        assert [(by[f"t-{i}"]["state"], by[f"t-{i}"]["closed_reason"], by[f"t-{i}"]["due_ms"])
                for i in (1, 4)] == [("cancelled", "gateway_retired", None),
                                     ("sent", None, by["t-4"]["due_ms"])]
        assert (b["open"], b["waiting"]) == (True, 2)
        overview = await ok(c.get("/api/console/overview"))
        assert sorted(t["id"] for t in overview["terminals"]) == ["t-4", "t-5"]
        await ok(c.post(f"/api/gateways/{GW1}/unretire", json={"reason": "repaired"}))
        assert len((await ok(c.get("/api/console/overview")))["terminals"]) == 5
