"""The outbox's housekeeping (DESIGN.md §4): every `prune_interval_s`, write what a full disk
made it hold, prune delivered rows, run the disk budget, give free pages back, lay the ballast
again, and apply clock confirmations (a technician's `clock ok`, or NTP seen in sync).

A mixin of `Outbox` (like `upkeep.py`, whose executor-thread bodies it awaits). The loop is a
supervised task: `Outbox.open` runs it under its own supervisor, the agent under its one
(`maintain=False`), named `outbox.maintain` either way.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import structlog

from edge_agent.health.clock import Stamp
from edge_agent.outbox.db import OutboxError
from edge_agent.outbox.upkeep import OutboxUpkeep, Reclaimed
from runtime.tasks import every

log = structlog.get_logger(__name__)

MAINTENANCE_TASK = "outbox.maintain"


class OutboxMaintenance(OutboxUpkeep):
    """The housekeeping coroutines of `Outbox` (see the module doc)."""

    prune_interval_s: float
    maintenance_errors: int  # OutboxErrors of the maintenance loop (the disk failing)

    if TYPE_CHECKING:
        def _notify(self) -> None: ...

        async def prune(self) -> int: ...

        async def reclaim(self, *, force: bool = False) -> Reclaimed: ...

        async def get_meta(self, key: str) -> str | None: ...

        async def clock_ok(self, source: str = "manual",
                           reference: Stamp | None = None) -> int: ...

    async def maintain(self) -> None:
        """One round of housekeeping: prune, budget, vacuum, clock (the background task)."""
        if self._ring.active and await self._sqlite.call(self._flush_held_sync,
                                                          self.clock.stamp(), True):
            self._notify()
        await self.prune()
        await self.reclaim()
        await self._sqlite.call(self._vacuum_sync)
        if not self._ring.active:
            await self._sqlite.call(self._disk.lay_ballast)
        await self._apply_clock_request()
        if self.clock.poll_sync():
            await self.clock_ok("ntp")

    async def maintenance_loop(self) -> None:
        """`maintain()` every `prune_interval_s` for ever, a supervised task. An `OutboxError`
        is an outage of the disk, logged once (`outbox_maintenance_failed`) and counted in
        `maintenance_errors`; any other error ends the loop, for the supervisor to log, count
        and restart with back-off."""
        await asyncio.sleep(self.prune_interval_s)
        await every(self.prune_interval_s, self.maintain, name="outbox_maintenance",
                    errors=OutboxError, on_error=self._maintenance_failed)

    def _maintenance_failed(self, exc: BaseException) -> None:
        self.maintenance_errors += 1

    async def _apply_clock_request(self) -> None:
        raw = await self.get_meta("clock_ok_request")
        if raw is None:
            return
        await self._sqlite.call(self._write, False, lambda conn: conn.execute(
            "DELETE FROM meta WHERE key = 'clock_ok_request' AND value = ?", (raw,)))
        try:
            req = json.loads(raw)
            reference = Stamp(int(req["wall_ms"]), int(req["mono_ms"]))
            boot_id, source = str(req["boot_id"]), str(req.get("source", "manual"))
        except (ValueError, KeyError, TypeError):
            log.warning("clock_request_malformed", request=raw[:200])
            return
        if boot_id != self.clock.boot_id:
            log.warning("clock_request_other_boot", boot_id=boot_id)
            return
        await self.clock_ok(source, reference)


__all__ = ["MAINTENANCE_TASK", "OutboxMaintenance"]
