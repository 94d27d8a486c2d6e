"""HJ 212-2017 station simulator: a data logger (数采仪) pushing frames on a pseudo-terminal.

`Hj212StationSimulator` opens a pty pair (`os.openpty()`, raw mode) and writes, on the master
side, what a forest-fire-risk station's logger writes on its RS-232/485 line: a real-time
frame (CN 2011, `xxx-Rtd`) every `interval_s` and a minute frame (CN 2051, `xxx-Avg/Min/Max`
of the samples of the window; the `counter` point is left out of it) every `minute_s`.
The agent opens the slave side (`.link_path`, e.g. `/dev/pts/7`, or a symlink made with
`symlink=`) like `/dev/ttyS2`. Values follow the points' `sim` specs of an `hj212` profile;
DataTime is station local time (default Asia/Shanghai), whole seconds; frames are made by
the codec (`protocols.hj212.encode_frame`), so the length and CRC are right.

Samples are taken on a fixed-rate schedule (sample k at start + k·interval), so a `counter`
point (whole seconds since start) steps by exactly the interval; ticks the loop missed are
skipped, not sent in a burst.

With `ack_requested=True` frames carry Flag=5 (A bit: the sender wants an answer) and the
simulator counts the CN 9014 data replies it reads back (`stats()["acks"]`).

Faults (`Hj212Faults`), counted in frames so a test can make exactly one bad frame:
`bad_crc` (the next n frames carry a wrong CRC), `truncate` (the next n frames stop halfway,
with no trailer), `garbage` (that many random bytes before the next frame), `silent`
(nothing is sent while true; samples are still taken, so the counter shows the gap), and
`clock_offset_s` (the station clock is wrong by this much: DataTime moves, QN too).

Scripting: `set_value()` / `clear_override()` / `get_value()` / `seconds()` as for the other
simulators, `set_faults()` / `inject()`, and a JSON-lines control port (`control_port=0` picks
one) that takes the lines of `firmware_stubs.control` plus `{"fault": {"bad_crc": 1}}`
(changes only the named faults) and `{"stats": {}}`.

As a process: ``python -m firmware_stubs.hj212_sim --profile forest-fire-station-v1
--link-file /tmp/ffs.link --interval 1`` writes the pty path to the link file, prints
`READY path=/dev/pts/N` and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from pydantic import BaseModel, ConfigDict, Field

from device_profiles import CounterSim, DeviceProfileError, Profile, ProfilePoint, find_profile
from firmware_stubs import control, sim_process
from firmware_stubs.errors import BadValueError, SimulatorError, UnknownPointError
from firmware_stubs.lifecycle import PtyLinked, cancel_and_wait
from firmware_stubs.pty_line import PtyLine
from firmware_stubs.values import MovingPoint, PointValues
from protocols import hj212

log = structlog.get_logger(__name__)

_MAX_WALK_STEPS = 6000
_DECIMALS = 2  # loggers send fixed decimals; two fit every factor of the built-in profile


@dataclass(frozen=True, slots=True)
class Hj212Faults:
    """What goes wrong on the line; frame counts are used up one frame at a time."""

    bad_crc: int = 0
    truncate: int = 0
    garbage: int = 0  # random bytes sent once, before the next frame
    silent: bool = False
    clock_offset_s: float = 0.0


@dataclass(slots=True)
class _Window:
    """The samples of one minute-frame window, per point key."""

    start_wall: float
    samples: dict[str, list[float]] = field(default_factory=dict)


class Hj212StationSimulator(PtyLinked):
    """Push HJ 212 frames of one profiled station on a pseudo-terminal; an async context manager.

    `interval_s`: real-time frame period (None: no real-time frames); `minute_s`: minute-frame
    period (None: none; real loggers use 60). `symlink`: also make this symlink to the pty.
    """

    def __init__(self, profile: Profile, *, interval_s: float | None = 1.0,
                 minute_s: float | None = 60.0, mn: str = "FFS00000000000000000001",
                 pw: str = "123456", st: str = "22", tz: str = "Asia/Shanghai",
                 ack_requested: bool = False, seed: int = 0, symlink: str | Path | None = None,
                 control_host: str = "127.0.0.1", control_port: int | None = None) -> None:
        if profile.protocol != "hj212":
            raise SimulatorError(f"profile {profile.id!r} speaks {profile.protocol}, not hj212")
        if interval_s is None and minute_s is None:
            raise SimulatorError("give interval_s or minute_s: a station that sends nothing")
        for name, period in (("interval_s", interval_s), ("minute_s", minute_s)):
            if period is not None and not (math.isfinite(period) and period > 0):
                raise SimulatorError(f"{name} must be a positive number of seconds")
        self.profile = profile
        self.interval_s = interval_s
        self.minute_s = minute_s
        self.mn, self.pw, self.st = mn, pw, st
        self.tz = ZoneInfo(tz)
        self.ack_requested = ack_requested
        self._rng = random.Random(seed)
        # garbage has its own generator: what it holds must not depend on when it is sent
        self._garbage_rng = random.Random(seed ^ 0x6A6A)
        self._values = PointValues(profile.points, self._rng, max_walk_steps=_MAX_WALK_STEPS,
                                   shape=_rounded, counter_bits=_u32, phase_every_point=False)
        self._points = self._values.points
        self.faults = Hj212Faults()
        self._symlink = Path(symlink) if symlink is not None else None
        self._control_host = control_host
        self._requested_control_port = control_port
        self._control: asyncio.Server | None = None
        self._line: PtyLine | None = None
        self._task: asyncio.Task[None] | None = None
        self._replies = hj212.Hj212Decoder()
        self._t0 = time.monotonic()
        self.path = ""
        self.control_port: int | None = None
        self._stats: dict[str, int] = {"realtime": 0, "minute": 0, "silenced": 0, "bad_crc": 0,
                                       "truncated": 0, "garbage_bytes": 0, "unwritten": 0,
                                       "acks": 0, "skipped_ticks": 0}

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._open_line()
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._send_loop(), name=f"hj212_sim[{self.mn}]")
        self._control, self.control_port = await control.open_control(
            self, self._control_host, self._requested_control_port, self.handle_control)
        log.info("hj212_sim_started", path=self.path, profile=self.profile.id, mn=self.mn,
                 interval_s=self.interval_s, minute_s=self.minute_s,
                 control_port=self.control_port)

    async def stop(self) -> None:
        await control.close_control(self._control)
        self._control = None
        await cancel_and_wait(self._task)
        self._task = None
        if self._close_line():
            log.info("hj212_sim_stopped", path=self.path)

    # --- scripting --------------------------------------------------------------------------

    @property
    def profile_ids(self) -> dict[int, str]:
        return {1: self.profile.id}

    def seconds(self) -> float:
        """Seconds since the simulator started (what `counter` points count)."""
        return time.monotonic() - self._t0

    def set_value(self, point_key: str, value: Any, device_id: int = 1) -> None:
        """Pin a point to `value` until `clear_override()`."""
        self._lookup(device_id, point_key)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value)):
            raise BadValueError(f"{point_key}: an HJ 212 value is a finite number, not {value!r}")
        self._values.pin(point_key, float(value))

    def clear_override(self, point_key: str, device_id: int = 1) -> None:
        self._lookup(device_id, point_key)
        self._values.unpin(point_key)

    def get_value(self, point_key: str, device_id: int = 1) -> float | int:
        """The value a frame sent now would carry."""
        return self._value(self._lookup(device_id, point_key), self.seconds())

    def set_faults(self, faults: Hj212Faults | None = None, **changes: Any) -> None:
        """Replace the faults (`faults`), or change some of them (`bad_crc=1`, `silent=True`)."""
        base = faults if faults is not None else self.faults
        self.faults = dataclasses.replace(base, **changes) if changes else base
        log.info("hj212_sim_faults", faults=repr(self.faults))

    inject = set_faults

    def stats(self) -> dict[str, int]:
        """Frames sent per kind and faults applied so far."""
        return dict(self._stats)

    def _lookup(self, device_id: int, point_key: str) -> MovingPoint:
        sp = self._points.get(point_key)
        if device_id != 1 or sp is None:
            raise UnknownPointError(device_id, point_key)
        return sp

    # --- values -----------------------------------------------------------------------------

    def _value(self, sp: MovingPoint, elapsed: float) -> float | int:
        # the counter is a u32 like the registers of Modbus counters
        value = self._values.value(sp.point.key, at=elapsed, counted=elapsed + 1e-6)
        assert isinstance(value, float | int)
        return value

    def _station_time(self, wall: float) -> datetime:
        """Station local time, naive and whole seconds, as DataTime carries it."""
        when = datetime.fromtimestamp(wall + self.faults.clock_offset_s, self.tz)
        return when.replace(tzinfo=None, microsecond=0)

    # --- frames -----------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        periods = [p for p in (self.interval_s, self.minute_s) if p is not None]
        step = self.interval_s if self.interval_s is not None else min(periods)
        window = _Window(time.time())
        next_minute = self.minute_s
        k = 0
        while True:
            due = self._t0 + k * step
            now = time.monotonic()
            if now > due + step:  # the loop fell behind: skip the ticks it missed
                missed = math.floor((now - due) / step)
                self._stats["skipped_ticks"] += missed
                k += missed
                due = self._t0 + k * step
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            elapsed = k * step
            wall = time.time()
            values = {key: self._value(sp, elapsed) for key, sp in self._points.items()}
            for key, value in values.items():
                window.samples.setdefault(key, []).append(float(value))
            if self.interval_s is not None:
                self._send(hj212.CN_REALTIME, self._realtime_data(values, wall))
            k += 1
            if next_minute is not None and (k * step) >= next_minute - 1e-9:
                self._send(hj212.CN_MINUTE, self._minute_data(window))
                window = _Window(wall + step)
                next_minute += self.minute_s or 0.0

    def _realtime_data(self, values: dict[str, float | int], wall: float) -> hj212.Hj212Data:
        factors = tuple(
            hj212.Hj212Factor(sp.point.factor or "", rtd=values[key], flag="N")
            for key, sp in self._points.items()
        )
        return hj212.Hj212Data(self._station_time(wall), factors)

    def _minute_data(self, window: _Window) -> hj212.Hj212Data:
        factors = []
        for key, sp in self._points.items():
            samples = window.samples.get(key)
            if not samples or isinstance(sp.point.sim, CounterSim):
                continue  # a sample counter has no minute average
            avg = round(sum(samples) / len(samples), _DECIMALS)
            factors.append(hj212.Hj212Factor(sp.point.factor or "", avg=avg, min=min(samples),
                                             max=max(samples), flag="N"))
        # DataTime of a minute frame: the start of the window it sums up.
        return hj212.Hj212Data(self._station_time(window.start_wall), tuple(factors))

    def _send(self, cn: str, data: hj212.Hj212Data) -> None:
        kind = "realtime" if cn == hj212.CN_REALTIME else "minute"
        faults = self.faults
        if faults.silent:
            self._stats["silenced"] += 1
            return
        flag = (hj212.VERSION_2017 << 2) | (hj212.FLAG_ACK if self.ack_requested else 0)
        qn = hj212.make_qn(datetime.fromtimestamp(time.time() + faults.clock_offset_s, self.tz))
        frame = hj212.encode_frame(hj212.Hj212Frame(qn, self.st, cn, self.pw, self.mn, flag, data))
        out = b""
        changes: dict[str, Any] = {}
        if faults.garbage:
            out += bytes(self._garbage_rng.getrandbits(8) for _ in range(faults.garbage))
            self._stats["garbage_bytes"] += faults.garbage
            changes["garbage"] = 0
        if faults.bad_crc:
            crc_at = len(frame) - 6  # four hex digits before \r\n
            wrong = (int(frame[crc_at:crc_at + 4], 16) ^ 0x5A5A) & 0xFFFF
            frame = frame[:crc_at] + b"%04X" % wrong + frame[-2:]
            self._stats["bad_crc"] += 1
            changes["bad_crc"] = faults.bad_crc - 1
        elif faults.truncate:
            frame = frame[: len(frame) // 2]
            self._stats["truncated"] += 1
            changes["truncate"] = faults.truncate - 1
        if changes:
            self.faults = dataclasses.replace(faults, **changes)
        out += frame
        self._stats[kind] += 1
        self._write(out)

    def _write(self, data: bytes) -> None:
        if self._line is not None and not self._line.write(data):
            self._stats["unwritten"] += 1

    def _on_readable(self) -> None:
        """Read what the agent sends back (data replies to frames with the A flag)."""
        for frame in self._read_frames(self._replies, self._replies.next_frame, hj212.Hj212Error):
            if isinstance(frame, hj212.Hj212Frame) and frame.cn == hj212.CN_DATA_REPLY:
                self._stats["acks"] += 1

    # --- control channel --------------------------------------------------------------------

    def handle_control(self, line: bytes | str) -> dict[str, Any]:
        """One control request line (see the module doc); always a reply, never raises."""
        return control.handle_own_control(self, line, _Hj212Control, self._answer_own)

    def _answer_own(self, request: _Hj212Control) -> dict[str, Any]:
        if request.fault is not None:
            self.set_faults(**request.fault.model_dump(exclude_unset=True))
            return {"ok": True}
        return {"ok": True, "stats": self.stats()}


def _rounded(point: ProfilePoint, value: float | int | bool | str) -> float:
    """Loggers send fixed decimals (the loader allows only numbers on hj212 points)."""
    return round(float(value), _DECIMALS)


def _u32(point: ProfilePoint) -> int:
    return 32


class _FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bad_crc: int = Field(0, ge=0, le=10_000)
    truncate: int = Field(0, ge=0, le=10_000)
    garbage: int = Field(0, ge=0, le=4096)
    silent: bool = False
    clock_offset_s: float = Field(0.0, ge=-20 * 365 * 86400, le=20 * 365 * 86400)


_Hj212Control = control.FaultOrStats[_FaultRequest]


# --- process entry --------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = sim_process.simulator_parser(
        "hj212_sim", "Simulate an HJ 212-2017 station pushing frames on a pseudo-terminal.",
        "--profile forest-fire-station-v1 --link-file /tmp/ffs.link --interval 1 --minute 60 "
        "--control-port 0")
    parser.add_argument("--profile", required=True, help="hj212 profile id or YAML path")
    sim_process.add_profile_dir(parser)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between real-time (CN 2011) frames")
    parser.add_argument("--minute", type=float, default=60.0,
                        help="seconds between minute (CN 2051) frames; 0 sends none")
    parser.add_argument("--mn", default="FFS00000000000000000001", help="station MN")
    parser.add_argument("--ack", action="store_true", help="ask for data replies (Flag=5)")
    parser.add_argument("--symlink", type=Path, default=None,
                        help="also make this symlink to the pty (e.g. /tmp/ttyFFS0)")
    sim_process.add_pty_arguments(parser)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    profile = find_profile(args.profile, extra_dirs=args.profile_dir)
    sim = Hj212StationSimulator(profile, interval_s=args.interval,
                                minute_s=args.minute or None, mn=args.mn,
                                ack_requested=args.ack, seed=args.seed, symlink=args.symlink,
                                control_port=args.control_port)
    await sim_process.serve_until_signal(sim, sim_process.announce_pty(args.link_file))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on a bad profile or argument."""
    args = _parse_args(argv)
    return sim_process.run(_serve(args), (SimulatorError, DeviceProfileError, OSError))


__all__ = ["Hj212Faults", "Hj212StationSimulator", "main"]

if __name__ == "__main__":
    sys.exit(main())
