"""Hytera PDT radio simulator: the HRNP serial port of a 370 MHz radio, on a pseudo-terminal.

`PdtRadioSimulator` opens a pty pair (`PtyLine`) and answers, on the master side, what a
Hytera radio answers on its accessory/USB serial port (codec: `protocols.hrnp`); the gateway
opens the slave side (`.path`, e.g. `/dev/pts/7`) like `/dev/ttyUSB0`:

- a connect (0xFE) gets an accept (0xFD) carrying the connect's packet number; a close (0xFB)
  a close ack (0xFA);
- every data packet (0x00) gets a data ack (0x10) carrying its packet number, as the public
  HRNP client of OK-DMR/ok-dmrlib acks the radio's;
- a text message (TMP 0xA1 private / 0xB1 group) goes out on the `PdtAir` the radio is linked
  to, and the gateway gets the text-message ack (0xA2 / 0xB2) with the request id and a result
  code: 0 ok, 10 no contact when no linked radio has the destination id, or what the faults say.
  Accepted messages are recorded in `.sent`;
- a radio that receives a message over the air hands it to its own gateway as an incoming
  text message (a data packet with TMP 0xA1 / 0xB1), as soon as that gateway has connected
  (messages wait in a bounded queue until then). They are recorded in `.received`.

Packets the radio sends itself are numbered from 0 and addressed back to the gateway's last
HRNP address (0x20 by default). Nothing is retransmitted; data acks from the gateway are only
counted. Bytes that are not packets are counted (`stats()["garbage_bytes"]`, `bad_packets`).

Inferred, not from a public source: the ack keeps the message's destination and source; an
incoming message keeps the sender's request id; a group message is "ok" once sent, whoever
listens; a text over `max_text_bytes` is refused with result 3 (invalid params).

Faults (`PdtFaults`): `result` (answer the next text messages with this code, e.g. 4 channel
busy, 10 no contact, 11 transmit denied; nothing is sent on the air), `no_answer` (no
text-message ack at all; the data ack still comes: the radio got the packet), both for the next
`times` messages or until changed; `silent` (the radio answers nothing) and `reject_connect`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from firmware_stubs.errors import SimulatorError
from firmware_stubs.lifecycle import Directory, PtyLinked
from firmware_stubs.pty_line import PtyLine
from protocols import hrnp, hrnp_text

log = structlog.get_logger(__name__)

_MAX_PENDING = 64  # incoming messages a radio keeps while no gateway is connected


@dataclass(frozen=True, slots=True)
class PdtFaults:
    """What goes wrong; `result` and `no_answer` last `times` text messages (None: until
    changed), then the faults reset."""

    result: int = hrnp_text.TextResult.OK
    no_answer: bool = False
    times: int | None = None
    silent: bool = False
    reject_connect: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.result <= 0xFF:
            raise SimulatorError(f"result {self.result} is not a u8 result code")
        if self.times is not None and self.times < 1:
            raise SimulatorError("times must be at least 1, or None")


def ack_for(message: hrnp_text.TextMessage, result: int) -> hrnp_text.TextAck:
    """The ack a radio sends for `message` (inferred: same destination and source)."""
    return hrnp_text.TextAck(message.request_id, message.destination, result,
                             None if message.group else message.source, group=message.group,
                             ack_flag=message.ack_flag,
                             destination_subnet=message.destination_subnet,
                             source_subnet=message.source_subnet)


class PdtAir:
    """The 370 MHz channel: radios register by radio id; a transmitted message reaches them."""

    def __init__(self) -> None:
        self._radios: Directory[int, PdtRadioSimulator] = Directory(
            "radio id {} is already on the air")
        self.transmitted: list[hrnp_text.TextMessage] = []

    def register(self, radio: PdtRadioSimulator) -> None:
        self._radios.add(radio.radio_id, radio)

    def unregister(self, radio: PdtRadioSimulator) -> None:
        self._radios.discard(radio.radio_id, radio)

    @property
    def radio_ids(self) -> frozenset[int]:
        return frozenset(self._radios)

    def transmit(self, message: hrnp_text.TextMessage, sender: PdtRadioSimulator) -> int:
        """Send `message` from `sender`; the result code its ack carries."""
        if message.group:
            for radio in list(self._radios.values()):
                if radio is not sender and message.destination in radio.groups:
                    radio.receive(message)
        else:
            target = self._radios.get(message.destination)
            if target is None or target is sender:
                return hrnp_text.TextResult.NO_CONTACT
            target.receive(message)
        self.transmitted.append(message)
        return hrnp_text.TextResult.OK


class PdtRadioSimulator(PtyLinked):
    """One Hytera PDT radio with its HRNP serial port on a pty; an async context manager.

    `radio_id`: its 24-bit PDT id; `groups`: the group ids it listens to; `max_text_bytes`:
    longer texts are refused (None: no limit); `symlink`: also make this symlink to the pty.
    """

    def __init__(self, air: PdtAir, radio_id: int, *, groups: Iterable[int] = (),
                 max_text_bytes: int | None = None, symlink: str | Path | None = None) -> None:
        if isinstance(radio_id, bool) or not 0 <= radio_id <= hrnp_text.MAX_RADIO_ID:
            raise SimulatorError(f"radio id {radio_id!r} is not a 24-bit id")
        self.air = air
        self.radio_id = radio_id
        self.groups = frozenset(groups)
        self.max_text_bytes = max_text_bytes
        self.faults = PdtFaults()
        self.sent: list[hrnp_text.TextMessage] = []
        self.received: list[hrnp_text.TextMessage] = []
        self.connected = False
        self._pending: collections.deque[hrnp_text.TextMessage] = collections.deque(
            maxlen=_MAX_PENDING)
        self._decoder = hrnp.HrnpDecoder()
        self._symlink = Path(symlink) if symlink is not None else None
        self._line: PtyLine | None = None
        # where the radio sends packets of its own: the gateway's last address, version
        self._gateway, self._address = hrnp.GATEWAY_ADDRESS, hrnp.RADIO_ADDRESS
        self._version = hrnp.HRNP_VERSION
        self._packet_number = 0
        self.path = ""
        self._stats: dict[str, int] = {
            "connects": 0, "rejected": 0, "closes": 0, "data_packets": 0, "data_acks_sent": 0,
            "data_acks_received": 0, "text_requests": 0, "text_ok": 0, "text_failed": 0,
            "text_unanswered": 0, "text_acks_received": 0, "incoming": 0,
            "incoming_dropped": 0, "other_messages": 0, "bad_messages": 0, "silenced": 0,
            "unwritten": 0,
        }

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.air.register(self)
        self._open_line()
        log.info("pdt_sim_started", path=self.path, radio_id=self.radio_id,
                 groups=sorted(self.groups))

    async def stop(self) -> None:
        self.air.unregister(self)
        if self._close_line():
            log.info("pdt_sim_stopped", path=self.path, radio_id=self.radio_id)
        self.connected = False

    # --- scripting --------------------------------------------------------------------------

    def set_faults(self, faults: PdtFaults | None = None, **changes: Any) -> None:
        """Replace the faults (`faults`), or change some of them (`result=4`, `times=1`)."""
        base = faults if faults is not None else self.faults
        self.faults = dataclasses.replace(base, **changes) if changes else base
        log.info("pdt_sim_faults", radio_id=self.radio_id, faults=repr(self.faults))

    inject = set_faults

    def stats(self) -> dict[str, int]:
        """Packets and messages per kind, and the garbage seen on the line, so far."""
        return {**self._stats, "garbage_bytes": self._decoder.discarded,
                "bad_packets": self._decoder.errors}

    def receive(self, message: hrnp_text.TextMessage) -> None:
        """A message for this radio arrives over the air: hand it to the gateway."""
        self.received.append(message)
        if self.connected:
            self._send_incoming(message)
        else:
            if len(self._pending) == self._pending.maxlen:
                self._stats["incoming_dropped"] += 1
            self._pending.append(message)

    # --- the serial line --------------------------------------------------------------------

    def _on_readable(self) -> None:
        for packet in self._read_frames(self._decoder, self._decoder.next_packet, hrnp.HrnpError):
            if isinstance(packet, hrnp.HrnpError):
                log.debug("pdt_sim_bad_packet", radio_id=self.radio_id, error=str(packet))
            else:
                self._handle(packet)

    def _write(self, packet: hrnp.HrnpPacket) -> None:
        if self._line is not None and not self._line.write(hrnp.encode_packet(packet)):
            self._stats["unwritten"] += 1

    def _reply(self, request: hrnp.HrnpPacket, opcode: hrnp.HrnpOpcode) -> None:
        """A payload-less answer carrying the request's packet number, addressed back."""
        self._write(hrnp.HrnpPacket(opcode, request.packet_number, request.destination,
                                    request.source, version=request.version))

    def _send_app(self, message: hrnp.AppMessage) -> None:
        """A data packet of the radio's own, numbered by its own counter."""
        self._write(hrnp.HrnpPacket(hrnp.HrnpOpcode.DATA, self._packet_number, self._address,
                                    self._gateway, hrnp.encode_app(message), self._version))
        self._packet_number = (self._packet_number + 1) & 0xFFFF

    def _handle(self, packet: hrnp.HrnpPacket) -> None:
        if self.faults.silent:
            self._stats["silenced"] += 1
            return
        self._gateway, self._address = packet.source, packet.destination
        self._version = packet.version
        match packet.opcode:
            case hrnp.HrnpOpcode.CONNECT if self.faults.reject_connect:
                self._stats["rejected"] += 1
                self._reply(packet, hrnp.HrnpOpcode.REJECT)
            case hrnp.HrnpOpcode.CONNECT:
                self._stats["connects"] += 1
                self._reply(packet, hrnp.HrnpOpcode.ACCEPT)
                self.connected = True
                while self._pending:
                    self._send_incoming(self._pending.popleft())
            case hrnp.HrnpOpcode.CLOSE:
                self._stats["closes"] += 1
                self._reply(packet, hrnp.HrnpOpcode.CLOSE_ACK)
                self.connected = False
            case hrnp.HrnpOpcode.DATA:
                self._stats["data_packets"] += 1
                self._stats["data_acks_sent"] += 1
                self._reply(packet, hrnp.HrnpOpcode.DATA_ACK)
                self._on_data(packet.payload)
            case hrnp.HrnpOpcode.DATA_ACK:
                self._stats["data_acks_received"] += 1
            case _:
                pass  # accept, reject, close ack: nothing a radio answers

    def _on_data(self, payload: bytes) -> None:
        try:
            app = hrnp.decode_app(payload)
            if app.service != hrnp.SERVICE_TEXT:
                self._stats["other_messages"] += 1  # radio control, location: not simulated
                return
            message = hrnp_text.decode_text(app)
        except hrnp.HrnpError as exc:
            self._stats["bad_messages"] += 1
            log.debug("pdt_sim_bad_message", radio_id=self.radio_id, error=str(exc))
            return
        if isinstance(message, hrnp_text.TextAck):
            self._stats["text_acks_received"] += 1
        else:
            self._on_text(message, reliable=app.reliable)

    def _use_faults(self) -> PdtFaults:
        """The faults for this text message; counts `times` down and resets at zero."""
        faults = self.faults
        if faults.times is not None:
            left = faults.times - 1
            self.faults = (dataclasses.replace(faults, times=left) if left
                           else PdtFaults(silent=faults.silent,
                                          reject_connect=faults.reject_connect))
        return faults

    def _on_text(self, message: hrnp_text.TextMessage, *, reliable: bool) -> None:
        self._stats["text_requests"] += 1
        faults = self._use_faults()
        if faults.no_answer:
            self._stats["text_unanswered"] += 1
            return
        if faults.result != hrnp_text.TextResult.OK:
            result = faults.result
        elif (self.max_text_bytes is not None
              and len(hrnp_text.utf16_bytes(message.text)) > self.max_text_bytes):
            result = hrnp_text.TextResult.INVALID_PARAMS
        else:
            result = self.air.transmit(message, self)
        if result == hrnp_text.TextResult.OK:
            self.sent.append(message)
            self._stats["text_ok"] += 1
        else:
            self._stats["text_failed"] += 1
        self._send_app(hrnp_text.encode_text(ack_for(message, result), reliable=reliable))

    def _send_incoming(self, message: hrnp_text.TextMessage) -> None:
        self._stats["incoming"] += 1
        self._send_app(hrnp_text.encode_text(message))


__all__ = ["PdtAir", "PdtFaults", "PdtRadioSimulator", "ack_for"]
