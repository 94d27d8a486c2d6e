"""The narrowband fallback (DESIGN.md §5, 三断): alarms and a heartbeat by short message while
the IP uplink is down.

`NarrowbandFallback.run()` (task `narrowband.beidou`, `narrowband.pdt` or `narrowband.tiantong`,
by the bearer) idles while IP is up or has been down for less than `after_s`. Past that, every
time the terminal allows, it sends one frame (`protocols.narrowband`), most important first:

1. the undelivered ALARM records (raises, changes, clears) above its watermark, oldest first,
   as many as fit the card's payload limit in one `ALARMS` frame;
2. else, once `heartbeat_s` has passed since the last one (at once on activation), a
   `HEARTBEAT` with the last seq, the backlog, the active alarms and how long IP has been down;
3. else the undelivered 叫应 receipts and acknowledgements (EVENT records of
   `protocols.callresp`) above their own watermark (`narrowband_ack_seq`) in a `CALL_ACKS`
   frame; central applies them to the warning at once and merges the IP copy later.

With a `downlink` (`edge_agent.narrowband.downlink.RadioDownlink`) the same task also takes
the warnings central sends down by radio, while IP is down or not.

**Nothing twice.** The watermark (outbox meta `narrowband_sent_seq`) is the highest seq a
terminal has accepted (`$BDFKI` executed Y, a PDT text ack with result 0). It moves only
after that answer, and it is in the outbox file, so a restarted agent does not send accepted
alarms again. A refusal, a timeout or a lost port leaves it where it was, and the same alarms
go in a later frame: at-least-once, and central merges by seq. A send the terminal accepted
but whose answer was lost is sent again; that is the price of never losing one.

**The terminal's pace.** After an accepted send the next waits the card's service interval;
after a refusal, the wait the terminal gave (reason 1), and at least the service interval for
the other reasons; after an error, `retry_s`. A BD-3 terminal must have beams (`ready`) first,
a PDT radio its HRNP link. A PDT radio's "interval" is the configured spacing of texts.

When IP comes back the loop goes idle; the uplink then sends the same records in full and marks
them delivered, and a later outage starts above the watermark. Alarms whose point has no
ordinal in the birth inventory (or whose attrs do not map to the frame's codes) are skipped,
counted and logged once per point: the full record still goes over IP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from edge_agent.bearers import BearerError, CardInfo, Refusal, SendResult
from edge_agent.narrowband.config import NarrowbandConfig
from edge_agent.narrowband.downlink import RadioDownlink
from edge_agent.outbox.store import Outbox, OutboxError
from protocols.alarm_attrs import AlarmAttrs
from protocols.callresp import CallRespError, EventType, is_callresp, parse_event_attrs
from protocols.envelope import Birth, Record
from protocols.narrowband import (
    RULE_NAMES,
    TRANSITION_NAMES,
    AlarmEntry,
    AlarmRule,
    CallAckEntry,
    CallAckType,
    FrameCapacityError,
    HeartbeatFrame,
    PowerState,
    encode_alarms,
    encode_call_acks,
    encode_heartbeat,
)
from protocols.point_inventory import PointInventory
from protocols.record_attrs import AttrsError
from runtime.counters import Counters

log = structlog.get_logger(__name__)

WATERMARK_KEY: Final = "narrowband_sent_seq"
ACK_WATERMARK_KEY: Final = "narrowband_ack_seq"  # 叫应 events sent by radio, up to this seq
STATE_KEY: Final = "narrowband_state"  # active | idle, for `edge-agent status` (outbox meta)
_RULES: Final[dict[str, AlarmRule]] = {name: code for code, name in RULE_NAMES.items()}
_STATES: Final = {name: code for code, name in TRANSITION_NAMES.items()}
_FLOAT32_MAX: Final = 3.4028234663852886e38
_MIN_ENTRY_BYTES: Final = 8  # seq delta, ordinal, code, time delta: 1 byte each; float32: 4


class IpLink(Protocol):
    """What the fallback reads of the uplink (`edge_agent.uplink.link.Uplink` has both)."""

    connected: bool
    down_since: float | None  # monotonic; None while connected


class Bearer(Protocol):
    """A narrowband terminal (`edge_agent.bearers.beidou.BeidouTerminal`,
    `edge_agent.bearers.pdt.PdtRadio`); `recipient` is central's card or radio id."""

    async def info(self) -> CardInfo: ...

    async def wait_ready(self, timeout_s: float) -> bool: ...

    async def send(self, recipient: str, payload: bytes) -> SendResult: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class NarrowbandCounters(Counters):
    frames_sent: int = 0
    alarms_sent: int = 0
    heartbeats_sent: int = 0
    call_acks_sent: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    skipped_alarms: int = 0  # no ordinal, or attrs that do not map to the frame's codes
    not_ready: int = 0  # BD-3 without beams, PDT not connected, when a frame was due
    activations: int = 0


def point_ordinals(birth: Birth) -> Mapping[str, int]:
    """Point key → ordinal from the birth inventory (`protocols.point_inventory`); a device's
    pseudo point `<device>/_device` (device-level alarms) names the ordinal of its first point."""
    return PointInventory.of_birth(birth).ordinals


def frame_value(value: object) -> float | None:
    """A record's value as the frame carries it: float32, booleans as 1/0, else none."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value) and abs(value) <= _FLOAT32_MAX:
        return float(value)
    return None


class NarrowbandFallback:
    """Sends alarms and heartbeats over one terminal while IP is down; see the module doc.

    Example::

        fallback = NarrowbandFallback(outbox=ob, link=uplink, birth=birth, terminal=bd,
                                      config=cfg.narrowband, key=cfg.narrowband.key_bytes(),
                                      active_alarms=lambda: len(rules.engine.active()))
        tg.create_task(fallback.run(), name=f"narrowband.{cfg.narrowband.bearer}")
    """

    def __init__(self, *, outbox: Outbox, link: IpLink, birth: Birth, terminal: Bearer,
                 config: NarrowbandConfig, key: bytes,
                 active_alarms: Callable[[], int] = lambda: 0,
                 downlink: RadioDownlink | None = None, poll_s: float = 1.0,
                 retry_s: float = 10.0, ready_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if poll_s <= 0 or retry_s <= 0 or ready_timeout_s <= 0:
            raise ValueError("poll_s, retry_s and ready_timeout_s must be positive")
        self.outbox = outbox
        self.link = link
        self.terminal = terminal
        self.config = config
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.ready_timeout_s = ready_timeout_s
        self.counters = NarrowbandCounters()
        self.active = False
        self.watermark = 0
        self.ack_watermark = 0
        self.downlink = downlink
        self._key = key
        self._ordinals: Mapping[str, int] = point_ordinals(birth)
        self._active_alarms = active_alarms
        self._clock, self._wall = clock, wall
        self._card: CardInfo | None = None
        self._next_at = 0.0  # monotonic: no send before this (interval, refusal, error)
        self._last_heartbeat: float | None = None
        self._last_error: str | None = None
        self._failing = False
        self._warned: set[str] = set()
        self._skipped_upto = 0
        self._log = log.bind(bearer=config.bearer, port=config.port)

    def status(self) -> dict[str, Any]:
        """For `edge-agent status`: state, card, watermark and counters."""
        card = self._card
        terminal_counters = getattr(self.terminal, "counters", None)
        return {"active": self.active, "bearer": self.config.bearer, "port": self.config.port,
                "watermark": self.watermark, "ack_watermark": self.ack_watermark,
                "last_error": self._last_error,
                "downlink": self.downlink.counters.to_dict() if self.downlink else None,
                "card": None if card is None else dataclasses.asdict(card),
                "counters": self.counters.to_dict(),
                "terminal": terminal_counters.to_dict() if terminal_counters else None}

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled; the terminal is closed on the way out."""
        self.watermark = await self._load_watermark(WATERMARK_KEY)
        self.ack_watermark = await self._load_watermark(ACK_WATERMARK_KEY)
        self._log.info("narrowband_started", after_s=self.config.after_s,
                       heartbeat_s=self.config.heartbeat_s, watermark=self.watermark)
        try:
            async with asyncio.TaskGroup() as tg:
                if self.downlink is not None:
                    tg.create_task(self.downlink.run(), name="narrowband.downlink")
                await self._probe()
                while True:
                    await self._tick()
        finally:
            self.active = False
            await self.terminal.close()
            self._log.info("narrowband_stopped")

    async def _tick(self) -> None:
        down_s = self._ip_down_s()
        if down_s is None or down_s < self.config.after_s:
            if self.active:
                await self._set_active(False, down_s)
            await asyncio.sleep(self.poll_s)
            return
        if not self.active:
            await self._set_active(True, down_s)
        wait = self._next_at - self._clock()
        if wait > 0:
            await asyncio.sleep(min(wait, self.poll_s))  # short, to notice IP coming back
            return
        try:
            busy = await self._step(down_s)
        except (BearerError, OutboxError) as exc:
            self._failed(exc)
            self._next_at = self._clock() + self.retry_s
            return
        if self._failing:
            self._failing = False
            self._log.info("narrowband_recovered")
        if not busy:
            await asyncio.sleep(self.poll_s)

    def _ip_down_s(self) -> float | None:
        since = self.link.down_since
        if self.link.connected or since is None:
            return None
        return max(0.0, self._clock() - since)

    async def _set_active(self, active: bool, down_s: float | None) -> None:
        self.active = active
        if active:
            self.counters.activations += 1
            self._last_heartbeat = None  # tell central at once that the radio carries us
            self._log.warning("narrowband_active", ip_down_s=round(down_s or 0.0, 1),
                              watermark=self.watermark)
        else:
            self._log.info("narrowband_idle", reason="ip_up", watermark=self.watermark)
        try:
            await self.outbox.set_meta(STATE_KEY, "active" if active else "idle")
        except OutboxError as exc:
            self._warn_once("state_meta", "narrowband_meta_failed", error=str(exc))

    async def _probe(self) -> None:
        """Ask the card at start, so that a missing or broken terminal shows at once and not
        on the day IP goes down; a failure here is logged, not fatal."""
        try:
            await self._get_card()
        except BearerError as exc:
            self._failed(exc)

    async def _get_card(self) -> CardInfo:
        card = self._card
        if card is None:
            card = self._card = await self.terminal.info()
            self._log.info("narrowband_terminal", card=card.card_id, card_level=card.level,
                           interval_s=card.interval_s, payload_bytes=card.payload_bytes)
        return card

    async def _step(self, down_s: float) -> bool:
        """Send what is due; False when there was nothing to send."""
        card = await self._get_card()
        records = await self.outbox.undelivered_alarms(
            self.watermark, card.payload_bytes // _MIN_ENTRY_BYTES + 16)
        entries = [e for e in map(self._entry, records) if e is not None]
        heartbeat_due = (self._last_heartbeat is None
                         or self._clock() - self._last_heartbeat >= self.config.heartbeat_s)
        acks: list[CallAckEntry] = []
        if not entries:
            if records:  # only skipped ones: step over them, they go over IP
                await self._advance(records[-1].seq)
                return True
            if not heartbeat_due:
                acks = await self._call_acks(card)
                if not acks:
                    return False
        if not await self.terminal.wait_ready(self.ready_timeout_s):
            self.counters.not_ready += 1
            self._warn_once("not_ready", "narrowband_not_ready", wait_s=self.ready_timeout_s)
            self._next_at = self._clock() + self.retry_s
            return True
        self._warned.discard("not_ready")
        if entries:
            await self._send_alarms(card, entries)
        elif acks:
            await self._send_call_acks(card, acks)
        else:
            await self._send_heartbeat(card, down_s)
        return True

    async def _call_acks(self, card: CardInfo) -> list[CallAckEntry]:
        """The 叫应 events above the ack watermark; steps over other events (they go by IP)."""
        records = await self.outbox.undelivered_events(
            self.ack_watermark, card.payload_bytes // _MIN_ENTRY_BYTES + 16)
        acks = []
        for r in records:
            if not is_callresp(r.attrs):
                continue
            try:
                ev = parse_event_attrs(r.attrs or {})
                acks.append(CallAckEntry(
                    seq=r.seq, type=CallAckType.ACK if ev.type is EventType.ACK
                    else CallAckType.DELIVERED, warning_id=ev.warning_id,
                    terminal=ev.terminal, at_ms=ev.at_ms, by=ev.by))
            except (CallRespError, ValueError):
                self._skip(r, "unmappable")
        if not acks and records:
            await self._advance_acks(records[-1].seq)
        return acks

    async def _send_call_acks(self, card: CardInfo, acks: Sequence[CallAckEntry]) -> None:
        count = await self._send_frame(card, "call_acks", encode_call_acks, acks)
        if count:
            self.counters.call_acks_sent += count
            await self._advance_acks(acks[count - 1].seq)

    async def _advance_acks(self, seq: int) -> None:
        self.ack_watermark = max(self.ack_watermark, seq)
        await self.outbox.set_meta(ACK_WATERMARK_KEY, str(self.ack_watermark))

    async def _send_alarms(self, card: CardInfo, entries: Sequence[AlarmEntry]) -> None:
        count = await self._send_frame(card, "alarms", encode_alarms, entries)
        if count:
            self.counters.alarms_sent += count
            await self._advance(entries[count - 1].seq)

    async def _send_frame(self, card: CardInfo, kind: str, encode: Callable[..., tuple[bytes, int]],
                          entries: Sequence[AlarmEntry] | Sequence[CallAckEntry]) -> int:
        """Encode as many `entries` as fit and send them; how many the terminal took (0:
        none, refused or too big)."""
        try:
            frame, count = encode(int(self._wall()), entries, key=self._key,
                                  stream=self.outbox.stream, limit=card.payload_bytes,
                                  mac_len=self.config.mac_len)
        except FrameCapacityError as exc:
            self._too_big(card, str(exc))
            return 0
        result = await self.terminal.send(self.config.recipient, frame)
        if not result.accepted:
            self._refused(card, result, kind)
            return 0
        self.counters.frames_sent += 1
        self._next_at = self._clock() + max(card.interval_s, 1)
        self._log.info("narrowband_frame_sent", kind=kind, entries=count,
                       first_seq=entries[0].seq, last_seq=entries[count - 1].seq,
                       size=len(frame), left=len(entries) - count)
        return count

    async def _send_heartbeat(self, card: CardInfo, down_s: float) -> None:
        beat = HeartbeatFrame(ts=int(self._wall()), last_seq=await self.outbox.last_seq(),
                              backlog=await self.outbox.backlog(),
                              active_alarms=max(0, self._active_alarms()),
                              ip_down_s=int(down_s), power=PowerState.UNKNOWN, battery_pct=None)
        frame = encode_heartbeat(beat, key=self._key, stream=self.outbox.stream,
                                 mac_len=self.config.mac_len)
        if len(frame) > card.payload_bytes:
            self._too_big(card, f"heartbeat of {len(frame)} bytes")
            return
        result = await self.terminal.send(self.config.recipient, frame)
        if not result.accepted:
            self._refused(card, result, "heartbeat")
            return
        self.counters.frames_sent += 1
        self.counters.heartbeats_sent += 1
        self._last_heartbeat = self._clock()
        self._next_at = self._last_heartbeat + max(card.interval_s, 1)
        self._log.info("narrowband_frame_sent", kind="heartbeat", size=len(frame),
                       last_seq=beat.last_seq, backlog=beat.backlog,
                       active_alarms=beat.active_alarms, ip_down_s=beat.ip_down_s)

    async def _advance(self, seq: int) -> None:
        # In memory first: if the meta write fails, this run still does not resend, and a
        # restart resends at worst (central merges by seq).
        self.watermark = max(self.watermark, seq)
        await self.outbox.set_meta(WATERMARK_KEY, str(self.watermark))

    async def _load_watermark(self, key: str) -> int:
        raw = await self.outbox.get_meta(key)
        if raw is None:
            return 0
        if not raw.isdigit():
            self._log.warning("narrowband_watermark_malformed", value=raw[:40])
            return 0
        return int(raw)

    # --- records → frame entries -----------------------------------------------------------

    def _entry(self, record: Record) -> AlarmEntry | None:
        ordinal = self._ordinals.get(record.point) if record.point is not None else None
        if ordinal is None:
            self._skip(record, "no_ordinal")
            return None
        try:
            attrs = AlarmAttrs.from_attrs(record.attrs or {})
        except AttrsError:
            self._skip(record, "unmappable")
            return None
        rule = _RULES.get(attrs.rule)
        if rule is None or attrs.level > 2:
            self._skip(record, "unmappable")
            return None
        return AlarmEntry(seq=record.seq, point=ordinal, rule=rule,
                          state=_STATES[attrs.state], level=attrs.level,
                          ts=max(0, record.ts_ms // 1000), value=frame_value(record.value))

    def _skip(self, record: Record, reason: str) -> None:
        if record.seq <= self._skipped_upto:
            return None  # met again after a refusal: counted once
        self._skipped_upto = record.seq
        self.counters.skipped_alarms += 1
        self._warn_once(f"{reason}:{record.point}", "narrowband_alarm_skipped", reason=reason,
                        point=record.point, seq=record.seq)
        return None

    # --- outcomes --------------------------------------------------------------------------

    def _refused(self, card: CardInfo, result: SendResult, kind: str) -> None:
        reason = result.reason or Refusal.OTHER
        refusals = self.counters.refusals
        refusals[reason] = refusals.get(reason, 0) + 1
        # Reason 1 says exactly how long; for the others (no beams, suppressed, silent) try
        # again no sooner than a service interval.
        floor = 1 if reason is Refusal.INTERVAL else max(card.interval_s, 1)
        self._next_at = self._clock() + max(result.wait_s, floor)
        self._log.info("narrowband_refused", kind=kind, reason=str(reason), code=result.code,
                       wait_s=result.wait_s)

    def _too_big(self, card: CardInfo, detail: str) -> None:
        self.counters.errors += 1
        self._warn_once("too_big", "narrowband_frame_too_big", detail=detail,
                        payload_bytes=card.payload_bytes)
        self._next_at = self._clock() + max(card.interval_s, self.retry_s)

    def _failed(self, exc: Exception) -> None:
        self.counters.errors += 1
        self._card = None  # the port may come back with another terminal on it: ask again
        self._last_error = str(exc)
        if not self._failing:
            self._failing = True
            self._log.warning("narrowband_error", error=str(exc), kind=type(exc).__name__)
        else:
            self._log.debug("narrowband_error", error=str(exc))

    def _warn_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._log.warning(event, **fields)


__all__ = ["ACK_WATERMARK_KEY", "STATE_KEY", "WATERMARK_KEY", "Bearer", "IpLink",
           "NarrowbandCounters", "NarrowbandFallback", "frame_value", "point_ordinals"]
