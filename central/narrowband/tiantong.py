"""Central's Tiantong link (DESIGN.md §5): its own 天通 satellite module's AT port, read for the
SMS gateways send while they are off IP.

`TiantongLink` is the per-bearer half (`central.narrowband.links`) of the receiver for
`narrowband_bearer = "tiantong"`; no I/O. On open it sends `ATE0`, `AT+CMGF=0` (PDU mode) and
`AT+CNMI=2,1` (announce each stored SMS), one command at a time: the next is written when the
module's final result (OK, ERROR, +CMS ERROR) for the previous one arrives. Then:

- `+CMTI: <mem>,<index>` → `AT+CMGR=<index>`; the `+CMGR` PDU is an SMS-DELIVER in UCS2
  (`protocols.sms_pdu`), put back together with its other parts when concatenated; then
  `AT+CMGD=<index>` deletes it from the SIM (so a full SIM never stops the radio);
- a whole text that starts with "FL1:" is a frame (`protocols.narrowband.from_text`) from the
  originator's number, which names the gateway (`narrowband_gateways[].phone`); any other text
  is a person's, counted as `not_fieldlink` and not logged; bad base64 is `bad_text`;
- a PDU that does not decode is `bad_sms`, a line the decoder cannot read `bad_line`.

A command unanswered for `COMMAND_TIMEOUT_S` is given up (`idle`) and the next one goes. Central
sends no warnings by Tiantong (`send` writes nothing; the downlink route has no Tiantong
addresses).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from central.config.settings import NarrowbandGateway
from central.narrowband.links import Dropped, Inbound, LinkEvent, drain
from protocols import at_commands as atc
from protocols import at_responses as atr
from protocols.narrowband import FrameTextError, NotFrameTextError, from_text
from protocols.sms_pdu import Reassembler, SmsError, decode_deliver

COMMAND_TIMEOUT_S: Final = 5.0
_HELLO: Final = (atc.Command("E0"), atc.Command("+CMGF", "=", ("0",)),
                 atc.Command("+CNMI", "=", ("2", "1")))


class TiantongLink:
    """The AT side of central's Tiantong module; see the module doc."""

    bearer = "tiantong"

    def __init__(self, logger: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._clock = clock
        self._decoder = atr.ResponseDecoder()
        self._queue: deque[atc.Command] = deque()
        self._current: atc.Command | None = None
        self._sent_at = 0.0
        self._sms = Reassembler()

    def address(self, gateway: NarrowbandGateway) -> str | None:
        return gateway.phone

    def hello(self) -> bytes:
        self._queue.extend(_HELLO)
        return self._next()

    def send(self, recipient: str, payload: bytes) -> bytes:
        return b""  # no downlink by Tiantong

    def _next(self) -> bytes:
        if self._current is not None or not self._queue:
            return b""
        self._current = self._queue.popleft()
        self._sent_at = self._clock()
        return atc.encode_command(self._current)

    def idle(self) -> tuple[bytes, list[LinkEvent]]:
        if self._current is not None and self._clock() - self._sent_at > COMMAND_TIMEOUT_S:
            self._log.warning("narrowband_module_silent", command=f"AT{self._current.name}")
            self._current = None
        return self._next(), []

    def feed(self, data: bytes) -> tuple[bytes, list[LinkEvent]]:
        self._decoder.feed(data)
        events = drain(self._decoder.next_event, atc.AtError, "bad_line", self._response)
        return self._next(), events

    def _response(self, response: atr.Response) -> LinkEvent | None:
        if atr.is_final(response):
            if self._current is not None and self._current.name == "+CMGR" \
                    and not isinstance(response, atr.Result):
                self._log.info("narrowband_sms_unreadable", response=str(response))
            self._current = None
            return None
        if isinstance(response, atr.Cmti):
            self._queue.append(atc.cmgr(response.index))
            self._queue.append(atc.cmgd(response.index))
            return None
        if isinstance(response, atr.Cmgr | atr.Cmt):
            return self._sms_event(response.pdu)
        return None  # echo, +CREG, +CSQ: nothing about gateways

    def _sms_event(self, pdu: bytes) -> LinkEvent | None:
        try:
            _, sms = decode_deliver(pdu)
        except SmsError as exc:
            return Dropped("bad_sms", exc)
        text = self._sms.add(sms)
        if text is None:
            return None  # a part: the rest is on its way
        try:
            return Inbound(sms.originator, from_text(text))
        except NotFrameTextError as exc:  # a person's message: its content is not logged
            return Dropped("not_fieldlink", exc, sms.originator, quiet=True)
        except FrameTextError as exc:
            return Dropped("bad_text", exc, sms.originator)


__all__ = ["COMMAND_TIMEOUT_S", "TiantongLink"]
