"""The `edge-agent` CLI: help with examples, profiles, config check, status, and `run` as a
real process under a fake systemd notify socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_profiles import builtin_profiles_dir
from edge_agent import __version__
from edge_agent.cli.app import app
from edge_agent.outbox.store import NewRecord, Outbox
from protocols.envelope import RecordKind
from tests.helpers import Mosquitto, python_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})

SITE = """\
[gateway]
id = "gw-cli"
data_dir = "data"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}

[status]
interval_s = 0.2

[[devices]]
id = "tank-1"
profile = "storage-tank-v1"
transport = {{ kind = "tcp", host = "127.0.0.1", port = {modbus_port} }}
poll_interval_s = 0.2
timeout_s = 0.5
"""


def _site(tmp_path: Path, mqtt_port: int = 1, modbus_port: int = 1) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(mqtt_port=mqtt_port, modbus_port=modbus_port))
    return path


def test_help_lists_every_command_with_an_example() -> None:
    """`--help` names each command next to an example invocation."""
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for example in ("edge-agent run --config", "edge-agent status", "edge-agent config check",
                    "edge-agent profiles validate", "edge-agent profiles show"):
        assert example in result.output
    for command in (["run"], ["status"], ["config", "check"], ["profiles", "validate"],
                    ["profiles", "show"]):
        sub = runner.invoke(app, [*command, "-h"])
        assert sub.exit_code == 0 and "Example: edge-agent " + " ".join(command) in sub.output


def test_version_flag() -> None:
    """`--version` prints the package version."""
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


# With tests/test_deb.py on one worker: while it has the package installed, /etc/fieldlink/site.toml
# exists and `status` without -c finds it.
@pytest.mark.xdist_group("dpkg")
def test_usage_error_exits_2() -> None:
    """An unknown command or missing option is a usage error: exit 2."""
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2
    assert runner.invoke(app, ["status"]).exit_code == 2


def test_profiles_validate_builtin_folder_passes() -> None:
    """Every built-in profile validates; one OK line per profile."""
    result = runner.invoke(app, ["profiles", "validate", str(builtin_profiles_dir())])
    assert result.exit_code == 0, result.output
    files = list(builtin_profiles_dir().glob("*.yaml"))
    assert result.output.count("OK") == len(files) >= 2
    assert "storage-tank-v1" in result.output


def test_profiles_validate_broken_profile_names_file_and_field(tmp_path: Path) -> None:
    """A broken profile fails with exit 1, naming its file and the bad field; good ones still OK."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: bad-dev\nmodel: m\nname_zh: 坏\npoints:\n"
                   "  - {key: x, name: x, name_zh: 甲, function: 4, address: 0, type: f33}\n")
    good = builtin_profiles_dir() / "storage_tank_v1.yaml"
    result = runner.invoke(app, ["profiles", "validate", str(bad), str(good)])
    assert result.exit_code == 1
    assert f"{bad}:5 points[0].type" in result.output
    assert "OK" in result.output and "Traceback" not in result.output


def test_profiles_validate_json(tmp_path: Path) -> None:
    """`--json` reports each file with ok, id and hash."""
    result = runner.invoke(app, ["profiles", "validate", "--json",
                                 str(builtin_profiles_dir() / "gas_detector_v1.yaml")])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["results"][0]["id"] == "gas-detector-v1"
    assert len(report["results"][0]["hash"]) == 64


def test_profiles_show_json_and_unknown_id() -> None:
    """`profiles show ID --json` gives the points; an unknown id is one red line, exit 1."""
    result = runner.invoke(app, ["profiles", "show", "storage-tank-v1", "--json"])
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["id"] == "storage-tank-v1"
    assert shown["points"][0] == shown["points"][0] | {"key": "level", "type": "f32",
                                                       "word_order": "little"}
    missing = runner.invoke(app, ["profiles", "show", "no-such-thing"])
    assert missing.exit_code == 1
    assert missing.output.startswith("error: no profile 'no-such-thing'")
    assert "Traceback" not in missing.output


def test_config_check_ok_and_error(tmp_path: Path) -> None:
    """`config check` says OK for a valid file and prints file:line field for a bad one."""
    path = _site(tmp_path, 1883, 5020)
    ok = runner.invoke(app, ["config", "check", str(path)])
    assert ok.exit_code == 0 and "OK" in ok.output and "gw-cli" in ok.output
    path.write_text(path.read_text().replace("poll_interval_s = 0.2", "poll_interval_s = 0"))
    bad = runner.invoke(app, ["config", "check", str(path)])
    assert bad.exit_code == 1
    assert bad.output.strip() == (f"error: {path}:16 devices[0].poll_interval_s: "
                                  "Input should be greater than 0")


async def test_status_json_reads_an_outbox(tmp_path: Path) -> None:
    """`status --json` reports backlog, oldest unsent record and its age, last seq, uplink meta."""
    path = _site(tmp_path, 1883, 5020)
    old = int(time.time() * 1000) - 60_000
    async with Outbox.open(tmp_path / "data" / "outbox.db") as ob:
        await ob.append([NewRecord(RecordKind.TELEMETRY, old + i, "tank-1/level", float(i))
                         for i in range(3)])
        await ob.append([NewRecord(RecordKind.ALARM, old + 10, "tank-1/level", 9.6)])
        await ob.set_meta("uplink_state", "disconnected")
        await ob.set_meta("uplink_since_ms", str(old))
        stream = ob.stream
    result = runner.invoke(app, ["status", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gateway"] == "gw-cli" and report["stream"] == stream
    assert report["backlog"] == 4 and report["last_seq"] == 4
    assert report["backlog_by_kind"] == {"telemetry": 3, "alarm": 1}
    assert report["oldest_unsent_ts_ms"] == old
    assert 59 <= report["oldest_unsent_age_s"] < 120
    assert report["uplink"] == {"state": "disconnected", "since_ms": old, "last_ack_ms": None,
                                "refused": None, "acks_refused": 0, "ack_records_unsent": 0,
                                "ack_records_duplicate": 0}
    assert report["agent"] == {"running": False}
    table = runner.invoke(app, ["status", "-c", str(path)])
    assert table.exit_code == 0 and "disconnected" in table.output and "4 record(s)" in table.output


def test_status_without_outbox_is_one_line_error(tmp_path: Path) -> None:
    """`status` before the agent ever ran: exit 1 with one error line, no traceback."""
    result = runner.invoke(app, ["status", "-c", str(_site(tmp_path))])
    assert result.exit_code == 1
    assert result.output.startswith("error: no outbox at ")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.e2e
def test_run_process_polls_notifies_systemd_and_stops_on_sigterm(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`edge-agent run` as a process: READY=1 and WATCHDOG=1 on $NOTIFY_SOCKET, records in the
    outbox, status shows it running, SIGTERM stops it cleanly with exit 0."""
    ready = tmp_path / "sim.ready"
    sim = subprocess.Popen([sys.executable, "-m", "firmware_stubs.modbus_sim", "--profile",
                            "storage-tank-v1", "--port", "0", "--ready-file", str(ready)],
                           env=python_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(10)
    agent: subprocess.Popen[bytes] | None = None
    try:
        wait_for(ready.exists, timeout=10, what="simulator ready file")
        site = _site(tmp_path, mosquitto.port, int(ready.read_text().split()[0]))
        env = python_env() | {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
        env.pop("WATCHDOG_PID", None)
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(site),
                                  "--log-json"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        messages = [notify.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        messages.append(notify.recv(4096).decode())
        assert "WATCHDOG=1" in messages

        def running() -> dict | None:  # type: ignore[type-arg]
            r = runner.invoke(app, ["status", "-c", str(site), "--json"])
            if r.exit_code != 0:
                return None
            report = json.loads(r.stdout)
            ok = (report["agent"]["running"] and report["last_seq"] >= 12
                  and report["uplink"]["state"] == "connected" and report["devices"]
                  and report["devices"][0]["state"] == "ok")
            return report if ok else None

        report = wait_for(running, timeout=15, what="agent polling and connected")
        assert report["devices"][0]["device"] == "tank-1"
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=15)
        assert agent.returncode == 0, output.decode()
        events = [json.loads(line)["event"] for line in output.decode().splitlines()
                  if line.startswith("{")]
        for event in ("agent_ready", "poll_started", "signal_received", "agent_stopped"):
            assert event in events
        assert "task_crashed" not in events
        notify.settimeout(0.5)
        rest = []
        try:
            while True:
                rest.append(notify.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
        after = json.loads(runner.invoke(app, ["status", "-c", str(site), "--json"]).stdout)
        assert after["agent"]["running"] is False and after["agent"]["stopped_ms"]
    finally:
        for proc in (agent, sim):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        notify.close()
        os.unlink(notify_path)
