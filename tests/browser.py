"""Headless Chromium (Debian's chromium + chromium-driver) driven through Selenium."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.fleet import Central

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


# Network off for everything but this machine: names resolve to nothing except 127.0.0.1, and
# whatever is not loopback goes to a proxy port nobody listens on (DESIGN.md §8: duty networks
# are often isolated, and the console and docs must still work).
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           "--proxy-server=http://127.0.0.1:9")


@contextmanager
def chromium(profile_dir: Path, *, extra_args: Sequence[str] = (),
             log_requests: bool = False) -> Iterator[webdriver.Chrome]:
    """A real headless Chromium with the flags this sandbox needs; no driver download.

    `log_requests` keeps the DevTools performance log (`requested_urls` reads it)."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
                 "--window-size=1280,900", "--lang=zh-CN", f"--user-data-dir={profile_dir}"):
        opts.add_argument(flag)
    for flag in extra_args:
        opts.add_argument(flag)
    if log_requests:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def console_login(driver: webdriver.Chrome, base_url: str, name: str, password: str) -> None:
    """Open the console, be sent to the login page (登录), log in, and wait for the console."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base_url + "/")
    WebDriverWait(driver, 15).until(lambda d: d.current_url.endswith("/login"))
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 15).until(
        lambda d: not d.current_url.endswith("/login")
        and name in d.find_element(By.ID, "whoami").text)


def gateway_online(admin: httpx.Client, gw: str) -> bool:
    """Whether central shows `gw` online (for `wait_for` before the page is opened)."""
    r = admin.get(f"/api/gateways/{gw}")
    return r.status_code == 200 and bool(r.json()["online"])


def open_gateway_page(driver: webdriver.Chrome, gw: str) -> None:
    """Show `gw` on the console's gateway page and wait for its commands panel."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("location.hash = arguments[0]", f"gw={gw}")
    WebDriverWait(driver, 15).until(
        lambda d: d.find_element(By.ID, "cmd-gw").text == gw
        and d.find_element(By.ID, "cmd").is_displayed())


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    """Every URL the page asked for since the last call (Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def texts(driver: webdriver.Chrome, css: str) -> list[str]:
    """The text of each element `css` matches, read in one script: an element the page
    redraws between finding it and reading it cannot go stale in between."""
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)", css))


def viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """The page's own size, exactly (a window's size includes its frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def screenshot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> None:
    """Save `name`.png under `FIELDLINK_SCREENSHOTS` (docs/screenshots/ comes from there),
    else under the test's `tmp_path`."""
    out = Path(os.environ.get("FIELDLINK_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / f"{name}.png"))


@contextmanager
def callresp_central(tmp_path: Path, broker_port: int) -> Iterator[Central]:
    """A real `central serve` whose 叫应 deadlines are long (a red one 600 s): the test, not
    the timers, moves the targets; no re-send or escalation happens while it runs."""
    cfg = tmp_path / "central.toml"
    cfg.write_text("[central.callresp]\ndeadline_red_s = 600\nresends = 3\ntick_s = 0.2\n")
    central = Central(tmp_path, broker_port, extra_args=["--config", str(cfg)])
    central.start()
    try:
        yield central
    finally:
        central.stop()
