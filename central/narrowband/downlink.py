"""Central's narrowband downlink (DESIGN.md §5 "Downlink"): 叫应 warnings to gateways that are
off IP, by central's own BeiDou terminal or PDT radio.

`RadioRoute` is the queue between the command dispatcher (`central.commands.dispatch`, which
signs a `play_warning` command as a radio warning, `protocols.narrowband_down.sign_warning`,
when the gateway's state says it is not on IP) and the receiver's session
(`central.narrowband.receiver`, which owns the port). No I/O here: the session asks `next_send`
what to write, hands the terminal's answers to `feedback`, and calls `tick` on every turn.

- One segment is on the line at a time; the next waits for the terminal's answer (`$BDFKI`, a
  PDT text ack) and then the card's service interval (`card`: `$BDICP` / `$BDICI`; PDT: the
  configured spacing). A refusal waits what the terminal says (at least the interval); no
  answer within `step_timeout_s` counts as a timeout and the segment goes again after
  `retry_s`.
- A warning is sent whole once per cmd_id (`offer` refuses one queued or sent already): the
  workflow's re-sends are new commands with new ids, and a lost segment is re-sent by the
  step above. Queued warnings go oldest first; at most `max_queued` wait.
- The segment size is the smaller of central's card limit and `narrowband_max_payload_bytes`
  (the gateways' terminals may carry less than central's); the text of a warning is cut to fit
  `narrowband_downlink_segments` segments (`protocols.narrowband_down`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import structlog

from central.config.settings import Settings
from protocols.hrnp_text import DEFAULT_MAX_TEXT_BYTES
from protocols.narrowband import text_frame_bytes
from protocols.narrowband_down import segments
from runtime.counters import Counters

log = structlog.get_logger(__name__)

BEIDOU_DEFAULT_BYTES: Final = 77  # BD-2 level 3 in mixed mode, until the card says more
STEP_TIMEOUT_S: Final = 5.0
RETRY_S: Final = 10.0
RADIO_BEARERS: Final = frozenset({"beidou", "pdt", "tiantong"})


@dataclass(slots=True)
class DownlinkCounters(Counters):
    offered: int = 0
    warnings_sent: int = 0
    segments_sent: int = 0
    refused: int = 0
    timeouts: int = 0
    dropped: int = 0  # queue full


@dataclass(slots=True)
class _Outgoing:
    cmd_id: str
    gw: str
    recipient: str
    segments: list[bytes]
    index: int = 0


@dataclass(slots=True)
class _Pending:
    item: _Outgoing
    deadline: float


@dataclass(slots=True)
class RadioRoute:
    """See the module doc. `addresses`: gateway → its card (BeiDou) or radio id (PDT)."""

    bearer: str
    addresses: dict[str, str]
    max_segments: int
    max_payload_bytes: int | None = None
    interval_s: float = 60.0
    payload_bytes: int = BEIDOU_DEFAULT_BYTES
    step_timeout_s: float = STEP_TIMEOUT_S
    retry_s: float = RETRY_S
    max_queued: int = 64
    clock: Callable[[], float] = time.monotonic
    counters: DownlinkCounters = field(default_factory=DownlinkCounters)
    _queue: OrderedDict[str, _Outgoing] = field(default_factory=OrderedDict)
    _sent: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _pending: _Pending | None = None
    _next_at: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RadioRoute:
        pdt = settings.narrowband_bearer == "pdt"
        addresses = {}
        for g in settings.narrowband_gateways:
            if settings.narrowband_bearer == "tiantong":
                break  # no warnings by SMS yet: alarms and acks come up only
            address = (str(g.radio) if g.radio is not None else None) if pdt else g.card_number
            if address is not None:
                addresses[g.gw] = address
        return cls(bearer=settings.narrowband_bearer, addresses=addresses,
                   max_segments=settings.narrowband_downlink_segments,
                   max_payload_bytes=settings.narrowband_max_payload_bytes,
                   interval_s=settings.narrowband_interval_s if pdt else 60.0,
                   payload_bytes=(text_frame_bytes(DEFAULT_MAX_TEXT_BYTES) if pdt
                                  else BEIDOU_DEFAULT_BYTES))

    # --- the dispatcher's side ---------------------------------------------------------

    def reaches(self, gw: str) -> bool:
        return gw in self.addresses

    @property
    def limit(self) -> int:
        """The bytes of one segment (one short message)."""
        cap = self.max_payload_bytes
        return self.payload_bytes if cap is None else min(self.payload_bytes, cap)

    def offer(self, cmd_id: str, gw: str, signed: bytes) -> bool:
        """Queue a signed warning for `gw`; False when it is queued or sent already, the gw
        has no radio, or the queue is full."""
        if cmd_id in self._queue or cmd_id in self._sent or gw not in self.addresses:
            return False
        if len(self._queue) >= self.max_queued:
            self.counters.dropped += 1
            return False
        self._queue[cmd_id] = _Outgoing(cmd_id, gw, self.addresses[gw],
                                        segments(signed, self.limit))
        self.counters.offered += 1
        log.info("narrowband_warning_queued", cmd_id=cmd_id, gw=gw,
                 segments=len(self._queue[cmd_id].segments), bearer=self.bearer)
        return True

    def sent(self, cmd_id: str) -> bool:
        return cmd_id in self._sent

    def holds(self, cmd_id: str) -> bool:
        """Queued or sent already: nothing to sign again."""
        return cmd_id in self._queue or cmd_id in self._sent

    # --- the session's side --------------------------------------------------------------

    def card(self, interval_s: float, payload_bytes: int) -> None:
        """What central's own terminal allows (its card)."""
        self.interval_s, self.payload_bytes = interval_s, payload_bytes

    def next_send(self) -> tuple[str, bytes] | None:
        """The (recipient, segment) to write now, if one is due; it then awaits `feedback`."""
        now = self.clock()
        if self._pending is not None or now < self._next_at or not self._queue:
            return None
        item = next(iter(self._queue.values()))
        self._pending = _Pending(item, now + self.step_timeout_s)
        return item.recipient, item.segments[item.index]

    def feedback(self, accepted: bool, wait_s: float = 0.0) -> None:
        """The terminal's answer to the segment on the line."""
        pending, self._pending = self._pending, None
        if pending is None:
            return  # an answer to nothing of ours
        now = self.clock()
        if not accepted:
            self.counters.refused += 1
            self._next_at = now + max(wait_s, self.interval_s, 1.0)
            return
        self.counters.segments_sent += 1
        self._next_at = now + self.interval_s
        item = pending.item
        item.index += 1
        if item.index >= len(item.segments):
            self._queue.pop(item.cmd_id, None)
            self._sent[item.cmd_id] = now
            while len(self._sent) > 4096:
                self._sent.popitem(last=False)
            self.counters.warnings_sent += 1
            log.info("narrowband_warning_sent", cmd_id=item.cmd_id, gw=item.gw,
                     segments=len(item.segments), bearer=self.bearer)

    def tick(self) -> None:
        """No answer in time: the segment goes again after `retry_s`."""
        pending = self._pending
        if pending is not None and self.clock() > pending.deadline:
            self._pending = None
            self.counters.timeouts += 1
            self._next_at = self.clock() + self.retry_s

    def lost(self) -> None:
        """The port is gone: whatever was on the line gets no answer."""
        self._pending = None


__all__ = ["RADIO_BEARERS", "DownlinkCounters", "RadioRoute"]
