"""Edge alarm rules (DESIGN.md §7): a pure engine fed samples and clock ticks.

Nothing here does I/O. `RuleEngine.on_samples()` and `RuleEngine.on_tick()` compute an
`Evaluation` (the alarm events and the new per-rule states) without changing the engine;
`commit()` adopts it. The caller (`edge_agent.alarms.wiring`) commits only after the events are in
the outbox, so an outbox that refuses an append leaves the engine as it was and the same
transition is found again on the next sample.

Rules, one alarm id each (`"<device>/<point>/<rule>"`):

- `high` / `low`: level-1 and level-2 thresholds from the profile's `alarm` spec, overridable
  per device in the gateway config (`edge_agent.alarms.config` builds the `Rule`s). A value at
  or past a threshold is at that level; an active level holds while the value stays within
  `hysteresis` of its threshold (a high alarm at level 1 of 25 with hysteresis 2 clears only
  at ≤ 23). Severity rises 1 → 2 without a clear; 2 → 1 is a `changed` event, not a clear.
- `rate`: |Δvalue| per minute over `rate_window_s` (the change from the newest sample at or
  before `now − window` to now); no verdict until the history spans the window.
- `stale`: no good sample for `stale_after_s` (bad-quality samples do not count). While the
  device is offline a stale rule holds its state: the device alarm says it all, and a flood of
  stale alarms for every point would not.
- `device_offline`: on the pseudo point `"<device>/_device"`, from the poller's health.

`on_delay_s` / `off_delay_s`: a higher level is taken only after "level ≥ k" has held for the
on-delay, a lower one (or the clear) after "level < k" has held for the off-delay; the timers
run on the samples' wall-clock timestamps (a timestamp earlier than a timer's start restarts
it, so a clock stepped back does not fire a delay early).

What survives a restart is only an alarm's level, since, value and threshold (saved by the
caller on every transition, never per sample: the gateway's flash should not be written every
second). Delay timers, rate windows and last-seen times start afresh; a restored active alarm
whose value is still past its threshold is not raised again, and one whose value came back
while the agent was down clears on the first new sample (after the off-delay, counted from
that sample).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from edge_agent import EdgeError
from edge_agent.outbox.store import NewRecord
from protocols.alarm_attrs import RULE_REMOVED, AlarmAttrs, AlarmState, RuleKind
from protocols.envelope import RecordKind, Value

_LEVELS = (1, 2)


# --- errors --------------------------------------------------------------------------------


class RulesError(EdgeError):
    """A device's alarm overrides do not fit its profile (unknown point, thresholds disordered)."""

    def __init__(self, device: str, point: str, field: str, message: str) -> None:
        where = f"{device}/{point} {field}" if field else f"{device}/{point}"
        super().__init__(f"{where}: {message}")
        self.device = device
        self.point = point
        self.field = field
        self.message = message


# --- rules, states, events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One alarm on one point. `thresholds` are the level-1 and level-2 limits (None: unused):
    values for high/low, |units per minute| for rate, seconds for stale; unused for offline."""

    device: str
    point: str  # "device/key", or "device/_device" for device-level rules
    kind: RuleKind
    thresholds: tuple[float | None, float | None] = (None, None)
    hysteresis: float = 0.0
    on_delay_ms: int = 0
    off_delay_ms: int = 0
    window_ms: int = 0  # rate only

    @property
    def alarm_id(self) -> str:
        return f"{self.point}/{self.kind}"

    def threshold(self, level: int) -> float | None:
        return self.thresholds[level - 1] if level in _LEVELS else None


@dataclass(frozen=True, slots=True)
class RuleState:
    """What the engine knows about one rule; only the first five fields are persisted."""

    level: int = 0  # 0 = not active
    since_ms: int | None = None  # when it was raised
    changed_ms: int | None = None  # last raise / change / clear
    value: Value = None  # the value of the last transition (stale: last good value)
    threshold: float | None = None
    up: tuple[int | None, int | None] = (None, None)  # since when "level ≥ k" holds, k = 1, 2
    down: tuple[int | None, int | None] = (None, None)  # since when "level < k" holds
    samples: tuple[tuple[int, float], ...] = ()  # rate: (ts_ms, value), oldest first
    seen_ms: int | None = None  # stale: last good sample (or the first tick)


@dataclass(frozen=True, slots=True)
class AlarmSnapshot:
    """The persisted form of one alarm (level 0: cleared)."""

    alarm_id: str
    device: str
    point: str
    rule: str
    level: int
    since_ms: int | None
    changed_ms: int
    value: Value
    threshold: float | None


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    """A raise, a severity change or a clear; becomes one ALARM record in the outbox."""

    rule: Rule
    state: AlarmState
    level: int
    prev_level: int
    ts_ms: int
    value: Value
    threshold: float | None
    since_ms: int | None
    rate_per_min: float | None = None  # rate rules
    age_s: float | None = None  # stale rules: seconds since the last good sample
    error: str | None = None  # device_offline: why the poll failed
    reason: str | None = None  # a clear for a rule removed from the config: RULE_REMOVED

    @property
    def alarm_id(self) -> str:
        return self.rule.alarm_id

    def attrs(self) -> AlarmAttrs:
        """What its ALARM record tells central (`protocols.alarm_attrs`)."""
        return AlarmAttrs(
            alarm_id=self.alarm_id, rule=self.rule.kind, state=self.state, level=self.level,
            prev_level=self.prev_level, threshold=self.threshold, since_ms=self.since_ms,
            hysteresis=self.rule.hysteresis or None, rate_per_min=self.rate_per_min,
            age_s=self.age_s, error=self.error, reason=self.reason)

    def to_record(self) -> NewRecord:
        return NewRecord(kind=RecordKind.ALARM, ts_ms=self.ts_ms, point=self.rule.point,
                         value=self.value, attrs=self.attrs().to_attrs())


@dataclass(frozen=True, slots=True)
class Sample:
    point: str  # "device/key"
    ts_ms: int
    value: Value  # None for a bad-quality sample


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    online: bool | None  # None: not known yet (no poll finished)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Evaluation:
    events: tuple[AlarmEvent, ...] = ()
    states: Mapping[str, RuleState] = field(default_factory=dict)

    def snapshots(self) -> list[AlarmSnapshot]:
        """The persisted form of every alarm this evaluation moved."""
        return [_snapshot(e.rule, self.states[e.alarm_id]) for e in self.events
                if e.alarm_id in self.states]


def _snapshot(rule: Rule, s: RuleState) -> AlarmSnapshot:
    return AlarmSnapshot(alarm_id=rule.alarm_id, device=rule.device, point=rule.point,
                         rule=str(rule.kind), level=s.level, since_ms=s.since_ms,
                         changed_ms=s.changed_ms or 0, value=s.value, threshold=s.threshold)


# --- the pure level machinery --------------------------------------------------------------


def _numeric(value: Value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def high_level(v: float, thresholds: tuple[float | None, float | None], hysteresis: float,
               active: int) -> int:
    """The level of `v` against high thresholds; an active level holds down to t − hysteresis."""
    for k in (2, 1):
        t = thresholds[k - 1]
        if t is not None and (v >= t or (active >= k and v > t - hysteresis)):
            return k
    return 0


def low_level(v: float, thresholds: tuple[float | None, float | None], hysteresis: float,
              active: int) -> int:
    """The level of `v` against low thresholds; an active level holds up to t + hysteresis."""
    for k in (2, 1):
        t = thresholds[k - 1]
        if t is not None and (v <= t or (active >= k and v < t + hysteresis)):
            return k
    return 0


def debounce(state: RuleState, instant: int, now_ms: int, on_delay_ms: int,
             off_delay_ms: int) -> tuple[int, RuleState]:
    """Apply on/off delays: the level to adopt now and the state with updated timers."""

    def since(prev: int | None, holds: bool) -> int | None:
        if not holds:
            return None
        return prev if prev is not None and prev <= now_ms else now_ms

    up = (since(state.up[0], instant >= 1), since(state.up[1], instant >= 2))
    down = (since(state.down[0], instant < 1), since(state.down[1], instant < 2))
    active = new = state.level
    for k in (2, 1):
        held = up[k - 1]
        if k > active and held is not None and now_ms - held >= on_delay_ms:
            new = k
            break
    if new == active:
        for k in range(1, active + 1):  # lowest first: fall as far as the evidence allows
            held = down[k - 1]
            if held is not None and now_ms - held >= off_delay_ms:
                new = k - 1
                break
    return new, replace(state, up=up, down=down)


def rate_per_min(samples: tuple[tuple[int, float], ...], window_ms: int
                 ) -> tuple[tuple[tuple[int, float], ...], float | None]:
    """Trim `samples` to the window (keeping one reference at or before its start) and return
    them with the change per minute from that reference to the newest, or None if too short."""
    ts, v = samples[-1]
    cut = ts - window_ms
    i = 0
    while i + 1 < len(samples) and samples[i + 1][0] <= cut:
        i += 1
    kept = samples[i:]
    ref_ts, ref_v = kept[0]
    if ref_ts > cut or ts <= ref_ts:
        return kept, None
    return kept, (v - ref_v) / (ts - ref_ts) * 60_000


# --- the engine ----------------------------------------------------------------------------


class RuleEngine:
    """All rules of a gateway and their states; see the module docstring."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._rules: dict[str, Rule] = {}
        self._by_point: dict[str, list[Rule]] = {}
        self._stale: list[Rule] = []
        self._offline: dict[str, Rule] = {}
        for rule in rules:
            if rule.alarm_id in self._rules:
                raise ValueError(f"duplicate alarm id {rule.alarm_id}")
            self._rules[rule.alarm_id] = rule
            if rule.kind is RuleKind.OFFLINE:
                self._offline[rule.device] = rule
            else:
                self._by_point.setdefault(rule.point, []).append(rule)
                if rule.kind is RuleKind.STALE:
                    self._stale.append(rule)
        self._states: dict[str, RuleState] = {}
        # Last health seen per device: an observation, not alarm state, so it is not rolled back.
        self._online: dict[str, bool | None] = {}

    @property
    def rules(self) -> Mapping[str, Rule]:
        return self._rules

    def state(self, alarm_id: str) -> RuleState:
        return self._states.get(alarm_id, RuleState())

    def active(self) -> list[AlarmSnapshot]:
        return [_snapshot(self._rules[a], s) for a, s in self._states.items() if s.level > 0]

    def commit(self, evaluation: Evaluation) -> None:
        """Adopt an evaluation's states (call once its events are safely stored)."""
        self._states.update(evaluation.states)

    def restore(self, stored: Iterable[AlarmSnapshot], now_ms: int) -> Evaluation:
        """Load persisted active alarms. An alarm whose rule no longer exists (config or
        profile changed) is cleared with `reason: rule_removed`, so central does not keep it."""
        states: dict[str, RuleState] = {}
        events: list[AlarmEvent] = []
        for snap in stored:
            if snap.level <= 0:
                continue
            rule = self._rules.get(snap.alarm_id)
            if rule is None:
                try:
                    kind = RuleKind(snap.rule)
                except ValueError:
                    continue  # written by a newer agent; not ours to clear
                gone = Rule(device=snap.device, point=snap.point, kind=kind)
                events.append(AlarmEvent(gone, AlarmState.CLEARED, 0, snap.level, now_ms,
                                         snap.value, snap.threshold, snap.since_ms,
                                         reason=RULE_REMOVED))
                continue
            states[snap.alarm_id] = RuleState(level=min(snap.level, 2), since_ms=snap.since_ms,
                                              changed_ms=snap.changed_ms, value=snap.value,
                                              threshold=snap.threshold)
        self._states.update(states)
        return Evaluation(tuple(events), {})

    # --- inputs --------------------------------------------------------------------------

    def on_samples(self, samples: Iterable[Sample]) -> Evaluation:
        """Evaluate the value rules of each sampled point; a sample also proves its device is
        answering, which clears that device's offline alarm."""
        pending: dict[str, RuleState] = {}
        events: list[AlarmEvent] = []
        answered: dict[str, int] = {}
        for sample in samples:
            device = sample.point.split("/", 1)[0]
            answered[device] = max(answered.get(device, sample.ts_ms), sample.ts_ms)
            for rule in self._by_point.get(sample.point, ()):
                state = pending.get(rule.alarm_id) or self.state(rule.alarm_id)
                new, event = self._step_sample(rule, state, sample)
                pending[rule.alarm_id] = new
                if event is not None:
                    events.append(event)
        for device, ts in answered.items():
            offline_rule = self._offline.get(device)
            if offline_rule is not None:
                self._step_offline(offline_rule, online=True, error=None, now_ms=ts,
                                   pending=pending, events=events)
        return Evaluation(tuple(events), pending)

    def on_tick(self, now_ms: int, devices: Mapping[str, DeviceStatus]) -> Evaluation:
        """Evaluate the time-driven rules: stale values and device offline."""
        pending: dict[str, RuleState] = {}
        events: list[AlarmEvent] = []
        for device, status in devices.items():
            self._online[device] = status.online
            rule = self._offline.get(device)
            if rule is not None and status.online is not None:
                self._step_offline(rule, online=status.online, error=status.error,
                                   now_ms=now_ms, pending=pending, events=events)
        for rule in self._stale:
            state = self.state(rule.alarm_id)
            if state.seen_ms is None:  # no sample since start: count from the first tick
                pending[rule.alarm_id] = replace(state, seen_ms=now_ms)
                continue
            if self._online.get(rule.device) is False:
                continue
            age_ms = max(0, now_ms - state.seen_ms)
            instant = high_level(age_ms / 1000, rule.thresholds, 0.0, state.level)
            new, event = self._transition(rule, state, instant, now_ms, state.value,
                                          age_s=round(age_ms / 1000, 3))
            pending[rule.alarm_id] = new
            if event is not None:
                events.append(event)
        return Evaluation(tuple(events), pending)

    # --- one rule, one step --------------------------------------------------------------

    def _step_sample(self, rule: Rule, state: RuleState, sample: Sample
                     ) -> tuple[RuleState, AlarmEvent | None]:
        v = _numeric(sample.value)
        now = sample.ts_ms
        if rule.kind is RuleKind.STALE:
            if v is None and not isinstance(sample.value, (bool, str)):
                return state, None  # a bad-quality sample is not a new value
            state = replace(state, seen_ms=max(now, state.seen_ms or now), value=sample.value)
            return self._transition(rule, state, 0, now, sample.value, age_s=0.0)
        if v is None:
            return state, None
        if rule.kind is RuleKind.HIGH:
            instant = high_level(v, rule.thresholds, rule.hysteresis, state.level)
            return self._transition(rule, state, instant, now, sample.value)
        if rule.kind is RuleKind.LOW:
            instant = low_level(v, rule.thresholds, rule.hysteresis, state.level)
            return self._transition(rule, state, instant, now, sample.value)
        # RATE
        history = state.samples
        if history and history[-1][0] >= now:
            history = ()  # clock stepped back (or a repeat): the window starts again
        kept, rate = rate_per_min(history + ((now, v),), rule.window_ms)
        state = replace(state, samples=kept)
        if rate is None:
            return state, None
        instant = high_level(abs(rate), rule.thresholds, rule.hysteresis, state.level)
        return self._transition(rule, state, instant, now, sample.value,
                                rate_per_min=round(rate, 6))

    def _step_offline(self, rule: Rule, *, online: bool, error: str | None, now_ms: int,
                      pending: dict[str, RuleState], events: list[AlarmEvent]) -> None:
        state = pending.get(rule.alarm_id) or self.state(rule.alarm_id)
        new, event = self._transition(rule, state, 0 if online else 1, now_ms, None,
                                      error=error or None)
        pending[rule.alarm_id] = new
        if event is not None:
            events.append(event)

    @staticmethod
    def _transition(rule: Rule, state: RuleState, instant: int, now_ms: int, value: Value, *,
                    rate_per_min: float | None = None, age_s: float | None = None,
                    error: str | None = None) -> tuple[RuleState, AlarmEvent | None]:
        new_level, state = debounce(state, instant, now_ms, rule.on_delay_ms, rule.off_delay_ms)
        old = state.level
        if new_level == old:
            return state, None
        since: int | None  # when the alarm was raised: now, or kept from the raise
        if old == 0:
            kind, since = AlarmState.RAISED, now_ms
        elif new_level == 0:
            kind, since = AlarmState.CLEARED, state.since_ms
        else:
            kind, since = AlarmState.CHANGED, state.since_ms
        threshold = rule.threshold(new_level if new_level else old)
        event = AlarmEvent(rule, kind, new_level, old, now_ms, value, threshold, since,
                           rate_per_min=rate_per_min, age_s=age_s, error=error)
        state = replace(state, level=new_level, since_ms=since if new_level else None,
                        changed_ms=now_ms, value=value if value is not None else state.value,
                        threshold=threshold)
        return state, event


def samples_of(records: Sequence[NewRecord]) -> list[Sample]:
    """The telemetry samples in a batch of outbox records (bad-quality ones as value None)."""
    return [Sample(r.point, r.ts_ms, r.value) for r in records
            if r.kind is RecordKind.TELEMETRY and r.point is not None]
