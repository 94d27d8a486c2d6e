"""The driver of one BeiDou RDSS short-message terminal on a serial port (DESIGN.md §5).

`BeidouTerminal` owns the port as every `edge_agent.bearers.port.SerialBearer` does (opened in
a thread, read with `loop.add_reader`, written with `os.write`; nothing blocks the loop). Bytes
go through the pure stream decoder (`protocols.beidou.BeidouDecoder`), which resynchronises on
the next `$` after garbage.

The dialect is a constructor setting (DOMAIN.md, BeiDou RDSS short messages):

- `"bd3"`: `$CCICR` → `$BDICP`; `$BDPWI` beam reports about once a second say whether a send
  can go (`ready`); `$CCTCQ` → `$BDFKI,hhmmss,TCQ,Y|N,reason,wait`.
- `"bd2"`: `$CCICA` → `$BDICI`; `$CCTXA` → `$BDFKI,TXA,Y|N,Y|N,suppression,mmss`. A BD-2
  terminal sends no `$BDPWI`, so it counts as always ready and its refusal says the rest.

Each step (a card query, a send) waits at most `step_timeout_s` (about 2 s, DOMAIN.md) for its
answer, else `BearerTimeoutError`. One command is on the line at a time (a lock), so a
`$BDFKI` answers the send in progress. A `$BDFKI` that comes with no send waiting (the late
answer of a send that timed out) is dropped and counted (`stray_feedback`); a caller that
waits a few seconds after a timeout before it sends again (the fallback waits `retry_s`)
never takes it for the answer to its next send.

The payload limit comes from the card (`info()`): BD-2 sends in mixed mode, so
`mixed_mode_payload_bytes(bd2_capacity_bits(level, encrypted))`, 77 bytes at level 3; a BD-3
card reports no capacity, so the regional service's 14,000 bits apply, lowered by
`max_payload_bytes` for a card on global service (560 bits) or a picky terminal.

A port that fails (EIO, the USB adapter unplugged) is closed and pending steps fail with
`BearerPortError`; the next call opens it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

import structlog

from edge_agent.bearers import (
    BearerReplyError,
    BearerRequestError,
    BearerTimeoutError,
    CardInfo,
    NoCardError,
    Refusal,
    SendResult,
)
from edge_agent.bearers.port import BearerCounters, SerialBearer
from protocols import beidou as rdss
from protocols.stream import decoded

log = structlog.get_logger(__name__)

Dialect = Literal["bd3", "bd2"]
DIALECTS: Final = ("bd3", "bd2")
STEP_TIMEOUT_S: Final = 2.0  # DOMAIN.md: about 2 s per step of the send sequence


_BD3_REFUSALS: Final[dict[int, Refusal]] = {
    rdss.Bd3Reason.NONE: Refusal.UNSPECIFIED, rdss.Bd3Reason.INTERVAL: Refusal.INTERVAL,
    rdss.Bd3Reason.SUPPRESSED: Refusal.SUPPRESSED, rdss.Bd3Reason.SILENT: Refusal.SILENT,
    rdss.Bd3Reason.POWER_NOT_LOCKED: Refusal.NO_BEAMS, rdss.Bd3Reason.NO_CARD: Refusal.NO_CARD,
    rdss.Bd3Reason.NO_PERMISSION: Refusal.NO_PERMISSION}
_BD2_REFUSALS: Final[dict[int, Refusal]] = {
    rdss.Bd2Suppression.NONE: Refusal.UNSPECIFIED, rdss.Bd2Suppression.SYSTEM: Refusal.SUPPRESSED,
    rdss.Bd2Suppression.LOW_BATTERY: Refusal.LOW_BATTERY,
    rdss.Bd2Suppression.RADIO_SILENCE: Refusal.SILENT}


@dataclass(slots=True)
class TerminalCounters(BearerCounters):
    garbage_bytes: int = 0  # bytes dropped between or inside bad sentences
    bad_sentences: int = 0  # checksum, framing and field errors
    unknown_sentences: int = 0  # well framed but not modelled (GNSS lines)
    stray_feedback: int = 0  # a `$BDFKI` with no send waiting for it
    inbound: int = 0  # messages received (`$BDTCI` / `$BDTXR`)


InboundMessage = rdss.Bd3Message | rdss.Bd2Message


# --- the driver ----------------------------------------------------------------------------


class BeidouTerminal(SerialBearer[rdss.Sentence, TerminalCounters]):
    """One BeiDou RDSS terminal on one serial port; an async context manager.

    Example::

        async with BeidouTerminal("/dev/ttyUSB1", baudrate=115200, dialect="bd3") as bd:
            card = await bd.info()  # a frame may be up to card.payload_bytes long
            if await bd.wait_ready(5.0):
                result = await bd.send("0242407", frame)
                if not result.accepted and result.reason is Refusal.INTERVAL:
                    await asyncio.sleep(result.wait_s)
    """

    EVENT_PORT_OPEN = "beidou_port_open"
    EVENT_PORT_LOST = "beidou_port_lost"

    def __init__(self, port: str, *, baudrate: int = 115200, dialect: Dialect = "bd3",
                 step_timeout_s: float = STEP_TIMEOUT_S, max_payload_bytes: int | None = None,
                 pwi_max_age_s: float = 5.0,
                 on_message: Callable[[InboundMessage], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}, not {dialect!r}")
        if step_timeout_s <= 0 or pwi_max_age_s <= 0:
            raise ValueError("step_timeout_s and pwi_max_age_s must be positive")
        if max_payload_bytes is not None and max_payload_bytes < 1:
            raise ValueError("max_payload_bytes must be at least 1")
        super().__init__(port, baudrate=baudrate, step_timeout_s=step_timeout_s,
                         log=log.bind(port=port, dialect=dialect), counters=TerminalCounters())
        self.dialect: Dialect = dialect
        self.max_payload_bytes = max_payload_bytes
        self.pwi_max_age_s = pwi_max_age_s
        self.on_message = on_message
        self.card: CardInfo | None = None  # from the last `info()`
        self._clock = clock
        self._decoder = rdss.BeidouDecoder()
        self._lock = asyncio.Lock()  # one command on the line at a time
        self._pwi: rdss.BeamReport | None = None
        self._pwi_at = 0.0

    @property
    def bd3(self) -> bool:
        return self.dialect == "bd3"

    # --- the port (`SerialBearer`'s hooks) -------------------------------------------------

    def _on_port_open(self) -> None:
        self._decoder = rdss.BeidouDecoder()
        self._pwi = None

    def _on_detach(self) -> None:
        self._pwi = None

    def _on_bytes(self, data: bytes) -> None:
        decoder = self._decoder
        before = decoder.discarded
        decoder.feed(data)
        # Typed here: mypy would join the sentence kinds into `object`.
        sentences: Iterator[rdss.Sentence | rdss.BeidouError] = decoded(decoder.next_sentence,
                                                                         rdss.BeidouError)
        for sentence in sentences:
            if isinstance(sentence, rdss.BeidouError):
                self.counters.bad_sentences += 1
                self._log.debug("beidou_bad_sentence", error=str(sentence))
            else:
                self._dispatch(sentence)
        self.counters.garbage_bytes += decoder.discarded - before

    def _dispatch(self, sentence: rdss.Sentence) -> None:
        if isinstance(sentence, rdss.BeamReport):
            self._pwi, self._pwi_at = sentence, self._clock()
        elif isinstance(sentence, rdss.Bd3Message | rdss.Bd2Message):
            self.counters.inbound += 1
            if self.on_message is not None:
                self.on_message(sentence)
        elif isinstance(sentence, rdss.UnknownSentence):
            self.counters.unknown_sentences += 1
        if (not self._offer(sentence, first_only=True)
                and isinstance(sentence, rdss.Bd3Feedback | rdss.Bd2Feedback)):
            self.counters.stray_feedback += 1
            self._log.info("beidou_stray_feedback", command=sentence.command,
                           executed=sentence.executed)

    async def _ask(self, request: rdss.Sentence | None, wants: Callable[[rdss.Sentence], bool],
                   step: str, timeout_s: float | None = None) -> rdss.Sentence:
        """Write `request` (if any) and wait for the first sentence that `wants` takes."""
        await self.open()
        waiter = self._expect(wants)
        try:
            return await self._step(waiter, step, None if request is None else rdss.encode(request),
                                    timeout_s)
        finally:
            self._forget(waiter)

    # --- commands --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A send may go now: BD-3, the latest fresh `$BDPWI` has time and a beam; BD-2 has
        no beam report, so always."""
        if not self.bd3:
            return True
        pwi = self._pwi
        return (pwi is not None and pwi.ready
                and self._clock() - self._pwi_at <= self.pwi_max_age_s)

    async def wait_ready(self, timeout_s: float) -> bool:
        """True as soon as `ready`, False if it is not within `timeout_s`."""
        if self.ready:
            return True
        try:
            await self._ask(None, lambda s: isinstance(s, rdss.BeamReport) and s.ready, "beams",
                            timeout_s)
        except BearerTimeoutError:
            return False
        return True

    async def info(self) -> CardInfo:
        """Ask the card: id, level, service interval and the payload limit it gives."""
        query: rdss.Sentence = rdss.Bd3CardQuery() if self.bd3 else rdss.Bd2CardQuery()
        kind = rdss.Bd3CardInfo if self.bd3 else rdss.Bd2CardInfo
        async with self._lock:
            try:
                reply = await self._ask(query, lambda s: isinstance(s, kind), "card query")
            except BearerTimeoutError:
                self.counters.timeouts += 1
                raise
        assert isinstance(reply, rdss.Bd3CardInfo | rdss.Bd2CardInfo)
        if not reply.has_card:
            raise NoCardError(self.port)
        card = self._card_info(reply)
        self.card = card
        return card

    def _card_info(self, reply: rdss.Bd3CardInfo | rdss.Bd2CardInfo) -> CardInfo:
        if isinstance(reply, rdss.Bd3CardInfo):
            limit, encrypted = rdss.BD3_REGIONAL_MAX_BITS // 8, False
        else:
            try:
                limit = rdss.mixed_mode_payload_bytes(
                    rdss.bd2_capacity_bits(reply.level, reply.encrypted))
            except rdss.FieldError as exc:
                raise BearerReplyError(f"{self.port}: {exc}") from exc
            encrypted = reply.encrypted
        if self.max_payload_bytes is not None:
            limit = min(limit, self.max_payload_bytes)
        return CardInfo(card_id=reply.card_id, level=reply.level, interval_s=reply.interval_s,
                        payload_bytes=limit, dialect=self.dialect, encrypted=encrypted)

    async def send(self, recipient: str, payload: bytes) -> SendResult:
        """Send one short message (mixed mode); the terminal's `$BDFKI` says if it went."""
        request: rdss.Sentence
        try:
            if self.bd3:
                request = rdss.Bd3Send(recipient, payload, rdss.Bd3Encoding.MIXED)
            else:
                request = rdss.Bd2Send(recipient, payload, rdss.Bd2Mode.MIXED)
        except rdss.FieldError as exc:
            raise BearerRequestError(f"{self.port}: {exc}") from exc
        command = "TCQ" if self.bd3 else "TXA"
        kind = rdss.Bd3Feedback if self.bd3 else rdss.Bd2Feedback
        async with self._lock:
            try:
                reply = await self._ask(
                    request, lambda s: isinstance(s, kind) and s.command == command, "send")
            except BearerTimeoutError:
                self.counters.timeouts += 1
                raise
        assert isinstance(reply, rdss.Bd3Feedback | rdss.Bd2Feedback)
        return self._counted(_result(reply))


def _result(reply: rdss.Bd3Feedback | rdss.Bd2Feedback) -> SendResult:
    if reply.executed:
        return SendResult(True)
    if isinstance(reply, rdss.Bd3Feedback):
        reason = _BD3_REFUSALS.get(reply.reason, Refusal.OTHER)
        return SendResult(False, reason, reply.wait_s, reply.reason)
    if not reply.interval_ok:
        return SendResult(False, Refusal.INTERVAL, reply.wait_s, reply.suppression)
    reason = _BD2_REFUSALS.get(reply.suppression, Refusal.OTHER)
    return SendResult(False, reason, reply.wait_s, reply.suppression)


__all__ = ["DIALECTS", "STEP_TIMEOUT_S", "BeidouTerminal", "Dialect", "InboundMessage",
           "TerminalCounters"]
