"""What the console shows, built for one view: a user (their area) and the area they chose on
the page (`View.area`, None: all they may see). The overview, the desk and the 叫应 board all
take the same view, so the area filter filters the map, the counts, the desk and the board
alike (issue 12: "filter by area that filters everything on the page").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from pydantic import Field

from central.alarms import desk as alarms
from central.alarms.api import AlarmOut, alarm_fields
from central.alarms.lifecycle import AckState, AlarmStatus
from central.areas.tree import area_program
from central.console import geo
from central.identity.authz import Principal, gateway_paths_program
from central.storage import Storage
from central.storage.program import Program, Sql, placeholders
from central.storage.retire_schema import in_service
from central.web.routing import StrictModel
from runtime.clock import now_ms


@dataclass(frozen=True, slots=True)
class View:
    """Whose page and which area: the key the live feed shares among its clients."""

    user_area_path: str | None  # the user's own area (None: the whole city)
    user_area_id: int | None
    area: int | None  # the area chosen on the page (checked against the user's already)

    @classmethod
    def of(cls, p: Principal, area: int | None) -> View:
        return cls(p.user.area_path, p.user.area_id, area)

    def sees(self, path: str | None) -> bool:
        scope = self.user_area_path
        return scope is None or (path is not None and path.startswith(scope))


class PositionIn(StrictModel):
    lat: float = Field(ge=-90, le=90, description="degrees north")
    lon: float = Field(ge=-180, le=180, description="degrees east")


class PositionOut(StrictModel):
    lat: float
    lon: float


class GatewayMarkOut(StrictModel):
    gw: str
    state: geo.MapState
    online: bool
    bearer: str | None
    last_seen_ms: int | None
    position: PositionOut | None
    site_id: int | None
    site_name: str | None
    district_id: int | None
    district_name: str | None
    severity: int
    active: int
    unacknowledged: int


class DistrictMarkOut(StrictModel):
    id: int
    code: str
    name_zh: str
    position: PositionOut | None
    severity: int
    active: int
    gateways: int


class TerminalMarkOut(StrictModel):
    """A 叫应 terminal on the map, at its own position (`PUT /api/callresp/terminals/{id}` with
    `lat`/`lon`), else its area's (a street's terminals at its office)."""

    id: str
    kind: str
    name: str
    gw: str
    position: PositionOut


class OverviewOut(StrictModel):
    now_ms: int
    offline_after_s: float
    area: int | None  # the area the page chose (None: everything the user may see)
    counts: dict[str, int]
    gateways: list[GatewayMarkOut]
    districts: list[DistrictMarkOut]
    terminals: list[TerminalMarkOut]


class CurrentOut(StrictModel):
    ts_ms: int
    value: float | None
    text: str | None


@dataclass(frozen=True, slots=True)
class DeskAlarmOut(AlarmOut):
    raised_value: float | None  # the value the edge reported when it raised the alarm
    current: CurrentOut | None  # the point's latest value now


class DeskOut(StrictModel):
    now_ms: int
    area: int | None
    alarms: list[DeskAlarmOut]


def position_out(p: geo.Position | None) -> PositionOut | None:
    return None if p is None else PositionOut(lat=p.lat, lon=p.lon)


def current_program(ids: list[int]) -> Program[dict[int, CurrentOut]]:
    if not ids:
        return {}
    rows = yield Sql("SELECT a.id, l.ts_ms, l.value, l.text FROM alarms a"
                     " JOIN latest l ON l.point_id = a.point_id"
                     f" WHERE a.id IN ({placeholders(len(ids))})", tuple(ids))
    return {r[0]: CurrentOut(ts_ms=r[1], value=r[2], text=r[3]) for r in rows}


def raised_values_program(ids: list[int]) -> Program[dict[int, float | None]]:
    """The value of each alarm's first applied `raised` event (`alarms.value` follows the
    newest event, a clear included)."""
    if not ids:
        return {}
    rows = yield Sql("SELECT alarm_id, value FROM alarm_events WHERE action = 'raised'"
                     f" AND applied = 1 AND alarm_id IN ({placeholders(len(ids))})"
                     " ORDER BY id DESC", tuple(ids))
    return {r[0]: r[1] for r in rows}  # ascending ids win: the first raise


def district_paths_program() -> Program[dict[int, str]]:
    rows = yield Sql("SELECT id, path FROM areas WHERE level = 'district'")
    return {int(r[0]): str(r[1]) for r in rows}


def terminal_marks_program(shows: Callable[[str | None], bool]) -> Program[list[TerminalMarkOut]]:
    """Every 叫应 terminal with a position, its own or its area's, within `shows`; not those
    of retired gateways, which are off the map as their gateways are."""
    rows = yield Sql("SELECT t.id, t.kind, t.name, t.gw, t.lat, t.lon, a.lat, a.lon, a.path"
                     " FROM cr_terminals t LEFT JOIN areas a ON a.id = t.area_id"
                     f" WHERE {in_service('t.gw')} ORDER BY t.id")
    out = []
    for tid, kind, name, gw, lat, lon, area_lat, area_lon, path in rows:
        if lat is None or lon is None:
            lat, lon = area_lat, area_lon
        if lat is not None and lon is not None and shows(path):
            out.append(TerminalMarkOut(id=tid, kind=kind, name=name, gw=gw,
                                       position=PositionOut(lat=lat, lon=lon)))
    return out


async def area_path(storage: Storage, area: int | None) -> str | None:
    if area is None:
        return None
    return (await storage.run(lambda: area_program(area), write=False)).path


def _under(prefix: str | None) -> Callable[[str | None], bool]:
    return lambda path: prefix is None or (path is not None and path.startswith(prefix))


async def build_overview(app: FastAPI, view: View) -> OverviewOut:
    """The map's data for `view`: its gateways, the districts above and below it, the counts
    over its gateways only."""
    storage: Storage = app.state.storage
    offline_after_s = float(app.state.settings.offline_after_s)
    chosen = await area_path(storage, view.area)
    paths = await storage.run(gateway_paths_program, write=False)
    in_area = _under(chosen)
    now = now_ms()

    def visible(gw: str) -> bool:
        if view.user_area_path is None and chosen is None:
            return True
        return view.sees(paths.get(gw)) and in_area(paths.get(gw))

    ov = await geo.overview(storage, offline_after_s=offline_after_s, visible=visible,
                            now_ms=now)
    districts = await storage.run(district_paths_program, write=False)
    scope = chosen or view.user_area_path

    def shows_district(path: str) -> bool:  # above or below the chosen area
        return scope is None or path.startswith(scope) or scope.startswith(path)

    terminals = await storage.run(
        lambda: terminal_marks_program(lambda p: view.sees(p) and in_area(p)), write=False)
    return OverviewOut(
        now_ms=now, offline_after_s=offline_after_s, area=view.area, counts=ov.counts,
        gateways=[GatewayMarkOut(
            gw=m.gw, state=m.state, online=m.online, bearer=m.bearer,
            last_seen_ms=m.last_seen_ms, position=position_out(m.position), site_id=m.site_id,
            site_name=m.site_name, district_id=m.district_id, district_name=m.district_name,
            severity=m.severity, active=m.active, unacknowledged=m.unacknowledged)
            for m in ov.gateways],
        districts=[DistrictMarkOut(id=d.id, code=d.code, name_zh=d.name_zh,
                                   position=position_out(d.position), severity=d.severity,
                                   active=d.active, gateways=d.gateways)
                   for d in ov.districts if shows_district(districts.get(d.id, ""))],
        terminals=terminals)


async def build_desk(app: FastAPI, view: View) -> DeskOut:
    """Active alarms and cleared ones not yet acknowledged, of the view's area."""
    storage: Storage = app.state.storage
    area = view.area if view.area is not None else view.user_area_id
    active = await alarms.list_alarms(storage, area_id=area, state=AlarmStatus.ACTIVE,
                                      limit=alarms.MAX_LIMIT)
    unacked = await alarms.list_alarms(storage, area_id=area, ack=AckState.UNACKNOWLEDGED,
                                       limit=alarms.MAX_LIMIT)
    paths = ({} if view.user_area_path is None
             else await storage.run(gateway_paths_program, write=False))
    seen: dict[int, alarms.Alarm] = {}
    for a in (*active, *unacked):
        if view.user_area_path is None or view.sees(paths.get(a.gw)):
            seen.setdefault(a.id, a)
    rows = sorted(seen.values(), key=lambda a: (a.state != AlarmStatus.ACTIVE,
                                                a.ack_state == AckState.ACKNOWLEDGED,
                                                -a.severity, -a.raised_ms, -a.id))
    ids = [a.id for a in rows]
    await storage.settle_latest()
    current = await storage.run(lambda: current_program(ids), write=False)
    raised = await storage.run(lambda: raised_values_program(ids), write=False)
    return DeskOut(now_ms=now_ms(), area=view.area, alarms=[
        DeskAlarmOut(**alarm_fields(a), raised_value=raised.get(a.id, a.value),
                     current=current.get(a.id)) for a in rows])
