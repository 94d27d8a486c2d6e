"""HJ 212 station simulator on a real pty → Hj212Source → a real SQLite outbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from device_profiles import find_profile
from edge_agent.field.hj212_source import Hj212Source, Hj212SourceError
from edge_agent.field.poller import Health
from edge_agent.outbox.store import Outbox
from firmware_stubs.errors import SimulatorError
from firmware_stubs.hj212_sim import Hj212StationSimulator
from protocols.envelope import Flag, Record, RecordKind
from protocols.hj212 import (
    CN_MINUTE,
    CN_REALTIME,
    NEED_DATA,
    Hj212Data,
    Hj212Decoder,
    Hj212Error,
    Hj212Factor,
    Hj212Frame,
)
from tests.helpers import python_env, until, wait_for

STATION = find_profile("forest-fire-station-v1")
DEVICE = "ffs-1"


@contextlib.asynccontextmanager
async def running(source: Hj212Source, sink: Any,
                  sim: Hj212StationSimulator | None = None) -> AsyncIterator[asyncio.Task[None]]:
    """Run the source in a task for the block, then cancel it.

    With `sim` (started silent), the station starts talking once the port is open: opening a
    port flushes what came before, and the tests count every frame sent.
    """
    task = asyncio.create_task(source.run(sink), name="hj212_source")
    try:
        if sim is not None:
            await until(lambda: source.connected, what="the port to open")
            sim.set_faults(silent=False)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox.open(tmp_path / "o.db") as ob:
        yield ob


async def records(ob: Outbox) -> list[Record]:
    return await ob.next_batch(100_000)


async def records_soon(ob: Outbox, timeout: float = 5.0) -> list[Record]:
    """The outbox's records once there are any; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (got := await records(ob)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no records in the outbox after {timeout}s")
        await asyncio.sleep(0.02)
    return got


async def test_records_arrive_with_points_values_and_times(outbox: Outbox) -> None:
    """Real-time and minute frames land as one record per factor, with values, DataTime and acks."""
    async with Hj212StationSimulator(STATION, interval_s=0.25, minute_s=0.75,
                                     ack_requested=True, seed=3) as sim:
        sim.set_faults(silent=True)
        sim.set_value("air_temp", 23.45)
        sim.set_value("humidity", 18.5)
        source = Hj212Source(device=DEVICE, profile=STATION, port=sim.link_path,
                             interval_s=0.25, mn=sim.mn)
        async with running(source, outbox, sim):
            await until(lambda: source.stats.realtime_frames >= 4
                        and source.stats.history_frames >= 1, what="frames")
            sim.set_faults(silent=True)
            await asyncio.sleep(0.3)  # the last frame in flight lands
        got = await records(outbox)
        stats = sim.stats()
    assert source.stats.realtime_frames == stats["realtime"]
    assert source.stats.history_frames == stats["minute"]
    assert source.stats.crc_errors == source.stats.format_errors == 0
    assert source.health.state is Health.OK and source.health.decode_errors == 0
    assert stats["acks"] == source.stats.acks_sent == stats["realtime"] + stats["minute"]
    realtime = [r for r in got if not r.attrs or "cn" not in r.attrs]
    minute = [r for r in got if r.attrs and r.attrs.get("cn") == CN_MINUTE]
    keys = {p.key for p in STATION.points}
    assert {r.point for r in realtime} == {f"{DEVICE}/{k}" for k in keys}
    assert len(realtime) == len(keys) * stats["realtime"]
    # a minute frame carries every factor but the sample counter, with avg, min and max
    assert {r.point for r in minute} == {f"{DEVICE}/{k}" for k in keys - {"counter"}}
    assert all({"min", "max"} <= set(r.attrs or {}) for r in minute)
    assert all(r.kind is RecordKind.TELEMETRY and r.flags is Flag.NONE for r in got)
    assert {r.value for r in got if r.point == f"{DEVICE}/air_temp"} == {23.45}
    assert {r.value for r in got if r.point == f"{DEVICE}/humidity"} == {18.5}
    counters = [r.value for r in realtime if r.point == f"{DEVICE}/counter"]
    assert counters == sorted(counters) and counters[-1] - counters[0] <= len(counters)
    wind = [r.value for r in realtime if r.point == f"{DEVICE}/wind_speed"]
    assert all(isinstance(v, float) and 0 <= v <= 7 for v in wind)
    now_ms = time.time() * 1000
    for r in realtime:  # DataTime is Shanghai local time, whole seconds, converted to UTC
        assert r.ts_ms % 1000 == 0 and now_ms - 5000 < r.ts_ms <= now_ms


async def test_bad_crc_garbage_and_truncation_counted_good_frames_land(outbox: Outbox) -> None:
    """A bad-CRC frame, garbage and a cut-off frame are counted; every good frame still lands."""
    async with Hj212StationSimulator(STATION, interval_s=0.2, minute_s=None, seed=5) as sim:
        sim.set_faults(silent=True)
        source = Hj212Source(device=DEVICE, profile=STATION, port=sim.link_path,
                             interval_s=0.2)
        async with running(source, outbox, sim):
            await until(lambda: source.stats.realtime_frames >= 2, what="first frames")
            sim.inject(bad_crc=1, garbage=64)
            await until(lambda: source.stats.crc_errors == 1, what="the bad CRC")
            assert source.health.state is Health.DEGRADED
            ok_before = source.stats.realtime_frames
            await until(lambda: source.stats.realtime_frames >= ok_before + 2, what="recovery")
            assert source.health.state is Health.OK
            sim.inject(truncate=1)
            await until(lambda: source.stats.format_errors == 1, what="the cut-off frame")
            ok_before = source.stats.realtime_frames
            await until(lambda: source.stats.realtime_frames >= ok_before + 2, what="recovery")
            sim.set_faults(silent=True)
            await asyncio.sleep(0.3)
        stats = sim.stats()
        got = await records(outbox)
    assert stats["bad_crc"] == 1 and stats["truncated"] == 1
    assert source.stats.realtime_frames == stats["realtime"] - 2  # all but the two spoilt ones
    assert source.stats.discarded_bytes >= 64
    health = source.health
    assert health.decode_errors == 2 and health.cycles == stats["realtime"]
    counters = [r.value for r in got if r.point == f"{DEVICE}/counter"]
    assert len(counters) == source.stats.realtime_frames
    assert len(got) == len(STATION.points) * source.stats.realtime_frames


async def test_silence_goes_offline_then_back(outbox: Outbox) -> None:
    """No frame for 3× the interval makes the device offline; the next frame brings it back."""
    async with Hj212StationSimulator(STATION, interval_s=0.2, minute_s=None) as sim:
        source = Hj212Source(device=DEVICE, profile=STATION, port=sim.link_path,
                             interval_s=0.2)
        async with running(source, outbox):
            await until(lambda: source.health.state is Health.OK, what="first frame")
            sim.set_faults(silent=True)
            started = time.monotonic()
            await until(lambda: source.health.state is Health.OFFLINE, what="offline")
            assert time.monotonic() - started >= 0.4  # 3 × 0.2 s after the last frame
            assert source.health.timeouts == 1 and "no frame" in (source.health.last_error or "")
            await asyncio.sleep(0.8)
            assert source.health.timeouts == 1  # offline is one episode, not one per period
            frames = source.stats.frames
            sim.set_faults(silent=False)
            await until(lambda: source.health.state is Health.OK, what="back online")
            assert source.stats.frames > frames and source.health.consecutive_failures == 0


async def test_wrong_station_clock_is_flagged_and_kept(outbox: Outbox) -> None:
    """A station clock days behind gives CLOCK_SUSPECT records with the receive time beside."""
    async with Hj212StationSimulator(STATION, interval_s=0.2, minute_s=None) as sim:
        sim.set_faults(clock_offset_s=-3 * 86400)
        source = Hj212Source(device=DEVICE, profile=STATION, port=sim.link_path,
                             interval_s=0.2)
        async with running(source, outbox):
            # The frame is counted before its records are committed: wait for the records.
            got = await records_soon(outbox)
    assert got and all(r.flags & Flag.CLOCK_SUSPECT for r in got)
    for r in got:
        assert r.attrs is not None and abs(r.attrs["rx_ms"] - r.ts_ms - 3 * 86400_000) < 5000
    assert source.stats.clock_suspect == source.stats.realtime_frames


async def test_one_owner_per_port_and_port_loss(outbox: Outbox) -> None:
    """A second reader of the same port cannot open it; a vanished port makes the source offline."""
    async with Hj212StationSimulator(STATION, interval_s=0.2, minute_s=None) as sim:
        first = Hj212Source(device=DEVICE, profile=STATION, port=sim.link_path,
                            interval_s=0.2, reopen_s=0.1)
        second = Hj212Source(device="ffs-2", profile=STATION, port=sim.link_path,
                             interval_s=0.2, reopen_s=0.1)
        async with running(first, outbox):
            await until(lambda: first.health.state is Health.OK, what="first owner")
            async with running(second, outbox):
                await until(lambda: second.health.connect_errors >= 1, what="refusal")
                assert second.health.state is Health.OFFLINE
                assert first.health.state is Health.OK
            await sim.stop()  # the pty goes away, as a USB adapter that is pulled
            await until(lambda: first.health.state is Health.OFFLINE, what="port loss")
            await until(lambda: first.health.connect_errors >= 2, what="retries")


def test_frame_contents_become_flags_and_counts() -> None:
    """Fault flags give BAD_QUALITY, unknown factors are counted, other MNs are dropped."""
    source = Hj212Source(device=DEVICE, profile=STATION, port="/dev/null", mn="MN-1",
                         wall_ms=lambda: 1_700_000_000_000)
    when = datetime.fromtimestamp(1_700_000_000, ZoneInfo("Asia/Shanghai")).replace(tzinfo=None)
    data = Hj212Data(when, (Hj212Factor("a01001", rtd=21.5, flag="D"),
                            Hj212Factor("a01007", rtd=3.25, flag="N"),
                            Hj212Factor("w01018", rtd=7.0)))
    frame = Hj212Frame("20231115062000000", "22", CN_REALTIME, "123456", "MN-1", 4, data)
    out = source.accept(frame)
    assert [(r.point, r.value, r.ts_ms) for r in out] == [
        (f"{DEVICE}/air_temp", 21.5, 1_700_000_000_000),
        (f"{DEVICE}/wind_speed", 3.25, 1_700_000_000_000)]
    assert out[0].flags is Flag.BAD_QUALITY and out[0].attrs == {"hj212_flag": "D"}
    assert out[1].flags is Flag.NONE and out[1].attrs is None
    assert source.stats.unknown_factors == 1
    foreign = Hj212Frame(None, "22", CN_REALTIME, "123456", "MN-2", 4, data)
    assert source.accept(foreign) == [] and source.stats.foreign_frames == 1
    hourly = Hj212Frame(None, "22", "2061", "123456", "MN-1", 4,
                        Hj212Data(when, (Hj212Factor("x01001", cou=4.5, flag="N"),)))
    (rain,) = source.accept(hourly)
    assert rain.value == 4.5 and rain.attrs == {"cn": "2061", "cou": 4.5}


async def test_modbus_profile_is_refused() -> None:
    """Neither the station simulator nor the source takes a Modbus profile."""
    gas = find_profile("gas-detector-v1")
    with pytest.raises(SimulatorError, match="not hj212"):
        Hj212StationSimulator(gas)
    with pytest.raises(Hj212SourceError, match="not hj212"):
        Hj212Source(device="d", profile=gas, port="/dev/null")


def read_frames(path: str, want: int, timeout: float = 10.0) -> list[Hj212Frame | Hj212Error]:
    """Open the pty like an agent would and decode `want` frames or errors off it."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        decoder = Hj212Decoder()
        out: list[Hj212Frame | Hj212Error] = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            decoder.feed(os.read(fd, 4096))
            while True:
                try:
                    frame = decoder.next_frame()
                except Hj212Error as exc:
                    out.append(exc)
                    continue
                if frame is NEED_DATA:
                    break
                out.append(frame)
        return out
    finally:
        os.close(fd)


def test_simulator_process_link_file_and_control(tmp_path: Path) -> None:
    """`python -m firmware_stubs.hj212_sim` writes the link file, sends frames, takes faults."""
    link = tmp_path / "ffs.link"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_stubs.hj212_sim", "--profile",
         "forest-fire-station-v1", "--link-file", str(link), "--interval", "0.2",
         "--minute", "0", "--control-port", "0"],
        env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline() if proc.stdout else ""
        assert ready.startswith("READY path=/dev/"), ready
        control_port = int(ready.split("control_port=")[1])
        path = wait_for(lambda: link.exists() and link.read_text().strip(), what="link file")
        first = read_frames(path, 2)
        assert all(isinstance(f, Hj212Frame) and f.cn == CN_REALTIME for f in first)
        with socket.create_connection(("127.0.0.1", control_port), timeout=5) as s, \
                s.makefile("rb") as lines:
            s.sendall(b'{"fault": {"bad_crc": 1}}\n{"stats": {}}\n{"get": {"point": "counter"}}\n'
                      b'{"fault": {"bad_crc": -1}}\n')
            replies = [json.loads(lines.readline()) for _ in range(4)]
        assert replies[0] == {"ok": True}
        assert replies[1]["ok"] and replies[1]["stats"]["realtime"] >= 2
        assert replies[2]["ok"] and replies[2]["value"] >= 0
        assert replies[3]["ok"] is False and "bad request" in replies[3]["error"]
        later = read_frames(path, 4)
        assert any(isinstance(f, Hj212Error) for f in later)
        assert any(isinstance(f, Hj212Frame) for f in later)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
