"""The console's alarms panel in a real headless Chromium, against a real `central serve`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from central.storage import open_storage
from central.storage.timecheck import NARROWBAND_COPY
from protocols.envelope import DataBatch, Flag, Record, RecordKind
from tests.browser import chromium, console_login, viewport
from tests.fleet import Central
from tests.helpers import Mosquitto
from tests.identity import PASSWORD, cli_user

pytestmark = pytest.mark.browser
GW = "gw-alarm-01"
T0 = 1_700_000_000_000


async def raise_alarm(db_url: str, *, gw: str = GW, by_radio: bool = False) -> None:
    """Store a level-2 gas alarm from `gw`, as ingest would (same file, another connection),
    or as central's narrowband receiver would store one that came by BeiDou."""
    attrs = {"alarm_id": "gas-1/gas_lel/high", "rule": "high", "state": "raised", "level": 2,
             "prev_level": 0, "threshold": 50.0, "since_ms": T0}
    flags = Flag.NONE
    if by_radio:
        attrs, flags = {**attrs, "bearer": "beidou"}, Flag(NARROWBAND_COPY)
    async with open_storage(db_url) as st:
        await st.write_batches([DataBatch(gw=gw, stream="s", records=(Record(
            seq=1, kind=RecordKind.ALARM, ts_ms=T0, point="gas-1/gas_lel", value=55.5,
            flags=flags, attrs=attrs),))])


def test_duty_officer_acknowledges_an_alarm_from_the_page(tmp_path: Path,
                                                          mosquitto: Mosquitto) -> None:
    """After logging in, the panel lists the active 二级 alarm as 未确认 under its area;
    pressing 确认 acknowledges it as the logged-in user (the API says so), and the area filter
    hides it under another district."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    try:
        api = httpx.Client(base_url=central.base_url, timeout=10,
                           headers=central.auth_headers())
        cli_user(central.db_url, "zhangsan", "operator")  # 张三, the duty officer
        city = api.post("/api/areas", json={"level": "city", "code": "420100",
                                            "name_zh": "武汉市"}).json()
        d1, d2 = (api.post("/api/areas", json={"parent_id": city["id"], "level": "district",
                                                "code": code, "name_zh": name}).json()
                  for code, name in (("420102", "江岸区"), ("420107", "青山区")))
        site = api.post("/api/areas", json={"parent_id": d1["id"], "level": "site",
                                            "code": "site-1", "name_zh": "江岸示范企业",
                                            "kind": "enterprise"}).json()
        assert api.put(f"/api/gateways/{GW}/area", json={"area_id": site["id"]}).status_code == 200
        asyncio.run(raise_alarm(central.db_url))
        (alarm,) = api.get("/api/alarms", params={"state": "active"}).json()

        with chromium(tmp_path / "chrome") as driver:
            console_login(driver, central.base_url, "zhangsan", PASSWORD)
            wait = WebDriverWait(driver, 15, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException))
            row = f'tr[data-alarm-id="{alarm["id"]}"]'
            text = wait.until(lambda d: (t := d.find_element(By.CSS_SELECTOR, row).text)
                              and "未确认" in t and t)
            assert "二级" in text and "江岸示范企业" in text and "超上限" in text
            assert "经北斗" not in text
            assert driver.find_element(By.ID, "n-unack").text == "1"

            # An alarm that came by BeiDou while its gateway's IP was down says so.
            asyncio.run(raise_alarm(central.db_url, gw="gw-alarm-02", by_radio=True))
            radio = wait.until(lambda d: [t for e in d.find_elements(By.CSS_SELECTOR, "tr.alarm")
                                          if "gw-alarm-02" in (t := e.text)])
            assert "经北斗" in radio[0] and "二级" in radio[0]

            # A phone-wide window: the desk's header and each alarm wrap, nothing runs off.
            viewport(driver, 360, 900)
            wait.until(lambda d: d.execute_script(
                "return document.documentElement.scrollWidth <= innerWidth"))
            for selector in ("#alarms .alarms-head", row):
                assert driver.execute_script(
                    "const e = document.querySelector(arguments[0]), r = e.getBoundingClientRect();"
                    " return e.scrollWidth <= e.clientWidth && r.right <= innerWidth", selector)
            labels = driver.execute_script(  # each cell is named by its column
                "return [...document.querySelectorAll(arguments[0] + ' > td')]"
                ".map((td) => getComputedStyle(td, '::before').content)", row)
            assert '"发生时数值 "' in labels and '"当前值 "' in labels
            driver.execute_script("document.getElementById('alarms').scrollIntoView()")
            driver.save_screenshot(str(tmp_path / "narrow-desk.png"))
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

            driver.find_element(By.ID, "alarm-comment").send_keys("已电话通知企业")
            driver.find_element(By.CSS_SELECTOR, f'{row} button[data-action="ack"]').click()
            wait.until(lambda d: "已确认" in d.find_element(By.CSS_SELECTOR, row).text)
            assert "zhangsan" in driver.find_element(By.CSS_SELECTOR, row).text
            assert driver.find_element(By.ID, "n-unack").text == "1"  # gw-alarm-02's
            acked = api.get(f"/api/alarms/{alarm['id']}").json()
            assert (acked["ack_state"], acked["acked_by"], acked["ack_comment"]) == (
                "acknowledged", "zhangsan", "已电话通知企业")

            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#alarm-area option")) >= 4)
            Select(driver.find_element(By.ID, "alarm-area")).select_by_value(str(d2["id"]))
            wait.until(lambda d: "当前无活动告警" in d.find_element(By.ID, "alarm-rows").text)
            driver.save_screenshot(str(tmp_path / "alarms.png"))
        api.close()
    finally:
        central.stop()
