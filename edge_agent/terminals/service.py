"""The gateway's 叫应 terminals as one service: plays warnings, records what comes back.

`TerminalService.play(args, origin=…, cmd_id=…)` is THE way a warning reaches the terminals,
whatever brought it: a signed `play_warning` command over IP (`edge_agent.commands`, origin
"ip"), one that came by radio (origin "beidou" / "pdt"), or the local rule (origin
"local_rule"). A signed command plays once, whichever bearer brings it first: the ledger
claims its cmd_id before the PLAY goes out, and a later copy (the IP copy of a radio warning,
or the other way round) only reports what the terminals did. A re-send from central is a new
cmd_id for the same warning and plays again. It maps the warning id to its FLT/1 wire id
(`ledger`), sends a PLAY to each named terminal at once and returns what each answered
(`PlayOutcome`: delivered, sent, refused with a reason). Terminals of `args` that this
gateway does not have are refused (`unknown_terminal`).

What the terminals send back becomes outbox records (DESIGN.md §4: nothing lost):

- a PLAY's RECEIPT → a `callresp` EVENT `delivered`, an ACK → a `callresp` EVENT `ack`
  (`protocols.callresp`), each recorded once per (warning_id, terminal, type): the ledger row
  is committed first, then the outbox append, then the row is marked reported; a repeated
  receipt or ACK (a reminder PLAY, a terminal that did not hear the RECEIPT, a restart) finds
  the row and records nothing. Rows left unreported (the outbox refused the append, or a
  crash came in between) are appended at start and then every `REPORT_RETRY_S`; at start,
  one the outbox already holds unsent (the crash came after the append) is only marked.
- a heartbeat fault that appears or clears (and a terminal lost or back) → a
  `terminal_fault` EVENT (`protocols.terminal_events`); open faults are kept in the ledger,
  so a restart does not report them again.

`open()` enters the ledger; `tasks()` names the supervised tasks: `terminal[<id>]` per
terminal and `terminals.report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from edge_agent.outbox.lanes import Part
from edge_agent.outbox.store import NewRecord, OutboxError
from edge_agent.terminals.config import TerminalConfig
from edge_agent.terminals.errors import TerminalStoreError
from edge_agent.terminals.ledger import EventKey, TerminalLedger
from edge_agent.terminals.link import PlayOutcome, PlayResult, TerminalLink
from protocols import terminal as tm
from protocols.callresp import (
    EVENT_NAME,
    CallRespEvent,
    EventType,
    Level,
    PlayWarning,
    event_attrs,
)
from protocols.envelope import Record, RecordKind
from protocols.terminal_events import LOCAL_EVENT, FaultState, TerminalFault, TerminalFaultEvent
from runtime.clock import now_ms
from runtime.counters import Counters

log = structlog.get_logger(__name__)

ANSWER_WAIT_S = 2.0  # §4.3 says 1 s; a little more for a busy gateway
REPORT_RETRY_S = 30.0
PRUNE_EVERY_S = 3600.0
KEEP_MS = 30 * 86_400_000  # ledger rows kept this long (a repeat older than that: not expected)
UNSENT_SCAN = 100_000  # unsent alarm, event and live records read at start to find events
BATTERY_LOW = 20  # percent, on battery
MAX_TEXT_BYTES = tm.DEFAULT_MAX_BODY - 6  # every receiver takes a 1024-byte body (§3.3)
_LEVELS = {Level.RED: tm.WarningLevel.RED, Level.ORANGE: tm.WarningLevel.ORANGE,
           Level.YELLOW: tm.WarningLevel.YELLOW, Level.BLUE: tm.WarningLevel.BLUE}
Factory = Callable[[], Awaitable[None]]


class RecordWriter(Protocol):
    async def append(self, records: list[NewRecord]) -> list[int]: ...

    async def next_batch(self, limit: int, exclude: Collection[int] = (), *,
                         part: Part = "all") -> list[Record]: ...


@dataclass(slots=True)
class ServiceCounters(Counters):
    plays: int = 0
    plays_repeated: int = 0  # a command played before (by another bearer): not again
    events_recorded: int = 0
    events_repeated: int = 0  # a receipt or ack recorded before: not again
    events_reappended: int = 0  # unreported rows appended at start or on retry
    unknown_warning: int = 0  # an ack or receipt naming a wire id this gateway never sent
    acks_without_warning: int = 0  # warning_id 0: the button pressed with nothing shown
    append_errors: int = 0
    faults_raised: int = 0
    faults_cleared: int = 0


def _fit(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """`text` cut at a character boundary to `limit` UTF-8 bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def event_key(attrs: Mapping[str, Any] | None) -> EventKey | None:
    """The ledger key of an EVENT record this service wrote, from its attrs (else None)."""
    a = attrs or {}
    if a.get("event") == EVENT_NAME:
        return (str(a.get("warning_id")), str(a.get("terminal")), str(a.get("type")))
    if a.get("event") == LOCAL_EVENT:
        return (str(a.get("warning_id")), "", LOCAL_EVENT)
    return None


def faults_of(hb: tm.Heartbeat) -> set[TerminalFault]:
    """The faults a heartbeat reports."""
    out = set()
    if not hb.mains:
        out.add(TerminalFault.MAINS_LOST)
        if hb.battery is not None and hb.battery <= BATTERY_LOW:
            out.add(TerminalFault.BATTERY_LOW)
    for flag, fault in ((hb.speaker_fault, TerminalFault.SPEAKER_FAULT),
                        (hb.display_fault, TerminalFault.DISPLAY_FAULT),
                        (hb.tamper, TerminalFault.TAMPER),
                        (hb.camera in (tm.CameraState.FAULT, tm.CameraState.OBSTRUCTED),
                         TerminalFault.CAMERA_FAULT)):
        if flag:
            out.add(fault)
    return out


class TerminalService:
    """The terminals of one gateway; see the module doc."""

    def __init__(self, *, terminals: Sequence[TerminalConfig], ledger_path: Path,
                 outbox: RecordWriter, wall_ms: Callable[[], int] = now_ms,
                 answer_wait_s: float = ANSWER_WAIT_S) -> None:
        self.links = {c.id: TerminalLink(c, self) for c in terminals if c.enabled}
        self.ledger_path = Path(ledger_path)
        self.counters = ServiceCounters()
        self.answer_wait_s = answer_wait_s
        self._outbox = outbox
        self.now_ms = wall_ms
        self._ledger: TerminalLedger | None = None
        self._faults: dict[str, set[str]] = {}
        self._fault_since: dict[str, dict[str, int]] = {}  # for status: when each was raised

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[TerminalService]:
        """Open the ledger and append what a crash left unreported."""
        async with TerminalLedger.open(self.ledger_path) as ledger:
            self._ledger = ledger
            try:
                self._fault_since = await ledger.fault_since()
                self._faults = {t: set(f) for t, f in self._fault_since.items()}
                await self.report_unreported(check_outbox=True)
                yield self
            finally:
                self._ledger = None

    def tasks(self) -> list[tuple[str, Factory]]:
        return [*((f"terminal[{tid}]", link.run) for tid, link in self.links.items()),
                ("terminals.report", self.report_loop)]

    @property
    def terminal_ids(self) -> tuple[str, ...]:
        return tuple(self.links)

    @property
    def ledger(self) -> TerminalLedger:
        if self._ledger is None:
            raise TerminalStoreError("the terminal ledger is not open")
        return self._ledger

    # --- playing ---------------------------------------------------------------------------

    async def play(self, args: PlayWarning, *, origin: str,
                   cmd_id: str | None = None) -> dict[str, PlayOutcome]:
        """Play warning `args` on its terminals now; what each answered, by terminal id.

        `origin` says what brought it ("ip", "beidou", "pdt", "local_rule"); `cmd_id` names
        the signed command that carried it, if any (the events then carry it). A command is
        played once, whichever bearers bring it: a second copy of `cmd_id` plays nothing and
        returns what the terminals did (`replayed`). Raises `TerminalStoreError` only if the
        ledger cannot name the warning or claim the command."""
        if cmd_id is not None and not await self.ledger.claim_play(
                cmd_id, args.warning_id, origin=origin, now_ms=self.now_ms()):
            return await self.replayed(args, origin=origin, cmd_id=cmd_id)
        wire = await self.ledger.warning(args.warning_id, origin=origin, cmd_id=cmd_id,
                                         now_ms=self.now_ms())
        play = tm.Play(wire.wire_id, _LEVELS[args.level], args.repeat, _fit(args.text))
        self.counters.plays += 1
        known = [t for t in args.terminals if t in self.links]
        results = await asyncio.gather(*(self.links[t].play(play, wait_s=self.answer_wait_s)
                                         for t in known))
        out = {r.terminal: r for r in results}
        for t in args.terminals:
            out.setdefault(t, PlayOutcome(t, PlayResult.REFUSED, "unknown_terminal"))
        if cmd_id is not None:
            await self.ledger.save_play(cmd_id, {t: o.to_wire() for t, o in out.items()})
        log.info("warning_played", warning_id=args.warning_id, wire_id=wire.wire_id,
                 origin=origin, cmd_id=cmd_id, **{t: str(o.result) for t, o in out.items()})
        return out

    async def replayed(self, args: PlayWarning, *, origin: str,
                       cmd_id: str) -> dict[str, PlayOutcome]:
        """What the terminals did with command `cmd_id`, played before: `delivered` where
        its receipt is recorded, else what the first play answered (`refused` with its
        reason), else `sent` (still waiting for the receipt). Plays nothing."""
        before = await self.ledger.played(cmd_id)
        first_origin, _, outcomes = before or ("", args.warning_id, {})
        self.counters.plays_repeated += 1
        out: dict[str, PlayOutcome] = {}
        for t in args.terminals:
            prior = outcomes.get(t) or {}
            if t not in self.links:
                out[t] = PlayOutcome(t, PlayResult.REFUSED, "unknown_terminal")
            elif await self.ledger.has_event((args.warning_id, t, str(EventType.DELIVERED))):
                out[t] = PlayOutcome(t, PlayResult.DELIVERED)
            elif prior.get("result") == PlayResult.REFUSED:
                out[t] = PlayOutcome(t, PlayResult.REFUSED, prior.get("reason"))
            else:
                out[t] = PlayOutcome(t, PlayResult.SENT)
        log.info("warning_play_repeated", warning_id=args.warning_id, cmd_id=cmd_id,
                 origin=origin, played_by=first_origin,
                 **{t: str(o.result) for t, o in out.items()})
        return out

    # --- what the links hand up ------------------------------------------------------------

    async def on_delivered(self, link: TerminalLink, wire_id: int, at_s: int) -> None:
        await self._callresp(link.id, wire_id, EventType.DELIVERED, at_s, None)

    async def on_ack(self, link: TerminalLink, ack: tm.Ack) -> None:
        if ack.warning_id == 0:
            self.counters.acks_without_warning += 1
            return
        await self._callresp(link.id, ack.warning_id, EventType.ACK, ack.time,
                             f"button-{ack.button}")

    async def _callresp(self, terminal: str, wire_id: int, kind: EventType, at_s: int,
                        by: str | None) -> None:
        wire = await self.ledger.by_wire_id(wire_id)
        if wire is None:
            self.counters.unknown_warning += 1
            log.warning("terminal_unknown_warning", terminal=terminal, wire_id=wire_id,
                        type=str(kind))
            return
        at_ms = at_s * 1000 if at_s else self.now_ms()
        attrs = event_attrs(CallRespEvent(kind, wire.warning_id, terminal, at_ms,
                                          cmd_id=wire.cmd_id, by=by))
        if await self.record_once((wire.warning_id, terminal, str(kind)), attrs, at_ms):
            log.info("callresp_recorded", terminal=terminal, warning_id=wire.warning_id,
                     type=str(kind))

    async def record_once(self, key: EventKey, attrs: Mapping[str, Any], at_ms: int) -> bool:
        """Record an EVENT once per `key` (module doc); False if it was recorded before."""
        if not await self.ledger.claim_event(key, attrs, at_ms):
            self.counters.events_repeated += 1
            return False
        self.counters.events_recorded += 1
        await self._append(key, attrs, at_ms)
        return True

    async def _append(self, key: EventKey, attrs: Mapping[str, Any], at_ms: int) -> bool:
        try:
            await self._outbox.append([NewRecord(kind=RecordKind.EVENT, ts_ms=at_ms,
                                                 point=None, value=None, attrs=dict(attrs))])
        except OutboxError as exc:  # in the ledger: appended again by report_loop
            self.counters.append_errors += 1
            log.warning("terminal_event_not_appended", key=list(key), error=str(exc))
            return False
        await self.ledger.mark_reported(key)
        return True

    async def report_unreported(self, *, check_outbox: bool = False) -> int:
        """Append the events the ledger holds unreported. `check_outbox` (at start, before
        the uplink runs): first look for them among the outbox's unsent records, where a crash
        between the append and its mark left them; those are only marked."""
        unreported = await self.ledger.unreported()
        present = await self._unsent_keys() if unreported and check_outbox else set()
        n = 0
        for key, attrs in unreported:
            if key in present:
                await self.ledger.mark_reported(key)
            elif await self._append(key, attrs, int(attrs.get("at_ms") or self.now_ms())):
                n += 1
        self.counters.events_reappended += n
        if n:
            log.info("terminal_events_reappended", events=n)
        return n

    async def _unsent_keys(self) -> set[EventKey]:
        try:
            records = await self._outbox.next_batch(UNSENT_SCAN, part="priority")
        except OutboxError as exc:
            log.warning("terminal_outbox_scan_failed", error=str(exc))
            return set()
        return {k for r in records if r.kind is RecordKind.EVENT
                and (k := event_key(r.attrs)) is not None}

    async def report_loop(self) -> None:
        """Append what the outbox refused before, every `REPORT_RETRY_S`; prune hourly."""
        pruned_at = time.monotonic()
        while True:
            await asyncio.sleep(REPORT_RETRY_S)
            await self.report_unreported()
            if time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                pruned_at = time.monotonic()
                await self.ledger.prune(self.now_ms() - KEEP_MS)

    # --- health ----------------------------------------------------------------------------

    async def on_heartbeat(self, link: TerminalLink, hb: tm.Heartbeat) -> None:
        if hb.terminal_id != link.id:
            log.warning("terminal_id_mismatch", terminal=link.id, says=hb.terminal_id)
        now = self.now_ms()
        open_ = self._faults.get(link.id, set())
        current = {str(f) for f in faults_of(hb)}
        for fault in sorted(open_ - current):
            await self._fault(link.id, fault, False, now, hb.battery)
        for fault in sorted(current - open_):
            await self._fault(link.id, fault, True, now, hb.battery)

    async def on_lost(self, link: TerminalLink, reason: str) -> None:
        if TerminalFault.LOST not in self._faults.get(link.id, set()):
            await self._fault(link.id, TerminalFault.LOST, True, self.now_ms(), None)

    async def _fault(self, terminal: str, fault: str, raised: bool, now: int,
                     battery: int | None) -> None:
        ev = TerminalFaultEvent(terminal, TerminalFault(fault),
                                FaultState.RAISED if raised else FaultState.CLEARED, now, battery)
        (log.warning if raised else log.info)("terminal_fault", terminal=terminal, fault=fault,
                                              state=str(ev.state))
        try:
            await self._outbox.append([NewRecord(kind=RecordKind.EVENT, ts_ms=now, point=None,
                                                 value=None, attrs=ev.to_attrs())])
            await self.ledger.set_fault(terminal, fault, raised, now)
        except (OutboxError, TerminalStoreError) as exc:  # reported at the next heartbeat
            self.counters.append_errors += 1
            log.warning("terminal_fault_not_recorded", terminal=terminal, error=str(exc))
            return
        faults = self._faults.setdefault(terminal, set())
        (faults.add if raised else faults.discard)(fault)
        since = self._fault_since.setdefault(terminal, {})
        if raised:
            since.setdefault(fault, now)
        else:
            since.pop(fault, None)
        if raised:
            self.counters.faults_raised += 1
        else:
            self.counters.faults_cleared += 1

    def status(self) -> dict[str, Any]:
        return {"terminals": [link.health() | {"faults": sorted(self._faults.get(tid, ())),
                                               "fault_since": dict(self._fault_since.get(tid, {}))}
                              for tid, link in self.links.items()],
                "counters": self.counters.to_dict()}


__all__ = ["PlayOutcome", "PlayResult", "ServiceCounters", "TerminalService", "faults_of"]
