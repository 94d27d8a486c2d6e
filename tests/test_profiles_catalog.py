"""The ten built-in profiles: they validate, the Modbus ones serve and decode, thresholds follow
DOMAIN.md, and the HJ 212 profile schema (`factor` instead of registers) is checked."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from device_profiles import (
    ConstantSim,
    CounterSim,
    DeviceProfileError,
    Profile,
    ProfileError,
    ProtocolMismatchError,
    RandomWalkSim,
    WaveSim,
    builtin_profiles_dir,
    load_profiles,
    parse_profile,
)
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from protocols.modbus_points import DataType, PointDecodeError
from protocols.read_plan import plan_reads
from tests.helpers import python_env

PROFILES = load_profiles([builtin_profiles_dir()])
MODBUS = {pid: p for pid, p in sorted(PROFILES.items()) if p.protocol == "modbus"}
EXPECTED = {
    "gas-detector-v1", "toxic-gas-detector-v1", "oxygen-detector-v1", "storage-tank-v1",
    "dry-dust-collector-v1", "wet-dust-collector-v1", "al-casting-cooling-v1",
    "confined-space-gas-v1", "gateway-power-v1", "forest-fire-station-v1",
}
ROOT = Path(__file__).resolve().parent.parent
STATION_YAML = builtin_profiles_dir() / "forest_fire_station_v1.yaml"
GAS_YAML = builtin_profiles_dir() / "gas_detector_v1.yaml"


def oel_ppm(mg_m3: float, molar_mass: float) -> float:
    """An OEL in mg/m³ as ppm at 20 °C and 101.325 kPa (molar volume 24.055 L)."""
    return mg_m3 * 24.055 / molar_mass


def test_all_ten_profiles_validate_with_chinese_names_and_counters():
    """All ten profiles load; every profile and point has a Chinese name and each has a counter."""
    assert set(PROFILES) == EXPECTED
    for profile in PROFILES.values():
        assert profile.name_zh and all(p.name_zh for p in profile.points), profile.id
        counter = profile.point("counter")
        assert isinstance(counter.sim, CounterSim), profile.id
        if profile.protocol == "modbus":
            assert counter.spec.dtype is DataType.U32, profile.id
            assert plan_reads(profile.specs), profile.id
            assert {p.poll for p in profile.points} >= {"fast"}, profile.id
        else:
            assert counter.factor == "x00001"
    assert PROFILES["forest-fire-station-v1"].protocol == "hj212"


def test_cli_validates_the_folder_with_ten_oks():
    """`python -m edge_agent profiles validate device_profiles/profiles` exits 0 with ten OKs."""
    env = python_env() | {"COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "profiles", "validate", "device_profiles/profiles"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ok_lines = [line for line in result.stdout.splitlines() if line.startswith("OK")]
    assert len(ok_lines) == 10
    assert {line.split()[1] for line in ok_lines} == EXPECTED


@pytest.fixture
async def served() -> AsyncIterator[tuple[ModbusTcpSimulator, dict[int, Profile]]]:
    devices = {i + 1: profile for i, profile in enumerate(MODBUS.values())}
    async with ModbusTcpSimulator(devices, seed=11) as sim:
        yield sim, devices


def _in_range(profile: Profile, key: str, value: object) -> bool:
    point = profile.point(key)
    spec, sim = point.spec, point.sim
    if isinstance(sim, CounterSim):
        return isinstance(value, int) and 0 <= value < 60
    if isinstance(sim, ConstantSim):
        if spec.dtype is DataType.BOOL:
            return value is bool(sim.value)
        assert isinstance(value, int | float) and isinstance(sim.value, int | float)
        return abs(value - sim.value) <= abs(spec.scale) / 2 + 1e-9
    assert isinstance(sim, WaveSim | RandomWalkSim)
    integer = spec.dtype not in (DataType.F32, DataType.F64)
    tolerance = abs(spec.scale) / 2 + 1e-6 if integer else 1e-3
    return isinstance(value, int | float) and sim.min - tolerance <= value <= sim.max + tolerance


async def test_every_modbus_profile_is_served_and_every_point_decodes(served):
    """The Modbus simulator serves each Modbus profile; every point reads, decodes, fits its sim."""
    sim, devices = served
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=2, retries=0)
    assert await client.connect()
    readers = {1: client.read_coils, 2: client.read_discrete_inputs,
               3: client.read_holding_registers, 4: client.read_input_registers}
    try:
        for device_id, profile in devices.items():
            values: dict[str, object] = {}
            for block in plan_reads(profile.specs):
                response = await readers[block.function](block.start, count=block.count,
                                                         device_id=device_id)
                assert not response.isError(), (profile.id, block, response)
                words = ([int(b) for b in response.bits[: block.count]]
                         if block.function in (1, 2) else response.registers)
                values.update(block.decode(words))
            assert set(values) == {p.key for p in profile.points}, profile.id
            for key, value in values.items():
                assert not isinstance(value, PointDecodeError), (profile.id, key, value)
                assert _in_range(profile, key, value), (profile.id, key, value)
    finally:
        client.close()


def _alarm(profile_id: str, key: str):
    alarm = PROFILES[profile_id].point(key).alarm
    assert alarm is not None, (profile_id, key)
    return alarm


def test_thresholds_follow_domain_facts():
    """Gas, toxic gas and oxygen thresholds follow GB/T 50493-2019 §5.5.2 as DOMAIN.md gives it."""
    gas = _alarm("gas-detector-v1", "gas_lel")
    assert (gas.high1, gas.high2) == (25, 50)
    for profile_id in ("oxygen-detector-v1", "confined-space-gas-v1"):
        o2 = _alarm(profile_id, "o2")
        assert (o2.low1, o2.high1) == (19.5, 23.5)
    h2s_oel = oel_ppm(10, 34.08)  # GBZ 2.1-2019 MAC 10 mg/m³
    co_oel = oel_ppm(20, 28.01)  # GBZ 2.1-2019 PC-TWA 20 mg/m³
    for profile_id in ("toxic-gas-detector-v1", "confined-space-gas-v1"):
        for key, oel in (("h2s", h2s_oel), ("co", co_oel)):
            alarm = _alarm(profile_id, key)
            assert alarm.high1 is not None and alarm.high2 is not None
            assert 0.9 * oel <= alarm.high1 <= oel  # level 1 at (just under) 100 % OEL
            assert alarm.high2 == 2 * alarm.high1 <= 2 * oel  # level 2 at 200 % OEL
    lel = _alarm("confined-space-gas-v1", "combustible_lel")
    assert lel.high1 is not None and lel.high2 is not None
    assert lel.high1 <= 25 and lel.high2 <= 50
    assert _alarm("forest-fire-station-v1", "air_temp").high1 is not None
    assert _alarm("forest-fire-station-v1", "humidity").low1 is not None
    assert _alarm("forest-fire-station-v1", "wind_speed").high1 is not None
    assert _alarm("dry-dust-collector-v1", "hopper_temp").high1 is not None
    assert _alarm("dry-dust-collector-v1", "diff_pressure").high1 is not None
    assert _alarm("wet-dust-collector-v1", "water_flow").low1 is not None
    assert _alarm("al-casting-cooling-v1", "cooling_flow").low1 is not None
    assert _alarm("gateway-power-v1", "battery_voltage").low1 is not None


def test_hj212_points_have_factors_and_no_registers():
    """An HJ 212 point is found by its factor; asking it for a Modbus spec is a clear error."""
    station = PROFILES["forest-fire-station-v1"]
    assert station.specs == ()
    assert station.by_factor("a01001").key == "air_temp"
    assert [station.by_factor(c).key for c in ("a01002", "a01006", "a01007", "a01008")] == [
        "humidity", "pressure", "wind_speed", "wind_dir"]
    assert all(p.modbus is None and p.factor for p in station.points)
    with pytest.raises(ProtocolMismatchError, match="air_temp"):
        _ = station.point("air_temp").spec
    with pytest.raises(DeviceProfileError):
        ModbusTcpSimulator(station)  # a register server cannot serve a push station
    gas = PROFILES["gas-detector-v1"]
    assert all(p.factor is None and p.modbus is not None for p in gas.points)


def _broken(path: Path, old: str, new: str) -> str:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        (STATION_YAML, "    factor: a01001\n", "    factor: a01001\n    function: 4\n",
         "points[0].function: applies only to protocol modbus"),
        (STATION_YAML, "    factor: a01001\n", "", "points[0].factor: required field is missing"),
        (STATION_YAML, "factor: a01002", "factor: a01001",
         "points[1].factor: duplicate factor 'a01001' (also points[0])"),
        (STATION_YAML, "    factor: a01001\n", "    factor: a01001\n    writable: true\n",
         "points[0].writable: hj212 points are read-only"),
        (STATION_YAML, "{kind: random_walk, min: 0, max: 359, step: 3, start: 200}",
         '{kind: constant, value: "N"}', "points[4].sim: an hj212 point needs a numeric constant"),
        (STATION_YAML, "factor: a01001", "factor: a01-001",
         "points[0].factor: String should match"),
        (STATION_YAML, "protocol: hj212\n", "protocol: hj212\nreads: {max_registers: 10}\n",
         "reads: applies only to protocol modbus"),
        (STATION_YAML, "protocol: hj212", "protocol: hj213", "protocol: 'hj213' is not one of"),
        (GAS_YAML, "    unit: \"%LEL\"\n", "    unit: \"%LEL\"\n    factor: a01001\n",
         "gas.yaml:15 points[0].factor: applies only to protocol hj212"),
        (GAS_YAML, "    address: 0\n    type: f32\n", "    type: f32\n",
         "gas.yaml:11 points[0].address: required field is missing"),
    ],
)
def test_hj212_schema_errors_name_file_line_and_field(path: Path, old: str, new: str,
                                                      expected: str):
    """Each misuse of the HJ 212 / Modbus point fields is a ProfileError naming file and field."""
    source = "gas.yaml" if path == GAS_YAML else "ffs.yaml"
    with pytest.raises(ProfileError) as info:
        parse_profile(_broken(path, old, new), source=source)
    assert expected in str(info.value)
    assert str(info.value).startswith(f"{source}:")
    assert os.path.basename(source) in str(info.value)
