"""Alarm rule configuration: the per-device `[devices.alarms]` table of the gateway config
and how it combines with a profile's `alarm` specs into `rules.Rule`s.

```toml
[[devices]]
id = "gas-1"
profile = "gas-detector-v1"
transport = {kind = "tcp", host = "10.0.0.7"}

[devices.alarms]
offline_delay_s = 10        # raise device_offline after 10 s without an answer
stale_after_s = 30          # for every point with a threshold rule

[devices.alarms.points.gas_lel]
high1 = 20                  # replaces the profile's 25 on this site
on_delay_s = 2
off_delay_s = 5
rate_per_min = 10           # |change| per minute over rate_window_s
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec
from msgspec import Meta

from device_profiles import Profile
from edge_agent.alarms.rules import Rule, RulesError
from edge_agent.config.table import ConfigTable
from protocols.alarm_attrs import RuleKind
from protocols.envelope import DEVICE_POINT

DEFAULT_OFFLINE_DELAY_S = 10.0  # one lost answer on a noisy RS-485 line is not an outage

Delay = Annotated[float, Meta(ge=0, le=86_400)]
Stale = Annotated[float, Meta(gt=0, le=86_400 * 7)]


# --- gateway config (the boundary: a `[devices.alarms]` table of each device) --------------


class PointAlarmConfig(ConfigTable, frozen=True):
    """Per-point overrides; a threshold set here replaces the profile's."""

    enabled: bool = True  # false: no alarm rule at all on this point
    high1: float | None = None
    high2: float | None = None
    low1: float | None = None
    low2: float | None = None
    hysteresis: Annotated[float, Meta(ge=0)] | None = None
    on_delay_s: Delay = 0.0
    off_delay_s: Delay = 0.0
    rate_per_min: Annotated[float, Meta(gt=0)] | None = None  # |change|/min that raises level 1
    rate_window_s: Annotated[float, Meta(gt=0, le=86_400)] = 60.0
    stale_after_s: Stale | None = None


class DeviceAlarmsConfig(ConfigTable, frozen=True):
    """`[devices.alarms]`: device-level alarm settings and `[devices.alarms.points.<key>]`."""

    offline: bool = True
    offline_delay_s: Delay = DEFAULT_OFFLINE_DELAY_S
    # Default stale limit for every point that has a threshold rule (a point's own wins).
    stale_after_s: Stale | None = None
    points: dict[str, PointAlarmConfig] = msgspec.field(default_factory=dict)


# --- building rules from a profile and the gateway config ----------------------------------

_THRESHOLD_FIELDS = ("high1", "high2", "low1", "low2", "hysteresis")


def build_device_rules(device: str, profile: Profile,
                       config: DeviceAlarmsConfig | None = None) -> list[Rule]:
    """The rules of one device: its profile's alarm specs with the config's overrides applied.
    Raises `RulesError` for an override of an unknown point or disordered thresholds."""
    config = config or DeviceAlarmsConfig()
    keys = {p.key for p in profile.points}
    for key in config.points:
        if key not in keys:
            raise RulesError(device, key, "", f"no point {key!r} in profile {profile.id}")
    rules: list[Rule] = []
    for point in profile.points:
        ov = config.points.get(point.key)
        if ov is not None and not ov.enabled:
            continue
        merged: dict[str, float | None] = {f: None for f in _THRESHOLD_FIELDS}
        if point.alarm is not None:
            merged.update({f: getattr(point.alarm, f) for f in _THRESHOLD_FIELDS})
        if ov is not None:  # a threshold the file sets (TOML has no null: set is not None)
            merged.update({f: v for f in _THRESHOLD_FIELDS if (v := getattr(ov, f)) is not None})
        _check_order(device, point.key, merged)
        pkey = f"{device}/{point.key}"
        on_ms = int((ov.on_delay_s if ov else 0) * 1000)
        off_ms = int((ov.off_delay_s if ov else 0) * 1000)
        hyst = merged["hysteresis"] or 0.0
        for kind, t1, t2 in ((RuleKind.HIGH, merged["high1"], merged["high2"]),
                             (RuleKind.LOW, merged["low1"], merged["low2"])):
            if t1 is not None or t2 is not None:
                rules.append(Rule(device, pkey, kind, (t1, t2), hyst, on_ms, off_ms))
        has_threshold = any(r.point == pkey for r in rules)
        if ov is not None and ov.rate_per_min is not None:
            rules.append(Rule(device, pkey, RuleKind.RATE, (ov.rate_per_min, None), 0.0,
                              on_ms, off_ms, int(ov.rate_window_s * 1000)))
        stale = ov.stale_after_s if ov is not None and ov.stale_after_s is not None else (
            config.stale_after_s if has_threshold else None)
        if stale is not None:
            rules.append(Rule(device, pkey, RuleKind.STALE, (stale, None)))
    if config.offline:
        rules.append(Rule(device, f"{device}/{DEVICE_POINT}", RuleKind.OFFLINE,
                          on_delay_ms=int(config.offline_delay_s * 1000)))
    return rules


def _check_order(device: str, key: str, t: Mapping[str, float | None]) -> None:
    def bad(a: str, b: str, msg: str) -> None:
        raise RulesError(device, key, b, f"{msg} ({b}={t[b]}, {a}={t[a]})")

    h1, h2, l1, l2 = t["high1"], t["high2"], t["low1"], t["low2"]
    if h1 is not None and h2 is not None and h2 < h1:
        bad("high1", "high2", "high2 must not be below high1")
    if l1 is not None and l2 is not None and l2 > l1:
        bad("low1", "low2", "low2 must not be above low1")
    lows = [x for x in (l1, l2) if x is not None]
    highs = [x for x in (h1, h2) if x is not None]
    if lows and highs and max(lows) >= min(highs):
        bad("high1" if h1 is not None else "high2", "low1" if l1 is not None else "low2",
            "low thresholds must be below high thresholds")
