"""End to end on a really small file system (issue 10): simulated gas detectors → edge agent
(its data folder on a tmpfs the test mounts) → Mosquitto → central → SQLite.

The link is down while telemetry fills the disk and the gas alarm is raised and cleared again
and again; another process (the test) then fills the disk completely while a long read (a
backup, say) pins the WAL, so that the outbox cannot live off the room inside its own files
either and meets ENOSPC; the agent is restarted on the full disk; then the space and the link
come back. Central must then hold every alarm
transition in order, exactly as many records fewer than the agent numbered as the agent
reported lost, and nothing twice.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox.db import OutboxError
from edge_agent.outbox.store import read_status
from tests.diskfull import fill, free_bytes, small_fs
from tests.fleet import Agent, Central, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, python_env, wait_for

pytestmark = pytest.mark.e2e

GW = "gw-disk-01"
DEVICES = [DeviceDef("gas-1", "gas-detector-v1", 1), DeviceDef("gas-2", "gas-detector-v1", 2),
           DeviceDef("gas-3", "gas-detector-v1", 3)]
ALARM_ID = "gas-1/gas_lel/high"
FS_BYTES = 6 * 2**20
RESERVE = 512 * 1024
BALLAST = 256 * 1024
OUTBOX = f"""
[status]
interval_s = 0.5

[outbox]
live_window_s = 2
disk_reserve_bytes = {RESERVE}
ballast_bytes = {BALLAST}
hold_records = 1000
"""


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[tuple[Path, Simulator, Central, Agent]]:
    with small_fs(tmp_path / "fs", FS_BYTES) as fs:
        sim = Simulator(tmp_path, [d.profile for d in DEVICES], control=True)
        central = Central(tmp_path, mosquitto.port)
        sim.start()
        agent = Agent(fs, GW, mosquitto.port, sim.port, DEVICES, poll_interval_s=0.05,
                      ack_timeout_s=30.0, extra=OUTBOX,
                      mqtt_extra="reconnect_min_s = 0.5\nreconnect_max_s = 2")
        agent.log_path = tmp_path / "agent.log"  # not on the file system that fills up
        try:
            central.start()
            yield fs, sim, central, agent
        finally:
            for child in (agent, central, sim):
                child.stop()


def cli(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args, "--config",
                           str(agent.config)], env=python_env(), capture_output=True, text=True,
                          timeout=60, check=False)


def agent_status(agent: Agent) -> dict[str, Any]:
    """`edge-agent status --json` (also when it exits 1 because the outbox cannot be read)."""
    done = cli(agent, "status", "--json")
    try:
        return dict(json.loads(done.stdout))
    except ValueError:
        return {}


def live_disk(agent: Agent) -> dict[str, Any]:
    return dict(agent_status(agent).get("disk") or {})


@contextlib.contextmanager
def wal_pinned(db: Path) -> Iterator[None]:
    """A long read transaction on the outbox: checkpoints cannot recycle the WAL meanwhile."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM records").fetchone()
        yield
    finally:
        conn.close()


def toggle(sim: Simulator, times: int) -> None:
    """Gas past level 2 and back, `times` times: one raise and one clear each."""
    for _ in range(times):
        sim.control({"set": {"device_id": 1, "point": "gas_lel", "value": 60.0}})
        time.sleep(1.5)
        sim.control({"clear": {"device_id": 1, "point": "gas_lel"}})
        time.sleep(1.5)


def central_events(central: Central, stream: str) -> list[tuple[int, int, dict[str, Any]]]:
    return [(seq, kind, json.loads(attrs or "{}")) for seq, kind, attrs in sqlite_rows(
        central.db_path, "SELECT seq, kind, attrs FROM events WHERE gw = ? AND stream = ?"
        " ORDER BY seq", (GW, stream))]


def outbox_last_seq(outbox: Path) -> int:
    """The outbox's last seq; 0 until the agent has created and migrated it."""
    try:
        return read_status(outbox).last_seq
    except OutboxError:  # not there yet, or made but not yet migrated (a reader sees no tables)
        return 0


def metric(central: Central, name: str) -> float:
    request = urllib.request.Request(f"{central.base_url}/metrics",
                                     headers=central.auth_headers())
    with urllib.request.urlopen(request, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"fieldlink_central_{name} "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_full_disk_loses_no_alarm_transition_and_reports_every_lost_record(
        rig: tuple[Path, Simulator, Central, Agent], mosquitto: Mosquitto) -> None:
    """Link down, telemetry fills a 6 MiB tmpfs, another process fills it to the last byte,
    the agent restarts on it: every alarm transition reaches central in order, the missing
    seqs at central are exactly the ones reported lost, and the drain doubles nothing."""
    fs, sim, central, agent = rig
    filler = fs / "filler"
    # Central is up and subscribed; the link then stays down until the space is back, so
    # nothing is in flight when it goes and every record travels exactly once.
    wait_for(lambda: metric(central, "mqtt_connected") == 1, timeout=30, what="central online")
    mosquitto.stop()
    agent.start()
    wait_for(lambda: outbox_last_seq(agent.outbox) > 100, timeout=60,
             what="the agent's first readings")

    # 1. The disk fills with telemetry: the reserve makes the budget drop old telemetry.
    fill(filler, leave=RESERVE + 256 * 1024)
    toggles = 0
    deadline = time.monotonic() + 120
    while True:
        toggle(sim, 1)
        toggles += 1
        c = read_status(agent.outbox).counters
        if c["thinned_total"] + c["dropped_total"] > 0 or time.monotonic() > deadline:
            break
    assert c["thinned_total"] + c["dropped_total"] > 0, agent.tail()
    assert c["disk_full_episodes"] == 0 and not live_disk(agent).get("episode", {}).get("full")

    # 2. Another process takes the rest while a reader pins the WAL: ENOSPC. Alarms keep
    #    being raised and cleared.
    with wal_pinned(agent.outbox):
        fill(filler)
        toggle(sim, 2)
        toggles += 2
        disk = wait_for(lambda: (d := live_disk(agent)).get("state") == "disk full"
                        and (d.get("episode") or {}).get("held", 0) > 0 and d, timeout=30,
                        what="status to say disk full with alarms held")
        assert disk["episode"]["telemetry_dropped"] > 0 and disk["fs_free_bytes"] < 64 * 1024
        text = cli(agent, "status").stdout
        assert "disk full" in text and "held in memory" in text, text
        doctor = cli(agent, "doctor").stdout
        assert "disk full" in doctor, doctor

    # 3. The agent restarts on the full disk (SIGTERM writes what it held, with the ballast).
    assert agent.stop(timeout=30) == 0, agent.tail()
    fill(filler)  # whatever the stop gave back is taken again
    agent.start()
    wait_for(lambda: agent_status(agent).get("live") and agent.running, timeout=60,
             what="the agent to start on the full disk and answer")
    with wal_pinned(agent.outbox):
        fill(filler)
        toggle(sim, 1)
        toggles += 1
        wait_for(lambda: (live_disk(agent).get("episode") or {}).get("full"), timeout=30,
                 what="the restarted agent to meet the full disk")
    assert agent.running, agent.tail()

    # 4. Space and link come back: what was held is written, the backlog drains.
    filler.unlink()
    mosquitto.start()
    status = wait_for(lambda: (s := read_status(agent.outbox)).backlog == 0
                      and s.counters["disk_full_episodes"] >= 2 and s, timeout=180,
                      interval=0.5, what="the backlog to drain after the space came back")
    assert agent.running, agent.tail()
    stream, last_seq = status.stream, status.last_seq

    # Every alarm transition, in order.
    events = central_events(central, stream)
    transitions = [a["state"] for _, kind, a in events if kind == 1 and a.get("alarm_id") == ALARM_ID]
    assert transitions == ["raised", "cleared"] * toggles, transitions

    # The losses reported are exactly what is missing at central.
    held = {s for (s,) in sqlite_rows(
        central.db_path, "SELECT seq FROM readings WHERE gw = ? AND stream = ? "
        "UNION ALL SELECT seq FROM events WHERE gw = ? AND stream = ?", (GW, stream, GW, stream))}
    missing = set(range(1, last_seq + 1)) - held
    reports = [a for _, kind, a in events if a.get("event") in ("outbox_thinned", "outbox_dropped")]
    assert len(missing) == sum(a["records"] for a in reports) > 0
    assert all(any(a["first_seq"] <= s <= a["last_seq"] for a in reports) for s in missing)
    full_drops = [a for a in reports if a.get("reason") == "disk_full"]
    episodes = [a for _, _, a in events if a.get("event") == "outbox_disk_full"]
    assert len(episodes) >= 2 and full_drops
    assert (sum(a["telemetry_dropped"] for a in episodes)
            == sum(a["telemetry"] for a in full_drops) > 0)
    assert sum(a["held_lost"] for a in episodes) == 0

    print(f"disk-full e2e: {toggles} raise/clear pairs, last seq {last_seq}, {len(missing)}"
          f" missing at central = {sum(a['records'] for a in reports)} reported lost"
          f" ({sum(a['records'] for a in full_drops)} of them by ENOSPC in {len(episodes)}"
          f" episodes), duplicates {metric(central, 'records_duplicate_total'):.0f}")
    # Nothing twice: each record crossed the link once.
    assert metric(central, "records_duplicate_total") == 0
    # and with the room back, the agent laid its ballast again
    wait_for(lambda: (fs / GW / "outbox.db-ballast").exists(), timeout=30, what="the ballast")
    assert free_bytes(fs) >= RESERVE
