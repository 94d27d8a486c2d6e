"""The duty officers' console in a real headless Chromium, fed by a real central."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from central.storage import open_storage
from protocols import envelope as env
from protocols import topics
from tests.browser import chromium, console_login
from tests.fleet import Central
from tests.helpers import Mosquitto, wait_for
from tests.identity import ADMIN, PASSWORD

pytestmark = pytest.mark.browser
GW = "gw-web-01"


async def beidou_heartbeat(db_url: str, *, backlog: int) -> None:
    """What central's narrowband receiver stores for a heartbeat that came by BeiDou."""
    async with open_storage(db_url) as st:
        await st.record_heartbeat(GW, bearer="beidou", backlog=backlog,
                                  ts_ms=int(time.time() * 1000))


class FakeGateway:
    """Speaks the uplink contract with paho, as a gateway would, and waits for acks."""

    def __init__(self, port: int) -> None:
        self.acks: list[env.Ack] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=GW)
        self.client.on_message = lambda _c, _u, m: self.acks.append(env.decode(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.down(GW, "ack"), qos=1)
        self.client.loop_start()
        self.seq = 0

    def publish(self, msg: env.Message, name: str, retain: bool = False) -> None:
        self.client.publish(topics.up(GW, name), env.encode(msg), qos=1, retain=retain).wait_for_publish(5)

    def send_values(self, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        recs = []
        for point, value in values.items():
            self.seq += 1
            recs.append(env.Record(seq=self.seq, kind=env.RecordKind.TELEMETRY, ts_ms=now,
                                   point=point, value=value))
        n = len(self.acks)
        self.publish(env.DataBatch(gw=GW, stream="web-stream", records=tuple(recs), sent_ms=now), "data")
        wait_for(lambda: len(self.acks) > n, timeout=10, what="central's ack")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_console_shows_gateways_in_chinese_and_refreshes_live(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The console lists the gateway as 在线 with its Chinese point names and units, shows a new value without a reload, and its delivery counts."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    gw = FakeGateway(mosquitto.port)
    try:
        time.sleep(1.0)  # central subscribes after it connects
        gw.publish(env.State(online=True, boot_id="b1", version="0.1.0", bearer="ip", backlog=0,
                             ts_ms=int(time.time() * 1000), stream="web-stream"), "state", retain=True)
        gw.publish(env.Birth(gw=GW, stream="web-stream", boot_id="b1", version="0.1.0", devices=(
            env.DeviceInfo(id="gas-1", profile="gas-detector-v1", profile_hash="h", points=(
                env.PointInfo(0, "gas-1/gas_lel", "可燃气体浓度", "%LEL"),)),)), "birth")
        gw.send_values({"gas-1/gas_lel": 12.5})

        with chromium(tmp_path / "chrome") as driver:
            central.auth_headers()  # makes the admin user
            console_login(driver, central.base_url, ADMIN, PASSWORD)
            assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "zh-CN"
            # the console re-renders every 2 s, so read the section afresh each time
            wait = WebDriverWait(driver, 15, ignored_exceptions=(NoSuchElementException,
                                                                 StaleElementReferenceException))
            text = wait.until(lambda d: (t := d.find_element(By.CSS_SELECTOR, f'section[data-gw="{GW}"]').text)
                              and "12.50" in t and t)
            assert "在线" in text and "可燃气体浓度" in text and "%LEL" in text
            assert "1" == driver.find_element(By.ID, "n-online").text

            gw.send_values({"gas-1/gas_lel": 37.25})
            wait.until(lambda d: "37.25" in d.find_element(By.CSS_SELECTOR, f'section[data-gw="{GW}"]').text)

            # delivery: seqs 3 and 4 are missing, and the edge reported 3 thinned away
            now = int(time.time() * 1000)
            n = len(gw.acks)
            gw.publish(env.DataBatch(gw=GW, stream="web-stream", sent_ms=now, records=(
                env.Record(seq=5, kind=env.RecordKind.TELEMETRY, ts_ms=now, point="gas-1/gas_lel",
                           value=40.0),
                env.Record(seq=6, kind=env.RecordKind.EVENT, ts_ms=now, point=None, value=1,
                           attrs={"event": "outbox_thinned", "records": 1, "first_seq": 3,
                                  "last_seq": 3, "points": ["gas-1/gas_lel"]}))), "data")
            wait_for(lambda: len(gw.acks) > n, timeout=10, what="central's ack")
            head = wait.until(lambda d: (t := d.find_element(
                By.CSS_SELECTOR, f'section[data-gw="{GW}"] .gw-head').text) and "缺失 2" in t and t)
            assert "已接收 4" in head and "已报告丢弃 1" in head and "积压 0" in head
            assert "链路 IP 网络" in head

            # IP is cut and the gateway is heard by BeiDou: the duty officer sees the bearer.
            asyncio.run(beidou_heartbeat(central.db_url, backlog=1200))
            bearer = wait.until(lambda d: (e := d.find_element(
                By.CSS_SELECTOR, f'section[data-gw="{GW}"] [data-k="bearer"]'))
                and "北斗短报文" in e.text and e)
            assert "narrowband" in (bearer.get_attribute("class") or "")
            assert "积压 1200" in driver.find_element(
                By.CSS_SELECTOR, f'section[data-gw="{GW}"] .gw-head').text
            driver.save_screenshot(str(tmp_path / "console.png"))
    finally:
        gw.close()
        central.stop()
