"""Issue 13, must-show 3: a broker restart is an expected event. Each MQTT session of both
programs (the agent's uplink; central's ingest and commands) logs it once at WARNING per
outage, however many attempts fail while the broker is away, and neither program logs an
ERROR or a traceback for it — not its own code, not aiomqtt's or paho's loggers, not asyncio's.

Real processes (a Modbus simulator, `central serve`, `edge-agent run`) on a private Mosquitto
that is SIGKILLed and started again twice; the programs' JSON log lines are read back.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import Agent, Central, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, wait_for

pytestmark = pytest.mark.e2e
OUTAGES = 2
SESSIONS = {"agent-gw-logs": ("uplink",), "central": ("ingest", "commands")}


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The program's log, one dict a line; a line that is not JSON (a bare traceback a
    library printed) is kept as `{"raw": line}`."""
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            lines.append({"raw": text})
    return lines


def events(path: Path, name: str) -> Counter[str]:
    """How many times each session logged `name`."""
    return Counter(e.get("session", "") for e in log_lines(path) if e.get("event") == name)


def readings(central: Central) -> int:
    try:
        return int(sqlite_rows(central.db_path, "SELECT count(*) FROM readings")[0][0])
    except Exception:  # noqa: BLE001 - the database may not exist yet
        return 0


def test_each_broker_restart_is_one_warning_per_session_and_no_error(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    sim = Simulator(tmp_path, ["gas-detector-v1"])
    sim.start()
    central = Central(tmp_path, mosquitto.port)
    agent = Agent(tmp_path, "gw-logs", mosquitto.port, sim.port,
                  [DeviceDef("gas-1", "gas-detector-v1", 1)], poll_interval_s=0.25)
    logs = {agent.name: agent.log_path, central.name: central.log_path}
    try:
        central.start()
        agent.start()
        wait_for(lambda: readings(central) > 0, timeout=60, what="the first readings")
        for outage in range(1, OUTAGES + 1):
            mosquitto.kill()
            for name, sessions in SESSIONS.items():
                wait_for(lambda: all(events(logs[name], "mqtt_disconnected")[s] == outage  # noqa: B023
                                     for s in sessions),  # noqa: B023
                         timeout=30, what=f"{name}'s sessions to notice")
            time.sleep(4)  # several attempts fail while the broker is away
            mosquitto.start()
            held = readings(central)
            wait_for(lambda: readings(central) > held + 4, timeout=60,  # noqa: B023
                     what="readings again after the restart")
            for name, sessions in SESSIONS.items():
                wait_for(lambda: all(events(logs[name], "mqtt_connected")[s] == outage + 1  # noqa: B023
                                     for s in sessions),  # noqa: B023
                         timeout=30, what=f"{name}'s sessions back")
        time.sleep(1)  # anything a reconnect logs late
    finally:
        for child in (agent, central, sim):
            child.stop()
    for name, sessions in SESSIONS.items():
        lines = log_lines(logs[name])
        bad = [e for e in lines if e.get("level") in ("error", "critical") or "exception" in e
               or "Traceback" in e.get("raw", "")]
        assert not bad, f"{name} logged errors: {bad[:5]}"
        warned = events(logs[name], "mqtt_disconnected")
        assert {s: warned[s] for s in sessions} == dict.fromkeys(sessions, OUTAGES), warned
        others = [e for e in lines if e.get("level") == "warning"
                  and e.get("event") != "mqtt_disconnected" and e.get("logger") in (
                      "runtime.mqtt", "runtime.mqtt.client", "asyncio")]
        assert not others, f"{name}: {others[:5]}"
