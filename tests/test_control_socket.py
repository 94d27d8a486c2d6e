"""The agent's local control socket: JSON lines against a real agent process and simulator,
and the socket file's life cycle in-process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import AgentRuntime
from edge_agent.config.site import parse_config
from edge_agent.control.client import AgentNotRunningError, ControlRequestError, request
from edge_agent.control.server import ControlOps, ControlServer, ControlSocketError
from tests.fleet import Agent, DeviceDef, Simulator, sqlite_rows
from tests.helpers import Mosquitto, wait_for


def _raw(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw lines on one connection, one answer per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        f = sock.makefile("rwb")
        answers = []
        for line in lines:
            f.write(line)
            f.flush()
            answers.append(json.loads(f.readline()))
        return answers


def _ready(sock: Path) -> bool:
    try:
        return all(d["health"]["state"] == "ok" for d in request(sock, "devices", timeout=2)["devices"])
    except (AgentNotRunningError, ControlRequestError, KeyError):
        return False


def test_agent_answers_status_devices_read_write_alarms(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A running agent answers every op over its 0660 socket; a write changes the device and
    is read back; a raised alarm is listed; bad requests get typed errors, not a dropped line."""
    sim = Simulator(tmp_path, ["gas-detector-v1", "storage-tank-v1"], control=True)
    sim.start()
    agent = Agent(tmp_path, "gw-ctl", mosquitto.port, sim.port,
                  [DeviceDef("gas-1", "gas-detector-v1", 1), DeviceDef("tank-1", "storage-tank-v1", 2)],
                  poll_interval_s=0.2)
    sock = agent.data_dir / "agent.sock"
    try:
        agent.start()
        wait_for(lambda: _ready(sock), timeout=20, what="agent socket with devices ok")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        # The uplink connects on its own schedule, not the devices': its state comes next.
        wait_for(lambda: request(sock, "status")["uplink"]["connected"], timeout=20,
                 what="the uplink connected")

        status = request(sock, "status")
        assert status["gateway"] == "gw-ctl" and status["pid"] == agent.proc.pid  # type: ignore[union-attr]
        assert {d["device"] for d in status["devices"]} == {"gas-1", "tank-1"}
        assert status["buses"] == [] and status["backlog"]["records"] >= 0
        assert status["uplink"]["connected"] is True

        devices = {d["id"]: d for d in request(sock, "devices")["devices"]}
        assert devices["gas-1"]["endpoint"] == f"tcp://127.0.0.1:{sim.port}"
        assert devices["gas-1"]["unit"] == 1 and devices["gas-1"]["protocol"] == "modbus"

        sim.control({"set": {"device_id": 1, "point": "gas_lel", "value": 12.5}})
        one = request(sock, "read", device="gas-1", point="gas_lel")["points"]
        assert [(p["key"], p["value"]) for p in one] == [("gas_lel", 12.5)]
        every = {p["key"]: p for p in request(sock, "read", device="tank-1")["points"]}
        assert set(every) >= {"level", "temperature"} and "error" not in every["level"]

        dry = request(sock, "write", device="gas-1", point="sample_interval_s", value="7",
                      dry_run=True)
        assert dry["current"] == 1 and dry["value"] == 7 and dry["written"] is False
        assert sim.control({"get": {"device_id": 1, "point": "sample_interval_s"}})["value"] == 1
        done = request(sock, "write", device="gas-1", point="sample_interval_s", value=7)
        assert done["readback"] == 7 and done["written"] is True
        assert sim.control({"get": {"device_id": 1, "point": "sample_interval_s"}})["value"] == 7
        audit = sqlite_rows(agent.outbox, "SELECT point, value FROM records WHERE kind = 2 "
                            "AND point = 'gas-1/sample_interval_s'")
        assert audit == [("gas-1/sample_interval_s", 7)]

        sim.control({"set": {"device_id": 1, "point": "gas_lel", "value": 60.0}})
        def gas_alarm() -> dict[str, Any] | None:
            return next((a for a in request(sock, "alarms")["alarms"]
                         if a["point"] == "gas-1/gas_lel"), None)

        alarm = wait_for(gas_alarm, timeout=10, what="gas alarm")
        assert alarm["level"] == 2 and alarm["rule"] == "high" and alarm["value"] == 60.0

        errors = _raw(sock, b'{"op": "read", "device": "nope"}\n',
                      b'{"op": "write", "device": "gas-1", "point": "gas_lel", "value": 1}\n',
                      b'{"op": "write", "device": "gas-1", "point": "sample_interval_s", '
                      b'"value": "lots"}\n',
                      b'{"op": "frobnicate"}\n', b"not json\n", b'{"op": "status"}\n')
        assert [e.get("error", {}).get("type") for e in errors] == [
            "unknown_device", "not_writable", "bad_value", "bad_request", "bad_request", None]
        assert errors[3]["error"]["message"].startswith("op: Input tag 'frobnicate'")
        assert errors[-1]["ok"] is True  # the connection survived the bad lines
    finally:
        agent.stop()
        sim.stop()
    assert not sock.exists()  # removed on a clean stop


async def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    """A socket file nobody answers on is taken over; a second server on a live one fails."""
    cfg = parse_config(f'[gateway]\nid = "gw-s"\ndata_dir = "{tmp_path}"\n', tmp_path / "s.toml")
    runtime = AgentRuntime(config=cfg, boot_id="b", started_ms=0)
    path = cfg.control_socket_path
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a SIGKILLed agent leaves behind
    stale.close()
    first = ControlServer(path, ControlOps(runtime))
    task = asyncio.create_task(first.serve())
    try:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if stat.S_IMODE(os.stat(path).st_mode) == 0o660:
                break
        reply = await asyncio.to_thread(request, path, "status")
        assert reply["gateway"] == "gw-s" and reply["devices"] == []
        with pytest.raises(ControlSocketError, match="another agent"):
            await ControlServer(path, ControlOps(runtime)).serve()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not path.exists()
    with pytest.raises(AgentNotRunningError):
        request(path, "status")
