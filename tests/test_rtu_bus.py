"""Modbus RTU on a real pseudo-terminal: the agent's SerialBus and pollers against the RTU bus
simulator, with faults injected into the simulated slaves."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
    TransportError,
    TransportFramingError,
    TransportTimeoutError,
)
from edge_agent.field.poller import DevicePoller, Health
from edge_agent.field.transports import TransportPool
from edge_agent.outbox.store import Outbox
from firmware_stubs.rtu_sim import RtuBusSimulator
from tests.helpers import python_env, until

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


@dataclass(slots=True)
class _Ask:
    """One read a poller asked of the bus: who, when, how far the line had got, how it ended."""

    device_id: int
    asked: float  # time.monotonic() when the poller called read
    on_line_before: int  # requests on the line by then (the simulator's log), any slave's
    failures_before: int  # the poller's consecutive failed cycles by then
    outcome: str | None = None  # "ok", the transport error's class name, None if cancelled


class _Recorded(BusDevice):
    """A device's real view of the bus that notes every read in the shared `journal`: the
    test's window on the order the bus serves its slaves in."""

    def __init__(self, view: BusDevice, sim: RtuBusSimulator, journal: list[_Ask],
                 failures: Callable[[], int]) -> None:
        super().__init__(view.bus, view.timeout_s)
        self.sim, self.journal, self.failures = sim, journal, failures

    async def read(self, function: int, start: int, count: int, *, device_id: int) -> list[int]:
        ask = _Ask(device_id, time.monotonic(), len(self.sim.request_log), self.failures())
        self.journal.append(ask)
        try:
            words = await super().read(function, start, count, device_id=device_id)
        except TransportError as exc:
            ask.outcome = type(exc).__name__
            raise
        ask.outcome = "ok"
        return words


@asynccontextmanager
async def _pollers(tmp_path: Path, sim: RtuBusSimulator, ids: tuple[int, ...] = (1, 2, 3), *,
                   timeouts: Mapping[int, float] | None = None,
                   journal: list[_Ask] | None = None,
                   ) -> AsyncIterator[tuple[list[DevicePoller], SerialBus, Outbox]]:
    """Pollers of slaves `ids` on one bus; with a `journal`, their reads are noted in it."""
    pool = TransportPool()
    async with Outbox.open(tmp_path / "outbox.db") as ob:
        pollers: dict[int, DevicePoller] = {}
        for n in ids:
            dev = _device(n, sim.path, **({"timeout_s": timeouts[n]} if timeouts else {}))
            transport = pool.get(dev.transport, timeout_s=dev.timeout_s)
            if journal is not None:
                assert isinstance(transport, BusDevice)
                transport = _Recorded(transport, sim, journal,
                                      lambda n=n: pollers[n].health.consecutive_failures)
            pollers[n] = DevicePoller(dev, GAS if n != 2 else TANK, transport, ob)
        (bus,) = pool.serial_buses()
        try:
            yield list(pollers.values()), bus, ob
        finally:
            await pool.close()


SILENT_TIMEOUT_S = 0.25  # what each probe of the silent slave costs the line
HEALTHY_TIMEOUT_S = 1.0  # answering slaves never come near it, even on a loaded box


def _backoff_s(failures: int) -> float:
    """The poller's pause after `failures` failed cycles in a row (_device: 0.2 s, cap 1 s)."""
    return min(1.0, 0.2 * 2 ** (failures - 1))


async def test_silent_slave_does_not_slow_the_others(tmp_path: Path) -> None:
    """A silent slave costs the line one bounded timeout per probe, probed once per back-off
    period, and never more than one probe ahead of a healthy slave's request; the healthy
    slaves keep answering every cycle; the silent one goes offline once, then recovers."""
    journal: list[_Ask] = []
    async with RtuBusSimulator([GAS, TANK, GAS], baudrate=BAUD) as sim, \
            _pollers(tmp_path, sim, timeouts={1: HEALTHY_TIMEOUT_S, 2: HEALTHY_TIMEOUT_S,
                                               3: SILENT_TIMEOUT_S},
                     journal=journal) as (pollers, bus, ob):
        silent = pollers[2]
        with capture_logs() as logs:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(p.run()) for p in pollers]
                await until(lambda: all(p.health.cycles_ok >= 3 for p in pollers), "warm-up")
                healthy_before = [p.health for p in pollers[:2]]
                sim.set_faults(3, silent=True)
                await until(lambda: silent.health.consecutive_failures >= 1, "offline")
                records_offline = silent.health.records
                # Five failures in a row: the back-off has reached its 1 s cap.
                await until(lambda: silent.health.consecutive_failures >= 6, "back-off at cap")
                during = [p.health for p in pollers]
                sim.set_faults(3, silent=False)
                await until(lambda: silent.health.state is Health.OK
                            and silent.health.records > records_offline, "recovery")
                for t in tasks:
                    t.cancel()
        latest = await ob.latest()
        stats3 = bus.stats(3)
        line = [address for _, address in sim.request_log]

    # The line carries requests in the order they were asked (FIFO), one frame per read:
    # no retry of a timeout, no request jumping the queue.
    # Only the reads the cancel cut off, one a poller at most, never reached the line.
    assert [a.device_id for a in journal[:len(line)]] == line
    assert len(journal) - 3 <= len(line) <= len(journal)
    # So a healthy request waits behind at most one probe of the silent slave.
    for i, ask in enumerate(journal):
        if ask.device_id != 3:
            assert [a.device_id for a in journal[ask.on_line_before:i]].count(3) <= 1, i
    probes = [i for i, a in enumerate(journal)
              if a.device_id == 3 and a.outcome == "TransportTimeoutError"]
    assert len(probes) == stats3.timeouts == silent.health.timeouts >= 6
    # Probed once per back-off period (doubling to its cap), not once per 0.2 s cycle: each
    # probe after a failed cycle comes at least its timeout plus the back-off after the last.
    backed_off = [(i, j) for i, j in zip(probes, probes[1:], strict=False)
                  if journal[j].failures_before]
    assert max(journal[j].failures_before for _, j in backed_off) >= 5
    for i, j in backed_off:
        wait = SILENT_TIMEOUT_S + _backoff_s(journal[j].failures_before)
        assert journal[j].asked - journal[i].asked >= wait - 1e-3, (i, j)
        # Between two probes a second or so apart, both healthy slaves were served.
        if journal[j].failures_before >= 3:
            assert {a.device_id for a in journal[i + 1:j] if a.outcome == "ok"} >= {1, 2}
    assert during[2].state is Health.OFFLINE and during[2].records == records_offline
    for before, now in zip(healthy_before, during[:2], strict=True):
        # Every cycle read all it asked for (a snapshot may catch one cycle still appending).
        assert now.state is Health.OK and (now.timeouts, now.connect_errors, now.exceptions,
                                           now.framing_errors, now.decode_errors) == (0,) * 5
        assert now.cycles_ok > before.cycles_ok
    p3 = silent.health
    assert p3.state is Health.OK and p3.records > records_offline
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
