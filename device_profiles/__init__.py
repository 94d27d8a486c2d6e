"""Declarative device profiles (YAML, one per device model) and their loader/validator."""

from device_profiles.errors import (
    DeviceProfileError,
    DuplicateProfileError,
    ProfileError,
    ProfileNotFoundError,
    ProtocolMismatchError,
)
from device_profiles.loader import (
    AlarmSpec,
    Profile,
    ProfilePoint,
    builtin_profiles_dir,
    find_profile,
    load_profile,
    load_profiles,
    parse_profile,
)
from device_profiles.models import ConstantSim, CounterSim, RandomWalkSim, ReadLimits, WaveSim

__all__ = [
    "AlarmSpec",
    "ConstantSim",
    "CounterSim",
    "DeviceProfileError",
    "DuplicateProfileError",
    "Profile",
    "ProfileError",
    "ProfileNotFoundError",
    "ProfilePoint",
    "ProtocolMismatchError",
    "RandomWalkSim",
    "ReadLimits",
    "WaveSim",
    "builtin_profiles_dir",
    "find_profile",
    "load_profile",
    "load_profiles",
    "parse_profile",
]
