"""The driver of one Tiantong (天通) satellite module on its AT command port (DESIGN.md §5,
DOMAIN.md "Tiantong"): a third narrowband bearer, for alarms and 叫应 acknowledgements.

`TiantongModem` owns the port as every `edge_agent.bearers.port.SerialBearer` does; the module's
answers go through the pure `protocols.at_responses.ResponseDecoder`. The conversation
(3GPP TS 27.005 in PDU mode, `protocols.at_commands`, the simulator
`firmware_stubs.tiantong_sim`):

- opening the port sends `ATE0` (no echo) and `AT+CMGF=0` (PDU mode), each answered OK;
- `wait_ready` asks `AT+CREG?`: the module can send when it is registered (home or roaming);
  lost registration (searching, denied) is not ready, counted in `not_registered`;
- `send` carries a frame as its text form (`FL1:` + base64, `protocols.narrowband.to_text`)
  in UCS2 SMS (`protocols.sms_pdu`): one message of 70 characters, or up to `sms_parts`
  concatenated parts of 67. Each part is `AT+CMGS=<length>`, the prompt `> `, the PDU in hex
  and Ctrl-Z, answered `+CMGS: <mr>` and OK, or `+CMS ERROR: <err>`. A network timeout (332)
  or unknown error (500) is retried `retries` times after `retry_wait_s` (counted in
  `retries`); no network service (331, the registration lost meanwhile) is the refusal
  `no_network`, anything else after the retries `send_failed` with the code: the fallback then
  tries again later, so an alarm is never lost to a failed send.

Every step waits at most `step_timeout_s` (5 s, DOMAIN.md), else `BearerTimeoutError`. Lines
the decoder cannot read are counted (`bad_lines`); unsolicited lines (`+CREG: <stat>`,
`+CMTI`) are counted and otherwise ignored: the gateway takes no SMS by Tiantong yet.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import structlog

from edge_agent.bearers import (
    BearerRequestError,
    BearerTimeoutError,
    CardInfo,
    Refusal,
    SendResult,
)
from edge_agent.bearers.port import BearerCounters, SerialBearer
from edge_agent.narrowband.config import TIANTONG_MAX_PARTS
from protocols import at_commands as atc
from protocols import at_responses as atr
from protocols.narrowband import TEXT_PREFIX, to_text
from protocols.sms_pdu import PART_CHARS, SINGLE_CHARS, SmsError, encode_submit, submits_for
from protocols.stream import decoded

log = structlog.get_logger(__name__)

STEP_TIMEOUT_S: Final = 5.0  # DOMAIN.md: 5 s command timeout
DEFAULT_INTERVAL_S: Final = 5
MAX_PARTS: Final = TIANTONG_MAX_PARTS
_TRANSIENT: Final = frozenset({atr.CmsError.NETWORK_TIMEOUT, atr.CmsError.UNKNOWN_ERROR})


def sms_frame_bytes(parts: int) -> int:
    """The longest frame whose text form fits `parts` UCS2 SMS (70 characters, or 67 a part)."""
    chars = (SINGLE_CHARS if parts == 1 else PART_CHARS * parts) - len(TEXT_PREFIX)
    return chars // 4 * 3


@dataclass(slots=True)
class ModemCounters(BearerCounters):
    parts_sent: int = 0
    retries: int = 0  # sends tried again after a transient +CMS ERROR
    cms_errors: dict[int, int] = field(default_factory=dict)
    not_registered: int = 0  # `wait_ready` found the module searching or denied
    bad_lines: int = 0
    unsolicited: int = 0


def _final(e: atr.Response) -> bool:
    return atr.is_final(e)


class TiantongModem(SerialBearer[atr.Response, ModemCounters]):
    """One Tiantong module on one serial port; an async context manager.

    Example::

        async with TiantongModem("/dev/ttyUSB3", number="+8617400000001") as tt:
            if await tt.wait_ready(5.0):
                result = await tt.send("+8617400000009", frame)  # central's number
    """

    EVENT_PORT_OPEN = "tiantong_port_open"
    EVENT_PORT_LOST = "tiantong_port_lost"

    def __init__(self, port: str, *, baudrate: int = 115200, number: str | None = None,
                 sms_parts: int = 1, interval_s: int = DEFAULT_INTERVAL_S,
                 step_timeout_s: float = STEP_TIMEOUT_S, retries: int = 2,
                 retry_wait_s: float = 1.0) -> None:
        if not 1 <= sms_parts <= MAX_PARTS:
            raise ValueError(f"sms_parts must be 1..{MAX_PARTS}")
        if step_timeout_s <= 0 or retries < 0 or retry_wait_s < 0 or interval_s < 0:
            raise ValueError("step_timeout_s must be positive; retries, retry_wait_s and "
                             "interval_s not negative")
        super().__init__(port, baudrate=baudrate, step_timeout_s=step_timeout_s,
                         log=log.bind(port=port), counters=ModemCounters())
        self.number = number
        self.sms_parts = sms_parts
        self.interval_s = interval_s
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.card: CardInfo | None = None
        self._decoder = atr.ResponseDecoder()
        self._ready_modem = False
        self._lock = asyncio.Lock()  # one command on the line at a time
        self._ref = random.getrandbits(8)

    # --- the port (`SerialBearer`'s hooks) -------------------------------------------------

    def _on_port_open(self) -> None:
        self._decoder = atr.ResponseDecoder()
        self._ready_modem = False

    def _on_detach(self) -> None:
        self._ready_modem = False

    async def _on_open(self) -> None:
        if not self._ready_modem:
            for command in (atc.Command("E0"), atc.Command("+CMGF", "=", ("0",))):
                reply = await self._command(atc.encode_command(command), f"AT{command.name}")
                if not isinstance(reply, atr.Result) or not reply.ok:
                    raise BearerRequestError(f"{self.port}: the module refused "
                                             f"AT{command.name}: {reply}")
            self._ready_modem = True

    def _on_bytes(self, data: bytes) -> None:
        self._decoder.feed(data)
        events: Iterator[atr.Response | atc.AtError] = decoded(self._decoder.next_event,
                                                               atc.AtError)
        for event in events:
            if isinstance(event, atc.AtError):
                self.counters.bad_lines += 1
                self._log.debug("tiantong_bad_line", error=str(event))
            elif not self._offer(event, first_only=True):
                self.counters.unsolicited += 1

    async def _command(self, data: bytes, step: str,
                       wants: Callable[[atr.Response], bool] = _final) -> atr.Response:
        waiter = self._expect(wants)
        try:
            return await self._step(waiter, step, data)
        except BearerTimeoutError:
            self.counters.timeouts += 1
            raise
        finally:
            self._forget(waiter)

    # --- the bearer ------------------------------------------------------------------------

    @property
    def payload_bytes(self) -> int:
        return sms_frame_bytes(self.sms_parts)

    async def info(self) -> CardInfo:
        await self.open()
        card = CardInfo(card_id=self.number or "", level=0, interval_s=self.interval_s,
                        payload_bytes=self.payload_bytes, dialect="tiantong")
        self.card = card
        return card

    async def wait_ready(self, timeout_s: float) -> bool:
        """True when the module is registered on the network (`AT+CREG?`)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.open()
                async with self._lock:
                    creg = self._expect(lambda e: isinstance(e, atr.Creg))
                    try:
                        reply = await self._command(b"AT+CREG?\r", "AT+CREG?")
                        status = creg.future.result() if creg.future.done() else None
                    finally:
                        self._forget(creg)
        except (TimeoutError, BearerTimeoutError):
            return False
        if not (isinstance(reply, atr.Result) and reply.ok and isinstance(status, atr.Creg)
                and status.stat.registered):
            self.counters.not_registered += 1
            return False
        return True

    async def send(self, recipient: str, payload: bytes) -> SendResult:
        """Send `payload` as UCS2 SMS to `recipient` (central's number); see the module doc."""
        self._ref = (self._ref + 1) & 0xFF
        try:
            parts = submits_for(recipient, to_text(payload), ref=self._ref,
                                first_reference=self._ref)
        except SmsError as exc:
            raise BearerRequestError(f"{self.port}: {exc}") from exc
        if len(parts) > self.sms_parts:
            raise BearerRequestError(f"{self.port}: the frame needs {len(parts)} SMS, "
                                     f"sms_parts is {self.sms_parts}")
        await self.open()
        async with self._lock:
            for part in parts:
                pdu, length = encode_submit(part)
                code = await self._send_part(pdu, length)
                if code is not None:
                    return self._counted(_refusal(code))
        return self._counted(SendResult(True))

    async def _send_part(self, pdu: bytes, length: int) -> int | None:
        """One SMS, with retries of transient errors; None when sent, else the +CMS code."""
        for attempt in range(self.retries + 1):
            code = await self._submit(pdu, length)
            if code is None:
                self.counters.parts_sent += 1
                return None
            errors = self.counters.cms_errors
            errors[code] = errors.get(code, 0) + 1
            if code not in _TRANSIENT or attempt == self.retries:
                return code
            self.counters.retries += 1
            self._log.info("tiantong_send_retry", code=code, attempt=attempt + 1)
            await asyncio.sleep(self.retry_wait_s)
        return None  # pragma: no cover - the loop always returns

    async def _submit(self, pdu: bytes, length: int) -> int | None:
        prompt = await self._command(atc.encode_command(atc.cmgs(length)), "AT+CMGS",
                                     lambda e: isinstance(e, atr.Prompt) or _final(e))
        if not isinstance(prompt, atr.Prompt):
            return _code(prompt)
        reply = await self._command(pdu.hex().upper().encode("ascii") + bytes([atc.CTRL_Z]),
                                    "+CMGS")
        return None if isinstance(reply, atr.Result) and reply.ok else _code(reply)


def _code(reply: atr.Response) -> int:
    if isinstance(reply, atr.CmsErrorResult | atr.CmeErrorResult):
        return reply.code
    return int(atr.CmsError.UNKNOWN_ERROR)  # a bare ERROR


def _refusal(code: int) -> SendResult:
    if code == atr.CmsError.NO_NETWORK_SERVICE:
        return SendResult(False, Refusal.NO_NETWORK, 0, code)
    return SendResult(False, Refusal.SEND_FAILED, 0, code)


__all__ = ["DEFAULT_INTERVAL_S", "MAX_PARTS", "STEP_TIMEOUT_S", "ModemCounters",
           "TiantongModem", "sms_frame_bytes"]
