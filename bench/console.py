"""The duty console at city scale (issue 12): how soon the 一张图 overview is ready with N
gateways, and how soon an alarm committed at central is on the screen.

Starts a private Mosquitto and `central serve` on SQLite, stores N gateways spread over the 13
districts (state, site, position, as ingest and an admin would), opens the console in headless
Chromium at 1920×1080 with the network off, then commits `--alarms` level-2 alarms one at a
time and reads, in the page, when each row appeared (a MutationObserver's clock; central and
the browser share this machine's clock).

    python bench/console.py --gateways 400

Prints one JSON line: {gateways, overview_ready_s, alarm_to_screen_p99_s, alarm_to_screen_p50_s,
page_bytes, overview_event_bytes}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import httpx
from _common import emit
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from central.app import STATIC
from central.areas.tree import assign_gateway, create_area
from central.console.geo import Position, set_gateway_position
from central.storage import open_storage
from protocols.envelope import DataBatch, Record, RecordKind, State
from runtime.logs import configure_logging
from tests.browser import OFFLINE, chromium, console_login
from tests.fleet import Central
from tests.helpers import Mosquitto
from tests.identity import ADMIN, PASSWORD

OBSERVER = """
window.__seen = {};
new MutationObserver(() => {
  // an alarm's own row, or the row of the incident it joined (its count went up)
  const ids = [...document.querySelectorAll('#alarm-rows tr[data-alarm-id]')]
    .map((tr) => tr.dataset.alarmId).concat([...document.querySelectorAll(
      '#alarm-rows tr[data-alarms]')].flatMap((tr) => tr.dataset.alarms.split(' ')));
  for (const id of ids) {
    if (!(id in window.__seen)) window.__seen[id] = Date.now();
  }
}).observe(document.getElementById('alarm-rows'), {childList: true, subtree: true});
"""


async def seed(db_url: str, gateways: int) -> list[str]:
    """N gateways over the districts, online over IP, each at a site and a position."""
    geo = json.loads((STATIC / "vendor" / "wuhan.geo.json").read_text(encoding="utf-8"))
    rnd = random.Random(12)
    names = []
    async with open_storage(db_url) as st:
        city = await create_area(st, parent_id=None, level="city", code="420100", name_zh="武汉市")
        sites = []
        for f in geo["features"]:
            d = await create_area(st, parent_id=city.id, level="district",
                                  code=str(f["properties"]["adcode"]),
                                  name_zh=f["properties"]["name"])
            s = await create_area(st, parent_id=d.id, level="site", code=f"{d.code}-site",
                                  name_zh=f"{d.name_zh}企业", kind="enterprise")
            sites.append((s.id, f["properties"]["cp"]))
        now = int(time.time() * 1000)
        for i in range(gateways):
            gw = f"gw-{i:04d}"
            site, (lon, lat) = sites[i % len(sites)]
            await assign_gateway(st, gw, site)
            await set_gateway_position(st, gw, Position(lat + rnd.uniform(-0.04, 0.04),
                                                        lon + rnd.uniform(-0.04, 0.04)))
            await st.record_state(gw, State(online=True, boot_id="b", version="1", bearer="ip",
                                            backlog=0, ts_ms=now, stream=gw))
            names.append(gw)
    return names


async def commit_alarm(db_url: str, gw: str) -> int:
    """A level-2 gas alarm from `gw`, committed as ingest would; returns the commit time."""
    now = int(time.time() * 1000)
    async with open_storage(db_url) as st:
        await st.write_batches([DataBatch(gw=gw, stream=gw, records=(Record(
            seq=1, kind=RecordKind.ALARM, ts_ms=now, point="gas-1/gas_lel", value=55.5,
            attrs={"alarm_id": "gas-1/gas_lel/high", "rule": "high", "state": "raised",
                   "level": 2, "prev_level": 0, "threshold": 50.0, "since_ms": now}),))])
    return int(time.time() * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateways", type=int, default=400)
    ap.add_argument("--alarms", type=int, default=20, help="alarms timed to the screen")
    args = ap.parse_args()
    configure_logging("central", json=True, level="warning")  # stdout is for the result line
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work)
        broker.start()
        central = Central(work, broker.port)
        central.start()
        try:
            headers = central.auth_headers()
            names = asyncio.run(seed(central.db_url, args.gateways))
            overview = httpx.get(central.base_url + "/api/console/overview", headers=headers,
                                 timeout=30)
            with chromium(work / "chrome", extra_args=OFFLINE) as driver:
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                    "width": 1920, "height": 1080, "deviceScaleFactor": 1, "mobile": False})
                console_login(driver, central.base_url, ADMIN, PASSWORD)
                driver.execute_cdp_cmd("Network.enable", {})  # then the cache can be turned off:
                driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
                t0 = time.monotonic()
                driver.get(central.base_url + "/")
                wait = WebDriverWait(driver, 60)
                wait.until(lambda d: d.find_element(By.ID, "n-total").text == str(args.gateways)
                           and d.find_element(By.ID, "map").get_attribute("data-rendered"))
                ready_s = time.monotonic() - t0
                page_bytes = driver.execute_script(
                    "return performance.getEntriesByType('navigation').concat("
                    "performance.getEntriesByType('resource')).filter(e => !e.name.includes("
                    "'/api/console/events')).reduce((n, e) => n + (e.transferSize || 0), 0)")
                driver.execute_script(OBSERVER)
                lags = []
                client = httpx.Client(base_url=central.base_url, headers=headers, timeout=30)
                for gw in names[: args.alarms]:
                    committed = asyncio.run(commit_alarm(central.db_url, gw))
                    (a,) = client.get("/api/alarms", params={"gw": gw}).json()
                    seen = wait.until(lambda d, i=a["id"]: d.execute_script(
                        "return window.__seen[arguments[0]]", str(i)))
                    lags.append(max(0, seen - committed) / 1000)
                client.close()
            lags.sort()
            emit(gateways=args.gateways, overview_ready_s=round(ready_s, 3),
                 alarm_to_screen_p99_s=round(lags[min(len(lags) - 1,
                                                       int(0.99 * len(lags)))], 3),
                 alarm_to_screen_p50_s=round(statistics.median(lags), 3),
                 page_bytes=page_bytes, overview_event_bytes=len(overview.content))
        finally:
            central.stop()
            broker.stop()


if __name__ == "__main__":
    main()
