"""The duty console's 一张图, alarm desk and honest states (issue 12) in a real headless
Chromium, against a real `central serve` fed over MQTT by two simulated gateways.

`FIELDLINK_SCREENSHOTS=dir` keeps the screenshots (docs/screenshots/ comes from here)."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from central.storage import open_storage
from protocols import envelope as env
from protocols import topics
from tests.browser import OFFLINE, chromium, console_login, texts, viewport
from tests.fleet import Central
from tests.helpers import Mosquitto, wait_for
from tests.identity import PASSWORD, cli_user

pytestmark = pytest.mark.browser
JIANGAN, QINGSHAN = "gw-map-01", "gw-map-02"
POINT = "gas-1/gas_lel"
STATUS, STATUS_ZH = "gas-1/sensor_status", "传感器状态（0 正常 1 预热 2 标定 3 传感器故障）"


class SimGateway:
    """One gateway speaking the uplink contract with paho: state, birth, values, alarms."""

    def __init__(self, gw: str, port: int) -> None:
        self.gw, self.seq, self.acks = gw, 0, 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=gw)
        self.client.on_message = self._on_ack
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.down(gw, "ack"), qos=1)
        self.client.loop_start()

    def _on_ack(self, *_: Any) -> None:
        self.acks += 1

    def publish(self, msg: env.Message, name: str, retain: bool = False) -> None:
        self.client.publish(topics.up(self.gw, name), env.encode(msg), qos=1,
                            retain=retain).wait_for_publish(5)

    def state(self, online: bool, bearer: str = "ip") -> None:
        self.publish(env.State(online=online, boot_id="b1", version="0.1.0", bearer=bearer,
                               backlog=0, ts_ms=int(time.time() * 1000), stream=self.gw),
                     "state", retain=True)

    def birth(self) -> None:
        self.publish(env.Birth(gw=self.gw, stream=self.gw, boot_id="b1", version="0.1.0",
                               devices=(env.DeviceInfo(
                                   id="gas-1", profile="gas-detector-v1", profile_hash="h",
                                   points=(env.PointInfo(0, POINT, "可燃气体浓度", "%LEL"),
                                           env.PointInfo(1, STATUS, STATUS_ZH, ""))),)),
                     "birth")

    def send(self, *records: env.Record) -> None:
        n = self.acks
        self.publish(env.DataBatch(gw=self.gw, stream=self.gw, records=records,
                                   sent_ms=int(time.time() * 1000)), "data")
        wait_for(lambda: self.acks > n, timeout=10, what=f"central's ack to {self.gw}")

    def value(self, v: float, point: str = POINT) -> None:
        self.seq += 1
        self.send(env.Record(seq=self.seq, kind=env.RecordKind.TELEMETRY,
                             ts_ms=int(time.time() * 1000), point=point, value=v))

    def history(self, hours: int = 24, every_s: int = 300) -> None:
        """A day of readings from the backlog (a gas level that swells by day), oldest first."""
        now = int(time.time() * 1000)
        recs = []
        for i, ts in enumerate(range(now - hours * 3_600_000, now - 600_000, every_s * 1000)):
            self.seq += 1
            recs.append(env.Record(seq=self.seq, kind=env.RecordKind.TELEMETRY, ts_ms=ts,
                                   point=POINT, value=round(14 + 8 * math.sin(i / 40), 2),
                                   flags=env.Flag.HISTORICAL))
        self.send(*recs)

    def alarm(self, state: str, value: float) -> None:
        """The edge's level-2 gas rule raising or clearing (DESIGN.md §7), and the value."""
        self.seq += 2
        now = int(time.time() * 1000)
        attrs = {"alarm_id": f"{POINT}/high", "rule": "high", "state": state,
                 "level": 2 if state == "raised" else 0, "prev_level": 0 if state == "raised" else 2,
                 "threshold": 50.0, "since_ms": now}
        self.send(env.Record(seq=self.seq - 1, kind=env.RecordKind.ALARM, ts_ms=now, point=POINT,
                             value=value, attrs=attrs),
                  env.Record(seq=self.seq, kind=env.RecordKind.TELEMETRY, ts_ms=now, point=POINT,
                             value=value))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def build_areas(api: httpx.Client) -> dict[str, int]:
    city = api.post("/api/areas", json={"level": "city", "code": "420100",
                                        "name_zh": "武汉市"}).json()
    ids = {"city": city["id"]}
    for gw, code, name, lat, lon in ((JIANGAN, "420102", "江岸区", 30.615, 114.312),
                                     (QINGSHAN, "420107", "青山区", 30.640, 114.385)):
        d = api.post("/api/areas", json={"parent_id": city["id"], "level": "district",
                                         "code": code, "name_zh": name}).json()
        site = api.post("/api/areas", json={"parent_id": d["id"], "level": "site",
                                            "code": f"{code}-site", "name_zh": f"{name}示范企业",
                                            "kind": "enterprise"}).json()
        ids[code] = d["id"]
        assert api.put(f"/api/gateways/{gw}/area", json={"area_id": site["id"]}).status_code == 200
        if gw == JIANGAN:  # one by its own position, one by its site's
            r = api.put(f"/api/gateways/{gw}/position", json={"lat": lat, "lon": lon})
        else:
            r = api.put(f"/api/areas/{site['id']}/position", json={"lat": lat, "lon": lon})
        assert r.status_code == 200, r.text
    return ids


async def beidou_heartbeat(db_url: str, gw: str) -> None:
    """What central's narrowband receiver stores for a heartbeat that came by BeiDou."""
    async with open_storage(db_url) as st:
        await st.record_heartbeat(gw, bearer="beidou", backlog=300,
                                  ts_ms=int(time.time() * 1000))


# More of the city's fleet, for a map that looks like a duty room's: (gw, lat, lon, bearer)
# with bearer None for a gateway that went silent.
FLEET = (("gw-hy-01", 30.560, 114.240, "ip"), ("gw-wc-01", 30.555, 114.320, "ip"),
         ("gw-hs-01", 30.500, 114.420, "ip"), ("gw-hs-02", 30.470, 114.300, "ip"),
         ("gw-dxh-01", 30.680, 114.120, "ip"), ("gw-cd-01", 30.560, 113.980, None),
         ("gw-jx-01", 30.300, 114.300, "ip"), ("gw-jx-02", 30.200, 114.450, "pdt"),
         ("gw-hp-01", 30.900, 114.360, "ip"), ("gw-hp-02", 31.150, 114.390, "beidou"),
         ("gw-xz-01", 30.840, 114.800, "ip"), ("gw-hn-01", 30.300, 114.050, "ip"))


async def more_fleet(db_url: str) -> None:
    """Store what these gateways' last state messages said, as ingest would."""
    from central.console.geo import Position, set_gateway_position

    async with open_storage(db_url) as st:
        for gw, lat, lon, bearer in FLEET:
            await set_gateway_position(st, gw, Position(lat, lon))
            await st.record_state(gw, env.State(
                online=bearer is not None, boot_id="b", version="0.1.0", bearer=bearer or "ip",
                backlog=0, ts_ms=int(time.time() * 1000), stream=gw))


def shot(driver: Any, tmp_path: Path, name: str) -> None:
    out = Path(os.environ.get("FIELDLINK_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / f"{name}.png"))


def click(driver: Any, selector: str) -> None:
    """Click in one step (the live views re-render their rows when central pushes)."""
    driver.execute_script("document.querySelector(arguments[0]).click()", selector)


def chart_model(driver: Any, dom_id: str) -> dict[str, Any]:
    """What the ECharts instance in `dom_id` kept of its option: the vendored build is a custom
    one, and its production code drops an option it has no component or chart type for without
    a word (no console error), so a component missing from scripts/vendor_assets.py shows here.
    `markLines` counts the markLine models (one per series with a markLine, none without the
    component)."""
    return driver.execute_script("""
        const o = echarts.getInstanceByDom(document.getElementById(arguments[0])).getOption();
        return {keys: Object.keys(o), series: o.series.map((s) => s.type),
                markLines: (o.markLine || []).length};""",
        dom_id)


def severe_console_errors(driver: Any) -> list[str]:
    """The SEVERE entries of the browser console since the last call (script errors, failed
    loads, console.error), but the browser's own asking for a /favicon.ico the console has not."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and "/favicon.ico - Failed to load resource" not in e["message"]]


def watch_state(gw: str) -> Callable[[Any], str | None]:
    def state(d: Any) -> str | None:
        found = d.find_elements(By.CSS_SELECTOR, f'#watch li[data-gw="{gw}"]')
        return found[0].get_attribute("data-state") if found else None
    return state


def test_alarm_reaches_map_and_desk_stays_until_acked_and_outage_shows(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A level-2 alarm raised at a simulated gateway shows on the desk (with a banner) and on
    the map; cleared at the device before anyone looked, it stays on the desk as 已恢复 ·
    未确认 until 确认; a gateway cut from IP and heard by BeiDou turns to 北斗 on the map and
    its values go stale; with central stopped, the page says so in red and marks numbers stale.
    The network is off for everything but loopback the whole time."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    gws = [SimGateway(JIANGAN, mosquitto.port), SimGateway(QINGSHAN, mosquitto.port)]
    try:
        api = httpx.Client(base_url=central.base_url, timeout=10, headers=central.auth_headers())
        cli_user(central.db_url, "zhangsan", "operator")
        build_areas(api)
        wait_for(lambda: api.get("/api/health").status_code == 200, timeout=20,
                 what="central's ingest connected")
        for g in gws:
            g.state(True)
            g.birth()
            g.value(12.5)
            g.value(1, STATUS)  # warming up
        gws[0].history()
        asyncio.run(more_fleet(central.db_url))
        n_ip = 2 + sum(1 for f in FLEET if f[3] == "ip")
        ov = api.get("/api/console/overview").json()
        assert ov["counts"]["ip"] == n_ip, ov["counts"]

        with chromium(tmp_path / "chrome", extra_args=OFFLINE) as driver:
            viewport(driver, 1920, 1080)
            console_login(driver, central.base_url, "zhangsan", PASSWORD)
            wait = WebDriverWait(driver, 20, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException))
            wait.until(lambda d: d.find_element(By.ID, "n-ip").text == str(n_ip))
            wait.until(lambda d: d.find_element(By.ID, "map").get_attribute("data-rendered"))

            gws[0].alarm("raised", 55.5)
            raised_at = time.monotonic()
            (alarm,) = api.get("/api/alarms", params={"state": "active"}).json()
            row = f'tr[data-alarm-id="{alarm["id"]}"]'
            text = wait.until(lambda d: (t := d.find_element(By.CSS_SELECTOR, row).text)
                              and "未确认" in t and t)
            wait.until(lambda d: watch_state(JIANGAN)(d) == "alarm")
            assert "二级" in text and "告警中" in text and "55.50 %LEL" in text
            assert driver.find_element(By.ID, "n-alarm").text == "1"
            banner = driver.find_element(By.ID, "alarm-banner")
            assert banner.is_displayed() and "二级告警 1 条未确认" in banner.text
            print(f"alarm_to_screen_s={time.monotonic() - raised_at:.2f}")
            time.sleep(1.5)  # the ripple and tooltip settle
            shot(driver, tmp_path, "overview")
            model = chart_model(driver, "map")
            assert {"geo", "tooltip"} <= set(model["keys"]), model["keys"]
            # 叫应 terminals (none here), gateways, gateways in alarm
            assert model["series"] == ["scatter", "scatter", "effectScatter"], model["series"]
            driver.find_element(By.ID, "bigscreen").click()
            time.sleep(1.5)
            shot(driver, tmp_path, "bigscreen")
            assert driver.execute_script(
                "return document.documentElement.scrollHeight <= innerHeight"
                " && document.documentElement.scrollWidth <= innerWidth"), driver.execute_script(
                "return [document.documentElement.scrollHeight, document.documentElement.scrollWidth]")
            driver.find_element(By.ID, "bigscreen").click()

            # Cleared at the device before anyone acknowledged: it stays, now 已恢复, and the
            # current value stands beside the value at raise time.
            gws[0].alarm("cleared", 20.25)
            text = wait.until(lambda d: (t := d.find_element(By.CSS_SELECTOR, row).text)
                              and "已恢复" in t and t)
            assert "未确认" in text and "55.50 %LEL" in text and "20.25 %LEL" in text
            wait.until(lambda d: watch_state(JIANGAN)(d) is None)  # back to IP on the map
            assert driver.find_element(By.ID, "alarm-banner").is_displayed()  # still unacked
            click(driver, f'{row} button[data-action="history"]')
            wait.until(lambda d: "恢复" in d.find_element(
                By.CSS_SELECTOR, f'tr[data-history-of="{alarm["id"]}"]').text)
            driver.execute_script("document.getElementById('alarms').scrollIntoView()")
            shot(driver, tmp_path, "alarm-desk")

            # The device page: the live value and a day's trend from the 1-minute aggregates.
            click(driver, f'{row} a.gw-link')
            wait.until(lambda d: d.find_elements(
                By.CSS_SELECTOR, f'section[data-gw="{JIANGAN}"] button[data-trend]'))
            click(driver, f'section[data-gw="{JIANGAN}"] button[data-trend]')
            wait.until(lambda d: int(d.find_element(By.ID, "trend-chart")
                                     .get_attribute("data-points") or 0) > 100)
            time.sleep(1.0)
            driver.execute_script("document.querySelector('.gwpage').scrollIntoView()")
            shot(driver, tmp_path, "device-trend")
            model = chart_model(driver, "trend-chart")
            assert {"title", "tooltip", "grid", "xAxis", "yAxis"} <= set(model["keys"]), model
            assert set(model["series"]) == {"line"} and model["markLines"] == 1, model  # threshold
            driver.execute_script("scrollTo(0, 0)")

            driver.find_element(By.ID, "alarm-comment").send_keys("已电话核实，现场已通风")
            click(driver, f'{row} button[data-action="ack"]')
            wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, row))
            assert not driver.find_element(By.ID, "alarm-banner").is_displayed()
            acked = api.get(f"/api/alarms/{alarm['id']}").json()
            assert (acked["state"], acked["ack_state"], acked["acked_by"]) == (
                "cleared", "acknowledged", "zhangsan")

            # 青山's IP link is cut (its Will) and it is heard by BeiDou: 北斗 on the map, and
            # its values are stale on its page.
            gws[1].state(False)
            wait.until(lambda d: watch_state(QINGSHAN)(d) == "offline")
            asyncio.run(beidou_heartbeat(central.db_url, QINGSHAN))
            wait.until(lambda d: watch_state(QINGSHAN)(d) == "narrowband")
            item = f'#watch li[data-gw="{QINGSHAN}"]'
            text = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, item).text)
            assert "北斗短报文" in text and "青山区" in text
            click(driver, f"{item} a")
            stale = wait.until(lambda d: texts(d, f'section[data-gw="{QINGSHAN}"] tr.stale'))
            assert "已过时" in stale[0] and "12.50" in stale[0]
            (page,) = texts(driver, f'section[data-gw="{QINGSHAN}"]')
            assert "传感器状态" in page and "预热 (1)" in page  # an enum point by its label

            # A narrow window still shows the map, the counts and the desk.
            viewport(driver, 430, 1300)
            driver.execute_script("scrollTo(0, 0)")
            time.sleep(1.0)
            shot(driver, tmp_path, "narrow")
            viewport(driver, 1920, 1080)
            assert severe_console_errors(driver) == []  # up to here, central was up throughout

            driver.execute_script("scrollTo(0, 0)")
            central.stop()
            outage = wait.until(lambda d: (e := d.find_element(By.ID, "outage")).is_displayed()
                                and e)
            assert "无法连接中心服务" in outage.text
            assert "stale" in (driver.find_element(By.TAG_NAME, "body").get_attribute("class")
                               or "")
            assert "告警状态未知" in driver.find_element(By.ID, "alarm-rows").text
            # the gateway page's next read fails: in Chinese, never the browser's words
            wait.until(lambda d: "无法连接中心服务器" in d.find_element(By.ID, "gateways").text)
            assert "Failed to fetch" not in driver.find_element(By.TAG_NAME, "body").text
            shot(driver, tmp_path, "outage")
        api.close()
    finally:
        for g in gws:
            g.close()
        central.stop()
