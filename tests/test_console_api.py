"""The duty console's data (issue 12): the vendored map, positions on both backends, the
overview's states, the desk that keeps what nobody acknowledged, the live feed, and a health
check that says when ingest is down."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from central.app import STATIC, create_app
from central.config.settings import Settings
from central.demo.run import POSITIONS, SITE_POSITIONS
from central.storage import open_storage
from protocols.envelope import Birth, DataBatch, DeviceInfo, PointInfo, Record, RecordKind, State
from tests.fleet import Central
from tests.helpers import Mosquitto, free_port
from tests.identity import authorize, token_for
from tests.pg import BACKENDS, database_url

GEO = STATIC / "vendor" / "wuhan.geo.json"
POINT = "gas-1/gas_lel"


def vendor_module() -> Any:
    path = Path(__file__).resolve().parent.parent / "scripts" / "vendor_assets.py"
    spec = importlib.util.spec_from_file_location("vendor_assets", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vendor_assets"] = mod
    spec.loader.exec_module(mod)
    return mod


def inside(ring: list[list[float]], x: float, y: float) -> bool:
    hit = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:], strict=False):
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            hit = not hit
    return hit


def district_at(geo: dict[str, Any], lat: float, lon: float) -> str | None:
    for f in geo["features"]:
        g = f["geometry"]
        for poly in g["coordinates"] if g["type"] == "MultiPolygon" else [g["coordinates"]]:
            if inside(poly[0], lon, lat) and not any(inside(h, lon, lat) for h in poly[1:]):
                return str(f["properties"]["name"])
    return None


def test_echarts_compressed_rings_decode_to_the_points_they_encode() -> None:
    """The vendoring script's decoder inverts ECharts' zig-zag delta coding exactly."""
    vendor = vendor_module()
    points = [(117035, 31315), (117036, 31316), (117030, 31320), (117030, 31300)]
    text, prev = "", points[0]
    for x, y in points:
        for d in (x - prev[0], y - prev[1]):
            text += chr(((d << 1) ^ (d >> 31)) + 64)
        prev = (x, y)
    ring = vendor.decode_ring(text, list(points[0]), 1024.0)
    assert ring == [[round(x / 1024, 5), round(y / 1024, 5)] for x, y in points]
    with pytest.raises(vendor.VendorError):
        vendor.decode_ring("@", [0, 0], 1024.0)


def test_the_vendored_map_has_wuhans_13_districts_and_the_demo_stands_in_them() -> None:
    """wuhan.geo.json is plain GeoJSON (closed rings, lon/lat in Wuhan), one feature per
    district of the seed's tree, and each demo gateway lies inside its own district."""
    geo = json.loads(GEO.read_text(encoding="utf-8"))
    names = {f["properties"]["name"] for f in geo["features"]}
    assert len(names) == 13 and {"江岸区", "青山区", "洪山区", "新洲区", "黄陂区"} <= names
    seed = (Path(__file__).resolve().parent.parent / "central" / "seed" / "wuhan.yaml").read_text()
    assert all(n in seed for n in names)
    for f in geo["features"]:
        g = f["geometry"]
        assert "encodeOffsets" not in g
        for poly in g["coordinates"] if g["type"] == "MultiPolygon" else [g["coordinates"]]:
            for ring in poly:
                assert ring[0] == ring[-1] and len(ring) >= 4
                assert all(113.6 < x < 115.2 and 29.9 < y < 31.4 for x, y in ring)
    where = {"wh-jiangan-01": "江岸区", "wh-qingshan-02": "青山区", "wh-hongshan-03": "洪山区",
             "wh-xinzhou-04": "新洲区", "420116-site-01": "黄陂区"}
    for name, (lat, lon) in {**POSITIONS, **SITE_POSITIONS}.items():
        assert district_at(geo, lat, lon) == where[name], name


# --- the API, in process, on SQLite and on PostgreSQL -----------------------------------------


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def app(db_url: str, tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_app(Settings(db_url=db_url, command_key_path=tmp_path / "key.pem",
                              pki_dir=tmp_path / "pki"), run_ingest=False)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://central") as c:
        await authorize(app, c)
        yield c


async def areas(c: httpx.AsyncClient) -> dict[str, int]:
    city = (await c.post("/api/areas", json={"level": "city", "code": "420100",
                                             "name_zh": "武汉市"})).json()
    ids = {"city": city["id"]}
    for code, name in (("420102", "江岸区"), ("420107", "青山区")):
        d = (await c.post("/api/areas", json={"parent_id": city["id"], "level": "district",
                                              "code": code, "name_zh": name})).json()
        s = (await c.post("/api/areas", json={"parent_id": d["id"], "level": "site",
                                              "code": f"{code}-s", "name_zh": f"{name}企业",
                                              "kind": "enterprise"})).json()
        ids[code], ids[f"{code}-s"] = d["id"], s["id"]
    return ids


async def report(app: FastAPI, gw: str, *, online: bool = True, bearer: str = "ip") -> None:
    st = app.state.storage
    now = int(time.time() * 1000)
    await st.record_state(gw, State(online=online, boot_id="b", version="1", bearer=bearer,
                                    backlog=0, ts_ms=now, stream=gw))
    await st.record_birth(gw, Birth(gw=gw, stream=gw, boot_id="b", version="1", devices=(
        DeviceInfo(id="gas-1", profile="gas-detector-v1", profile_hash="h",
                   points=(PointInfo(0, POINT, "可燃气体浓度", "%LEL"),)),)))


async def alarm(app: FastAPI, gw: str, seq: int, state: str, value: float) -> None:
    now = int(time.time() * 1000)
    attrs = {"alarm_id": f"{POINT}/high", "rule": "high", "state": state,
             "level": 2 if state == "raised" else 0, "prev_level": 0, "threshold": 50.0,
             "since_ms": now}
    await app.state.storage.write_batches([DataBatch(gw=gw, stream=gw, records=(
        Record(seq=seq, kind=RecordKind.ALARM, ts_ms=now, point=POINT, value=value,
               attrs=attrs),
        Record(seq=seq + 1, kind=RecordKind.TELEMETRY, ts_ms=now, point=POINT, value=value)))])


async def test_overview_places_gateways_and_colours_them_by_state(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """A gateway's own position wins over its site's; states are alarm > offline >
    narrowband > ip; its district carries its worst active alarm; a gateway placed but never
    heard is offline; positions are admins' and audited, out-of-range ones refused."""
    ids = await areas(client)
    for gw, site in (("gw-a", "420102-s"), ("gw-b", "420107-s"), ("gw-c", "420107-s"),
                     ("gw-d", "420102-s")):
        assert (await client.put(f"/api/gateways/{gw}/area",
                                 json={"area_id": ids[site]})).status_code == 200
    assert (await client.put("/api/gateways/gw-a/position",
                             json={"lat": 30.615, "lon": 114.312})).status_code == 200
    assert (await client.put(f"/api/areas/{ids['420107-s']}/position",
                             json={"lat": 30.64, "lon": 114.385})).status_code == 200
    r = await client.put("/api/gateways/gw-a/position", json={"lat": 91, "lon": 114.3})
    assert r.status_code == 422
    await report(app, "gw-a")
    await report(app, "gw-b", bearer="beidou")
    await report(app, "gw-c", online=False)
    await alarm(app, "gw-a", 10, "raised", 55.5)

    ov = (await client.get("/api/console/overview")).json()
    marks = {g["gw"]: g for g in ov["gateways"]}
    assert {gw: m["state"] for gw, m in marks.items()} == {
        "gw-a": "alarm", "gw-b": "narrowband", "gw-c": "offline", "gw-d": "offline"}
    assert marks["gw-a"]["position"] == {"lat": 30.615, "lon": 114.312}
    assert marks["gw-b"]["position"] == {"lat": 30.64, "lon": 114.385}  # its site's
    assert marks["gw-d"]["position"] is None and marks["gw-d"]["last_seen_ms"] is None
    assert (marks["gw-a"]["severity"], marks["gw-a"]["district_name"]) == (2, "江岸区")
    assert ov["counts"] == {"alarm": 1, "narrowband": 1, "offline": 2, "ip": 0, "total": 4}
    districts = {d["name_zh"]: d for d in ov["districts"]}
    assert (districts["江岸区"]["severity"], districts["青山区"]["severity"]) == (2, 0)

    auditor = await token_for(app, client, "auditor-1", "auditor")
    audit = (await client.get("/api/audit", params={"limit": 50},
                              headers={"Authorization": f"Bearer {auditor}"})).json()
    assert {"gateway.positioned", "area.positioned"} <= {e["action"] for e in audit}
    viewer = await token_for(app, client, "viewer-1", "viewer")
    r = await client.put("/api/gateways/gw-a/position", json={"lat": 30, "lon": 114},
                         headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 403
    # a user of 青山区 sees only 青山's gateways and districts
    scoped = await token_for(app, client, "qingshan-1", "viewer", area="420107")
    ov = (await client.get("/api/console/overview",
                           headers={"Authorization": f"Bearer {scoped}"})).json()
    assert {g["gw"] for g in ov["gateways"]} == {"gw-b", "gw-c"}
    assert {d["name_zh"] for d in ov["districts"]} == {"青山区"}


async def test_desk_keeps_a_cleared_alarm_until_someone_acknowledges_it(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """A level-2 alarm that clears before anyone looked stays on the desk with the value it
    was raised at and the current value; acknowledged, it leaves; acknowledged but still
    active, it stays."""
    await report(app, "gw-a")
    await alarm(app, "gw-a", 10, "raised", 55.5)
    await alarm(app, "gw-a", 20, "cleared", 20.25)
    (a,) = (await client.get("/api/console/desk")).json()["alarms"]
    assert (a["state"], a["ack_state"], a["raised_value"]) == ("cleared", "unacknowledged", 55.5)
    assert a["current"]["value"] == 20.25
    assert (await client.post(f"/api/alarms/{a['id']}/ack", json={"comment": "已核实"})
            ).status_code == 200
    assert (await client.get("/api/console/desk")).json()["alarms"] == []
    await alarm(app, "gw-a", 30, "raised", 60.0)
    (b,) = (await client.get("/api/console/desk")).json()["alarms"]
    await client.post(f"/api/alarms/{b['id']}/ack", json={"comment": ""})
    (b,) = (await client.get("/api/console/desk")).json()["alarms"]
    assert (b["state"], b["ack_state"], b["raised_value"]) == ("active", "acknowledged", 60.0)


async def test_health_is_503_while_ingest_cannot_reach_the_broker(tmp_path: Path) -> None:
    """With ingest running and no broker, /api/health answers 503 'degraded' (a load
    balancer and the console read the status code); without ingest it is 200."""
    dead = free_port()
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/c.db", mqtt_port=dead,
                              command_key_path=tmp_path / "key.pem"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        r = await c.get("/api/health")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "degraded" and r.json()["mqtt_connected"] is False
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/c.db",
                              command_key_path=tmp_path / "key.pem"), run_ingest=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        assert (await c.get("/api/health")).status_code == 200


def test_live_events_need_a_login_and_push_overview_desk_and_ping(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """GET /api/console/events is refused without a login; logged in, the stream starts with
    the overview and the desk, pings, and pushes the desk again when an alarm arrives."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    try:
        headers = central.auth_headers()
        url = central.base_url + "/api/console/events"
        assert httpx.get(url, timeout=10).status_code == 401
        seen: list[tuple[str, Any]] = []
        with httpx.stream("GET", url, headers=headers, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    seen.append((str(event), json.loads(line[6:])))
                    names = [n for n, _ in seen]
                    if names == ["overview", "desk", "board", "ping"]:
                        import asyncio

                        async def raise_one() -> None:
                            async with open_storage(central.db_url) as st:
                                await st.write_batches([DataBatch(gw="gw-x", stream="s", records=(
                                    Record(seq=1, kind=RecordKind.ALARM, ts_ms=1_700_000_000_000,
                                           point=POINT, value=55.5, attrs={
                                               "alarm_id": f"{POINT}/high", "rule": "high",
                                               "state": "raised", "level": 2, "prev_level": 0,
                                               "threshold": 50.0,
                                               "since_ms": 1_700_000_000_000}),))])
                        asyncio.run(raise_one())
                    desks = [d for n, d in seen if n == "desk"]
                    if len(desks) == 2:
                        break
        assert seen[0][1]["counts"]["total"] == 0 and seen[1][1]["alarms"] == []
        assert [a["gw"] for a in desks[1]["alarms"]] == ["gw-x"]
    finally:
        central.stop()


async def test_alarm_list_pages_by_cursor_stable_under_inserts_with_a_time_range(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """`state=all` lists active and cleared alike; `X-Next-Cursor` continues the list exactly
    after the last alarm even when a new alarm is raised between pages; `from`/`to` bound the
    raise time (a time without a zone is Asia/Shanghai); a forged cursor is a 422 problem."""
    for i, gw in enumerate(("gw-a", "gw-b", "gw-c", "gw-d", "gw-e")):
        await report(app, gw)
        await alarm(app, gw, 10, "raised", 50.0 + i)
    await alarm(app, "gw-c", 20, "cleared", 10.0)
    everything = (await client.get("/api/alarms")).json()
    assert (await client.get("/api/alarms", params={"state": "all"})).json() == everything
    assert len(everything) == 5 and everything[-1]["gw"] == "gw-c"  # cleared last

    seen: list[int] = []
    params: dict[str, Any] = {"state": "all", "limit": 2}
    r = await client.get("/api/alarms", params=params)
    while True:
        assert r.status_code == 200
        seen += [a["id"] for a in r.json()]
        if len(seen) == 2:  # raised between pages: it sorts before the cursor, shifts nothing
            await report(app, "gw-f")
            await alarm(app, "gw-f", 10, "raised", 99.0)
        cursor = r.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in r.headers
            break
        assert r.headers["link"] == f'</api/alarms?state=all&limit=2&cursor={cursor}>; rel="next"'
        r = await client.get("/api/alarms", params={**params, "cursor": cursor})
    assert seen == [a["id"] for a in everything]

    raised = sorted(a["raised_ms"] for a in everything)
    window = (await client.get("/api/alarms", params={"from": raised[0], "to": raised[-1] + 1})
              ).json()
    assert {a["gw"] for a in window} == {"gw-a", "gw-b", "gw-c", "gw-d", "gw-e"}
    assert (await client.get("/api/alarms", params={"to": raised[0]})).json() == []
    # 08:00 in Wuhan is 00:00 UTC: naive ISO times are the duty room's
    late = (await client.get("/api/alarms", params={"from": "9999-12-31T08:00:00"})).json()
    assert late == []
    for bad in ({"cursor": "bm90LWEtY3Vyc29y"}, {"cursor": "!!"}, {"from": "tomorrow"},
                {"from": raised[-1], "to": raised[0]}, {"state": "both"}):
        r = await client.get("/api/alarms", params=bad)
        assert r.status_code == 422, bad
        assert r.headers["content-type"].startswith("application/problem+json")


async def test_series_pages_by_next_cursor_through_readings_that_share_a_time(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """On either backend, following `next` returns each reading of the window once, in time
    order, also when two streams hold readings of the same time."""
    await report(app, "gw-a")
    for stream in ("gw-a", "gw-a-old"):
        await app.state.storage.write_batches([DataBatch(gw="gw-a", stream=stream, records=tuple(
            Record(seq=100 + i, kind=RecordKind.TELEMETRY, ts_ms=1_000_000 + i * 10,
                   point=POINT, value=float(i)) for i in range(5)))])
    ref = "/api/points/gw-a:gas-1:gas_lel/series"
    params: dict[str, Any] = {"from": 1_000_000, "to": 1_000_050, "limit": 3}
    values: list[float] = []
    while True:
        body = (await client.get(ref, params=params)).json()
        values += [s["value"] for s in body["samples"]]
        if body["next"] is None:
            break
        params["cursor"] = body["next"]
    assert values == [float(i) for i in range(5) for _ in range(2)]
