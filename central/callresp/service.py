"""The 叫应 service: creates warnings, runs the durable scheduler, issues the `play_warning`
commands, and takes receipts and acks from ingest (DESIGN.md §7).

The scheduler (`run`, task `callresp.scheduler` under central's supervision) sleeps until the
earliest `cr_targets.due_ms` (at most `tick_s`, or until woken), fires what is due
(`workflow.fire_due_program`, one transaction per round) and then issues every command a step
recorded in `cr_sends` through central's command service, with the cmd_id the step chose: a
central killed between the two issues it on restart, and an id issued already is refused by
the command store (`DuplicateCommandError`), so a command never goes out twice for one step.

Each round also looks at the retired gateways; when one was retired since the last look, its
open terminal targets are cancelled at once (`workflow.cancel_retired_program`), and a send
decided for a gateway retired before it was issued is withheld (marked with the error
`gateway_retired`), so nothing is played, re-sent or escalated for hardware that is gone.
Both looks only decide what to do next, so they read the process's shared list
(`central.identity.retire.RetiredGate`: re-read at most every few seconds, at once after a
retire or unretire in this process), not the table every round. A retire that lands between
that look and the issue (or that another worker made, not yet re-read here) is caught by the
command store, which refuses the command in its own transaction; the send is marked the same
way, and the next round cancels the targets (a target that comes due first is cancelled
there: `fire_due_program` reads the table in its own transaction).

`apply_batch` is an ingest batch hook: the 叫应 EVENT records of a committed batch move their
targets (idempotently); a storage failure raises, so ingest withholds the ack and the gateway
sends the batch again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import structlog

from central import CentralError
from central.callresp.directory import AreaRef, areas_program
from central.callresp.schema import migrate_program
from central.callresp.settings import CallRespSettings
from central.callresp.workflow import (
    CANCELLED,
    GATEWAY_RETIRED,
    SkippedTerminal,
    Step,
    WarningSpec,
    apply_event_program,
    cancel_retired_program,
    create_program,
    fire_due_program,
    next_due_program,
)
from central.commands.dispatch import CommandService
from central.commands.store import CommandStoreError, DuplicateCommandError
from central.identity.audit import AuditLog
from central.identity.retire import GatewayRetiredError, RetiredGate
from central.storage import NotFoundError, Storage, StorageError
from central.storage.program import Program, Sql
from protocols.callresp import (
    CallRespError,
    CallRespEvent,
    Level,
    is_callresp,
    parse_event_attrs,
)
from protocols.commands import CommandKind
from protocols.envelope import DataBatch, RecordKind
from runtime import clock, tasks
from runtime.counters import Counters

log = structlog.get_logger(__name__)
FIRE_LIMIT = 200
ISSUE_LIMIT = 500


@dataclass(slots=True)
class CallRespCounters(Counters):
    warnings: int = 0
    resends: int = 0
    escalations: int = 0
    exhausted: int = 0
    cancelled: int = 0  # targets whose gateway was retired
    issued: int = 0
    issue_refused: int = 0
    events: int = 0
    events_applied: int = 0
    events_malformed: int = 0
    late_steps: int = 0
    max_lateness_ms: int = 0


@dataclass(frozen=True, slots=True)
class Issued:
    """A warning created, and the terminals it left out (on retired gateways)."""

    warning_id: str
    skipped: tuple[SkippedTerminal, ...]


@dataclass(frozen=True, slots=True)
class _Send:
    cmd_id: str
    gw: str
    terminals: tuple[str, ...]
    warning_id: str
    level: str
    text: str
    repeat: int
    deadline_ms: int
    created_by: str


def _pending_sends_program(limit: int) -> Program[list[_Send]]:
    """The commands decided and not yet issued, oldest first (terminals of all their rows)."""
    rows = yield Sql("SELECT s.cmd_id, s.gw, s.terminals, w.id, w.level, w.text, w.repeat_n,"
                     " w.deadline_ms, w.created_by FROM cr_sends s JOIN cr_warnings w"
                     " ON w.id = s.warning_id WHERE s.issued_ms IS NULL"
                     " ORDER BY s.created_ms, s.cmd_id LIMIT ?", (limit,))
    by: dict[str, _Send] = {}
    for r in rows:
        held = by.get(r[0])
        terminals = tuple(json.loads(r[2]))
        if held is not None:
            terminals = tuple(sorted(set(held.terminals) | set(terminals)))
        by[r[0]] = _Send(r[0], r[1], terminals, r[3], r[4], r[5], int(r[6]), int(r[7]), r[8])
    return list(by.values())


def _mark_issued_program(cmd_id: str, now: int, error: str | None) -> Program[None]:
    yield Sql("UPDATE cr_sends SET issued_ms = ?, error = ? WHERE cmd_id = ? AND issued_ms IS NULL",
              (now, error, cmd_id))


def _apply_events_program(audit: AuditLog, gw: str, events: Sequence[CallRespEvent],
                          now: int) -> Program[list[Step]]:
    out: list[Step] = []
    for ev in events:
        out.extend((yield from apply_event_program(audit, gw, ev, now)))
    return out


@dataclass(eq=False)
class CallRespService:
    """One per central process (several workers may share the database: claims are guarded)."""

    settings: CallRespSettings
    storage: Storage
    audit: AuditLog
    commands: CommandService
    postgres: bool = field(kw_only=True)
    retired: RetiredGate = field(kw_only=True)  # the process's shared list (app.state.retired)
    counters: CallRespCounters = field(default_factory=CallRespCounters, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _failing: bool = field(default=False, init=False, repr=False)
    _retired: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    async def open(self) -> None:
        version = await self.storage.run(lambda: migrate_program(self.postgres))
        log.info("callresp_ready", schema_version=version)

    # --- warnings ---------------------------------------------------------------------------

    async def create(self, *, level: Level | str, text: str, user: str,
                     repeat: int | None = None, areas: Sequence[int] = (),
                     groups: Sequence[str] = (), persons: Sequence[str] = (),
                     terminals: Sequence[str] = (), now_ms: int | None = None) -> Issued:
        """Store a warning, send it to its targets (commands issued at once) but the
        terminals on retired gateways; its id and those terminals.

        Raises `UnknownEntryError` (404), `WarningRequestError` (422),
        `TargetsRetiredError` (409)."""
        now = clock.now_ms() if now_ms is None else now_ms
        lv = Level(level)
        spec = WarningSpec(warning_id=f"w-{uuid.uuid4().hex[:16]}", level=lv, text=text,
                           repeat=repeat or self.settings.repeat,
                           deadline_ms=self.settings.deadline_ms(lv),
                           max_resends=self.settings.resends, created_by=user,
                           areas=tuple(areas), groups=tuple(groups), persons=tuple(persons),
                           terminals=tuple(terminals))
        area_map = await self._areas()
        wid, skipped = await self.storage.run(
            lambda: create_program(self.audit, spec, area_map, now))
        self.counters.warnings += 1
        log.info("callresp_warning_created", warning=wid, warning_level=str(lv), user=user,
                 skipped=len(skipped))
        await self.issue_pending()
        self._wake.set()
        return Issued(wid, tuple(skipped))

    async def _areas(self) -> dict[int, AreaRef]:
        return await self.storage.run(areas_program, write=False)

    # --- the scheduler ----------------------------------------------------------------------

    async def fire_due(self, now_ms: int | None = None) -> list[Step]:
        """Fire every step due by now (rounds of `FIRE_LIMIT`); returns them."""
        nxt = await self.storage.run(next_due_program, write=False)
        if nxt is None or nxt > (clock.now_ms() if now_ms is None else now_ms):
            return []  # the usual tick: one index probe, no area tree
        area_map = await self._areas()
        fired: list[Step] = []
        while True:
            now = clock.now_ms() if now_ms is None else now_ms
            steps = await self.storage.run(
                lambda n=now: fire_due_program(self.audit, area_map, n, FIRE_LIMIT))  # type: ignore[misc]
            fired.extend(steps)
            for st in steps:
                self._count(st)
            if len(steps) < FIRE_LIMIT:
                return fired

    def _count(self, st: Step) -> None:
        if st.step == "resent":
            self.counters.resends += 1
        elif st.step == "escalated":
            self.counters.escalations += 1
        elif st.step == "exhausted":
            self.counters.exhausted += 1
        elif st.step == CANCELLED:
            self.counters.cancelled += 1
        late = st.lateness_ms or 0
        self.counters.max_lateness_ms = max(self.counters.max_lateness_ms, late)
        if late > self.settings.late_after_s * 1000:
            self.counters.late_steps += 1
        log.info("callresp_step", warning=st.warning_id, target=st.target_id, step=st.step,
                 attempt=st.attempt, due_ms=st.due_ms, lateness_ms=st.lateness_ms)

    async def cancel_retired(self) -> list[Step]:
        """Cancel the open terminal targets of the gateways retired since the last look
        (the retired list is small; the targets are searched only when it grew)."""
        retired = await self.retired.retired()
        if retired <= self._retired:
            self._retired = retired  # an unretire: a later retire is seen again
            return []
        now = clock.now_ms()
        steps = await self.storage.run(lambda: cancel_retired_program(self.audit, now))
        self._retired = retired
        for st in steps:
            self._count(st)
        if steps:
            log.warning("callresp_targets_cancelled", reason=GATEWAY_RETIRED, targets=len(steps),
                        gws=sorted({str(st.detail["gw"]) for st in steps}))
        return steps

    async def issue_pending(self) -> int:
        """Issue the commands the steps recorded (withholding those for gateways retired
        meanwhile); returns how many were newly issued."""
        sends = await self.storage.run(lambda: _pending_sends_program(ISSUE_LIMIT), write=False)
        retired = frozenset[str]()
        if sends:
            retired = await self.retired.retired()
        issued = 0
        for s in sends:
            if s.gw in retired:
                await self._done(s, GATEWAY_RETIRED)
                continue
            args = {"warning_id": s.warning_id, "level": s.level, "text": s.text,
                    "repeat": s.repeat, "terminals": list(s.terminals)}
            error: str | None = None
            try:
                await self.commands.issue(s.gw, str(CommandKind.PLAY_WARNING), args,
                                          ttl_s=s.deadline_ms / 1000, user=s.created_by,
                                          cmd_id=s.cmd_id)
                issued += 1
                self.counters.issued += 1
            except DuplicateCommandError:
                pass  # issued before a crash, not yet marked: nothing goes twice
            except GatewayRetiredError:  # retired since `retired` was read: the store refused
                error = GATEWAY_RETIRED
            except (CommandStoreError, StorageError) as exc:
                if not isinstance(exc, NotFoundError):
                    raise  # an outage: the next round tries again
                error = str(exc)
            except CentralError as exc:  # the command service refuses it (bad args)
                error = str(exc)
            await self._done(s, error)
        return issued

    async def _done(self, s: _Send, error: str | None) -> None:
        """Mark a send done; with `error` its command never goes (counted and logged)."""
        if error is not None:
            self.counters.issue_refused += 1
            log.warning("callresp_send_refused", cmd_id=s.cmd_id, gw=s.gw, error=error)
        await self.storage.run(lambda: _mark_issued_program(s.cmd_id, clock.now_ms(), error))

    async def step(self) -> None:
        """One round: fire what is due, issue what was decided."""
        try:
            await self.cancel_retired()
            await self.fire_due()
            await self.issue_pending()
            if self._failing:
                log.info("callresp_scheduler_recovered")
            self._failing = False
        except (StorageError, CommandStoreError) as exc:
            if not self._failing:
                log.error("callresp_scheduler_failed", error=str(exc))
            self._failing = True

    async def run(self) -> None:
        """The scheduler loop, for ever."""
        while True:
            await self.step()
            await self._sleep()

    async def _sleep(self) -> None:
        wait = self.settings.tick_s
        with contextlib.suppress(StorageError):
            nxt = await self.storage.run(next_due_program, write=False)
            if nxt is not None:
                wait = min(wait, max(0.0, (nxt - clock.now_ms()) / 1000))
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
        self._wake.clear()

    # --- the ingest hook --------------------------------------------------------------------

    async def apply_batch(self, batch: DataBatch) -> None:
        events = []
        for r in batch.non_telemetry():
            if r.kind is not RecordKind.EVENT or not is_callresp(r.attrs):
                continue
            self.counters.events += 1
            try:
                events.append(parse_event_attrs(r.attrs or {}))
            except CallRespError as exc:
                self.counters.events_malformed += 1
                log.warning("callresp_event_malformed", gw=batch.gw, seq=r.seq, error=str(exc))
        if not events:
            return
        now = clock.now_ms()
        steps = await self.storage.run(
            lambda: _apply_events_program(self.audit, batch.gw, events, now))
        self.counters.events_applied += len(steps)
        for st in steps:
            log.info("callresp_step", warning=st.warning_id, target=st.target_id, step=st.step,
                     gw=batch.gw)


# --- wiring ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(service: CallRespService, *, run: bool) -> AsyncIterator[CallRespService]:
    """Open the tables and (with `run`) the supervised scheduler task, for a lifespan."""
    await service.open()
    task = tasks.start("callresp.scheduler", service.run) if run else None
    try:
        yield service
    finally:
        await tasks.stop(task)
