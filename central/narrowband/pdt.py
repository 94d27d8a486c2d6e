"""Central's PDT radio link (DESIGN.md §5): a Hytera radio's HRNP port, read for gateways' texts.

`PdtLink` is the per-bearer half (`central.narrowband.links`) of the receiver
(`central.narrowband.receiver`) for `narrowband_bearer = "pdt"`; it does no I/O. On open it
connects (HRNP 0xFE) and expects the accept; it connects again every `RECONNECT_S` while the
radio has not accepted (a reject, a radio that was off). Every data packet of the radio's is
data-acked with its packet number, as `firmware_stubs.pdt_sim` and the public HRNP clients
expect. The text messages in them (private or group, `protocols.hrnp_text`) are:

- a Fieldlink frame when the text starts with "FL1:" (`protocols.narrowband.from_text`): the
  frame goes on as `Inbound` from the sender's radio id, to the shared verify / decode / store
  path;
- a person's text otherwise, counted as `not_fieldlink` and logged without its content;
- bad base64 after the prefix, counted as `bad_text`.

Garbage on the line is `bad_packet` (a partial packet left on a quiet line is given up in
`idle()`), a data packet whose HDAP / TMP content does not decode `bad_message`. Text acks and
other services (radio control, location) say nothing about gateways.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from central.config.settings import NarrowbandGateway
from central.narrowband.links import Dropped, Feedback, Inbound, LinkEvent, drain
from protocols.hrnp import (
    SERVICE_TEXT,
    HrnpDecoder,
    HrnpError,
    HrnpOpcode,
    HrnpPacket,
    decode_app,
    encode_app,
    encode_packet,
)
from protocols.hrnp_text import TextAck, TextMessage, TextResult, decode_text, encode_text
from protocols.narrowband import FrameTextError, NotFrameTextError, from_text, to_text

RECONNECT_S: Final = 5.0


class PdtLink:
    """The HRNP side of central's PDT radio; see the module doc."""

    bearer = "pdt"

    def __init__(self, logger: Any, *, radio_id: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._radio_id = radio_id  # central's own: the source of the texts it sends
        self._request_id = 0
        self._decoder = HrnpDecoder()
        self._log = logger
        self._clock = clock
        self._connected = False
        self._connect_at = 0.0
        self._packet_number = 0

    def address(self, gateway: NarrowbandGateway) -> str | None:
        return None if gateway.radio is None else str(gateway.radio)

    def hello(self) -> bytes:
        self._connect_at = self._clock()
        return self._packet(HrnpOpcode.CONNECT)

    def _packet(self, opcode: HrnpOpcode, payload: bytes = b"") -> bytes:
        number, self._packet_number = self._packet_number, (self._packet_number + 1) & 0xFFFF
        return encode_packet(HrnpPacket(opcode, number, payload=payload))

    def send(self, recipient: str, payload: bytes) -> bytes:
        """A private text message with the frame's text form to radio `recipient`; its text ack
        comes back as `Feedback`."""
        self._request_id = (self._request_id + 1) & 0xFFFFFFFF
        try:
            message = TextMessage(self._request_id, int(recipient), self._radio_id,
                                  to_text(payload))
            app = encode_text(message)
        except (ValueError, HrnpError) as exc:
            self._log.warning("narrowband_send_unencodable", recipient=recipient,
                              error=str(exc))
            return b""
        return self._packet(HrnpOpcode.DATA, encode_app(app))

    def idle(self) -> tuple[bytes, list[LinkEvent]]:
        events: list[LinkEvent] = []
        reply = b""
        if self._decoder.skip_partial():  # the line went quiet inside a packet
            reply, events = self.feed(b"")
            events.insert(0, Dropped("bad_packet", HrnpError("partial packet given up")))
        if not self._connected and self._clock() - self._connect_at >= RECONNECT_S:
            reply += self.hello()
        return reply, events

    def feed(self, data: bytes) -> tuple[bytes, list[LinkEvent]]:
        self._decoder.feed(data)
        reply = bytearray()
        events = drain(self._decoder.next_packet, HrnpError, "bad_packet",
                       lambda packet: self._answer(packet, reply))
        return bytes(reply), events

    def _answer(self, packet: HrnpPacket, reply: bytearray) -> LinkEvent | None:
        """Adds to `reply` what the radio expects back for `packet`; the event its data
        carries."""
        match packet.opcode:
            case HrnpOpcode.DATA:
                reply += encode_packet(HrnpPacket(
                    HrnpOpcode.DATA_ACK, packet.packet_number, packet.destination,
                    packet.source, version=packet.version))
                return self._data(packet.payload)
            case HrnpOpcode.ACCEPT:
                self._connected = True
                self._log.info("narrowband_radio_connected")
            case HrnpOpcode.REJECT:
                self._connected = False
                self._log.warning("narrowband_radio_rejected", retry_in_s=RECONNECT_S)
            case HrnpOpcode.CLOSE:
                self._connected = False
                self._connect_at = self._clock()
                reply += encode_packet(HrnpPacket(
                    HrnpOpcode.CLOSE_ACK, packet.packet_number, packet.destination,
                    packet.source, version=packet.version))
                self._log.info("narrowband_radio_closed", retry_in_s=RECONNECT_S)
            case _:
                pass  # data acks of our acks' kin, close acks: nothing to do
        return None

    def _data(self, payload: bytes) -> LinkEvent | None:
        try:
            app = decode_app(payload)
            if app.service != SERVICE_TEXT:
                return None  # radio control, location: nothing about gateways
            message = decode_text(app)
        except HrnpError as exc:
            return Dropped("bad_message", exc)
        if isinstance(message, TextAck):
            if message.request_id != self._request_id:
                return None  # a late ack of an earlier text: the route has timed it out
            return Feedback(message.result == TextResult.OK)
        sender = str(message.source)
        try:
            return Inbound(sender, from_text(message.text))
        except NotFrameTextError as exc:  # its content is a person's: not logged
            return Dropped("not_fieldlink", exc, sender, quiet=True)
        except FrameTextError as exc:
            return Dropped("bad_text", exc, sender)


__all__ = ["RECONNECT_S", "PdtLink"]
