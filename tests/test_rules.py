"""Edge alarm rules: value tables per rule, persistence across restart, and the poller wiring."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_profiles import find_profile
from edge_agent.agent import run_agent
from edge_agent.alarms.config import DeviceAlarmsConfig, build_device_rules
from edge_agent.alarms.rules import (
    AlarmState,
    DeviceStatus,
    Rule,
    RuleEngine,
    RuleKind,
    RulesError,
    Sample,
)
from edge_agent.alarms.store import AlarmStore, read_alarms
from edge_agent.alarms.wiring import AlarmRules, build_rules, status_of
from edge_agent.config.site import ConfigError, DeviceConfig, parse_config
from edge_agent.field.poller import DevicePoller
from edge_agent.field.transports import ModbusTcpTransport
from edge_agent.outbox.store import NewRecord, Outbox, OutboxFullError
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from protocols.envelope import Flag, Record, RecordKind, Value
from tests.helpers import Mosquitto

DEV = "gas-1"
P = f"{DEV}/gas_lel"


@dataclass(frozen=True)
class Tick:
    t: float
    online: bool | None = True


Step = tuple[float, Value] | Tick
Event = tuple[float, str, int]


def run(rules: Sequence[Rule], steps: Sequence[Step], point: str = P) -> list[Event]:
    """Feed the steps to a fresh engine, committing each evaluation; (t, state, level) out."""
    engine = RuleEngine(rules)
    out: list[Event] = []
    for step in steps:
        if isinstance(step, Tick):
            ev = engine.on_tick(int(step.t * 1000), {DEV: DeviceStatus(step.online, "timeout")})
        else:
            t, value = step
            ev = engine.on_samples([Sample(point, int(t * 1000), value)])
        engine.commit(ev)
        out += [(e.ts_ms / 1000, str(e.state), e.level) for e in ev.events]
    return out


def high(**kw: object) -> Rule:
    return Rule(DEV, P, RuleKind.HIGH, (25.0, 50.0), 2.0, **kw)  # type: ignore[arg-type]


R, C, X = "raised", "changed", "cleared"


@pytest.mark.parametrize(("steps", "expected"), [
    ([(0, 10), (1, 30), (2, 55), (3, 45), (4, 24), (5, 23)],
     [(1, R, 1), (2, C, 2), (3, C, 1), (5, X, 0)]),
    ([(0, 24.99), (1, 25)], [(1, R, 1)]),  # at the threshold counts
    ([(0, 60)], [(0, R, 2)]),  # straight to level 2, no level-1 raise first
    ([(0, 60), (1, 49), (2, 48.5), (3, 48)], [(0, R, 2), (3, C, 1)]),  # 50 - 2 holds level 2
    ([(0, 60), (1, 5)], [(0, R, 2), (1, X, 0)]),  # 2 → cleared in one step
    ([(0, 30), (1, None), (2, "bad"), (3, True)], [(0, R, 1)]),  # non-numbers change nothing
], ids=["levels-and-hysteresis", "at-threshold", "jump-to-2", "hysteresis-at-2", "2-to-clear",
        "bad-samples"])
def test_high_thresholds_with_hysteresis(steps: list[Step], expected: list[Event]) -> None:
    """High alarm: ≥ threshold raises, severity rises and falls as changes, clears past t − h."""
    assert run([high()], steps) == expected


@pytest.mark.parametrize(("steps", "expected"), [
    ([(0, 20.9), (1, 19.5), (2, 19.8), (3, 20.0), (4, 17.5), (5, 18.4), (6, 18.6), (7, 21)],
     [(1, R, 1), (3, X, 0), (4, R, 2), (6, C, 1), (7, X, 0)]),
    ([(0, 23.6), (1, 23.4), (2, 23.0)], []),  # the low rule ignores the high side
], ids=["oxygen-low", "high-side"])
def test_low_thresholds(steps: list[Step], expected: list[Event]) -> None:
    """Low alarm (oxygen 19.5 / 18.0, hysteresis 0.5): ≤ threshold raises, clears at ≥ t + h."""
    o2 = "gas-1/o2"
    rule = Rule(DEV, o2, RuleKind.LOW, (19.5, 18.0), 0.5)
    assert run([rule], steps, point=o2) == expected


@pytest.mark.parametrize(("rule", "steps", "expected"), [
    (high(on_delay_ms=5000), [(0, 30), (2, 30), (4.9, 30), (5, 30), (6, 30)], [(5, R, 1)]),
    (high(on_delay_ms=5000), [(0, 30), (3, 20), (4, 30), (8, 30), (9, 30)], [(9, R, 1)]),
    (high(on_delay_ms=5000), [(0, 60), (5, 60)], [(5, R, 2)]),
    (high(on_delay_ms=5000), [(0, 30), (5, 30), (6, 60), (10, 60), (11, 60)],
     [(5, R, 1), (11, C, 2)]),
    (high(off_delay_ms=10_000), [(0, 60), (1, 10), (5, 10), (11, 10)], [(0, R, 2), (11, X, 0)]),
    (high(off_delay_ms=10_000), [(0, 60), (1, 10), (5, 30), (6, 10), (11, 10), (16, 10)],
     [(0, R, 2), (11, C, 1), (16, X, 0)]),
    (high(on_delay_ms=5000), [(10, 30), (2, 30), (6, 30), (7, 30)], [(7, R, 1)]),
], ids=["on-delay", "on-delay-interrupted", "on-delay-to-2", "rise-waits-on-delay",
        "off-delay", "off-delay-steps-down", "clock-stepped-back"])
def test_on_and_off_delays(rule: Rule, steps: list[Step], expected: list[Event]) -> None:
    """A level is taken only after its condition held for the on-delay, left after the off-delay."""
    assert run([rule], steps) == expected


@pytest.mark.parametrize(("steps", "expected"), [
    ([(t, t / 5) for t in range(0, 61, 10)] + [(70, 12), (80, 12)], [(60, R, 1), (80, X, 0)]),
    ([(0, 50), (30, 40), (60, 30)], [(60, R, 1)]),  # falling fast counts too
    ([(0, 0), (30, 8), (59, 9.9)], []),  # the window is not full yet: no verdict
    ([(0, 0), (60, 9), (120, 18)], []),  # 9 per minute is under the limit
], ids=["rise-then-flat", "fall", "window-not-full", "under-limit"])
def test_rate_of_change(steps: list[Step], expected: list[Event]) -> None:
    """Rate rule: |change| per minute over a 60 s window at or past 10 raises level 1."""
    rule = Rule(DEV, P, RuleKind.RATE, (10.0, None), window_ms=60_000)
    assert run([rule], steps) == expected


@pytest.mark.parametrize(("steps", "expected"), [
    ([(0, 5), Tick(10), Tick(29), Tick(30), Tick(40), (45, 6), Tick(50)], [(30, R, 1), (45, X, 0)]),
    ([(0, 5), (20, None), Tick(30)], [(30, R, 1)]),  # a bad-quality sample is not a new value
    ([(0, 5), Tick(10, False), Tick(40, False), Tick(41, True)], [(41, R, 1)]),
    ([Tick(0), Tick(29), Tick(30)], [(30, R, 1)]),  # never a value: counted from the first tick
], ids=["stale-and-fresh", "bad-quality", "held-while-offline", "never-seen"])
def test_stale_value(steps: list[Step], expected: list[Event]) -> None:
    """Stale rule: no good sample for 30 s raises; the next sample clears; offline suppresses."""
    assert run([Rule(DEV, P, RuleKind.STALE, (30.0, None))], steps) == expected


@pytest.mark.parametrize(("steps", "expected"), [
    ([Tick(0), Tick(1, False), Tick(3, False), Tick(6, False), Tick(7, False), Tick(8)],
     [(6, R, 1), (8, X, 0)]),
    ([Tick(1, False), Tick(3, False), Tick(4), Tick(5, False), Tick(9, False)], []),
    ([Tick(0, False), Tick(5, False), (6, 3.0)], [(5, R, 1), (6, X, 0)]),  # a sample clears
    ([Tick(0, None), Tick(10, None)], []),  # no poll finished yet: unknown, not offline
], ids=["offline-then-online", "flapping-under-delay", "sample-clears", "starting"])
def test_device_offline(steps: list[Step], expected: list[Event]) -> None:
    """device_offline: raised after 5 s of offline health, cleared when the device answers."""
    rule = Rule(DEV, f"{DEV}/_device", RuleKind.OFFLINE, on_delay_ms=5000)
    assert run([rule], steps) == expected


def test_event_record_shape() -> None:
    """A raise becomes one ALARM NewRecord with the alarm id, rule, level, state and threshold."""
    engine = RuleEngine([high()])
    ev = engine.on_samples([Sample(P, 1000, 60.0)])
    (rec,) = [e.to_record() for e in ev.events]
    assert rec.kind is RecordKind.ALARM and rec.point == P and rec.value == 60.0
    assert rec.ts_ms == 1000
    assert dict(rec.attrs or {}) == {
        "alarm_id": "gas-1/gas_lel/high", "rule": "high", "level": 2, "prev_level": 0,
        "state": "raised", "threshold": 50.0, "since_ms": 1000, "hysteresis": 2.0}
    assert engine.active() == []  # not committed yet


def test_profile_and_overrides_build_rules() -> None:
    """Profile thresholds come through; config overrides replace them, add delays, rate, stale."""
    gas = find_profile("gas-detector-v1")
    plain = {r.alarm_id: r for r in build_device_rules(DEV, gas)}
    assert plain["gas-1/gas_lel/high"].thresholds == (25.0, 50.0)
    assert plain["gas-1/_device/device_offline"].on_delay_ms == 10_000
    assert set(plain) == {"gas-1/gas_lel/high", "gas-1/_device/device_offline"}
    cfg = DeviceAlarmsConfig.model_validate({
        "offline": False, "stale_after_s": 30,
        "points": {"gas_lel": {"high1": 20, "on_delay_s": 2, "rate_per_min": 10},
                   "sensor_temp": {"low1": -10, "high1": 60}}})
    rules = {r.alarm_id: r for r in build_device_rules(DEV, gas, cfg)}
    assert rules["gas-1/gas_lel/high"].thresholds == (20.0, 50.0)
    assert rules["gas-1/gas_lel/high"].on_delay_ms == 2000
    assert rules["gas-1/gas_lel/rate"].thresholds == (10.0, None)
    assert rules["gas-1/gas_lel/stale"].thresholds == (30.0, None)
    assert rules["gas-1/sensor_temp/low"].thresholds == (-10.0, None)
    assert "gas-1/_device/device_offline" not in rules
    off = DeviceAlarmsConfig.model_validate({"points": {"gas_lel": {"enabled": False}}})
    assert [r.kind for r in build_device_rules(DEV, gas, off)] == [RuleKind.OFFLINE]
    with pytest.raises(RulesError, match="no point 'nope'"):
        build_device_rules(DEV, gas, DeviceAlarmsConfig.model_validate({"points": {"nope": {}}}))


def test_config_override_error_names_line() -> None:
    """A disordered override in the gateway config is a ConfigError naming its line and key."""
    text = ('[gateway]\nid = "gw-1"\n\n[[devices]]\nid = "gas-1"\nprofile = "gas-detector-v1"\n'
            'transport = {kind = "tcp", host = "127.0.0.1"}\n\n'
            '[devices.alarms.points.gas_lel]\nhigh2 = 10\n')
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.line == 10 and err.value.field == "devices[0].alarms.points.gas_lel.high2"


# --- persistence and the outbox ------------------------------------------------------------


def _tel(value: Value, ts_ms: int, point: str = P) -> NewRecord:
    return NewRecord(RecordKind.TELEMETRY, ts_ms, point, value)


async def _alarms(ob: Outbox) -> list[Record]:
    return [r for r in await ob.next_batch(10_000) if r.kind is RecordKind.ALARM]


async def test_state_survives_restart(tmp_path: Path) -> None:
    """After re-opening: an active alarm is not raised again; a clear while down is seen at once."""
    rules = [high(), Rule(DEV, f"{DEV}/_device", RuleKind.OFFLINE)]
    async with Outbox.open(tmp_path / "outbox.db") as ob, \
            AlarmStore.open(tmp_path / "alarms.db") as store:
        alarms = AlarmRules(RuleEngine(rules), store, ob)
        assert await alarms.restore() == 0
        await alarms.append([_tel(60.0, 1000)])
        await alarms.tick({DEV: DeviceStatus(False, "timeout")}, now_ms=2000)
    assert {a.alarm_id: a.level for a in read_alarms(tmp_path / "alarms.db")} == {
        "gas-1/gas_lel/high": 2, "gas-1/_device/device_offline": 1}

    async with Outbox.open(tmp_path / "outbox.db") as ob, \
            AlarmStore.open(tmp_path / "alarms.db") as store:
        alarms = AlarmRules(RuleEngine(rules), store, ob)
        assert await alarms.restore() == 2
        await alarms.append([_tel(58.0, 5000)])  # still high: no new raise; device answers
        mid = [(r.attrs or {})["state"] for r in await _alarms(ob)]
        await alarms.append([_tel(5.0, 6000)])  # it came back while we were down
        records = await _alarms(ob)
        stored = await store.load_all()
    assert mid == ["raised", "raised", "cleared"]  # the offline alarm cleared by the sample
    last = records[-1]
    assert (last.attrs or {})["state"] == "cleared" and (last.attrs or {})["prev_level"] == 2
    assert (last.attrs or {})["since_ms"] == 1000 and last.ts_ms == 6000
    assert len(records) == 4
    assert {s.alarm_id: s.level for s in stored} == {
        "gas-1/gas_lel/high": 0, "gas-1/_device/device_offline": 0}


async def test_removed_rule_is_cleared_on_restore(tmp_path: Path) -> None:
    """An active alarm whose rule is gone after a config change is cleared on start."""
    async with Outbox.open(tmp_path / "outbox.db") as ob, \
            AlarmStore.open(tmp_path / "alarms.db") as store:
        alarms = AlarmRules(RuleEngine([high()]), store, ob)
        await alarms.append([_tel(30.0, 1000)])
        alarms = AlarmRules(RuleEngine([]), store, ob)
        assert await alarms.restore() == 0
        records = await _alarms(ob)
        assert await store.load_active() == []
    assert [(r.attrs or {})["state"] for r in records] == ["raised", "cleared"]
    assert (records[-1].attrs or {})["reason"] == "rule_removed"


async def test_failed_append_keeps_state_and_retries(tmp_path: Path) -> None:
    """If the outbox refuses the append, the engine keeps its old state and raises next time."""
    async with Outbox.open(tmp_path / "outbox.db") as ob, \
            AlarmStore.open(tmp_path / "alarms.db") as store:
        real = ob.append
        fail = [True]

        async def full_once(records: Sequence[NewRecord]) -> list[int]:
            if fail.pop() if fail else False:
                raise OutboxFullError("disk full")
            return await real(records)

        ob.append = full_once  # type: ignore[method-assign]
        alarms = AlarmRules(RuleEngine([high()]), store, ob)
        with pytest.raises(OutboxFullError):
            await alarms.append([_tel(60.0, 1000)])
        assert alarms.engine.active() == [] and await store.load_active() == []
        seqs = await alarms.append([_tel(61.0, 2000)])
        records = await _alarms(ob)
    assert len(seqs) == 1  # the caller's records only
    assert [((r.attrs or {})["state"], r.ts_ms) for r in records] == [("raised", 2000)]


async def test_poller_and_rules_against_simulator(tmp_path: Path) -> None:
    """Real simulator → poller → rules → outbox: gas at 60 gives a level-2 raise committed with
    its reading; back to 5 clears; a stopped device raises device_offline, a restart clears it."""
    gas = find_profile("gas-detector-v1")
    sim = ModbusTcpSimulator(gas)
    await sim.start()
    port = sim.port
    dev = DeviceConfig.model_validate({
        "id": DEV, "profile": "gas-detector-v1", "timeout_s": 0.3,
        "transport": {"kind": "tcp", "host": "127.0.0.1", "port": port},
        "alarms": {"offline_delay_s": 0}})
    transport = ModbusTcpTransport("127.0.0.1", port, timeout_s=0.3)
    try:
        async with Outbox.open(tmp_path / "outbox.db") as ob, \
                AlarmStore.open(tmp_path / "alarms.db") as store:
            calls: list[set[RecordKind]] = []
            real = ob.append

            async def spy(records: Sequence[NewRecord]) -> list[int]:
                calls.append({r.kind for r in records})
                return await real(records)

            ob.append = spy  # type: ignore[method-assign]
            engine = RuleEngine(build_device_rules(DEV, gas, dev.alarms))
            alarms = AlarmRules(engine, store, ob)
            await alarms.restore()
            poller = DevicePoller(dev, gas, transport, alarms)

            await poller.poll_once()
            assert await _alarms(ob) == []
            sim.set_value("gas_lel", 60.0)
            await poller.poll_once()
            raised = await _alarms(ob)
            assert calls[-1] == {RecordKind.TELEMETRY, RecordKind.ALARM}  # one commit
            sim.set_value("gas_lel", 5.0)
            await poller.poll_once()
            cleared = (await _alarms(ob))[-1]

            await sim.stop()
            result = await poller.poll_once()
            assert result.offline
            (offline,) = await alarms.tick({DEV: status_of(poller.health)})
            sim = ModbusTcpSimulator(gas, port=port)
            await sim.start()
            await poller.poll_once()
            back = (await _alarms(ob))[-1]
            active = engine.active()
    finally:
        await transport.close()
        await sim.stop()

    (r,) = raised
    attrs = dict(r.attrs or {})
    assert r.point == P and r.value == 60.0 and r.flags == Flag.NONE
    assert attrs["state"] == "raised" and attrs["level"] == 2 and attrs["threshold"] == 50.0
    assert attrs["alarm_id"] == "gas-1/gas_lel/high" and attrs["rule"] == "high"
    assert (cleared.attrs or {})["state"] == "cleared" and cleared.value == 5.0
    assert offline.state is AlarmState.RAISED and offline.rule.point == "gas-1/_device"
    assert (back.attrs or {})["alarm_id"] == "gas-1/_device/device_offline"
    assert (back.attrs or {})["state"] == "cleared"
    assert active == []


def test_build_rules_skips_disabled_devices() -> None:
    """Only enabled devices get rules; each keeps its own alarm ids."""
    cfg = parse_config(
        '[gateway]\nid = "gw-1"\n'
        '[[devices]]\nid = "a"\nprofile = "gas-detector-v1"\n'
        'transport = {kind = "tcp", host = "127.0.0.1"}\n'
        '[[devices]]\nid = "b"\nprofile = "storage-tank-v1"\nenabled = false\n'
        'transport = {kind = "tcp", host = "127.0.0.1"}\n')
    profiles = {"a": find_profile("gas-detector-v1"), "b": find_profile("storage-tank-v1")}
    assert {r.device for r in build_rules(cfg, profiles)} == {"a"}


async def test_supervisor_wires_rules_between_pollers_and_outbox(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`run_agent` polls through the rules: a pinned gas reading of 60 leaves a level-2 raise in
    the outbox and an active row in alarms.db next to it."""
    gas = find_profile("gas-detector-v1")
    async with ModbusTcpSimulator(gas) as sim:
        sim.set_value("gas_lel", 60.0)
        config = parse_config(
            f'[gateway]\nid = "gw-rules"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[mqtt]\nport = {mosquitto.port}\n'
            f'[[devices]]\nid = "{DEV}"\nprofile = "gas-detector-v1"\npoll_interval_s = 0.1\n'
            f'transport = {{kind = "tcp", host = "127.0.0.1", port = {sim.port}}}\n')
        stop = asyncio.Event()
        agent = asyncio.create_task(run_agent(config, stop=stop, install_signal_handlers=False))
        try:
            deadline = time.monotonic() + 10
            while not read_alarms(config.alarms_path) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(agent, 15)
    (active,) = read_alarms(config.alarms_path)
    assert (active.alarm_id, active.level, active.value) == ("gas-1/gas_lel/high", 2, 60.0)
    async with Outbox.open(config.outbox_path) as ob:
        records = await _alarms(ob)
    assert [(r.point, (r.attrs or {})["state"], (r.attrs or {})["level"]) for r in records] == [
        (P, "raised", 2)]
