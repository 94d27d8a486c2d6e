"""Retiring (decommissioning) a gateway, on SQLite and on PostgreSQL: admin only and audited
with its reason; refused while it has open alarms unless forced (then cleared and
acknowledged with the reason); off the lists, the area tree and the map; its history still
readable; its enrolment tokens voided and its pending commands cancelled; what it sends
afterwards refused by ingest and counted (in its row and in a metric by kind), not stored;
brought back only by an unretire."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from central.alarms.lifecycle import GATEWAY_OFFLINE
from central.alarms.rules import AlarmRules
from central.identity.audit import AuditLog
from central.identity.enrolment_store import TokenRefusedError
from central.identity.retire import retire as retire_gateway
from central.identity.retire import retired_set_program, retirements_program
from central.storage import open_storage
from protocols import topics
from protocols.envelope import Birth, DataBatch, Record, RecordKind, State, encode
from runtime.mqtt import Client as MqttClient
from tests import test_console_api as console
from tests.helpers import Mosquitto
from tests.identity import auth, token_for
from tests.test_console_api import POINT, alarm, areas, report
from tests.test_identity_api import running
from tests.test_metrics import _samples, central_on_broker
from tests.test_pki import _csr

# The console API's fixtures: the app in process on SQLite and on PostgreSQL, an admin client.
db_url, app, client = console.db_url, console.app, console.client
OLD, NEW = "gw-old", "gw-new"
REASON = "replaced by gw-new after the flood"


def reading(gw: str, seq: int, value: float) -> DataBatch:
    return DataBatch(gw=gw, stream=gw, records=(Record(
        seq=seq, kind=RecordKind.TELEMETRY, ts_ms=int(time.time() * 1000), point=POINT,
        value=value),))


async def retire(c: httpx.AsyncClient, gw: str, **body: Any) -> httpx.Response:
    return await c.post(f"/api/gateways/{gw}/retire", json={"reason": REASON, **body})


async def test_retire_keeps_history_drops_it_from_the_map_and_refuses_its_data(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    ids = await areas(client)
    for gw in (OLD, NEW):
        assert (await client.put(f"/api/gateways/{gw}/area",
                                 json={"area_id": ids["420107-s"]})).status_code == 200
        await report(app, gw, online=gw == NEW)
    await alarm(app, OLD, 10, "raised", 55.5)  # an active alarm and a reading
    token = await app.state.identity.service.issue_token(OLD)
    cmd = (await client.post("/api/commands", json={
        "gw": OLD, "kind": "request_diagnostics"})).json()
    assert cmd["state"] == "pending"

    # Who may, and typed refusals.
    viewer = await token_for(app, client, "viewer-1", "viewer")
    assert (await client.post(f"/api/gateways/{OLD}/retire", json={"reason": REASON},
                              headers=auth(viewer))).status_code == 403
    assert (await retire(client, "gw-never")).status_code == 404
    assert (await client.post(f"/api/gateways/{OLD}/retire", json={})).status_code == 422
    refused = await retire(client, OLD)
    assert refused.status_code == 409 and "open alarm" in refused.json()["detail"]
    assert {g["gw"] for g in (await client.get("/api/gateways")).json()} == {OLD, NEW}

    # Forced: the alarm is cleared and acknowledged with the reason; revoked; cancelled.
    r = await retire(client, OLD, force=True)
    assert r.status_code == 200, r.text
    done = r.json()
    assert (done["retired_by"], done["reason"], done["alarms_cleared"]) == (
        "test-admin", REASON, 1)
    assert done["tokens_voided"] == 1 and done["commands_cancelled"] == [cmd["cmd_id"]]
    # The voided token no longer enrols it (a stolen one cannot bring it back).
    with pytest.raises(TokenRefusedError):
        await app.state.identity.service.enrol(OLD, token.token, _csr(OLD)[1])
    assert (await retire(client, OLD)).status_code == 409  # retired already
    late = await client.post("/api/commands", json={"gw": OLD, "kind": "request_diagnostics"})
    assert late.status_code == 409 and "retired" in late.json()["detail"]
    shown = (await client.get(f"/api/commands/{cmd['cmd_id']}")).json()
    assert shown["state"] == "expired" and REASON in shown["detail"]
    alarms = (await client.get("/api/alarms", params={"gw": OLD})).json()
    assert [(a["state"], a["ack_state"], a["clear_comment"]) for a in alarms] == [
        ("cleared", "acknowledged", f"gateway retired: {REASON}")]

    # Off the lists, the area tree and the map (no "offline" for it); NEW stays.
    assert [g["gw"] for g in (await client.get("/api/gateways")).json()] == [NEW]
    ov = (await client.get("/api/console/overview")).json()
    assert [g["gw"] for g in ov["gateways"]] == [NEW]
    assert ov["counts"]["total"] == 1 and ov["counts"]["offline"] == 0
    tree = (await client.get("/api/areas")).json()
    site = tree[0]["children"][1]["children"][0]
    assert site["code"] == "420107-s" and site["gateways"] == [NEW]

    # Silent from now on, it gets no gateway_offline alarm; NEW, silent as long, does.
    storage = app.state.storage
    rules = AlarmRules(storage, offline_after_ms=60_000, interval_s=1,
                       policy=storage.alarm_policy)
    tick = await rules.tick(int(time.time() * 1000) + 3_600_000)
    assert {(c.gw, c.alarm_key) for c in tick.changes} == {(NEW, GATEWAY_OFFLINE)}

    # Its history stays readable.
    assert (await client.get(f"/api/gateways/{OLD}")).status_code == 200
    series = (await client.get(f"/api/points/{OLD}:gas-1:gas_lel/series")).json()
    assert [s["value"] for s in series["samples"]] == [55.5]
    before = await app.state.storage.count_records(OLD)

    # Heard again: its messages are refused (not acked), counted; NEW's are stored.
    acked = await app.state.ingest.store_group([], [reading(OLD, 20, 1.0), reading(NEW, 1, 2.0)])
    assert [b.gw for b in acked] == [NEW]
    assert await app.state.storage.count_records(OLD) == before
    assert (await app.state.storage.count_records(NEW)).readings == 1
    listed = (await client.get("/api/retired-gateways")).json()
    assert [(g["gw"], g["refused"]) for g in listed] == [(OLD, 1)]
    assert listed[0]["last_refused_ms"] is not None
    assert [g["gw"] for g in (await client.get("/api/gateways")).json()] == [NEW]

    # The audit log says who and why; bringing it back is explicit, audited, once.
    assert (await client.post(f"/api/gateways/{NEW}/unretire",
                              json={"reason": "not retired"})).status_code == 409
    back = await client.post(f"/api/gateways/{OLD}/unretire", json={"reason": "repaired"})
    assert back.status_code == 200 and back.json()["refused"] == 1
    assert {g["gw"] for g in (await client.get("/api/gateways")).json()} == {OLD, NEW}
    assert await app.state.ingest.store_group([], [reading(OLD, 21, 3.0)])
    auditor = await token_for(app, client, "auditor-1", "auditor")
    rows = (await client.get("/api/audit", params={"limit": 100},
                             headers=auth(auditor))).json()
    mine = {e["action"]: e for e in rows if e["target"] in (OLD, f"gateway:{OLD}")}
    assert mine["gateway.retired"]["actor"] == "test-admin"
    assert REASON in str(mine["gateway.retired"]["detail"])
    assert "repaired" in str(mine["gateway.unretired"]["detail"])
    assert mine["gateway.revoked"]["actor"] == "test-admin"  # its enrolment, by Enrolment
    assert (await client.get("/api/audit/verify", headers=auth(auditor))).json()["ok"]


async def _database_before_retiring(url: str) -> None:
    """A database at the schema version before `retired_gateways`, with a gateway in it."""
    if url.startswith("sqlite:"):
        import sqlite3

        from central.storage.sqlite_schema import MIGRATIONS, m008_retired_gateways

        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        before = MIGRATIONS[:MIGRATIONS.index(m008_retired_gateways)]
        for version, fn in enumerate(before, start=1):
            fn(conn)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute(f"INSERT INTO gateways (gw, stream) VALUES ('{OLD}', 's1')")
        conn.close()
        return
    from psycopg import AsyncConnection

    from central.storage.postgres_schema import MIGRATIONS as PG_MIGRATIONS

    async with await AsyncConnection.connect(url, autocommit=True) as pg:
        await pg.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                         " applied_ms BIGINT NOT NULL)")
        for version, step in enumerate(PG_MIGRATIONS[:-1], start=1):
            await step(pg)
            await pg.execute("INSERT INTO schema_version VALUES (%s, 0)", (version,))
        await pg.execute(f"INSERT INTO gateways (gw, stream) VALUES ('{OLD}', 's1')")


async def test_an_existing_database_migrates_and_can_retire(db_url: str) -> None:
    await _database_before_retiring(db_url)
    async with open_storage(db_url) as st:
        assert [g.gw for g in await st.list_gateways()] == [OLD]
        await retire_gateway(st, AuditLog(st), OLD, user="admin-1", reason=REASON)
        assert await st.list_gateways() == []
        (r,) = await st.run(retirements_program, write=False)
        assert (r.gw, r.retired_by, r.reason, r.refused) == (OLD, "admin-1", REASON, 0)


async def test_a_command_to_a_retired_gateway_is_checked_before_the_store_refuses_it(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """To a retired gateway a malformed body or bad args answer 422, as to any gateway: the
    request is wrong whatever the gateway's state. A well-formed command or site config gets
    the store's typed refusal, 409 `gateway-retired` naming the gateway; nothing is stored."""
    await report(app, OLD)
    assert (await retire(client, OLD)).status_code == 200
    for body in ({"gw": OLD, "kind": "no_such_kind"},  # refused by FastAPI's own validation
                 {"gw": OLD, "kind": "request_diagnostics", "ttl_s": -1},
                 {"gw": OLD, "kind": "set_poll_interval",
                  "args": {"device": "gas-1", "seconds": "soon"}},
                 {"gw": OLD, "kind": "sync_time", "args": {"central_ms": 1}},
                 {"gw": OLD, "kind": "write_point",
                  "args": {"device": "gas-1", "point": "no_such_point", "value": 1}}):
        r = await client.post("/api/commands", json=body)
        assert r.status_code == 422, (body, r.text)
    for toml in ("[gateway", '[gateway]\nid = "gw-other"\n'):
        r = await client.post(f"/api/gateways/{OLD}/config", json={"site_toml": toml})
        assert r.status_code == 422, (toml, r.text)

    refusal = {"type": "urn:fieldlink:problem:gateway-retired", "title": "Gateway retired",
               "status": 409, "gw": OLD,
               "detail": f"gateway {OLD} is retired: bring it back first (central gateways"
                         " unretire)"}
    r = await client.post("/api/commands", json={"gw": OLD, "kind": "request_diagnostics"})
    assert (r.status_code, r.headers["content-type"], r.json()) == (
        409, "application/problem+json", refusal)
    r = await client.post(f"/api/gateways/{OLD}/config",
                          json={"site_toml": f'[gateway]\nid = "{OLD}"\n'})
    assert (r.status_code, r.json()) == (409, refusal)
    assert (await client.get("/api/commands", params={"gw": OLD})).json() == []


async def test_a_retire_between_the_check_and_the_insert_lets_no_command_out(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """A retire that commits after the command was checked but before it is stored: the
    store refuses it in its own transaction (409), nothing is left open for the gateway, and
    the dispatcher's last look withholds what was listed before the retire."""
    await report(app, OLD)
    store = app.state.commands.service.store
    listed = (await client.post("/api/commands", json={
        "gw": OLD, "kind": "request_diagnostics"})).json()
    real_insert = store.insert

    async def retire_first(*args: Any, **kwargs: Any) -> None:
        assert (await retire(client, OLD)).status_code == 200
        await real_insert(*args, **kwargs)

    store.insert = retire_first  # the real store, a retire injected before its insert
    r = await client.post("/api/commands", json={"gw": OLD, "kind": "request_diagnostics"})
    assert r.status_code == 409 and "retired" in r.json()["detail"], r.text
    store.insert = real_insert
    commands = (await client.get("/api/commands", params={"gw": OLD})).json()
    assert [(x["cmd_id"], x["state"]) for x in commands] == [(listed["cmd_id"], "expired")]
    assert not await store.still_due(listed["cmd_id"])


async def test_the_dispatcher_withholds_a_command_listed_before_a_retire(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The dispatcher listed a command, then the gateway was retired (its cancel not yet
    run): the last look before publishing withholds it, tick after tick."""
    async with running("sqlite", tmp_path, broker=mosquitto) as env:
        storage, service = env.app.state.storage, env.app.state.commands.service
        real_due = service.store.due
        ticks: asyncio.Queue[list[str]] = asyncio.Queue()

        async def due_then_retire(**kwargs: Any) -> Any:
            listed = await real_due(**kwargs)
            if listed and await storage.run(retired_set_program, write=False) == frozenset():
                await retire_gateway(storage, AuditLog(storage), "gw-a", user="admin-1",
                                     reason=REASON, force=True)
            await ticks.put([c.cmd_id for c in listed])
            return listed

        service.store.due = due_then_retire  # the real store, a retire injected after `due`
        r = await env.c.post("/api/commands", headers=await env.token("boss", "admin"),
                             json={"gw": "gw-a", "kind": "request_diagnostics"})
        assert r.status_code == 201, r.text
        cmd_id = r.json()["cmd_id"]
        while await asyncio.wait_for(ticks.get(), 10) != [cmd_id]:
            pass  # ticks before the command was issued
        assert await asyncio.wait_for(ticks.get(), 10) == [cmd_id]  # that tick has ended
        assert service.counters.published == 0 and service.counters.withheld >= 1
        assert (await service.store.get(cmd_id)).sent_count == 0


async def test_a_retired_gateway_still_talking_shows_in_the_metrics(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Central ingesting from a real broker: a retired gateway's state, birth and data are
    refused and counted by kind in `fieldlink_central_retired_messages_total` (every kind
    there from 0, no gateway label), not among the rejections; its row counts them too."""
    async with central_on_broker(mosquitto, tmp_path) as c, \
            MqttClient(mosquitto.host, mosquitto.port, identifier=OLD) as gw:
        await gw.publish(topics.up(OLD, "data"), encode(reading(OLD, 1, 1.0)), qos=1)
        async with asyncio.timeout(10):
            while not (await c.get("/api/gateways")).json():
                await asyncio.sleep(0.05)
        before = _samples((await c.get("/metrics")).text)
        kinds = {(("kind", k),) for k in ("state", "birth", "data", "radio")}
        assert before["fieldlink_central_retired_messages"] == dict.fromkeys(kinds, 0)
        assert (await retire(c, OLD)).status_code == 200

        await gw.publish(topics.up(OLD, "state"), encode(State(True, "b2", "v", "eth", 0)),
                         qos=1, retain=True)
        await gw.publish(topics.up(OLD, "birth"), encode(Birth(OLD, OLD, "b2", "v")), qos=1)
        for seq in (2, 3, 4):
            await gw.publish(topics.up(OLD, "data"), encode(reading(OLD, seq, 2.0)), qos=1)
        async with asyncio.timeout(10):  # the list writes what waits in memory first
            while [g["refused"] for g in (await c.get("/api/retired-gateways")).json()] != [5]:
                await asyncio.sleep(0.05)
        text = (await c.get("/metrics")).text
        after = _samples(text)
        assert 'fieldlink_central_retired_messages_total{kind="data"} 3.0' in text
        assert 'fieldlink_central_retired_messages_total{kind="birth"} 1.0' in text
        assert 'fieldlink_central_retired_messages_total{kind="state"} 1.0' in text
        assert 'fieldlink_central_retired_messages_total{kind="radio"} 0.0' in text
        assert not any('gw="' in line for line in text.splitlines()
                       if line.startswith("fieldlink_central_retired_messages"))
        for rejected in ("messages_rejected", "records_rejected"):
            assert after[f"fieldlink_central_{rejected}"] == before[f"fieldlink_central_{rejected}"]
