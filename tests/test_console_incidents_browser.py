"""The desk's incidents and the page-wide area filter in a real headless Chromium, against a
real `central serve` (issue 12: "incidents grouped; filter by area that filters everything on
the page")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from central.storage import open_storage
from protocols.envelope import DataBatch, Record, RecordKind
from tests.browser import chromium, console_login
from tests.fleet import Central
from tests.helpers import Mosquitto
from tests.identity import PASSWORD, cli_user

pytestmark = pytest.mark.browser
T0 = 1_700_000_000_000


async def raise_alarms(db_url: str, gw: str, points: list[str]) -> None:
    """Level-2 high alarms at `points` of `gw`, as ingest stores them."""
    async with open_storage(db_url) as st:
        await st.write_batches([DataBatch(gw=gw, stream="s", records=tuple(Record(
            seq=i + 1, kind=RecordKind.ALARM, ts_ms=T0 + i, point=p, value=55.5, attrs={
                "alarm_id": f"{p}/high", "rule": "high", "state": "raised", "level": 2,
                "prev_level": 0, "threshold": 50.0, "since_ms": T0 + i})
            for i, p in enumerate(points)))])


def _page(driver: WebDriver) -> dict[str, object]:
    return driver.execute_script(  # type: ignore[no-any-return]
        "return {total: document.getElementById('n-total').textContent,"
        " desk: [...document.querySelectorAll('#alarm-rows tr')].map((r) => r.className),"
        " map: overview.data ? overview.data.gateways.map((g) => g.gw) : null,"
        " area: overview.data ? overview.data.area : undefined}")


def test_incident_rows_and_area_filter(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Three alarms at one site are one incident row (3 条告警) that expands to its alarms;
    choosing the other district leaves only that district's alarm on the desk, its one
    gateway on the map and in the counts, and the choice survives a reload (?area=)."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    try:
        api = httpx.Client(base_url=central.base_url, timeout=10,
                           headers=central.auth_headers())
        cli_user(central.db_url, "zhangsan", "operator")
        city = api.post("/api/areas", json={"level": "city", "code": "420100",
                                            "name_zh": "武汉市"}).json()
        sites = {}
        for code, name, gw in (("420102", "江岸区", "gw-inc-1"), ("420107", "青山区", "gw-inc-2")):
            d = api.post("/api/areas", json={"parent_id": city["id"], "level": "district",
                                             "code": code, "name_zh": name}).json()
            site = api.post("/api/areas", json={"parent_id": d["id"], "level": "site",
                                                "code": f"site-{code}", "name_zh": f"{name}企业",
                                                "kind": "enterprise"}).json()
            assert api.put(f"/api/gateways/{gw}/area",
                           json={"area_id": site["id"]}).status_code == 200
            sites[gw] = d
        asyncio.run(raise_alarms(central.db_url, "gw-inc-1", ["gas-1/a", "gas-1/b", "gas-2/a"]))
        asyncio.run(raise_alarms(central.db_url, "gw-inc-2", ["gas-1/a"]))
        site_alarms = api.get("/api/alarms", params={"state": "active", "gw": "gw-inc-1"}).json()
        incident = {a["incident_id"] for a in site_alarms}
        assert len(incident) == 1 and None not in incident, incident
        (iid,) = incident

        with chromium(tmp_path / "chrome") as driver:
            console_login(driver, central.base_url, "zhangsan", PASSWORD)
            wait = WebDriverWait(driver, 15, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException))
            row = f'tr[data-incident="{iid}"]'
            text = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, row).text)
            assert "3 条告警" in text and "未确认 3" in text and "二级" in text
            assert sorted(driver.find_element(By.CSS_SELECTOR, row).get_attribute(
                "data-alarms").split()) == sorted(str(a["id"]) for a in site_alarms)
            assert len(driver.find_elements(By.CSS_SELECTOR, "tr.alarm.member")) == 0
            assert len(driver.find_elements(By.CSS_SELECTOR, "tr.alarm")) == 1  # gw-inc-2's
            driver.find_element(By.CSS_SELECTOR, f"{row} button[data-action=incident]").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.alarm.member")) == 3)
            assert wait.until(lambda d: _page(d)["total"] == "2")

            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#alarm-area option")) >= 5)
            d2 = sites["gw-inc-2"]["id"]
            Select(driver.find_element(By.ID, "alarm-area")).select_by_value(str(d2))
            wait.until(lambda d: _page(d)["area"] == d2 and _page(d)["total"] == "1")
            page = _page(driver)
            assert page["map"] == ["gw-inc-2"], page
            wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, row))
            alarms = driver.find_elements(By.CSS_SELECTOR, "#alarm-rows tr.alarm")
            assert [a.get_attribute("data-alarm-id") is not None for a in alarms] == [True]
            assert "gw-inc-2" in alarms[0].text
            assert f"area={d2}" in driver.current_url

            driver.refresh()
            wait.until(lambda d: _page(d)["area"] == d2 and _page(d)["total"] == "1")
            assert Select(driver.find_element(By.ID, "alarm-area")) \
                .first_selected_option.get_attribute("value") == str(d2)
            driver.save_screenshot(str(tmp_path / "area.png"))
        api.close()
    finally:
        central.stop()
