"""One terminal's driver: its line, its FLT/1 session, its health (docs/terminal-protocol.md).

`TerminalLink.run()` (task `terminal[<id>]` under the agent's supervisor) connects, reads
frames, answers them, and reconnects with a capped, jittered back-off when the line fails,
ends, or stays silent for three heartbeat intervals (§4.4); going offline and coming back are
logged once each. Bytes go through the pure decoder (`protocols.terminal.TerminalDecoder`):
a bad frame (CRC, length) is counted by its error class and skipped, a whole frame that cannot
be taken is answered with an ERROR (§4.3) and counted, a partial frame the line left waiting
for 2 s is dropped (§3.3). Nothing in a frame can end the loop.

- HEARTBEAT → `events.on_heartbeat`, then a RECEIPT.
- ACK → `events.on_ack`, which stores it durably, THEN the RECEIPT (§4.3: the gateway stores
  an acknowledgement before it confirms it); a repeated ACK gets the same answer.
- RECEIPT of a PLAY → `events.on_delivered`; ERROR of a PLAY → the play is refused.

`play()` sends a PLAY and waits a little for its answer: `delivered`, `refused` (an ERROR,
or no line), or `sent` (no answer yet). An unanswered PLAY is sent again every 3 s, up to 5
times, and again after a reconnect (§4.3); its receipt is recorded whenever it comes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from edge_agent.terminals.config import TerminalConfig
from edge_agent.terminals.errors import (
    TerminalLineError,
    TerminalSilentError,
    TerminalStoreError,
)
from edge_agent.terminals.line import Line, open_line
from protocols import terminal as tm
from protocols.terminal_events import PlayResult
from runtime.clock import now_ms
from runtime.counters import Counters
from runtime.tasks import Backoff

log = structlog.get_logger(__name__)

TICK_S = 0.5
PARTIAL_S = 2.0  # §3.3: a frame comes in one burst
RESEND_S = 3.0  # §4.3
SENDS_MAX = 5
SILENT_INTERVALS = 3  # §4.4
DEFAULT_INTERVAL_S = 30.0


@dataclass(frozen=True, slots=True)
class PlayOutcome:
    terminal: str
    result: PlayResult
    reason: str | None = None  # refused: not_connected, unknown_terminal, an ERROR code name

    def to_wire(self) -> dict[str, str]:
        out = {"result": str(self.result)}
        if self.reason:
            out["reason"] = self.reason
        return out


class LinkEvents(Protocol):
    """What the link hands up (`TerminalService`); each call is awaited before the answer."""

    async def on_heartbeat(self, link: TerminalLink, hb: tm.Heartbeat) -> None: ...

    async def on_delivered(self, link: TerminalLink, wire_id: int, at_s: int) -> None: ...

    async def on_ack(self, link: TerminalLink, ack: tm.Ack) -> None: ...

    async def on_lost(self, link: TerminalLink, reason: str) -> None: ...


@dataclass(slots=True)
class LinkCounters(Counters):
    connects: int = 0
    connect_errors: int = 0
    lost: int = 0
    frames: int = 0
    heartbeats: int = 0
    bad_frames: int = 0
    refused_frames: int = 0  # whole frames we answered with an ERROR
    partial_dropped: int = 0
    garbage_bytes: int = 0  # stepped over while looking for a frame
    plays_sent: int = 0
    play_repeats: int = 0
    plays_unanswered: int = 0
    receipts: int = 0
    errors_received: int = 0
    acks: int = 0
    unmatched: int = 0  # receipts and errors naming no frame we wait on
    bad_by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    frame: bytes
    wire_id: int
    sent_at: float
    sends: int
    answer: asyncio.Future[PlayOutcome]


def _now_s() -> int:
    return int(time.time())


class TerminalLink:
    """One configured terminal; see the module doc."""

    def __init__(self, config: TerminalConfig, events: LinkEvents, *,
                 open_line: Callable[[TerminalConfig], Awaitable[Line]] = open_line,
                 backoff: Backoff | None = None) -> None:
        self.config = config
        self.id = config.id
        self.counters = LinkCounters()
        self.heartbeat: tm.Heartbeat | None = None
        self.connected = False
        self.last_error: str | None = None
        # Wall-clock ms, for the technician (`edge-agent status`): when the line came up or
        # went down (the first failed attempt since start, or since it was last up), and
        # when the last heartbeat came.
        self.since_ms: int | None = None
        self.last_heartbeat_ms: int | None = None
        self._events = events
        self._open_line = open_line
        self._backoff = backoff or Backoff(first_s=0.5, max_s=config.backoff_max_s,
                                           healthy_after_s=30.0)
        self._line: Line | None = None
        self._write_lock = asyncio.Lock()
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._interval_s = DEFAULT_INTERVAL_S
        self._lg = log.bind(terminal=config.id, endpoint=config.endpoint)

    # --- the task --------------------------------------------------------------------------

    async def run(self) -> None:
        delay = self._backoff.first_s
        failing = False
        while True:
            started = time.monotonic()
            try:
                line = await self._open_line(self.config)
            except TerminalLineError as exc:
                self.counters.connect_errors += 1
                self.last_error = exc.reason
                if not failing:
                    self.since_ms = now_ms()
                    self._lg.warning("terminal_offline", error=exc.reason)
                    await self._events.on_lost(self, exc.reason)
                failing = True
            else:
                self.counters.connects += 1
                if failing:
                    self._lg.info("terminal_reconnected")
                failing = False
                reason = await self._session(line)
                self.counters.lost += 1
                self.last_error = reason
                self._lg.warning("terminal_offline", error=reason)
                failing = True
                await self._events.on_lost(self, reason)
            if time.monotonic() - started >= self._backoff.healthy_after_s:
                delay = self._backoff.first_s
            await asyncio.sleep(self._backoff.wait_s(delay))
            delay = self._backoff.next_delay(delay)

    async def _session(self, line: Line) -> str:
        """Serve one connection until it fails; returns why it ended."""
        self._line, self.connected = line, True
        self.since_ms = now_ms()
        decoder = tm.TerminalDecoder()
        last_rx = last_frame = time.monotonic()
        try:
            for pending in list(self._pending.values()):  # §4.3: unanswered frames go again
                await self._write(pending.frame)
            while True:
                try:
                    async with asyncio.timeout(TICK_S):
                        data = await line.read()
                except TimeoutError:
                    data = b""
                now = time.monotonic()
                if data:
                    last_rx = now
                    decoder.feed(data)
                    skipped = decoder.discarded
                    if await self._frames(decoder):
                        last_frame = now
                    self.counters.garbage_bytes += decoder.discarded - skipped
                elif decoder.buffered and now - last_rx > PARTIAL_S:
                    decoder.skip_partial()
                    self._bad("partial")
                    self.counters.partial_dropped += 1
                await self._resend_due(now)
                if now - last_frame > SILENT_INTERVALS * self._interval_s:
                    raise TerminalSilentError(line.endpoint, "no frame for "
                                              f"{SILENT_INTERVALS} heartbeat intervals")
        except TerminalLineError as exc:
            return exc.reason
        finally:
            self._line, self.connected = None, False
            self.since_ms = now_ms()
            await line.close()

    async def _frames(self, decoder: tm.TerminalDecoder) -> bool:
        """Handle every whole frame in `decoder`; True if one was good."""
        good = False
        while True:
            try:
                frame = decoder.next_frame()
            except tm.TerminalFrameRefused as exc:
                self.counters.refused_frames += 1
                self._bad(type(exc).__name__)
                await self._send(tm.ErrorReport(exc.seq, exc.message_type, exc.code,
                                                exc.reason[:200]))
                continue
            except tm.TerminalError as exc:
                self._bad(type(exc).__name__)
                self._lg.debug("terminal_bad_frame", error=str(exc))
                continue
            if frame is tm.NEED_DATA:
                return good
            good = True
            self.counters.frames += 1
            await self._handle(frame)

    def _bad(self, kind: str) -> None:
        self.counters.bad_frames += 1
        self.counters.bad_by_kind[kind] = self.counters.bad_by_kind.get(kind, 0) + 1

    async def _handle(self, frame: tm.TerminalFrame) -> None:
        msg = frame.message
        match msg:
            case tm.Heartbeat():
                self.counters.heartbeats += 1
                self.heartbeat = msg
                self.last_heartbeat_ms = now_ms()
                self._interval_s = float(msg.interval_s)
                await self._events.on_heartbeat(self, msg)
                await self._send(tm.Receipt(frame.seq, tm.MessageType.HEARTBEAT, 0, _now_s()))
            case tm.Ack():
                self.counters.acks += 1
                try:
                    await self._events.on_ack(self, msg)  # stored before it is confirmed
                except TerminalStoreError as exc:  # unconfirmed: the terminal repeats it
                    self._lg.error("terminal_ack_not_stored", error=str(exc))
                    return
                await self._send(tm.Receipt(frame.seq, tm.MessageType.ACK, msg.warning_id,
                                            _now_s()))
            case tm.Receipt():
                await self._answered(msg.ref_seq, msg.ref_type, None, msg.time)
            case tm.ErrorReport():
                self.counters.errors_received += 1
                code = msg.code.name.lower() if isinstance(msg.code, tm.ErrorCode) \
                    else f"code_{msg.code}"
                await self._answered(msg.ref_seq, msg.ref_type, code, 0)
            case _:  # a PLAY or DISPLAY: a gateway's messages, not a terminal's
                await self._send(tm.ErrorReport(frame.seq, frame.type, tm.ErrorCode.OTHER,
                                                "a gateway does not take this message"))

    async def _answered(self, ref_seq: int, ref_type: int, refused: str | None,
                        at_s: int) -> None:
        pending = self._pending.get(ref_seq)
        if ref_type != tm.MessageType.PLAY or pending is None:
            self.counters.unmatched += 1
            return
        if refused is None:
            try:
                await self._events.on_delivered(self, pending.wire_id, at_s)
            except TerminalStoreError as exc:  # kept pending: the repeat gets a receipt again
                self._lg.error("terminal_receipt_not_stored", error=str(exc))
                return
            self.counters.receipts += 1
            del self._pending[ref_seq]
            outcome = PlayOutcome(self.id, PlayResult.DELIVERED)
        else:
            del self._pending[ref_seq]
            self._lg.warning("terminal_play_refused", wire_id=pending.wire_id, code=refused)
            outcome = PlayOutcome(self.id, PlayResult.REFUSED, refused)
        if not pending.answer.done():
            pending.answer.set_result(outcome)

    async def _resend_due(self, now: float) -> None:
        for seq, p in list(self._pending.items()):
            if now - p.sent_at < RESEND_S:
                continue
            if p.sends >= SENDS_MAX:
                del self._pending[seq]
                self.counters.plays_unanswered += 1
                self._lg.warning("terminal_play_unanswered", wire_id=p.wire_id, sends=p.sends)
                continue
            p.sends += 1
            p.sent_at = now
            self.counters.play_repeats += 1
            await self._write(p.frame)

    # --- sending ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, (self._seq + 1) & 0xFFFF
        return seq

    async def _send(self, message: tm.Message) -> None:
        await self._write(tm.encode(self._next_seq(), message))

    async def _write(self, data: bytes) -> None:
        line = self._line
        if line is None:
            raise TerminalLineError(self.config.endpoint, "not connected")
        async with self._write_lock:
            await line.write(data)

    async def play(self, play: tm.Play, *, wait_s: float) -> PlayOutcome:
        """Send `play` and wait up to `wait_s` for the terminal's answer (module doc)."""
        if self._line is None:
            return PlayOutcome(self.id, PlayResult.REFUSED, "not_connected")
        seq = self._next_seq()
        frame = tm.encode(seq, play)
        answer: asyncio.Future[PlayOutcome] = asyncio.get_running_loop().create_future()
        self._pending[seq] = _Pending(frame, play.warning_id, time.monotonic(), 1, answer)
        try:
            await self._write(frame)
        except TerminalLineError:
            pass  # kept pending: it goes again after the reconnect
        self.counters.plays_sent += 1
        try:
            async with asyncio.timeout(wait_s):
                return await asyncio.shield(answer)
        except TimeoutError:
            return PlayOutcome(self.id, PlayResult.SENT)

    # --- health ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        hb = self.heartbeat
        return {
            "id": self.id, "kind": self.config.kind, "endpoint": self.config.endpoint,
            "connected": self.connected, "since_ms": self.since_ms,
            "last_error": self.last_error, "last_heartbeat_ms": self.last_heartbeat_ms,
            "heartbeat": None if hb is None else {
                "battery": hb.battery, "mains": hb.mains, "speaker_fault": hb.speaker_fault,
                "display_fault": hb.display_fault, "tamper": hb.tamper,
                "camera": hb.camera.name.lower(), "interval_s": hb.interval_s},
            "pending_plays": len(self._pending),
            "counters": self.counters.to_dict(),
        }


__all__ = ["LinkCounters", "LinkEvents", "PlayOutcome", "PlayResult", "TerminalLink"]
