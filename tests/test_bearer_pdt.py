"""The PDT radio driver (`edge_agent.bearers.pdt`) against the Hytera radio simulator on real
ptys: the HRNP connect, sends accepted (the exact frame text arriving at a linked radio) and
refused by TMP result, no answer, garbage and a port that goes away and comes back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent import bearers
from edge_agent.bearers.pdt import PdtRadio
from firmware_stubs.pdt_sim import PdtAir, PdtRadioSimulator
from protocols.hrnp import HrnpOpcode, HrnpPacket, encode_packet
from protocols.hrnp_text import TextMessage, TextResult
from protocols.narrowband import from_text, to_text
from tests.helpers import until

OURS, CENTRAL = 1001, 2002
STEP_S = 5.0  # generous: the simulator answers at once, but CI is a loaded box
FRAME = bytes(range(40))


@contextlib.asynccontextmanager
async def pair(*, step_timeout_s: float = STEP_S, **radio: object,
               ) -> AsyncIterator[tuple[PdtRadioSimulator, PdtRadioSimulator, PdtRadio]]:
    """The gateway's radio and central's on one air, and the driver open on the gateway's."""
    air = PdtAir()
    async with PdtRadioSimulator(air, OURS) as ours, PdtRadioSimulator(air, CENTRAL) as theirs:
        async with PdtRadio(ours.link_path, radio_id=OURS, step_timeout_s=step_timeout_s,
                            **radio) as r:  # type: ignore[arg-type]
            yield ours, theirs, r


async def test_connect_and_info() -> None:
    """Opening connects (the radio accepts); info gives the radio id, the configured interval
    and the frame bytes whose text fits `max_text_bytes`."""
    async with pair(interval_s=7) as (ours, _, r):
        assert r.ready and ours.connected and ours.stats()["connects"] == 1
        assert await r.info() == bearers.CardInfo(str(OURS), 0, 7, 45, "pdt")
        assert await r.wait_ready(0.1)
    async with pair(max_text_bytes=256) as (_, _, r):
        assert (await r.info()).payload_bytes == 93  # 128 units - 4 = 124 chars: 31 groups


async def test_accepted_send_arrives_as_frame_text() -> None:
    """An accepted send reaches the linked radio as a private text from our radio id whose
    text is exactly the frame's text form; both data packets are acked."""
    async with pair() as (ours, theirs, r):
        assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(True)
        assert await r.send(str(CENTRAL), b"\x01") == bearers.SendResult(True)
        (first, second) = theirs.received
        assert (first.destination, first.source, first.group) == (CENTRAL, OURS, False)
        assert first.text == to_text(FRAME) and from_text(first.text) == FRAME
        assert second.text == "FL1:AQ==" and first.request_id + 1 == second.request_id
        await until(lambda: ours.stats()["data_acks_received"] == 2)  # the two text acks
        assert r.counters.sent == 2 and r.counters.data_acks_sent == 2


@pytest.mark.parametrize(("code", "reason"), [
    (TextResult.CHANNEL_BUSY, bearers.Refusal.CHANNEL_BUSY),
    (TextResult.NO_CONTACT, bearers.Refusal.NO_CONTACT),
    (TextResult.TX_DENIED, bearers.Refusal.TX_DENIED),
    (TextResult.LOW_BATTERY, bearers.Refusal.LOW_BATTERY),
    (TextResult.FAIL, bearers.Refusal.OTHER),
    (TextResult.REPEATER_WAKEUP_FAIL, bearers.Refusal.OTHER),
])
async def test_fault_codes_are_typed_refusals(code: TextResult, reason: bearers.Refusal) -> None:
    """Each TMP result is a refusal with its reason and code, nothing is sent on the air, and
    the next send goes."""
    async with pair() as (ours, theirs, r):
        ours.set_faults(result=code, times=1)
        assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(False, reason, 0, code)
        assert theirs.received == []
        assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(True)
        assert r.counters.refused_by_reason == {str(reason): 1}


async def test_unknown_recipient_is_no_contact() -> None:
    """A radio id nobody has on the air: the radio answers no contact."""
    async with pair() as (_, _, r):
        result = await r.send("9999", FRAME)
        assert (result.accepted, result.reason, result.code) == (
            False, bearers.Refusal.NO_CONTACT, 10)


async def test_no_answer_is_a_timeout_and_a_late_ack_is_not_taken() -> None:
    """No text ack within the step is BearerTimeoutError("text ack"); with no data ack either
    it is "data ack" and the next send connects again."""
    async with pair(step_timeout_s=0.5) as (ours, theirs, r):
        ours.set_faults(no_answer=True, times=1)
        with pytest.raises(bearers.BearerTimeoutError) as err:
            await r.send(str(CENTRAL), FRAME)
        assert (err.value.step, err.value.timeout_s) == ("text ack", 0.5)
        assert r.ready  # the radio took the packet: the link is up
        assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(True)
        ours.set_faults(silent=True)
        with pytest.raises(bearers.BearerTimeoutError) as err:
            await r.send(str(CENTRAL), FRAME)
        assert err.value.step == "data ack" and not r.ready
        ours.set_faults(silent=False)
        assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(True)
        assert ours.stats()["connects"] == 2 and r.counters.timeouts == 2
        assert len(theirs.received) == 2


async def test_rejected_connect() -> None:
    """A radio that rejects the link: ConnectRejectedError, and wait_ready says no."""
    air = PdtAir()
    async with PdtRadioSimulator(air, OURS) as ours:
        ours.set_faults(reject_connect=True)
        r = PdtRadio(ours.link_path, step_timeout_s=STEP_S)
        try:
            with pytest.raises(bearers.ConnectRejectedError):
                await r.info()
            assert not await r.wait_ready(STEP_S)
            ours.set_faults(reject_connect=False)
            assert await r.wait_ready(STEP_S)
        finally:
            await r.close()


async def test_bad_requests_are_refused_before_the_line() -> None:
    """A recipient that is not a radio id, or a frame whose text is over the radio's limit, is
    BearerRequestError; nothing is written."""
    async with pair() as (ours, _, r):
        for recipient in ("central", "0", "16777216", "-1", "١٢"):
            with pytest.raises(bearers.BearerRequestError):
                await r.send(recipient, FRAME)
        with pytest.raises(bearers.BearerRequestError):
            await r.send(str(CENTRAL), bytes(r.payload_bytes + 1))
        assert ours.stats()["text_requests"] == 0
        assert await r.send(str(CENTRAL), bytes(r.payload_bytes)) == bearers.SendResult(True)


async def test_garbage_tolerated_and_incoming_text_acked() -> None:
    """Noise, a corrupted packet and a stray 0x7E on the line are counted and skipped; an
    incoming text is data-acked and handed over; sends go on."""
    got: list[TextMessage] = []
    async with pair(on_message=got.append, quiet_s=0.1) as (ours, theirs, r):
        assert ours._line is not None
        corrupted = bytearray(encode_packet(HrnpPacket(HrnpOpcode.ACCEPT, 9, 0x10, 0x20)))
        corrupted[-1] ^= 0xFF
        ours._line.write(b"\x00\xffAT\r\n" + bytes(corrupted) + b"\x7e\x04\x00")
        await until(lambda: r.counters.bad_packets >= 2 and r.counters.garbage_bytes >= 6)
        theirs.air.transmit(TextMessage(77, OURS, CENTRAL, "收到 请回复"), theirs)
        await until(lambda: bool(got))
        assert got[0].text == "收到 请回复" and r.counters.inbound == 1
        await until(lambda: ours.stats()["data_acks_received"] == 1)
        assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(True)


async def test_port_lost_then_reopened(tmp_path: Path) -> None:
    """When the line goes away steps fail with BearerPortError; once a radio is back on the
    same path the next step opens the port and connects again."""
    link = tmp_path / "ttyPDT0"
    air = PdtAir()
    r = PdtRadio(str(link), radio_id=OURS, step_timeout_s=STEP_S)
    try:
        async with PdtRadioSimulator(air, CENTRAL) as theirs:
            async with PdtRadioSimulator(air, OURS, symlink=link):
                assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(True)
            await until(lambda: not r.is_open)
            assert r.counters.port_lost == 1 and not r.ready
            with pytest.raises(bearers.BearerPortError):
                await r.send(str(CENTRAL), FRAME)
            async with PdtRadioSimulator(air, OURS, symlink=link) as again:
                assert await r.send(str(CENTRAL), FRAME) == bearers.SendResult(True)
                assert again.stats()["connects"] == 1
            assert r.counters.port_opens == 2 and len(theirs.received) == 2
    finally:
        await r.close()
