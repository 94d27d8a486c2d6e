"""A remote config apply reloads the agent without false alarms from its ack screening
(DESIGN.md §8): central's ack of the last batches before the reload, which reaches the reloaded
uplink, is taken as genuine; an ack naming seqs never sent is still refused and counted."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.publish as publish
import pytest
from typer.testing import CliRunner

from edge_agent.cli.app import app as edge_cli
from protocols import topics
from protocols.envelope import Ack, encode
from tests.fleet import Agent, Central, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, wait_for
from tests.netproxy import LinkProxy

pytestmark = pytest.mark.e2e

GW = "gw-cfg-acks"


@pytest.fixture
def gateway(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[tuple[Agent, httpx.Client]]:
    """`tests.fleet.commanded_gateway`'s set-up, with central's link to the broker slowed
    (0.15 s each way, about as long as the agent takes to reload): the acks of the batches sent
    just before the reload reach the broker while the agent restarts, and the broker hands them
    to the reloaded uplink's session before it sends anything again."""
    with contextlib.ExitStack() as stack:
        link = LinkProxy(mosquitto.host, mosquitto.port)
        link.start()
        stack.callback(link.stop)
        link.set_mode("slow", delay_s=0.15)
        sim = Simulator(tmp_path, ["gas-detector-v1"])
        stack.callback(sim.stop)
        sim.start()
        central = Central(tmp_path, link.port)
        stack.callback(central.stop)
        central.start()
        http = stack.enter_context(httpx.Client(base_url=central.base_url, timeout=10,
                                                headers=central.auth_headers()))
        key = http.get("/api/keys/commands").json()["public_key"]
        agent = Agent(tmp_path, GW, mosquitto.port, sim.port,
                      [DeviceDef("gas-1", "gas-detector-v1", 1)],
                      extra=f'\n[commands]\ncentral_public_key = "{key}"\n'
                      "config_health_window_s = 2.0\n")
        stack.callback(agent.stop)
        agent.start()
        yield agent, http


def _uplink(agent: Agent) -> dict[str, Any]:
    """`edge-agent status --json`'s uplink section, live from the running agent."""
    res = CliRunner().invoke(edge_cli, ["status", "-c", str(agent.config), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["live"], report
    return report["uplink"]


def _ack_warnings(agent: Agent) -> list[str]:
    return [line for line in agent.log_path.read_text().splitlines()
            if '"ack_unsent_records"' in line]


def test_apply_counts_no_refused_ack_and_a_forged_one_still_counts(
        gateway: tuple[Agent, httpx.Client], mosquitto: Mosquitto) -> None:
    """After a remote config apply (the agent reloads twice: trial and confirm), acks_refused
    is 0 and no ack WARNING is logged; an ack of seqs never sent is then refused and counted."""
    agent, http = gateway
    wait_for(lambda: http.get(f"/api/gateways/{GW}").json().get("online"), timeout=30,
             what="gateway online")
    original = agent.config.read_text()
    changed = original.replace("poll_interval_s = 0.25", "poll_interval_s = 0.3")
    assert changed != original
    rsp = http.post(f"/api/gateways/{GW}/config", json={"site_toml": changed, "ttl_s": 300})
    assert rsp.status_code == 201, rsp.text
    cmd_id = rsp.json()["cmd_id"]

    def final() -> dict[str, Any] | None:
        cmd = http.get(f"/api/commands/{cmd_id}").json()
        return cmd if cmd.get("state") in ("succeeded", "failed", "rejected") else None

    done = wait_for(final, timeout=40, interval=0.2, what="the apply's outcome")
    assert done is not None and done["state"] == "succeeded", done
    reloads = agent.log_path.read_text().count('"agent_starting"') - 1
    assert reloads >= 1
    # The reloaded uplink has connected and had central's acks of what it resent.
    wait_for(lambda: _uplink(agent)["state"] == "connected", timeout=20, what="uplink connected")
    assert _uplink(agent)["acks_refused"] == 0
    assert _ack_warnings(agent) == [], "\n".join(_ack_warnings(agent))

    stream = sqlite_rows(agent.outbox, "SELECT value FROM meta WHERE key = 'stream'")[0][0]
    forged = Ack(stream=stream, ranges=((10**9, 10**9 + 9),))
    publish.single(topics.down(GW, "ack"), encode(forged), qos=1, hostname=mosquitto.host,
                   port=mosquitto.port)
    counted = wait_for(lambda: _uplink(agent)["acks_refused"] == 1, timeout=15,
                       what="the forged ack refused")
    assert counted
    assert len(_ack_warnings(agent)) == 1
