"""The local rule (DESIGN.md §7: the edge "can drive local 叫应 terminals"): when a local alarm
reaches `[local_warning] alarm_level` (level 2 by default) while the gateway is cut off from
central (its MQTT uplink is down), the gateway plays `[local_warning] text` on its terminals
by itself, without waiting for a duty officer it cannot reach.

`on_alarm_events` is the alarm rules' listener (`edge_agent.alarms.wiring.AlarmRules`): it
only queues, so the alarm path never waits on a terminal. `run()` (task `terminals.local`)
plays each queued alarm once: the warning id is made from the alarm's id and the time it
was raised, and the terminal ledger refuses a warning id it has played before. What was
played is recorded once as a `callresp_local` EVENT (`protocols.terminal_events`), and the
terminals' receipts and acks as ordinary `callresp` events, so central learns all of it
when the link returns.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence

import structlog

from edge_agent.alarms.rules import AlarmEvent
from edge_agent.terminals.config import LocalWarningConfig
from edge_agent.terminals.service import TerminalService
from protocols.alarm_attrs import AlarmState
from protocols.callresp import play_warning
from protocols.terminal_events import LOCAL_EVENT, LocalWarningEvent

log = structlog.get_logger(__name__)

ORIGIN = "local_rule"
QUEUE_MAX = 64


def local_warning_id(alarm_id: str, since_ms: int) -> str:
    """A warning id for the alarm raised at `since_ms` (a callresp id: 1-64 safe chars)."""
    digest = hashlib.sha256(alarm_id.encode()).hexdigest()[:8]
    return f"local-{since_ms}-{digest}"


class LocalWarningRule:
    def __init__(self, config: LocalWarningConfig, service: TerminalService, *,
                 online: Callable[[], bool]) -> None:
        self.config = config
        self.service = service
        self._online = online
        self._queue: asyncio.Queue[AlarmEvent] = asyncio.Queue(maxsize=QUEUE_MAX)
        self.played = 0
        self.skipped_online = 0

    def on_alarm_events(self, events: Sequence[AlarmEvent]) -> None:
        """The alarm rules' listener: queue the raises this rule plays (never blocks)."""
        cfg = self.config
        for ev in events:
            if ev.state is AlarmState.CLEARED or ev.prev_level >= cfg.alarm_level \
                    or not cfg.matches(ev.alarm_id, ev.level):
                continue
            if cfg.only_offline and self._online():
                self.skipped_online += 1
                continue
            try:
                self._queue.put_nowait(ev)
            except asyncio.QueueFull:
                log.error("local_warning_dropped", alarm_id=ev.alarm_id)

    async def run(self) -> None:
        while True:
            ev = await self._queue.get()
            await self.play(ev)

    async def play(self, ev: AlarmEvent) -> None:
        cfg = self.config
        terminals = cfg.terminals or list(self.service.terminal_ids)
        if not terminals:
            return
        since = ev.since_ms if ev.since_ms is not None else ev.ts_ms
        wid = local_warning_id(ev.alarm_id, since)
        wire = await self.service.ledger.warning(wid, origin=ORIGIN, cmd_id=None, now_ms=since)
        if not wire.new:
            return  # played before a restart
        args = play_warning(wid, cfg.level, cfg.text, cfg.repeat, terminals)
        outcomes = await self.service.play(args, origin=ORIGIN)
        self.played += 1
        results = {t: str(o.result) for t, o in outcomes.items()}
        log.warning("local_warning_played", alarm_id=ev.alarm_id, warning_id=wid,
                    warning_level=ev.level, terminals=results)
        report = LocalWarningEvent(wid, cfg.level, cfg.text, ev.alarm_id, ev.ts_ms, results)
        await self.service.record_once((wid, "", LOCAL_EVENT), report.to_attrs(), ev.ts_ms)


__all__ = ["ORIGIN", "LocalWarningRule", "local_warning_id"]
