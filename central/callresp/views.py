"""Reads of the 叫应 tables: a warning with its targets and steps, lists, and statistics
(answer rate and time to answer per warning, area and person; a target cancelled because its
gateway was retired counts in none of them: nobody could have answered it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from central.callresp.directory import terminals_by_owner
from central.callresp.workflow import (
    CANCELLED,
    KIND_PERSON,
    WARNING_COLUMNS,
    Step,
    UnknownWarningError,
    WarningRecord,
)
from central.storage.program import Program, Sql


@dataclass(frozen=True, slots=True)
class TargetView:
    id: str
    kind: str
    ref: str
    area_id: int | None
    area_path: str | None
    escalated_from: str | None
    state: str
    attempts: int
    created_ms: int
    sent_ms: int | None
    last_sent_ms: int | None
    delivered_ms: int | None
    answered_ms: int | None
    answered_by: str | None
    answered_terminal: str | None
    escalated_ms: int | None
    escalated_to: str | None
    closed_ms: int | None
    due_ms: int | None
    closed_reason: str | None  # why it closed unanswered when the state does not say
    terminals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WarningView(WarningRecord):
    targets: tuple[TargetView, ...] = ()
    steps: tuple[Step, ...] = field(default_factory=tuple)


_T = ("id, kind, ref, area_id, area_path, escalated_from, state, attempts, created_ms, sent_ms,"
      " last_sent_ms, delivered_ms, answered_ms, answered_by, answered_terminal, escalated_ms,"
      " escalated_to, closed_ms, due_ms, closed_reason")
_T_FIELDS = [f.strip() for f in _T.split(",")]
_W_FIELDS = [f.name for f in fields(WarningRecord)]


def _record(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_W_FIELDS, row, strict=True))


def _targets(wid: str) -> Program[list[TargetView]]:
    rows = yield Sql(f"SELECT {_T} FROM cr_targets WHERE warning_id = ? ORDER BY n", (wid,))
    links = yield Sql("SELECT target_id, terminal FROM cr_target_terminals WHERE warning_id = ?"
                      " ORDER BY terminal", (wid,))
    by = terminals_by_owner(links)
    return [TargetView(**dict(zip(_T_FIELDS, r, strict=True)), terminals=by.get(r[0], ()))
            for r in rows]


def warning_program(wid: str, visible: Callable[[str | None], bool]) -> Program[WarningView]:
    rows = yield Sql(f"SELECT {WARNING_COLUMNS} FROM cr_warnings WHERE id = ?", (wid,))
    if not rows:
        raise UnknownWarningError(wid)
    targets = [t for t in (yield from _targets(wid)) if visible(t.area_path)]
    if not targets:
        raise UnknownWarningError(wid)  # nothing of it within the user's area
    ids = {t.id for t in targets}
    srows = yield Sql("SELECT target_id, step, attempt, due_ms, at_ms, detail FROM cr_steps"
                      " WHERE warning_id = ? ORDER BY at_ms, id", (wid,))
    steps = [Step(wid, r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in srows
             if r[0] in ids]
    return WarningView(**_record(rows[0]), targets=tuple(targets),
                       steps=tuple(steps))


def warnings_program(from_ms: int, to_ms: int, limit: int,
                     visible: Callable[[str | None], bool]) -> Program[list[WarningView]]:
    rows = yield Sql(f"SELECT {WARNING_COLUMNS} FROM cr_warnings WHERE created_ms >= ?"
                     " AND created_ms < ? ORDER BY created_ms DESC, id LIMIT ?",
                     (from_ms, to_ms, limit))
    out = []
    for r in rows:
        targets = [t for t in (yield from _targets(r[0])) if visible(t.area_path)]
        if targets:
            out.append(WarningView(**_record(r), targets=tuple(targets)))
    return out


@dataclass(frozen=True, slots=True)
class Tally:
    key: str
    targets: int = 0
    answered: int = 0
    answer_rate: float = 0.0
    mean_answer_s: float | None = None
    max_answer_s: float | None = None


def tally(key: str, targets: Sequence[TargetView]) -> Tally:
    """Answer rate and time to answer (answered_ms − sent_ms) over `targets`."""
    times = [(t.answered_ms - t.sent_ms) / 1000 for t in targets
             if t.answered_ms is not None and t.sent_ms is not None]
    answered = sum(1 for t in targets if t.answered_ms is not None)
    n = len(targets)
    return Tally(key=key, targets=n, answered=answered,
                 answer_rate=round(answered / n, 4) if n else 0.0,
                 mean_answer_s=round(sum(times) / len(times), 3) if times else None,
                 max_answer_s=round(max(times), 3) if times else None)


@dataclass(frozen=True, slots=True)
class Stats:
    by_warning: tuple[Tally, ...]
    by_area: tuple[Tally, ...]
    by_person: tuple[Tally, ...]


def _callable(targets: Sequence[TargetView]) -> list[TargetView]:
    return [t for t in targets if t.state != CANCELLED]


def stats(warnings: Sequence[WarningView]) -> Stats:
    by_area: dict[str, list[TargetView]] = {}
    by_person: dict[str, list[TargetView]] = {}
    for w in warnings:
        for t in _callable(w.targets):
            by_area.setdefault(str(t.area_id) if t.area_id is not None else "-", []).append(t)
            if t.kind == KIND_PERSON:
                by_person.setdefault(t.ref, []).append(t)
    return Stats(by_warning=tuple(tally(w.id, _callable(w.targets)) for w in warnings),
                 by_area=tuple(tally(k, v) for k, v in sorted(by_area.items())),
                 by_person=tuple(tally(k, v) for k, v in sorted(by_person.items())))


