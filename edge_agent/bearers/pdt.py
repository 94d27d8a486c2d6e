"""The driver of one Hytera PDT radio (370 MHz) on its HRNP serial port (DESIGN.md §5).

`PdtRadio` owns the port as every `edge_agent.bearers.port.SerialBearer` does (opened in a
thread, read with `loop.add_reader`, written with `os.write` and `add_writer`), one packet
written at a time so that a data ack never cuts into a packet. Bytes go through the pure
`protocols.hrnp.HrnpDecoder`; a partial packet left on a line quiet for `quiet_s` is given up
(a packet comes in one burst: a stray 0x7E must not hold the next one back).

The HRNP conversation (`protocols.hrnp`, `protocols.hrnp_text`, the simulator
`firmware_stubs.pdt_sim`):

- opening the port connects (0xFE) and waits for the accept (0xFD); a reject (0xFC) is
  `ConnectRejectedError`. `ready` means connected;
- `send()` writes a private text message (TMP 0xA1) to the recipient's radio id in a data
  packet. The radio data-acks the packet (0x10, same packet number), then answers with the
  text-message ack (0xA2) of the same request id, whose TMP result is the answer: 0 accepted;
  4 channel busy, 10 no contact, 11 transmit denied, 6 low battery, any other code refused as
  `Refusal.OTHER` with `code`. Each of the two waits `step_timeout_s`, else
  `BearerTimeoutError` (step "data ack" or "text ack"); without a data ack the link is taken
  as dropped (the radio may have restarted) and the next call connects again;
- every data packet the radio sends (acks, incoming texts) is data-acked; incoming texts go to
  `on_message`. An ack whose request id nobody waits for (a late one) is counted.

The radio carries UTF-16 text only: a frame goes as its text form (`"FL1:" + base64`,
`protocols.narrowband.to_text`), so `info().payload_bytes` is `text_frame_bytes(max_text_bytes)`,
45 bytes for a 128-byte text. PDT has no service interval: `interval_s` (default 5 s) spaces the
messages to be kind to a shared channel. The text's source is `radio_id` (0 when unset):
central names the gateway by it. Packet numbers and request ids start at random, so an answer
meant for an earlier run is not taken for one of this run's.

A port that fails (EIO, the USB adapter unplugged) is closed and pending steps fail with
`BearerPortError`; the next call opens it and connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from edge_agent.bearers import (
    BearerRequestError,
    BearerTimeoutError,
    CardInfo,
    ConnectRejectedError,
    Refusal,
    SendResult,
)
from edge_agent.bearers.port import BearerCounters, SerialBearer, Waiter
from edge_agent.narrowband.config import MIN_TEXT_BYTES, PDT_INTERVAL_S
from protocols.hrnp import (
    NEED_DATA,
    HrnpDecoder,
    HrnpError,
    HrnpOpcode,
    HrnpPacket,
    encode_app,
    encode_packet,
    reply_to,
)
from protocols.hrnp_text import (
    DEFAULT_MAX_TEXT_BYTES,
    MAX_RADIO_ID,
    TextAck,
    TextMessage,
    TextResult,
    decode_text_data,
    encode_text,
)
from protocols.narrowband import text_frame_bytes, to_text

log = structlog.get_logger(__name__)

STEP_TIMEOUT_S: Final = 5.0
DEFAULT_INTERVAL_S: Final = PDT_INTERVAL_S
QUIET_S: Final = 0.5

_REFUSALS: Final[dict[int, Refusal]] = {
    TextResult.CHANNEL_BUSY: Refusal.CHANNEL_BUSY, TextResult.NO_CONTACT: Refusal.NO_CONTACT,
    TextResult.TX_DENIED: Refusal.TX_DENIED, TextResult.LOW_BATTERY: Refusal.LOW_BATTERY}


@dataclass(slots=True)
class RadioCounters(BearerCounters):
    garbage_bytes: int = 0  # bytes dropped between or inside bad packets
    bad_packets: int = 0  # HRNP checksum, length and header errors, partial packets given up
    bad_messages: int = 0  # data packets whose HDAP / TMP content does not decode
    other_messages: int = 0  # well formed but not text (radio control, location)
    stray_acks: int = 0  # a text ack with no send waiting for it
    data_acks_sent: int = 0
    inbound: int = 0  # text messages received
    connects: int = 0


_Event = HrnpPacket | TextAck


# --- the driver ----------------------------------------------------------------------------


class PdtRadio(SerialBearer[_Event, RadioCounters]):
    """One Hytera PDT radio on one serial port; an async context manager.

    Example::

        async with PdtRadio("/dev/ttyUSB2", radio_id=1001) as radio:
            card = await radio.info()  # a frame may be up to card.payload_bytes long
            result = await radio.send("2002", frame)  # central's radio id
            if not result.accepted and result.reason is Refusal.CHANNEL_BUSY:
                await asyncio.sleep(card.interval_s)
    """

    EVENT_PORT_OPEN = "pdt_port_open"
    EVENT_PORT_LOST = "pdt_port_lost"

    def __init__(self, port: str, *, baudrate: int = 115200, radio_id: int | None = None,
                 max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
                 interval_s: int = DEFAULT_INTERVAL_S, step_timeout_s: float = STEP_TIMEOUT_S,
                 quiet_s: float = QUIET_S,
                 on_message: Callable[[TextMessage], None] | None = None) -> None:
        if radio_id is not None and not 1 <= radio_id <= MAX_RADIO_ID:
            raise ValueError(f"radio_id must be in 1..{MAX_RADIO_ID}, not {radio_id}")
        if max_text_bytes < MIN_TEXT_BYTES:
            raise ValueError(f"max_text_bytes must be at least {MIN_TEXT_BYTES}")
        if step_timeout_s <= 0 or quiet_s <= 0 or interval_s < 0:
            raise ValueError("step_timeout_s and quiet_s must be positive, interval_s not "
                             "negative")
        super().__init__(port, baudrate=baudrate, step_timeout_s=step_timeout_s,
                         log=log.bind(port=port, radio_id=radio_id), counters=RadioCounters())
        self.radio_id = radio_id
        self.max_text_bytes = max_text_bytes
        self.interval_s = interval_s
        self.quiet_s = quiet_s
        self.on_message = on_message
        self.card: CardInfo | None = None  # from the last `info()`
        self._connected = False
        self._decoder = HrnpDecoder()
        self._quiet: asyncio.TimerHandle | None = None
        self._acks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one send on the line at a time
        self._packet_number = random.getrandbits(16)
        self._request_id = random.getrandbits(32)

    # --- lifecycle (the link on `SerialBearer`'s port) -------------------------------------

    @property
    def ready(self) -> bool:
        """A send may go now: the HRNP link is connected."""
        return self._connected

    async def open(self) -> None:
        """Open the port and connect, if not done; raises `BearerPortError`,
        `BearerTimeoutError` (no accept) or `ConnectRejectedError`."""
        await super().open()

    def _on_port_open(self) -> None:
        self._decoder = HrnpDecoder()

    async def _on_open(self) -> None:
        if not self._connected:
            await self._connect()

    async def _connect(self) -> None:
        request = HrnpPacket(HrnpOpcode.CONNECT, self._next_number())
        waiter = self._expect(lambda e: isinstance(e, HrnpPacket)
                              and e.opcode in (HrnpOpcode.ACCEPT, HrnpOpcode.REJECT))
        try:
            reply = await self._step(waiter, "connect", encode_packet(request))
        finally:
            self._forget(waiter)
        assert isinstance(reply, HrnpPacket)  # the waiter accepts nothing else
        if reply.opcode is HrnpOpcode.REJECT:
            raise ConnectRejectedError(self.port)
        self._connected = True
        self.counters.connects += 1
        self._log.info("pdt_connected")

    def _on_close(self) -> None:
        if self._connected and self._fd is not None:
            with contextlib.suppress(OSError):  # a courtesy: the radio may be gone already
                os.write(self._fd, encode_packet(HrnpPacket(HrnpOpcode.CLOSE,
                                                            self._next_number())))

    def _on_detach(self) -> None:
        self._connected = False
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        for task in self._acks:
            task.cancel()

    # --- reading ---------------------------------------------------------------------------

    def _on_bytes(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._drain()

    def _drain(self) -> None:
        decoder = self._decoder
        before = decoder.discarded
        while True:
            try:
                packet = decoder.next_packet()
            except HrnpError as exc:
                self.counters.bad_packets += 1
                self._log.debug("pdt_bad_packet", error=str(exc))
                continue
            if packet is NEED_DATA:
                break
            self._dispatch(packet)
        self.counters.garbage_bytes += decoder.discarded - before
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        if decoder.buffered and self._fd is not None:
            self._quiet = asyncio.get_running_loop().call_later(self.quiet_s, self._give_up)

    def _give_up(self) -> None:
        """The line went quiet inside a packet: step past its 0x7E and read on."""
        self._quiet = None
        if self._decoder.skip_partial():
            self.counters.bad_packets += 1
            self._drain()

    def _dispatch(self, packet: HrnpPacket) -> None:
        if packet.opcode is HrnpOpcode.DATA:
            self._data_ack(packet)
            self._on_data(packet.payload)
        elif packet.opcode is HrnpOpcode.CLOSE:
            self._connected = False
            self._log.info("pdt_closed_by_radio")
            self._write_later(reply_to(packet, HrnpOpcode.CLOSE_ACK))
        else:
            self._offer(packet)

    def _on_data(self, payload: bytes) -> None:
        try:
            text = decode_text_data(payload)
        except HrnpError as exc:
            self.counters.bad_messages += 1
            self._log.debug("pdt_bad_message", error=str(exc))
            return
        if text is None:  # radio control, location
            self.counters.other_messages += 1
            return
        message = text[0]
        if isinstance(message, TextAck):
            if not self._offer(message):
                self.counters.stray_acks += 1
                self._log.info("pdt_stray_ack", request_id=message.request_id,
                               result=message.result)
        else:
            self.counters.inbound += 1
            if self.on_message is not None:
                self.on_message(message)

    # --- writing ---------------------------------------------------------------------------

    def _data_ack(self, packet: HrnpPacket) -> None:
        """Answer a data packet of the radio's with its packet number, addressed back."""
        self.counters.data_acks_sent += 1
        self._write_later(reply_to(packet, HrnpOpcode.DATA_ACK))

    def _write_later(self, packet: HrnpPacket) -> None:
        task = asyncio.get_running_loop().create_task(self._write(encode_packet(packet)))
        self._acks.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._acks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.debug("pdt_ack_unwritten", error=str(task.exception()))

    async def _step(self, waiter: Waiter[_Event], step: str, data: bytes | None = None,
                    timeout_s: float | None = None) -> _Event:
        """`SerialBearer._step`, counting a timeout (of any step, the connect too)."""
        try:
            return await super()._step(waiter, step, data, timeout_s)
        except BearerTimeoutError:
            self.counters.timeouts += 1
            raise

    def _next_number(self) -> int:
        number, self._packet_number = self._packet_number, (self._packet_number + 1) & 0xFFFF
        return number

    # --- commands --------------------------------------------------------------------------

    async def wait_ready(self, timeout_s: float) -> bool:
        """True as soon as connected (connecting if need be), False if not within `timeout_s`
        or the radio rejects the link; a port that cannot be opened raises."""
        if self.ready:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self.open()
        except (TimeoutError, BearerTimeoutError, ConnectRejectedError):
            return False
        return self.ready

    @property
    def payload_bytes(self) -> int:
        return text_frame_bytes(self.max_text_bytes)

    async def info(self) -> CardInfo:
        """Connect, then say what a send may carry: the radio id, the configured interval and
        the frame bytes whose text fits `max_text_bytes`."""
        await self.open()
        card = CardInfo(card_id="" if self.radio_id is None else str(self.radio_id), level=0,
                        interval_s=self.interval_s, payload_bytes=self.payload_bytes,
                        dialect="pdt")
        self.card = card
        return card

    async def send(self, recipient: str, payload: bytes) -> SendResult:
        """Send `payload` as a private text message to radio `recipient`; the radio's text ack
        says if it went."""
        radio = _radio_id(recipient)
        if radio is None:
            raise BearerRequestError(f"{self.port}: recipient {recipient!r} is not a radio id "
                                     f"in 1..{MAX_RADIO_ID}")
        async with self._lock:
            await self.open()
            request_id, self._request_id = self._request_id, (self._request_id + 1) & 0xFFFFFFFF
            message = TextMessage(request_id, radio, self.radio_id or 0, to_text(payload))
            try:
                app = encode_text(message, max_text_bytes=self.max_text_bytes)
            except HrnpError as exc:
                raise BearerRequestError(f"{self.port}: {exc}") from exc
            number = self._next_number()
            packet = HrnpPacket(HrnpOpcode.DATA, number, payload=encode_app(app))
            # The text ack also proves the packet arrived, should the data ack be lost.
            taken = self._expect(lambda e: (isinstance(e, HrnpPacket)
                                            and e.opcode is HrnpOpcode.DATA_ACK
                                            and e.packet_number == number)
                                 or (isinstance(e, TextAck) and e.request_id == request_id))
            answered = self._expect(lambda e: isinstance(e, TextAck)
                                    and e.request_id == request_id)
            try:
                try:
                    await self._step(taken, "data ack", encode_packet(packet))
                except BearerTimeoutError:
                    self._connected = False  # the radio took nothing: connect again next time
                    raise
                ack = await self._step(answered, "text ack")
            finally:
                self._forget(taken)
                self._forget(answered)
        assert isinstance(ack, TextAck)
        return self._counted(_result(ack))


def _radio_id(recipient: str) -> int | None:
    if not recipient.isdigit() or not recipient.isascii():
        return None
    radio = int(recipient)
    return radio if 1 <= radio <= MAX_RADIO_ID else None


def _result(ack: TextAck) -> SendResult:
    if ack.result == TextResult.OK:
        return SendResult(True)
    return SendResult(False, _REFUSALS.get(ack.result, Refusal.OTHER), 0, ack.result)


__all__ = ["DEFAULT_INTERVAL_S", "MIN_TEXT_BYTES", "STEP_TIMEOUT_S", "PdtRadio",
           "RadioCounters"]
