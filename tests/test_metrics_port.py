"""The agent's metrics port already in use (another agent, a stale process): one WARNING line
that says so, no traceback, retried with the supervisor's back-off until the port is free."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

from edge_agent.control.client import ControlClientError, request
from tests.fleet import Agent
from tests.helpers import Mosquitto, free_port, wait_for


def _restarts(agent: Agent) -> int:
    """metrics.http's restarts, from the running agent's status (0 until it answers)."""
    try:
        status = request(agent.data_dir / "agent.sock", "status", timeout=5.0)
    except ControlClientError:
        return 0
    return int(status["restarts"].get("metrics.http", 0))


def _scraped(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return b"fieldlink_edge_" in resp.read()
    except OSError:
        return False


def test_metrics_port_in_use_is_one_warning_then_served_once_free(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """While the port is taken the task is retried (counted) with one WARNING line naming the
    address and no traceback; once the port is free the endpoint serves."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", free_port()))
    holder.listen()
    port = holder.getsockname()[1]
    agent = Agent(tmp_path, "gw-mport", mosquitto.port, 0, [],
                  extra=f"\n[metrics]\nenabled = true\nport = {port}\ninterval_s = 0.2\n")
    try:
        agent.start()
        wait_for(lambda: _restarts(agent) >= 2, timeout=20, what="metrics.http retried twice")
        lines = agent.log_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        warned = [e for e in events if e["event"] == "task_unavailable"]
        assert [(e["level"], e["task"], e["reason"]) for e in warned] == [
            ("warning", "metrics.http", f"metrics port 127.0.0.1:{port} in use")], warned
        assert not [e for e in events if e["event"] in ("task_crashed", "task_exited")]
        assert not [line for line in lines if "Traceback" in line or "exception" in line]
        holder.close()
        wait_for(lambda: _scraped(port), timeout=20, what="the endpoint once the port is free")
    finally:
        holder.close()
        agent.stop()
