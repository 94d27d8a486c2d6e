"""The BeiDou terminal driver (`edge_agent.bearers.beidou`) against the terminal simulator on a
real pty, in both dialects: card info, sends accepted and refused, beams, silence, garbage and
a port that goes away and comes back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent import bearers
from edge_agent.bearers.beidou import BeidouTerminal, Dialect, InboundMessage
from firmware_stubs.beidou_sim import BeidouMode, BeidouTerminalSimulator
from protocols.beidou import Bd3Message
from tests.helpers import FakeClock, until

CENTRAL = "0242407"
STEP_S = 5.0  # generous: the simulator answers at once, but CI is a loaded box
DIALECTS: dict[Dialect, BeidouMode] = {"bd3": BeidouMode.BD3, "bd2": BeidouMode.BD2}


@contextlib.asynccontextmanager
async def pair(dialect: Dialect, *, step_timeout_s: float = STEP_S,
               max_payload_bytes: int | None = None, **sim: object,
               ) -> AsyncIterator[tuple[BeidouTerminalSimulator, BeidouTerminal]]:
    """A started simulator of `dialect` and the driver open on its pty."""
    card = "4238473" if dialect == "bd3" else "0247718"
    settings: dict[str, object] = {"card_id": card} | sim
    async with BeidouTerminalSimulator(mode=DIALECTS[dialect], **settings) as s:  # type: ignore[arg-type]
        async with BeidouTerminal(s.link_path, dialect=dialect, step_timeout_s=step_timeout_s,
                                  max_payload_bytes=max_payload_bytes) as t:
            yield s, t


async def test_card_info_bd3() -> None:
    """BD-3: `$BDICP` gives card, level (0 read as 5) and interval; the limit is the regional
    service's 14,000 bits unless `max_payload_bytes` lowers it."""
    async with pair("bd3", card_id="15240507", level=5, interval_s=60) as (_, t):
        assert await t.info() == bearers.CardInfo("15240507", 5, 60, 1750, "bd3")
    async with pair("bd3", max_payload_bytes=70) as (_, t):
        assert (await t.info()).payload_bytes == 70
        assert t.card is not None and t.card.payload_bytes == 70


@pytest.mark.parametrize(("level", "encrypted", "payload"), [(3, False, 77), (1, False, 12),
                                                             (4, True, 209)])
async def test_card_info_bd2(level: int, encrypted: bool, payload: int) -> None:
    """BD-2: the limit is the mixed-mode payload of the card level's capacity (77 at level 3)."""
    async with pair("bd2", level=level, encrypted=encrypted, interval_s=0.3) as (_, t):
        info = await t.info()
    assert info == bearers.CardInfo("0247718", level, 1, payload, "bd2", encrypted)


@pytest.mark.parametrize("dialect", ["bd3", "bd2"])
async def test_send_accepted_then_too_early_refused_with_wait(dialect: Dialect) -> None:
    """A send is accepted and reaches the simulator; one within the interval is refused as
    INTERVAL with the seconds left; after them a send goes again."""
    clock = FakeClock()
    async with pair(dialect, interval_s=60, clock=clock) as (sim, t):
        assert await t.send(CENTRAL, b"\x01\x02\xff") == bearers.SendResult(True)
        clock.now += 20.5
        early = await t.send(CENTRAL, b"early")
        assert (early.accepted, early.reason) == (False, bearers.Refusal.INTERVAL)
        assert early.wait_s == 40
        clock.now += 40
        assert (await t.send(CENTRAL, b"later")).accepted
        assert [m.payload for m in sim.sent_messages()] == [b"\x01\x02\xff", b"later"]
        assert [m.recipient for m in sim.sent_messages()] == [CENTRAL, CENTRAL]
        assert (t.counters.sent, t.counters.refused) == (2, 1)
        assert t.counters.refused_by_reason == {"interval": 1}


async def test_bd3_no_beams_not_ready_and_refused() -> None:
    """BD-3 without beams: `ready` turns False with the next `$BDPWI`, `wait_ready` gives up,
    and a send is refused as NO_BEAMS (reason 4); with beams back it is ready again."""
    async with pair("bd3", pwi_period_s=0.05) as (sim, t):
        assert await t.wait_ready(STEP_S)
        sim.set_faults(no_beams=True)
        await until(lambda: not t.ready)
        assert not await t.wait_ready(0.3)
        refused = await t.send(CENTRAL, b"x")
        assert (refused.accepted, refused.reason, refused.code) == (
            False, bearers.Refusal.NO_BEAMS, 4)
        sim.set_faults(no_beams=False)
        assert await t.wait_ready(STEP_S)
        assert (await t.send(CENTRAL, b"x")).accepted


async def test_bd3_ready_needs_a_fresh_beam_report() -> None:
    """A beam report older than `pwi_max_age_s` does not make the terminal ready."""
    clock = FakeClock()
    async with BeidouTerminalSimulator(mode=BeidouMode.BD3, pwi_period_s=0.05) as sim:
        async with BeidouTerminal(sim.link_path, dialect="bd3", pwi_max_age_s=5.0,
                                  clock=clock) as t:
            assert await t.wait_ready(STEP_S)
            sim.set_faults(mute=True)  # no more reports
            # Two reports withheld: the ones written before are read by now (same loop).
            await until(lambda: sim.stats()["muted"] >= 2)
            assert t.ready
            clock.now += 6.0
            assert not t.ready


async def test_bd2_is_ready_without_beam_reports_and_refusals_are_typed() -> None:
    """BD-2 sends no `$BDPWI`, so it is always ready; suppression and radio silence come back
    as SUPPRESSED and SILENT."""
    async with pair("bd2", interval_s=0) as (sim, t):
        assert t.ready and await t.wait_ready(0.1)
        sim.set_faults(suppressed=True)
        assert (await t.send(CENTRAL, b"a")).reason is bearers.Refusal.SUPPRESSED
        sim.set_faults(suppressed=False, silent=True)
        assert (await t.send(CENTRAL, b"a")).reason is bearers.Refusal.SILENT
        sim.set_faults(silent=False)
        assert (await t.send(CENTRAL, b"a")).accepted
        assert t.counters.refused_by_reason == {"suppressed": 1, "silent": 1}


@pytest.mark.parametrize("dialect", ["bd3", "bd2"])
async def test_silent_terminal_times_out(dialect: Dialect) -> None:
    """A terminal that answers nothing gives BearerTimeoutError naming the step, each time."""
    async with pair(dialect, step_timeout_s=0.5) as (sim, t):
        sim.set_faults(mute=True)
        with pytest.raises(bearers.BearerTimeoutError) as card:
            await t.info()
        assert card.value.step == "card query" and card.value.timeout_s == 0.5
        with pytest.raises(bearers.BearerTimeoutError) as send:
            await t.send(CENTRAL, b"x")
        assert send.value.step == "send"
        assert t.counters.timeouts == 2
        sim.set_faults(mute=False)
        assert (await t.info()).card_id == sim.card_id


@pytest.mark.parametrize("dialect", ["bd3", "bd2"])
async def test_no_card(dialect: Dialect) -> None:
    """A terminal without a card answers the query with card 0000000: NoCardError."""
    async with pair(dialect) as (sim, t):
        sim.set_faults(no_card=True)
        with pytest.raises(bearers.NoCardError):
            await t.info()


async def test_garbage_and_bad_checksums_tolerated() -> None:
    """Noise and a sentence with a bad checksum are counted and skipped; the next sentences
    are read as usual."""
    async with pair("bd3", pwi_period_s=0.05) as (sim, t):
        sim.set_faults(garbage=40, bad_checksum=1)
        await until(lambda: sim.faults.garbage == 0 and sim.faults.bad_checksum == 0)
        await until(lambda: t.counters.bad_sentences >= 1 and t.counters.garbage_bytes >= 40)
        assert (await t.info()).card_id == sim.card_id
        assert (await t.send(CENTRAL, b"ok")).accepted


async def test_wrong_recipient_for_dialect() -> None:
    """A BD-2 send to an 8-digit card cannot be made: BearerRequestError, nothing written."""
    async with pair("bd2") as (sim, t):
        with pytest.raises(bearers.BearerRequestError):
            await t.send("15240507", b"x")
        assert sim.stats()["accepted"] + sim.stats()["refused"] == 0


async def test_inbound_message_handed_over() -> None:
    """A message central's terminal sends arrives as a `$BDTCI` and goes to `on_message`."""
    got: list[InboundMessage] = []
    async with BeidouTerminalSimulator(mode=BeidouMode.BD3) as sim:
        async with BeidouTerminal(sim.link_path, dialect="bd3", on_message=got.append) as t:
            sim.inject_inbound(CENTRAL, b"\x10\x20")
            await until(lambda: bool(got))
    assert isinstance(got[0], Bd3Message) and got[0].payload == b"\x10\x20"
    assert t.counters.inbound == 1


async def test_port_lost_then_reopened(tmp_path: Path) -> None:
    """When the line goes away the port is closed and steps fail with BearerPortError; once a
    terminal is back on the same path the next step opens it again."""
    link = tmp_path / "ttyBD0"
    t = BeidouTerminal(str(link), dialect="bd2", step_timeout_s=STEP_S)
    try:
        async with BeidouTerminalSimulator(mode=BeidouMode.BD2, symlink=link):
            assert (await t.info()).card_id == "0242407"
        await until(lambda: not t.is_open)
        assert t.counters.port_lost == 1
        with pytest.raises(bearers.BearerPortError):
            await t.info()
        async with BeidouTerminalSimulator(mode=BeidouMode.BD2, card_id="0247718",
                                           symlink=link):
            assert (await t.info()).card_id == "0247718"
        assert t.counters.port_opens == 2
    finally:
        await t.close()

