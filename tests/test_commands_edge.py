"""The gateway's command executor against a real Modbus simulator, outbox and ledger (§6)."""

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
from edge_agent.commands.executor import CommandExecutor, readback_matches
from edge_agent.commands.ledger import CommandLedger
from edge_agent.commands.setup import load_public_key
from edge_agent.config.site import DeviceConfig
from edge_agent.field.poller import DevicePoller
from edge_agent.field.transports import ModbusTcpTransport
from edge_agent.outbox.store import Outbox
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from protocols import command_keys as k
from protocols import command_results as r
from protocols import commands as c
from protocols.callresp import play_warning
from protocols.envelope import RecordKind

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ROGUE = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
GW = "gw-1"


def _now() -> int:
    return time.time_ns() // 1_000_000


def _cmd(cmd_id: str, args: c.CommandArgs, *, gw: str = GW, issued: int | None = None,
         ttl_ms: int = 60_000) -> c.Command:
    return c.make_command(cmd_id, gw=gw, args=args, issued_at_ms=_now() if issued is None else issued,
                          ttl_ms=ttl_ms)


@dataclass
class Rig:
    sim: ModbusTcpSimulator
    outbox: Outbox
    executor: CommandExecutor
    poller: DevicePoller
    task: asyncio.Task[None]

    async def send(self, payload: bytes) -> None:
        self.executor.handle(payload)
        await self.executor.wait_idle()

    async def results(self, cmd_id: str | None = None) -> list[dict[str, Any]]:
        records = await self.outbox.next_batch(1000)
        out = [dict(r.attrs or {}) for r in records if r.kind is RecordKind.CMD_RESULT]
        return [a for a in out if cmd_id is None or a.get("cmd_id") == cmd_id]

    async def states(self, cmd_id: str) -> list[str]:
        return [a["state"] for a in await self.results(cmd_id)]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    profile = find_profile("gas-detector-v1")
    async with ModbusTcpSimulator(profile) as sim, Outbox.open(tmp_path / "outbox.db") as ob:
        dev = DeviceConfig.model_validate({
            "id": "gas-1", "profile": "gas-detector-v1", "poll_interval_s": 1.0,
            "transport": {"kind": "tcp", "host": "127.0.0.1", "port": sim.port}})
        transport = ModbusTcpTransport("127.0.0.1", sim.port, timeout_s=1.0)
        poller = DevicePoller(dev, profile, transport, ob)
        executor = CommandExecutor(gw=GW, ledger_path=tmp_path / "commands.db", outbox=ob,
                                   public_key=KEY.public_key(), targets={"gas-1": poller},
                                   diagnostics=None)
        task = asyncio.create_task(executor.run())
        try:
            yield Rig(sim, ob, executor, poller, task)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await transport.close()


async def test_write_point_is_written_read_back_and_reported(rig: Rig) -> None:
    """write_point writes the register, reads it back and reports received/executing/succeeded."""
    cmd = _cmd("w1", c.WritePoint("gas-1", "sample_interval_s", 42))
    await rig.send(c.sign_command(KEY, cmd))
    assert await rig.states("w1") == ["received", "executing", "succeeded"]
    final = (await rig.results("w1"))[-1]
    assert final["readback"] == 42 and final["kind"] == "write_point"
    assert rig.sim.get_value("sample_interval_s") == 42
    records = [r for r in await rig.outbox.next_batch(100) if r.kind is RecordKind.CMD_RESULT]
    assert {r.point for r in records} == {"gas-1/sample_interval_s"}


async def test_coil_write_is_read_back(rig: Rig) -> None:
    """A writable coil (function 1) is written and read back as a bool."""
    await rig.send(c.sign_command(KEY, _cmd("w2", c.WritePoint("gas-1", "relay_test", True))))
    assert (await rig.results("w2"))[-1] == {"cmd_id": "w2", "state": "succeeded",
                                             "kind": "write_point", "readback": True}
    assert rig.sim.get_value("relay_test") is True


async def test_replay_is_refused_and_never_re_executed(rig: Rig) -> None:
    """The same signed command again is reported rejected/replay and does not write again."""
    payload = c.sign_command(KEY, _cmd("w3", c.WritePoint("gas-1", "sample_interval_s", 7)))
    await rig.send(payload)
    rig.sim.set_value("sample_interval_s", 99)  # someone changes it on site afterwards
    await rig.send(payload)
    await rig.send(payload)
    results = await rig.results("w3")
    assert [(a["state"], a.get("reason")) for a in results] == [
        ("received", None), ("executing", None), ("succeeded", None), ("rejected", "replay")]
    assert results[-1]["edge_state"] == "succeeded"
    assert rig.sim.get_value("sample_interval_s") == 99
    assert rig.executor.counters.replays == 2 and rig.executor.counters.executed == 1


async def test_forged_expired_and_misaddressed_commands_are_refused(rig: Rig) -> None:
    """Bad signature, expiry and another gateway's id are each reported and nothing is written."""
    before = rig.sim.get_value("sample_interval_s")
    await rig.send(c.sign_command(ROGUE, _cmd("f1", c.WritePoint("gas-1", "sample_interval_s", 5))))
    await rig.send(c.sign_command(KEY, _cmd("e1", c.WritePoint("gas-1", "sample_interval_s", 6),
                                            issued=_now() - 120_000, ttl_ms=60_000)))
    await rig.send(c.sign_command(KEY, _cmd("g1", c.WritePoint("gas-1", "sample_interval_s", 7),
                                            gw="gw-2")))
    await rig.send(b"\xa1garbage")
    assert await rig.results("f1") == [{"cmd_id": "f1", "state": "rejected",
                                        "reason": "bad_signature", "verified": False,
                                        "detail": "command signature does not verify (cmd_id f1)"}]
    assert [(a["state"], a["reason"]) for a in await rig.results("e1")] == [("expired", "expired")]
    assert [(a["state"], a["reason"]) for a in await rig.results("g1")] == [
        ("rejected", "wrong_gateway")]
    assert rig.sim.get_value("sample_interval_s") == before
    assert rig.executor.counters.malformed == 1
    # None of them was claimed, so none blocks a genuine command with the same id later.
    await rig.send(c.sign_command(KEY, _cmd("f1", c.WritePoint("gas-1", "sample_interval_s", 8))))
    assert (await rig.states("f1"))[-1] == "succeeded"


@pytest.mark.parametrize(("args", "reason"), [
    (c.WritePoint("gas-1", "gas_lel", 1.0), "not_writable"),
    (c.WritePoint("gas-1", "no_such_point", 1), "unknown_point"),
    (c.WritePoint("gas-9", "sample_interval_s", 1), "unknown_device"),
    (c.WritePoint("gas-1", "sample_interval_s", 70_000), "bad_value"),
    (c.SetPollInterval("gas-9", 1.0), "unknown_device"),
    # 叫应 on a gateway without [[terminals]]
    (play_warning("w-1", "red", "暴雨", 1, ["t-1"]), "unsupported_kind"),
])
async def test_invalid_targets_are_rejected_after_received(rig: Rig, args: c.CommandArgs,
                                                           reason: str) -> None:
    """A command this gateway cannot carry out is rejected with the reason, before executing."""
    await rig.send(c.sign_command(KEY, _cmd("v1", args)))
    results = await rig.results("v1")
    assert [(a["state"], a.get("reason")) for a in results] == [("received", None),
                                                               ("rejected", reason)]


async def test_poll_interval_diagnostics_and_time(rig: Rig) -> None:
    """set_poll_interval changes the poller, diagnostics and sync_time report in the result."""
    await rig.send(c.sign_command(KEY, _cmd("p1", c.SetPollInterval("gas-1", 2.5))))
    assert rig.poller.interval_s == 2.5
    assert (await rig.results("p1"))[-1]["previous_s"] == 1.0
    await rig.send(c.sign_command(KEY, _cmd("d1", c.RequestDiagnostics())))
    diag = (await rig.results("d1"))[-1]
    assert diag["state"] == "succeeded" and diag["diagnostics"]["commands"]["executed"] == 2
    await rig.send(c.sign_command(KEY, _cmd("t1", c.SyncTime(central_ms=_now() - 5000))))
    offset = (await rig.results("t1"))[-1]["offset_ms"]
    assert 5000 <= offset < 7000


async def test_crash_mid_execution_reports_interrupted_not_rerun(tmp_path: Path, rig: Rig) -> None:
    """A command left `executing` by a crash is reported failed/interrupted and never run again."""
    rig.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rig.task
    cmd = _cmd("x1", c.WritePoint("gas-1", "sample_interval_s", 11))
    async with CommandLedger.open(tmp_path / "commands.db") as ledger:  # what the crash left
        assert await ledger.claim(cmd_id="x1", kind="write_point", target=cmd.target,
                                  expires_at_ms=cmd.expires_at_ms,
                                  keep_until_ms=cmd.expires_at_ms + 10**9, now_ms=_now())
        await ledger.set_state("x1", r.CommandState.EXECUTING,
                               {"cmd_id": "x1", "state": "executing"}, _now())
    rig.task = asyncio.create_task(rig.executor.run())
    await rig.send(c.sign_command(KEY, cmd))  # central sends it again after the restart
    results = await rig.results("x1")
    assert [(a["state"], a.get("reason")) for a in results] == [
        ("failed", "interrupted"), ("rejected", "replay")]
    assert rig.sim.get_value("sample_interval_s") != 11


def test_pinned_key_forms(tmp_path: Path) -> None:
    """The pinned key may be inline base64, or a PEM file relative to the config folder."""
    pub = KEY.public_key()
    assert load_public_key(k.public_key_b64(pub)) is not None
    (tmp_path / "central.pub").write_text(k.public_key_pem(pub))
    loaded = load_public_key("central.pub", tmp_path)
    assert loaded is not None and loaded.raw == k.public_key_raw(pub)
    assert load_public_key(None) is None


def test_readback_tolerance() -> None:
    """Read-back compares exactly for ints/bools/strings and within 1e-9 for floats."""
    assert readback_matches(42, 42) and not readback_matches(42, 43)
    assert readback_matches(2.5, 2.5000000000001) and not readback_matches(2.5, 2.6)
    assert not readback_matches(True, 1) and readback_matches("ab", "ab")
