"""Commands end to end on real processes (DESIGN.md §6): central's API → Mosquitto → edge agent
→ Modbus simulator, and the results back through the outbox to central's API."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt import publish
from pymodbus.client import ModbusTcpClient

from central.commands.keys import load_private_key
from protocols import commands as c
from protocols import topics
from tests.fleet import Agent, Central, Simulator, commanded_gateway
from tests.helpers import Mosquitto, wait_for

pytestmark = pytest.mark.e2e

GW = "gw-cmd-01"
SAMPLE_INTERVAL_REGISTER = 100  # gas-detector-v1: sample_interval_s, holding register, u16


class Capture:
    """Every payload published on the gateway's down/cmd, seen by a bystander client."""

    def __init__(self, broker: Mosquitto) -> None:
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cap-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda cl, *_: cl.subscribe(topics.down(GW, "cmd"), qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "capture client did not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.payloads.append(bytes(msg.payload))

    def for_cmd(self, cmd_id: str) -> bytes | None:
        with self._lock:
            for p in self.payloads:
                if c.decode_body(c.decode_envelope(p).body).cmd_id == cmd_id:
                    return p
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class System:
    broker: Mosquitto
    sim: Simulator
    central: Central
    agent: Agent
    http: httpx.Client
    capture: Capture

    def issue(self, kind: str, args: dict[str, Any], ttl_s: float) -> dict[str, Any]:
        rsp = self.http.post("/api/commands", json={"gw": GW, "kind": kind, "args": args,
                                                    "ttl_s": ttl_s})
        assert rsp.status_code == 201, rsp.text
        return rsp.json()  # type: ignore[no-any-return]

    def command(self, cmd_id: str) -> dict[str, Any]:
        rsp = self.http.get(f"/api/commands/{cmd_id}")
        return rsp.json() if rsp.status_code == 200 else {}  # type: ignore[no-any-return]

    def wait_state(self, cmd_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(lambda: (cmd := self.command(cmd_id)).get("state") == state and cmd,
                        timeout=timeout, interval=0.1, what=f"{cmd_id} to be {state}; agent:\n"
                        f"{self.agent.tail(15)}")

    def gateway_online(self) -> bool:
        rsp = self.http.get(f"/api/gateways/{GW}")
        return rsp.status_code == 200 and bool(rsp.json()["online"])

    def publish(self, payload: bytes) -> None:
        publish.single(topics.down(GW, "cmd"), payload, qos=1, hostname=self.broker.host,
                       port=self.broker.port)

    def register(self) -> int:
        client = ModbusTcpClient("127.0.0.1", port=self.sim.port)
        try:
            assert client.connect()
            rsp = client.read_holding_registers(SAMPLE_INTERVAL_REGISTER, count=1, device_id=1)
            return int(rsp.registers[0])
        finally:
            client.close()

    def set_register(self, value: int) -> None:
        client = ModbusTcpClient("127.0.0.1", port=self.sim.port)
        try:
            assert client.connect()
            assert not client.write_register(SAMPLE_INTERVAL_REGISTER, value, device_id=1).isError()
        finally:
            client.close()


@pytest.fixture
def system(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[System]:
    # Enrolment: the gateway pins central's public key from its API.
    with commanded_gateway(tmp_path, mosquitto.port, GW) as (sim, central, agent, http), \
            contextlib.closing(Capture(mosquitto)) as capture:
        yield System(mosquitto, sim, central, agent, http, capture)


def test_commands_wait_for_an_offline_gateway_and_run_once(system: System) -> None:
    """A write issued while the gateway is offline runs once when it returns and is read back;
    forged, expired and replayed commands are refused and reported to central."""
    s = system
    s.agent.start()  # the gateway enrols and connects once, so central knows it and its points
    wait_for(s.gateway_online, timeout=20, what="gateway online")
    s.agent.stop()
    wait_for(lambda: not s.gateway_online(), timeout=10, what="gateway offline")
    before = s.register()
    assert before != 30

    write = s.issue("write_point", {"device": "gas-1", "point": "sample_interval_s",
                                    "value": 30}, ttl_s=120)
    short = s.issue("write_point", {"device": "gas-1", "point": "sample_interval_s",
                                    "value": 31}, ttl_s=1)
    assert write["state"] == "pending" and write["target"] == "gas-1/sample_interval_s"
    # Offline: nothing goes out; the short-lived one expires at central, never sent.
    expired = s.wait_state(short["cmd_id"], "expired", timeout=10)
    assert (expired["reason"], expired["sent_count"]) == ("not_delivered", 0)
    assert s.command(write["cmd_id"])["sent_count"] == 0

    s.agent.start()
    done = s.wait_state(write["cmd_id"], "succeeded")
    assert done["result"]["readback"] == 30
    assert s.register() == 30
    states = [(e["state"], e["source"]) for e in done["history"]]
    assert states[:2] == [("pending", "central"), ("sent", "central")]
    assert [st for st, src in states if src == "gateway"] == ["received", "executing", "succeeded"]
    listed = s.http.get("/api/commands", params={"gw": GW}).json()
    assert {x["cmd_id"] for x in listed} == {write["cmd_id"], short["cmd_id"]}

    # Replay: the exact bytes central sent, published again, are refused and not executed.
    s.set_register(5)
    payload = wait_for(lambda: s.capture.for_cmd(write["cmd_id"]), what="captured command")
    s.publish(payload)
    def replay_seen() -> dict[str, Any] | None:
        cmd = s.command(write["cmd_id"])
        return cmd if any(e["reason"] == "replay" for e in cmd["history"]) else None

    replayed = wait_for(replay_seen, timeout=15, what="replay reported")
    assert replayed["state"] == "succeeded"
    assert [e["applied"] for e in replayed["history"] if e["reason"] == "replay"] == [False]
    assert s.register() == 5

    # Forged: a command signed by another key is refused; central sees it under its cmd_id.
    now = time.time_ns() // 1_000_000
    rogue = Ed25519PrivateKey.generate()
    forged = c.make_command("forged-1", gw=GW, issued_at_ms=now, ttl_ms=60_000,
                            args=c.WritePoint("gas-1", "sample_interval_s", 66))
    s.publish(c.sign_command(rogue, forged))
    seen = s.wait_state("forged-1", "rejected", timeout=15)
    assert (seen["reason"], seen["origin"], seen["result"]["verified"]) == (
        "bad_signature", "gateway", False)

    # Expired at the gateway: correctly signed (central's own key), but its time is over.
    central_key = load_private_key(s.central.db_path.parent / "central-command-key.pem")
    late = c.make_command("late-1", gw=GW, issued_at_ms=now - 120_000, ttl_ms=60_000,
                          args=c.WritePoint("gas-1", "sample_interval_s", 77))
    s.publish(c.sign_command(central_key, late))
    seen = s.wait_state("late-1", "expired", timeout=15)
    assert (seen["reason"], seen["state_source"]) == ("expired", "gateway")
    assert s.register() == 5
    assert s.agent.running, s.agent.tail()
