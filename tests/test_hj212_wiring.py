"""HJ 212 stations as configured devices: config checks that name the line, `profiles show`,
a station simulator on a pty feeding a real agent, and a full outbox that costs one frame."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_profiles import find_profile
from edge_agent.cli.app import app
from edge_agent.config.site import ConfigError, DeviceConfig, Hj212TransportConfig, parse_config
from edge_agent.control.client import ControlClientError, request
from edge_agent.field.stations import Hj212Station
from edge_agent.outbox.store import NewRecord, Outbox
from protocols.envelope import RecordKind
from tests.fleet import Agent, Child, sqlite_rows
from tests.helpers import Mosquitto, free_port, wait_for

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
STATION = "forest-fire-station-v1"
HEAD = '[gateway]\nid = "gw-hj"\ndata_dir = "data"\n'


def _device(dev_id: str, profile: str, transport: str) -> str:
    return f'\n[[devices]]\nid = "{dev_id}"\nprofile = "{profile}"\ntransport = {transport}\n'


def test_config_check_rejects_hj212_profile_on_tcp_naming_the_line(tmp_path: Path) -> None:
    """`config check` refuses a station profile behind a Modbus TCP transport, at its line."""
    site = tmp_path / "site.toml"
    site.write_text(HEAD + _device("ffs-1", STATION, '{ kind = "tcp", host = "10.0.0.9" }'))
    result = runner.invoke(app, ["config", "check", str(site)])
    assert result.exit_code == 1
    assert (f"site.toml:8 devices[0].transport.kind: profile '{STATION}' speaks hj212: the "
            "transport kind must be hj212, not 'tcp'") in result.stderr.replace("\n", "")


@pytest.mark.parametrize(("devices", "line", "field", "message"), [
    (_device("gas-1", "gas-detector-v1", '{ kind = "hj212", port = "/dev/ttyS2" }'), 8,
     "devices[0].transport.kind", "speaks modbus: the transport kind must be rtu or tcp"),
    (_device("ffs-1", STATION, '{ kind = "hj212", port = "/dev/ttyS2" }')
     + _device("ffs-2", STATION, '{ kind = "hj212", port = "/dev/ttyS2" }'), 13,
     "devices[1].transport.port", "already carries the HJ 212 station devices[0]"),
    (_device("ffs-1", STATION, '{ kind = "hj212", port = "/dev/ttyS2" }')
     + _device("gas-1", "gas-detector-v1", '{ kind = "rtu", port = "/dev/ttyS2" }'), 13,
     "devices[1].transport.port", "a Modbus RTU bus cannot share it"),
    (_device("ffs-1", STATION, '{ kind = "hj212", port = "/dev/ttyS2", tz = "Mars/Olympus" }'),
     8, "devices[0].transport.tz", "unknown time zone 'Mars/Olympus'"),
])
def test_hj212_transport_checks(tmp_path: Path, devices: str, line: int, field: str,
                                message: str) -> None:
    """Protocol must match the transport, a station owns its port, and the zone must exist."""
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + devices, tmp_path / "site.toml")
    assert (info.value.line, info.value.field) == (line, field)
    assert message in info.value.message


def test_hj212_transport_defaults(tmp_path: Path) -> None:
    """A station needs only its port; line settings and zone have the usual defaults."""
    cfg = parse_config(HEAD + _device("ffs-1", STATION, '{ kind = "hj212", port = "/dev/ttyS2" }'),
                       tmp_path / "site.toml")
    t = cfg.devices[0].transport
    assert isinstance(t, Hj212TransportConfig)
    assert (t.baudrate, t.bytesize, t.parity, t.stopbits, t.mn, t.tz) == (
        9600, 8, "N", 1, None, "Asia/Shanghai")
    assert t.endpoint == "hj212:///dev/ttyS2"


def test_profiles_show_an_hj212_profile() -> None:
    """`profiles show` lists a station's factor codes instead of registers, also as JSON."""
    table = runner.invoke(app, ["profiles", "show", STATION])
    assert table.exit_code == 0 and "a01001" in table.stdout and "hj212" in table.stdout
    shown = json.loads(runner.invoke(app, ["profiles", "show", STATION, "--json"]).stdout)
    air = next(p for p in shown["points"] if p["key"] == "air_temp")
    assert air["factor"] == "a01001" and "function" not in air and shown["protocol"] == "hj212"


def _set(port: int, point: str, value: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(json.dumps({"set": {"point": point, "value": value}}).encode() + b"\n")
        assert json.loads(conn.makefile().readline())["ok"]


def _station_health(agent: Agent) -> dict | None:  # type: ignore[type-arg]
    try:
        rows = request(agent.data_dir / "agent.sock", "devices", timeout=2)["devices"]
    except ControlClientError:
        return None
    health = rows[0]["health"]
    return health if health["state"] == "ok" else None


def test_agent_reads_a_station_on_a_pty_into_the_outbox(tmp_path: Path,
                                                          mosquitto: Mosquitto) -> None:
    """An agent with an HJ 212 station writes its factors into the outbox as telemetry, runs
    the alarm rules on them, and shows the station's health in `devices` and `status`."""
    link, control = tmp_path / "ffs.link", free_port()
    sim = Child("hj212-sim", [sys.executable, "-m", "firmware_stubs.hj212_sim", "--profile",
                              STATION, "--interval", "0.3", "--link-file", str(link),
                              "--control-port", str(control)], tmp_path)
    sim.start()
    pty = wait_for(lambda: link.exists() and link.read_text().strip(), timeout=20,
                   what="station link file")
    station = _device("ffs-1", STATION, f'{{ kind = "hj212", port = "{pty}" }}') \
        + "poll_interval_s = 0.3\n"
    agent = Agent(tmp_path, "gw-ffs", mosquitto.port, 0, [], extra=station)
    cfg = ["-c", str(agent.config)]
    try:
        agent.start()
        health = wait_for(lambda: _station_health(agent), timeout=20, what="station ok")
        assert health["kind"] == "hj212" and health["hj212"]["realtime_frames"] >= 1
        keys = {p.key for p in find_profile(STATION).points}
        rows = wait_for(lambda: sqlite_rows(agent.outbox, "SELECT DISTINCT point FROM records "
                                            "WHERE kind = 0 AND point LIKE 'ffs-1/%'"),
                        timeout=10, what="station telemetry")
        assert {r[0] for r in rows} <= {f"ffs-1/{k}" for k in keys}
        assert {"ffs-1/air_temp", "ffs-1/humidity", "ffs-1/wind_speed"} <= {r[0] for r in rows}

        _set(control, "humidity", 15.0)  # below low2 (20 %RH): a level-2 fire-danger alarm
        alarm = wait_for(lambda: [a for a in request(agent.data_dir / "agent.sock", "alarms")[
            "alarms"] if a["point"] == "ffs-1/humidity"], timeout=10, what="humidity alarm")
        assert alarm[0]["level"] == 2 and alarm[0]["rule"] == "low"

        report = json.loads(runner.invoke(app, ["status", *cfg, "--json"]).stdout)
        assert [(d["device"], d["state"]) for d in report["devices"]] == [("ffs-1", "ok")]
        read = runner.invoke(app, ["read", *cfg, "ffs-1"])
        assert read.exit_code == 1 and "HJ 212 station" in read.stderr
    finally:
        agent.stop()
        sim.stop()
    assert "hj212[ffs-1]" in agent.log_path.read_text()


async def test_full_outbox_costs_a_station_one_frame(tmp_path: Path) -> None:
    """A station whose outbox is full counts it in health and returns; nothing is raised."""
    dev = DeviceConfig.model_validate({"id": "ffs-1", "profile": STATION,
                                       "transport": {"kind": "hj212", "port": "/dev/null"}})
    async with Outbox.open(tmp_path / "o.db", max_bytes=2**20) as ob:
        # Fill the cap to its last bytes: a full outbox then holds alarms in memory (append
        # returns no seqs) and refuses telemetry (outbox_ring.py).
        for size, batch in ((200, 20), (1, 1)):
            for i in range(100_000):
                if await ob.append([NewRecord(RecordKind.ALARM, 1_800_000_000_000 + i, "d/p",
                                              "x" * size) for _ in range(batch)]) == []:
                    break
        station = Hj212Station(dev, find_profile(STATION), ob)
        frame = [NewRecord(RecordKind.TELEMETRY, 1_800_000_000_000, "ffs-1/air_temp", 21.5)]
        assert await station.append(frame) == [] and await station.append(frame) == []
        assert station.health.outbox_full == 2
