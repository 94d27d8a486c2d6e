"""Central's check of a point write against the device profile, before it signs (DESIGN.md §8).

The edge checks again when the command arrives, but a write that cannot be right should never
carry central's signature: `WritePolicy.check` refuses a point the profile does not have, one
it does not mark writable, a value the point's type cannot hold (the same encoder the edge
writes with), and a value outside the profile's `write_min` / `write_max`. It returns the
profile's point, whose `safety_critical` flag decides whether the command waits for a second
operator.

`check_site_config` is the same gate for an `apply_config` site file.

Profiles are loaded once, by id, from the built-in folder and `profile_dirs` (never from a
path a gateway names).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from central import CentralError
from device_profiles.loader import Profile, ProfilePoint, builtin_profiles_dir, load_profiles
from protocols.commands import WritePoint
from protocols.errors import DetailedError
from protocols.modbus_points import ModbusPointError, encode_point
from protocols.remote_config import ApplyConfig


class WriteRefusedError(CentralError, DetailedError):
    """A write central will not sign; `field` names the argument, `reason` why (a 422)."""

    template = "{field}: {reason}"
    field: str
    reason: str


class WritePolicy:
    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        self.profiles = dict(profiles)

    @classmethod
    def from_dirs(cls, extra_dirs: Iterable[str | Path] = ()) -> WritePolicy:
        dirs = [builtin_profiles_dir(), *(Path(d) for d in extra_dirs)]
        return cls(load_profiles(dirs))

    def check(self, profile_id: str, wp: WritePoint) -> ProfilePoint:
        """The profile's point if `wp` may be signed; raises `WriteRefusedError` otherwise."""
        profile = self.profiles.get(profile_id)
        if profile is None:
            raise WriteRefusedError("args.device", f"profile {profile_id!r} of {wp.device} is "
                                                   "unknown to central, so the write cannot be "
                                                   "checked")
        try:
            point = profile.point(wp.point)
        except KeyError:
            raise WriteRefusedError("args.point", f"profile {profile_id} has no point "
                                                  f"{wp.point!r}") from None
        if not point.writable or point.modbus is None:
            raise WriteRefusedError("args.point", f"{wp.device}/{wp.point} is not writable")
        value = wp.value
        self._check_range(point, value)
        try:
            encode_point(point.modbus, value)
        except ModbusPointError as exc:
            raise WriteRefusedError("args.value", f"{value!r} does not fit {wp.point}: "
                                                  f"{exc}") from None
        return point

    @staticmethod
    def _check_range(point: ProfilePoint, value: object) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if not math.isfinite(value):
            raise WriteRefusedError("args.value", "not a finite number")
        low, high = point.write_min, point.write_max
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "-∞" if low is None else f"{low:g}"
            hi = "∞" if high is None else f"{high:g}"
            raise WriteRefusedError("args.value", f"{value:g} is outside {lo}..{hi} "
                                                  f"{point.unit}".rstrip() + f" for {point.key}")


class ConfigRefusedError(CentralError):
    """A site config central will not sign (`apply_config`); a 422."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def check_site_config(gw: str, cfg: ApplyConfig) -> None:
    """What central checks of a site config before it signs: TOML syntax, and that its
    `[gateway] id` is `gw`. The gateway checks the rest, exactly as at its start-up."""
    try:
        raw = tomllib.loads(cfg.site_toml)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigRefusedError("args.site_toml", f"TOML syntax: {exc}") from None
    gateway = raw.get("gateway")
    got = gateway.get("id") if isinstance(gateway, dict) else None
    if got != gw:
        raise ConfigRefusedError("args.site_toml", f"[gateway] id is {got!r}, not {gw!r}")
