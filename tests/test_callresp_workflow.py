"""The 叫应 workflow in central (DESIGN.md §7), in process on SQLite and PostgreSQL: targets,
re-sends and escalation fired once each from durable timers, receipts and acks from ingested
event records, every step audited in the same transaction, the API with roles and area scope."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from central.app import create_app
from central.callresp.service import CallRespService
from central.callresp.settings import CallRespSettings
from central.config.settings import Settings
from protocols.callresp import CallRespEvent, EventType, event_attrs
from protocols.envelope import DataBatch, Record, RecordKind, State
from tests.identity import auth, authorize, token_for
from tests.pg import pg_schema

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
GW1, GW2 = "gw-cr-1", "gw-cr-2"
DEADLINE_S = 10.0


@contextlib.asynccontextmanager
async def serve(kind: str, tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path}/c.db" if kind == "sqlite"
               else stack.enter_context(pg_schema()))
        settings = Settings(db_url=url, command_key_path=tmp_path / "cmd.pem",
                            pki_dir=tmp_path / "pki",
                            callresp=CallRespSettings(deadline_red_s=DEADLINE_S, resends=3))
        app = create_app(settings, run_ingest=False)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
            await authorize(app, c)
            yield app, c


async def ok(r: Any, status: int = 200) -> Any:
    resp = await r
    assert resp.status_code == status, resp.text
    return resp.json()


async def street(app: FastAPI, c: httpx.AsyncClient) -> dict[str, Any]:
    """City / district / street; 5 terminals of the street on two gateways; the district's
    person in charge answers on terminal d-1 (on gw 2)."""
    city = await ok(c.post("/api/areas", json={"level": "city", "code": "c", "name_zh": "市"}), 201)
    dist = await ok(c.post("/api/areas", json={"parent_id": city["id"], "level": "district",
                                              "code": "d", "name_zh": "区"}), 201)
    st = await ok(c.post("/api/areas", json={"parent_id": dist["id"], "level": "street",
                                            "code": "s", "name_zh": "街道"}), 201)
    for gw in (GW1, GW2):
        await app.state.storage.record_state(gw, State(True, "b", "v", "eth", 0, 1, "s1"))
    for i in range(1, 6):
        await ok(c.put(f"/api/callresp/terminals/t-{i}",
                       json={"gw": GW1 if i <= 3 else GW2, "area_id": st["id"]}))
    await ok(c.put("/api/callresp/terminals/d-1", json={"gw": GW2, "area_id": dist["id"],
                                                        "kind": "video"}))
    await ok(c.put("/api/callresp/persons/p-dist", json={
        "name": "区长", "area_id": dist["id"], "role": "in_charge", "phone": "13800000000",
        "terminals": ["d-1"]}))
    return {"city": city, "dist": dist, "street": st}


def event(seq: int, kind: EventType, wid: str, terminal: str, at_ms: int) -> Record:
    attrs = event_attrs(CallRespEvent(kind, wid, terminal, at_ms,
                                      by="button" if kind is EventType.ACK else None))
    return Record(seq=seq, kind=RecordKind.EVENT, ts_ms=at_ms, point=None, value=None,
                  attrs=attrs)


def steps(w: dict[str, Any], step: str) -> list[dict[str, Any]]:
    return [s for s in w["steps"] if s["step"] == step]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_unanswered_terminals_are_resent_then_escalated_once(kind: str,
                                                                    tmp_path: Path) -> None:
    """5 terminals, 3 answer: the other 2 are re-sent 3 times each, then escalated to the
    district's person in charge (one target), who answers; firing again changes nothing; the
    play_warning commands, the step times and the audit rows say so."""
    async with serve(kind, tmp_path) as (app, c):
        areas = await street(app, c)
        svc: CallRespService = app.state.callresp
        w = await ok(c.post("/api/callresp/warnings", json={
            "level": "red", "text": "暴雨红色预警", "areas": [areas["street"]["id"]]}), 201)
        wid = w["id"]
        t0 = w["created_ms"]
        assert [t["ref"] for t in w["targets"]] == [f"t-{i}" for i in range(1, 6)]
        assert {t["state"] for t in w["targets"]} == {"sent"}
        sends = await ok(c.get("/api/commands", params={"gw": GW1}))
        assert [x["kind"] for x in sends] == ["play_warning"]
        assert sends[0]["args"]["terminals"] == ["t-1", "t-2", "t-3"]

        # Receipts from all five, acks from t-1, t-2 and t-4 (a batch sent twice: no change).
        recs = [event(i, EventType.DELIVERED, wid, f"t-{i}", t0 + 100) for i in (1, 2, 3)]
        recs += [event(4, EventType.ACK, wid, "t-1", t0 + 2000),
                 event(5, EventType.ACK, wid, "t-2", t0 + 3000)]
        for _ in range(2):
            await svc.apply_batch(DataBatch(gw=GW1, stream="s1", records=tuple(recs)))
        b2 = (event(1, EventType.DELIVERED, wid, "t-4", t0 + 100),
              event(2, EventType.DELIVERED, wid, "t-5", t0 + 100),
              event(3, EventType.ACK, wid, "t-4", t0 + 4000),
              event(4, EventType.ACK, wid, "t-1", t0 + 4000))  # not GW2's terminal: ignored
        await svc.apply_batch(DataBatch(gw=GW2, stream="s2", records=b2))

        d = DEADLINE_S * 1000
        assert await svc.fire_due(now_ms=t0 + d - 1) == []
        for k in range(1, 4):  # re-sends 2, 3, 4 — each fired twice, done once
            now = t0 + int(k * d) + 5 * k
            fired = await svc.fire_due(now_ms=now)
            assert sorted((s.target_id.split(".")[1], s.step, s.attempt) for s in fired) == [
                ("3", "resent", k + 1), ("5", "resent", k + 1)]
            assert await svc.fire_due(now_ms=now) == []
            await svc.issue_pending()
        fired = await svc.fire_due(now_ms=t0 + int(4 * d) + 100)
        assert sorted(s.step for s in fired) == ["escalated", "escalated"]
        await svc.issue_pending()

        w = await ok(c.get(f"/api/callresp/warnings/{wid}"))
        by = {t["ref"]: t for t in w["targets"]}
        assert {r: by[r]["state"] for r in by} == {
            "t-1": "answered", "t-2": "answered", "t-3": "escalated", "t-4": "answered",
            "t-5": "escalated", "p-dist": "sent"}
        assert by["t-1"]["answered_ms"] == t0 + 2000 and by["t-5"]["delivered_ms"] == t0 + 100
        assert by["t-3"]["attempts"] == 4 and by["t-3"]["escalated_to"] == by["p-dist"]["id"]
        assert by["p-dist"]["terminals"] == ["d-1"]
        assert len(steps(w, "resent")) == 6 and len(steps(w, "escalated")) == 2
        assert all(s["at_ms"] - s["due_ms"] < 1000 for s in steps(w, "resent"))

        # The person in charge answers on d-1; nothing more is due.
        await svc.apply_batch(DataBatch(gw=GW2, stream="s2", records=(
            event(5, EventType.ACK, wid, "d-1", t0 + int(4 * d) + 2000),)))
        assert await svc.fire_due(now_ms=t0 + int(20 * d)) == []
        w = await ok(c.get(f"/api/callresp/warnings/{wid}"))
        boss = next(t for t in w["targets"] if t["ref"] == "p-dist")
        assert (boss["state"], boss["answered_by"]) == ("answered", "p-dist")

        # Commands: to GW1, the first send (t-1..3) and 3 re-sends of t-3; to GW2, the first
        # send (t-4, t-5), 3 re-sends of t-5, and one call of the person in charge.
        gw1 = await ok(c.get("/api/commands", params={"gw": GW1}))
        gw2 = await ok(c.get("/api/commands", params={"gw": GW2}))
        assert sorted(tuple(x["args"]["terminals"]) for x in gw1) == [
            ("t-1", "t-2", "t-3")] + [("t-3",)] * 3
        assert sorted(tuple(x["args"]["terminals"]) for x in gw2) == [
            ("d-1",), ("t-4", "t-5")] + [("t-5",)] * 3

        auditor = await token_for(app, c, "aud", role="auditor")
        rows = await ok(c.get("/api/audit", params={"limit": 1000}, headers=auth(auditor)))
        actions = [a["action"] for a in rows if a["action"].startswith("callresp.")]
        assert actions.count("callresp.resent") == 6
        assert actions.count("callresp.escalated") == 2
        assert actions.count("callresp.answered") == 4
        assert actions.count("callresp.delivered") == 5
        assert actions.count("callresp.sent") == 6

        stats = await ok(c.get("/api/callresp/stats"))
        (ws,) = stats["by_warning"]
        assert (ws["targets"], ws["answered"]) == (6, 4)
        (ps,) = stats["by_person"]
        assert (ps["key"], ps["answered"], ps["answer_rate"]) == ("p-dist", 1, 1.0)


@pytest.mark.parametrize("kind", ["sqlite"])
async def test_roles_and_area_scope(kind: str, tmp_path: Path) -> None:
    """A viewer cannot issue a warning; an operator of another district cannot target this
    street and does not see its warning, its terminals or its groups; bad requests are problem
    JSON."""
    async with serve(kind, tmp_path) as (app, c):
        areas = await street(app, c)
        await ok(c.post("/api/areas", json={"parent_id": areas["city"]["id"],
                                            "level": "district", "code": "d2",
                                            "name_zh": "另一区"}), 201)
        body = {"level": "orange", "text": "大风", "terminals": ["t-1"]}
        viewer = await token_for(app, c, "v1", role="viewer")
        r = await c.post("/api/callresp/warnings", json=body, headers=auth(viewer))
        assert r.status_code == 403
        other = await token_for(app, c, "op2", role="operator", area="d2")
        r = await c.post("/api/callresp/warnings", json=body, headers=auth(other))
        assert r.status_code == 403, r.text
        mine = await token_for(app, c, "op1", role="operator", area="d")
        w = await ok(c.post("/api/callresp/warnings", json=body, headers=auth(mine)), 201)
        assert w["deadline_ms"] == 600_000 and w["created_by"] == "op1"
        r = await c.get(f"/api/callresp/warnings/{w['id']}", headers=auth(other))
        assert r.status_code == 404
        assert (await ok(c.get("/api/callresp/warnings", headers=auth(other)))) == []
        r = await c.post("/api/callresp/warnings", json={**body, "terminals": ["nope"]})
        assert r.status_code == 404
        r = await c.post("/api/callresp/warnings", json={"level": "red", "text": "x"})
        assert r.status_code == 422
        r = await c.post("/api/callresp/warnings", json={**body, "level": "purple"})
        assert r.status_code == 422
        r = await c.post("/api/callresp/warnings", json={**body, "text": " \u3000\n"})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "text"], r.text
        # The directory reads follow the same scope: a group is listed to a user only when
        # every terminal in it lies in the user's area (only then may a warning name it).
        await ok(c.put("/api/callresp/groups/g-street", json={"name": "街道喇叭",
                                                              "terminals": ["t-1", "t-2"]}))
        await ok(c.put("/api/callresp/groups/g-empty", json={"name": "空组", "terminals": []}))
        groups = {g["id"] for g in await ok(c.get("/api/callresp/groups", headers=auth(mine)))}
        assert groups == {"g-street", "g-empty"}
        groups = {g["id"] for g in await ok(c.get("/api/callresp/groups", headers=auth(other)))}
        assert groups == {"g-empty"}
        assert await ok(c.get("/api/callresp/terminals", headers=auth(other))) == []


@pytest.mark.parametrize("kind", BACKENDS)
async def test_two_workers_firing_together_fire_each_step_once(kind: str, tmp_path: Path) -> None:
    """Two central workers (own connections) firing the same due timers at once: every
    re-send is claimed by exactly one of them, recorded and audited once."""
    from central.callresp.directory import areas_program
    from central.callresp.workflow import fire_due_program
    from central.identity.audit import AuditLog
    from central.storage import open_storage

    async with serve(kind, tmp_path) as (app, c):
        areas = await street(app, c)
        svc: CallRespService = app.state.callresp
        w = await ok(c.post("/api/callresp/warnings", json={
            "level": "red", "text": "演练", "areas": [areas["street"]["id"]]}), 201)
        url = app.state.settings.db_url
        async with open_storage(url) as other:
            area_map = await svc.storage.run(areas_program, write=False)
            now = w["created_ms"] + int(DEADLINE_S * 1000) + 1
            a, b = AuditLog(svc.storage), AuditLog(other)
            import asyncio

            got = await asyncio.gather(
                svc.storage.run(lambda: fire_due_program(a, area_map, now)),
                other.run(lambda: fire_due_program(b, area_map, now)))
        assert sorted(s.target_id for s in got[0] + got[1]) == [t["id"] for t in w["targets"]]
        w = await ok(c.get(f"/api/callresp/warnings/{w['id']}"))
        assert len(steps(w, "resent")) == 5 and {t["attempts"] for t in w["targets"]} == {2}


async def test_a_send_issued_before_a_crash_is_not_issued_again(tmp_path: Path) -> None:
    """A command issued but not marked issued (central killed in between) is not issued a
    second time: the step's cmd_id is already held by the command store."""
    from central.storage.program import Sql

    async with serve("sqlite", tmp_path) as (app, c):
        areas = await street(app, c)
        svc: CallRespService = app.state.callresp
        await ok(c.post("/api/callresp/warnings", json={
            "level": "red", "text": "演练", "areas": [areas["street"]["id"]]}), 201)
        before = len(await ok(c.get("/api/commands")))

        def forget() -> Any:
            yield Sql("UPDATE cr_sends SET issued_ms = NULL")

        await svc.storage.run(forget)
        assert await svc.issue_pending() == 0
        assert len(await ok(c.get("/api/commands"))) == before == 2


# --- retired gateways -----------------------------------------------------------------------


async def street_warning(c: httpx.AsyncClient, areas: dict[str, Any]) -> dict[str, Any]:
    """A red warning to every terminal of the street (the answer to its POST)."""
    return await ok(c.post("/api/callresp/warnings", json={
        "level": "red", "text": "暴雨红色预警", "areas": [areas["street"]["id"]]}), 201)


async def retire(c: httpx.AsyncClient, gw: str) -> None:
    await ok(c.post(f"/api/gateways/{gw}/retire", json={"reason": "decommissioned"}))


def play_terminals(cmds: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return sorted(tuple(x["args"]["terminals"]) for x in cmds)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_new_warning_leaves_out_a_retired_gateways_terminals(kind: str,
                                                                      tmp_path: Path) -> None:
    """With gateway 1 retired: its terminals are not listed, a group lists them apart, a
    warning to the street calls only gateway 2's terminals and names the others skipped, a
    warning to its terminals alone is refused (409, nothing stored or sent); unretired, they
    are listed and called again."""
    async with serve(kind, tmp_path) as (app, c):
        areas = await street(app, c)
        await ok(c.put("/api/callresp/groups/g-mix", json={"name": "混合",
                                                           "terminals": ["t-1", "t-4"]}))
        await retire(c, GW1)
        listed = [t["id"] for t in await ok(c.get("/api/callresp/terminals"))]
        assert listed == ["d-1", "t-4", "t-5"]
        (g,) = await ok(c.get("/api/callresp/groups"))
        assert (g["terminals"], g["retired_terminals"]) == (["t-4"], ["t-1"])

        w = await street_warning(c, areas)
        assert [t["ref"] for t in w["targets"]] == ["t-4", "t-5"]
        assert w["skipped"] == [
            {"terminal": f"t-{i}", "gw": GW1, "person": None, "reason": "gateway_retired",
             "reason_zh": "网关已退役"} for i in (1, 2, 3)]
        assert await ok(c.get("/api/commands", params={"gw": GW1})) == []
        assert play_terminals(await ok(c.get("/api/commands", params={"gw": GW2}))) == [
            ("t-4", "t-5")]

        # A person stays a target, called on their terminals in service only.
        await ok(c.put("/api/callresp/persons/p-st", json={
            "name": "网格员", "area_id": areas["street"]["id"], "terminals": ["t-3", "t-4"]}))
        w = await ok(c.post("/api/callresp/warnings", json={
            "level": "blue", "text": "提醒", "persons": ["p-st"]}), 201)
        assert [(t["ref"], t["terminals"]) for t in w["targets"]] == [("p-st", ["t-3", "t-4"])]
        assert [(s["terminal"], s["person"]) for s in w["skipped"]] == [("t-3", "p-st")]
        person = next(x for x in await ok(c.get("/api/callresp/persons")) if x["id"] == "p-st")
        assert (person["terminals"], person["retired_terminals"]) == (["t-4"], ["t-3"])
        (sent,) = steps(w, "sent")
        assert len(sent["detail"]["cmd_ids"]) == 1  # gateway 2's: none decided for gateway 1
        assert play_terminals(await ok(c.get("/api/commands", params={"gw": GW2}))) == [
            ("t-4",), ("t-4", "t-5")]

        r = await c.post("/api/callresp/warnings", json={
            "level": "red", "text": "演练", "terminals": ["t-1", "t-2"], "groups": []})
        assert r.status_code == 409, r.text
        assert r.json()["detail"].startswith("所选终端所在网关均已退役") and GW1 in r.json()["detail"]
        assert len(await ok(c.get("/api/callresp/warnings"))) == 2
        assert await ok(c.get("/api/commands", params={"gw": GW1})) == []

        await ok(c.post(f"/api/gateways/{GW1}/unretire", json={"reason": "repaired"}))
        assert len(await ok(c.get("/api/callresp/terminals"))) == 6
        (g,) = await ok(c.get("/api/callresp/groups"))
        assert (g["terminals"], g["retired_terminals"]) == (["t-1", "t-4"], [])
        w = await ok(c.post("/api/callresp/warnings", json={
            "level": "red", "text": "演练", "terminals": ["t-1", "t-2"]}), 201)
        assert [t["ref"] for t in w["targets"]] == ["t-1", "t-2"] and w["skipped"] == []
        assert play_terminals(await ok(c.get("/api/commands", params={"gw": GW1}))) == [
            ("t-1", "t-2")]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_retired_mid_warning_its_targets_are_cancelled_not_escalated(
        kind: str, tmp_path: Path) -> None:
    """Gateway 1 retired while a warning runs: its open targets end `cancelled` at the
    scheduler's next round (its answered one stays answered), once, audited; no command goes
    to it again and only gateway 2's silent terminal is re-sent and escalated."""
    async with serve(kind, tmp_path) as (app, c):
        areas = await street(app, c)
        svc: CallRespService = app.state.callresp
        w = await street_warning(c, areas)
        wid, t0 = w["id"], w["created_ms"]
        await svc.apply_batch(DataBatch(gw=GW1, stream="s1", records=(
            event(1, EventType.ACK, wid, "t-1", t0 + 100),
            event(2, EventType.DELIVERED, wid, "t-2", t0 + 100))))
        await svc.apply_batch(DataBatch(gw=GW2, stream="s2", records=(
            event(1, EventType.ACK, wid, "t-4", t0 + 100),)))
        await retire(c, GW1)
        await svc.step()
        await svc.step()  # a second round finds nothing more to cancel
        assert await svc.cancel_retired() == []

        d = int(DEADLINE_S * 1000)
        for k in range(1, 5):
            fired = await svc.fire_due(now_ms=t0 + k * d + k)
            assert [(s.target_id, s.step) for s in fired] == [
                (f"{wid}.5", "resent" if k < 4 else "escalated")]
            await svc.issue_pending()

        w = await ok(c.get(f"/api/callresp/warnings/{wid}"))
        by = {t["ref"]: t for t in w["targets"]}
        assert {r: (t["state"], t["closed_reason"]) for r, t in by.items()} == {
            "t-1": ("answered", None), "t-2": ("cancelled", "gateway_retired"),
            "t-3": ("cancelled", "gateway_retired"), "t-4": ("answered", None),
            "t-5": ("escalated", None), "p-dist": ("sent", None)}
        assert by["t-3"]["due_ms"] is None and by["t-3"]["attempts"] == 1
        assert by["p-dist"]["escalated_from"] == by["t-5"]["id"]
        cancelled = steps(w, "cancelled")
        assert sorted(s["target_id"] for s in cancelled) == [by["t-2"]["id"], by["t-3"]["id"]]
        assert all(s["detail"] == {"reason": "gateway_retired", "gw": GW1} for s in cancelled)
        assert play_terminals(await ok(c.get("/api/commands", params={"gw": GW1}))) == [
            ("t-1", "t-2", "t-3")]
        assert svc.counters.cancelled == 2 and svc.counters.escalations == 1

        auditor = await token_for(app, c, "aud", role="auditor")
        rows = await ok(c.get("/api/audit", params={"action": "callresp.cancelled"},
                              headers=auth(auditor)))
        assert len(rows) == 2
        (ws,) = (await ok(c.get("/api/callresp/stats")))["by_warning"]
        assert (ws["targets"], ws["answered"]) == (4, 2)  # the cancelled two not counted


async def test_retired_between_a_step_and_its_send(tmp_path: Path) -> None:
    """Re-sends decided just before gateway 1 is retired are withheld from it (marked
    `gateway_retired`); at their next due time its targets are cancelled there and then,
    even with no round of the scheduler in between (another worker retired it)."""
    from central.storage.program import Sql

    async with serve("sqlite", tmp_path) as (app, c):
        areas = await street(app, c)
        svc: CallRespService = app.state.callresp
        w = await street_warning(c, areas)
        t0, d = w["created_ms"], int(DEADLINE_S * 1000)
        assert len(await svc.fire_due(now_ms=t0 + d + 1)) == 5  # re-sends, not yet issued
        await retire(c, GW1)
        assert await svc.issue_pending() == 1  # gateway 2's only

        def withheld() -> Any:
            return (yield Sql("SELECT DISTINCT gw, error FROM cr_sends WHERE error IS NOT NULL"))

        assert [tuple(r) for r in await svc.storage.run(withheld)] == [(GW1, "gateway_retired")]
        fired = await svc.fire_due(now_ms=t0 + 2 * d + 2)
        assert sorted((s.target_id[-1], s.step, s.due_ms is not None) for s in fired) == [
            ("1", "cancelled", True), ("2", "cancelled", True), ("3", "cancelled", True),
            ("4", "resent", True), ("5", "resent", True)]
        assert play_terminals(await ok(c.get("/api/commands", params={"gw": GW1}))) == [
            ("t-1", "t-2", "t-3")]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_retired_between_the_retired_read_and_the_issue(kind: str, tmp_path: Path) -> None:
    """A retire that commits after `issue_pending` read the retired gateways but before the
    command is stored: the store refuses it, the send is marked `gateway_retired` (no error
    escapes the scheduler), no command for gateway 1 is open, and the next round cancels its
    targets."""
    from central.storage.program import Sql

    async with serve(kind, tmp_path) as (app, c):
        areas = await street(app, c)
        svc: CallRespService = app.state.callresp
        store = svc.commands.store
        real_insert = store.insert

        async def retire_first(cmd: Any, **kwargs: Any) -> None:
            if cmd.gw == GW1:
                store.insert = real_insert
                await retire(c, GW1)
            await real_insert(cmd, **kwargs)

        store.insert = retire_first  # the real store, a retire injected before its insert
        w = await street_warning(c, areas)
        assert store.insert == real_insert  # the retire ran, inside the warning's issue

        def sends() -> Any:
            return (yield Sql("SELECT DISTINCT gw, error FROM cr_sends ORDER BY gw"))

        assert [tuple(r) for r in await svc.storage.run(sends)] == [
            (GW1, "gateway_retired"), (GW2, None)]
        assert await ok(c.get("/api/commands", params={"gw": GW1})) == []
        await svc.step()  # the scheduler goes on: nothing escaped it
        w = await ok(c.get(f"/api/callresp/warnings/{w['id']}"))
        assert {t["ref"]: (t["state"], t["closed_reason"]) for t in w["targets"]} == {
            "t-1": ("cancelled", "gateway_retired"), "t-2": ("cancelled", "gateway_retired"),
            "t-3": ("cancelled", "gateway_retired"), "t-4": ("sent", None),
            "t-5": ("sent", None)}
        assert svc.counters.issue_refused == 1 and svc.counters.cancelled == 3


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_version_2_database_gains_closed_reason(kind: str, tmp_path: Path) -> None:
    """A database at 叫应 schema version 2 (before `closed_reason`) is migrated to 3 on open
    and keeps its targets, which have no reason."""
    from central.callresp import schema
    from central.storage import open_storage
    from central.storage.program import Sql

    def at_version_2(pg: bool) -> Any:
        yield Sql(f"CREATE TABLE {schema.VERSION_TABLE} (version INTEGER NOT NULL)")
        for version, fn in enumerate(schema.MIGRATIONS[:2], start=1):
            for stmt in fn(pg):
                yield Sql(stmt)
            yield Sql(f"INSERT INTO {schema.VERSION_TABLE} (version) VALUES (?)", (version,))
        yield Sql("INSERT INTO cr_targets (id, warning_id, n, kind, ref, state, attempts,"
                  " created_ms) VALUES ('w.1', 'w', 1, 'terminal', 't-1', 'sent', 1, 0)")

    def reason() -> Any:
        return (yield Sql("SELECT id, closed_reason FROM cr_targets"))

    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path}/c.db" if kind == "sqlite"
               else stack.enter_context(pg_schema()))
        async with open_storage(url) as st:
            await st.run(lambda: at_version_2(kind == "postgres"))
            assert await st.run(lambda: schema.migrate_program(kind == "postgres")) == 3
            assert [tuple(r) for r in await st.run(reason)] == [("w.1", None)]
