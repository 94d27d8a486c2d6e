"""The bearer-specific half of central's narrowband receiver (`.receiver`), with no I/O.

A `Link` is fed the bytes read from central's radio and says what to write back and which
messages the bytes carried (`Inbound`) or why they carried none (`Dropped`). `BeidouLink` is
here; `central.narrowband.pdt.PdtLink` is the Hytera PDT one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from central.config.settings import NarrowbandGateway, Settings
from protocols import beidou as bd
from protocols.stream import NeedData

QUIET_S: Final = 0.5  # a line quiet this long: the link may give up a partial packet


# --- the per-bearer part ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message from a gateway's radio: its sender (card or radio id) and the frame bytes."""

    sender: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Dropped:
    """Bytes or a message that carry no frame, counted under `reason`; `quiet`: logged at info
    (a person's text is expected on a shared channel), else as a warning."""

    reason: str
    error: Exception
    sender: str | None = None
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class Feedback:
    """Central's terminal answered the send on the line (`$BDFKI`, a PDT text ack)."""

    accepted: bool
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class CardSeen:
    """Central's terminal told what it allows: one send per `interval_s`, `payload_bytes`."""

    interval_s: float
    payload_bytes: int


LinkEvent = Inbound | Dropped | Feedback | CardSeen


def drain(next_item: Callable[[], object], error: type[Exception], reason: str,
          event: Callable[[Any], LinkEvent | None]) -> list[LinkEvent]:
    """The events of what a decoder holds: `next_item` until it needs more bytes, each item
    made an event by `event` (None: it says nothing about gateways), each `error` it raises a
    `Dropped(reason)` (the decoder has skipped the bad bytes, so it goes on)."""
    events: list[LinkEvent] = []
    while True:
        try:
            item = next_item()
        except error as exc:
            events.append(Dropped(reason, exc))
            continue
        if isinstance(item, NeedData):
            return events
        made = event(item)
        if made is not None:
            events.append(made)


class Link(Protocol):
    """The bearer-specific half of a session on central's radio, fed bytes, no I/O: `address`
    is the sender id naming a gateway (no leading zeros), `hello` the bytes to write when the
    port opens, `feed` takes bytes read and `idle` is called when the line has been quiet
    `QUIET_S`; both give what to write back and the events the bytes carried. `send` gives
    the bytes that send `payload` to `recipient` (the downlink); its answer comes back as a
    `Feedback` event."""

    bearer: str

    def address(self, gateway: NarrowbandGateway) -> str | None: ...

    def hello(self) -> bytes: ...

    def feed(self, data: bytes) -> tuple[bytes, list[LinkEvent]]: ...

    def idle(self) -> tuple[bytes, list[LinkEvent]]: ...

    def send(self, recipient: str, payload: bytes) -> bytes: ...


class BeidouLink:
    """Central's BeiDou terminal: asks for its card on open (for the log), reads messages."""

    bearer = "beidou"

    def __init__(self, settings: Settings, logger: Any) -> None:
        self._bd3 = settings.narrowband_dialect == "bd3"
        self._decoder = bd.BeidouDecoder()
        self._log = logger

    def address(self, gateway: NarrowbandGateway) -> str | None:
        return gateway.card_number

    def hello(self) -> bytes:
        return bd.encode(bd.Bd3CardQuery() if self._bd3 else bd.Bd2CardQuery())

    def feed(self, data: bytes) -> tuple[bytes, list[LinkEvent]]:
        self._decoder.feed(data)
        return b"", drain(self._decoder.next_sentence, bd.BeidouError, "bad_sentence", self._event)

    def _event(self, sentence: bd.Sentence) -> LinkEvent | None:
        if isinstance(sentence, bd.Bd3Message | bd.Bd2Message):
            return Inbound(sentence.sender, sentence.payload)
        if isinstance(sentence, bd.Bd3Feedback | bd.Bd2Feedback):
            if sentence.command not in ("TCQ", "TXA"):
                return None
            return Feedback(sentence.executed, float(sentence.wait_s))
        if isinstance(sentence, bd.Bd3CardInfo | bd.Bd2CardInfo):
            self._log.info("narrowband_terminal", card=sentence.card_id,
                           interval_s=sentence.interval_s)
            if isinstance(sentence, bd.Bd3CardInfo):
                return CardSeen(sentence.interval_s, bd.BD3_REGIONAL_MAX_BITS // 8)
            try:
                bits = bd.bd2_capacity_bits(sentence.level, sentence.encrypted)
            except bd.FieldError:
                return None
            return CardSeen(sentence.interval_s, bd.mixed_mode_payload_bytes(bits))
        return None  # $BDPWI beams and the rest say nothing about gateways

    def idle(self) -> tuple[bytes, list[LinkEvent]]:
        return b"", []

    def send(self, recipient: str, payload: bytes) -> bytes:
        """`$CCTCQ` (BD-3) or `$CCTXA` (BD-2) in mixed mode; b"" for a recipient the dialect
        cannot address (answered by nothing: the route times it out and counts it)."""
        try:
            request: bd.Sentence = (
                bd.Bd3Send(recipient, payload, bd.Bd3Encoding.MIXED) if self._bd3
                else bd.Bd2Send(recipient, payload, bd.Bd2Mode.MIXED))
        except bd.FieldError as exc:
            self._log.warning("narrowband_send_unencodable", recipient=recipient,
                              error=str(exc))
            return b""
        return bd.encode(request)
