"""HJ 212 source: reads a station's pushed HJ 212-2017 frames off a serial port into the outbox.

A forest-fire-risk station's data logger does not wait to be polled: it pushes a real-time
frame (CN 2011) every few seconds or minutes and minute/hour frames (CN 2051/2061). One
`Hj212Source` owns one serial port (pyserial opens it with `exclusive=True`, an flock, so a
second owner in any process fails to open it) and reads it from the event loop with
`loop.add_reader` on the non-blocking fd; nothing blocks the loop (the open itself runs in a
thread). Opening the port flushes what the line delivered before (pyserial resets the input
buffer): frames a logger sent while nobody listened are gone on a real line too. Bytes go
into the pure stream decoder (`protocols.hj212.Hj212Decoder`), which resynchronises on the
next `##` after garbage.

Each data frame becomes one telemetry record per factor, in ONE `append` call:
- point `"{device}/{point_key}"`, the point found by its factor code in the profile; factors
  the profile does not name are counted (`unknown_factors`) and logged once per code;
- value: `Rtd` for real-time frames; `Avg` (else `Rtd`, else `Cou`) for minute/hour/day frames,
  which also carry `attrs={"cn": "2051", "min": …, "max": …}`. Values are floats, as on the wire;
- ts: the frame's DataTime, station local time (default Asia/Shanghai, no DST), to UTC ms.
  DataTime more than `max_future_s` ahead of the gateway clock, or older than
  `realtime_max_age_s` (real-time frames) / `history_max_age_s` (others, which a logger may
  resend after an outage), is kept but flagged `Flag.CLOCK_SUSPECT` with `attrs["rx_ms"]`, the
  gateway's receive time, so central can correct it (DESIGN.md §4.7). A frame without DataTime
  takes the receive time;
- an `xxx-Flag` other than N (normal) or S (manual value) — D fault, F stopped, M maintenance,
  C calibration, T over range, B communication fault — gives `Flag.BAD_QUALITY` and
  `attrs["hj212_flag"]`.

Frames from another MN (when `mn` is set) are dropped and counted (`foreign_frames`); other
commands (not 2011/2051/2061/2031) are counted (`other_frames`) and ignored. A frame with the A
flag (Flag bit 0) gets the CN 9014 data reply the standard asks of the receiver, so that the
logger does not resend it.

Health has the shape of the poller's (`edge_agent.field.poller.DeviceHealth`): `ok` after a good
frame; `degraded` after a bad one (CRC, length or format; counted in `decode_errors` and, by
kind, in `stats`); `offline` when no good frame came for `silence_s` (default 3 × the station's
`interval_s`; counted in `timeouts`) or the port cannot be opened (`connect_errors`; it is
retried every `reopen_s`). Going offline and coming back are logged once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import serial
import structlog

from device_profiles import Profile, ProfilePoint
from edge_agent import EdgeError
from edge_agent.field.poller import DeviceHealth, Health
from edge_agent.outbox.store import NewRecord
from protocols.envelope import Flag, RecordKind
from protocols.hj212 import (
    CN_DAILY,
    CN_DATA_REPLY,
    CN_HOURLY,
    CN_MINUTE,
    CN_REALTIME,
    NEED_DATA,
    VERSION_2017,
    Hj212CrcError,
    Hj212Data,
    Hj212Decoder,
    Hj212Error,
    Hj212Factor,
    Hj212Frame,
    encode_frame,
)
from runtime.clock import now_ms
from runtime.counters import Counters
from runtime.serial import LineReader, LineSettings, PortLostError, SerialPortError, open_serial

log = structlog.get_logger(__name__)

DATA_CNS = frozenset({CN_REALTIME, CN_MINUTE, CN_HOURLY, CN_DAILY})
_GOOD_FLAGS = frozenset({"N", "S"})  # normal, manual value: the number stands


class Hj212SourceError(EdgeError):
    """Base of the HJ 212 source's errors."""


class Hj212PortError(Hj212SourceError, SerialPortError):
    """The serial port cannot be opened (missing, busy, owned by another reader)."""


class RecordSink(Protocol):
    """Where records go: the outbox, or the alarm-rules wrapper around it."""

    async def append(self, records: Sequence[NewRecord]) -> Any: ...


@dataclass(slots=True)
class Hj212Stats(Counters):
    """Counters of one source, beyond the poller-shaped health; `Hj212Source.stats` is a copy."""

    frames: int = 0  # good frames of our station, any command
    realtime_frames: int = 0
    history_frames: int = 0  # minute, hourly, daily
    other_frames: int = 0  # commands that carry no data
    foreign_frames: int = 0  # another MN
    crc_errors: int = 0
    format_errors: int = 0  # length and format errors (truncated, malformed)
    discarded_bytes: int = 0  # garbage between frames
    unknown_factors: int = 0
    clock_suspect: int = 0  # frames whose DataTime was implausible
    records: int = 0
    acks_sent: int = 0


@dataclass(slots=True)
class _Counts(Hj212Stats):
    """The stats and what `health` reports besides."""

    timeouts: int = 0
    connect_errors: int = 0
    consecutive_failures: int = 0
    last_ok_ms: int | None = None
    last_error: str | None = None


class Hj212Source:
    """Reads one HJ 212 station on one serial port into a record sink.

    `interval_s` is the station's real-time period (its `RtdInterval`); `mn`, when given,
    drops frames of other stations; `tz` is the zone of the station's clock.
    """

    def __init__(self, *, device: str, profile: Profile, port: str, baudrate: int = 9600,
                 bytesize: int = 8, parity: str = "N", stopbits: int = 1,
                 interval_s: float = 60.0, silence_s: float | None = None,
                 mn: str | None = None, tz: str = "Asia/Shanghai", max_future_s: float = 300.0,
                 realtime_max_age_s: float = 600.0, history_max_age_s: float = 30 * 86400.0,
                 reopen_s: float = 5.0, reply_acks: bool = True,
                 notify: Callable[[], object] | None = None,
                 wall_ms: Callable[[], int] = now_ms) -> None:
        if profile.protocol != "hj212":
            raise Hj212SourceError(f"profile {profile.id!r} speaks {profile.protocol}, not hj212")
        if interval_s <= 0:
            raise Hj212SourceError("interval_s must be positive")
        self.device = device
        self.profile = profile
        self.port = port
        self._line = LineSettings(baudrate, bytesize, parity, stopbits)
        self.interval_s = interval_s
        self.silence_s = silence_s if silence_s is not None else 3 * interval_s
        self.mn = mn
        self._tz = ZoneInfo(tz)
        self._max_future_ms = int(max_future_s * 1000)
        self._max_age_ms = {True: int(realtime_max_age_s * 1000),
                            False: int(history_max_age_s * 1000)}
        self.reopen_s = reopen_s
        self.reply_acks = reply_acks
        self._notify = notify
        self.now_ms = wall_ms
        self._points: dict[str, ProfilePoint] = {
            p.factor: p for p in profile.points if p.factor is not None
        }
        self._c = _Counts()
        self._state = Health.STARTING
        self._failing = False
        self._last_good = time.monotonic()
        self._warned: set[str] = set()
        self._connected = False
        self._log = log.bind(device=device, port=port)

    # --- status ---------------------------------------------------------------------------

    @property
    def health(self) -> DeviceHealth:
        c = self._c
        return DeviceHealth(
            device=self.device, state=self._state, cycles=c.frames + c.crc_errors
            + c.format_errors, cycles_ok=c.frames, reads=c.realtime_frames + c.history_frames,
            timeouts=c.timeouts, connect_errors=c.connect_errors,
            decode_errors=c.crc_errors + c.format_errors, records=c.records,
            consecutive_failures=c.consecutive_failures, last_ok_ms=c.last_ok_ms,
            last_error=c.last_error)

    @property
    def connected(self) -> bool:
        """True while the port is open (frames may still be missing: see `health`)."""
        return self._connected

    @property
    def stats(self) -> Hj212Stats:
        c = self._c
        return Hj212Stats(**{f.name: getattr(c, f.name) for f in dataclasses.fields(Hj212Stats)})

    # --- the loop -------------------------------------------------------------------------

    async def run(self, sink: RecordSink) -> None:
        """Read frames into `sink` until cancelled; reopen the port whenever it is lost."""
        self._log.info("hj212_source_started", interval_s=self.interval_s,
                       silence_s=self.silence_s, profile=self.profile.id, **self._line.kwargs())
        self._last_good = time.monotonic()
        try:
            while True:
                try:
                    port = await self._open()
                except Hj212PortError as exc:
                    self._port_failed(exc.reason)
                    await asyncio.sleep(self.reopen_s)
                    continue
                try:
                    reason = await self._session(port, sink)
                finally:
                    with contextlib.suppress(OSError, serial.SerialException):
                        port.close()
                self._port_failed(reason)
                await asyncio.sleep(self.reopen_s)
        finally:
            self._log.info("hj212_source_stopped")

    async def _open(self) -> serial.Serial:
        return await open_serial(self.port, Hj212PortError, **self._line.kwargs())

    async def _session(self, port: serial.Serial, sink: RecordSink) -> str:
        """Read the open port until it fails; returns why it ended."""
        loop = asyncio.get_running_loop()
        decoder = Hj212Decoder()
        with LineReader(port) as reader:
            self._connected = True
            self._log.info("hj212_port_open")
            try:
                while True:
                    try:
                        data = await self._next_chunk(reader, loop)
                    except PortLostError as exc:
                        return exc.reason
                    if data is None:
                        continue
                    before = decoder.discarded
                    decoder.feed(data)
                    records = self._drain(decoder, reader.fd)
                    self._c.discarded_bytes += decoder.discarded - before
                    if records:
                        await sink.append(records)
                        self._c.records += len(records)
                        if self._notify is not None:
                            self._notify()
            finally:
                self._connected = False

    async def _next_chunk(self, reader: LineReader, loop: asyncio.AbstractEventLoop
                          ) -> bytes | None:
        """The next chunk read, or None when the station went silent meanwhile; raises
        `PortLostError`."""
        deadline = None if self._state is Health.OFFLINE else self._last_good + self.silence_s
        try:
            # loop.time() and time.monotonic() need not share an origin: convert
            when = None if deadline is None else loop.time() + deadline - time.monotonic()
            async with asyncio.timeout_at(when):
                return await reader.read()
        except TimeoutError:
            self._went_silent()
            return None

    def _drain(self, decoder: Hj212Decoder, fd: int) -> list[NewRecord]:
        records: list[NewRecord] = []
        while True:
            try:
                frame = decoder.next_frame()
            except Hj212CrcError as exc:
                self._c.crc_errors += 1
                self._bad_frame(str(exc))
                continue
            except Hj212Error as exc:  # length or format
                self._c.format_errors += 1
                self._bad_frame(str(exc))
                continue
            if frame is NEED_DATA:
                return records
            ours = self.mn is None or frame.mn == self.mn
            if ours and frame.needs_ack and self.reply_acks and frame.qn is not None:
                self._reply(frame, fd)
            records += self.accept(frame)

    # --- frames ---------------------------------------------------------------------------

    def accept(self, frame: Hj212Frame) -> list[NewRecord]:
        """Take one decoded frame as received now: its records (none for frames that carry
        no data or come from another MN); updates health and counters."""
        if self.mn is not None and frame.mn != self.mn:
            self._c.foreign_frames += 1
            self._warn_once(f"mn:{frame.mn}", "hj212_foreign_station", mn=frame.mn)
            return []
        self._good_frame()
        if frame.cn not in DATA_CNS:
            self._c.other_frames += 1
            return []
        return self._records(frame, self.now_ms())

    def _records(self, frame: Hj212Frame, rx_ms: int) -> list[NewRecord]:
        realtime = frame.cn == CN_REALTIME
        if realtime:
            self._c.realtime_frames += 1
        else:
            self._c.history_frames += 1
        ts_ms, suspect = self._timestamp(frame.cp, rx_ms, realtime)
        if suspect:
            self._c.clock_suspect += 1
            self._warn_once("clock", "hj212_clock_suspect", data_time=str(frame.cp.data_time),
                            rx_ms=rx_ms)
        out: list[NewRecord] = []
        for factor in frame.cp.factors:
            point = self._points.get(factor.code)
            if point is None:
                self._c.unknown_factors += 1
                self._warn_once(f"factor:{factor.code}", "hj212_unknown_factor",
                                factor=factor.code)
                continue
            out.append(self._record(point, factor, frame.cn, ts_ms, rx_ms, suspect))
        return out

    def _record(self, point: ProfilePoint, factor: Hj212Factor, cn: str, ts_ms: int,
                rx_ms: int, suspect: bool) -> NewRecord:
        if cn == CN_REALTIME:
            value = _first(factor.rtd, factor.avg)
        else:
            value = _first(factor.avg, factor.rtd, factor.cou)
        flags = Flag.NONE
        attrs: dict[str, Any] = {}
        if cn != CN_REALTIME:
            attrs["cn"] = cn
            attrs.update({k: v for k, v in (("min", factor.min), ("max", factor.max),
                                             ("cou", factor.cou)) if v is not None})
        if suspect:
            flags |= Flag.CLOCK_SUSPECT
            attrs["rx_ms"] = rx_ms
        if factor.flag is not None and factor.flag not in _GOOD_FLAGS:
            flags |= Flag.BAD_QUALITY
            attrs["hj212_flag"] = factor.flag
        if value is None:
            flags |= Flag.BAD_QUALITY
        return NewRecord(kind=RecordKind.TELEMETRY, ts_ms=ts_ms,
                         point=f"{self.device}/{point.key}", value=value, flags=flags,
                         attrs=attrs or None)

    def _timestamp(self, cp: Hj212Data, rx_ms: int, realtime: bool) -> tuple[int, bool]:
        if cp.data_time is None:
            return rx_ms, False
        ts_ms = int(cp.data_time.replace(tzinfo=self._tz).timestamp() * 1000)
        suspect = (ts_ms - rx_ms > self._max_future_ms
                   or rx_ms - ts_ms > self._max_age_ms[realtime])
        return ts_ms, suspect

    def _reply(self, frame: Hj212Frame, fd: int) -> None:
        # HJ 212-2017 数据应答 (CN 9014): ST=91 (system interaction), the request's QN echoed.
        reply = Hj212Frame(frame.qn, "91", CN_DATA_REPLY, frame.pw, frame.mn,
                           VERSION_2017 << 2, Hj212Data())
        try:
            os.write(fd, encode_frame(reply))
            self._c.acks_sent += 1
        except OSError as exc:
            self._warn_once("ack", "hj212_reply_failed", error=str(exc))

    # --- health ---------------------------------------------------------------------------

    def _good_frame(self) -> None:
        c = self._c
        c.frames += 1
        c.consecutive_failures = 0
        c.last_ok_ms = self.now_ms()
        self._last_good = time.monotonic()
        self._state = Health.OK
        if self._failing:
            self._failing = False
            self._log.info("hj212_recovered")

    def _bad_frame(self, error: str) -> None:
        c = self._c
        c.consecutive_failures += 1
        c.last_error = error
        if self._state is not Health.OFFLINE:
            self._state = Health.DEGRADED
        self._log.debug("hj212_bad_frame", error=error)

    def _went_silent(self) -> None:
        self._c.timeouts += 1
        self._offline(f"no frame for {self.silence_s:g} s")

    def _port_failed(self, reason: str) -> None:
        self._c.connect_errors += 1
        self._offline(reason)

    def _offline(self, reason: str) -> None:
        self._c.last_error = reason
        self._state = Health.OFFLINE
        if not self._failing:
            self._failing = True
            self._log.warning("hj212_offline", error=reason)

    def _warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._log.warning(event, **fields)


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


__all__ = ["DATA_CNS", "Hj212PortError", "Hj212Source", "Hj212SourceError", "Hj212Stats",
           "RecordSink"]
