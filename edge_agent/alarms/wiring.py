"""The alarm rules wired between the pollers and the outbox (DESIGN.md §7).

`AlarmRules` is the outbox writer that the supervisor hands to each `DevicePoller` in place of
the outbox (the poller itself is unchanged and knows nothing of alarms):

    poller ── append(telemetry) ──▶ AlarmRules ── append(telemetry + alarm records) ──▶ outbox
                                        │  RuleEngine.on_samples (pure)
                                        └─ then AlarmStore.save(new states)

So an alarm record commits in the same outbox transaction as the reading that caused it, and
the alarm state is saved only after that commit (see `alarm_store` for why in that order).
If the outbox append fails, the engine keeps its old state and the poller sees the error as
before, with one exception: on a full disk (`OutboxDiskFullError`, or an append that returns
no seqs) the outbox holds the alarm records in memory, in order, and writes them once there is
room, so the engine adopts the new state and keeps evaluating; the poller still learns that
its telemetry was dropped. Alarm state that the (equally full) alarm store refuses is kept
here and saved again with the next transition, on the next tick, and when the agent stops.
`tick_loop` (task `rules.tick`) evaluates the time-driven rules once a second: stale values,
and device offline/online from each poller's health.

One lock serialises evaluate → append → save, so two devices (or a device and the tick) never
interleave their transitions; the outbox has one writer thread anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import structlog

from device_profiles import Profile
from edge_agent.alarms.config import build_device_rules
from edge_agent.alarms.rules import (
    AlarmEvent,
    AlarmSnapshot,
    DeviceStatus,
    Evaluation,
    Rule,
    RuleEngine,
    samples_of,
)
from edge_agent.alarms.store import AlarmStore, AlarmStoreError
from edge_agent.config.site import AgentConfig, DeviceConfig
from edge_agent.field.poller import DeviceHealth, Health, OutboxWriter
from edge_agent.outbox.store import NewRecord, OutboxDiskFullError
from protocols.alarm_attrs import AlarmState
from runtime.clock import now_ms

log = structlog.get_logger(__name__)

TICK_S = 1.0
_LOG_EVENT = {AlarmState.RAISED: "alarm_raised", AlarmState.CHANGED: "alarm_changed",
              AlarmState.CLEARED: "alarm_cleared"}


class PolledDevice(Protocol):
    """The part of a `DevicePoller` the tick loop reads."""

    @property
    def device(self) -> DeviceConfig: ...

    @property
    def health(self) -> DeviceHealth: ...


def build_rules(config: AgentConfig, profiles: Mapping[str, Profile]) -> list[Rule]:
    """The rules of every enabled device (raises `RulesError`; config load checks it first)."""
    rules: list[Rule] = []
    for dev in config.devices:
        if dev.enabled:
            rules.extend(build_device_rules(dev.id, profiles[dev.id], dev.alarms))
    return rules


def status_of(health: DeviceHealth) -> DeviceStatus:
    """Poller health → what the offline rule needs (degraded still answers: online)."""
    if health.state is Health.STARTING:
        return DeviceStatus(online=None)
    if health.state is Health.OFFLINE:
        return DeviceStatus(online=False, error=health.last_error)
    return DeviceStatus(online=True)


class AlarmRules:
    """Evaluates the rules on everything the pollers append and on a clock tick."""

    def __init__(self, engine: RuleEngine, store: AlarmStore, outbox: OutboxWriter, *,
                 wall_ms: Callable[[], int] = now_ms, tick_s: float = TICK_S,
                 on_events: Callable[[Sequence[AlarmEvent]], None] | None = None) -> None:
        self.engine = engine
        self._on_events = on_events  # told of every transition once it is in the outbox
        self._store = store
        self._outbox = outbox
        self.now_ms = wall_ms
        self.tick_s = tick_s
        self._lock = asyncio.Lock()
        self._unsaved: dict[str, AlarmSnapshot] = {}  # refused by the alarm store, newest each

    async def restore(self) -> int:
        """Load the saved active alarms into the engine (call once, before the pollers run);
        alarms whose rule is gone are cleared through the outbox. Returns how many are active."""
        stored = await self._store.load_active()
        async with self._lock:
            evaluation = self.engine.restore(stored, self.now_ms())
            await self._emit([], evaluation)
        active = self.engine.active()
        log.info("alarms_restored", active=len(active), dropped=len(evaluation.events))
        return len(active)

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        """The poller's outbox writer: telemetry plus the alarm records it causes, one commit.
        Returns the seqs of `records` only, as `Outbox.append` would."""
        async with self._lock:
            evaluation = self.engine.on_samples(samples_of(records))
            seqs = await self._emit(records, evaluation)
        return seqs[:len(records)]

    async def tick(self, devices: Mapping[str, DeviceStatus],
                   now_ms: int | None = None) -> tuple[AlarmEvent, ...]:
        """Evaluate stale and offline rules now; returns the events it recorded."""
        async with self._lock:
            evaluation = self.engine.on_tick(self.now_ms() if now_ms is None else now_ms,
                                             devices)
            await self._emit([], evaluation)
        return evaluation.events

    async def tick_loop(self, pollers: Iterable[PolledDevice]) -> None:
        """Tick once every `tick_s` with the pollers' health, until cancelled."""
        while True:
            await self.tick({p.device.id: status_of(p.health) for p in pollers})
            if self._unsaved:
                async with self._lock:
                    await self._save([])
            await asyncio.sleep(self.tick_s)

    @property
    def unsaved(self) -> int:
        """Alarm states the alarm store has refused so far (a full disk); kept to save again."""
        return len(self._unsaved)

    async def save_pending(self) -> bool:
        """Save the alarm states the store refused before (the supervisor calls this at stop,
        after the outbox has written what it held); True when none is left."""
        async with self._lock:
            await self._save([])
        return not self._unsaved

    async def _emit(self, records: Sequence[NewRecord], evaluation: Evaluation) -> list[int]:
        alarm_records = [e.to_record() for e in evaluation.events]
        seqs: list[int] = []
        refused: OutboxDiskFullError | None = None
        if records or alarm_records:
            try:
                seqs = await self._outbox.append([*records, *alarm_records])
            except OutboxDiskFullError as exc:
                # The telemetry is gone, but the alarm records are held by the outbox (or
                # counted as given up): the state moves on, as it did in the field.
                refused = exc
        self.engine.commit(evaluation)
        if not evaluation.events:
            if refused is not None:
                raise refused
            return seqs
        for event in evaluation.events:
            log_fn = log.info if event.state is AlarmState.CLEARED else log.warning
            log_fn(_LOG_EVENT[event.state], alarm_id=event.alarm_id, alarm_level=event.level,
                   prev_level=event.prev_level, value=event.value, threshold=event.threshold)
        await self._save(evaluation.snapshots() + [_cleared(e) for e in evaluation.events
                                                    if e.alarm_id not in evaluation.states])
        if self._on_events is not None:
            self._on_events(evaluation.events)
        if refused is not None:
            raise refused
        return seqs

    async def _save(self, snapshots: Sequence[AlarmSnapshot]) -> None:
        """Save `snapshots` with any refused before (the newest state of each alarm wins)."""
        pending = dict(self._unsaved)
        pending.update((s.alarm_id, s) for s in snapshots)
        if not pending:
            return
        try:
            await self._store.save(list(pending.values()))
        except AlarmStoreError as exc:
            # The records are in the outbox, which is what counts; kept here to save again.
            # A restart before that restores the older state, and an alarm may be raised once
            # more (central merges it by alarm_id).
            if not self._unsaved:
                log.error("alarm_state_save_failed", error=str(exc), alarms=len(pending))
            self._unsaved = pending
            return
        if self._unsaved:
            log.info("alarm_state_saved_again", alarms=len(self._unsaved))
        self._unsaved = {}


def _cleared(event: AlarmEvent) -> AlarmSnapshot:
    """The stored row for a clear that has no engine state (a rule removed since last run)."""
    r = event.rule
    return AlarmSnapshot(alarm_id=r.alarm_id, device=r.device, point=r.point, rule=str(r.kind),
                         level=0, since_ms=event.since_ms, changed_ms=event.ts_ms,
                         value=event.value, threshold=event.threshold)
