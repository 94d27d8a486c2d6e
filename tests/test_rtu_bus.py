"""Modbus RTU on a real pseudo-terminal: the agent's SerialBus and pollers against the RTU bus
simulator, with faults injected into the simulated slaves."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from device_profiles import find_profile
from edge_agent.cli.devices import framing_text
from edge_agent.config.site import ConfigError, DeviceConfig, RtuTransportConfig, parse_config
from edge_agent.field.bus import BusDevice, SerialBus
from edge_agent.field.errors import (
    ModbusExceptionError,
    TransportCrcError,
    TransportFramingError,
    TransportTimeoutError,
)
from edge_agent.field.poller import DevicePoller, Health
from edge_agent.field.transports import TransportPool
from edge_agent.outbox.store import Outbox
from firmware_stubs.rtu_sim import RtuBusSimulator
from tests.helpers import python_env

ROOT = Path(__file__).resolve().parent.parent
GAS, TANK = find_profile("gas-detector-v1"), find_profile("storage-tank-v1")
BAUD = 38400


def _device(n: int, path: str, **kw: object) -> DeviceConfig:
    fields: dict[str, object] = {
        "id": f"dev-{n}", "profile": (GAS if n != 2 else TANK).id, "device_id": n,
        "transport": {"kind": "rtu", "port": path, "baudrate": BAUD},
        "poll_interval_s": 0.2, "timeout_s": 0.1, "backoff_max_s": 1.0}
    fields.update(kw)
    return DeviceConfig.model_validate(fields)


@asynccontextmanager
async def _pollers(tmp_path: Path, sim: RtuBusSimulator,
                   ids: tuple[int, ...] = (1, 2, 3)) -> AsyncIterator[tuple[list[DevicePoller], SerialBus, Outbox]]:
    pool = TransportPool()
    async with Outbox.open(tmp_path / "outbox.db") as ob:
        pollers = []
        for n in ids:
            dev = _device(n, sim.path)
            transport = pool.get(dev.transport, timeout_s=dev.timeout_s)
            pollers.append(DevicePoller(dev, GAS if n != 2 else TANK, transport, ob))
        (bus,) = pool.serial_buses()
        try:
            yield pollers, bus, ob
        finally:
            await pool.close()


async def _at(t0: float, offset: float) -> None:
    await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))


async def test_silent_slave_does_not_slow_the_others(tmp_path: Path) -> None:
    """With slave 3 silent, slaves 1 and 2 keep their poll rate; 3 goes offline, then recovers."""
    async with RtuBusSimulator([GAS, TANK, GAS], baudrate=BAUD) as sim, \
            _pollers(tmp_path, sim) as (pollers, bus, ob):
        with capture_logs() as logs:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(p.run()) for p in pollers]
                t0 = time.monotonic()
                await _at(t0, 0.4)
                c0 = [p.health.cycles_ok for p in pollers]
                await _at(t0, 2.4)
                c1 = [p.health.cycles_ok for p in pollers]
                sim.set_faults(3, silent=True)
                await _at(t0, 2.6)
                c2 = [p.health.cycles_ok for p in pollers]
                records3 = pollers[2].health.records
                await _at(t0, 6.6)
                c3 = [p.health.cycles_ok for p in pollers]
                silent_state, silent_records = pollers[2].health.state, pollers[2].health.records
                silent_timeouts = bus.stats(3).timeouts
                sim.set_faults(3, silent=False)
                await _at(t0, 8.0)
                for t in tasks:
                    t.cancel()
        latest = await ob.latest()

    for i in (0, 1):
        before = (c1[i] - c0[i]) / 2.0
        during = (c3[i] - c2[i]) / 4.0
        assert before == pytest.approx(5.0, rel=0.2)  # 0.2 s interval
        assert during == pytest.approx(before, rel=0.2), (i, before, during)
        health = pollers[i].health
        # healthy all along; a stray late reply on a loaded 2-core CI box may cost one cycle
        assert health.state is Health.OK and health.timeouts <= 2 and health.skipped_cycles <= 2
    assert silent_state is Health.OFFLINE and silent_records == records3
    # One probe per back-off period (0.2, 0.4, 0.8, then 1 s), not one per 0.2 s cycle.
    assert 3 <= silent_timeouts <= 8
    p3 = pollers[2].health
    assert p3.state is Health.OK and p3.records > silent_records
    events = [(e["event"], e.get("device")) for e in logs]
    assert events.count(("poll_failed", "dev-3")) == 1
    assert events.count(("poll_recovered", "dev-3")) == 1
    assert ("poll_failed", "dev-1") not in events and ("poll_failed", "dev-2") not in events
    assert {"dev-1/gas_lel", "dev-2/level", "dev-3/counter"} <= set(latest)


async def test_crc_errors_are_counted_and_retried(tmp_path: Path) -> None:
    """A slave answering with a bad CRC fails fast (no timeout), is retried once and counted."""
    async with RtuBusSimulator([GAS, TANK], baudrate=BAUD) as sim, \
            SerialBus(sim.path, baudrate=BAUD, timeout_s=5.0) as bus:
        assert len(await bus.read(4, 0, 4, device_id=2)) == 4
        sim.set_faults(2, bad_crc=True)
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(TransportCrcError):
                await bus.read(4, 0, 4, device_id=2)
        elapsed = time.monotonic() - started
        sim.set_faults(2, bad_crc=False)
        assert len(await bus.read(4, 0, 4, device_id=2)) == 4
        stats, other = bus.stats(2), bus.stats(1)
    assert elapsed < 5.0  # six bad answers did not cost a single 5 s timeout
    assert (stats.crc_errors, stats.requests, stats.timeouts) == (6, 8, 0)
    assert sim.stats(2).answers == 8
    assert other.requests == 0


async def test_exception_codes_are_counted_per_code(tmp_path: Path) -> None:
    """Exception answers are counted by code; the poller marks the device degraded, not offline."""
    async with RtuBusSimulator([GAS, TANK], baudrate=BAUD) as sim, \
            _pollers(tmp_path, sim, ids=(1, 2)) as (pollers, bus, _ob):
        with pytest.raises(ModbusExceptionError) as info:
            await bus.read(4, 500, 2, device_id=1)  # outside the profile's registers
        assert info.value.code == 2
        sim.set_faults(2, exception_code=4)
        result = await pollers[1].poll_once()
        stats = bus.stats(2)
    assert bus.stats(1).exceptions == {2: 1}
    assert stats.exceptions == {4: result.blocks_failed} and result.blocks_failed >= 1
    assert stats.timeouts == stats.crc_errors == 0
    assert not result.offline and pollers[1].health.state is Health.DEGRADED


async def test_garbage_and_silence_are_told_apart(tmp_path: Path) -> None:
    """Noise instead of an answer is a framing error; no bytes at all is a timeout."""
    async with RtuBusSimulator([GAS], baudrate=BAUD) as sim, \
            SerialBus(sim.path, baudrate=BAUD, timeout_s=0.1) as bus:
        sim.set_faults(1, silent=True)
        with pytest.raises(TransportTimeoutError):
            await bus.read(4, 0, 2, device_id=1)
        sim.set_faults(1, garbage=9)
        with pytest.raises(TransportFramingError):
            await bus.read(4, 0, 2, device_id=1)
        sim.clear_faults()
        assert len(await bus.read(4, 0, 2, device_id=1)) == 2
        stats = bus.stats(1)
    assert (stats.timeouts, stats.framing_errors, stats.consecutive_failures) == (1, 1, 0)


async def test_slow_slave_answers_late_without_confusing_the_next(tmp_path: Path) -> None:
    """A slow answer within the timeout succeeds; one past it times out, and when it lands
    during the next slave's request it is skipped as a stray frame, not taken as the answer."""
    async with RtuBusSimulator([GAS, TANK], baudrate=BAUD) as sim, \
            SerialBus(sim.path, baudrate=BAUD, timeout_s=0.15) as bus:
        sim.set_faults(1, delay_s=0.08)
        started = time.monotonic()
        assert len(await bus.read(4, 0, 2, device_id=1)) == 2
        slow = time.monotonic() - started
        sim.set_faults(1, delay_s=0.2)
        with pytest.raises(TransportTimeoutError):
            await bus.read(4, 0, 2, device_id=1)
        sim.set_faults(2, delay_s=0.1)  # slave 1's late answer lands while we wait for 2
        regs = await bus.read(4, 0, 4, device_id=2)
        sim.clear_faults()
    assert slow >= 0.08 and len(regs) == 4
    assert bus.stats(1).timeouts == 1 and bus.stats(2).timeouts == 0
    assert bus.stray_frames == 1 and bus.stats(2).framing_errors == 0  # late, not wrong


@pytest.mark.parametrize(("how", "reason"), [
    ("short", "short_frame"), ("wrong_unit", "wrong_unit"),
    ("wrong_function", "wrong_function"), ("lying_count", "lying_byte_count"),
    ("few_registers", "too_few_registers")])
async def test_a_wrong_answer_is_a_framing_error_with_its_reason(
        tmp_path: Path, how: str, reason: str) -> None:
    """An answer that arrives but is wrong is a framing error with its reason, never a timeout."""
    async with RtuBusSimulator([GAS, GAS], baudrate=BAUD) as sim, \
            SerialBus(sim.path, baudrate=BAUD, timeout_s=0.2) as bus:
        sim.set_faults(1, wrong_answer=how)
        with pytest.raises(TransportFramingError) as info:
            await bus.read(4, 0, 4, device_id=1)
        sim.clear_faults()
        assert len(await bus.read(4, 0, 4, device_id=1)) == 4
        stats = bus.stats(1)
    assert info.value.reason == reason
    assert (stats.timeouts, stats.framing_errors, stats.framing_reasons) == (0, 1, {reason: 1})
    assert stats.to_dict()["framing_reasons"] == {reason: 1}


async def test_poller_counts_a_wrong_unit_as_framing_and_devices_shows_why(tmp_path: Path) -> None:
    """The poller counts a wrong answer as a framing error, not a timeout, and the devices
    table names the reason."""
    async with RtuBusSimulator([GAS, TANK], baudrate=BAUD) as sim, \
            _pollers(tmp_path, sim, ids=(1,)) as (pollers, bus, _ob):
        sim.set_faults(1, wrong_answer="wrong_unit")
        result = await pollers[0].poll_once()
        health = pollers[0].health
        counters = bus.stats(1).to_dict()
    assert result.offline and health.framing_errors == 1 and health.timeouts == 0
    assert "answer from unit 2" in (health.last_error or "")
    assert framing_text(counters) == "1 (wrong_unit 1)"


async def test_bus_keeps_the_inter_frame_gap(tmp_path: Path) -> None:
    """Back-to-back requests from two pollers reach the line at least the gap apart."""
    async with RtuBusSimulator([GAS, TANK], baudrate=BAUD, wire_time=False) as sim, \
            SerialBus(sim.path, baudrate=BAUD, inter_frame_gap_s=0.03, timeout_s=0.5) as bus:
        one, two = bus.view(timeout_s=0.5), bus.view(timeout_s=0.5)

        async def hammer(link: BusDevice, device_id: int) -> None:
            for _ in range(5):
                await link.read(4, 0, 2, device_id=device_id)

        await asyncio.gather(hammer(one, 1), hammer(two, 2))
    times = [t for t, _ in sim.request_log]
    order = [a for _, a in sim.request_log]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 10 and min(gaps) >= 0.03
    assert order[:4] == [1, 2, 1, 2]  # FIFO: the two devices take turns


def test_rtu_config_default_gap_and_shared_port_checks(tmp_path: Path) -> None:
    """The gap defaults to t3.5 of the baud rate; devices on one port must agree and not clash."""
    assert RtuTransportConfig(kind="rtu").gap_s == pytest.approx(3.5 * 10 / 9600)
    assert RtuTransportConfig(kind="rtu", baudrate=115200).gap_s == 0.00175
    assert RtuTransportConfig(kind="rtu", inter_frame_gap_s=0.01).gap_s == 0.01
    head = '[gateway]\nid = "gw-1"\n'
    dev = ('[[devices]]\nid = "{id}"\nprofile = "gas-detector-v1"\ndevice_id = {addr}\n'
           'transport = {{ kind = "rtu", port = "/dev/ttyS1", baudrate = {baud} }}\n')
    ok = parse_config(head + dev.format(id="a", addr=1, baud=9600) + dev.format(id="b", addr=2, baud=9600))
    assert [d.transport.endpoint for d in ok.devices] == ["rtu:///dev/ttyS1"] * 2
    with pytest.raises(ConfigError) as clash:
        parse_config(head + dev.format(id="a", addr=1, baud=9600) + dev.format(id="b", addr=1, baud=19200))
    issues = {(i.field, i.line) for i in clash.value.issues}
    assert ("devices[1].transport", 12) in issues and ("devices[1].device_id", 11) in issues
    with pytest.raises(ConfigError) as bad:
        parse_config(head + dev.format(id="a", addr=1, baud=9600).replace('"rtu"', '"rtu", parity = "X"'))
    assert bad.value.field == "devices[0].transport.parity"


async def test_simulator_process_with_link_file_and_control_port(tmp_path: Path) -> None:
    """`python -m firmware_stubs.rtu_sim` writes its pty path and takes faults over JSON lines."""
    link = tmp_path / "bus.link"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_stubs.rtu_sim", "--profile", "gas-detector-v1",
         "--profile", "storage-tank-v1", "--baudrate", str(BAUD), "--link-file", str(link),
         "--control-port", "0"],
        cwd=ROOT, env=python_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = await asyncio.to_thread(proc.stdout.readline)
        fields = dict(kv.split("=", 1) for kv in ready.split()[1:])
        path = link.read_text().strip()
        assert ready.startswith("READY ") and fields["path"] == path
        reader, writer = await asyncio.open_connection("127.0.0.1", int(fields["control_port"]))

        async def control(request: dict[str, object]) -> dict[str, object]:
            writer.write(json.dumps(request).encode() + b"\n")
            return json.loads(await reader.readline())

        async with SerialBus(path, baudrate=BAUD, timeout_s=0.2) as bus:
            assert (await control({"set": {"device_id": 2, "point": "level", "value": 3.5}}))["ok"]
            assert await bus.read(4, 0, 2, device_id=2)
            assert (await control({"fault": {"device_id": 2, "silent": True}}))["ok"]
            with pytest.raises(TransportTimeoutError):
                await bus.read(4, 0, 2, device_id=2)
            assert (await control({"fault": {"device_id": 2}}))["ok"]
            assert await bus.read(4, 0, 2, device_id=2)
            reply = await control({"stats": {}})
            bad = await control({"fault": {"device_id": 2, "exception_code": 0}})
        writer.close()
        await writer.wait_closed()
    finally:
        proc.terminate()
        rc = await asyncio.to_thread(proc.wait, 10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert reply["stats"] == {"1": {"requests": 0, "answers": 0},  # type: ignore[index]
                              "2": {"requests": 3, "answers": 2}}
    assert bad["ok"] is False and rc == 0
