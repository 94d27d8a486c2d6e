"""`central demo` as a new user runs it: every gateway online with moving values, and its 叫应
round (3 answer, 1 is re-sent 3 times and escalated to the district, who answers).

The waits follow the events they wait for, each bounded generously: how long a dozen Python
processes take to start on a box that runs other tests beside is not what is checked (a fixed
"within 30 s of start" failed once at load average 11)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from central.demo.run import FLEET
from tests.helpers import free_port, python_env, wait_for
from tests.identity import bearer

pytestmark = pytest.mark.e2e


DEADLINE_S = 3  # the 叫应 round's deadline per send: escalation ~12 s after the warning
ROUND_S = 30  # escalation (4 deadlines) and the district's answer, with room for a loaded box
START_S = 120  # start-up: central, broker, simulators, enrolments, agents
MOVE_S = 60  # the agents poll every second: a counter that has not moved in a minute is stuck
HEADERS: dict[str, str] = {}  # the demo admin's bearer token, once logged in


def get_json(url: str) -> object:
    with urllib.request.urlopen(urllib.request.Request(url, headers=HEADERS), timeout=5) as resp:
        return json.loads(resp.read())


def demo_login(log: Path, base: str) -> dict[str, str] | None:
    """The login the demo printed, used: None until it has printed it."""
    m = re.search(r"Console login: user (\S+)  password (\S+)", log.read_text(errors="replace"))
    if m is None:
        return None
    return bearer(base, m.group(1), m.group(2))


def counters(base: str, gw: str) -> dict[str, float]:
    detail = get_json(f"{base}/api/gateways/{gw}")
    assert isinstance(detail, dict)
    return {p["ref"]: p["latest"]["value"] for d in detail["devices"] for p in d["points"]
            if p["point"] == "counter" and p["latest"]}


def stuck_counters(base: str, first: dict[str, dict[str, float]]) -> list[str]:
    """Each counter that has not advanced past its value in `first` (gateway → ref → value)."""
    stuck = []
    for gw, before in first.items():
        now = counters(base, gw)
        stuck += [f"{ref} {value} -> {now.get(ref)}" for ref, value in before.items()
                  if now.get(ref, value) <= value]
    return stuck


def all_counters(base: str, gws: list[str]) -> dict[str, dict[str, float]]:
    """Every device's counter on each of `gws` (gateway → ref → value); {} until each has
    reported one."""
    devices = {g.id: len(g.devices) for g in FLEET}
    snap = {gw: counters(base, gw) for gw in gws}
    return snap if all(len(snap[gw]) == devices[gw] for gw in gws) else {}


def wait_counters_moving(base: str, gws: list[str]) -> None:
    """Every device's counter on every gateway reported, then each advanced past that value;
    fails after `MOVE_S` for each, naming what did not."""
    first = wait_for(lambda: all_counters(base, gws), timeout=MOVE_S, interval=0.5,
                     what="a counter from every demo device")
    deadline = time.monotonic() + MOVE_S
    while stuck := stuck_counters(base, first):
        if time.monotonic() > deadline:
            pytest.fail(f"counters did not advance within {MOVE_S} s: {stuck}")
        time.sleep(0.5)


def finished_round(base: str) -> dict | None:
    """The demo's 叫应 warning once every target is closed (None until then)."""
    try:
        ws = get_json(f"{base}/api/callresp/warnings")
    except OSError:
        return None
    assert isinstance(ws, list) and len(ws) <= 1, ws
    if not ws or any(t["state"] in ("sent", "delivered") for t in ws[0]["targets"]):
        return None
    w = get_json(f"{base}/api/callresp/warnings/{ws[0]['id']}")
    assert isinstance(w, dict)
    return w


def check_round(w: dict) -> None:
    """3 of the street's terminals answered at the first send; the fourth was sent 4 times
    (deadline apart), escalated, and 江岸区's person in charge answered on their terminal."""
    assert (w["level"], w["created_by"]) == ("red", "admin")  # issued (and audited) as the admin
    by = {t["ref"]: t for t in w["targets"]}
    assert {ref: t["state"] for ref, t in by.items()} == {
        "JY-JA-0101": "answered", "JY-JA-0102": "answered", "JY-JA-0103": "answered",
        "JY-JA-0104": "escalated", "p-jiangan-chen": "answered"}
    silent, boss = by["JY-JA-0104"], by["p-jiangan-chen"]
    assert silent["attempts"] == 4 and silent["escalated_to"] == boss["id"]
    assert boss["escalated_from"] == silent["id"] and boss["answered_terminal"] == "JY-JA-0001"
    steps = [(s["step"], s["attempt"]) for s in w["steps"] if s["target_id"] == silent["id"]]
    assert [s for s in steps if s[0] != "delivered"] == [
        ("sent", 1), ("resent", 2), ("resent", 3), ("resent", 4), ("escalated", 4)]
    sends = sorted(s["at_ms"] for s in w["steps"] if s["target_id"] == silent["id"]
                   and s["step"] in ("sent", "resent", "escalated"))
    assert all(b - a >= DEADLINE_S * 1000 for a, b in zip(sends, sends[1:], strict=False)), sends



def test_demo_brings_every_gateway_online_with_moving_values(tmp_path: Path) -> None:
    """The demo prints the console login it made; with it /api/gateways shows all 4 gateways online (each placed on the map in its district) and every device's counter advancing; its 叫应 warning follows, and within 30 s the round ends with 3 terminals answered and the fourth re-sent 3 times and escalated to the district's person in charge, who answered; and Ctrl-C stops every child."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "central", "demo", "--data-dir", str(tmp_path / "d"),
                             "--http-port", str(port), "--callresp-deadline-s", str(DEADLINE_S)],
                            env=python_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        HEADERS.clear()
        HEADERS.update(wait_for(lambda: demo_login(tmp_path / "demo.log", base),
                                timeout=START_S, interval=0.5, what="the demo's console login"))

        def all_online() -> list[dict] | None:
            try:
                gws = get_json(f"{base}/api/gateways")
            except OSError:
                return None
            assert isinstance(gws, list)
            return gws if len(gws) == 4 and all(g["online"] for g in gws) else None

        gws = wait_for(all_online, timeout=START_S, interval=0.5,
                       what="4 demo gateways online")
        overview = get_json(f"{base}/api/console/overview")  # the 一张图 map's data
        assert isinstance(overview, dict)
        assert {g["gw"]: g["district_name"] for g in overview["gateways"]
                if g["position"] is not None} == {
            "wh-jiangan-01": "江岸区", "wh-qingshan-02": "青山区", "wh-hongshan-03": "洪山区",
            "wh-xinzhou-04": "新洲区"}
        wait_counters_moving(base, [g["gw"] for g in gws])
        # the 叫应 round: a warning 5 s after wh-jiangan-01 is online, escalated 4 deadlines
        # later, answered by the district a few seconds after that
        wait_for(lambda: get_json(f"{base}/api/callresp/warnings"), timeout=30, interval=0.5,
                 what="the demo's 叫应 warning")
        issued = time.monotonic()
        check_round(wait_for(lambda: finished_round(base), timeout=ROUND_S, interval=0.5,
                             what="the demo's 叫应 round to finish"))
        print(f"叫应 round done {time.monotonic() - issued:.1f} s after the warning")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert rc == 0, (tmp_path / "demo.log").read_text()[-2000:]
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "d")], capture_output=True, text=True).stdout
    assert not leftovers.strip(), f"children left running: {leftovers}"
