"""Central's HTTP API and console against a real SQLite file (and a real Mosquitto once)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from central import cli
from central.app import create_app
from central.config.settings import Settings, SettingsError, load_settings
from central.storage import open_storage
from central.web.times import TimeParamError, parse_time
from protocols import envelope as env
from protocols import topics
from runtime.mqtt import Client as MqttClient
from tests.helpers import Mosquitto
from tests.identity import authorize

T0 = 1_700_000_000_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def seed(db_url: str) -> None:
    """Two gateways: gw-1 online with a birth and readings, gw-2 whose state says offline."""
    async with open_storage(db_url) as st:
        await st.record_state("gw-1", env.State(online=True, boot_id="b1", version="0.1.0",
                                                bearer="4g", backlog=5, ts_ms=now_ms()))
        await st.record_birth("gw-1", env.Birth(gw="gw-1", stream="s1", boot_id="b1",
                                                version="0.1.0", devices=(env.DeviceInfo(
            id="tank-3", profile="gas-detector", profile_hash="h", points=(
                env.PointInfo(ordinal=0, key="tank-3/gas", name_zh="可燃气体浓度", unit="%LEL"),
                env.PointInfo(ordinal=1, key="tank-3/o2", name_zh="氧气浓度", unit="%VOL"))),)))
        await st.write_batches([env.DataBatch(gw="gw-1", stream="s1", records=tuple(
            env.Record(seq=i, kind=env.RecordKind.TELEMETRY, ts_ms=T0 + i * 1000,
                       point="tank-3/gas", value=float(i)) for i in range(1, 11)))])
        await st.record_state("gw-2", env.State(online=False, boot_id="b2", version="0.1.0",
                                                bearer="bd", backlog=900, ts_ms=now_ms()))


@contextlib.asynccontextmanager
async def serve(settings: Settings, *,
                run_ingest: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an HTTP client talking ASGI to it."""
    app = create_app(settings, run_ingest=run_ingest)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as c:
        await authorize(app, c)
        yield c


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db", offline_after_s=60)
    await seed(settings.db_url)
    async with serve(settings) as c:
        yield c


async def test_health_reports_db_and_version(client: httpx.AsyncClient) -> None:
    """Health says the database answers, MQTT is not connected (ingest off), and the version."""
    body = (await client.get("/api/health")).json()
    assert body == {"status": "ok", "db": True, "mqtt_connected": False, "version": "0.1.0"}


async def test_gateways_list_with_online_state(client: httpx.AsyncClient) -> None:
    """The list shows each gateway with its effective online flag and backlog."""
    rows = (await client.get("/api/gateways")).json()
    assert [(g["gw"], g["online"], g["backlog"]) for g in rows] == [
        ("gw-1", True, 5), ("gw-2", False, 900)]


async def test_gateway_detail_has_devices_and_latest_values(client: httpx.AsyncClient) -> None:
    """A gateway's detail lists devices with named points and latest values."""
    g = (await client.get("/api/gateways/gw-1")).json()
    (dev,) = g["devices"]
    assert (dev["ref"], dev["profile"]) == ("gw-1:tank-3", "gas-detector")
    gas, o2 = dev["points"]
    assert (gas["ref"], gas["name_zh"], gas["unit"]) == ("gw-1:tank-3:gas", "可燃气体浓度", "%LEL")
    assert gas["latest"] == {"ts_ms": T0 + 10_000, "value": 10.0, "text": None}
    assert o2["latest"] is None


async def test_device_points(client: httpx.AsyncClient) -> None:
    """Points of a device by ref gw:device, with the latest value each."""
    pts = (await client.get("/api/devices/gw-1:tank-3/points")).json()
    assert [(p["point"], p["latest"] and p["latest"]["value"]) for p in pts] == [
        ("gas", 10.0), ("o2", None)]


async def test_series_with_epoch_and_iso_bounds(client: httpx.AsyncClient) -> None:
    """A series accepts from/to as epoch ms or ISO-8601 and reports truncation."""
    r = (await client.get("/api/points/gw-1:tank-3:gas/series",
                          params={"from": T0 + 2000, "to": T0 + 5000})).json()
    assert [s["value"] for s in r["samples"]] == [2.0, 3.0, 4.0] and not r["truncated"]
    iso_from = "2023-11-14T22:13:22+00:00"  # T0 + 2000
    assert parse_time("from", iso_from, 0) == T0 + 2000
    r = (await client.get("/api/points/gw-1:tank-3:gas/series",
                          params={"from": iso_from, "to": "2023-11-14T22:13:30Z",
                                  "limit": 3})).json()
    assert [s["ts_ms"] for s in r["samples"]] == [T0 + 2000, T0 + 3000, T0 + 4000]
    assert r["truncated"]


@pytest.mark.parametrize("path", ["/api/gateways/nope", "/api/devices/gw-1:nope/points",
                                  "/api/points/gw-1:tank-3:nope/series"])
async def test_unknown_things_are_404_problems(client: httpx.AsyncClient, path: str) -> None:
    """Unknown gateway, device or point gives a 404 problem JSON naming it."""
    r = await client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "nope" in r.json()["detail"]


@pytest.mark.parametrize("params", [{"from": "yesterday"}, {"limit": 0},
                                    {"from": T0 + 9000, "to": T0}])
async def test_bad_series_params_are_422_problems(client: httpx.AsyncClient,
                                                  params: dict[str, object]) -> None:
    """Bad time values and limits give a 422 problem JSON."""
    r = await client.get("/api/points/gw-1:tank-3:gas/series", params=params)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_bad_ref_is_422(client: httpx.AsyncClient) -> None:
    """A device ref without gw:device is a 422, not a 404 or a crash."""
    assert (await client.get("/api/devices/justone/points")).status_code == 422


async def test_metrics_and_console_and_openapi(client: httpx.AsyncClient) -> None:
    """/metrics is Prometheus text, / is the Chinese console, OpenAPI lists the routes."""
    m = await client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    assert "fieldlink_central_batches_total 0.0" in m.text
    page = await client.get("/")
    assert page.status_code == 200 and 'lang="zh-CN"' in page.text and "网关" in page.text
    assert (await client.get("/static/console.js")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/api/health", "/api/gateways", "/api/gateways/{gw}"} <= set(paths)


async def test_silent_gateway_shows_offline(tmp_path: Path) -> None:
    """A gateway whose state says online but that was not heard for offline_after_s is offline."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/c.db", offline_after_s=30)
    async with open_storage(settings.db_url) as st:
        await st.record_state("gw-9", env.State(online=True, boot_id="b", version="v", bearer="4g",
                                                backlog=0, ts_ms=T0), now_ms=now_ms() - 31_000)
    async with serve(settings) as c:
        (g,) = (await c.get("/api/gateways")).json()
        assert (g["online"], g["state_online"]) == (False, True)


async def test_end_to_end_mqtt_to_api(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A batch published by a gateway shows up in the API, and health says MQTT is connected."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/c.db", mqtt_host=mosquitto.host,
                        mqtt_port=mosquitto.port, mqtt_client_id=f"c-{uuid.uuid4().hex[:8]}")
    async with serve(settings, run_ingest=True) as c, asyncio.timeout(15):
        while not (await c.get("/api/health")).json()["mqtt_connected"]:
            await asyncio.sleep(0.05)
        batch = env.DataBatch(gw="gw-e2e", stream="s", records=(env.Record(
            seq=1, kind=env.RecordKind.TELEMETRY, ts_ms=T0, point="d/t", value=21.5),))
        async with MqttClient(mosquitto.host, mosquitto.port, identifier="gw-e2e") as gw:
            await gw.publish(topics.up("gw-e2e", "data"), env.encode(batch), qos=1)
        while (r := await c.get("/api/devices/gw-e2e:d/points")).status_code == 404:
            await asyncio.sleep(0.05)
        assert r.json()[0]["latest"]["value"] == 21.5
        assert "fieldlink_central_records_inserted_total 1.0" in (await c.get("/metrics")).text
        g = (await c.get("/api/gateways/gw-e2e")).json()
        assert g["last_seen_ms"] is not None and g["stream"] == "s"


def test_settings_from_toml_env_and_flags(tmp_path: Path) -> None:
    """TOML, then FIELDLINK_CENTRAL_* variables, then flags; None flags are ignored."""
    conf = tmp_path / "central.toml"
    conf.write_text('[central]\nmqtt_port = 1884\nhttp_port = 9000\nmqtt_shared = true\n')
    s = load_settings(conf, env={"FIELDLINK_CENTRAL_HTTP_PORT": "9100", "OTHER": "x"},
                      mqtt_host="broker", db_url=None)
    assert (s.mqtt_port, s.http_port, s.mqtt_shared, s.mqtt_host, s.db_url) == (
        1884, 9100, True, "broker", "sqlite:///./central.db")
    conf.write_text("[central]\nmqtt_port = 1884\nbogus = 1\n")
    with pytest.raises(SettingsError, match="bogus"):
        load_settings(conf)
    conf.write_text("mqtt_port = \n")
    with pytest.raises(SettingsError, match="line 1"):
        load_settings(conf)


def test_cli_version_help_and_usage_errors() -> None:
    """`central --version` and help exit 0 with an example; an unknown option exits 2."""
    runner = CliRunner()
    assert runner.invoke(cli.app, ["--version"]).output.strip() == "central 0.1.0"
    helped = runner.invoke(cli.app, ["serve", "--help"])
    assert helped.exit_code == 0 and "Example: central serve" in helped.output
    assert runner.invoke(cli.app, ["serve", "--bogus"]).exit_code == 2


def test_cli_serve_bad_settings_exit_1(tmp_path: Path) -> None:
    """`central serve` with settings that do not validate prints one error and exits 1."""
    result = CliRunner().invoke(cli.app, ["serve", "--mqtt-port", "70000", "--log-json"])
    assert result.exit_code == 1


def test_times_without_a_zone_are_the_duty_rooms() -> None:
    """An ISO time without a zone is Asia/Shanghai (UTC+8); with a zone or as epoch ms it is
    what it says."""
    assert parse_time("from", "2023-11-15T06:13:22", 0) == T0 + 2000  # 22:13:22 UTC
    assert parse_time("from", "2023-11-15T06:13:22+08:00", 0) == T0 + 2000
    assert parse_time("from", "2023-11-14T22:13:22Z", 0) == T0 + 2000
    assert parse_time("from", str(T0), 0) == T0
    with pytest.raises(TimeParamError):
        parse_time("from", "2023-13-01T00:00:00", 0)


async def test_series_next_cursor_continues_every_resolution(tmp_path: Path) -> None:
    """A truncated series carries `next`; passing it as `cursor` returns the rest of the window
    with nothing twice or missed, also for readings that share a time and for 1-minute
    buckets; a cursor not from this endpoint, or of another resolution, is a 422 problem."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db", offline_after_s=60)
    await seed(settings.db_url)
    base = T0 - T0 % 60_000
    async with open_storage(settings.db_url) as st:  # ten minutes, every 20 s, and twins
        await st.write_batches([env.DataBatch(gw="gw-1", stream=s, records=tuple(
            env.Record(seq=100 + i, kind=env.RecordKind.TELEMETRY, ts_ms=base + 600_000
                       + i * 20_000, point="tank-3/o2", value=float(i)) for i in range(30)))
            for s in ("s1", "s2")])
    ref = "/api/points/gw-1:tank-3:o2/series"
    window = {"from": base + 600_000, "to": base + 1_200_000}

    async def pages(c: httpx.AsyncClient, **params: object) -> list[dict[str, object]]:
        body = (await c.get(ref, params={**window, **params})).json()
        out = []
        while True:
            out.append(body)
            if body["next"] is None:
                assert not body["truncated"]
                return out
            assert body["truncated"]
            body = (await c.get(ref, params={**window, **params, "cursor": body["next"]})
                    ).json()

    async with serve(settings) as c:
        raw = await pages(c, limit=7)
        assert len(raw) == 9 and {b["resolution"] for b in raw} == {"raw"}
        values = [s["value"] for b in raw for s in b["samples"]]  # type: ignore[attr-defined]
        assert values == [float(i) for i in range(30) for _ in range(2)]
        minutes = await pages(c, resolution="1m", limit=4)
        buckets = [s for b in minutes for s in b["samples"]]  # type: ignore[attr-defined]
        assert [s["ts_ms"] for s in buckets] == [base + 600_000 + m * 60_000 for m in range(10)]
        assert sum(s["count"] for s in buckets) == 60
        wide = {"from": base + 600_000 - 6 * 3_600_000, "to": base + 1_200_000}
        first = (await c.get(ref, params={**wide, "limit": 4})).json()
        assert first["resolution"] == "1m"  # auto over 6 h: the cursor keeps it at 1m
        then = (await c.get(ref, params={**wide, "limit": 4, "cursor": first["next"]})).json()
        assert then["resolution"] == "1m" and then["samples"][0]["ts_ms"] == base + 840_000
        for bad in ({"cursor": "garbage"}, {"cursor": raw[0]["next"], "resolution": "1h"},
                    {"cursor": first["next"], "resolution": "raw"}):
            r = await c.get(ref, params={**window, **bad})
            assert r.status_code == 422, bad
            assert r.headers["content-type"].startswith("application/problem+json")
