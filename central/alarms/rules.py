"""Central's own alarm rules, evaluated by a periodic task (`alarm_rules_loop`), DESIGN.md §7.

Each tick:
- gateway offline: a gateway not heard (no state, birth or data) for `offline_alarm_after_s`
  raises `gateway_offline` on it; hearing from it again clears it;
- flapping alarms whose window has passed quietly settle (`alarm_engine.settle_program`);
- incidents with no active alarm for the incident window close.

Only what changes is written, one short transaction each, and the database picks the gateways
whose condition changed, so a city's thousands of gateways cost one read (of no rows) per
tick. Several workers may run the loop at once: every write goes through the same key locks
and constraints as ingest, so they agree.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial

import structlog

from central.alarms.engine import (
    close_incident_program,
    condition_program,
    flapping_to_settle,
    incidents_to_close,
    log_changes,
    policy_from,
    settle_program,
)
from central.alarms.lifecycle import GATEWAY_OFFLINE, AlarmChange, AlarmPolicy
from central.config.settings import Settings
from central.storage import Storage, StorageError
from central.storage.program import Program, Sql
from central.storage.retire_schema import in_service
from runtime import tasks

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TickResult:
    changes: tuple[AlarmChange, ...] = ()
    incidents_closed: tuple[int, ...] = field(default_factory=tuple)


def _offline_changes(now_ms: int, offline_after_ms: int) -> Program[list[tuple[str, bool]]]:
    """`(gw, offline)` of each gateway whose offline condition is not what its
    `gateway_offline` key holds, by gw: the database compares, so a steady fleet of thousands
    returns no rows (listing every gateway each tick cost a few percent of central's CPU)."""
    heard = "coalesce(g.last_seen_ms, g.state_ts_ms)"
    offline = f"CASE WHEN {heard} < ? THEN 1 ELSE 0 END"
    rows = yield Sql(f"SELECT g.gw, {offline} FROM gateways g LEFT JOIN alarm_keys k"
                     f" ON k.gw = g.gw AND k.alarm_key = ? WHERE {heard} IS NOT NULL"
                     f" AND {in_service('g.gw')}"
                     f" AND {offline} <> CASE WHEN k.edge_state = 'raised' THEN 1 ELSE 0 END"
                     " ORDER BY g.gw", (now_ms - offline_after_ms, GATEWAY_OFFLINE,
                                        now_ms - offline_after_ms))
    return [(gw, bool(offline)) for gw, offline in rows]


class AlarmRules:
    """Central's rules over one storage; `run()` is the `alarm_rules_loop`."""

    def __init__(self, storage: Storage, *, offline_after_ms: int, interval_s: float,
                 policy: AlarmPolicy) -> None:
        self.storage = storage
        self.offline_after_ms = offline_after_ms
        self.interval_s = interval_s
        self.policy = policy

    async def tick(self, now_ms: int | None = None) -> TickResult:
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        changes: list[AlarmChange] = []
        for gw, offline in await self.storage.run(
                partial(_offline_changes, now, self.offline_after_ms), write=False):
            change = await self.storage.run(partial(
                condition_program, gw, GATEWAY_OFFLINE, GATEWAY_OFFLINE, offline, 1,
                self.policy, now))
            if change is not None:
                changes.append(change)
        for gw, key in await self.storage.run(lambda: flapping_to_settle(self.policy, now),
                                              write=False):
            change = await self.storage.run(partial(settle_program, gw, key, self.policy, now))
            if change is not None:
                changes.append(change)
        closed = []
        for incident in await self.storage.run(lambda: incidents_to_close(self.policy, now),
                                               write=False):
            if await self.storage.run(partial(close_incident_program, incident, self.policy,
                                              now)):
                closed.append(incident)
                log.info("incident_closed", incident_id=incident)
        log_changes(changes)
        return TickResult(tuple(changes), tuple(closed))

    async def run(self) -> None:
        """Tick every `interval_s` for ever; a failing tick is logged once per outage."""
        await tasks.every(self.interval_s, self.tick, name="alarm_rules", errors=StorageError)


@dataclass(slots=True)
class AlarmRulesRuntime:
    rules: AlarmRules
    task: asyncio.Task[None] | None

    async def stop(self) -> None:
        await tasks.stop(self.task)


def start_alarm_rules(settings: Settings, storage: Storage, *, run: bool) -> AlarmRulesRuntime:
    """Central's alarm rules and, with `run`, their loop task. (The storage applies the same
    policy while it writes batches: `open_storage(alarm_policy=policy_from(settings))`.)"""
    policy = policy_from(settings)
    rules = AlarmRules(storage, offline_after_ms=int(settings.offline_alarm_after_s * 1000),
                       interval_s=settings.alarm_rules_interval_s, policy=policy)
    task = tasks.start("alarms.rules", rules.run) if run else None
    return AlarmRulesRuntime(rules, task)
