"""The attrs of an ALARM record: one alarm transition, from the edge to central (DESIGN.md §7).

The edge's rule engine writes them (`edge_agent.alarms.rules.AlarmEvent.to_record`), its
narrowband fallback reads them to build frame entries (`edge_agent.narrowband.fallback`);
central's alarm engine reads them (`central.alarms.engine.event_from_record`) and its
narrowband receiver writes the short copy a frame carries (`central.narrowband.receiver`).

Version 1, the map every agent so far sends (no `v`, see `protocols.record_attrs`):

    {"alarm_id": "gas-1/gas_lel/high", "rule": "high", "state": "raised", "level": 2,
     "prev_level": 0, "threshold": 50.0, "since_ms": 1700000000000,
     "hysteresis"?: 2.0, "rate_per_min"?: 1.5, "age_s"?: 61.0, "error"?: "timeout",
     "reason"?: "rule_removed"}

- `alarm_id` is `"<device>/<point>/<rule>"`; `rule` one of `RuleKind` (an older record
  without it names its rule by the last part of `alarm_id`).
- `state` raised | changed | cleared; `level` 1 or 2 while active (central takes up to
  `MAX_LEVEL`), 0 on a clear.
- A full edge record (`prev_level` known) always has `prev_level`, `threshold` and `since_ms`,
  null when unknown; the short copy of a narrowband frame (`bearer: "beidou" | "pdt"`, written
  by central only) has none of them.
- Optional: `hysteresis` (the rule's, when not 0), `rate_per_min` (rate rules), `age_s`
  (stale rules: seconds since the last good sample), `error` (why a device is offline),
  `reason` (`RULE_REMOVED`: a clear for a rule gone from the config).
- Keys this version does not name are kept in `extra`: a newer agent may add some.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from protocols.limits import INT64_MAX
from protocols.record_attrs import AttrsError, FieldReader

CONTRACT: Final = "alarm"
VERSION: Final = 1
MAX_LEVEL: Final = 9
RULE_REMOVED: Final = "rule_removed"


class RuleKind(enum.StrEnum):
    """The edge's alarm rules (`edge_agent.alarms.rules`)."""

    HIGH = "high"
    LOW = "low"
    RATE = "rate"
    STALE = "stale"
    OFFLINE = "device_offline"


class AlarmState(enum.StrEnum):
    """What an alarm record says happened."""

    RAISED = "raised"
    CHANGED = "changed"
    CLEARED = "cleared"


_FULL_KEYS: Final = ("prev_level", "threshold", "since_ms")
_KNOWN: Final = frozenset({"alarm_id", "rule", "state", "level", *_FULL_KEYS, "hysteresis",
                           "rate_per_min", "age_s", "error", "reason", "bearer"})


@dataclass(frozen=True, slots=True)
class AlarmAttrs:
    """One alarm transition as an ALARM record's attrs carry it; see the module doc."""

    alarm_id: str
    rule: str
    state: AlarmState
    level: int
    prev_level: int | None = None  # None: a narrowband copy (then threshold and since_ms too)
    threshold: float | None = None
    since_ms: int | None = None
    hysteresis: float | None = None
    rate_per_min: float | None = None
    age_s: float | None = None
    error: str | None = None
    reason: str | None = None
    bearer: str | None = None  # "beidou" / "pdt": central's copy of a narrowband frame entry
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        """The attrs map (version 1, without `v`); raises `AttrsError` for an `extra` key
        that the contract names."""
        clash = _KNOWN.intersection(self.extra)
        if clash:
            raise AttrsError(CONTRACT, "extra", f"reserved keys {sorted(clash)}")
        out: dict[str, Any] = {"alarm_id": self.alarm_id, "rule": str(self.rule),
                               "state": str(self.state), "level": self.level}
        if self.prev_level is not None:
            out.update(prev_level=self.prev_level, threshold=self.threshold,
                       since_ms=self.since_ms)
        for key, value in (("rate_per_min", self.rate_per_min), ("age_s", self.age_s),
                           ("error", self.error), ("reason", self.reason)):
            if value is not None:
                out[key] = value
        out.update(self.extra)
        if self.hysteresis:
            out["hysteresis"] = self.hysteresis
        if self.bearer is not None:
            out["bearer"] = self.bearer
        return out

    @classmethod
    def from_attrs(cls, attrs: object) -> AlarmAttrs:
        """The transition in an ALARM record's attrs; raises `AttrsError` (a subclass) when
        they do not fit version 1."""
        f = FieldReader(CONTRACT, attrs, VERSION)
        alarm_id = f.req_str("alarm_id")
        state = f.opt_choice("state", AlarmState)
        if state is None:
            raise f.error("state", "missing")
        level = f.req_int("level", 0, MAX_LEVEL) if "level" in f.attrs else 0
        if state is not AlarmState.CLEARED and level < 1:
            raise f.error("level", f"{state} with level {level}")
        rule = f.opt_str("rule") or alarm_id.rsplit("/", 1)[-1]
        return cls(alarm_id=alarm_id, rule=rule, state=state, level=level,
                   prev_level=f.opt_int("prev_level", 0, MAX_LEVEL),
                   threshold=f.opt_number("threshold"),
                   since_ms=f.opt_int("since_ms", 0, INT64_MAX),
                   hysteresis=f.opt_number("hysteresis"),
                   rate_per_min=f.opt_number("rate_per_min"), age_s=f.opt_number("age_s"),
                   error=f.opt_str("error"),
                   reason=f.opt_str("reason"), bearer=f.opt_str("bearer"),
                   extra=f.rest(_KNOWN))


__all__ = ["CONTRACT", "MAX_LEVEL", "RULE_REMOVED", "VERSION", "AlarmAttrs", "AlarmState",
           "RuleKind"]
