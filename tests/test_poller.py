"""The Modbus poller against a real simulator on loopback, writing into a real outbox."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from device_profiles import Profile, find_profile, load_profile
from edge_agent.config.site import DeviceConfig
from edge_agent.field.errors import ModbusExceptionError
from edge_agent.field.poller import DevicePoller, Health
from edge_agent.field.transports import ModbusTcpTransport
from edge_agent.outbox.store import NewRecord, Outbox
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from protocols.envelope import Flag, RecordKind


def _device(port: int, **kw: object) -> DeviceConfig:
    fields: dict[str, object] = {"id": "tank-1", "profile": "storage-tank-v1",
                                 "transport": {"kind": "tcp", "host": "127.0.0.1", "port": port},
                                 "poll_interval_s": 0.1, "timeout_s": 0.3, "backoff_max_s": 0.3}
    fields.update(kw)
    return DeviceConfig.model_validate(fields)


async def _wait(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


@pytest.fixture
def tank() -> Profile:
    return find_profile("storage-tank-v1")


async def test_cycle_appends_decoded_values_in_one_call(tmp_path: Path, tank: Profile) -> None:
    """One cycle reads every point, decodes it and appends all records in one outbox call."""
    async with ModbusTcpSimulator(tank) as sim, Outbox.open(tmp_path / "ob.db") as ob:
        sim.set_value("level", 7.25)
        sim.set_value("temperature", -3.5)
        calls: list[int] = []
        real_append = ob.append

        async def counting_append(records: Sequence) -> list[int]:  # type: ignore[type-arg]
            calls.append(len(records))
            return await real_append(records)

        ob.append = counting_append  # type: ignore[method-assign]
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=0.5)
        woken: list[bool] = []
        poller = DevicePoller(_device(sim.port), tank, transport, ob, notify=lambda: woken.append(True))
        try:
            result = await poller.poll_once()
        finally:
            await transport.close()
        latest = await ob.latest()

    assert calls == [6] and result.records == 6 and woken == [True]
    assert latest["tank-1/level"].value == 7.25
    assert latest["tank-1/temperature"].value == pytest.approx(-3.5)
    assert latest["tank-1/inlet_valve_open"].value is True
    assert latest["tank-1/level_high_high"].value is False
    assert isinstance(latest["tank-1/counter"].value, int)
    assert {r.kind for r in latest.values()} == {RecordKind.TELEMETRY}
    assert len({r.ts_ms for r in latest.values()}) == 1  # one timestamp per cycle
    assert abs(latest["tank-1/level"].ts_ms - time.time() * 1000) < 10_000
    assert poller.health.state is Health.OK and poller.health.reads == 3


async def test_counter_advances_between_cycles(tmp_path: Path, tank: Profile) -> None:
    """The loop keeps polling: the simulator's seconds counter shows up rising in the outbox."""
    async with ModbusTcpSimulator(tank) as sim, Outbox.open(tmp_path / "ob.db") as ob:
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=0.5)
        poller = DevicePoller(_device(sim.port, poll_interval_s=0.2), tank, transport, ob)
        task = asyncio.create_task(poller.run())
        try:
            await _wait(lambda: poller.health.cycles >= 1)
            first = (await ob.latest())["tank-1/counter"].value
            await _wait(lambda: poller.health.cycles >= 8, timeout=5)
            last = (await ob.latest())["tank-1/counter"].value
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await transport.close()
        stats = await ob.stats()
    assert isinstance(first, int) and isinstance(last, int) and last > first
    assert stats.last_seq == 6 * poller.health.cycles


async def test_bad_point_is_flagged_and_neighbours_survive(tmp_path: Path) -> None:
    """A point that decodes to NaN gets a BAD_QUALITY record with value None; others are fine."""
    served = tmp_path / "served.yaml"
    served.write_text(
        "id: nan-dev\nmodel: m\nname_zh: 设备\npoints:\n"
        "  - {key: raw, name: r, name_zh: 原始, function: 4, address: 0, type: u32,"
        " sim: {kind: constant, value: 2143289344}}\n"  # 0x7FC00000: a quiet NaN as f32
        "  - {key: good, name: g, name_zh: 好, function: 4, address: 2, type: u16,"
        " sim: {kind: constant, value: 42}}\n")
    polled = tmp_path / "polled.yaml"
    polled.write_text(
        "id: nan-dev\nmodel: m\nname_zh: 设备\npoints:\n"
        "  - {key: gas, name: g, name_zh: 气, function: 4, address: 0, type: f32}\n"
        "  - {key: good, name: g, name_zh: 好, function: 4, address: 2, type: u16}\n")
    async with ModbusTcpSimulator(load_profile(served)) as sim, Outbox.open(tmp_path / "ob.db") as ob:
        profile = load_profile(polled)
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=0.5)
        poller = DevicePoller(_device(sim.port, id="d1"), profile, transport, ob)
        try:
            result = await poller.poll_once()
        finally:
            await transport.close()
        batch = await ob.next_batch(10)
    by_point = {r.point: r for r in batch}
    assert result.decode_errors == 1
    assert by_point["d1/good"].value == 42 and by_point["d1/good"].flags == Flag.NONE
    bad = by_point["d1/gas"]
    assert bad.value is None and bad.flags & Flag.BAD_QUALITY
    assert bad.attrs and "nan" in str(bad.attrs["error"]).lower()
    assert poller.health.state is Health.DEGRADED and poller.health.decode_errors == 1


async def test_exception_response_skips_only_its_block(tmp_path: Path, tank: Profile) -> None:
    """A block the device refuses (illegal address) is counted; the other blocks are recorded."""
    polled = tmp_path / "extra.yaml"
    polled.write_text(
        "id: tank-plus\nmodel: m\nname_zh: 储罐\npoints:\n"
        "  - {key: level, name: l, name_zh: 液位, function: 4, address: 0, type: f32,"
        " word_order: little}\n"
        "  - {key: ghost, name: g, name_zh: 无, function: 3, address: 900, type: u16}\n")
    async with ModbusTcpSimulator(tank) as sim, Outbox.open(tmp_path / "ob.db") as ob:
        sim.set_value("level", 3.5)
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=0.5)
        poller = DevicePoller(_device(sim.port), load_profile(polled), transport, ob)
        try:
            result = await poller.poll_once()
            with pytest.raises(ModbusExceptionError) as refused:
                await transport.read(3, 900, 1, device_id=1)
        finally:
            await transport.close()
        latest = await ob.latest()
    assert refused.value.code == 2  # illegal data address, as the device said
    assert result.blocks_ok == 1 and result.blocks_failed == 1 and not result.offline
    assert latest["tank-1/level"].value == 3.5 and "tank-1/ghost" not in latest
    health = poller.health
    assert health.state is Health.DEGRADED and health.exceptions == 1


async def test_device_offline_logged_once_and_recovers(tmp_path: Path, tank: Profile) -> None:
    """Stopping the device logs poll_failed once, health goes offline; a restart on the same
    port logs poll_recovered once and records flow again."""
    sim = ModbusTcpSimulator(tank)
    await sim.start()
    port = sim.port
    async with Outbox.open(tmp_path / "ob.db") as ob:
        transport = ModbusTcpTransport("127.0.0.1", port, timeout_s=0.2)
        with capture_logs() as logs:
            poller = DevicePoller(_device(port), tank, transport, ob)
            task = asyncio.create_task(poller.run())
            try:
                await _wait(lambda: poller.health.cycles_ok >= 2)
                await sim.stop()
                await _wait(lambda: poller.health.consecutive_failures >= 4, timeout=10)
                assert poller.health.state is Health.OFFLINE
                records_while_down = poller.health.records
                await asyncio.sleep(0.3)
                assert poller.health.records == records_while_down  # nothing made up
                sim = ModbusTcpSimulator(tank, port=port)
                await sim.start()
                await _wait(lambda: poller.health.state is Health.OK, timeout=10)
                before = poller.health.records
                await _wait(lambda: poller.health.records > before)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await transport.close()
                await sim.stop()
    events = [e["event"] for e in logs if e.get("device") == "tank-1"]
    assert events.count("poll_failed") == 1
    assert events.count("poll_recovered") == 1
    assert events.index("poll_failed") < events.index("poll_recovered")
    health = poller.health
    assert health.timeouts + health.connect_errors >= 4
    assert health.consecutive_failures == 0 and health.last_ok_ms is not None


class _SlowFirstRead:
    """Fault injection: the real transport, with the first read delayed."""

    def __init__(self, inner: ModbusTcpTransport, delay: float) -> None:
        self.inner, self.delay, self.endpoint = inner, delay, inner.endpoint

    async def read(self, function: int, start: int, count: int, *, device_id: int) -> list[int]:
        if self.delay:
            await asyncio.sleep(self.delay)
            self.delay = 0
        return await self.inner.read(function, start, count, device_id=device_id)


async def test_overrun_skips_ticks_instead_of_bursting(tmp_path: Path, tank: Profile) -> None:
    """A cycle that overruns skips the missed ticks; the rate stays fixed (no burst, no drift)."""
    async with ModbusTcpSimulator(tank) as sim, Outbox.open(tmp_path / "ob.db") as ob:
        inner = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=1.0)
        poller = DevicePoller(_device(sim.port, poll_interval_s=0.1, timeout_s=1.0), tank,
                              _SlowFirstRead(inner, 0.35), ob)  # type: ignore[arg-type]
        started = time.monotonic()
        task = asyncio.create_task(poller.run())
        try:
            await asyncio.sleep(1.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await inner.close()
        elapsed = time.monotonic() - started
    health = poller.health
    assert health.skipped_cycles == 3  # ticks at 0.1, 0.2, 0.3 s were missed, not replayed
    # cycles run at 0.0, 0.4, 0.5 ... 0.9 s: no catch-up burst after the slow one
    expected = 1 + math.floor((elapsed - 0.4) / 0.1 + 1e-9) + 1
    assert expected - 2 <= health.cycles <= expected
    assert health.state is Health.OK


async def test_slow_points_are_read_less_often(tmp_path: Path) -> None:
    """`slow` points are read every `slow_every` cycles, `fast` ones every cycle."""
    profile_file = tmp_path / "tiers.yaml"
    profile_file.write_text(
        "id: tiers\nmodel: m\nname_zh: 分层\npoints:\n"
        "  - {key: quick, name: q, name_zh: 快, function: 4, address: 0, type: u16, poll: fast,"
        " sim: {kind: constant, value: 1}}\n"
        "  - {key: lazy, name: l, name_zh: 慢, function: 4, address: 50, type: u16, poll: slow,"
        " sim: {kind: constant, value: 2}}\n")
    profile = load_profile(profile_file)
    async with ModbusTcpSimulator(profile) as sim, Outbox.open(tmp_path / "ob.db") as ob:
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=0.5)
        poller = DevicePoller(_device(sim.port, id="t", slow_every=3), profile, transport, ob)
        try:
            for _ in range(6):
                await poller.poll_once()
        finally:
            await transport.close()
        batch = await ob.next_batch(100)
    points = [r.point for r in batch]
    assert points.count("t/quick") == 6
    assert points.count("t/lazy") == 2  # cycles 0 and 3


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    """capture_logs needs loggers that are not cached by an earlier configure()."""
    structlog.reset_defaults()


async def test_supervisor_restarts_a_crashed_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that raises is logged as task_crashed, counted and started again."""
    from edge_agent import agent as supervisor

    monkeypatch.setattr(supervisor, "RESTART_MIN_S", 0.01)
    runs: list[int] = []
    again = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        again.set()
        await asyncio.sleep(3600)

    runtime = supervisor.AgentRuntime(config=None, boot_id="b", started_ms=0)  # type: ignore[arg-type]
    with capture_logs() as logs:
        task = asyncio.create_task(supervisor._supervised("poll[x]", flaky, runtime))
        await asyncio.wait_for(again.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    crashes = [e for e in logs if e["event"] == "task_crashed"]
    assert len(crashes) == 2 and crashes[0]["task"] == "poll[x]"
    assert runtime.restarts == {"poll[x]": 2} and len(runs) == 3


async def test_full_outbox_is_counted_logged_once_and_polling_goes_on(tmp_path: Path,
                                                                       tank: Profile) -> None:
    """An append refused by a full outbox is counted in `outbox_full`, logged once, and the
    poller keeps polling instead of crashing its task."""
    async with ModbusTcpSimulator(tank) as sim, \
            Outbox.open(tmp_path / "ob.db", max_bytes=2**20) as ob:
        # Alarms only: nothing can be evicted. Once full, the outbox holds further alarms in
        # memory (append returns no seqs) and refuses telemetry (outbox_ring.py).
        for size, batch in ((200, 20), (1, 1)):
            for i in range(100_000):
                if await ob.append([NewRecord(RecordKind.ALARM, 1_800_000_000_000 + i, "d/p",
                                              "x" * size) for _ in range(batch)]) == []:
                    break
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=0.5)
        with capture_logs() as logs:
            poller = DevicePoller(_device(sim.port), tank, transport, ob)
            task = asyncio.create_task(poller.run())
            try:
                await _wait(lambda: poller.health.outbox_full >= 3)
                assert not task.done()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await transport.close()
    health = poller.health
    assert health.state is Health.OK and health.records == 0
    assert health.to_dict()["outbox_full"] == health.outbox_full >= 3
    assert [e["event"] for e in logs].count("poll_outbox_full") == 1
