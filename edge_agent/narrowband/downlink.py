"""Warnings that come down by radio (DESIGN.md §5 "Downlink", §7): central sends a signed 叫应
warning by BeiDou or PDT to a gateway that is off IP (`protocols.narrowband_down`).

`RadioDownlink` is fed every message the gateway's terminal receives (the bearer driver's
`on_message`: `on_beidou` / `on_pdt`); `run()` (inside the fallback's task) takes them in order:

1. a message not from central's card / radio, or not a downlink segment (a person's PDT text),
   is counted and dropped;
2. segments are collected until a warning is whole (`protocols.narrowband_down.Assembler`);
3. the warning's Ed25519 signature is checked with central's pinned command key
   (`[commands] central_public_key`) and this gateway's id; then its expiry against the wall
   clock, and replays by `cmd_id`: the ids taken are kept in the outbox meta
   (`narrowband_warnings`, until they expire), so a warning sent twice, or again after a
   restart, is handed on once;
4. the warning goes to the `WarningHandler`: the 叫应 terminals play it
   (`edge_agent.terminals.radio.RadioWarningPlayer`, wired by the agent when it has
   `[[terminals]]`; once per cmd_id, so its IP copy plays nothing again). A gateway without
   terminals gets `LoggingWarningHandler`, which logs and counts it.

A warning is taken (its id saved) before the handler runs: at most once, as for any command.
Every refusal is counted in `counters` and logged once per reason; the loop never stops for bad
input.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from edge_agent.outbox.store import Outbox, OutboxError
from protocols.beidou import Bd2Message, Bd3Message
from protocols.command_keys import VerifyKey
from protocols.hrnp_text import TextMessage
from protocols.narrowband import NarrowbandError, NotFrameTextError, from_text
from protocols.narrowband_down import (
    Assembler,
    BadWarningSignatureError,
    RadioWarning,
    open_warning,
    parse_segment,
)
from runtime.counters import Counters

log = structlog.get_logger(__name__)

SEEN_KEY: Final = "narrowband_warnings"  # outbox meta: {cmd_id: expires_at_ms} taken
QUEUE_MAX: Final = 256


class WarningHandler(Protocol):
    """Plays a verified radio warning on the gateway's 叫应 terminals (the terminal driver);
    `warning.args` is the `protocols.callresp.PlayWarning`, `warning.command.cmd_id` the
    command's id. Its receipts and acks go into the outbox as 叫应 EVENT records, as for a
    warning that came over IP: the fallback sends them up by radio and the uplink over IP."""

    async def __call__(self, warning: RadioWarning) -> None: ...


@dataclass(slots=True)
class DownlinkCounters(Counters):
    segments: int = 0
    warnings: int = 0  # verified and handed on
    refused: dict[str, int] = field(default_factory=dict)
    handler_errors: int = 0


class LoggingWarningHandler:
    """The handler of a gateway without 叫应 terminals: logs and counts."""

    def __init__(self) -> None:
        self.received: list[RadioWarning] = []

    async def __call__(self, warning: RadioWarning) -> None:
        self.received.append(warning)
        args = warning.args
        log.warning("narrowband_warning_unplayed", cmd_id=warning.command.cmd_id,
                    warning_id=args.warning_id, warning_level=str(args.level),
                    terminals=list(args.terminals), truncated=warning.truncated,
                    hint="no 叫应 terminal driver is wired to the narrowband downlink")


class RadioDownlink:
    """See the module doc. `central` is central's card (BeiDou) or radio id (PDT)."""

    def __init__(self, *, gw: str, public_key: VerifyKey | None, central: str,
                 outbox: Outbox, handler: WarningHandler | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.gw = gw
        self.public_key = public_key
        self.central = central.lstrip("0")
        self.outbox = outbox
        self.handler: WarningHandler = handler or LoggingWarningHandler()
        self.counters = DownlinkCounters()
        self._wall = wall
        self._assembler = Assembler()
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE_MAX)
        self._seen: dict[str, int] | None = None
        self._warned: set[str] = set()

    # --- fed by the bearer drivers (sync, on the event loop) ----------------------------

    def on_beidou(self, message: Bd3Message | Bd2Message) -> None:
        self.offer(message.sender, message.payload)

    def on_pdt(self, message: TextMessage) -> None:
        try:
            payload = from_text(message.text)
        except NotFrameTextError:
            self._refuse("not_fieldlink")  # a person's text: not ours to log
            return None
        except NarrowbandError as exc:
            self._refuse("bad_text", error=str(exc))
            return None
        self.offer(str(message.source), payload)

    def offer(self, sender: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait((sender, payload))
        except asyncio.QueueFull:
            self._refuse("queue_full")

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            sender, payload = await self._queue.get()
            await self.receive(sender, payload)

    async def receive(self, sender: str, payload: bytes) -> RadioWarning | None:
        """One message; the warning it completed and handed on, if any. Never raises for
        bad input."""
        if sender.lstrip("0") != self.central:
            self._refuse("foreign_sender", sender=sender)
            return None
        try:
            segment = parse_segment(payload)
        except NarrowbandError as exc:
            self._refuse("not_warning", error=str(exc))
            return None
        self.counters.segments += 1
        signed = self._assembler.feed(segment)
        if signed is None:
            return None
        if self.public_key is None:
            self._refuse("no_public_key")
            return None
        try:
            warning = open_warning(self.public_key, self.gw, signed)
        except BadWarningSignatureError as exc:
            self._refuse("bad_signature", error=str(exc))
            return None
        except NarrowbandError as exc:
            self._refuse("malformed", error=str(exc))
            return None
        if not await self._take(warning):
            return None
        self.counters.warnings += 1
        log.info("narrowband_warning_received", cmd_id=warning.command.cmd_id,
                 warning_id=warning.args.warning_id, truncated=warning.truncated)
        try:
            await self.handler(warning)
        except Exception:  # the handler is another room's: count, never stop, keep the trace
            self.counters.handler_errors += 1
            log.exception("narrowband_warning_handler_failed", cmd_id=warning.command.cmd_id)
        return warning

    async def taken(self, cmd_id: str) -> bool:
        """Whether a warning with this cmd_id came by radio and was handed on (until it
        expires): the IP copy of the same command must not play it again."""
        return cmd_id in await self._load_seen()

    async def _take(self, warning: RadioWarning) -> bool:
        """Check expiry and replay, and save the id; False when refused."""
        now_ms = int(self._wall() * 1000)
        cmd = warning.command
        if cmd.expired(now_ms):
            self._refuse("expired", cmd_id=cmd.cmd_id)
            return False
        seen = await self._load_seen()
        if cmd.cmd_id in seen:
            self._refuse("replay", cmd_id=cmd.cmd_id)
            return False
        for cmd_id in [c for c, until in seen.items() if until <= now_ms]:
            del seen[cmd_id]
        seen[cmd.cmd_id] = cmd.expires_at_ms
        try:
            await self.outbox.set_meta(SEEN_KEY, json.dumps(seen, sort_keys=True))
        except OutboxError as exc:  # kept in memory: this run still refuses a replay
            log.warning("narrowband_warning_ids_unsaved", error=str(exc))
        return True

    async def _load_seen(self) -> dict[str, int]:
        if self._seen is None:
            raw = await self.outbox.get_meta(SEEN_KEY)
            try:
                loaded = json.loads(raw) if raw else {}
            except ValueError:
                loaded = {}
            self._seen = ({str(k): int(v) for k, v in loaded.items() if isinstance(v, int)}
                          if isinstance(loaded, dict) else {})
        return self._seen

    def _refuse(self, reason: str, **fields: Any) -> None:
        refused = self.counters.refused
        refused[reason] = refused.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("narrowband_downlink_refused", reason=reason, **fields)


__all__ = ["SEEN_KEY", "DownlinkCounters", "LoggingWarningHandler", "RadioDownlink",
           "WarningHandler"]
