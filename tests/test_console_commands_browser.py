"""Commands from the console's gateway page in a real headless Chromium, against a real
`central serve`, a real Mosquitto and a gateway stand-in that carries commands out (issue 12:
"commands: issue with confirmation", roles from central/identity). The list says so when
central cannot read it, against the app in process (a fault injected into its real store)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from protocols import commands as c
from protocols.command_keys import parse_public_key
from protocols.command_results import CommandResult, CommandState, result_attrs
from protocols.envelope import RecordKind
from tests.browser import (
    chromium,
    console_login,
    gateway_online,
    open_gateway_page,
    requested_urls,
    screenshot,
    texts,
    viewport,
)
from tests.callresp_gw import TerminalGateway
from tests.fakegw import ThreadedFleet
from tests.fleet import Central
from tests.helpers import Mosquitto, wait_for
from tests.identity import PASSWORD, bearer, cli_user, ensure_user
from tests.test_console_live import _served, issue, list_outage
from tests.test_identity_api import running

pytestmark = pytest.mark.browser
GW = "gw-cmd-1"


class CommandGateway(TerminalGateway):
    """Carries out every command it can verify: `received`, then `succeeded`."""

    def _on_message(self, c_: object, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self._cmd_topic:
            super()._on_message(c_, u, msg)
            return
        cmd = c.open_command(self.central_key, bytes(msg.payload))
        self.send([(RecordKind.CMD_RESULT, result_attrs(CommandResult(
            cmd.cmd_id, state, kind=str(cmd.kind)))) for state in (CommandState.RECEIVED,
                                                                    CommandState.SUCCEEDED)])


def _list_fetches(driver: WebDriver) -> list[str]:
    """The page's requests for the command list since the last call."""
    return [u for u in requested_urls(driver) if urlsplit(u).path == "/api/commands"]


def _dialog_open(driver: WebDriver) -> bool:
    return bool(driver.execute_script("return document.getElementById('cmd-confirm').open"))


def test_operator_issues_a_command_with_confirmation_viewer_cannot(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """An operator's 下发 opens a confirmation naming the gateway and the command; 取消 issues
    nothing; 确认下发 issues it as the operator and the page follows it to 执行成功. A viewer
    sees the page with the button disabled, and the API refuses the viewer's command (403)."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    fleet = None
    try:
        admin = httpx.Client(base_url=central.base_url, timeout=15,
                             headers=central.auth_headers())
        key = parse_public_key(admin.get("/api/keys/commands").json()["public_key"])
        gw = CommandGateway(GW, mosquitto.host, mosquitto.port, central_key=key, answers={})
        fleet = ThreadedFleet([gw], interval_s=2.0)
        fleet.start()
        wait_for(functools.partial(gateway_online, admin, GW), timeout=20, what=f"{GW} online")
        cli_user(central.db_url, "zhangsan", "operator")
        cli_user(central.db_url, "lisi", "viewer")

        with chromium(tmp_path / "chrome", log_requests=True) as driver:
            console_login(driver, central.base_url, "zhangsan", PASSWORD)
            open_gateway_page(driver, GW)
            WebDriverWait(driver, 10).until(lambda d: "暂无命令" in d.find_element(
                By.ID, "cmd-rows").text)  # the empty list, from the stream
            issue = driver.find_element(By.ID, "cmd-issue")
            assert issue.is_enabled()
            Select(driver.find_element(By.ID, "cmd-kind")).select_by_value("request_diagnostics")
            issue.click()
            WebDriverWait(driver, 5).until(_dialog_open)
            text = driver.find_element(By.ID, "cmd-confirm-text").text
            assert GW in text and "请求诊断" in text and "zhangsan" in text
            driver.find_element(By.ID, "cmd-no").click()
            WebDriverWait(driver, 5).until(lambda d: not _dialog_open(d))
            assert admin.get("/api/commands", params={"gw": GW}).json() == []  # nothing issued

            issue.click()
            WebDriverWait(driver, 5).until(_dialog_open)
            driver.execute_script("document.getElementById('cmd').scrollIntoView()")
            screenshot(driver, tmp_path, "command-confirm")
            driver.find_element(By.ID, "cmd-yes").click()
            WebDriverWait(driver, 20).until(lambda d: d.find_element(
                By.ID, "cmd-result").get_attribute("data-state") == "succeeded")
            assert "执行成功" in driver.find_element(By.ID, "cmd-result").text
            (cmd,) = admin.get("/api/commands", params={"gw": GW}).json()
            assert (cmd["kind"], cmd["issued_by"], cmd["state"]) == (
                "request_diagnostics", "zhangsan", "succeeded")
            WebDriverWait(driver, 10).until(lambda d: "执行成功" in d.find_element(
                By.CSS_SELECTOR, f'tr[data-cmd="{cmd["cmd_id"]}"]').text)
            # how long the state has held, on central's clock (the event's now_ms)
            assert re.search(r"执行成功 · \d+ 秒前", texts(driver, f'tr[data-cmd="{cmd["cmd_id"]}"]')[0])
            driver.execute_script("document.getElementById('cmd').scrollIntoView()")
            screenshot(driver, tmp_path, "command-result")

            _list_fetches(driver)
            driver.find_element(By.ID, "logout").click()
            console_login(driver, central.base_url, "lisi", PASSWORD)
            open_gateway_page(driver, GW)
            assert not driver.find_element(By.ID, "cmd-issue").is_enabled()
            assert "只读" in driver.find_element(By.ID, "cmd-note").text
            WebDriverWait(driver, 10).until(  # reads allowed
                lambda d: "执行成功" in d.find_element(By.ID, "cmd-rows").text)
            # The list came on the event stream as it opened: the page never asked for it.
            assert _list_fetches(driver) == []

        viewer = httpx.Client(base_url=central.base_url, timeout=15,
                              headers=bearer(central.base_url, "lisi"))
        r = viewer.post("/api/commands", json={"gw": GW, "kind": "request_diagnostics"})
        assert r.status_code == 403, r.text
        assert len(admin.get("/api/commands", params={"gw": GW}).json()) == 1
        viewer.close()
        admin.close()
    finally:
        if fleet is not None:
            fleet.close()
        central.stop()


def _unreadable(driver: WebDriver) -> str | None:
    """The problem type on the list's 「命令读取失败」 row, if the list shows it."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#cmd-rows tr.cmd-unreadable")
    if not rows or "命令读取失败，正在重试…" not in rows[0].text:
        return None
    return rows[0].get_attribute("data-error")


async def test_the_list_says_when_central_cannot_read_it_and_comes_back_by_itself(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The gateway page is opened while central's command store cannot list (a fault
    injected into the real store): the list says 命令读取失败，正在重试… in red, not 读取中…
    for ever, and none of the store's error text; once the store lists again the page shows
    the gateway's command by itself, on the same stream, without asking for the list. A
    second outage, seen at the feed's periodic re-read, ends with the very same list: drawn
    again, not left behind the message."""
    async with contextlib.AsyncExitStack() as stack:
        env = await stack.enter_async_context(running("sqlite", tmp_path, broker=mosquitto))
        base = await stack.enter_async_context(_served(env.app))
        env.app.state.console_live.refresh_s = 1.0  # an unchanged list is read again soon
        cmd_id = await issue(env, await env.token("boss", "admin"))
        await ensure_user(env.app, "zhangsan", "operator")
        outage = stack.enter_context(list_outage(env.app.state.commands.service.store))
        outage.down = True
        browser = chromium(tmp_path / "chrome", log_requests=True)
        driver = await asyncio.to_thread(browser.__enter__)
        stack.push_async_callback(asyncio.to_thread, browser.__exit__, None, None, None)

        def fails() -> None:
            console_login(driver, base, "zhangsan", PASSWORD)
            open_gateway_page(driver, "gw-a")
            WebDriverWait(driver, 10).until(_unreadable)
            assert _unreadable(driver) == "urn:fieldlink:problem:command-store"
            assert "disk I/O" not in driver.find_element(By.TAG_NAME, "body").text
            driver.execute_script("document.getElementById('cmd').scrollIntoView()")
            viewport(driver, 1920, 1080)
            screenshot(driver, tmp_path, "command-list-unreadable")
            viewport(driver, 390, 844)
            driver.execute_script("document.getElementById('cmd').scrollIntoView()")
            screenshot(driver, tmp_path, "command-list-unreadable-narrow")
            _list_fetches(driver)

        await asyncio.to_thread(fails)
        outage.down = False

        def recovers() -> None:
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(
                By.CSS_SELECTOR, f'#cmd-rows tr[data-cmd="{cmd_id}"]'))
            assert _unreadable(driver) is None and "请求诊断" in driver.find_element(
                By.ID, "cmd-rows").text
            assert _list_fetches(driver) == []  # the feed brought it, on the same stream

        await asyncio.to_thread(recovers)
        outage.down = True
        await asyncio.to_thread(WebDriverWait(driver, 10).until, _unreadable)
        outage.down = False
        await asyncio.to_thread(recovers)
