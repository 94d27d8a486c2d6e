"""The gateway's 叫应 terminal driver on real parts (DESIGN.md §7): a real SQLite outbox and
ledger, terminal simulators on loopback TCP and on a pty. Plays, receipts and acks become
outbox events once each; faults from heartbeats become events; bad bytes are counted, never
fatal; a restart remembers what was recorded."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.alarms.rules import AlarmEvent, Rule
from edge_agent.config.site import ConfigError, parse_config
from edge_agent.outbox.store import NewRecord, Outbox
from edge_agent.terminals.config import LocalWarningConfig, TerminalConfig
from edge_agent.terminals.ledger import (
    LedgerSummary,
    TerminalLedger,
    TerminalLedgerError,
    read_summary,
)
from edge_agent.terminals.link import PlayResult, TerminalLink
from edge_agent.terminals.local_rule import LocalWarningRule, local_warning_id
from edge_agent.terminals.metrics import terminal_metrics
from edge_agent.terminals.service import TerminalService
from firmware_stubs.terminal_sim import PtyTerminalSimulator, TcpTerminalSimulator
from protocols import terminal as tm
from protocols.alarm_attrs import AlarmState, RuleKind
from protocols.callresp import is_callresp, parse_event_attrs, play_warning
from protocols.envelope import RecordKind
from protocols.terminal_events import FAULT_EVENT, LOCAL_EVENT, TerminalFaultEvent
from tests.helpers import until

TIMEOUT = 15.0


@dataclass
class Rig:
    outbox: Outbox
    service: TerminalService
    tcp: TcpTerminalSimulator
    pty: PtyTerminalSimulator

    async def events(self) -> list[dict[str, Any]]:
        recs = await self.outbox.next_batch(1000)
        return [dict(r.attrs or {}) for r in recs if r.kind is RecordKind.EVENT]

    async def callresp(self) -> list[tuple[str, str, str]]:
        return sorted((e.warning_id, e.terminal, str(e.type)) for e in
                      (parse_event_attrs(a) for a in await self.events() if is_callresp(a)))

    async def faults(self) -> list[tuple[str, str, str]]:
        return [(f.terminal, str(f.fault), str(f.state)) for f in
                (TerminalFaultEvent.from_attrs(a) for a in await self.events()
                 if a.get("event") == FAULT_EVENT)]


@contextlib.asynccontextmanager
async def running(service: TerminalService) -> AsyncIterator[TerminalService]:
    async with service.open():
        tasks = [asyncio.ensure_future(f()) for _, f in service.tasks()]
        try:
            await until(lambda: all(lk.connected for lk in service.links.values()),
                        "terminals connected", timeout=TIMEOUT)
            yield service
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _service(tmp_path: Path, outbox: Outbox, tcp: TcpTerminalSimulator,
             pty: PtyTerminalSimulator) -> TerminalService:
    return TerminalService(terminals=[
        TerminalConfig(id="t-1", tcp=f"127.0.0.1:{tcp.port}"),
        TerminalConfig(id="t-2", serial=pty.path, kind="video")],
        ledger_path=tmp_path / "terminals.db", outbox=outbox)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with Outbox.open(tmp_path / "outbox.db") as outbox, \
            TcpTerminalSimulator("t-1", heartbeat_s=5) as tcp, \
            PtyTerminalSimulator("t-2", heartbeat_s=5, video=True) as pty:
        service = _service(tmp_path, outbox, tcp, pty)
        async with running(service):
            yield Rig(outbox, service, tcp, pty)


async def test_play_delivered_and_acked_once_each(rig: Rig) -> None:
    """A warning plays on a TCP and a serial terminal: both deliver at once; each button
    press is one ack event; a reminder PLAY and a second press record nothing more."""
    args = play_warning("w-1", "red", "暴雨红色预警", 2, ["t-1", "t-2", "t-9"])
    out = await rig.service.play(args, origin="ip", cmd_id="c-1")
    assert {t: (str(o.result), o.reason) for t, o in out.items()} == {
        "t-1": ("delivered", None), "t-2": ("delivered", None),
        "t-9": ("refused", "unknown_terminal")}
    assert rig.tcp.played[-1].play.text == "暴雨红色预警"
    assert rig.pty.played[-1].play.level is tm.WarningLevel.RED
    rig.tcp.press()
    rig.pty.press()
    want = [("w-1", "t-1", "ack"), ("w-1", "t-1", "delivered"), ("w-1", "t-2", "ack"),
            ("w-1", "t-2", "delivered")]
    await until(lambda: _eq(rig.callresp(), want), "two acks", timeout=TIMEOUT)
    await until(lambda: len(rig.tcp.acks_confirmed) == 1 and len(rig.pty.acks_confirmed) == 1,
                "receipts for the acks", timeout=TIMEOUT)
    # A reminder (the workflow re-sends) and a second press: nothing new recorded.
    await rig.service.play(args, origin="ip", cmd_id="c-2")
    rig.tcp.press()
    await until(lambda: len(rig.tcp.acks_confirmed) == 2, "second ack confirmed",
                timeout=TIMEOUT)
    assert await rig.callresp() == want
    assert rig.service.counters.events_repeated >= 2
    acks = [parse_event_attrs(a) for a in await rig.events() if is_callresp(a)
            and a["type"] == "ack"]
    assert {(a.cmd_id, a.by) for a in acks} == {("c-1", "button-1")}


async def _eq(got: Any, want: Any) -> bool:
    return bool(await got == want)


async def test_faults_refusals_and_garbage(rig: Rig) -> None:
    """A speaker fault in the heartbeat is an event and the PLAY is refused with its code;
    garbage on the line is counted and the link keeps working; faults clear as events."""
    rig.tcp.set_faults(speaker_fault=True, mains=False, battery=10)
    await until(lambda: _has(rig.faults(), ("t-1", "speaker_fault", "raised")),
                "fault event", timeout=TIMEOUT)
    assert set(await rig.faults()) == {("t-1", "speaker_fault", "raised"),
                                      ("t-1", "mains_lost", "raised"),
                                      ("t-1", "battery_low", "raised")}
    await until(lambda: len(rig.service.status()["terminals"][0]["faults"]) == 3, "status",
                timeout=TIMEOUT)  # the state follows its event's append
    samples = {(m.name, tuple(sm.labels.values())): sm.value
               for m in terminal_metrics(rig.service.status()) for sm in m.samples}
    assert samples[("fieldlink_edge_terminal_fault", ("t-1", "speaker_fault"))] == 1.0
    assert samples[("fieldlink_edge_terminal_battery_percent", ("t-1",))] == 10.0
    assert samples[("fieldlink_edge_terminal_up", ("t-2",))] == 1.0
    out = await rig.service.play(play_warning("w-2", "orange", "橙色预警", 1, ["t-1"]),
                                 origin="ip")
    assert (out["t-1"].result, out["t-1"].reason) == (PlayResult.REFUSED, "speaker_fault")
    link = rig.service.links["t-2"]
    rig.pty.set_faults(garbage=300, tamper=True)  # garbage, then the heartbeat it causes
    await until(lambda: _has(rig.faults(), ("t-2", "tamper", "raised")), "tamper",
                timeout=TIMEOUT)
    assert link.counters.garbage_bytes > 0 and link.connected
    out = await rig.service.play(play_warning("w-3", "blue", "蓝色预警", 1, ["t-2"]),
                                 origin="ip")
    assert out["t-2"].result is PlayResult.DELIVERED
    rig.tcp.set_faults(speaker_fault=False, mains=True, battery=90)
    await until(lambda: _has(rig.faults(), ("t-1", "speaker_fault", "cleared")), "cleared",
                timeout=TIMEOUT)
    health = rig.service.status()["terminals"]
    assert [h["id"] for h in health] == ["t-1", "t-2"]
    assert health[1]["heartbeat"]["tamper"] and health[1]["faults"] == ["tamper"]


async def _has(got: Any, item: Any) -> bool:
    return item in await got


async def test_repeated_ack_after_restart_is_not_recorded_twice(tmp_path: Path) -> None:
    """The gateway's RECEIPT for an ACK is lost (injected), so the terminal repeats it, also
    after the driver restarts on the same ledger: the ack is in the outbox exactly once."""
    async with Outbox.open(tmp_path / "outbox.db") as outbox, \
            TcpTerminalSimulator("t-1", heartbeat_s=5, ack_retry_s=0.3) as tcp, \
            PtyTerminalSimulator("t-2", heartbeat_s=5) as pty:
        drop = {"on": True}
        real_send = TerminalLink._send

        async def lossy_send(self: TerminalLink, message: tm.Message) -> None:
            if drop["on"] and isinstance(message, tm.Receipt) \
                    and message.ref_type is tm.MessageType.ACK:
                return  # the fault: this receipt never reaches the terminal
            await real_send(self, message)

        args = play_warning("w-9", "red", "红色预警", 1, ["t-1"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TerminalLink, "_send", lossy_send)
            service = _service(tmp_path, outbox, tcp, pty)
            async with running(service):
                await service.play(args, origin="ip", cmd_id="c-9")
                tcp.press()
                await until(lambda: tcp.stats()["ack_repeats"] >= 2, "ack repeated",
                            timeout=TIMEOUT)
                assert service.counters.events_repeated >= 1
            # The driver restarts on the same files; the terminal still repeats its ACK.
            service = _service(tmp_path, outbox, tcp, pty)
            async with running(service):
                await until(lambda: service.counters.events_repeated >= 1, "repeat seen",
                            timeout=TIMEOUT)
                drop["on"] = False
                await until(lambda: len(tcp.acks_confirmed) == 1, "ack confirmed",
                            timeout=TIMEOUT)
        recs = [r for r in await outbox.next_batch(1000) if r.kind is RecordKind.EVENT
                and is_callresp(r.attrs)]
        kinds = sorted(str(parse_event_attrs(r.attrs or {}).type) for r in recs)
        assert kinds == ["ack", "delivered"]


def _raise(level: int, since_ms: int, prev: int = 0) -> AlarmEvent:
    rule = Rule("gas-1", "gas-1/gas_lel", RuleKind.HIGH, (25.0, 50.0))
    return AlarmEvent(rule, AlarmState.RAISED if prev == 0 else AlarmState.CHANGED, level, prev,
                      since_ms, 57.5, 50.0, since_ms)


async def test_local_rule_plays_only_cut_off_and_once(rig: Rig) -> None:
    """The local rule ignores level 1, a raise while central is reachable and other alarms;
    a level-2 raise while cut off plays on every terminal once, also if handed in again."""
    online = {"up": True}
    cfg = LocalWarningConfig(text="燃气泄漏，请撤离", alarms=["gas-1/gas_lel/*"])
    rule = LocalWarningRule(cfg, rig.service, online=lambda: online["up"])
    task = asyncio.create_task(rule.run())
    try:
        rule.on_alarm_events([_raise(2, 1_000)])  # central reachable: its workflow decides
        online["up"] = False
        rule.on_alarm_events([_raise(1, 2_000)])  # level 1
        other = dataclasses.replace(_raise(2, 3_000), rule=Rule(
            "gas-2", "gas-2/o2", RuleKind.LOW, (19.5, 18.0)))
        rule.on_alarm_events([other])
        rule.on_alarm_events([_raise(2, 4_000, prev=1)])  # 1 -> 2 while cut off: plays
        await until(lambda: rule.played == 1, "played", timeout=TIMEOUT)
        await rule.play(_raise(2, 4_000, prev=1))  # the same raise again: not replayed
        assert rule.played == 1 and rule.skipped_online == 1
        assert [p.play.text for p in rig.tcp.played] == ["燃气泄漏，请撤离"]
        assert len(rig.pty.played) == 1
        (report,) = [a for a in await rig.events() if a["event"] == LOCAL_EVENT]
        assert report["warning_id"] == local_warning_id("gas-1/gas_lel/high", 4_000)
    finally:
        task.cancel()


def test_terminal_config_errors_name_the_line(tmp_path: Path) -> None:
    """A terminal with both lines, a duplicate id and a local warning naming an unknown
    terminal are config errors that name their lines."""
    base = f'[gateway]\nid = "gw-1"\ndata_dir = "{tmp_path}"\n'
    ok = parse_config(base + '[[terminals]]\nid = "t-1"\ntcp = "10.0.0.5:7700"\n'
                      '[[terminals]]\nid = "t-2"\nserial = "/dev/ttyUSB2"\nkind = "video"\n'
                      '[local_warning]\ntext = "撤离"\nterminals = ["t-2"]\n')
    assert [(t.endpoint, t.kind) for t in ok.terminals] == [
        ("tcp://10.0.0.5:7700", "audio"), ("serial:///dev/ttyUSB2", "video")]
    cases = [
        ('[[terminals]]\nid = "t-1"\ntcp = "h:1"\nserial = "/dev/x"\n', "site.toml:4",
         "exactly one of tcp and serial"),
        ('[[terminals]]\nid = "t-1"\ntcp = "h:1"\n[[terminals]]\nid = "t-1"\ntcp = "h:2"\n',
         "site.toml:8 terminals[1].id", "duplicate terminal id"),
        ('[[terminals]]\nid = "t-1"\ntcp = "nohost"\n', "site.toml:6 terminals[0].tcp",
         "host:port"),
        ('[[terminals]]\nid = "t-1"\ntcp = "h:1"\n[local_warning]\ntext = "x"\n'
         'terminals = ["t-9"]\n', "site.toml:9 local_warning.terminals[0]", "no terminal"),
    ]
    for text, where, what in cases:
        with pytest.raises(ConfigError) as err:
            parse_config(base + text)
        assert where in str(err.value) and what in str(err.value), str(err.value)


async def test_terminal_lost_and_back_reconnects_with_events(rig: Rig) -> None:
    """A terminal that goes away is a `lost` fault event; the driver reconnects by itself
    once it is back, and the fault clears."""
    link = rig.service.links["t-1"]
    await rig.tcp.stop()
    await until(lambda: not link.connected, "link down", timeout=TIMEOUT)
    await until(lambda: _has(rig.faults(), ("t-1", "lost", "raised")), "lost", timeout=TIMEOUT)
    out = await rig.service.play(play_warning("w-4", "red", "红色", 1, ["t-1"]), origin="ip")
    assert (out["t-1"].result, out["t-1"].reason) == (PlayResult.REFUSED, "not_connected")
    async with TcpTerminalSimulator("t-1", port=rig.tcp.port, heartbeat_s=5):
        await until(lambda: link.connected, "reconnected", timeout=TIMEOUT)
        await until(lambda: _has(rig.faults(), ("t-1", "lost", "cleared")), "back",
                    timeout=TIMEOUT)
    assert link.counters.connects >= 2 and link.counters.lost >= 1


async def test_crash_between_append_and_mark_appends_nothing_twice(tmp_path: Path) -> None:
    """Ledger rows left unreported by a crash: one the outbox already holds is only marked at
    the next start, one that never reached the outbox is appended then; each is there once."""
    attrs = {k: {"event": "callresp", "v": 1, "type": "ack", "warning_id": "w-1",
                 "terminal": k, "at_ms": 1000} for k in ("t-1", "t-2")}
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        async with TerminalLedger.open(tmp_path / "terminals.db") as ledger:
            for t, a in attrs.items():
                assert await ledger.claim_event(("w-1", t, "ack"), a, 1000)
            # t-1: appended, then the crash (never marked); t-2: the crash came before
            await outbox.append([NewRecord(kind=RecordKind.EVENT, ts_ms=1000, point=None,
                                           value=None, attrs=attrs["t-1"])])
        service = TerminalService(terminals=[], ledger_path=tmp_path / "terminals.db",
                                  outbox=outbox)
        async with service.open():
            assert service.counters.events_reappended == 1
            assert await service.ledger.unreported() == []
            await service.ledger.warning("w-1", origin="ip", cmd_id=None, now_ms=1000)
            assert await service.ledger.prune(999) == 0  # older rows only
            assert await service.ledger.prune(2000) == 3  # two events and their warning
        recs = [r.attrs for r in await outbox.next_batch(100) if r.kind is RecordKind.EVENT]
        assert sorted(a["terminal"] for a in recs if a) == ["t-1", "t-2"]


async def test_status_reads_the_ledger_once_its_schema_is_there(tmp_path: Path) -> None:
    """`read_summary` (status without the agent): no file, or one the agent is creating (no
    schema committed yet), is nothing to read, not an error; a migrated file gives its faults
    and events; a file that is no database raises the ledger's error."""
    path = tmp_path / "terminals.db"
    assert read_summary(path) is None
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")  # the agent's first step, before its schema
    assert path.exists() and read_summary(path) is None
    async with TerminalLedger.open(path) as ledger:
        await ledger.set_fault("t-1", "lost", True, 1000)
        assert await ledger.claim_event(("w-1", "t-1", "ack"), {}, 1000)
        assert read_summary(path) == LedgerSummary({"t-1": {"lost": 1000}}, {"t-1": {"ack": 1}})
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, " * 64)
    with pytest.raises(TerminalLedgerError):
        read_summary(garbage)


async def test_unanswered_play_is_repeated_and_its_late_receipt_recorded(rig: Rig) -> None:
    """A terminal that plays but sends no receipt (silent): the command hears `sent`, the PLAY
    goes again every 3 s (the terminal does not play a repeat twice), and the receipt that
    finally comes is recorded as delivered."""
    rig.tcp.set_faults(silent=True)
    out = await rig.service.play(play_warning("w-5", "yellow", "黄色预警", 1, ["t-1"]),
                                 origin="ip")
    assert out["t-1"].result is PlayResult.SENT
    link = rig.service.links["t-1"]
    await until(lambda: link.counters.play_repeats >= 1, "a repeat", timeout=TIMEOUT)
    assert rig.tcp.stats()["duplicates"] >= 1 and len(rig.tcp.played) == 1
    rig.tcp.set_faults(silent=False)
    await until(lambda: _eq(rig.callresp(), [("w-5", "t-1", "delivered")]), "late receipt",
                timeout=TIMEOUT)


@pytest.mark.parametrize("first,second", [("beidou", "ip"), ("ip", "pdt")])
async def test_one_command_plays_once_across_bearers(rig: Rig, first: str, second: str) -> None:
    """The same signed command by radio then IP (or IP then radio) plays once; the second
    copy reports what the terminals did (t-1 delivered; t-2 silent: still sent) and plays
    nothing. A re-send from central (a new cmd_id, same warning) plays again."""
    rig.pty.set_faults(silent=True)
    args = play_warning("w-7", "orange", "山洪橙色预警", 1, ["t-1", "t-2", "t-9"])
    out = await rig.service.play(args, origin=first, cmd_id="c-7")
    assert [(t, str(o.result)) for t, o in out.items()] == [
        ("t-1", "delivered"), ("t-2", "sent"), ("t-9", "refused")]
    assert (len(rig.tcp.played), len(rig.pty.played)) == (1, 1)
    again = await rig.service.play(args, origin=second, cmd_id="c-7")
    assert {t: o.to_wire() for t, o in again.items()} == {
        "t-1": {"result": "delivered"}, "t-2": {"result": "sent"},
        "t-9": {"result": "refused", "reason": "unknown_terminal"}}
    await asyncio.sleep(0.3)  # a PLAY sent by mistake would have been played by now
    assert (len(rig.tcp.played), len(rig.pty.played)) == (1, 1)
    assert (rig.service.counters.plays, rig.service.counters.plays_repeated) == (1, 1)
    assert await rig.callresp() == [("w-7", "t-1", "delivered")]
    # central re-sends (no answer by the deadline): a new cmd_id plays again
    resent = await rig.service.play(args, origin=second, cmd_id="c-8")
    assert str(resent["t-1"].result) == "delivered"
    assert len(rig.tcp.played) == 2 and rig.service.counters.plays == 2


async def test_play_claim_survives_a_restart(tmp_path: Path) -> None:
    """The claim of a command is in the ledger: its IP copy after a restart (radio first)
    plays nothing and reports the receipt recorded before. (A fresh simulator each run: one
    kept would take the new run's PLAY, seq 1 again, for a repeat and not play it anyway.)"""
    args = play_warning("w-9", "red", "暴雨红色预警", 1, ["t-1"])
    async with Outbox.open(tmp_path / "outbox.db") as outbox, \
            PtyTerminalSimulator("t-2", heartbeat_s=5) as pty:
        for origin, plays in (("pdt", 1), ("ip", 0)):
            async with TcpTerminalSimulator("t-1", heartbeat_s=5) as tcp, \
                    running(_service(tmp_path, outbox, tcp, pty)) as service:
                out = await service.play(args, origin=origin, cmd_id="c-9")
                assert str(out["t-1"].result) == "delivered"
                assert len(tcp.played) == plays, origin
