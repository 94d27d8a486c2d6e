"""Central's check of a write against the device profile (DESIGN.md §8) and the profile fields
that drive it (`write_min`, `write_max`, `safety_critical`)."""

from __future__ import annotations

import pytest

from central.commands.check import WritePolicy, WriteRefusedError
from device_profiles.loader import ProfileError, find_profile, parse_profile
from protocols.commands import WritePoint

POLICY = WritePolicy.from_dirs()


@pytest.mark.parametrize(("point", "value", "reason"), [
    ("gas_lel", 10, "not writable"),
    ("sample_interval_s", 0, "outside 1..3600"),
    ("sample_interval_s", 3601, "outside 1..3600"),
    ("sample_interval_s", 70_000, "outside 1..3600"),
    ("sample_interval_s", "fast", "does not fit"),
    ("relay_test", 2, "does not fit"),
    ("nope", 1, "no point"),
])
def test_refused_writes_name_the_reason(point: str, value: object, reason: str) -> None:
    """Not writable, out of the profile's range, not the point's type, unknown point: refused."""
    with pytest.raises(WriteRefusedError, match=reason):
        POLICY.check("gas-detector-v1", WritePoint("gas-1", point, value))  # type: ignore[arg-type]


def test_allowed_writes_return_the_point_with_its_safety_flag() -> None:
    """A write in range passes; relay and valve outputs are marked safety-critical."""
    assert not POLICY.check("gas-detector-v1", WritePoint("gas-1", "sample_interval_s", 30)).safety_critical
    assert POLICY.check("gas-detector-v1", WritePoint("gas-1", "relay_test", True)).safety_critical
    assert POLICY.check("storage-tank-v1", WritePoint("t", "inlet_valve_open", False)).safety_critical


def test_unknown_profile_is_refused() -> None:
    """A device whose profile central does not have cannot be checked, so it is not signed."""
    with pytest.raises(WriteRefusedError, match="unknown to central"):
        POLICY.check("custom-v9", WritePoint("d", "p", 1))


BASE = """
id: t-v1
model: T
name_zh: 测试
points:
  - key: out
    name: Out
    name_zh: 输出
    function: 3
    address: 0
    type: u16
"""


def test_write_fields_only_on_writable_points_and_ordered() -> None:
    """safety_critical / write_min on a read-only point, or min above max, is a profile error."""
    with pytest.raises(ProfileError, match="writable points"):
        parse_profile(BASE + "    safety_critical: true\n")
    with pytest.raises(ProfileError, match="write_min"):
        parse_profile(BASE + "    writable: true\n    write_min: 5\n    write_max: 1\n")
    ok = parse_profile(BASE + "    writable: true\n    write_min: 1\n    write_max: 9\n")
    assert (ok.points[0].write_min, ok.points[0].write_max) == (1, 9)


def test_profiles_without_the_new_fields_keep_their_hash() -> None:
    """Adding the write fields to the schema changes no hash of a profile that does not use
    them (gateways report hashes in their births)."""
    # the hash this profile had before write_min/write_max/safety_critical existed
    assert find_profile("dry-dust-collector-v1").hash == (
        "bb831bbaeda0c4cbb4ee34606562dcce01b60dddea8f92fe68683e6710c60c08")
