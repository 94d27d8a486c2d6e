"""Approving a safety-critical write from the console in a real headless Chromium, against a
real `central serve`, Mosquitto, edge agent and Modbus simulator (DESIGN.md §8: a write to a
`safety_critical` point waits for a second operator; README "The duty console")."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.browser import (
    chromium,
    console_login,
    gateway_online,
    open_gateway_page,
    requested_urls,
    screenshot,
    viewport,
)
from tests.fleet import commanded_gateway
from tests.helpers import Mosquitto, wait_for
from tests.identity import PASSWORD, bearer, cli_user

pytestmark = pytest.mark.browser
GW = "gw-approve-1"
RELAY = {"device": "gas-1", "point": "relay_test"}  # gas-detector-v1 marks it safety_critical


def _row_text(driver: WebDriver, cmd_id: str) -> str:
    """The command's row as the page shows it now ("" while it is not there); the list is
    redrawn every few seconds, so the row is looked up afresh each time."""
    try:
        rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-cmd="{cmd_id}"]')
        return str(rows[0].text) if rows else ""
    except StaleElementReferenceException:
        return ""


def _approve_buttons(driver: WebDriver, cmd_id: str) -> list[Any]:
    return list(driver.find_elements(By.CSS_SELECTOR, f'button[data-approve="{cmd_id}"]'))


def _dialog_open(driver: WebDriver) -> bool:
    return bool(driver.execute_script("return document.getElementById('cmd-approve').open"))


def _open_approval(driver: WebDriver, cmd_id: str) -> None:
    WebDriverWait(driver, 20).until(lambda d: _approve_buttons(d, cmd_id))
    _approve_buttons(driver, cmd_id)[0].click()
    WebDriverWait(driver, 5).until(_dialog_open)


def _confirm_approval(driver: WebDriver) -> None:
    yes = driver.find_element(By.ID, "cmd-approve-yes")
    assert not yes.is_enabled()  # not before the tick: no one-click approval
    driver.find_element(By.ID, "cmd-approve-check").click()
    assert yes.is_enabled()
    yes.click()
    WebDriverWait(driver, 5).until(lambda d: not _dialog_open(d))


def _refusal_shown(driver: WebDriver) -> str:
    p = driver.find_element(By.ID, "cmd-result")
    text = p.text if p.is_displayed() and "审批失败" in p.text else ""
    return text


def _issue_from_console(driver: WebDriver, value: str) -> None:
    Select(driver.find_element(By.ID, "cmd-kind")).select_by_value("write_point")
    for field, text in (("cmd-device", RELAY["device"]), ("cmd-point", RELAY["point"]),
                        ("cmd-value", value)):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(text)
    driver.find_element(By.ID, "cmd-issue").click()
    WebDriverWait(driver, 5).until(
        lambda d: d.execute_script("return document.getElementById('cmd-confirm').open"))
    driver.find_element(By.ID, "cmd-yes").click()


def _shots(driver: WebDriver, tmp_path: Path, name: str) -> None:
    """The commands panel (with the approval dialog, when it is open) on the duty-room screen
    and on a phone."""
    for width, height, size in ((1920, 1080, "1920"), (390, 844, "390")):
        viewport(driver, width, height)
        driver.execute_script("document.getElementById('cmd').scrollIntoView()")
        driver.execute_async_script(  # two frames: the new size is laid out and painted
            "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done));")
        screenshot(driver, tmp_path, f"{name}_{size}")
        # on a phone nothing may run off the side: the dialog and the rows fit the width
        assert driver.execute_script(
            "return document.getElementById('cmd-approve').getBoundingClientRect().right") <= width
        assert driver.execute_script(
            "return document.documentElement.scrollWidth") <= width
    viewport(driver, 1280, 900)


def _list_fetches(driver: WebDriver) -> list[str]:
    """The page's requests for the command list since the last call."""
    return [u for u in requested_urls(driver) if urlsplit(u).path == "/api/commands"]


def test_second_operator_approves_a_safety_critical_write(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Operator A's relay write waits (待第二人审批); A's own row says someone else must approve
    and has no button; operator B's 审批… opens a dialog naming gateway, point, value, issuer and
    time, approves only after a tick, and the row shows 已审批 · B while the command is sent and
    carried out, without a reload. Another operator's approval through the API and the
    gateway's result reach a page that only watches, pushed: no reload, no fetch of the list.
    A 409 (someone approved first), 403 and 503 are shown in Chinese in the page; a viewer
    sees no button."""
    with commanded_gateway(tmp_path, mosquitto.port, GW) as (_sim, central, agent, admin):
        agent.start()
        wait_for(functools.partial(gateway_online, admin, GW), timeout=30, what=f"{GW} online")
        for name, role in (("duty-a", "operator"), ("duty-b", "operator"),
                           ("duty-c", "operator"), ("watcher", "viewer")):
            cli_user(central.db_url, name, role)
        shots = Path(os.environ.get("FIELDLINK_SCREENSHOTS") or tmp_path)

        with chromium(tmp_path / "chrome", log_requests=True) as driver:
            console_login(driver, central.base_url, "duty-a", PASSWORD)
            open_gateway_page(driver, GW)
            _issue_from_console(driver, "true")
            (first,) = wait_for(lambda: admin.get("/api/commands", params={"gw": GW}).json(),
                                what="the command issued")
            assert (first["approval"], first["issued_by"], first["state"]) == (
                "required", "duty-a", "pending")
            WebDriverWait(driver, 20).until(lambda d: "待第二人审批" in _row_text(d, first["cmd_id"]))
            assert "另一名值班员" in _row_text(driver, first["cmd_id"])
            assert not _approve_buttons(driver, first["cmd_id"])
            driver.execute_script("document.getElementById('cmd').scrollIntoView()")
            screenshot(driver, shots, "approve_own_1280")

            a = httpx.Client(base_url=central.base_url, timeout=15,
                             headers=bearer(central.base_url, "duty-a"))
            second, third, fourth = (a.post("/api/commands", json={
                "gw": GW, "kind": "write_point", "args": {**RELAY, "value": False},
                "ttl_s": 600}).json() for _ in range(3))
            a.close()

            # A's page only watches: the new rows, duty-c's approval and the gateway's result
            # arrive pushed, well inside the 10 s the page used to poll at.
            driver.execute_script("window.notReloaded = true")
            _list_fetches(driver)
            WebDriverWait(driver, 5).until(lambda d: "待第二人审批" in _row_text(d, fourth["cmd_id"]))
            c = httpx.Client(base_url=central.base_url, timeout=15,
                             headers=bearer(central.base_url, "duty-c"))
            assert c.post(f"/api/commands/{fourth['cmd_id']}/approve").status_code == 200
            c.close()
            WebDriverWait(driver, 5).until(lambda d: "已审批 · duty-c" in _row_text(d, fourth["cmd_id"]))
            WebDriverWait(driver, 30).until(lambda d: "执行成功" in _row_text(d, fourth["cmd_id"]))
            assert driver.execute_script("return window.notReloaded") is True
            assert _list_fetches(driver) == []
            _shots(driver, shots, "commands_pushed")

            driver.find_element(By.ID, "logout").click()
            console_login(driver, central.base_url, "duty-b", PASSWORD)
            open_gateway_page(driver, GW)
            _open_approval(driver, first["cmd_id"])
            facts = driver.find_element(By.ID, "cmd-approve-facts").text
            for fact in (GW, "gas-1 / relay_test", "true", "duty-a", "duty-b"):
                assert fact in facts, (fact, facts)
            driver.find_element(By.ID, "cmd-approve-no").click()  # 取消 approves nothing
            WebDriverWait(driver, 5).until(lambda d: not _dialog_open(d))
            assert admin.get(f"/api/commands/{first['cmd_id']}").json()["approval"] == "required"

            _open_approval(driver, first["cmd_id"])
            _shots(driver, shots, "approve_dialog")
            driver.execute_script("window.notReloaded = true")
            _confirm_approval(driver)
            WebDriverWait(driver, 30).until(
                lambda d: "已审批 · duty-b" in _row_text(d, first["cmd_id"])
                and "执行成功" in _row_text(d, first["cmd_id"]))
            assert driver.execute_script("return window.notReloaded") is True
            done = admin.get(f"/api/commands/{first['cmd_id']}").json()
            assert (done["approval"], done["approved_by"], done["state"]) == (
                "approved", "duty-b", "succeeded")
            assert "sent" in [e["state"] for e in done["history"] if e["source"] == "central"]
            assert done["result"]["readback"] is True  # the relay was really written
            driver.execute_script("document.getElementById('cmd').scrollIntoView()")
            screenshot(driver, shots, "approve_done_1280")

            # Someone approves first while B's dialog is open: B's approval is a 409, explained.
            _open_approval(driver, second["cmd_id"])
            c = httpx.Client(base_url=central.base_url, timeout=15,
                             headers=bearer(central.base_url, "duty-c"))
            assert c.post(f"/api/commands/{second['cmd_id']}/approve").status_code == 200
            c.close()
            _confirm_approval(driver)
            text = WebDriverWait(driver, 10).until(_refusal_shown)
            assert "已由 duty-c 审批" in text and "{" not in text, text
            screenshot(driver, shots, "approve_refused_1280")
            WebDriverWait(driver, 15).until(
                lambda d: "已审批 · duty-c" in _row_text(d, second["cmd_id"]))

            # The API refusing (403) or its command service down (503): said in Chinese, in
            # the page; the fault is injected into the page's fetch, the server is untouched.
            for status, words in ((403, "无权审批"), (503, "命令服务暂不可用")):
                driver.execute_script("""
                    const status = arguments[0], real = window.realFetch || window.fetch;
                    window.realFetch = real;
                    window.fetch = (url, opts) => String(url).endsWith('/approve')
                      ? Promise.resolve(new Response(JSON.stringify({detail: 'refused'}),
                          {status, headers: {'content-type': 'application/json'}}))
                      : real(url, opts);""", status)
                _open_approval(driver, third["cmd_id"])
                _confirm_approval(driver)
                text = WebDriverWait(driver, 10).until(
                    lambda d, w=words: w in _refusal_shown(d) and _refusal_shown(d))
                assert "refused" not in text and "{" not in text, text
            assert admin.get(f"/api/commands/{third['cmd_id']}").json()["approval"] == "required"

            driver.find_element(By.ID, "logout").click()
            console_login(driver, central.base_url, "watcher", PASSWORD)
            open_gateway_page(driver, GW)
            WebDriverWait(driver, 20).until(lambda d: "待第二人审批" in _row_text(d, third["cmd_id"]))
            assert not driver.find_elements(By.CSS_SELECTOR, "button[data-approve]")
            assert "已审批 · duty-b" in _row_text(driver, first["cmd_id"])
