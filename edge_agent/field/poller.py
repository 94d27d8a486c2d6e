"""The Modbus poller: one loop per device, reading its profile's points on a fixed schedule.

Each cycle reads the planned blocks (`protocols.read_plan`), decodes them in `protocols`, and
appends one telemetry record per point to the outbox in ONE `append` call, then wakes the
uplink. Choices worth knowing:

- Schedule: fixed rate on `time.monotonic()` (cycle k starts at t0 + k·interval, so there is no
  drift). A cycle that overruns skips the ticks it missed instead of bursting to catch up.
- Poll tiers: `fast` points every cycle, `normal` every `normal_every`, `slow` every
  `slow_every` cycles; each tier mix has its own read plan, computed once.
- A point that fails to decode (a NaN, a bad string) is NOT dropped: it gets its own record
  with `value=None`, `Flag.BAD_QUALITY` and `attrs={"error": reason}`, so central sees the
  sample existed and why it has no value; it is also counted in `decode_errors`.
- A block the device answers with a Modbus exception is skipped (counted in `exceptions`);
  the other blocks of the cycle are still recorded and the device is `degraded`.
- A device that does not answer at all (refused, timeout) is `offline`: `poll_failed` is
  logged once when that starts and `poll_recovered` once when it ends (Home Assistant's
  coordinator style), and the loop backs off (doubling from the poll interval, capped at
  `backoff_max_s`) before reconnecting. No records are written for cycles without data:
  staleness and the offline alarm are the rules' business.
- An outbox that is full even after thinning (`OutboxFullError`) loses that cycle's records:
  the poller counts it (`outbox_full`), logs `poll_outbox_full` once and
  `poll_outbox_writable` when an append works again, and keeps polling (the device's health
  is unaffected).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from device_profiles import Profile
from edge_agent.config.site import DeviceConfig
from edge_agent.field.errors import (
    ModbusExceptionError,
    TransportConnectError,
    TransportError,
    TransportFramingError,
    TransportTimeoutError,
)
from edge_agent.field.transports import ModbusTransport
from edge_agent.outbox.store import NewRecord, OutboxFullError
from protocols.envelope import Flag, RecordKind
from protocols.modbus_points import PointDecodeError, PointValue
from protocols.read_plan import ReadBlock, plan_reads
from runtime.clock import now_ms

log = structlog.get_logger(__name__)


class OutboxWriter(Protocol):
    """The part of the outbox the poller uses."""

    async def append(self, records: Sequence[NewRecord]) -> list[int]: ...


class Health(enum.StrEnum):
    STARTING = "starting"  # no cycle finished yet
    OK = "ok"  # last cycle read every block and decoded every point
    DEGRADED = "degraded"  # last cycle read some data but had exception responses or bad points
    OFFLINE = "offline"  # last cycle read nothing: no connection or no answer


@dataclass(slots=True)
class DeviceHealth:
    """A snapshot of one device's health and counters, for status and metrics.

    The poller counts in its own instance and hands out copies (`DevicePoller.health`).
    """

    device: str
    state: Health
    cycles: int = 0
    cycles_ok: int = 0
    skipped_cycles: int = 0  # ticks missed because a cycle overran
    reads: int = 0
    timeouts: int = 0
    connect_errors: int = 0
    exceptions: int = 0  # Modbus exception responses and other transport errors
    framing_errors: int = 0  # answers that arrived but were wrong (reason in the bus counters)
    decode_errors: int = 0
    records: int = 0
    consecutive_failures: int = 0
    last_ok_ms: int | None = None
    last_error: str | None = None
    last_cycle_s: float | None = None
    outbox_full: int = 0  # appends refused by a full outbox (those records are lost)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {
            "state": str(self.state)}


@dataclass(frozen=True, slots=True)
class CycleResult:
    records: int
    blocks_ok: int
    blocks_failed: int
    decode_errors: int
    offline: bool
    error: str | None = None


class DevicePoller:
    """Polls one device through a (possibly shared) transport into the outbox."""

    def __init__(self, device: DeviceConfig, profile: Profile, transport: ModbusTransport,
                 outbox: OutboxWriter, *, notify: Callable[[], object] | None = None,
                 wall_ms: Callable[[], int] = now_ms) -> None:
        self.device = device
        self.profile = profile
        self.transport = transport
        self._outbox = outbox
        self._notify = notify
        self.now_ms = wall_ms
        self._c = DeviceHealth(device.id, Health.STARTING)
        self._failing = False
        self._outbox_full = False
        self._tick = 0
        self._tiers: dict[str, str] = {p.key: p.poll for p in profile.points}
        self._plans: dict[frozenset[str], list[ReadBlock]] = {}
        self._log = log.bind(device=device.id)
        self._interval = device.poll_interval_s
        self._rescheduled = asyncio.Event()

    # --- status ---------------------------------------------------------------------------

    @property
    def health(self) -> DeviceHealth:
        return dataclasses.replace(self._c)

    # --- planning -------------------------------------------------------------------------

    def tiers_for(self, tick: int) -> frozenset[str]:
        tiers = {"fast"}
        if tick % self.device.normal_every == 0:
            tiers.add("normal")
        if tick % self.device.slow_every == 0:
            tiers.add("slow")
        return frozenset(tiers)

    def plan(self, tiers: frozenset[str]) -> list[ReadBlock]:
        plan = self._plans.get(tiers)
        if plan is None:
            limits = self.profile.reads
            dev = self.device
            plan = plan_reads(
                [p.spec for p in self.profile.points if p.poll in tiers],
                max_registers=dev.max_registers or limits.max_registers,
                max_bits=dev.max_bits or limits.max_bits,
                max_gap=dev.max_gap if dev.max_gap is not None else limits.max_gap)
            self._plans[tiers] = plan
        return plan

    # --- one cycle ------------------------------------------------------------------------

    async def poll_once(self) -> CycleResult:
        """Read the points due this cycle, append their records in one call, update health."""
        tiers = self.tiers_for(self._tick)
        self._tick += 1
        blocks = self.plan(tiers)
        ts_ms = self.now_ms()  # one timestamp per cycle: its points were sampled together
        started = time.monotonic()
        records: list[NewRecord] = []
        ok = failed = bad = 0
        error: str | None = None
        offline = False
        for block in blocks:
            try:
                words = await self.transport.read(block.function, block.start, block.count,
                                                  device_id=self.device.device_id)
            except TransportTimeoutError as exc:
                self._c.timeouts += 1
                error, offline = exc.message, True
                break  # a device that does not answer will not answer the next block either
            except ModbusExceptionError as exc:
                self._c.exceptions += 1
                failed += 1
                error = exc.message
                continue
            except TransportConnectError as exc:
                self._c.connect_errors += 1
                error, offline = exc.message, True
                break
            except TransportFramingError as exc:  # bytes came, but no right answer
                self._c.framing_errors += 1
                error, offline = exc.message, True
                break
            except TransportError as exc:
                self._c.exceptions += 1
                error, offline = exc.message, True
                break
            ok += 1
            self._c.reads += 1
            for key, value in block.decode(words).items():
                records.append(self._record(ts_ms, key, value))
                if isinstance(value, PointDecodeError):
                    bad += 1
        self._c.last_cycle_s = time.monotonic() - started
        self._c.cycles += 1
        self._c.decode_errors += bad
        if offline:
            failed = len(blocks) - ok
        if records and await self._append(records):
            self._c.records += len(records)
            if self._notify is not None:
                self._notify()
        result = CycleResult(records=len(records), blocks_ok=ok, blocks_failed=failed,
                             decode_errors=bad, offline=offline and ok == 0, error=error)
        self._update_health(result)
        return result

    async def _append(self, records: list[NewRecord]) -> bool:
        """Append one cycle's records; False when a full outbox refused them."""
        try:
            await self._outbox.append(records)
        except OutboxFullError as exc:
            self._c.outbox_full += 1
            if not self._outbox_full:
                self._outbox_full = True
                self._log.error("poll_outbox_full", error=str(exc), records=len(records))
            return False
        if self._outbox_full:
            self._outbox_full = False
            self._log.info("poll_outbox_writable", refused=self._c.outbox_full)
        return True

    def _record(self, ts_ms: int, key: str, value: PointValue | PointDecodeError) -> NewRecord:
        point = f"{self.device.id}/{key}"
        if isinstance(value, PointDecodeError):
            return NewRecord(kind=RecordKind.TELEMETRY, ts_ms=ts_ms, point=point, value=None,
                             flags=Flag.BAD_QUALITY, attrs={"error": value.reason})
        return NewRecord(kind=RecordKind.TELEMETRY, ts_ms=ts_ms, point=point, value=value)

    def _update_health(self, r: CycleResult) -> None:
        c = self._c
        if r.offline:
            c.consecutive_failures += 1
            c.last_error = r.error
            self._c.state = Health.OFFLINE
            if not self._failing:
                self._failing = True
                self._log.warning("poll_failed", error=r.error,
                                  endpoint=self.transport.endpoint)
            return
        c.last_ok_ms = self.now_ms()
        c.consecutive_failures = 0
        if r.blocks_failed or r.decode_errors:
            self._c.state = Health.DEGRADED
            c.last_error = r.error or f"{r.decode_errors} point(s) failed to decode"
        else:
            self._c.state = Health.OK
            c.cycles_ok += 1
        if self._failing:
            self._failing = False
            self._log.info("poll_recovered", state=str(self._c.state))

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled: fixed rate while the device answers, back-off while not."""
        self._log.info("poll_started", interval_s=self._interval, endpoint=self.transport.endpoint,
                       points=len(self.profile.points))
        anchor = time.monotonic()
        k = 0
        try:
            while True:
                interval = self._interval
                result = await self.poll_once()
                if result.offline:
                    await self._backoff()
                    anchor, k = time.monotonic(), 0  # re-anchor: resume a fresh schedule
                    continue
                k += 1
                next_at = anchor + k * interval
                now = time.monotonic()
                if now >= next_at:
                    # Overran: skip every missed tick and run at the next one still ahead.
                    missed = math.floor((now - anchor) / interval) + 1 - k
                    self._c.skipped_cycles += missed
                    k += missed
                    next_at = anchor + k * interval
                if await self._sleep_until_rescheduled(max(0.0, next_at - now)):
                    anchor, k = time.monotonic(), 0  # a new interval: poll now, then on it
        finally:
            self._log.info("poll_stopped")

    @property
    def interval_s(self) -> float:
        """The poll interval in effect (the config's, until a command changes it)."""
        return self._interval

    def set_interval(self, seconds: float) -> None:
        """Change the poll interval at runtime (not persisted); the schedule restarts at once."""
        if not (math.isfinite(seconds) and 0 < seconds <= 86_400):
            raise ValueError(f"poll interval must be in (0, 86400] s, got {seconds!r}")
        self._log.info("poll_interval_changed", interval_s=seconds, previous_s=self._interval)
        self._interval = seconds
        self._rescheduled.set()

    async def _sleep_until_rescheduled(self, delay: float) -> bool:
        """Sleep `delay` s; True when `set_interval` cut the sleep short."""
        try:
            async with asyncio.timeout(delay):
                await self._rescheduled.wait()
        except TimeoutError:
            return False
        self._rescheduled.clear()
        return True

    async def _backoff(self) -> None:
        n = self._c.consecutive_failures
        delay = min(self.device.backoff_max_s, self._interval * 2 ** max(0, n - 1))
        await asyncio.sleep(delay)

