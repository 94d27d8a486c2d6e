"""The 叫应 terminals in `edge-agent status` and `edge-agent doctor`, on real parts: a real agent
process, a private Mosquitto and two terminal simulator processes (one on loopback TCP, one on
a pty). The table and `--json` show each terminal connected (with its open faults), then the
one whose simulator is stopped as down with doctor's diagnosis; with the agent stopped, status
says what terminals.db knows and that live state needs the agent. Sizes are binary units."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge_agent.cli.app import app
from edge_agent.cli.common import fmt_bytes
from edge_agent.control.client import ControlClientError, request
from tests.fleet import Agent
from tests.helpers import Mosquitto, wait_for
from tests.test_terminals_e2e import TerminalProcess

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
TIMEOUT = 30.0


def _live(agent: Agent) -> dict[str, dict[str, Any]]:
    try:
        reply = request(agent.data_dir / "agent.sock", "status", timeout=3)
    except ControlClientError:
        return {}
    return {t["id"]: t for t in (reply.get("terminals") or {}).get("terminals") or []}


def _cli(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return result.stdout


def _terminals(agent: Agent) -> dict[str, Any]:
    report = json.loads(_cli(["status", "-c", str(agent.config), "--json"]))
    return {"source": report["terminals"]["source"], "note": report["terminals"]["note"],
            **{t["id"]: t for t in report["terminals"]["terminals"]}}


def _doctor(agent: Agent, code: int) -> dict[str, dict[str, Any]]:
    report = json.loads(_cli(["doctor", "-c", str(agent.config), "--json"], code))
    return {c["name"]: c for c in report["checks"]}


@pytest.fixture
def site(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[tuple[Agent, TerminalProcess,
                                                               TerminalProcess]]:
    t1 = TerminalProcess(tmp_path, "t-1", pty=False)
    t2 = TerminalProcess(tmp_path, "t-2", pty=True)
    agent: Agent | None = None
    try:
        t1.start()
        t2.start()
        agent = Agent(tmp_path, "gw-tstat", mosquitto.port, 0, [],
                      extra=t1.toml() + t2.toml())
        agent.start()
        yield agent, t1, t2
    finally:
        for child in (agent, t1, t2):
            if child is not None:
                child.stop()


def test_status_and_doctor_show_terminals_up_faulty_and_down(
        site: tuple[Agent, TerminalProcess, TerminalProcess]) -> None:
    agent, t1, t2 = site
    wait_for(lambda: all(t.get("connected") and t.get("last_heartbeat_ms")
                         for t in _live(agent).values()) and len(_live(agent)) == 2,
             timeout=TIMEOUT, what="both terminals connected")
    t2.control({"fault": {"speaker_fault": True}})
    wait_for(lambda: "speaker_fault" in _live(agent)["t-2"].get("faults", []),
             timeout=TIMEOUT, what="t-2's speaker fault")

    # Up: the JSON's stable keys, the table's row, doctor passes t-1 and warns on t-2.
    ts = _terminals(agent)
    assert ts["source"] == "agent" and ts["note"] is None
    one, two = ts["t-1"], ts["t-2"]
    assert (one["kind"], one["link"], one["connected"], one["faults"]) == ("audio", "tcp", True,
                                                                          [])
    assert one["since_ms"] and one["last_heartbeat_ms"] and one["enabled"] is True
    assert (one["plays_sent"], one["delivered"], one["answered"]) == (0, 0, 0)
    assert (two["link"], two["connected"]) == ("serial", True)
    assert [f["fault"] for f in two["faults"]] == ["speaker_fault"]
    assert two["faults"][0]["since_ms"]
    table = _cli(["status", "-c", str(agent.config)])
    assert "叫应 terminals" in table
    row = next(line for line in table.splitlines() if " t-1 " in line)
    assert "connected" in row and "tcp://127.0.0.1" in row
    assert "speaker_fault since" in next(line for line in table.splitlines() if " t-2 " in line)
    checks = _doctor(agent, 0)
    assert checks["terminal t-1"]["status"] == "pass"
    assert checks["terminal t-2"]["status"] == "warn"
    assert "speaker" in checks["terminal t-2"]["hint"]

    # Down: t-1's simulator stops; status shows it down, doctor fails it with the diagnosis.
    t1.stop()
    wait_for(lambda: not _live(agent)["t-1"]["connected"]
             and "lost" in _live(agent)["t-1"]["faults"], timeout=TIMEOUT, what="t-1 down")
    up_since = one["since_ms"]
    one = _terminals(agent)["t-1"]
    assert one["connected"] is False and one["since_ms"] > up_since and one["last_error"]
    assert [f["fault"] for f in one["faults"]] == ["lost"]
    table = _cli(["status", "-c", str(agent.config)])
    assert "down" in next(line for line in table.splitlines() if " t-1 " in line)
    checks = _doctor(agent, 1)
    c = checks["terminal t-1"]
    assert c["status"] == "fail" and c["detail"].startswith("no link to tcp://127.0.0.1:")
    assert "last error: " in c["detail"] and "power" in c["hint"]
    assert checks["terminal t-2"]["status"] == "warn"
    text = _cli(["doctor", "-c", str(agent.config)], 1)
    assert "✗ terminal t-1  no link to tcp://" in text

    # Agent stopped: what terminals.db knows, and that live state needs the agent.
    agent.stop()
    ts = _terminals(agent)
    assert ts["source"] == "files" and "needs the running agent" in ts["note"]
    assert ts["t-1"]["connected"] is None and ts["t-1"]["since_ms"] is None
    assert [f["fault"] for f in ts["t-1"]["faults"]] == ["lost"]
    assert [f["fault"] for f in ts["t-2"]["faults"]] == ["speaker_fault"]
    assert ts["t-2"]["delivered"] == 0
    table = _cli(["status", "-c", str(agent.config)])
    assert "unknown" in next(line for line in table.splitlines() if " t-1 " in line)
    assert "needs the running agent" in table
    checks = _doctor(agent, 1)
    assert checks["terminal t-1"]["status"] == "skip"
    assert "lost since" in checks["terminal t-1"]["detail"]


def test_sizes_are_binary_units_everywhere(tmp_path: Path) -> None:
    """One helper: B, KiB, MiB, GiB; status's outbox and disk lines and doctor's use it."""
    assert [fmt_bytes(n) for n in (None, 0, 1023, 1024, 5 * 2**20 + 2**19, 3 * 2**30,
                                   2**50)] == [
        "-", "0 B", "1023 B", "1.0 KiB", "5.5 MiB", "3.0 GiB", "1048576.0 GiB"]
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[gateway]\nid = "gw-units"\ndata_dir = "{tmp_path / "data"}"\n'
                   '[mqtt]\nhost = "127.0.0.1"\nport = 1\n')
    (tmp_path / "data").mkdir()
    doctor = json.loads(_cli(["doctor", "-c", str(cfg), "--json"], 1))
    free = next(c for c in doctor["checks"] if c["name"] == "free disk")["detail"]
    assert "iB free of " in free and " GB" not in free and " MB" not in free
    from edge_agent.cli.disk import disk_text

    line = disk_text({"state": "ok", "fs_free_bytes": 3 * 2**30, "fs_total_bytes": 2**32,
                      "reserve_bytes": 2**20, "owned_bytes": 2048, "wal_bytes": 0,
                      "ballast_bytes": 2**20})
    assert line.startswith("ok: 3.0 GiB free of 4.0 GiB (reserve 1.0 MiB); outbox files "
                           "2.0 KiB"), line
