"""Central's alarms as duty officers see them (DESIGN.md §7): list, history, acknowledge, clear,
and counts up the area tree. Transitions from edge records and central rules are
`central.alarms.engine`; the tables are `central.storage.alarm_schema`.

An alarm is one occurrence of one condition (gw, alarm_key): `state` active|cleared ×
`ack_state` unacknowledged|acknowledged, a `severity` (1 一级, 2 二级) that can only rise
while it is active (and then wants a new acknowledgement), `level` the edge's current level.
A person may clear an active alarm by hand even while the edge still reports the condition:
that is allowed and recorded (`note = 'edge_still_active'`); the edge's next change of level
opens a new alarm.

    alarms = await list_alarms(storage, area_id=3, state="active", ack="unacknowledged")
    await acknowledge(storage, alarms[0].id, user="值班员张三", comment="已电话联系企业")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from central import CentralError
from central.alarms.engine import apply_events, history_row, log_changes
from central.alarms.lifecycle import (
    AckState,
    Action,
    AlarmChange,
    AlarmEvent,
    AlarmStatus,
    EdgeState,
)
from central.areas.tree import Area, area_program
from central.storage import NotFoundError, Storage
from central.storage.program import Program, Sql
from protocols.errors import DetailedError
from runtime import clock

MAX_LIMIT = 1000


class AlarmError(CentralError):
    """Base of the alarm errors that are the caller's fault."""


class UnknownAlarmError(NotFoundError):
    kind = "alarm"


class AlarmStateError(AlarmError, DetailedError):
    """The action does not fit the alarm's state (acknowledged twice, cleared twice)."""

    template = "alarm {alarm_id}: {reason}"
    alarm_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Alarm:
    id: int
    gw: str
    device: str
    point: str | None  # "device/point"
    alarm_key: str
    type: str  # the rule: high, low, rate, stale, device_offline, gateway_offline
    source: str  # edge | central
    severity: int
    level: int
    state: AlarmStatus
    ack_state: AckState
    flapping: bool
    transitions: int
    value: float | None
    text: str | None
    threshold: float | None
    raised_ms: int
    cleared_ms: int | None
    last_event_ms: int
    acked_by: str | None
    acked_ms: int | None
    ack_comment: str | None
    cleared_by: str | None
    clear_comment: str | None
    incident_id: int | None
    updated_ms: int
    name_zh: str | None  # the point's name, from the gateway's birth
    unit: str | None
    area_id: int | None  # the gateway's site
    area_name: str | None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    id: int
    action: str  # raised, changed, cleared (edge/central), ack, manual_clear, flap_settled
    source: str  # edge | central | user
    ts_ms: int  # the edge's time for edge events, central's for the rest
    level: int | None
    value: float | None
    applied: bool
    notify: bool
    note: str | None
    user: str | None
    comment: str | None
    stream: str | None
    seq: int | None
    received_ms: int


@dataclass(frozen=True, slots=True)
class AreaCount:
    area_id: int
    code: str
    name_zh: str
    level: str
    active: int
    by_severity: dict[int, int]
    unacknowledged: int


@dataclass(frozen=True, slots=True)
class AreaSummary:
    area: Area
    active: int
    by_severity: dict[int, int]
    unacknowledged: int
    children: tuple[AreaCount, ...]


_SELECT = (
    "SELECT a.id, a.gw, a.device, a.point, a.alarm_key, a.type, a.source, a.severity, a.level,"
    " a.state, a.ack_state, a.flapping, a.transitions, a.value, a.text, a.threshold,"
    " a.raised_ms, a.cleared_ms, a.last_event_ms, a.acked_by, a.acked_ms, a.ack_comment,"
    " a.cleared_by, a.clear_comment, a.incident_id, a.updated_ms, p.name_zh, p.unit,"
    " ar.id, ar.name_zh FROM alarms a LEFT JOIN points p ON p.id = a.point_id"
    " LEFT JOIN gateway_sites gs ON gs.gw = a.gw LEFT JOIN areas ar ON ar.id = gs.area_id")
_RANK = "CASE WHEN a.state = 'active' THEN 0 ELSE 1 END"
_ORDER = f" ORDER BY {_RANK}, a.severity DESC, a.raised_ms DESC, a.id DESC"


def _history_fields(r: Sequence[Any]) -> tuple[Any, ...]:
    return (*r[:6], bool(r[6]), bool(r[7]), *r[8:])


def _alarm(r: Sequence[Any]) -> Alarm:
    fields: tuple[Any, ...] = (*r[:9], AlarmStatus(r[9]), AckState(r[10]), bool(r[11]), *r[12:])
    return Alarm(*fields)


# --- programs ---------------------------------------------------------------------------------


def get_program(alarm_id: int) -> Program[Alarm]:
    rows = yield Sql(_SELECT + " WHERE a.id = ?", (alarm_id,))
    if not rows:
        raise UnknownAlarmError(str(alarm_id))
    return _alarm(rows[0])


AlarmKey = tuple[int, int, int, int]  # (0 active | 1 cleared, severity, raised_ms, id)


def alarm_key(a: Alarm) -> AlarmKey:
    """Where an alarm stands in the list's order; a page that ends at it continues after it."""
    return (0 if a.state == AlarmStatus.ACTIVE else 1, a.severity, a.raised_ms, a.id)


def list_program(area_id: int | None, state: AlarmStatus | None, ack: AckState | None,
                 gw: str | None, limit: int, *, from_ms: int | None = None,
                 to_ms: int | None = None, after: AlarmKey | None = None
                 ) -> Program[list[Alarm]]:
    """At most `limit` alarms in the list's order, raised in [from_ms, to_ms) when given,
    after the key `after` when given."""
    where: list[str] = []
    args: list[str | int] = []
    if area_id is not None:
        area = yield from area_program(area_id)
        where.append("ar.path LIKE ?")  # this area and everything under it
        args.append(area.path + "%")
    for col, v in (("a.state", state), ("a.ack_state", ack), ("a.gw", gw)):
        if v is not None:
            where.append(f"{col} = ?")
            args.append(str(v))
    for cond, ms in (("a.raised_ms >= ?", from_ms), ("a.raised_ms < ?", to_ms)):
        if ms is not None:
            where.append(cond)
            args.append(ms)
    if after is not None:  # _ORDER as one ascending row value: the keyset of the last page
        where.append(f"({_RANK}, -a.severity, -a.raised_ms, -a.id) > (?, ?, ?, ?)")
        args.extend((after[0], -after[1], -after[2], -after[3]))
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + _ORDER + " LIMIT ?"
    rows = yield Sql(sql, (*args, limit))
    return [_alarm(r) for r in rows]


def history_program(alarm_id: int) -> Program[list[HistoryEntry]]:
    yield from get_program(alarm_id)
    rows = yield Sql("SELECT id, action, source, ts_ms, level, value, applied, notify, note,"
                     " user_name, comment, stream, seq, received_ms FROM alarm_events"
                     " WHERE alarm_id = ? ORDER BY id", (alarm_id,))
    return [HistoryEntry(*_history_fields(r)) for r in rows]


def _transition(alarm_id: int, now: int, assign: str, values: tuple[Any, ...], when: str,
                refused: Callable[[Alarm], str]) -> Program[tuple[str, str, int]]:
    """`UPDATE alarms SET <assign>` (with `values`) if the alarm's state is `when`; else the
    alarm is unknown (`UnknownAlarmError`) or its state refuses (`refused(alarm)` says why).
    Gives the alarm's gw, alarm_key and level."""
    rows = yield Sql(f"UPDATE alarms SET {assign}, updated_ms = ? WHERE id = ? AND {when}"
                     " RETURNING gw, alarm_key, level", (*values, now, alarm_id))
    if not rows:
        alarm = yield from get_program(alarm_id)
        raise AlarmStateError(alarm_id, refused(alarm))
    gw, key, level = rows[0]
    return gw, key, level


def ack_program(alarm_id: int, user: str, comment: str, now: int) -> Program[Alarm]:
    gw, key, level = yield from _transition(
        alarm_id, now, "ack_state = 'acknowledged', acked_by = ?, acked_ms = ?, ack_comment = ?",
        (user, now, comment), "ack_state = 'unacknowledged'",
        lambda alarm: f"already acknowledged by {alarm.acked_by}")
    yield history_row(alarm_id, gw, key, str(Action.ACK), "user", now, now, level=level,
                      user=user, comment=comment)
    return (yield from get_program(alarm_id))


def clear_program(alarm_id: int, user: str, comment: str, now: int) -> Program[Alarm]:
    gw, key, level = yield from _transition(
        alarm_id, now, "state = 'cleared', cleared_ms = ?, cleared_by = ?, clear_comment = ?,"
        " flapping = 0", (now, user, comment), "state = 'active'",
        lambda _alarm: "already cleared")
    edge = yield Sql("SELECT edge_state FROM alarm_keys WHERE gw = ? AND alarm_key = ?",
                     (gw, key))
    still = bool(edge) and edge[0][0] == EdgeState.RAISED
    yield history_row(alarm_id, gw, key, str(Action.MANUAL_CLEAR), "user", now, now,
                      level=level, user=user, comment=comment,
                      note="edge_still_active" if still else None)
    return (yield from get_program(alarm_id))


def comment_program(alarm_id: int, user: str, comment: str, now: int) -> Program[Alarm]:
    alarm = yield from get_program(alarm_id)
    yield history_row(alarm_id, alarm.gw, alarm.alarm_key, str(Action.COMMENT), "user", now, now,
                      level=alarm.level, user=user, comment=comment)
    return alarm


def summary_program(area_id: int) -> Program[AreaSummary]:
    area = yield from area_program(area_id)
    kids = yield Sql("SELECT id, code, name_zh, level FROM areas WHERE parent_id = ?"
                     " ORDER BY code", (area_id,))
    rows = yield Sql("SELECT ar.path, a.severity, a.ack_state, count(*) FROM alarms a"
                     " JOIN gateway_sites gs ON gs.gw = a.gw JOIN areas ar ON ar.id = gs.area_id"
                     " WHERE a.state = 'active' AND ar.path LIKE ?"
                     " GROUP BY ar.path, a.severity, a.ack_state", (area.path + "%",))
    total: dict[int, int] = {}
    unack = 0
    per_child: dict[int, tuple[dict[int, int], list[int]]] = {k[0]: ({}, [0]) for k in kids}
    for path, severity, ack, n in rows:
        total[severity] = total.get(severity, 0) + n
        unack += n if ack == AckState.UNACKNOWLEDGED else 0
        rest = path[len(area.path):].split("/", 1)[0]
        if rest and int(rest) in per_child:
            sev, un = per_child[int(rest)]
            sev[severity] = sev.get(severity, 0) + n
            un[0] += n if ack == AckState.UNACKNOWLEDGED else 0
    children = tuple(AreaCount(i, code, name, lv, sum(per_child[i][0].values()),
                               dict(sorted(per_child[i][0].items())), per_child[i][1][0])
                     for i, code, name, lv in kids)
    return AreaSummary(area, sum(total.values()), dict(sorted(total.items())), unack, children)


# --- the API other modules call ---------------------------------------------------------------


async def list_alarms(storage: Storage, *, area_id: int | None = None,
                      state: AlarmStatus | str | None = None, ack: AckState | str | None = None,
                      gw: str | None = None, limit: int = 200, from_ms: int | None = None,
                      to_ms: int | None = None, after: AlarmKey | None = None) -> list[Alarm]:
    """Alarms of an area and every area under it (or all), active first, most severe first,
    newest first; `from_ms`/`to_ms` bound when they were raised, `after` is the `alarm_key`
    of the last alarm of the previous page."""
    st = None if state is None else AlarmStatus(state)
    ak = None if ack is None else AckState(ack)
    n = max(1, min(limit, MAX_LIMIT + 1))  # + 1: a pager asks one more to know if more follow
    return await storage.run(lambda: list_program(area_id, st, ak, gw, n, from_ms=from_ms,
                                                  to_ms=to_ms, after=after), write=False)


async def get_alarm(storage: Storage, alarm_id: int) -> Alarm:
    return await storage.run(lambda: get_program(alarm_id), write=False)


async def alarm_history(storage: Storage, alarm_id: int) -> list[HistoryEntry]:
    """Every transition of the alarm, oldest first, with who and why."""
    return await storage.run(lambda: history_program(alarm_id), write=False)


async def acknowledge(storage: Storage, alarm_id: int, *, user: str, comment: str = "",
                      now_ms: int | None = None) -> Alarm:
    """Raises `UnknownAlarmError`, or `AlarmStateError` if it is acknowledged already."""
    now = clock.now_ms() if now_ms is None else now_ms
    return await storage.run(lambda: ack_program(alarm_id, user, comment, now))


async def clear_alarm(storage: Storage, alarm_id: int, *, user: str, comment: str = "",
                      now_ms: int | None = None) -> Alarm:
    """Clear an active alarm by hand; raises `AlarmStateError` if it is cleared already."""
    now = clock.now_ms() if now_ms is None else now_ms
    return await storage.run(lambda: clear_program(alarm_id, user, comment, now))


async def area_summary(storage: Storage, area_id: int) -> AreaSummary:
    """Active alarms under an area by severity, and the same for each child area."""
    return await storage.run(lambda: summary_program(area_id), write=False)


async def apply_alarm_events(storage: Storage, events: Iterable[AlarmEvent], *,
                             now_ms: int | None = None) -> list[AlarmChange]:
    """Apply events in their own transaction (ingest applies records inside the batch's)."""
    now = clock.now_ms() if now_ms is None else now_ms
    evs = list(events)
    changes = await storage.run(lambda: apply_events(evs, storage.alarm_policy, now))
    log_changes(changes)
    return changes
