"""Device profiles: built-in files, validation errors with file/line/field, hash stability."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from device_profiles import (
    CounterSim,
    DuplicateProfileError,
    ProfileError,
    ProfileNotFoundError,
    builtin_profiles_dir,
    find_profile,
    load_profile,
    load_profiles,
    parse_profile,
)
from protocols.modbus_points import DataType, Order
from protocols.read_plan import plan_reads

GAS = builtin_profiles_dir() / "gas_detector_v1.yaml"


def test_builtin_profiles_load():
    """The built-in Modbus profiles load, name every point in Chinese and have a u32 counter."""
    profiles = load_profiles([builtin_profiles_dir()])
    assert {"gas-detector-v1", "storage-tank-v1"} <= set(profiles)
    for profile in profiles.values():
        if profile.protocol != "modbus":
            continue  # HJ 212 profiles: tests/test_profiles_catalog.py
        assert all(p.name_zh for p in profile.points)
        counter = profile.point("counter")
        assert counter.spec.dtype is DataType.U32 and isinstance(counter.sim, CounterSim)
        assert plan_reads(profile.specs)  # the planner accepts every built-in profile
    gas = profiles["gas-detector-v1"].point("gas_lel")
    assert gas.alarm is not None and (gas.alarm.high1, gas.alarm.high2) == (25, 50)
    level = profiles["storage-tank-v1"].point("level")
    assert level.spec.word_order is Order.LITTLE and level.unit == "m"


def test_find_profile_builtin_and_extra(tmp_path: Path):
    """find_profile looks in extra folders first, then the built-in one; unknown ids fail."""
    assert find_profile("storage-tank-v1").id == "storage-tank-v1"
    text = GAS.read_text(encoding="utf-8").replace("id: gas-detector-v1", "id: gas-site-x")
    (tmp_path / "site.yaml").write_text(text, encoding="utf-8")
    assert find_profile("gas-site-x", extra_dirs=[tmp_path]).id == "gas-site-x"
    assert find_profile(str(tmp_path / "site.yaml")).id == "gas-site-x"
    with pytest.raises(ProfileNotFoundError):
        find_profile("nope")


def test_duplicate_ids_across_files(tmp_path: Path):
    """Two files with the same id are an error naming the second file."""
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(GAS.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(DuplicateProfileError, match=r"b\.yaml"):
        load_profiles([tmp_path])


def test_hash_ignores_layout_and_key_order():
    """The hash is stable across key order, whitespace and spelled-out defaults."""
    original = load_profile(GAS)
    data = yaml.safe_load(GAS.read_text(encoding="utf-8"))
    data["points"] = [dict(reversed(list(p.items()))) for p in data["points"]]
    data["points"][0]["offset"] = 0.0
    data["protocol"] = "modbus"
    reordered = yaml.safe_dump(dict(reversed(list(data.items()))), allow_unicode=True, indent=4)
    assert parse_profile(reordered).hash == original.hash
    data["points"][0]["alarm"]["high1"] = 20
    assert parse_profile(yaml.safe_dump(data, allow_unicode=True)).hash != original.hash


def broken(old: str, new: str) -> str:
    text = GAS.read_text(encoding="utf-8")
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("type: bitfield", "type: f33",
         "gas.yaml:26 points[1].type: 'f33' is not one of u16, i16, u32, i32, u64, i64, f32"),
        ("unit: \"%LEL\"", "colour: red", "gas.yaml:14 points[0].colour: unknown field"),
        ("period_s: 120", "period_s: 0", "gas.yaml:19 points[0].sim.period_s: Input should be"),
        ("kind: counter", "kind: count", "gas.yaml:55 points[4].sim: 'count' is not one of"),
        ("address: 3", "address: 2",
         "gas.yaml:43 points[3].address: function 4 address 2 overlaps point 'sensor_status'"),
        ("bit: 8", "bit: 2", "points[2].bit: bits of function 4 address 2 overlap"),
        ("key: sensor_temp", "key: gas_lel", "points[3].key: duplicate key 'gas_lel'"),
        ("    poll: fast\n", "    poll: fast\n    writable: true\n",
         "points[0].writable: only coils (1) and holding registers (3)"),
        ("{kind: constant, value: 0}", "{kind: wave, min: 0, max: 3, period_s: 5}",
         "points[1].sim: bitfield points take only sim kind constant"),
        ("type: u32", "type: f32", "points[4].sim: sim kind counter needs an integer type"),
        ("hysteresis: 2", "hysteresis: -1", "points[0].alarm.hysteresis"),
        ("address: 100", "address: 100\n    bit: 3", "points[5]: bit applies only to bool"),
        ("name_zh: 可燃气体探测器", "name_zh: [oops", "gas.yaml:6 not valid YAML"),
    ],
)
def test_errors_name_file_line_and_field(old: str, new: str, expected: str):
    """Each invalid profile raises ProfileError naming the file, the line and the field."""
    with pytest.raises(ProfileError) as info:
        parse_profile(broken(old, new), source="gas.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("gas.yaml:")


def test_unreadable_file(tmp_path: Path):
    """A missing file is a ProfileError with its path."""
    with pytest.raises(ProfileError, match="missing.yaml"):
        load_profile(tmp_path / "missing.yaml")
