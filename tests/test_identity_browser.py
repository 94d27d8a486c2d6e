"""The console's login, roles and logout in headless Chromium (DESIGN.md §8)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium, console_login
from tests.fleet import Central
from tests.helpers import Mosquitto
from tests.identity import PASSWORD, cli_user

pytestmark = pytest.mark.browser


def test_wrong_password_then_auditor_sees_the_audit_log_and_logs_out(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A wrong password stays on the login page with a Chinese message; the auditor then
    sees the audit log (with that failed login) and a passing chain check, no 确认 buttons;
    退出登录 returns to the login page and the session is gone."""
    central = Central(tmp_path, mosquitto.port)
    central.start()
    try:
        cli_user(central.db_url, "audit-1", "auditor")
        with chromium(tmp_path / "chrome") as driver:
            wait = WebDriverWait(driver, 15, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException))
            driver.get(central.base_url + "/login")
            driver.find_element(By.ID, "name").send_keys("audit-1")
            driver.find_element(By.ID, "password").send_keys("not-the-password")
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: d.find_element(By.ID, "msg").is_displayed())
            assert "用户名或密码错误" in driver.find_element(By.ID, "msg").text
            assert driver.current_url.endswith("/login")
            assert driver.get_cookie("fl_session") is None

            console_login(driver, central.base_url, "audit-1", PASSWORD)
            assert "审计员" in driver.find_element(By.ID, "whoami").text
            cookie = driver.get_cookie("fl_session")
            assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            rows = wait.until(lambda d: (t := d.find_element(By.ID, "audit-rows").text)
                              and "login.failed" in t and t)
            assert "login.ok" in rows and "user.created" in rows
            assert "校验通过" in driver.find_element(By.ID, "audit-verify").text
            assert driver.find_elements(By.CSS_SELECTOR, 'button[data-action="ack"]') == []

            driver.find_element(By.ID, "logout").click()
            wait.until(lambda d: d.current_url.endswith("/login"))
            r = httpx.get(f"{central.base_url}/api/me",
                          cookies={"fl_session": cookie["value"]}, timeout=10)
            assert r.status_code == 401
    finally:
        central.stop()
