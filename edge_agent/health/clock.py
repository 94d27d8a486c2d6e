"""Wall-clock sanity for record timestamps (DESIGN.md §4.7).

A gateway without an RTC battery boots after a power cut with its clock at 1970, at the last
time `fake-hwclock` saved, or drifted; NTP or BeiDou time may come back hours later and step
the clock. Record timestamps are wall-clock milliseconds, so the outbox stamps every append
with both clocks (`ClockGuard.stamp()`): the wall clock and the boot-time clock
(CLOCK_BOOTTIME: monotonic, counts suspend, shared by every process of one boot, reset at
boot). Their difference, the *offset*, is constant while nobody touches the wall clock.

The wall clock is *suspect* (records get `Flag.CLOCK_SUSPECT`) when

- it reads earlier than `floor_ms`, the build-time floor (no correct clock can be earlier);
- it reads earlier than the newest trusted wall time ever stamped into this outbox (the high
  water mark, kept across reboots), less `max_step_ms`: the clock went backwards;
- the offset jumped by more than `max_step_ms` (plus the kernel's 500 ppm slew) between two
  stamps: someone or something stepped the clock, and until a good source confirms, neither
  side of the step is trusted.

It stays suspect until `clock_ok(source)`: an NTP sync seen through `adjtimex(2)`
(`ntp_synchronized()`, polled by the outbox's maintenance loop while suspect) or a manual
`edge-agent clock ok`. The good offset then corrects every undelivered record stamped in the
*same boot* (`ts += good_offset - record_offset`, flag cleared); records of an earlier boot
keep their flag, because the boot-time clock does not carry across a reboot. A step back to
the last trusted offset clears the suspicion by itself.

Assumes record timestamps come from this host's wall clock (the poller and the alarm rules
stamp with `time.time_ns()`), which is what makes the offset correction valid.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from protocols.envelope import Flag

log = structlog.get_logger(__name__)

# 2026-01-01T00:00:00Z. A clock earlier than the day this version was built is wrong; raise
# it at each release (it only has to be earlier than any real deployment of the build).
BUILD_FLOOR_MS = 1_767_225_600_000
DEFAULT_MAX_STEP_MS = 2_000
_SLEW_PER_MS = 500e-6  # the kernel slews an NTP-disciplined clock by at most 500 ppm
_TIME_ERROR = 5  # adjtimex(2): "clock not synchronized"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PROCESS_BOOT = f"process-{uuid.uuid4().hex}"


class SuspectReason(enum.StrEnum):
    BEFORE_FLOOR = "before_floor"
    BEHIND_HIGH_WATER = "behind_high_water"
    JUMP = "jump"


def boottime_ns() -> int:
    """CLOCK_BOOTTIME where the OS has it (Linux), else the monotonic clock."""
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.clock_gettime_ns(clock)


def current_boot_id() -> str:
    """The kernel's id of this boot; without one, this process counts as its own boot."""
    try:
        return _BOOT_ID.read_text().strip() or _PROCESS_BOOT
    except OSError:
        return _PROCESS_BOOT


def ntp_synchronized() -> bool:
    """True when the kernel says an NTP (or chrony, or gpsd) daemon keeps the clock in sync.

    `adjtimex(2)` with `modes = 0` only reads, needs no privilege, and returns TIME_ERROR
    while the clock is unsynchronized. Anything we cannot ask counts as not synchronized.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        buf = ctypes.create_string_buffer(1024)  # struct timex is ~208 bytes; modes=0 (zeroed)
        state = libc.adjtimex(buf)
    except (OSError, AttributeError):
        return False
    return state >= 0 and state != _TIME_ERROR


@dataclass(frozen=True, slots=True)
class Stamp:
    """One reading of both clocks, and whether the wall clock was trusted at that moment."""

    wall_ms: int
    mono_ms: int
    flags: Flag = Flag.NONE

    @property
    def offset_ms(self) -> int:
        return self.wall_ms - self.mono_ms

    @property
    def suspect(self) -> bool:
        return bool(self.flags & Flag.CLOCK_SUSPECT)


@dataclass(frozen=True, slots=True)
class ClockFix:
    """A good offset from a trusted source, valid for records stamped in `boot_id`."""

    boot_id: str
    offset_ms: int
    wall_ms: int
    source: str


@dataclass(frozen=True, slots=True)
class ClockState:
    """What survives a restart of the agent (kept in the outbox meta as JSON)."""

    boot_id: str
    high_water_ms: int
    reason: str | None = None
    last_offset_ms: int | None = None
    last_mono_ms: int | None = None
    trusted_offset_ms: int | None = None
    trusted_source: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self.__slots__}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> ClockState | None:
        if not text:
            return None
        try:
            raw = json.loads(text)
            return cls(**{k: raw.get(k) for k in cls.__slots__ if k in raw})
        except (ValueError, TypeError):
            return None


class ClockGuard:
    """Stamps records with both clocks and decides whether the wall clock is trusted.

    Example::

        guard = ClockGuard()
        stamp = guard.stamp()          # Stamp(wall_ms, mono_ms, flags)
        if guard.suspect and ntp_synchronized():
            fix = guard.clock_ok("ntp")  # then correct the records of fix.boot_id
    """

    def __init__(self, *, floor_ms: int = BUILD_FLOOR_MS, max_step_ms: int = DEFAULT_MAX_STEP_MS,
                 wall_ns: Callable[[], int] = time.time_ns,
                 mono_ns: Callable[[], int] = boottime_ns, boot_id: str | None = None,
                 sync_probe: Callable[[], bool] = ntp_synchronized) -> None:
        self.floor_ms = floor_ms
        self.max_step_ms = max_step_ms
        self.boot_id = boot_id or current_boot_id()
        self._wall_ns, self._mono_ns, self._probe = wall_ns, mono_ns, sync_probe
        self._reason: SuspectReason | None = None
        self._last: tuple[int, int] | None = None  # (offset, mono) of the previous stamp
        self._trusted: int | None = None  # offset confirmed by a good source in this boot
        self._trusted_source: str | None = None
        self.high_water_ms = 0

    @property
    def suspect(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> SuspectReason | None:
        return self._reason

    def now(self) -> Stamp:
        """Both clocks, without judging them (for ages and deadlines)."""
        return Stamp(self._wall_ns() // 1_000_000, self._mono_ns() // 1_000_000)

    def stamp(self) -> Stamp:
        """Read both clocks, update the verdict, and return the stamp for a record."""
        raw = self.now()
        offset = raw.offset_ms
        if self._last is not None:
            last_offset, last_mono = self._last
            allowed = self.max_step_ms + abs(raw.mono_ms - last_mono) * _SLEW_PER_MS
            if abs(offset - last_offset) > allowed:
                if (self._reason is SuspectReason.JUMP and self._trusted is not None
                        and abs(offset - self._trusted) <= self.max_step_ms):
                    self._clear(raw, "stepped back to the trusted offset")
                else:
                    self._suspect(SuspectReason.JUMP, raw, step_ms=offset - last_offset)
        self._last = (offset, raw.mono_ms)
        if raw.wall_ms < self.floor_ms:
            self._suspect(SuspectReason.BEFORE_FLOOR, raw)
        elif raw.wall_ms < self.high_water_ms - self.max_step_ms:
            self._suspect(SuspectReason.BEHIND_HIGH_WATER, raw, high_water_ms=self.high_water_ms)
        if self._reason is None:
            self.high_water_ms = max(self.high_water_ms, raw.wall_ms)
            return raw
        return Stamp(raw.wall_ms, raw.mono_ms, Flag.CLOCK_SUSPECT)

    def clock_ok(self, source: str, reference: Stamp | None = None) -> ClockFix:
        """A good time source confirms the wall clock (now, or at `reference` in this boot)."""
        ref = reference or self.now()
        now = self.now()
        self._trusted, self._trusted_source = ref.offset_ms, source
        self._last = (now.offset_ms, now.mono_ms)
        # A high water mark set by a clock that ran ahead would make every later boot suspect.
        self.high_water_ms = now.wall_ms
        if self._reason is not None:
            log.info("clock_ok", source=source, was=str(self._reason), wall_ms=now.wall_ms)
        self._reason = None
        return ClockFix(self.boot_id, ref.offset_ms, now.wall_ms, source)

    def poll_sync(self) -> bool:
        """While suspect, ask the sync probe; True when it now reports the clock synchronized."""
        return self._reason is not None and self._probe()

    def state(self) -> ClockState:
        last = self._last or (None, None)
        return ClockState(boot_id=self.boot_id, high_water_ms=self.high_water_ms,
                          reason=str(self._reason) if self._reason else None,
                          last_offset_ms=last[0], last_mono_ms=last[1],
                          trusted_offset_ms=self._trusted, trusted_source=self._trusted_source)

    def restore(self, state: ClockState | None) -> None:
        """Carry the verdict over an agent restart; only the high water mark crosses a reboot."""
        if state is None:
            return
        self.high_water_ms = max(self.high_water_ms, int(state.high_water_ms or 0))
        if state.boot_id != self.boot_id:
            return
        if state.last_offset_ms is not None and state.last_mono_ms is not None:
            self._last = (state.last_offset_ms, state.last_mono_ms)
        self._trusted, self._trusted_source = state.trusted_offset_ms, state.trusted_source
        if state.reason is not None and state.reason in SuspectReason.__members__.values():
            self._reason = SuspectReason(state.reason)

    def _suspect(self, reason: SuspectReason, raw: Stamp, **data: int) -> None:
        if self._reason is None:
            log.warning("clock_suspect", reason=str(reason), wall_ms=raw.wall_ms, **data)
            self._reason = reason

    def _clear(self, raw: Stamp, why: str) -> None:
        log.info("clock_ok", source="trusted_offset", reason=why, wall_ms=raw.wall_ms)
        self._reason = None


__all__ = ["BUILD_FLOOR_MS", "ClockFix", "ClockGuard", "ClockState", "Stamp", "SuspectReason",
           "boottime_ns", "current_boot_id", "ntp_synchronized"]
