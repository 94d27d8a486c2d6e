"""Commands issued in the future (DESIGN.md §8): refused on a trusted clock, obeyed and flagged
on a suspect one (a gateway whose clock a power cut reset must still obey)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_profiles import find_profile
from edge_agent.commands.executor import FUTURE_SKEW_MS, CommandExecutor
from edge_agent.config.site import DeviceConfig
from edge_agent.field.poller import DevicePoller
from edge_agent.field.transports import ModbusTcpTransport
from edge_agent.outbox.store import Outbox
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from protocols import commands as c
from protocols.envelope import RecordKind

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GW = "gw-1"


def _now() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Rig:
    sim: ModbusTcpSimulator
    outbox: Outbox
    executor: CommandExecutor
    trusted: list[bool]

    async def send(self, cmd: c.Command) -> list[dict[str, Any]]:
        self.executor.handle(c.sign_command(KEY, cmd))
        await self.executor.wait_idle()
        records = await self.outbox.next_batch(1000)
        return [dict(r.attrs or {}) for r in records if r.kind is RecordKind.CMD_RESULT
                and (r.attrs or {}).get("cmd_id") == cmd.cmd_id]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    profile = find_profile("gas-detector-v1")
    trusted = [True]
    async with ModbusTcpSimulator(profile) as sim, Outbox.open(tmp_path / "outbox.db") as ob:
        dev = DeviceConfig.model_validate({
            "id": "gas-1", "profile": "gas-detector-v1",
            "transport": {"kind": "tcp", "host": "127.0.0.1", "port": sim.port}})
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=1.0)
        poller = DevicePoller(dev, profile, transport, ob)
        executor = CommandExecutor(gw=GW, ledger_path=tmp_path / "commands.db", outbox=ob,
                                   public_key=KEY.public_key(), targets={"gas-1": poller},
                                   clock_trusted=lambda: trusted[0])
        task = asyncio.create_task(executor.run())
        try:
            yield Rig(sim, ob, executor, trusted)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await transport.close()


def _write(cmd_id: str, value: int, ahead_ms: int) -> c.Command:
    return c.make_command(cmd_id, gw=GW, args=c.WritePoint("gas-1", "sample_interval_s", value),
                          issued_at_ms=_now() + ahead_ms, ttl_ms=600_000)


async def test_future_command_is_refused_on_a_trusted_clock(rig: Rig) -> None:
    """issued_at beyond the skew ahead of a trusted clock: rejected/issued_in_future, not run."""
    rig.sim.set_value("sample_interval_s", 5)
    results = await rig.send(_write("f1", 42, FUTURE_SKEW_MS + 120_000))
    assert [(a["state"], a.get("reason")) for a in results] == [("rejected", "issued_in_future")]
    assert rig.sim.get_value("sample_interval_s") == 5
    assert rig.executor.counters.future_refused == 1
    # Claimed as refused: the same command later, clock trusted or not, never runs.
    rig.trusted[0] = False
    await rig.send(_write("f1", 42, FUTURE_SKEW_MS + 120_000))
    assert rig.sim.get_value("sample_interval_s") == 5


async def test_future_command_runs_flagged_on_a_suspect_clock(rig: Rig) -> None:
    """With a suspect clock the same command is obeyed, and its report says so."""
    rig.trusted[0] = False
    results = await rig.send(_write("f2", 43, FUTURE_SKEW_MS + 120_000))
    assert [a["state"] for a in results] == ["received", "executing", "succeeded"]
    assert results[0]["clock_untrusted"] is True
    assert results[0]["issued_ahead_ms"] > FUTURE_SKEW_MS
    assert rig.sim.get_value("sample_interval_s") == 43
    assert rig.executor.counters.future_flagged == 1


async def test_small_skew_is_accepted(rig: Rig) -> None:
    """A command a few seconds ahead (clocks never agree exactly) runs on a trusted clock."""
    results = await rig.send(_write("f3", 44, 5_000))
    assert [a["state"] for a in results] == ["received", "executing", "succeeded"]
    assert "clock_untrusted" not in results[0]
