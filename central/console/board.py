"""The 叫应 board (issue 11's console part): each warning of the last day that is still open,
and those closed within the last hour, with every target — who has answered and who has not,
how often it was re-sent, whom it was escalated to, and when its current deadline falls.

Read-only over `central.callresp.views`; the same view (user and chosen area) as the desk.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI

from central.callresp.directory import Person, Terminal, persons_program, terminals_program
from central.callresp.views import TargetView, WarningView, warnings_program
from central.callresp.workflow import ANSWERED, KIND_PERSON, OPEN_STATES
from central.console.views import View, area_path
from central.storage import Storage
from central.storage.program import Program, Sql
from central.web.routing import StrictModel
from runtime.clock import now_ms

WINDOW_MS = 86_400_000  # warnings of the last day
CLOSED_KEPT_MS = 3_600_000  # a warning whose every target is done stays this long
MAX_WARNINGS = 30


class BoardTargetOut(StrictModel):
    id: str
    kind: str  # terminal or person
    ref: str
    name: str  # the person's name, the terminal's name (or its id)
    area_name: str | None
    state: str  # sent, delivered, answered, escalated, unanswered, cancelled
    closed_reason: str | None  # why cancelled: gateway_retired (its terminal is gone)
    attempts: int  # 1 + re-sends so far
    delivered_ms: int | None
    answered_ms: int | None
    answered_by: str | None
    answered_terminal: str | None
    escalated_from: str | None  # the target this one was escalated from
    escalated_to: str | None
    due_ms: int | None  # the current deadline (None once closed)


class BoardWarningOut(StrictModel):
    id: str
    level: str
    text: str
    created_ms: int
    created_by: str
    deadline_ms: int
    max_resends: int
    open: bool  # some target still waits for an answer
    targets: list[BoardTargetOut]
    answered: int
    waiting: int
    resends: int
    escalations: int
    unanswered: int


class BoardOut(StrictModel):
    now_ms: int
    area: int | None
    warnings: list[BoardWarningOut]


def _area_names_program() -> Program[dict[int, str]]:
    rows = yield Sql("SELECT id, name_zh FROM areas")
    return {int(r[0]): str(r[1]) for r in rows}


def _names(persons: Sequence[Person], terminals: Sequence[Terminal]) -> dict[str, str]:
    out = {f"terminal:{t.id}": t.name or t.id for t in terminals}
    out.update({f"person:{p.id}": p.name for p in persons})
    return out


def _target(t: TargetView, names: dict[str, str], areas: dict[int, str]) -> BoardTargetOut:
    return BoardTargetOut(
        id=t.id, kind=t.kind, ref=t.ref, name=names.get(f"{t.kind}:{t.ref}", t.ref),
        area_name=areas.get(t.area_id) if t.area_id is not None else None, state=t.state,
        closed_reason=t.closed_reason,
        attempts=t.attempts, delivered_ms=t.delivered_ms, answered_ms=t.answered_ms,
        answered_by=t.answered_by, answered_terminal=t.answered_terminal,
        escalated_from=t.escalated_from, escalated_to=t.escalated_to,
        due_ms=t.due_ms if t.state in OPEN_STATES else None)


def _warning(w: WarningView, names: dict[str, str], areas: dict[int, str]) -> BoardWarningOut:
    targets = [_target(t, names, areas) for t in w.targets]
    return BoardWarningOut(
        id=w.id, level=w.level, text=w.text, created_ms=w.created_ms, created_by=w.created_by,
        deadline_ms=w.deadline_ms, max_resends=w.max_resends,
        open=any(t.state in OPEN_STATES for t in w.targets), targets=targets,
        answered=sum(1 for t in w.targets if t.state == ANSWERED),
        waiting=sum(1 for t in w.targets if t.state in OPEN_STATES),
        resends=sum(max(0, t.attempts - 1) for t in w.targets),
        escalations=sum(1 for t in w.targets if t.escalated_to is not None),
        unanswered=sum(1 for t in w.targets if t.state == "unanswered"))


def _last_activity(w: WarningView) -> int:
    return max([w.created_ms, *(x for t in w.targets
                                for x in (t.answered_ms, t.escalated_ms, t.closed_ms)
                                if x is not None)])


async def build_board(app: FastAPI, view: View) -> BoardOut:
    storage: Storage = app.state.storage
    chosen = await area_path(storage, view.area)
    now = now_ms()

    def visible(path: str | None) -> bool:
        return view.sees(path) and (chosen is None or (path is not None
                                                       and path.startswith(chosen)))

    ws = await storage.run(lambda: warnings_program(now - WINDOW_MS, now + 1, 200, visible),
                           write=False)
    ws = [w for w in ws if any(t.state in OPEN_STATES for t in w.targets)
          or now - _last_activity(w) <= CLOSED_KEPT_MS][:MAX_WARNINGS]
    persons = sorted({t.ref for w in ws for t in w.targets if t.kind == KIND_PERSON})
    terminals = sorted({t.ref for w in ws for t in w.targets if t.kind != KIND_PERSON})
    names = _names(await storage.run(lambda: persons_program(persons), write=False),
                   await storage.run(lambda: terminals_program(terminals), write=False))
    areas = await storage.run(_area_names_program, write=False)
    board = [_warning(w, names, areas) for w in ws]
    board.sort(key=lambda w: (not w.open, -w.created_ms))
    return BoardOut(now_ms=now, area=view.area, warnings=board)
