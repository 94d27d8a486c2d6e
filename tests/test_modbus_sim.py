"""Modbus TCP simulator: real pymodbus client over loopback, in-process and as a subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from device_profiles import Profile, find_profile
from firmware_stubs.modbus_sim import BadValueError, ModbusTcpSimulator, UnknownPointError
from protocols.read_plan import plan_reads
from tests.helpers import python_env, wait_for

GAS = find_profile("gas-detector-v1")
TANK = find_profile("storage-tank-v1")


async def read_profile(client: AsyncModbusTcpClient, profile: Profile, device_id: int) -> dict:
    """Read every point of a profile through the planner and decode it with protocols/."""
    readers = {
        1: client.read_coils,
        2: client.read_discrete_inputs,
        3: client.read_holding_registers,
        4: client.read_input_registers,
    }
    values: dict = {}
    for block in plan_reads(profile.specs):
        read = readers[block.function]
        response = await read(block.start, count=block.count, device_id=device_id)
        assert not response.isError(), response
        if block.function in (1, 2):
            words = [int(b) for b in response.bits[: block.count]]
        else:
            words = response.registers
        values.update(block.decode(words))
    return values


@pytest.fixture
async def sim() -> AsyncIterator[ModbusTcpSimulator]:
    async with ModbusTcpSimulator({1: GAS, 2: TANK}, seed=7) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: ModbusTcpSimulator) -> AsyncIterator[AsyncModbusTcpClient]:
    modbus = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=2, retries=0)
    assert await modbus.connect()
    try:
        yield modbus
    finally:
        modbus.close()


async def test_reads_every_point_through_planner(sim, client):
    """Each profile's points read back through plan_reads + decode with plausible values."""
    gas = await read_profile(client, GAS, 1)
    assert set(gas) == {p.key for p in GAS.points}
    assert 0 <= gas["gas_lel"] <= 12
    assert 15 <= gas["sensor_temp"] <= 35
    assert (gas["sensor_status"], gas["fault"], gas["relay_test"]) == (0, False, False)
    assert gas["sample_interval_s"] == 1 and gas["counter"] in (0, 1)
    pins = {"level": 7.25, "temperature": -3.5, "pressure": 0.345, "level_high_high": True}
    for key, value in pins.items():
        sim.set_value(key, value, device_id=2)
    tank = await read_profile(client, TANK, 2)
    assert tank["level"] == 7.25  # f32 with the low word first, exact in binary
    assert tank["temperature"] == pytest.approx(-3.5)
    assert tank["pressure"] == pytest.approx(0.345)
    assert tank["level_high_high"] is True and tank["inlet_valve_open"] is True


async def test_counter_counts_whole_seconds(sim, client):
    """The counter steps by exactly one about once a second, never skipping or repeating."""
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + 2.3
    while time.monotonic() < deadline:
        response = await client.read_input_registers(10, count=2, device_id=1)
        value = (response.registers[0] << 16) | response.registers[1]
        if not seen or seen[-1][1] != value:
            seen.append((time.monotonic(), value))
        await asyncio.sleep(0.02)
    values = [v for _, v in seen]
    assert values == list(range(values[0], values[0] + len(values)))
    assert len(values) >= 3
    gaps = [b[0] - a[0] for a, b in zip(seen[1:], seen[2:], strict=False)]
    assert all(0.8 <= g <= 1.2 for g in gaps), gaps


async def test_set_value_and_clear(sim, client):
    """A pinned value shows on the next read; clearing it lets the wave move again."""
    sim.set_value("gas_lel", 60.0)
    sim.set_value("fault", True)
    values = await read_profile(client, GAS, 1)
    assert values["gas_lel"] == 60.0 and values["fault"] is True and values["sensor_status"] == 0
    sim.clear_override("gas_lel")
    sim.clear_override("fault")
    values = await read_profile(client, GAS, 1)
    assert 0 <= values["gas_lel"] <= 12 and values["fault"] is False
    with pytest.raises(UnknownPointError):
        sim.set_value("nope", 1)
    with pytest.raises(BadValueError):
        sim.set_value("sample_interval_s", -1)


async def test_writes_read_back_and_read_only_refused(sim, client):
    """Writable holding registers and coils keep what is written; other writes get exception 2."""
    assert not (await client.write_register(100, 30, device_id=1)).isError()
    assert not (await client.write_coil(0, True, device_id=1)).isError()
    assert not (await client.write_coil(0, False, device_id=2)).isError()
    await asyncio.sleep(0.25)  # several ticks: the sim must not overwrite written values
    gas = await read_profile(client, GAS, 1)
    assert gas["sample_interval_s"] == 30 and gas["relay_test"] is True
    assert (await read_profile(client, TANK, 2))["inlet_valve_open"] is False
    refused = await client.write_register(101, 1, device_id=1)
    assert refused.isError() and refused.exception_code == 2
    refused = await client.write_register(0, 1, device_id=2)  # tank has no holding registers
    assert refused.isError() and refused.exception_code == 2


async def test_control_channel_in_process():
    """The JSON-lines control port sets, reads and clears values and rejects bad lines."""
    async with ModbusTcpSimulator(GAS, control_port=0) as simulator:
        reader, writer = await asyncio.open_connection("127.0.0.1", simulator.control_port)

        async def ask(line: str) -> dict:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return json.loads(await reader.readline())

        line = '{"set": {"device_id": 1, "point": "gas_lel", "value": 60}}'
        assert await ask(line) == {"ok": True}
        assert await ask('{"get": {"point": "gas_lel"}}') == {"ok": True, "value": 60.0}
        assert simulator.get_value("gas_lel") == 60.0
        assert await ask('{"clear": {"device_id": 1, "point": "gas_lel"}}') == {"ok": True}
        assert 0 <= simulator.get_value("gas_lel") <= 12
        assert (await ask('{"set": {"point": "nope", "value": 1}}'))["ok"] is False
        assert (await ask("not json"))["ok"] is False
        writer.close()
        await writer.wait_closed()


def test_process_entry_point(tmp_path: Path):
    """The subprocess serves two profiles, reports its ports, obeys control and exits on SIGTERM."""
    ready = tmp_path / "sim.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_stubs.modbus_sim", "--profile", "gas-detector-v1",
         "--profile", "storage-tank-v1", "--port", "0", "--control-port", "0",
         "--ready-file", str(ready), "--control-ready-file", str(tmp_path / "control.ready")],
        env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(ready.exists, timeout=10, what="simulator ready file")
        port = int(ready.read_text())
        control_port = int((tmp_path / "control.ready").read_text())

        async def exercise() -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", control_port)
            writer.write(b'{"set": {"device_id": 2, "point": "level", "value": 9.75}}\n')
            await writer.drain()
            assert json.loads(await reader.readline()) == {"ok": True}
            writer.close()
            await writer.wait_closed()
            modbus = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
            await modbus.connect()
            try:
                return (await read_profile(modbus, TANK, 2))["level"]
            finally:
                modbus.close()

        assert asyncio.run(exercise()) == 9.75
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=5)
        assert proc.returncode == 0
        assert f"READY port={port} control_port={control_port}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_process_unknown_profile_exits_1():
    """An unknown profile id makes the process exit 1 with a message naming it."""
    result = subprocess.run(
        [sys.executable, "-m", "firmware_stubs.modbus_sim", "--profile", "no-such-profile"],
        env=python_env(), capture_output=True, text=True, timeout=10,
    )
    assert result.returncode == 1 and "no-such-profile" in result.stderr
