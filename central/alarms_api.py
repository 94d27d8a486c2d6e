"""HTTP API of areas and alarms (DESIGN.md §7).

    GET  /api/areas                                   -> the area tree with each site's gateways
    POST /api/areas          {parent_id, level, code, name_zh, kind}  -> 201, the area
    GET  /api/areas/{id}/summary                      -> active alarms under it by severity
    PUT  /api/gateways/{gw}/area   {area_id}          -> the gateway now stands at that site
    GET  /api/alarms?area=&state=&ack=&gw=&limit=     -> alarms of the area and all under it
    GET  /api/alarms/{id}                             -> the alarm and its history
    POST /api/alarms/{id}/ack      {user, comment}    -> the acknowledged alarm
    POST /api/alarms/{id}/clear    {user, comment}    -> the alarm, cleared by hand

`install(app)` adds the routes and the problem responses: 404 for an unknown area or alarm
(the app's handler), 409 for a duplicate code or an action the alarm's state does not allow,
422 for an area that does not fit the hierarchy. `user` is a free name until console logins
exist (DESIGN.md §8).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from central import alarms, areas
from central.alarm_types import AckState, AlarmStatus
from central.api_bounds import ID_MAX, IdField, IdPath
from central.areas import Area, AreaLevel, AreaNode, AreaPlacementError, DuplicateAreaError
from central.storage import Storage

PROBLEM = "application/problem+json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AreaIn(_Model):
    parent_id: IdField | None = Field(None, description="None for a root (the city)")
    level: AreaLevel
    code: str = Field(min_length=1, max_length=64)
    name_zh: str = Field(min_length=1, max_length=100)
    kind: str | None = Field(None, description="street|township, community|village, "
                                               "enterprise|station|street_office")


class AreaOut(_Model):
    id: int
    parent_id: int | None
    level: str
    code: str
    name_zh: str
    kind: str


class AreaNodeOut(AreaOut):
    gateways: list[str]
    children: list[AreaNodeOut]


class GatewayAreaIn(_Model):
    area_id: IdField


class GatewayAreaOut(_Model):
    gw: str
    area: AreaOut


class ActionIn(_Model):
    user: str = Field(min_length=1, max_length=64, description="who acts (值班员)")
    comment: str = Field("", max_length=1000)


class AlarmOut(_Model):
    id: int
    gw: str
    device: str
    point: str | None
    point_ref: str | None  # gw:device:point, as the points API names it
    alarm_key: str
    type: str
    source: str
    severity: int
    level: int
    state: str
    ack_state: str
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
    name_zh: str | None
    unit: str | None
    area_id: int | None
    area_name: str | None


class HistoryOut(_Model):
    id: int
    action: str
    source: str
    ts_ms: int
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


class AlarmDetail(AlarmOut):
    history: list[HistoryOut]


class AreaCountOut(_Model):
    area_id: int
    code: str
    name_zh: str
    level: str
    active: int
    by_severity: dict[str, int]
    unacknowledged: int


class SummaryOut(_Model):
    area: AreaOut
    active: int
    by_severity: dict[str, int]  # "1" (一级), "2" (二级)
    unacknowledged: int
    children: list[AreaCountOut]


def _area_out(a: Area) -> AreaOut:
    return AreaOut(id=a.id, parent_id=a.parent_id, level=str(a.level), code=a.code,
                   name_zh=a.name_zh, kind=a.kind)


def _node_out(n: AreaNode) -> AreaNodeOut:
    return AreaNodeOut(**_area_out(n.area).model_dump(), gateways=list(n.gateways),
                       children=[_node_out(c) for c in n.children])


def _alarm_out(a: alarms.Alarm) -> AlarmOut:
    d: dict[str, Any] = {f: getattr(a, f) for f in AlarmOut.model_fields if f != "point_ref"}
    d["state"], d["ack_state"] = str(a.state), str(a.ack_state)
    d["point_ref"] = f"{a.gw}:{a.point.replace('/', ':', 1)}" if a.point else None
    return AlarmOut(**d)


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse({"type": "about:blank", "title": title, "status": status,
                         "detail": detail}, status_code=status, media_type=PROBLEM)


def _storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


def install(app: FastAPI) -> None:
    """Add the area and alarm routes and their error responses to `app`."""

    @app.exception_handler(DuplicateAreaError)
    async def duplicate(_: Request, exc: DuplicateAreaError) -> JSONResponse:
        return _problem(409, "Duplicate area", str(exc))

    @app.exception_handler(AreaPlacementError)
    async def misplaced(_: Request, exc: AreaPlacementError) -> JSONResponse:
        return _problem(422, "Area does not fit the hierarchy", str(exc))

    @app.exception_handler(alarms.AlarmStateError)
    async def wrong_state(_: Request, exc: alarms.AlarmStateError) -> JSONResponse:
        return _problem(409, "Not possible in the alarm's state", str(exc))

    problems: dict[int | str, dict[str, Any]] = {
        404: {"description": "Unknown area or alarm"}, 409: {"description": "Conflict"},
        422: {"description": "Bad request"}}

    @app.get("/api/areas", response_model=list[AreaNodeOut], tags=["areas"])
    async def area_tree(request: Request) -> list[AreaNodeOut]:
        """The whole tree, roots first, children by code, with the gateways at each site."""
        return [_node_out(n) for n in await areas.area_tree(_storage(request))]

    @app.post("/api/areas", response_model=AreaOut, status_code=201, responses=problems,
              tags=["areas"])
    async def create_area(request: Request, body: AreaIn) -> AreaOut:
        """Example: `{"parent_id": 2, "level": "site", "code": "420102-site-09",
        "name_zh": "某危化企业", "kind": "enterprise"}`."""
        return _area_out(await areas.create_area(
            _storage(request), parent_id=body.parent_id, level=body.level, code=body.code,
            name_zh=body.name_zh, kind=body.kind))

    @app.get("/api/areas/{area_id}/summary", response_model=SummaryOut, responses=problems,
             tags=["areas"])
    async def summary(request: Request, area_id: IdPath) -> SummaryOut:
        s = await alarms.area_summary(_storage(request), area_id)
        return SummaryOut(
            area=_area_out(s.area), active=s.active, unacknowledged=s.unacknowledged,
            by_severity={str(k): v for k, v in s.by_severity.items()},
            children=[AreaCountOut(area_id=c.area_id, code=c.code, name_zh=c.name_zh,
                                   level=c.level, active=c.active,
                                   by_severity={str(k): v for k, v in c.by_severity.items()},
                                   unacknowledged=c.unacknowledged) for c in s.children])

    @app.put("/api/gateways/{gw}/area", response_model=GatewayAreaOut, responses=problems,
             tags=["areas"])
    async def place_gateway(request: Request, gw: str, body: GatewayAreaIn) -> GatewayAreaOut:
        """Put a gateway at a site (it may not have reported yet)."""
        site = await areas.assign_gateway(_storage(request), gw, body.area_id)
        return GatewayAreaOut(gw=gw, area=_area_out(site))

    @app.get("/api/alarms", response_model=list[AlarmOut], responses=problems, tags=["alarms"])
    async def list_alarms(
        request: Request,
        area: Annotated[int | None, Query(ge=1, le=ID_MAX,
                                          description="this area and all under it")] = None,
        state: Annotated[AlarmStatus | None, Query()] = None,
        ack: Annotated[AckState | None, Query()] = None,
        gw: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=alarms.MAX_LIMIT)] = 200,
    ) -> list[AlarmOut]:
        """Active first, then by severity, newest first.

        Example: `?area=2&state=active&ack=unacknowledged`."""
        rows = await alarms.list_alarms(_storage(request), area_id=area, state=state, ack=ack,
                                        gw=gw, limit=limit)
        return [_alarm_out(a) for a in rows]

    @app.get("/api/alarms/{alarm_id}", response_model=AlarmDetail, responses=problems,
             tags=["alarms"])
    async def get_alarm(request: Request, alarm_id: IdPath) -> AlarmDetail:
        storage = _storage(request)
        a = await alarms.get_alarm(storage, alarm_id)
        history = await alarms.alarm_history(storage, alarm_id)
        return AlarmDetail(**_alarm_out(a).model_dump(), history=[
            HistoryOut(**{f: getattr(h, f) for f in HistoryOut.model_fields}) for h in history])

    @app.post("/api/alarms/{alarm_id}/ack", response_model=AlarmOut, responses=problems,
              tags=["alarms"])
    async def ack(request: Request, alarm_id: IdPath, body: ActionIn) -> AlarmOut:
        """Acknowledge (确认); 409 if it is acknowledged already."""
        return _alarm_out(await alarms.acknowledge(_storage(request), alarm_id, user=body.user,
                                                   comment=body.comment))

    @app.post("/api/alarms/{alarm_id}/clear", response_model=AlarmOut, responses=problems,
              tags=["alarms"])
    async def clear(request: Request, alarm_id: IdPath, body: ActionIn) -> AlarmOut:
        """Clear by hand (清除), also while the edge still reports the condition (recorded)."""
        return _alarm_out(await alarms.clear_alarm(_storage(request), alarm_id, user=body.user,
                                                   comment=body.comment))
