"""Remote configuration with rollback on real processes (issue 15 must-show 4): central's API →
signed `apply_config` → edge agent with a Modbus simulator → health check → the outcome, with
the diff, back in central's API."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_profiles.loader import builtin_profiles_dir
from tests.fleet import Agent, Central, Simulator, commanded_gateway
from tests.helpers import Mosquitto, free_port, wait_for
from tests.identity import ADMIN, bearer, cli_user

pytestmark = pytest.mark.e2e

GW = "gw-cfg-01"
WINDOW_S = 5.0  # [commands] config_health_window_s of the agent under test


@dataclass
class System:
    sim: Simulator
    central: Central
    agent: Agent
    http: httpx.Client

    def send(self, site_toml: str, profiles: dict[str, str] | None = None) -> dict[str, Any]:
        rsp = self.http.post(f"/api/gateways/{GW}/config",
                             json={"site_toml": site_toml, "ttl_s": 300,
                                   "profiles": profiles or {}})
        assert rsp.status_code == 201, rsp.text
        return rsp.json()  # type: ignore[no-any-return]

    def wait_final(self, cmd_id: str, timeout: float) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            rsp = self.http.get(f"/api/commands/{cmd_id}")
            cmd = rsp.json() if rsp.status_code == 200 else {}
            done = cmd.get("state") in ("succeeded", "failed", "rejected", "expired")
            return cmd if done else None

        return wait_for(final, timeout=timeout, interval=0.2,
                        what=f"{cmd_id} final; agent:\n{self.agent.tail(20)}")

    def online(self) -> bool:
        rsp = self.http.get(f"/api/gateways/{GW}")
        return rsp.status_code == 200 and bool(rsp.json()["online"])

    @property
    def history(self) -> Path:
        return self.agent.config.with_name("site.toml.history")


@pytest.fixture
def system(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[System]:
    with commanded_gateway(tmp_path, mosquitto.port, GW,
                           f"config_health_window_s = {WINDOW_S}\n") as (sim, central, agent, http):
        agent.start()
        yield System(sim, central, agent, http)


def _polled(s: System) -> None:
    """The gateway is online and gas-1 has been read (it is in the trial's baseline)."""
    wait_for(s.online, timeout=30, what="gateway online")

    def read() -> bool:
        devices = s.http.get(f"/api/gateways/{GW}").json()["devices"]
        return any(p["latest"] for d in devices if d["device"] == "gas-1" for p in d["points"])

    wait_for(read, timeout=15, what="a reading of gas-1 at central")


def test_good_config_applied_bad_one_rolled_back(system: System) -> None:
    """A changed poll interval with a pushed profile is applied and reported `succeeded` with
    its diff; a wrong port
    (gas-1 stops answering) is rolled back by the agent within the health window and reported
    `failed`/`rolled_back` with its diff; an invalid file is refused; central shows all three
    and who sent them; central refuses a file it cannot sign (422) and a viewer (403)."""
    s = system
    _polled(s)
    original = s.agent.config.read_text()
    assert "poll_interval_s = 0.25" in original

    # The good one: a longer poll interval, and gas-1 on a profile pushed with the config.
    (s.agent.data_dir / "profiles").mkdir()
    profile = (builtin_profiles_dir() / "gas_detector_v1.yaml").read_text().replace(
        "id: gas-detector-v1", "id: gas-remote", 1)
    good = original.replace("poll_interval_s = 0.25", "poll_interval_s = 0.5").replace(
        'profile = "gas-detector-v1"', 'profile = "gas-remote"') + \
        '\n[profiles]\ndirs = ["profiles"]\n'
    sent = s.send(good, {"gas-remote.yaml": profile})
    assert (sent["kind"], sent["state"], sent["issued_by"]) == ("apply_config", "pending", ADMIN)
    done = s.wait_final(sent["cmd_id"], timeout=40)
    assert (done["state"], done["reason"]) == ("succeeded", None), done
    result = done["result"]
    assert result["outcome"] == "applied" and result["baseline"] == ["gas-1"]
    assert "-poll_interval_s = 0.25\n+poll_interval_s = 0.5\n" in result["diff"]
    assert "+++ b/gas-remote.yaml" in result["diff"] and "+id: gas-remote" in result["diff"]
    assert (s.agent.data_dir / "profiles" / "gas-remote.yaml").read_text() == profile
    assert s.agent.config.read_text() == good
    assert (s.history / "gen-0001.toml").read_text() == original
    assert not (s.history / "trial.json").exists()
    gw_states = [e["state"] for e in done["history"] if e["source"] == "gateway"]
    assert gw_states == ["received", "executing", "succeeded"]

    dead_port = free_port()
    bad = good.replace(f"port = {s.sim.port} }}", f"port = {dead_port} }}")
    assert bad != good
    sent_bad = s.send(bad)
    back = s.wait_final(sent_bad["cmd_id"], timeout=40 + WINDOW_S)
    assert (back["state"], back["reason"]) == ("failed", "rolled_back"), back
    result = back["result"]
    assert result["outcome"] == "rolled_back" and "gas-1" in result["error"], result
    assert f"+transport = {{ kind = \"tcp\", host = \"127.0.0.1\", port = {dead_port} }}" \
        in result["diff"]
    assert s.agent.config.read_text() == good  # the old config is live again
    assert (s.history / "gen-0002.toml").read_text() == good
    wait_for(s.online, timeout=30, what="gateway online after the rollback")

    invalid = good.replace("poll_interval_s = 0.5", "poll_interval_s = 0")
    refused = s.wait_final(s.send(invalid)["cmd_id"], timeout=30)
    assert (refused["state"], refused["reason"]) == ("rejected", "config_invalid"), refused
    assert "poll_interval_s" in refused["detail"] and refused["result"]["outcome"] == "refused"
    assert s.agent.config.read_text() == good

    listed = s.http.get("/api/commands", params={"gw": GW}).json()
    assert {c["state"] for c in listed} == {"succeeded", "failed", "rejected"}
    assert s.agent.running, s.agent.tail()

    # Central refuses before signing: another gateway's file, not TOML, too large to sign.
    noise = f"# {os.urandom(6000).hex()}\n"
    for text, why in ((good.replace(GW, "gw-other"), "gw-other"), ("[gateway", "TOML"),
                      (noise + good, "exceed 4096")):
        rsp = s.http.post(f"/api/gateways/{GW}/config", json={"site_toml": text})
        assert rsp.status_code == 422 and why in rsp.text, rsp.text
    assert len(s.http.get("/api/commands", params={"gw": GW}).json()) == 3

    cli_user(s.central.db_url, "viewer-1", role="viewer")
    viewer = bearer(s.central.base_url, "viewer-1")
    rsp = s.http.post(f"/api/gateways/{GW}/config", headers=viewer,
                      json={"site_toml": good})
    assert rsp.status_code == 403, rsp.text

    cli_user(s.central.db_url, "auditor-1", role="auditor")
    rows = s.http.get("/api/audit", params={"action": "command.issued"},
                      headers=bearer(s.central.base_url, "auditor-1")).json()
    issued = {r["target"]: r for r in rows}
    row = issued[f"command:{sent_bad['cmd_id']}"]
    assert (row["actor"], row["detail"]["kind"], row["detail"]["args"]) == (
        ADMIN, "apply_config", {"site_toml": bad})


def test_trial_survives_kill_9(system: System) -> None:
    """The agent killed (-9) during a trial finishes it after its restart: the broken config is
    rolled back and reported `rolled_back`, never `interrupted`."""
    s = system
    _polled(s)
    good = s.agent.config.read_text()
    bad = good.replace(f"port = {s.sim.port} }}", f"port = {free_port()} }}")
    sent = s.send(bad)
    wait_for(lambda: (s.history / "trial.json").exists() and s.agent.config.read_text() == bad,
             timeout=30, what="trial begun")
    s.agent.kill()
    trial = json.loads((s.history / "trial.json").read_text())
    assert (trial["cmd_id"], trial["phase"]) == (sent["cmd_id"], "trial")
    s.agent.start()
    back = s.wait_final(sent["cmd_id"], timeout=40 + WINDOW_S)
    assert (back["state"], back["reason"]) == ("failed", "rolled_back"), back
    assert s.agent.config.read_text() == good
    assert not (s.history / "trial.json").exists()
