"""The 叫应 transitions (DESIGN.md §7), each one portable SQL program run in ONE storage
transaction together with the audit rows it writes, so a step is recorded, timed and audited
completely or not at all.

Per target: `sent` → `delivered` → `answered`. A target with no answer by its `due_ms` is
re-sent (attempt 2, 3, …, `1 + max_resends`), each with a fresh deadline; when the last
deadline passes it is `escalated` to the person in charge one area level up (a new target of
kind `person`, which gets the same treatment), or `unanswered` if no area above has one.

A retired gateway (`central.identity.retire`) takes no command and sends nothing, so its
terminals are never called: a new warning leaves them out and lists them as skipped
(`SkippedTerminal`; every terminal retired and no person: `TargetsRetiredError`), and a
terminal target still open when its gateway is retired ends `cancelled` with
`closed_reason` `gateway_retired` (`cancel_retired_program`, or at its next due time) instead
of being re-sent and escalated as if its terminal were silent: nobody is paged for hardware
that is gone. A person stays a target (the call must reach whoever is in charge): only their
terminals on retired gateways are left out of the sends. An unretired gateway's terminals are
called again by the sends that follow; a cancelled target stays cancelled.

The timer is `cr_targets.due_ms`. `fire_due_program` claims a due target with an UPDATE
guarded by the `due_ms` and `attempts` it read (`RETURNING` tells whether it won), inserts
the step (unique per target, step and attempt) and the commands to send (`cr_sends`, cmd_id
chosen here), and commits; so a central killed at any point and restarted fires each step
exactly once, and a second worker finds nothing to claim. The commands are then issued by the
service from `cr_sends` (idempotently, by cmd_id).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from central import CentralError
from central.callresp.directory import (
    AreaRef,
    Person,
    Terminal,
    UnknownEntryError,
    in_charge_above,
    persons_program,
    terminals_program,
)
from central.identity.audit import SYSTEM, AuditLog
from central.identity.retire import retired_set_program
from central.storage.program import Program, Sql, placeholders
from central.storage.retire_schema import in_service
from protocols.callresp import CallRespEvent, EventType, Level
from protocols.errors import DetailedError

SENT, DELIVERED, ANSWERED = "sent", "delivered", "answered"
ESCALATED, UNANSWERED, CANCELLED = "escalated", "unanswered", "cancelled"
GATEWAY_RETIRED = "gateway_retired"  # why a target was cancelled or a terminal skipped
OPEN_STATES = (SENT, DELIVERED)
KIND_TERMINAL, KIND_PERSON = "terminal", "person"


class WarningRequestError(CentralError):
    """A warning central refuses as asked (422); each case is a subclass (its problem type)."""


class NoTargetError(WarningRequestError, DetailedError):
    """A warning that reaches no terminal and no person (its areas and groups are empty)."""

    template = ("预警没有可叫应的终端或责任人，未发布"
                " (the warning reaches no terminal and no person)")


class TargetsRetiredError(CentralError, DetailedError):
    """A warning whose every terminal hangs on a retired gateway and that names no person:
    nothing would sound (409: it is the gateways' state that refuses; unretire to call them).
    `terminals` are the terminals it would have called, `gateways` their retired gateways."""

    template = ("所选终端所在网关均已退役，预警未发布 (all {count} terminal(s) the warning"
                " reaches hang on retired gateways: {gateway_list}; nothing was sent)")
    terminals: tuple[str, ...]
    gateways: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.terminals)

    @property
    def gateway_list(self) -> str:
        return ", ".join(self.gateways)


class UnknownWarningError(UnknownEntryError):
    kind = "warning"

    def __init__(self, warning_id: str) -> None:
        super().__init__("warning", warning_id)


@dataclass(frozen=True, slots=True)
class WarningSpec:
    warning_id: str
    level: Level
    text: str
    repeat: int
    deadline_ms: int
    max_resends: int
    created_by: str
    areas: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()
    persons: tuple[str, ...] = ()
    terminals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SkippedTerminal:
    """A terminal a new warning leaves out, and why: on a retired gateway (`person`: the
    person it would have called, else it was a target of its own)."""

    terminal: str
    gw: str
    person: str | None = None
    reason: str = GATEWAY_RETIRED
    reason_zh: str = "网关已退役"


@dataclass(frozen=True, slots=True)
class Step:
    """One step done: what, for which target, planned when (`due_ms`) and done when."""

    warning_id: str
    target_id: str
    step: str
    attempt: int
    due_ms: int | None
    at_ms: int
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lateness_ms(self) -> int | None:
        return None if self.due_ms is None else self.at_ms - self.due_ms


@dataclass(frozen=True, slots=True)
class WarningRecord:
    """A warning's own row of `cr_warnings` (`views.WarningView` adds its targets and steps)."""

    id: str
    level: str
    text: str
    repeat: int
    deadline_ms: int
    max_resends: int
    created_ms: int
    created_by: str


WARNING_COLUMNS = "id, level, text, repeat_n, deadline_ms, max_resends, created_ms, created_by"


def _warning_row(r: Sequence[Any]) -> WarningRecord:
    return WarningRecord(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), int(r[6]), r[7])


def _step_program(audit: AuditLog, actor: str, st: Step) -> Program[bool]:
    """Record a step and its audit row; False (and nothing written) if it was recorded."""
    rows = yield Sql("INSERT INTO cr_steps (warning_id, target_id, step, attempt, due_ms, at_ms,"
                     " detail) VALUES (?, ?, ?, ?, ?, ?, ?)"
                     " ON CONFLICT (target_id, step, attempt) DO NOTHING RETURNING target_id",
                     (st.warning_id, st.target_id, st.step, st.attempt, st.due_ms, st.at_ms,
                      json.dumps(dict(st.detail), ensure_ascii=False, default=str)))
    if not rows:
        return False
    yield from audit.program(actor, f"callresp.{st.step}", f"callresp:{st.target_id}",
                             {"warning": st.warning_id, "attempt": st.attempt,
                              "due_ms": st.due_ms, "at_ms": st.at_ms, **st.detail})
    return True


class Commands:
    """The commands one transaction decides: one cmd_id per (warning, gateway)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], str] = {}

    def cmd_id(self, warning_id: str, gw: str) -> str:
        return self._ids.setdefault((warning_id, gw), uuid.uuid4().hex)


def _sends_program(w: WarningRecord, target_id: str, attempt: int, now: int,
                   cmds: Commands) -> Program[list[str]]:
    """A `cr_sends` row for each gateway in service of the target's terminals; returns the
    cmd_ids."""
    rows = yield Sql("SELECT tt.terminal, ct.gw FROM cr_target_terminals tt JOIN cr_terminals ct"
                     " ON ct.id = tt.terminal WHERE tt.warning_id = ? AND tt.target_id = ?"
                     f" AND {in_service('ct.gw')} ORDER BY tt.terminal", (w.id, target_id))
    by_gw: dict[str, list[str]] = {}
    for terminal, gw in rows:
        by_gw.setdefault(gw, []).append(terminal)
    out = []
    for gw, terminals in sorted(by_gw.items()):
        cmd_id = cmds.cmd_id(w.id, gw)
        yield Sql("INSERT INTO cr_sends (cmd_id, warning_id, target_id, attempt, gw, terminals,"
                  " created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (cmd_id, w.id, target_id, attempt, gw, json.dumps(terminals), now))
        out.append(cmd_id)
    return out


def _add_target(audit: AuditLog, w: WarningRecord, kind: str, ref: str, area: AreaRef | None,
                terminals: Sequence[str], now: int, actor: str, cmds: Commands,
                escalated_from: str | None = None) -> Program[tuple[str, bool]]:
    """A new target, sent now (attempt 1); (its id, True) — or (the id, False) when the
    warning already calls this terminal or person."""
    held = yield Sql("SELECT id FROM cr_targets WHERE warning_id = ? AND kind = ? AND ref = ?",
                     (w.id, kind, ref))
    if held:
        return str(held[0][0]), False
    rows = yield Sql("SELECT coalesce(max(n), 0) FROM cr_targets WHERE warning_id = ?", (w.id,))
    n = int(rows[0][0]) + 1
    tid = f"{w.id}.{n}"
    due = now + w.deadline_ms
    yield Sql("INSERT INTO cr_targets (id, warning_id, n, kind, ref, area_id, area_path,"
              " escalated_from, state, attempts, created_ms, sent_ms, last_sent_ms, due_ms)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
              (tid, w.id, n, kind, ref, area.id if area else None, area.path if area else None,
               escalated_from, SENT, now, now, now, due))
    for t in sorted(set(terminals)):
        yield Sql("INSERT INTO cr_target_terminals (warning_id, terminal, target_id)"
                  " VALUES (?, ?, ?)", (w.id, t, tid))
    cmd_ids = yield from _sends_program(w, tid, 1, now, cmds)
    yield from _step_program(audit, actor, Step(w.id, tid, SENT, 1, None, now, {
        "kind": kind, "ref": ref, "terminals": sorted(set(terminals)), "cmd_ids": cmd_ids,
        "due_next_ms": due, **({"escalated_from": escalated_from} if escalated_from else {})}))
    return tid, True


# --- create ---------------------------------------------------------------------------------


def _skipped_program(terminals: Sequence[Terminal], persons: Sequence[Person]
                     ) -> Program[list[SkippedTerminal]]:
    """The terminals on retired gateways among `terminals` and the persons' terminals."""
    retired = yield from retired_set_program()
    if not retired:
        return []
    out = [SkippedTerminal(t.id, t.gw) for t in terminals if t.gw in retired]
    theirs = yield from terminals_program(sorted({t for p in persons for t in p.terminals}))
    gw_of = {t.id: t.gw for t in theirs}
    out += [SkippedTerminal(t, gw_of[t], p.id) for p in persons for t in p.terminals
            if gw_of.get(t) in retired]
    return out


def create_program(audit: AuditLog, spec: WarningSpec, areas: Mapping[int, AreaRef],
                   now: int) -> Program[tuple[str, list[SkippedTerminal]]]:
    """Store a warning and send it to every target it names but the terminals on retired
    gateways; returns its id and the terminals it left out."""
    for a in spec.areas:
        if a not in areas:
            raise UnknownEntryError("area", a)
    terminal_ids: set[str] = set(spec.terminals)
    for a in spec.areas:
        rows = yield Sql("SELECT t.id FROM cr_terminals t JOIN areas a ON a.id = t.area_id"
                         " WHERE a.path LIKE ?", (areas[a].path + "%",))
        terminal_ids.update(r[0] for r in rows)
    if spec.groups:
        rows = yield Sql(f"SELECT id FROM cr_groups WHERE id IN ({placeholders(len(spec.groups))})",
                         spec.groups)
        missing = sorted(set(spec.groups) - {r[0] for r in rows})
        if missing:
            raise UnknownEntryError("group", missing[0])
        rows = yield Sql("SELECT terminal FROM cr_group_terminals WHERE group_id IN"
                         f" ({placeholders(len(spec.groups))})", spec.groups)
        terminal_ids.update(r[0] for r in rows)
    terminals = yield from terminals_program(sorted(terminal_ids))
    missing = sorted(terminal_ids - {t.id for t in terminals})
    if missing:
        raise UnknownEntryError("terminal", missing[0])
    persons = yield from persons_program(sorted(set(spec.persons)))
    missing = sorted(set(spec.persons) - {p.id for p in persons})
    if missing:
        raise UnknownEntryError("person", missing[0])
    skipped = yield from _skipped_program(terminals, persons)
    left_out = {s.terminal for s in skipped if s.person is None}
    terminals = [t for t in terminals if t.id not in left_out]
    if not terminals and not persons:
        if skipped:
            raise TargetsRetiredError(tuple(s.terminal for s in skipped),
                                      tuple(sorted({s.gw for s in skipped})))
        raise NoTargetError()
    w = WarningRecord(spec.warning_id, str(spec.level), spec.text, spec.repeat,
                      spec.deadline_ms, spec.max_resends, now, spec.created_by)
    yield Sql(f"INSERT INTO cr_warnings ({WARNING_COLUMNS}, request) VALUES"
              " (?, ?, ?, ?, ?, ?, ?, ?, ?)",
              (w.id, w.level, w.text, w.repeat, w.deadline_ms, w.max_resends, w.created_ms,
               w.created_by,
               json.dumps({"areas": list(spec.areas), "groups": list(spec.groups),
                           "persons": list(spec.persons), "terminals": list(spec.terminals)})))
    yield from audit.program(spec.created_by, "callresp.warning_created", f"warning:{w.id}",
                             {"level": w.level, "text": w.text, "deadline_ms": w.deadline_ms,
                              "max_resends": w.max_resends, "terminals": len(terminals),
                              "persons": len(persons),
                              "skipped": [asdict(s) for s in skipped]})
    cmds = Commands()
    for t in terminals:
        area = areas.get(t.area_id) if t.area_id is not None else None
        yield from _add_target(audit, w, KIND_TERMINAL, t.id, area, [t.id], now, spec.created_by,
                               cmds)
    for p in persons:
        area = areas.get(p.area_id) if p.area_id is not None else None
        yield from _add_target(audit, w, KIND_PERSON, p.id, area, p.terminals, now,
                               spec.created_by, cmds)
    return w.id, skipped


# --- the timers -----------------------------------------------------------------------------


def next_due_program() -> Program[int | None]:
    rows = yield Sql("SELECT min(due_ms) FROM cr_targets WHERE due_ms IS NOT NULL")
    return None if rows[0][0] is None else int(rows[0][0])


def fire_due_program(audit: AuditLog, areas: Mapping[int, AreaRef], now: int,
                     limit: int = 200) -> Program[list[Step]]:
    """Re-send or escalate every target whose deadline has passed (claimed, exactly once); a
    terminal target whose gateway is retired is cancelled instead."""
    rows = yield Sql("SELECT t.id, t.area_id, t.attempts, t.due_ms, t.warning_id, ct.gw"
                     " FROM cr_targets t LEFT JOIN cr_terminals ct ON t.kind = ? AND ct.id = t.ref"
                     " WHERE t.due_ms IS NOT NULL AND t.due_ms <= ?"
                     " ORDER BY t.due_ms, t.id LIMIT ?", (KIND_TERMINAL, now, limit))
    done: list[Step] = []
    warnings: dict[str, WarningRecord] = {}
    cmds = Commands()
    retired = (yield from retired_set_program()) if rows else frozenset()
    for tid, area_id, attempts, due, wid, gw in rows:
        if gw in retired:
            cancelled = yield from _cancel_program(audit, wid, tid, attempts, int(due), gw, now)
            if cancelled is not None:
                done.append(cancelled)
            continue
        if wid not in warnings:
            wr = yield Sql(f"SELECT {WARNING_COLUMNS} FROM cr_warnings WHERE id = ?", (wid,))
            warnings[wid] = _warning_row(wr[0])
        w = warnings[wid]
        resend = attempts <= w.max_resends
        new_due = now + w.deadline_ms if resend else None
        claimed = yield Sql(
            "UPDATE cr_targets SET attempts = ?, due_ms = ?, last_sent_ms = CASE WHEN ? = 1"
            " THEN ? ELSE last_sent_ms END WHERE id = ? AND due_ms = ? AND attempts = ?"
            f" AND state IN ({placeholders(len(OPEN_STATES))}) RETURNING id",
            (attempts + 1 if resend else attempts, new_due, int(resend), now, tid, due, attempts,
             *OPEN_STATES))
        if not claimed:
            continue  # answered meanwhile, or another worker fired it
        if resend:
            cmd_ids = yield from _sends_program(w, tid, attempts + 1, now, cmds)
            st = Step(wid, tid, "resent", attempts + 1, int(due), now,
                      {"cmd_ids": cmd_ids, "due_next_ms": new_due})
            yield from _step_program(audit, SYSTEM, st)
            done.append(st)
            continue
        area = areas.get(area_id) if area_id is not None else None
        boss = yield from in_charge_above(area.id if area else None, areas)
        if boss is None:
            yield Sql("UPDATE cr_targets SET state = ?, closed_ms = ? WHERE id = ?",
                      (UNANSWERED, now, tid))
            st = Step(wid, tid, "exhausted", attempts, int(due), now,
                      {"reason": "no person in charge above this area"})
            yield from _step_program(audit, SYSTEM, st)
            done.append(st)
            continue
        boss_area = areas.get(boss.area_id) if boss.area_id is not None else None
        new_tid, _ = yield from _add_target(audit, w, KIND_PERSON, boss.id, boss_area,
                                            boss.terminals, now, SYSTEM, cmds,
                                            escalated_from=tid)
        yield Sql("UPDATE cr_targets SET state = ?, escalated_ms = ?, escalated_to = ?,"
                  " closed_ms = ? WHERE id = ?", (ESCALATED, now, new_tid, now, tid))
        st = Step(wid, tid, ESCALATED, attempts, int(due), now,
                  {"to_person": boss.id, "to_target": new_tid, "phone": boss.phone})
        yield from _step_program(audit, SYSTEM, st)
        done.append(st)
    return done


def _cancel_program(audit: AuditLog, wid: str, tid: str, attempts: int, due: int | None,
                    gw: str, now: int) -> Program[Step | None]:
    """Close an open target whose terminal's gateway is retired (`due`: the step it replaces,
    None when cancelled before its time); None if it closed meanwhile."""
    claimed = yield Sql("UPDATE cr_targets SET state = ?, due_ms = NULL, closed_ms = ?,"
                        " closed_reason = ? WHERE id = ? AND attempts = ?"
                        f" AND state IN ({placeholders(len(OPEN_STATES))}) RETURNING id",
                        (CANCELLED, now, GATEWAY_RETIRED, tid, attempts, *OPEN_STATES))
    if not claimed:
        return None
    st = Step(wid, tid, CANCELLED, attempts, due, now, {"reason": GATEWAY_RETIRED, "gw": gw})
    yield from _step_program(audit, SYSTEM, st)
    return st


def cancel_retired_program(audit: AuditLog, now: int) -> Program[list[Step]]:
    """Cancel every open terminal target whose gateway is retired, at once rather than at its
    next due time (the board stops waiting for it); idempotent."""
    rows = yield Sql("SELECT t.id, t.warning_id, t.attempts, ct.gw FROM cr_targets t"
                     " JOIN cr_terminals ct ON ct.id = t.ref WHERE t.due_ms IS NOT NULL"
                     f" AND t.kind = ? AND t.state IN ({placeholders(len(OPEN_STATES))})"
                     f" AND NOT {in_service('ct.gw')} ORDER BY t.id",
                     (KIND_TERMINAL, *OPEN_STATES))
    done: list[Step] = []
    for tid, wid, attempts, gw in rows:
        cancelled = yield from _cancel_program(audit, wid, tid, attempts, None, gw, now)
        if cancelled is not None:
            done.append(cancelled)
    return done


# --- receipts and acknowledgements ---------------------------------------------------------


def apply_event_program(audit: AuditLog, gw: str, ev: CallRespEvent,
                        now: int) -> Program[list[Step]]:
    """Move the targets that terminal `ev.terminal` answers for; idempotent.

    An event from a gateway the terminal does not hang on changes nothing (returns [])."""
    owner = yield Sql("SELECT gw FROM cr_terminals WHERE id = ?", (ev.terminal,))
    if not owner or owner[0][0] != gw:
        return []
    rows = yield Sql("SELECT t.id, t.kind, t.ref, t.state FROM cr_target_terminals tt"
                     " JOIN cr_targets t ON t.id = tt.target_id"
                     " WHERE tt.warning_id = ? AND tt.terminal = ? ORDER BY t.id",
                     (ev.warning_id, ev.terminal))
    done: list[Step] = []
    actor = f"gateway:{gw}"
    for tid, kind, ref, _state in rows:
        detail = {"terminal": ev.terminal, "terminal_ms": ev.at_ms, "received_ms": now,
                  **({"cmd_id": ev.cmd_id} if ev.cmd_id else {})}
        if ev.type is EventType.DELIVERED:
            moved = yield Sql("UPDATE cr_targets SET delivered_ms = ?, state = CASE WHEN state = ?"
                              " THEN ? ELSE state END WHERE id = ? AND delivered_ms IS NULL"
                              " RETURNING id", (ev.at_ms, SENT, DELIVERED, tid))
            step = DELIVERED
        else:
            by = ref if kind == KIND_PERSON else (ev.by or ev.terminal)
            detail["by"] = ev.by
            moved = yield Sql("UPDATE cr_targets SET answered_ms = ?, answered_by = ?,"
                              " answered_terminal = ?, delivered_ms = coalesce(delivered_ms, ?),"
                              " state = CASE WHEN state IN (?, ?) THEN ? ELSE state END,"
                              " due_ms = NULL, closed_ms = coalesce(closed_ms, ?)"
                              " WHERE id = ? AND answered_ms IS NULL RETURNING id",
                              (ev.at_ms, by, ev.terminal, ev.at_ms, SENT, DELIVERED, ANSWERED,
                               now, tid))
            step = ANSWERED
        if moved:
            st = Step(ev.warning_id, tid, step, 0, None, now, detail)
            yield from _step_program(audit, actor, st)
            done.append(st)
    return done
