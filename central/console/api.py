"""The duty console's read endpoints and live feed (issue 12), and positions for the map.

- `GET /api/console/overview`: the 一张图 map's data in one request (`central.console.geo`).
- `GET /api/console/desk`: the alarm desk — every alarm still active or not yet
  acknowledged (a level-2 alarm that clears before anyone looks stays), each with the point's
  current value beside the value at raise time.
- `GET /api/console/events`: server-sent events behind the same login as everything else:
  `overview` and `desk` carry the new state whenever it changed, `ping` every few seconds so
  the page can tell a dead link from a quiet one. One cheap check per connection per second on
  the database; the browser no longer polls per gateway.
- `PUT /api/gateways/{gw}/position`, `PUT /api/areas/{id}/position` (admins, audited).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from central.alarms import desk as alarms
from central.alarms.api import AlarmOut, alarm_fields
from central.alarms.lifecycle import AckState, AlarmStatus
from central.console import geo
from central.identity.authz import (
    Admin,
    OutOfScopeError,
    Principal,
    Reader,
    check_area,
    gateway_path_program,
    gateway_scope,
)
from central.storage.program import Program, Sql, placeholders
from central.web.bounds import ID_MAX, IdPath
from central.web.routing import StrictModel, now_ms, run_audited, storage_of

# Module level, so the routes' string annotations resolve.
AreaQuery = Annotated[int | None, Query(ge=1, le=ID_MAX, description="this area and all under it")]
CHECK_S = 1.0  # how often each live connection looks for changes
PING_S = 5.0  # the page calls central unreachable after 3 missed pings
REFRESH_S = 15.0  # an unchanged overview or desk is sent again this often (fresh ages)




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


class OverviewOut(StrictModel):
    now_ms: int
    offline_after_s: float
    counts: dict[str, int]
    gateways: list[GatewayMarkOut]
    districts: list[DistrictMarkOut]


class CurrentOut(StrictModel):
    ts_ms: int
    value: float | None
    text: str | None


class DeskAlarmOut(AlarmOut):
    raised_value: float | None  # the value the edge reported when it raised the alarm
    current: CurrentOut | None  # the point's latest value now


class DeskOut(StrictModel):
    now_ms: int
    alarms: list[DeskAlarmOut]


async def _set_position(request: Request, p: Principal, action: str, target: str,
                        body: PositionIn,
                        step: Callable[[geo.Position], Program[None]]) -> PositionOut:
    """Run `step` at the body's position with its audit row; the position as stored."""
    pos = geo.Position(body.lat, body.lon)
    await run_audited(request, p.name, action, target, lambda: step(pos),
                      lambda _: {"lat": body.lat, "lon": body.lon})
    return PositionOut(lat=body.lat, lon=body.lon)


def _position(p: geo.Position | None) -> PositionOut | None:
    return None if p is None else PositionOut(lat=p.lat, lon=p.lon)


def _district_visible(p: Principal) -> Callable[[str], bool]:
    """A scoped user sees the districts above and below their own area."""
    scope = p.user.area_path
    return lambda path: scope is None or path.startswith(scope) or scope.startswith(path)


def _desk_alarm(a: alarms.Alarm, raised_value: float | None,
                current: CurrentOut | None) -> DeskAlarmOut:
    return DeskAlarmOut(**alarm_fields(a), raised_value=raised_value, current=current)


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


async def build_overview(request: Request, p: Principal) -> OverviewOut:
    storage = storage_of(request)
    offline_after_s = float(request.app.state.settings.offline_after_s)
    visible = await gateway_scope(storage, p)
    now = now_ms()
    ov = await geo.overview(storage, offline_after_s=offline_after_s, visible=visible,
                            now_ms=now)
    paths = await storage.run(district_paths_program, write=False)
    shows = _district_visible(p)
    return OverviewOut(
        now_ms=now, offline_after_s=offline_after_s, counts=ov.counts,
        gateways=[GatewayMarkOut(
            gw=m.gw, state=m.state, online=m.online, bearer=m.bearer,
            last_seen_ms=m.last_seen_ms, position=_position(m.position), site_id=m.site_id,
            site_name=m.site_name, district_id=m.district_id, district_name=m.district_name,
            severity=m.severity, active=m.active, unacknowledged=m.unacknowledged)
            for m in ov.gateways],
        districts=[DistrictMarkOut(id=d.id, code=d.code, name_zh=d.name_zh,
                                   position=_position(d.position), severity=d.severity,
                                   active=d.active, gateways=d.gateways)
                   for d in ov.districts if shows(paths.get(d.id, ""))])


async def build_desk(request: Request, p: Principal, area: int | None) -> DeskOut:
    storage = storage_of(request)
    if area is not None:
        await check_area(storage, p, area)
    elif p.user.area_id is not None:
        area = p.user.area_id
    active = await alarms.list_alarms(storage, area_id=area, state=AlarmStatus.ACTIVE,
                                      limit=alarms.MAX_LIMIT)
    unacked = await alarms.list_alarms(storage, area_id=area, ack=AckState.UNACKNOWLEDGED,
                                       limit=alarms.MAX_LIMIT)
    visible = await gateway_scope(storage, p)
    seen: dict[int, alarms.Alarm] = {}
    for a in (*active, *unacked):
        if visible(a.gw):
            seen.setdefault(a.id, a)
    rows = sorted(seen.values(), key=lambda a: (a.state != AlarmStatus.ACTIVE,
                                                a.ack_state == AckState.ACKNOWLEDGED,
                                                -a.severity, -a.raised_ms, -a.id))
    ids = [a.id for a in rows]
    current = await storage.run(lambda: current_program(ids), write=False)
    raised = await storage.run(lambda: raised_values_program(ids), write=False)
    return DeskOut(now_ms=now_ms(), alarms=[
        _desk_alarm(a, raised.get(a.id, a.value), current.get(a.id)) for a in rows])


def _change_key(body: OverviewOut | DeskOut) -> str:
    """What must change for an event to go out at once: a gateway's `last_seen_ms` moves
    with every batch it sends (400 gateways would resend the overview every second), so it
    only rides along with a real change or the periodic refresh."""
    if isinstance(body, OverviewOut):
        return body.model_dump_json(exclude={"now_ms": True,
                                             "gateways": {"__all__": {"last_seen_ms"}}})
    return body.model_dump_json(exclude={"now_ms"})


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


def install(app: FastAPI) -> None:
    """Add the console's routes to `app`."""

    @app.get("/api/console/overview", response_model=OverviewOut, tags=["console"])
    async def overview(request: Request, p: Reader) -> OverviewOut:
        """Every gateway the user may see with its map state and position, each district's
        worst active alarm, and the counts by state."""
        return await build_overview(request, p)

    @app.get("/api/console/desk", response_model=DeskOut, tags=["console"])
    async def desk(request: Request, p: Reader, area: AreaQuery = None) -> DeskOut:
        """Active alarms and cleared ones not yet acknowledged, active first, then
        unacknowledged, by severity, newest first; each with the point's current value."""
        return await build_desk(request, p, area)

    @app.get("/api/console/events", tags=["console"],
             response_class=StreamingResponse)
    async def events(request: Request, p: Reader, area: AreaQuery = None) -> StreamingResponse:
        """Server-sent events: `overview` and `desk` (the same bodies as the endpoints above)
        whenever they changed, `ping` every 5 s. Example: `curl -N -b session=…
        /api/console/events?area=2`."""
        if area is not None:
            await check_area(storage_of(request), p, area)

        async def stream() -> AsyncIterator[bytes]:
            last: dict[str, str] = {}
            sent: dict[str, float] = {}
            last_ping = 0.0
            # `app.state.stopping` (central.health.service): a stream ends when central
            # stops, or an open console would hold the stop for ever.
            stopping = getattr(request.app.state, "stopping", None)
            while not await request.is_disconnected() and not (stopping and stopping.is_set()):
                for name, build in (("overview", lambda: build_overview(request, p)),
                                    ("desk", lambda: build_desk(request, p, area))):
                    body: Any = await build()
                    key = _change_key(body)
                    due = time.monotonic() - sent.get(name, 0.0) >= REFRESH_S
                    if last.get(name) != key or due:
                        last[name], sent[name] = key, time.monotonic()
                        yield _sse(name, body.model_dump_json())
                if time.monotonic() - last_ping >= PING_S:
                    last_ping = time.monotonic()
                    yield _sse("ping", json.dumps({"now_ms": now_ms()}))
                await asyncio.sleep(CHECK_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    @app.put("/api/gateways/{gw}/position", response_model=PositionOut, tags=["console"])
    async def place_gateway(request: Request, gw: str, body: PositionIn,
                            p: Admin) -> PositionOut:
        """Put a gateway on the map (it may not have reported yet). Example:
        `{"lat": 30.6402, "lon": 114.3850}`."""
        storage = storage_of(request)
        path = await storage.run(lambda: gateway_path_program(gw), write=False)
        if p.user.area_path is not None and not p.sees(path):
            raise OutOfScopeError(p.name, f"gateway {gw}")
        return await _set_position(request, p, "gateway.positioned", f"gateway:{gw}", body,
                                   lambda pos: geo.set_gateway_position_program(gw, pos))

    @app.put("/api/areas/{area_id}/position", response_model=PositionOut, tags=["console"])
    async def place_area(request: Request, area_id: IdPath, body: PositionIn,
                         p: Admin) -> PositionOut:
        """Put an area (a site, usually) on the map; its gateways without a position of
        their own are drawn there."""
        await check_area(storage_of(request), p, area_id)
        return await _set_position(request, p, "area.positioned", f"area:{area_id}", body,
                                   lambda pos: geo.set_area_position_program(area_id, pos))
