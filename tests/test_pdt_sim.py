"""PDT radio simulator on real ptys, driven through pyserial as a gateway drives a Hytera radio."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import pytest
import serial

from firmware_stubs.errors import SimulatorError
from firmware_stubs.pdt_sim import PdtAir, PdtFaults, PdtRadioSimulator
from protocols.hrnp import (
    NEED_DATA,
    SERVICE_RCP,
    SERVICE_TEXT,
    AppMessage,
    HrnpDecoder,
    HrnpOpcode,
    HrnpPacket,
    decode_app,
    encode_app,
    encode_packet,
)
from protocols.hrnp_text import (
    TextAck,
    TextMessage,
    TextResult,
    decode_text,
    encode_text,
)
from tests.helpers import Inbox, serial_port, until

ALARM = "燃气泄漏 二级报警"
TIMEOUT = 15.0  # generous: CI is a loaded 2-core box; tests wait on behaviour, not time


class Gateway(Inbox[HrnpPacket]):
    """The gateway's side of one radio's serial port: pyserial, blocking calls in a thread."""

    def __init__(self, port: serial.Serial) -> None:
        super().__init__()
        self.port = port
        self.decoder = HrnpDecoder()
        self.next_number = 1

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self.port.write, data)

    async def send(self, packet: HrnpPacket) -> None:
        await self.write(encode_packet(packet))

    async def connect(self) -> None:
        await self.send(HrnpPacket(HrnpOpcode.CONNECT, 0))
        await self.expect(lambda p: p.opcode is HrnpOpcode.ACCEPT)

    async def send_app(self, app: AppMessage) -> int:
        """Send a data packet; its packet number."""
        number, self.next_number = self.next_number, self.next_number + 1
        await self.send(HrnpPacket(HrnpOpcode.DATA, number, payload=encode_app(app)))
        return number

    async def send_text(self, message: TextMessage) -> int:
        return await self.send_app(encode_text(message))

    async def _pump(self) -> None:
        self.decoder.feed(await asyncio.to_thread(
            lambda: self.port.read(max(1, self.port.in_waiting))))
        while (packet := self.decoder.next_packet()) is not NEED_DATA:
            self._received(packet)

    async def expect(self, match: Callable[[HrnpPacket], bool],
                     timeout: float = TIMEOUT) -> HrnpPacket:
        """The first packet received that matches, waiting up to `timeout` for it."""
        return await self._take(match, timeout)

    async def expect_text(self, timeout: float = TIMEOUT) -> TextMessage | TextAck:
        """The next text message or ack the radio sends (its data packet is acked)."""
        packet = await self.expect(lambda p: p.opcode is HrnpOpcode.DATA
                                   and decode_app(p.payload).service == SERVICE_TEXT, timeout)
        await self.send(HrnpPacket(HrnpOpcode.DATA_ACK, packet.packet_number))
        return decode_text(decode_app(packet.payload))

    async def expect_ack(self, request_id: int) -> TextAck:
        """The text-message ack for `request_id`, skipping other messages."""
        while True:
            message = await self.expect_text()
            if isinstance(message, TextAck) and message.request_id == request_id:
                return message


@contextlib.asynccontextmanager
async def gateway(radio: PdtRadioSimulator, *, connect: bool = True) -> AsyncIterator[Gateway]:
    async with serial_port(radio.path) as port:
        gw = Gateway(port)
        if connect:
            await gw.connect()
        yield gw


@pytest.fixture
async def radios() -> AsyncIterator[tuple[PdtRadioSimulator, PdtRadioSimulator]]:
    """Two linked radios on one air: the gateway's (1001) and a field unit's (2002)."""
    air = PdtAir()
    async with PdtRadioSimulator(air, 1001) as ours, PdtRadioSimulator(air, 2002) as theirs:
        yield ours, theirs


@pytest.fixture
def ours(radios: tuple[PdtRadioSimulator, PdtRadioSimulator]) -> PdtRadioSimulator:
    """The gateway's radio, for a test that needs only it (the field unit is on the air too)."""
    return radios[0]


until = partial(until, timeout=TIMEOUT)  # this file's waits are longer


async def test_connect_is_accepted(ours: PdtRadioSimulator) -> None:
    """A connect (0xFE) gets an accept (0xFD) with its packet number, from 0x10 to 0x20."""
    async with gateway(ours, connect=False) as gw:
        await gw.send(HrnpPacket(HrnpOpcode.CONNECT, 7))
        accept = await gw.expect(lambda p: True)
        assert accept == HrnpPacket(HrnpOpcode.ACCEPT, 7, source=0x10, destination=0x20)
        assert ours.connected and ours.stats()["connects"] == 1
        await gw.send(HrnpPacket(HrnpOpcode.CLOSE, 8))
        assert (await gw.expect(lambda p: True)).opcode is HrnpOpcode.CLOSE_ACK
        assert not ours.connected


async def test_private_message_reaches_linked_radio(
        radios: tuple[PdtRadioSimulator, PdtRadioSimulator]) -> None:
    """A Chinese private message arrives whole on the linked radio's port; the sender gets ok."""
    ours, theirs = radios
    message = TextMessage(41, 2002, 1001, ALARM)
    async with gateway(ours) as gw, gateway(theirs) as field:
        number = await gw.send_text(message)
        assert (await gw.expect(lambda p: p.opcode is HrnpOpcode.DATA_ACK)).packet_number == number
        ack = await gw.expect_ack(41)
        assert ack == TextAck(41, 2002, TextResult.OK, 1001) and ack.ok
        incoming = await field.expect_text()
        assert incoming == message and isinstance(incoming, TextMessage)
        assert incoming.text == ALARM
        await until(lambda: theirs.stats()["data_acks_received"] == 1, "the field's data ack")
    assert ours.sent == [message] and theirs.received == [message]
    assert ours.stats()["text_ok"] == 1 and theirs.stats()["incoming"] == 1


async def test_message_waits_for_the_gateway_to_connect(
        radios: tuple[PdtRadioSimulator, PdtRadioSimulator]) -> None:
    """A message for a radio whose gateway has not connected yet is handed over on connect."""
    ours, theirs = radios
    async with gateway(ours) as gw:
        await gw.send_text(TextMessage(5, 2002, 1001, "水位超警戒"))
        assert (await gw.expect_ack(5)).ok
    async with gateway(theirs) as field:
        incoming = await field.expect_text()
        assert isinstance(incoming, TextMessage) and incoming.text == "水位超警戒"


@pytest.mark.parametrize("result", [TextResult.CHANNEL_BUSY, TextResult.NO_CONTACT,
                                    TextResult.TX_DENIED])
async def test_fault_result_codes(radios: tuple[PdtRadioSimulator, PdtRadioSimulator],
                                  result: TextResult) -> None:
    """A faulted radio answers with the fault's code and sends nothing; the next one goes."""
    ours, theirs = radios
    ours.set_faults(result=result, times=1)
    async with gateway(ours) as gw:
        await gw.send_text(TextMessage(1, 2002, 1001, ALARM))
        failed = await gw.expect_ack(1)
        assert failed.result == result and not failed.ok
        await gw.send_text(TextMessage(2, 2002, 1001, ALARM))
        assert (await gw.expect_ack(2)).ok
    assert [m.request_id for m in ours.sent] == [2]
    assert [m.request_id for m in theirs.received] == [2]
    assert ours.stats()["text_failed"] == 1 and ours.faults == PdtFaults()


async def test_unknown_destination_is_no_contact(ours: PdtRadioSimulator) -> None:
    """A private message to a radio id nobody has on the air is answered 10, no contact."""
    async with gateway(ours) as gw:
        await gw.send_text(TextMessage(3, 9999, 1001, "hello"))
        assert (await gw.expect_ack(3)).result == TextResult.NO_CONTACT
    assert ours.sent == []


async def test_no_answer_fault_sends_data_ack_only(
        radios: tuple[PdtRadioSimulator, PdtRadioSimulator]) -> None:
    """With no_answer the radio acks the packet but never the message; the next is answered."""
    ours, theirs = radios
    ours.set_faults(no_answer=True, times=1)
    async with gateway(ours) as gw:
        first = await gw.send_text(TextMessage(1, 2002, 1001, ALARM))
        second = await gw.send_text(TextMessage(2, 2002, 1001, ALARM))
        assert (await gw.expect_ack(2)).ok
        # packets come in order: had request 1 been answered, its ack would be here by now
        acks = [decode_text(decode_app(p.payload)) for p in gw.seen
                if p.opcode is HrnpOpcode.DATA]
        assert [a.request_id for a in acks] == [2]
        data_acks = [p.packet_number for p in gw.seen if p.opcode is HrnpOpcode.DATA_ACK]
        assert data_acks == [first, second]
    assert ours.stats()["text_unanswered"] == 1 and len(theirs.received) == 1


async def test_silent_radio_answers_nothing(ours: PdtRadioSimulator) -> None:
    """A silent radio ignores a connect; once it speaks again the next connect is accepted."""
    ours.set_faults(silent=True)
    async with gateway(ours, connect=False) as gw:
        await gw.send(HrnpPacket(HrnpOpcode.CONNECT, 1))
        await until(lambda: ours.stats()["silenced"] == 1, "the connect to arrive")
        ours.set_faults(silent=False)
        await gw.send(HrnpPacket(HrnpOpcode.CONNECT, 2))
        assert (await gw.expect(lambda p: True)).packet_number == 2
        assert [p.packet_number for p in gw.seen] == [2]


async def test_rejected_connect(ours: PdtRadioSimulator) -> None:
    """With reject_connect a connect gets a reject (0xFC) and the radio stays disconnected."""
    ours.set_faults(reject_connect=True)
    async with gateway(ours, connect=False) as gw:
        await gw.send(HrnpPacket(HrnpOpcode.CONNECT, 0))
        assert (await gw.expect(lambda p: True)).opcode is HrnpOpcode.REJECT
    assert not ours.connected


async def test_every_data_packet_gets_a_data_ack(ours: PdtRadioSimulator) -> None:
    """Text, radio control and undecodable payloads each get a data ack with their number."""
    async with gateway(ours) as gw:
        numbers = [await gw.send_text(TextMessage(1, 2002, 1001, "a")),
                   await gw.send_app(AppMessage(SERVICE_RCP, 0x0004, b"\x64\x00\x00\x00\x01")),
                   await gw.send_app(AppMessage(SERVICE_TEXT, 0x80A1, b"\x00"))]
        for number in numbers:
            ack = await gw.expect(lambda p, n=number: p.opcode is HrnpOpcode.DATA_ACK
                                  and p.packet_number == n)
            assert (ack.source, ack.destination) == (0x10, 0x20)
    stats = ours.stats()
    assert stats["data_acks_sent"] == 3
    assert (stats["other_messages"], stats["bad_messages"]) == (1, 1)


async def test_garbage_is_counted_and_survived(ours: PdtRadioSimulator) -> None:
    """Noise and a corrupted packet on the line are counted; the radio still answers."""
    noise = b"\x00\xffAT\r\n" * 5
    corrupted = bytearray(encode_packet(HrnpPacket(HrnpOpcode.CONNECT, 1)))
    corrupted[-1] ^= 0xFF
    async with gateway(ours, connect=False) as gw:
        await gw.write(noise + bytes(corrupted) + noise)
        await gw.send(HrnpPacket(HrnpOpcode.CONNECT, 2))
        assert (await gw.expect(lambda p: True)).packet_number == 2
    stats = ours.stats()
    assert stats["bad_packets"] == 1 and stats["connects"] == 1
    assert stats["garbage_bytes"] == 2 * len(noise) + len(corrupted)


async def test_group_message_reaches_members_only() -> None:
    """A group message reaches every other member of the group; its ack has no source."""
    air = PdtAir()
    async with (PdtRadioSimulator(air, 1001) as ours,
                PdtRadioSimulator(air, 2002, groups={900}) as member,
                PdtRadioSimulator(air, 3003, groups={901}) as other):
        async with gateway(ours) as gw, gateway(member) as field:
            await gw.send_text(TextMessage(8, 900, 1001, ALARM, group=True))
            assert await gw.expect_ack(8) == TextAck(8, 900, TextResult.OK, group=True)
            incoming = await field.expect_text()
            assert isinstance(incoming, TextMessage) and incoming.group
            assert incoming.text == ALARM
        assert other.received == [] and len(member.received) == 1


async def test_radio_ids_are_unique_on_the_air() -> None:
    """Two running radios cannot share a radio id."""
    air = PdtAir()
    async with PdtRadioSimulator(air, 1001):
        with pytest.raises(SimulatorError):
            await PdtRadioSimulator(air, 1001).start()
    assert air.radio_ids == frozenset()


async def test_symlink_names_the_port(tmp_path: Path) -> None:
    """With `symlink`, the gateway opens the link; it is removed when the radio stops."""
    link = tmp_path / "ttyPDT0"
    radio = PdtRadioSimulator(PdtAir(), 1001, symlink=link)
    async with radio:
        assert radio.link_path == str(link) and link.resolve() == Path(radio.path).resolve()
        async with serial_port(radio.link_path) as port:
            await Gateway(port).connect()
    assert not link.is_symlink()
