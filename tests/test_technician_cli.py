"""The technician's commands against real agent processes, simulators on loopback and RTU buses
on pseudo-terminals: devices, read, write, alarms, status with bus counters, scan, doctor."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from device_profiles import find_profile
from edge_agent.cli.app import app
from edge_agent.control.client import ControlClientError, request
from firmware_stubs.rtu_sim import RtuBusSimulator
from tests.fleet import Agent, Child, DeviceDef, Simulator
from tests.helpers import Mosquitto, free_port, python_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def _devices_ok(agent: Agent) -> bool:
    try:
        reply = request(agent.data_dir / "agent.sock", "devices", timeout=2)
    except ControlClientError:
        return False
    return all(d["health"]["state"] == "ok" for d in reply["devices"])


def _json(args: list[str]) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_new_command_has_help_with_an_example() -> None:
    """Each technician command answers -h with an example invocation; bad usage exits 2."""
    for command in ("devices", "read", "write", "alarms", "scan", "doctor"):
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0 and f"Example: edge-agent {command}" in result.stdout
    assert runner.invoke(app, ["scan", "--port", "/dev/null", "--parity", "X"]).exit_code == 2
    bad_ids = runner.invoke(app, ["scan", "--port", "/dev/null", "--ids", "0-300"])
    assert bad_ids.exit_code == 2 and "within 1-247" in bad_ids.stderr


def test_devices_read_write_alarms_through_the_agent(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """devices/read/write/alarms talk to the running agent; write asks first (showing the
    current and new value), --yes skips that and prints the read-back; alarms fall back to
    alarms.db and read refuses once the agent is stopped."""
    sim = Simulator(tmp_path, ["gas-detector-v1"], control=True)
    sim.start()
    agent = Agent(tmp_path, "gw-tech", mosquitto.port, sim.port,
                  [DeviceDef("gas-1", "gas-detector-v1", 1)], poll_interval_s=0.2)
    cfg = ["-c", str(agent.config)]
    try:
        agent.start()
        wait_for(lambda: _devices_ok(agent), timeout=20, what="agent devices ok")

        listed = _json(["devices", *cfg, "--json"])
        assert listed["source"] == "agent" and listed["devices"][0]["id"] == "gas-1"
        table = runner.invoke(app, ["devices", *cfg])
        assert table.exit_code == 0 and "gas-detector-v1" in table.stdout and "ok" in table.stdout

        sim.control({"set": {"point": "gas_lel", "value": 7.5}})
        read = runner.invoke(app, ["read", *cfg, "gas-1", "gas_lel"])
        assert read.exit_code == 0 and "7.5 %LEL" in read.stdout
        assert {p["key"] for p in _json(["read", *cfg, "gas-1", "--json"])["points"]} >= {
            "gas_lel", "sample_interval_s", "relay_test"}

        declined = runner.invoke(app, ["write", *cfg, "gas-1", "sample_interval_s", "9"],
                                 input="n\n")
        assert declined.exit_code == 1 and "1 s → 9 s?" in declined.stderr
        assert sim.control({"get": {"point": "sample_interval_s"}})["value"] == 1

        written = runner.invoke(app, ["write", *cfg, "gas-1", "sample_interval_s", "9", "--yes"])
        assert written.exit_code == 0, written.output
        assert "1 s → 9 s; read back 9 s" in written.stdout
        assert sim.control({"get": {"point": "sample_interval_s"}})["value"] == 9
        relay = _json(["write", *cfg, "gas-1", "relay_test", "on", "--yes", "--json"])
        assert relay == {"device": "gas-1", "point": "relay_test", "previous": False,
                         "value": True, "readback": True}

        refused = runner.invoke(app, ["write", *cfg, "gas-1", "gas_lel", "3", "--yes"])
        assert refused.exit_code == 1 and "not writable" in refused.stderr
        assert runner.invoke(app, ["read", *cfg]).exit_code == 2  # DEVICE missing: usage

        sim.control({"set": {"point": "gas_lel", "value": 30.0}})
        wait_for(lambda: _json(["alarms", *cfg, "--json"])["alarms"], timeout=10,
                 what="gas level-1 alarm")
        live = _json(["alarms", *cfg, "--json"])
        assert live["source"] == "agent"
        assert [(a["point"], a["level"]) for a in live["alarms"]] == [("gas-1/gas_lel", 1)]
    finally:
        agent.stop()
        sim.stop()
    saved = _json(["alarms", *cfg, "--json"])
    assert saved["source"] == "alarms.db"
    assert [(a["point"], a["level"]) for a in saved["alarms"]] == [("gas-1/gas_lel", 1)]
    down = runner.invoke(app, ["read", *cfg, "gas-1"])
    assert down.exit_code == 1 and "not running" in down.stderr


def _rtu_sim(tmp_path: Path, profiles: list[str]) -> tuple[Child, str, int]:
    """An RTU bus simulator process on a pty: (process, pty path, control port)."""
    link = tmp_path / "bus.link"
    control = free_port()
    args = [sys.executable, "-m", "firmware_stubs.rtu_sim", "--link-file", str(link),
            "--control-port", str(control)]
    for p in profiles:
        args += ["--profile", p]
    child = Child("rtu-sim", args, tmp_path)
    child.start()
    path = wait_for(lambda: link.exists() and link.read_text().strip(), timeout=20,
                    what="rtu sim link file")
    return child, str(path), control


def _rtu_get(port: int, point: str, device_id: int) -> object:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(json.dumps({"get": {"device_id": device_id, "point": point}}).encode() + b"\n")
        return json.loads(conn.makefile().readline())["value"]


def test_rtu_agent_status_bus_counters_write_and_scan_refused(tmp_path: Path,
                                                              mosquitto: Mosquitto) -> None:
    """With RTU devices, `status --json` carries each device's bus counters live from the
    agent, `write` goes over the shared bus, and `scan` refuses the port the agent owns."""
    sim, pty, control = _rtu_sim(tmp_path, ["gas-detector-v1", "storage-tank-v1"])
    rtu = ("\n[[devices]]\nid = \"gas-1\"\nprofile = \"gas-detector-v1\"\n"
           f"transport = {{ kind = \"rtu\", port = \"{pty}\" }}\ndevice_id = 1\n"
           "poll_interval_s = 0.3\n"
           "\n[[devices]]\nid = \"tank-2\"\nprofile = \"storage-tank-v1\"\n"
           f"transport = {{ kind = \"rtu\", port = \"{pty}\" }}\ndevice_id = 2\n"
           "poll_interval_s = 0.3\n")
    agent = Agent(tmp_path, "gw-rtu", mosquitto.port, 0, [], extra=rtu)
    cfg = ["-c", str(agent.config)]
    try:
        agent.start()
        wait_for(lambda: _devices_ok(agent), timeout=20, what="rtu devices ok")
        report = _json(["status", *cfg, "--json"])
        assert report["live"] is True and report["agent"]["running"] is True
        by_id = {d["device"]: d for d in report["devices"]}
        assert by_id["gas-1"]["bus"]["device_id"] == 1 and by_id["tank-2"]["bus"]["device_id"] == 2
        assert all(d["bus"]["requests"] >= d["bus"]["responses"] > 0 for d in by_id.values())
        assert [b["port"] for b in report["buses"]] == [pty]
        assert set(report["buses"][0]["slaves"]) == {"1", "2"}
        table = runner.invoke(app, ["status", *cfg])
        assert table.exit_code == 0 and "RTU bus counters" in table.stdout

        written = runner.invoke(app, ["write", *cfg, "gas-1", "sample_interval_s", "4", "-y"])
        assert written.exit_code == 0 and "read back 4 s" in written.stdout
        assert _rtu_get(control, "sample_interval_s", 1) == 4

        for extra in ([], cfg):  # by the port's lock, and by asking the agent
            busy = runner.invoke(app, ["scan", "--port", pty, "--ids", "1-3", *extra])
            assert busy.exit_code == 1 and pty in busy.stderr
            assert "systemctl stop fieldlink-edge" in busy.stderr.replace("\n", " ")
    finally:
        agent.stop()
        sim.stop()


async def test_scan_finds_exactly_the_slaves_on_the_bus(tmp_path: Path) -> None:
    """`scan` on a bus with slaves 1, 2 and 5 reports exactly those (an exception answer
    counts as present), with a progress bar on the terminal and JSON on stdout."""
    gas, tank = find_profile("gas-detector-v1"), find_profile("storage-tank-v1")
    async with RtuBusSimulator({1: gas, 2: tank, 5: gas}) as sim:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "scan", "--port", sim.path, "--baud", "9600",
            "--ids", "1-8", "--timeout", "0.1", "--json", cwd=ROOT, env=python_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr.decode()
        report = json.loads(stdout)
        assert report["found"] == [1, 2, 5] and report["scanned"] == 8
        assert [sim.stats(i).requests > 0 for i in (1, 2, 5)] == [True, True, True]

        table = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "scan", "-p", sim.path, "--ids", "4-5",
            "--timeout", "0.1", cwd=ROOT, env=python_env() | {"COLUMNS": "120"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _ = await asyncio.wait_for(table.communicate(), 30)
        assert table.returncode == 0 and "found 1 slave(s) among 2 id(s): 5" in out.decode()


def test_doctor_passes_on_a_good_site(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """On a working site every check passes (an unsynchronised clock only warns): exit 0."""
    sim = Simulator(tmp_path, ["storage-tank-v1"])
    sim.start()
    agent = Agent(tmp_path, "gw-doc", mosquitto.port, sim.port,
                  [DeviceDef("tank-1", "storage-tank-v1", 1)], poll_interval_s=0.3)
    try:
        agent.start()
        wait_for(lambda: _devices_ok(agent), timeout=20, what="agent devices ok")
        result = runner.invoke(app, ["doctor", "-c", str(agent.config), "--json"])
        report = json.loads(result.stdout)
        assert result.exit_code == 0 and report["ok"] is True, result.output
        names = {c["name"]: c["status"] for c in report["checks"]}
        for name in ("config valid", "profiles load", "data folder writable", "free disk",
                     "outbox intact", f"modbus tcp 127.0.0.1:{sim.port}",
                     f"broker 127.0.0.1:{mosquitto.port}", "agent running", "device tank-1"):
            assert names.pop(name) == "pass", name
        assert names.pop("clock") in ("pass", "warn") and not names
        text = runner.invoke(app, ["doctor", "-c", str(agent.config)])
        assert text.exit_code == 0 and "✓ broker" in text.stdout and "all checks passed" in text.stdout
    finally:
        agent.stop()
        sim.stop()


def test_doctor_names_an_unreachable_broker_and_a_missing_port(tmp_path: Path) -> None:
    """A closed broker port and a serial port that does not exist each fail with a hint;
    exit 1."""
    site = tmp_path / "site.toml"
    site.write_text(f"""\
[gateway]
id = "gw-bad"
data_dir = "{tmp_path / 'data'}"

[mqtt]
host = "127.0.0.1"
port = {free_port()}

[[devices]]
id = "gas-9"
profile = "gas-detector-v1"
transport = {{ kind = "rtu", port = "/dev/ttyFIELDLINK-NOPE" }}
""")
    result = runner.invoke(app, ["doctor", "-c", str(site)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    broker = next(i for i, line in enumerate(lines) if "broker 127.0.0.1" in line)
    port = next(i for i, line in enumerate(lines) if "serial port /dev/ttyFIELDLINK-NOPE" in line)
    assert lines[broker].startswith("✗") and lines[broker + 1].strip().startswith("hint:")
    assert lines[port].startswith("✗") and "missing" in lines[port]
    assert "✓ config valid" in result.stdout
    report = json.loads(runner.invoke(app, ["doctor", "-c", str(site), "--json"]).stdout)
    failed = {c["name"] for c in report["checks"] if c["status"] == "fail"}
    assert {"serial port /dev/ttyFIELDLINK-NOPE", "agent running"} <= failed
    assert any(n.startswith("broker ") for n in failed) and report["ok"] is False
