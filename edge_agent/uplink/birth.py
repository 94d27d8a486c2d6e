"""The birth inventory: which devices this gateway polls, with profile ids, hashes and the
ordinal of every point (DESIGN.md §4, §5).

Ordinals number the points of all devices in config order, then profile order, from 0. They
name points in narrowband frames, where a key string is too long, so they must be stable:
adding a device at the end of the config never renumbers the points before it. Central keys
the ordinals by the birth it last received, and the profile hashes tell it when they moved.
"""

from __future__ import annotations

from collections.abc import Mapping

from device_profiles import Profile
from edge_agent.config.site import AgentConfig
from protocols.envelope import Birth, DeviceInfo, PointInfo


def build_birth(config: AgentConfig, profiles: Mapping[str, Profile], *, stream: str,
                boot_id: str, version: str) -> Birth:
    """`profiles` maps device id to its profile (see `config.resolve_profiles`). Disabled
    devices keep their ordinals, so enabling one later does not renumber the others."""
    devices: list[DeviceInfo] = []
    ordinal = 0
    for dev in config.devices:
        profile = profiles[dev.id]
        points = []
        for p in profile.points:
            points.append(PointInfo(ordinal=ordinal, key=f"{dev.id}/{p.key}",
                                    name_zh=p.name_zh, unit=p.unit))
            ordinal += 1
        if dev.enabled:
            devices.append(DeviceInfo(id=dev.id, profile=profile.id,
                                      profile_hash=profile.hash, points=tuple(points)))
    return Birth(gw=config.gateway.id, stream=stream, boot_id=boot_id, version=version,
                 devices=tuple(devices))
