"""叫应 from the REAL edge (DESIGN.md §7, issue 11): a real central process, a private
Mosquitto, a real edge agent process and two terminal simulator processes, one on loopback TCP
and one on a pty. Central's red warning is played by the agent, the simulated people answer,
and central's workflow shows delivered and answered. An ack recorded while the broker is down
survives a SIGKILL of the agent and arrives once. With the uplink cut, a local level-2 alarm
makes the agent play its local warning by itself, and central learns of it afterwards."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fleet import Agent, Central, Child, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, free_port, port_open, wait_for

pytestmark = pytest.mark.e2e

GW = "gw-term-01"
TIMEOUT = 30.0  # generous: a loaded 2-core box; the waits end on behaviour
LOCAL_TEXT = "燃气泄漏，请立即撤离"


class TerminalProcess(Child):
    """`python -m firmware_stubs.terminal_sim` on TCP or on a pty, with its control port."""

    def __init__(self, workdir: Path, tid: str, *, pty: bool) -> None:
        self.tid = tid
        self.control_port = free_port()
        self.port = 0 if pty else free_port()
        self.link = workdir / f"{tid}.link"
        args = [sys.executable, "-m", "firmware_stubs.terminal_sim", "--terminal-id", tid,
                "--heartbeat", "2", "--control-port", str(self.control_port)]
        args += ["--pty", "--link-file", str(self.link)] if pty else ["--tcp", "--port",
                                                                      str(self.port)]
        super().__init__(f"term-{tid}", args, workdir)
        self.pty = pty

    def start(self) -> None:
        super().start()
        wait_for(lambda: port_open("127.0.0.1", self.control_port), timeout=20,
                 what=f"{self.tid} control port")
        if self.pty:
            wait_for(self.link.exists, timeout=20, what=f"{self.tid} pty")

    def toml(self) -> str:
        where = (f'serial = "{self.link.read_text().strip()}"' if self.pty
                 else f'tcp = "127.0.0.1:{self.port}"')
        return f'\n[[terminals]]\nid = "{self.tid}"\n{where}\n'

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as conn:
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply: dict[str, Any] = json.loads(conn.makefile().readline())
        assert reply.get("ok"), reply
        return reply


@dataclass
class System:
    tmp: Path
    broker: Mosquitto
    central: Central
    http: httpx.Client
    terms: dict[str, TerminalProcess]
    key: str
    agent: Agent | None = None
    sim: Simulator | None = None

    def start_agent(self, extra: str = "", devices: list[DeviceDef] | None = None) -> Agent:
        conf = (f'\n[commands]\ncentral_public_key = "{self.key}"\n'
                + "".join(t.toml() for t in self.terms.values()) + extra)
        self.agent = Agent(self.tmp, GW, self.broker.port, self.sim.port if self.sim else 0,
                           devices or [], extra=conf)
        self.agent.start()
        wait_for(self.online, timeout=TIMEOUT, what=f"gateway online; agent:\n"
                 f"{self.agent.tail(20)}")
        return self.agent

    def online(self) -> bool:
        rsp = self.http.get(f"/api/gateways/{GW}")
        return rsp.status_code == 200 and bool(rsp.json()["online"])

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        rsp = self.http.post(path, json=body)
        assert rsp.status_code == 201, rsp.text
        return dict(rsp.json())

    def street(self) -> int:
        city = self.post("/api/areas", {"level": "city", "code": "c", "name_zh": "武汉市"})
        dist = self.post("/api/areas", {"parent_id": city["id"], "level": "district",
                                        "code": "d", "name_zh": "江岸区"})
        street = self.post("/api/areas", {"parent_id": dist["id"], "level": "street",
                                          "code": "s", "name_zh": "二七街道"})
        for t in self.terms:
            rsp = self.http.put(f"/api/callresp/terminals/{t}",
                                json={"gw": GW, "area_id": street["id"]})
            assert rsp.status_code == 200, rsp.text
        return int(street["id"])

    def issue(self, street: int) -> str:
        w = self.post("/api/callresp/warnings", {"level": "red", "areas": [street],
                                                 "text": "暴雨红色预警：请立即组织人员转移"})
        return str(w["id"])

    def targets(self, wid: str) -> dict[str, dict[str, Any]]:
        rsp = self.http.get(f"/api/callresp/warnings/{wid}")
        if rsp.status_code != 200:
            return {}
        return {t["ref"]: t for t in rsp.json()["targets"]}

    def states(self, wid: str) -> dict[str, str]:
        return {ref: t["state"] for ref, t in self.targets(wid).items()}

    def events(self, event: str) -> list[dict[str, Any]]:
        """The EVENT records central stored for this gateway whose attrs name `event`."""
        rows = sqlite_rows(self.central.db_path, "SELECT attrs FROM events WHERE gw = ? AND"
                           " attrs IS NOT NULL", (GW,))
        attrs = [json.loads(r[0]) for r in rows]
        return [a for a in attrs if a.get("event") == event]

    def mqtt_drops(self) -> int:
        assert self.agent is not None
        return self.agent.log_path.read_text(errors="replace").count("mqtt_disconnected")


@pytest.fixture
def system(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[System]:
    cfg = tmp_path / "central.toml"
    cfg.write_text("[central.callresp]\ntick_s = 0.2\n")
    central = Central(tmp_path, mosquitto.port, extra_args=["--config", str(cfg)])
    terms = {"t-1": TerminalProcess(tmp_path, "t-1", pty=False),
             "t-2": TerminalProcess(tmp_path, "t-2", pty=True)}
    stack = contextlib.ExitStack()
    s: System | None = None
    try:
        for t in terms.values():
            stack.callback(t.stop)
            t.start()
        stack.callback(central.stop)
        central.start()
        http = stack.enter_context(httpx.Client(base_url=central.base_url, timeout=15,
                                                headers=central.auth_headers()))
        key = http.get("/api/keys/commands").json()["public_key"]
        s = System(tmp_path, mosquitto, central, http, terms, key)
        yield s
    finally:
        if s is not None:
            for child in (s.agent, s.sim):
                if child is not None:
                    child.stop()
        stack.close()


def _acks(s: System, wid: str, terminal: str) -> list[dict[str, Any]]:
    return [a for a in s.events("callresp") if a["warning_id"] == wid
            and a["terminal"] == terminal and a["type"] == "ack"]


def test_red_warning_played_delivered_and_answered_from_the_edge(system: System) -> None:
    """Central's red warning reaches a TCP and a pty terminal through the real agent; both
    people press; central shows each target delivered then answered, the command's result
    names both terminals delivered, and each receipt and ack is stored once."""
    s = system
    s.start_agent()
    street = s.street()
    for term in s.terms.values():
        term.control({"person": {"press_after_s": 0.5}})
    wid = s.issue(street)
    wait_for(lambda: s.states(wid) == {"t-1": "answered", "t-2": "answered"}, timeout=TIMEOUT,
             interval=0.2, what=f"both answered; agent:\n{s.agent and s.agent.tail(20)}")
    for ref, target in s.targets(wid).items():
        assert target["delivered_ms"] <= target["answered_ms"], (ref, target)
        assert target["attempts"] == 1
    rsp = s.http.get(f"/api/callresp/warnings/{wid}").json()
    # one command per gateway carries the warning to both of its terminals
    (cmd_id,) = {c for st in rsp["steps"] if st["step"] == "sent"
                 for c in st["detail"]["cmd_ids"]}
    cmd = wait_for(lambda: (c := s.http.get(f"/api/commands/{cmd_id}").json())["state"]
                   == "succeeded" and c, timeout=TIMEOUT, what="command succeeded")
    assert cmd["result"]["terminals"] == {"t-1": {"result": "delivered"},
                                          "t-2": {"result": "delivered"}}
    for tid, term in s.terms.items():
        state = term.control({"state": {}})
        assert [p["text"] for p in state["played"]] == ["暴雨红色预警：请立即组织人员转移"]
        assert len(state["acks_confirmed"]) == 1
        recs = [a for a in s.events("callresp") if a["terminal"] == tid]
        assert sorted(a["type"] for a in recs) == ["ack", "delivered"]
        assert {a["cmd_id"] for a in recs} == {cmd_id}


def test_ack_recorded_offline_survives_kill_and_arrives_once(system: System) -> None:
    """With the broker down the agent stores a button press and confirms it to the terminal;
    SIGKILLed before it could upload it and restarted, it delivers that ack to central once."""
    s = system
    agent = s.start_agent()
    street = s.street()
    wid = s.issue(street)
    wait_for(lambda: s.states(wid) == {"t-1": "delivered", "t-2": "delivered"},
             timeout=TIMEOUT, interval=0.2, what=f"delivered; agent:\n{agent.tail(20)}")
    drops = s.mqtt_drops()
    s.broker.stop()
    wait_for(lambda: s.mqtt_drops() > drops, timeout=TIMEOUT, what="the agent off the broker")
    s.terms["t-1"].control({"press": {}})
    wait_for(lambda: len(s.terms["t-1"].control({"state": {}})["acks_confirmed"]) == 1,
             timeout=TIMEOUT, what="the agent stored and confirmed the ack")
    agent.kill()  # SIGKILL: recorded in the outbox, never uploaded
    assert _acks(s, wid, "t-1") == []
    s.broker.start()
    agent.start()
    wait_for(lambda: s.states(wid) == {"t-1": "answered", "t-2": "delivered"},
             timeout=TIMEOUT, interval=0.2, what=f"t-1 answered; agent:\n{agent.tail(20)}")
    assert len(_acks(s, wid, "t-1")) == 1
    deliveries = [a for a in s.events("callresp") if a["type"] == "delivered"]
    assert sorted(a["terminal"] for a in deliveries) == ["t-1", "t-2"]


def test_local_rule_plays_while_cut_off_and_central_learns_later(system: System) -> None:
    """The uplink is cut; a gas detector passes level 2; the agent plays its local warning on
    both terminals by itself, a person answers; when the link returns central holds the
    local warning's report, its receipts and the ack."""
    s = system
    s.sim = Simulator(s.tmp, ["gas-detector-v1"], control=True)
    s.sim.start()
    local = (f'\n[local_warning]\ntext = "{LOCAL_TEXT}"\nlevel = "red"\nrepeat = 2\n'
             'alarms = ["gas-1/gas_lel/*"]\n')
    agent = s.start_agent(local, [DeviceDef("gas-1", "gas-detector-v1", 1)])
    drops = s.mqtt_drops()
    s.broker.stop()
    wait_for(lambda: s.mqtt_drops() > drops, timeout=TIMEOUT, what="the agent off the broker")
    s.sim.control({"set": {"device_id": 1, "point": "gas_lel", "value": 57.5}})

    def played() -> list[list[dict[str, Any]]] | None:
        got = [t.control({"state": {}})["played"] for t in s.terms.values()]
        return got if all(got) else None

    plays = wait_for(played, timeout=TIMEOUT, interval=0.3,
                     what=f"the local warning played; agent:\n{agent.tail(20)}")
    assert plays is not None
    for p in plays:
        assert [(x["text"], x["level"], x["repeat"]) for x in p] == [(LOCAL_TEXT, 1, 2)]
    s.terms["t-2"].control({"press": {}})
    wait_for(lambda: s.terms["t-2"].control({"state": {}})["acks_confirmed"], timeout=TIMEOUT,
             what="ack confirmed")
    assert s.events("callresp_local") == []
    s.broker.start()
    (report,) = wait_for(lambda: s.events("callresp_local"), timeout=TIMEOUT, interval=0.3,
                         what=f"central has the local warning; agent:\n{agent.tail(20)}")
    assert report["alarm_id"] == "gas-1/gas_lel/high" and report["text"] == LOCAL_TEXT
    assert report["played"] == {"t-1": "delivered", "t-2": "delivered"}
    wid = report["warning_id"]
    wait_for(lambda: len([a for a in s.events("callresp") if a["warning_id"] == wid]) == 3,
             timeout=TIMEOUT, what="receipts and the ack")
    got = sorted((a["terminal"], a["type"]) for a in s.events("callresp")
                 if a["warning_id"] == wid)
    assert got == [("t-1", "delivered"), ("t-2", "ack"), ("t-2", "delivered")]
