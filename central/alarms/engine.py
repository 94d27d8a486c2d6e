"""Alarm transitions (DESIGN.md §7): edge ALARM records and central rules → `alarms` rows.

`ingest_program(batches, policy, now)` runs inside the storage backend's batch transaction,
so an alarm moves exactly when the record that moved it is stored, and a batch the gateway
resends changes nothing twice (history is unique per (gw, stream, seq)).

Concurrency (several central workers on one PostgreSQL): every transition first locks its
`alarm_keys` row (`INSERT ... ON CONFLICT DO NOTHING`, then `SELECT ... FOR UPDATE`), all keys
of a transaction in sorted order before any other alarm row, then incidents in area order.
So two workers never deadlock on alarms and never both open an alarm for one key; the
partial unique index `alarms_one_active` holds the invariant even if this code were wrong.
On SQLite, `BEGIN IMMEDIATE` serialises writers, also across processes.

Ordering (replays, backlog after an outage): `alarm_types.is_newer`. An event that is not
newer than the newest known for its key is kept in history (`note = 'stale'`) and changes
nothing: a replayed `raised` never reopens an alarm whose later `cleared` is known.

Flapping: when a key has made more than `flap_max` raise/clear transitions within
`flap_window_ms` (by the events' own times), its alarm stays active and marked flapping;
further transitions only count. It settles when the window passes quietly
(`settle_program`, from the periodic rules) or when a transition finds the window quiet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from central import CentralError
from central.alarms.lifecycle import (
    Action,
    AlarmChange,
    AlarmEvent,
    AlarmPolicy,
    AlarmStatus,
    EdgeState,
    KeyState,
    Outcome,
    is_newer,
)
from central.storage.base import split_key
from central.storage.errors import DatabaseWriteError
from central.storage.program import Program, Sql, placeholders
from central.storage.timecheck import NARROWBAND_COPY
from protocols.alarm_attrs import AlarmAttrs
from protocols.envelope import DataBatch, Record, RecordKind
from protocols.errors import DetailedError
from protocols.record_attrs import AttrsError

log = structlog.get_logger(__name__)


class AlarmEngineError(CentralError):
    """Base of the alarm engine's errors."""


class AlarmConflictError(AlarmEngineError, DatabaseWriteError):
    """A constraint refused a transition; the transaction rolled back (ingest retries the
    batch alone, as for any failed write)."""


class BadAlarmRecordError(AlarmEngineError, DetailedError):
    """An ALARM record whose attrs do not fit `protocols.alarm_attrs` (`error` says how)."""

    template = "alarm record {gw}#{seq}: {reason}"
    gw: str
    seq: int
    reason: str
    error: AttrsError


# --- parsing ----------------------------------------------------------------------------------


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def event_from_record(gw: str, stream: str, r: Record) -> AlarmEvent:
    """An edge ALARM record (attrs: `protocols.alarm_attrs.AlarmAttrs`); raises
    `BadAlarmRecordError` carrying the contract's `AttrsError` when they do not fit."""
    try:
        a = AlarmAttrs.from_attrs(r.attrs or {})
    except AttrsError as exc:
        raise BadAlarmRecordError(gw, r.seq, str(exc), exc) from exc
    # Only central's narrowband receiver sets the flag; attrs alone could say anything.
    bearer = a.bearer if int(r.flags) & NARROWBAND_COPY else None
    return AlarmEvent(
        gw=gw, alarm_key=a.alarm_id, rule=a.rule, state=a.state, level=a.level, ts_ms=r.ts_ms,
        stream=stream, seq=r.seq, point=r.point, value=_number(r.value),
        text=r.value if isinstance(r.value, str) else None, threshold=a.threshold,
        attrs_json=json.dumps(dict(r.attrs or {}), ensure_ascii=False, default=str),
        bearer=bearer or None)


# --- the pure decision ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActiveAlarm:
    id: int
    severity: int
    flapping: bool


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    notify: bool = False
    open: bool = False
    close: bool = False
    flapping: bool | None = None  # the new flag; None: unchanged
    severity: int | None = None
    count: bool = False  # one more raise/clear transition on the alarm
    reset_ack: bool = False


def decide(ev: AlarmEvent, key: KeyState, active: ActiveAlarm | None, recent: int,
           policy: AlarmPolicy) -> Decision:
    """What `ev` does, given the newest event known for its key, its active alarm, and the
    number of raise/clear transitions of the key within the flap window before it."""
    if not is_newer(ev, key):
        return Decision(Outcome.STALE)
    transition = ev.state is not EdgeState.CHANGED
    flapping_now = transition and recent + 1 > policy.flap_max
    if ev.state is EdgeState.CLEARED:
        if active is None:
            return Decision(Outcome.NO_ALARM)
        if flapping_now:
            return (Decision(Outcome.FLAP_COUNTED, count=True) if active.flapping
                    else Decision(Outcome.FLAPPING, flapping=True, count=True))
        return Decision(Outcome.CLOSED, notify=True, close=True, flapping=False, count=True)
    if active is None:
        return Decision(Outcome.OPENED, notify=not flapping_now, open=True,
                        flapping=flapping_now, severity=ev.level)
    severity = max(active.severity, ev.level)
    rose = severity > active.severity
    if active.flapping and (flapping_now or not transition):
        return Decision(Outcome.FLAP_COUNTED, severity=severity, count=transition)
    if rose:  # a higher level needs a fresh acknowledgement
        return Decision(Outcome.SEVERITY_ROSE, notify=True, flapping=False, severity=severity,
                        count=transition, reset_ack=True)
    if active.flapping:
        return Decision(Outcome.FLAP_ENDED, flapping=False, severity=severity, count=True)
    return Decision(Outcome.UPDATED, severity=severity, count=transition)


# --- programs ---------------------------------------------------------------------------------

_KEY_COLS = "last_ts_ms, last_stream, last_seq, edge_state, edge_level"
_INSERT_HISTORY = (
    "INSERT INTO alarm_events (alarm_id, gw, alarm_key, action, source, stream, seq, ts_ms,"
    " level, value, applied, notify, note, user_name, comment, attrs, received_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (gw, stream, seq) DO NOTHING")


def history_row(alarm_id: int | None, gw: str, alarm_key: str, action: str, source: str,
                ts_ms: int, now: int, *, stream: str | None = None, seq: int | None = None,
                level: int | None = None, value: float | None = None, applied: bool = True,
                notify: bool = False, note: str | None = None, user: str | None = None,
                comment: str | None = None, attrs: str | None = None) -> Sql:
    return Sql(_INSERT_HISTORY, (alarm_id, gw, alarm_key, action, source, stream, seq, ts_ms,
                                 level, value, int(applied), int(notify), note, user, comment,
                                 attrs, now))


def lock_key(gw: str, alarm_key: str) -> Program[KeyState]:
    """Create (if new) and lock the key's row; every transition of the key takes it first."""
    yield Sql("INSERT INTO alarm_keys (gw, alarm_key) VALUES (?, ?)"
              " ON CONFLICT (gw, alarm_key) DO NOTHING", (gw, alarm_key))
    rows = yield Sql(f"SELECT {_KEY_COLS} FROM alarm_keys WHERE gw = ? AND alarm_key = ?",
                     (gw, alarm_key), lock=True)
    return KeyState(*rows[0])


def _active(gw: str, alarm_key: str) -> Program[ActiveAlarm | None]:
    rows = yield Sql("SELECT id, severity, flapping FROM alarms WHERE gw = ? AND alarm_key = ?"
                     " AND state = 'active'", (gw, alarm_key), lock=True)
    return ActiveAlarm(rows[0][0], rows[0][1], bool(rows[0][2])) if rows else None


def apply_event(ev: AlarmEvent, key: KeyState, policy: AlarmPolicy,
                now: int) -> Program[tuple[AlarmChange | None, KeyState, int | None]]:
    """Apply one event under its key's lock: (change or None for a duplicate, the key's new
    state, the id of an alarm this opened)."""
    if ev.seq is not None:
        dup = yield Sql("SELECT 1 FROM alarm_events WHERE gw = ? AND stream = ? AND seq = ?",
                        (ev.gw, ev.stream, ev.seq))
        if dup:
            return None, key, None
    active = yield from _active(ev.gw, ev.alarm_key)
    recent = 0
    if ev.state is not EdgeState.CHANGED and is_newer(ev, key):
        rows = yield Sql("SELECT count(*) FROM alarm_events WHERE gw = ? AND alarm_key = ?"
                         " AND action IN ('raised', 'cleared') AND applied = 1 AND ts_ms > ?",
                         (ev.gw, ev.alarm_key, ev.ts_ms - policy.flap_window_ms))
        recent = rows[0][0]
    d = decide(ev, key, active, recent, policy)
    alarm_id = active.id if active is not None else None
    opened = None
    if d.open:
        device, _ = split_key(ev.point) if ev.point else ("", "")
        point_id = None
        if ev.point:
            rows = yield Sql("SELECT id FROM points WHERE gw = ? AND device = ? AND point = ?",
                             (ev.gw, *split_key(ev.point)))
            point_id = rows[0][0] if rows else None
        rows = yield Sql(
            "INSERT INTO alarms (gw, device, point, point_id, alarm_key, type, source, severity,"
            " level, flapping, value, text, threshold, raised_ms, last_event_ms, last_seq,"
            " created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (gw, alarm_key) WHERE state = 'active' DO NOTHING RETURNING id",
            (ev.gw, device, ev.point, point_id, ev.alarm_key, ev.rule, ev.source, d.severity,
             ev.level, int(bool(d.flapping)), ev.value, ev.text, ev.threshold, ev.ts_ms,
             ev.ts_ms, ev.seq, now, now))
        if not rows:  # impossible under the key lock; the constraint says so loudly
            raise AlarmConflictError(f"active alarm {ev.gw}/{ev.alarm_key} appeared concurrently")
        alarm_id = opened = rows[0][0]
    elif d.close and alarm_id is not None:
        yield Sql("UPDATE alarms SET state = 'cleared', cleared_ms = ?, cleared_by = ?, level = 0,"
                  " flapping = 0, transitions = transitions + 1, value = coalesce(?, value),"
                  " last_event_ms = ?, last_seq = ?, updated_ms = ? WHERE id = ?",
                  (ev.ts_ms, ev.source, ev.value, ev.ts_ms, ev.seq, now, alarm_id))
    elif alarm_id is not None and d.outcome is not Outcome.STALE:
        flapping = None if d.flapping is None else int(d.flapping)
        yield Sql(
            "UPDATE alarms SET level = ?, severity = coalesce(?, severity),"
            " flapping = coalesce(?, flapping), transitions = transitions + ?,"
            " value = coalesce(?, value), threshold = coalesce(?, threshold),"
            " ack_state = CASE WHEN ? = 1 THEN 'unacknowledged' ELSE ack_state END,"
            " last_event_ms = ?, last_seq = ?, updated_ms = ? WHERE id = ?",
            (ev.level, d.severity, flapping, int(d.count), ev.value, ev.threshold,
             int(d.reset_ack), ev.ts_ms, ev.seq, now, alarm_id))
    if alarm_id is None:  # history of a stale or orphan event goes to the key's latest alarm
        rows = yield Sql("SELECT max(id) FROM alarms WHERE gw = ? AND alarm_key = ?",
                         (ev.gw, ev.alarm_key))
        alarm_id = rows[0][0]
    applied = d.outcome is not Outcome.STALE
    yield history_row(alarm_id, ev.gw, ev.alarm_key, str(ev.state), ev.source, ev.ts_ms, now,
                      stream=ev.stream, seq=ev.seq, level=ev.level, value=ev.value,
                      applied=applied, notify=d.notify, note=str(d.outcome), attrs=ev.attrs_json)
    if applied:
        edge = EdgeState.CLEARED if ev.state is EdgeState.CLEARED else EdgeState.RAISED
        key = KeyState(ev.ts_ms, ev.stream, ev.seq, str(edge), ev.level)
        yield Sql("UPDATE alarm_keys SET last_ts_ms = ?, last_stream = ?, last_seq = ?,"
                  " edge_state = ?, edge_level = ? WHERE gw = ? AND alarm_key = ?",
                  (key.last_ts_ms, key.last_stream, key.last_seq, key.edge_state,
                   key.edge_level, ev.gw, ev.alarm_key))
    return (AlarmChange(alarm_id, ev.gw, ev.alarm_key, d.outcome, d.notify, d.severity), key,
            opened)


def attach_incidents(opened: Sequence[tuple[int, str]], now: int) -> Program[None]:
    """Put newly opened alarms into their site's open incident (opening one if none), areas
    in ascending order so that workers lock incident rows in one order."""
    if not opened:
        return
    gws = sorted({gw for _, gw in opened})
    rows = yield Sql("SELECT gw, area_id FROM gateway_sites"
                     f" WHERE gw IN ({placeholders(len(gws))})", tuple(gws))
    area_of: dict[str, int] = dict(rows)
    by_area: dict[int, list[int]] = {}
    for alarm_id, gw in opened:
        if gw in area_of:
            by_area.setdefault(area_of[gw], []).append(alarm_id)
    for area_id in sorted(by_area):
        ids = by_area[area_id]
        for _ in range(3):  # an incident closed between the two statements: open a new one
            yield Sql("INSERT INTO incidents (area_id, opened_ms, last_active_ms) VALUES (?, ?, ?)"
                      " ON CONFLICT (area_id) WHERE closed_ms IS NULL DO NOTHING",
                      (area_id, now, now))
            # Updating the row (not only reading it) is what keeps a concurrent closer off it.
            got = yield Sql("UPDATE incidents SET alarm_count = alarm_count + ?,"
                            " last_active_ms = CASE WHEN last_active_ms > ? THEN last_active_ms"
                            " ELSE ? END WHERE area_id = ? AND closed_ms IS NULL RETURNING id",
                            (len(ids), now, now, area_id))
            if got:
                break
        else:
            raise AlarmConflictError(f"no open incident for area {area_id}")
        yield Sql(f"UPDATE alarms SET incident_id = ? WHERE id IN ({placeholders(len(ids))})",
                  (got[0][0], *ids))


def apply_events(events: Iterable[AlarmEvent], policy: AlarmPolicy,
                 now: int) -> Program[list[AlarmChange]]:
    """Lock every key (sorted), apply each key's events in stream/seq order, then incidents."""
    by_key: dict[tuple[str, str], list[AlarmEvent]] = {}
    for ev in events:
        by_key.setdefault((ev.gw, ev.alarm_key), []).append(ev)
    keys: dict[tuple[str, str], KeyState] = {}
    for gw, alarm_key in sorted(by_key):
        keys[(gw, alarm_key)] = yield from lock_key(gw, alarm_key)
    changes: list[AlarmChange] = []
    opened: list[tuple[int, str]] = []
    for k in sorted(by_key):
        for ev in sorted(by_key[k], key=lambda e: (e.stream or "", e.seq or 0, e.ts_ms)):
            change, keys[k], new_id = yield from apply_event(ev, keys[k], policy, now)
            if change is not None:
                changes.append(change)
            if new_id is not None:
                opened.append((new_id, ev.gw))
    yield from attach_incidents(opened, now)
    return changes


def alarm_events_of(batches: Sequence[DataBatch]) -> list[AlarmEvent]:
    """The valid alarm events in `batches`; a malformed record is logged and skipped (it is
    stored in `events` all the same)."""
    out = []
    for b in batches:
        for r in b.non_telemetry():
            if r.kind is RecordKind.ALARM:
                try:
                    out.append(event_from_record(b.gw, b.stream, r))
                except BadAlarmRecordError as exc:
                    log.warning("alarm_record_rejected", gw=b.gw, seq=r.seq, reason=exc.reason)
    return out


def ingest_program(batches: Sequence[DataBatch], policy: AlarmPolicy,
                   now: int) -> Program[list[AlarmChange]]:
    """The alarm part of a batch write; runs in the batch's transaction."""
    return apply_events(alarm_events_of(batches), policy, now)


def log_changes(changes: Iterable[AlarmChange]) -> None:
    """After the commit: one line per transition that did something."""
    for c in changes:
        if c.outcome not in (Outcome.STALE, Outcome.UPDATED, Outcome.NO_ALARM):
            log.info("alarm_transition", gw=c.gw, alarm_key=c.alarm_key, alarm_id=c.alarm_id,
                     outcome=str(c.outcome), notify=c.notify, severity=c.severity)


def policy_from(settings: Any) -> AlarmPolicy:
    """The alarm policy a `central.config.settings.Settings` describes."""
    return AlarmPolicy(flap_max=settings.alarm_flap_max,
                       flap_window_ms=int(settings.alarm_flap_window_s * 1000),
                       incident_window_ms=int(settings.incident_window_s * 1000))


# --- central rules ----------------------------------------------------------------------------


def condition_program(gw: str, alarm_key: str, rule: str, active: bool, level: int,
                      policy: AlarmPolicy, now: int) -> Program[AlarmChange | None]:
    """Central's own rule says the condition of (gw, alarm_key) is `active`: raise or clear,
    unless that is already what the key last said."""
    key = yield from lock_key(gw, alarm_key)
    if (key.edge_state == EdgeState.RAISED) == active:
        return None
    ev = AlarmEvent(gw=gw, alarm_key=alarm_key, rule=rule, level=level if active else 0,
                    state=EdgeState.RAISED if active else EdgeState.CLEARED, ts_ms=now)
    change, _, opened = yield from apply_event(ev, key, policy, now)
    if opened is not None:
        yield from attach_incidents([(opened, gw)], now)
    return change


def settle_program(gw: str, alarm_key: str, policy: AlarmPolicy,
                   now: int) -> Program[AlarmChange | None]:
    """End the flapping of (gw, alarm_key) if its window has passed quietly: clear the alarm if
    the edge's last word was a clear, else keep it active without the flag."""
    key = yield from lock_key(gw, alarm_key)
    active = yield from _active(gw, alarm_key)
    if (active is None or not active.flapping or key.last_ts_ms is None
            or key.last_ts_ms >= now - policy.flap_window_ms):
        return None
    closing = key.edge_state == EdgeState.CLEARED
    if closing:
        yield Sql("UPDATE alarms SET state = 'cleared', cleared_ms = ?, cleared_by = 'edge',"
                  " level = 0, flapping = 0, updated_ms = ? WHERE id = ?",
                  (key.last_ts_ms, now, active.id))
    else:
        yield Sql("UPDATE alarms SET flapping = 0, updated_ms = ? WHERE id = ?", (now, active.id))
    outcome = Outcome.CLOSED if closing else Outcome.FLAP_ENDED
    yield history_row(active.id, gw, alarm_key, str(Action.FLAP_SETTLED), "central", now, now,
                      notify=closing, note=str(outcome))
    return AlarmChange(active.id, gw, alarm_key, outcome, closing, active.severity)


def close_incident_program(incident_id: int, policy: AlarmPolicy, now: int) -> Program[bool]:
    """Close an incident whose alarms have all been cleared for the incident window."""
    quiet = now - policy.incident_window_ms
    rows = yield Sql(
        "UPDATE incidents SET closed_ms = ? WHERE id = ? AND closed_ms IS NULL"
        " AND last_active_ms < ? AND NOT EXISTS (SELECT 1 FROM alarms a"
        " WHERE a.incident_id = incidents.id AND (a.state = 'active' OR a.updated_ms >= ?))"
        " RETURNING id", (now, incident_id, quiet, quiet))
    return bool(rows)


def incidents_to_close(policy: AlarmPolicy, now: int) -> Program[list[int]]:
    quiet = now - policy.incident_window_ms
    rows = yield Sql(
        "SELECT i.id FROM incidents i WHERE i.closed_ms IS NULL AND i.last_active_ms < ?"
        " AND NOT EXISTS (SELECT 1 FROM alarms a WHERE a.incident_id = i.id"
        " AND (a.state = 'active' OR a.updated_ms >= ?)) ORDER BY i.id", (quiet, quiet))
    return [r[0] for r in rows]


def flapping_to_settle(policy: AlarmPolicy, now: int) -> Program[list[tuple[str, str]]]:
    rows = yield Sql(
        "SELECT a.gw, a.alarm_key FROM alarms a JOIN alarm_keys k ON k.gw = a.gw"
        " AND k.alarm_key = a.alarm_key WHERE a.state = ? AND a.flapping = 1"
        " AND k.last_ts_ms < ? ORDER BY a.gw, a.alarm_key",
        (str(AlarmStatus.ACTIVE), now - policy.flap_window_ms))
    return [(r[0], r[1]) for r in rows]
