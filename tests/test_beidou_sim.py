"""BeiDou RDSS terminal simulator on a real pty, driven through pyserial like the agent does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
import serial

from firmware_stubs.beidou_sim import (
    BeidouMode,
    BeidouSky,
    BeidouTerminalSimulator,
)
from firmware_stubs.errors import SimulatorError
from protocols import beidou as bd
from tests.helpers import FakeClock, serial_port, until

S = TypeVar("S")
BD2, BD3 = BeidouMode.BD2, BeidouMode.BD3


class SerialTerminal:
    """The agent's side of the line: a pyserial port on the pty, blocking calls in threads."""

    def __init__(self, port: serial.Serial) -> None:
        self._port = port
        self._decoder = bd.BeidouDecoder()
        self.errors: list[bd.BeidouError] = []

    async def send(self, item: bd.Sentence | bytes) -> None:
        data = item if isinstance(item, bytes) else bd.encode(item)
        await asyncio.to_thread(self._port.write, data)

    async def expect(self, kind: type[S], where: Callable[[S], bool] = lambda _: True,
                     timeout: float = 5.0) -> S:
        """The next sentence of `kind` that satisfies `where`, skipping others (PWI reports)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._decoder.next_sentence()
            except bd.BeidouError as exc:
                self.errors.append(exc)
                continue
            if item is bd.NEED_DATA:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {kind.__name__} within {timeout}s")
                self._decoder.feed(await asyncio.to_thread(self._port.read, 4096))
            elif isinstance(item, kind) and where(item):
                return item

    async def ask(self, request: bd.Sentence, kind: type[S]) -> S:
        await self.send(request)
        return await self.expect(kind)


@contextlib.asynccontextmanager
async def terminal(sim: BeidouTerminalSimulator) -> AsyncIterator[SerialTerminal]:
    """Open the simulator's pty with pyserial at 115200 baud for the block."""
    async with serial_port(sim.link_path, timeout=0.05) as port:
        yield SerialTerminal(port)


@contextlib.asynccontextmanager
async def running(**settings: object) -> AsyncIterator[tuple[BeidouTerminalSimulator,
                                                             SerialTerminal]]:
    """A started simulator with these settings and a serial port open on it."""
    async with BeidouTerminalSimulator(**settings) as sim:  # type: ignore[arg-type]
        async with terminal(sim) as port:
            yield sim, port


async def test_card_queries_answered() -> None:
    """`$CCICR` gets `$BDICP` (level 5 sent as 0) and `$CCICA` gets `$BDICI`, per dialect."""
    async with running(mode=BD3, card_id="15240507", level=5, interval_s=60) as (sim, port):
        await port.send(bd.Bd2CardQuery())  # the other dialect: ignored
        info = await port.ask(bd.Bd3CardQuery(), bd.Bd3CardInfo)
        assert (info.card_id, info.interval_s, info.level_code, info.level) == (
            "15240507", 60, 0, 5)
        assert sim.stats()["wrong_dialect"] == 1 and sim.stats()["card_queries"] == 1
    async with running(mode=BD2, card_id="0247718", level=3, interval_s=0.3) as (sim, port):
        ici = await port.ask(bd.Bd2CardQuery(), bd.Bd2CardInfo)
        assert (ici.card_id, ici.level, ici.interval_s, ici.encrypted) == ("0247718", 3, 1, False)
        assert ici.has_card


async def test_beam_reports_and_no_beams_fault() -> None:
    """`$BDPWI` comes every period with time and beams; with no beams, 000000.00 and none."""
    clock = FakeClock()
    async with running(mode=BD3, pwi_period_s=0.05, clock=clock) as (sim, port):
        for _ in range(3):
            assert (await port.expect(bd.BeamReport)).ready
        sim.set_faults(no_beams=True)
        dark = await port.expect(bd.BeamReport, lambda r: not r.ready)
        assert dark == bd.BeamReport(dark.time) and not dark.has_time and not dark.bd3_beams
        refused = await port.ask(bd.Bd3Send("0242407", b"x"), bd.Bd3Feedback)
        assert (refused.executed, refused.reason) == (False, bd.Bd3Reason.POWER_NOT_LOCKED)
        sim.set_faults(no_beams=False)
        assert (await port.expect(bd.BeamReport, lambda r: r.ready)).has_time
        assert (await port.ask(bd.Bd3Send("0242407", b"x"), bd.Bd3Feedback)).executed
        assert sim.stats()["pwi"] >= 5


async def test_bd3_send_then_too_early_send_refused_with_wait() -> None:
    """A TCQ is accepted and recorded; the next within the interval gets reason 1 and a wait."""
    clock = FakeClock()
    async with running(mode=BD3, card_id="4238473", interval_s=60, clock=clock) as (sim, port):
        first = await port.ask(bd.Bd3Send("0242407", b"\x01\xa4\xff", bd.Bd3Encoding.MIXED),
                               bd.Bd3Feedback)
        assert (first.command, first.executed, first.reason, first.wait_s) == ("TCQ", True, 0, 0)
        clock.now += 20.5
        early = await port.ask(bd.Bd3Send("0242407", b"again"), bd.Bd3Feedback)
        assert (early.executed, early.reason, early.wait_s) == (False, bd.Bd3Reason.INTERVAL, 40)
        clock.now += 39.6
        assert (await port.ask(bd.Bd3Send("0242407", b"later"), bd.Bd3Feedback)).executed
        sent = sim.sent_messages()
        assert [(m.sender, m.recipient, m.payload) for m in sent] == [
            ("4238473", "0242407", b"\x01\xa4\xff"), ("4238473", "0242407", b"later")]
        assert sent[0].at == 1000.0 and sent[0].encoding is bd.Bd3Encoding.MIXED
        assert sim.stats()["refused_interval"] == 1


async def test_bd2_send_interval_on_real_clock() -> None:
    """On BD-2 a too-early TXA gets interval flag N and mmss; after 0.3 s a send goes again."""
    async with running(mode=BD2, card_id="0247718", interval_s=0.3) as (sim, port):
        assert await port.ask(bd.Bd2Send("0242407", b"one"), bd.Bd2Feedback) == bd.Bd2Feedback()
        sim.interval_s = 3600.0  # lengthen it: the refusal must not depend on how fast we are
        early = await port.ask(bd.Bd2Send("0242407", b"two"), bd.Bd2Feedback)
        assert (early.executed, early.interval_ok, early.suppression) == (False, False, 0)
        assert 3500 <= early.wait_s <= 3600
        sim.interval_s = 0.3
        await asyncio.sleep(0.4)
        assert (await port.ask(bd.Bd2Send("0242407", b"three"), bd.Bd2Feedback)).executed
        assert [m.payload for m in sim.sent_messages()] == [b"one", b"three"]


async def test_over_capacity_payload_refused() -> None:
    """A payload over the card's capacity is refused (N, no reason); one that fits goes."""
    clock = FakeClock()
    async with running(mode=BD2, level=3, clock=clock) as (sim, port):
        fits = bd.mixed_mode_payload_bytes(sim.capacity_bits)
        assert fits == 77
        big = await port.ask(bd.Bd2Send("0242407", bytes(fits + 1)), bd.Bd2Feedback)
        assert (big.executed, big.interval_ok, big.suppression, big.wait_s) == (
            False, True, 0, 0)
        assert (await port.ask(bd.Bd2Send("0242407", bytes(fits)), bd.Bd2Feedback)).executed
        assert sim.stats()["refused_too_long"] == 1
    async with running(mode=BD3, capacity_bits=560, clock=clock) as (sim, port):
        big3 = await port.ask(bd.Bd3Send("0242407", bytes(71)), bd.Bd3Feedback)
        assert (big3.executed, big3.reason) == (False, bd.Bd3Reason.NONE)
        assert (await port.ask(bd.Bd3Send("0242407", bytes(70)), bd.Bd3Feedback)).executed
        assert len(sim.sent_messages()) == 1


async def test_linked_terminals_deliver_exact_payload() -> None:
    """A message one terminal accepts reaches the addressed one as `$BDTCI` or `$BDTXR`."""
    sky = BeidouSky()
    payload = bytes(range(256))[:200]
    gateway = BeidouTerminalSimulator(mode=BD3, card_id="4238473", interval_s=0, sky=sky)
    central = BeidouTerminalSimulator(mode=BD3, card_id="0242407", sky=sky)
    old = BeidouTerminalSimulator(mode=BD2, card_id="0247718", level=4, sky=sky)
    async with gateway, central, old:
        async with terminal(gateway) as g_port, terminal(central) as c_port, \
                terminal(old) as o_port:
            assert (await g_port.ask(bd.Bd3Send("0242407", payload), bd.Bd3Feedback)).executed
            got = await c_port.expect(bd.Bd3Message)
            assert (got.sender, got.recipient, got.payload, got.encoding) == (
                "4238473", "0242407", payload, bd.Bd3Encoding.MIXED)
            assert got.time is not None
            assert [m.payload for m in central.received_messages()] == [payload]
            short = b"\x00\xa4,*$\r\n"
            assert (await g_port.ask(bd.Bd3Send("0247718", short), bd.Bd3Feedback)).executed
            txr = await o_port.expect(bd.Bd2Message)
            assert (txr.sender, txr.payload, txr.mode, txr.kind) == (
                "4238473", short, bd.Bd2Mode.MIXED, 1)
            assert (await g_port.ask(bd.Bd3Send("9999999", b"nobody"), bd.Bd3Feedback)).executed
            assert (sky.delivered, sky.undeliverable) == (2, 1)


async def test_injected_inbound_message_arrives() -> None:
    """`inject_inbound()` puts a message from the central's card on the line."""
    async with running(mode=BD3, card_id="4238473", pwi_period_s=None) as (sim, port):
        sim.inject_inbound("0242407", b"\xa4warn", encoding=bd.Bd3Encoding.CODE)
        tci = await port.expect(bd.Bd3Message)
        assert (tci.sender, tci.recipient, tci.payload, tci.encoding) == (
            "0242407", "4238473", b"\xa4warn", bd.Bd3Encoding.CODE)
    async with running(mode=BD2, card_id="0247718") as (sim, port):
        sim.inject_inbound("0242407", b"\x01\x02", express=True)
        txr = await port.expect(bd.Bd2Message)
        assert (txr.sender, txr.payload, txr.mode, txr.kind) == (
            "0242407", b"\x01\x02", bd.Bd2Mode.MIXED, 2)
        assert txr.time is not None and txr.time.second == 0
        with pytest.raises(SimulatorError, match="sender"):
            sim.inject_inbound("12345678901", b"x")  # no BD-2 sender has 11 digits


async def test_garbage_on_line_counted_not_fatal() -> None:
    """Noise, bad checksums, cut-off and overlong lines are counted; the terminal still answers."""
    async with running(mode=BD3, pwi_period_s=None) as (sim, port):
        await port.send(b"\x00\xff noise\r\n$CCICR,0,00*00\r\n$GARBAGE" + b"$" + b"A" * 5000)
        await port.send(b"\r\n\xfe" + bd.encode(bd.UnknownSentence("GNRMC", ("1",))))
        info = await port.ask(bd.Bd3CardQuery(), bd.Bd3CardInfo)
        assert info.card_id == sim.card_id
        stats = sim.stats()
        assert stats["bad_sentences"] >= 3  # checksum, cut off, too long (and the tail)
        assert stats["discarded_bytes"] > 5000
        assert stats["unknown"] == 1 and stats["card_queries"] == 1


async def test_refusal_faults_give_their_reasons() -> None:
    """Silence, suppression and no card refuse sends with the right BD-3 reason / BD-2 code."""
    clock = FakeClock()
    async with running(mode=BD3, pwi_period_s=None, clock=clock) as (sim, port):
        for fault, reason in (("silent", bd.Bd3Reason.SILENT),
                              ("suppressed", bd.Bd3Reason.SUPPRESSED),
                              ("no_card", bd.Bd3Reason.NO_CARD)):
            sim.set_faults(**{fault: True})
            fki = await port.ask(bd.Bd3Send("0242407", b"x"), bd.Bd3Feedback)
            assert (fki.executed, fki.reason) == (False, reason), fault
            sim.set_faults(**{fault: False})
        sim.set_faults(no_card=True)
        assert not (await port.ask(bd.Bd3CardQuery(), bd.Bd3CardInfo)).has_card
        assert sim.sent_messages() == ()
    async with running(mode=BD2, clock=clock) as (sim, port):
        sim.set_faults(silent=True)
        fki2 = await port.ask(bd.Bd2Send("0242407", b"x"), bd.Bd2Feedback)
        assert (fki2.executed, fki2.suppression) == (False, bd.Bd2Suppression.RADIO_SILENCE)
        sim.set_faults(silent=False, suppressed=True)
        fki2 = await port.ask(bd.Bd2Send("0242407", b"x"), bd.Bd2Feedback)
        assert (fki2.executed, fki2.suppression) == (False, bd.Bd2Suppression.SYSTEM)


async def test_output_faults() -> None:
    """A bad checksum and noise spoil one answer; a muted terminal says nothing until unmuted."""
    async with running(mode=BD2, pwi_period_s=None) as (sim, port):
        sim.set_faults(bad_checksum=1, garbage=7)
        await port.send(bd.Bd2CardQuery())
        assert (await port.ask(bd.Bd2CardQuery(), bd.Bd2CardInfo)).card_id == sim.card_id
        assert len(port.errors) == 1
        assert sim.stats()["garbage_bytes"] == 7 and sim.stats()["bad_checksum"] == 1
        sim.set_faults(mute=True)
        await port.send(bd.Bd2CardQuery())
        await until(lambda: sim.stats()["card_queries"] == 3)
        sim.set_faults(mute=False)
        await port.ask(bd.Bd2CardQuery(), bd.Bd2CardInfo)
        assert sim.stats()["muted"] == 1 and sim.stats()["card_queries"] == 4


def test_settings_checked_at_once() -> None:
    """Bad settings raise SimulatorError before anything opens."""
    with pytest.raises(SimulatorError, match="card_id"):
        BeidouTerminalSimulator(mode=BD2, card_id="12345678")
    with pytest.raises(SimulatorError, match="level"):
        BeidouTerminalSimulator(mode=BD2, level=5)
    with pytest.raises(SimulatorError, match="interval_s"):
        BeidouTerminalSimulator(interval_s=-1)
    assert BeidouTerminalSimulator(mode=BD3, level=5).capacity_bits == 14_000
