"""HTTP API of areas and alarms (DESIGN.md §7).

    GET  /api/areas                                   -> the area tree with each site's gateways
    POST /api/areas          {parent_id, level, code, name_zh, kind}  -> 201, the area
    GET  /api/areas/{id}/summary                      -> active alarms under it by severity
    PUT  /api/gateways/{gw}/area   {area_id}          -> the gateway now stands at that site
    GET  /api/alarms?area=&state=&ack=&gw=&from=&to=&limit=&cursor=
                                                      -> alarms of the area and all under it
    GET  /api/alarms/{id}                             -> the alarm and its history
    POST /api/alarms/{id}/ack      {comment}          -> the acknowledged alarm
    POST /api/alarms/{id}/clear    {comment}          -> the alarm, cleared by hand
    POST /api/alarms/{id}/comment  {comment}          -> the alarm, with the comment in its history

`install(app)` adds the routes and the problem responses: 404 for an unknown area or alarm
(the app's handler), 409 for a duplicate code or an action the alarm's state does not allow,
422 for an area that does not fit the hierarchy.

Who acts is the logged-in user (DESIGN.md §8): reading needs `read`, ack/clear/comment
`operate`, creating areas and placing gateways `administer`; everything is limited to the
user's area (403 outside it; lists and the tree show only what lies inside). Each action
commits together with its audit row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request, Response
from pydantic import Field

from central.alarms import desk as alarms
from central.alarms.lifecycle import AckState, AlarmStatus
from central.alarms.paging import (
    NEXT_HEADERS,
    alarm_cursor,
    next_alarm_cursor,
    set_next,
    time_range,
)
from central.areas import tree as areas
from central.areas.tree import Area, AreaLevel, AreaNode, AreaPlacementError
from central.identity.authz import (
    Admin,
    Operator,
    OutOfScopeError,
    Principal,
    Reader,
    check_area,
    check_gateway,
    gateway_path_program,
    gateway_scope,
)
from central.storage.program import Program
from central.web.bounds import ID_MAX, IdField, IdPath
from central.web.cursor import MAX_CURSOR_CHARS
from central.web.problems import install_problems
from central.web.routing import StrictModel, audit_of, run_audited, storage_of
from central.web.times import TIME_DOC
from runtime.clock import now_ms


class AreaIn(StrictModel):
    parent_id: IdField | None = Field(default=None, description="None for a root (the city)")
    level: AreaLevel
    code: str = Field(min_length=1, max_length=64)
    name_zh: str = Field(min_length=1, max_length=100)
    kind: str | None = Field(default=None, description="street|township, community|village, "
                                               "enterprise|station|street_office")


class AreaOut(StrictModel):
    id: int
    parent_id: int | None
    level: str
    code: str
    name_zh: str
    kind: str
    lat: float | None = None  # set with PUT /api/areas/{id}/position
    lon: float | None = None


class AreaNodeOut(AreaOut):
    gateways: list[str]
    children: list[AreaNodeOut]


class GatewayAreaIn(StrictModel):
    area_id: IdField


class GatewayAreaOut(StrictModel):
    gw: str
    area: AreaOut


class ActionIn(StrictModel):
    comment: str = Field(default="", max_length=1000)


class CommentIn(ActionIn):
    comment: str = Field(min_length=1, max_length=1000)


@dataclass(frozen=True, slots=True)
class AlarmOut(alarms.Alarm):
    """An alarm as the API shows it: its point also named as the points API names it."""

    point_ref: str | None  # gw:device:point


@dataclass(frozen=True, slots=True)
class AlarmDetail(AlarmOut):
    history: list[alarms.HistoryEntry]


class AreaCountOut(StrictModel):
    area_id: int
    code: str
    name_zh: str
    level: str
    active: int
    by_severity: dict[str, int]
    unacknowledged: int


class SummaryOut(StrictModel):
    area: AreaOut
    active: int
    by_severity: dict[str, int]  # "1" (一级), "2" (二级)
    unacknowledged: int
    children: list[AreaCountOut]


def _area_out(a: Area) -> AreaOut:
    return AreaOut(id=a.id, parent_id=a.parent_id, level=str(a.level), code=a.code,
                   name_zh=a.name_zh, kind=a.kind, lat=a.lat, lon=a.lon)


def _node_out(n: AreaNode) -> AreaNodeOut:
    return AreaNodeOut(**_area_out(n.area).model_dump(), gateways=list(n.gateways),
                       children=[_node_out(c) for c in n.children])


def alarm_fields(a: alarms.Alarm) -> dict[str, Any]:
    """The fields of `AlarmOut` for an alarm (a subclass adds its own)."""
    d: dict[str, Any] = {f.name: getattr(a, f.name) for f in fields(alarms.Alarm)}
    d["point_ref"] = f"{a.gw}:{a.point.replace('/', ':', 1)}" if a.point else None
    return d


def _alarm_out(a: alarms.Alarm) -> AlarmOut:
    return AlarmOut(**alarm_fields(a))


def _scoped(nodes: list[AreaNode], p: Principal) -> list[AreaNode]:
    """The subtree(s) the principal sees: the whole forest, or the node of their area."""
    if p.user.area_path is None:
        return nodes
    for n in nodes:
        if n.area.path == p.user.area_path:
            return [n]
        if p.user.area_path.startswith(n.area.path):
            return _scoped(list(n.children), p)
    return []


async def _acting_on(request: Request, p: Principal, alarm_id: int) -> alarms.Alarm:
    storage = storage_of(request)
    a = await alarms.get_alarm(storage, alarm_id)
    await check_gateway(storage, p, a.gw)
    return a


AlarmStep = Callable[[int, str, str, int], Program[alarms.Alarm]]


async def _act(request: Request, p: Principal, alarm_id: int, action: str, comment: str,
               step: AlarmStep) -> AlarmOut:
    """Run an alarm step as the logged-in operator, audited as `alarm.<action>`, in one
    transaction with its audit row, and answer the alarm."""
    await _acting_on(request, p, alarm_id)
    now = now_ms()
    return _alarm_out(await run_audited(
        request, p.name, f"alarm.{action}", f"alarm:{alarm_id}",
        lambda: step(alarm_id, p.name, comment, now),
        lambda a: {"gw": a.gw, "alarm_key": a.alarm_key, "comment": comment}))


_PROBLEMS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown area or alarm"}, 409: {"description": "Conflict"},
    422: {"description": "Bad request"}}


def install(app: FastAPI) -> None:
    """Add the area and alarm routes and their error responses to `app`."""
    _install_errors(app)
    _install_area_routes(app)
    _install_alarm_routes(app)


def _install_errors(app: FastAPI) -> None:
    install_problems(app, {
        AreaPlacementError: (422, "Area does not fit the hierarchy"),
        alarms.AlarmStateError: (409, "Not possible in the alarm's state")})


def _install_area_routes(app: FastAPI) -> None:
    @app.get("/api/areas", response_model=list[AreaNodeOut], tags=["areas"])
    async def area_tree(request: Request, p: Reader) -> list[AreaNodeOut]:
        """The tree (from the user's own area down), children by code, with the gateways at
        each site."""
        return [_node_out(n) for n in _scoped(await areas.area_tree(storage_of(request)), p)]

    @app.post("/api/areas", response_model=AreaOut, status_code=201, responses=_PROBLEMS,
              tags=["areas"])
    async def create_area(request: Request, body: AreaIn,
                          p: Admin) -> AreaOut:
        """Example: `{"parent_id": 2, "level": "site", "code": "420102-site-09",
        "name_zh": "某危化企业", "kind": "enterprise"}`."""
        storage = storage_of(request)
        if body.parent_id is None:
            if p.user.area_path is not None:
                raise OutOfScopeError(p.name, "a new root area")
        else:
            await check_area(storage, p, body.parent_id)
        now = now_ms()

        def program() -> Program[Area]:
            a = yield from areas.create_program(body.parent_id, AreaLevel(body.level), body.code,
                                                body.name_zh, body.kind, now)
            yield from audit_of(request).program(
                p.name, "area.created", f"area:{a.code}",
                {"id": a.id, "parent_id": a.parent_id, "level": str(a.level),
                 "name_zh": a.name_zh})
            return a

        return _area_out(await storage.run(program))

    @app.get("/api/areas/{area_id}/summary", response_model=SummaryOut, responses=_PROBLEMS,
             tags=["areas"])
    async def summary(request: Request, area_id: IdPath,
                      p: Reader) -> SummaryOut:
        await check_area(storage_of(request), p, area_id)
        s = await alarms.area_summary(storage_of(request), area_id)
        return SummaryOut(
            area=_area_out(s.area), active=s.active, unacknowledged=s.unacknowledged,
            by_severity={str(k): v for k, v in s.by_severity.items()},
            children=[AreaCountOut(area_id=c.area_id, code=c.code, name_zh=c.name_zh,
                                   level=c.level, active=c.active,
                                   by_severity={str(k): v for k, v in c.by_severity.items()},
                                   unacknowledged=c.unacknowledged) for c in s.children])

    @app.put("/api/gateways/{gw}/area", response_model=GatewayAreaOut, responses=_PROBLEMS,
             tags=["areas"])
    async def place_gateway(request: Request, gw: str, body: GatewayAreaIn,
                            p: Admin) -> GatewayAreaOut:
        """Put a gateway at a site (it may not have reported yet); both the site and where
        the gateway stood before must lie in the admin's area."""
        storage = storage_of(request)
        await check_area(storage, p, body.area_id)
        before = await storage.run(lambda: gateway_path_program(gw), write=False)
        if before is not None and not p.sees(before):
            raise OutOfScopeError.of(p.name, "gateway", gw)
        now = now_ms()
        site = await run_audited(request, p.name, "gateway.placed", f"gateway:{gw}",
                                 lambda: areas.assign_program(gw, body.area_id, now),
                                 lambda site: {"area": site.code, "area_id": site.id})
        return GatewayAreaOut(gw=gw, area=_area_out(site))


def _install_alarm_routes(app: FastAPI) -> None:
    @app.get("/api/alarms", response_model=list[AlarmOut], tags=["alarms"],
             responses={**_PROBLEMS, 200: {"headers": NEXT_HEADERS}})
    async def list_alarms(
        request: Request, response: Response, p: Reader,
        area: Annotated[int | None, Query(ge=1, le=ID_MAX,
                                          description="this area and all under it")] = None,
        state: Annotated[AlarmStatus | Literal["all"] | None, Query(
            description="active, cleared, or all (the same as leaving it out)")] = None,
        ack: Annotated[AckState | None, Query()] = None,
        gw: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=alarms.MAX_LIMIT)] = 200,
        from_: Annotated[str | None, Query(alias="from", description=(
            f"raised at or after this; {TIME_DOC}"))] = None,
        to: Annotated[str | None, Query(description=f"raised before this; {TIME_DOC}")] = None,
        cursor: Annotated[str | None, Query(max_length=MAX_CURSOR_CHARS, description=(
            "the `X-Next-Cursor` of the previous page, to continue it"))] = None,
    ) -> list[AlarmOut]:
        """Active first, then by severity, newest first. When more alarms follow, the
        `X-Next-Cursor` header (and `Link: <…>; rel="next"`) hold the cursor of the next page:
        ask again with the same filters and `&cursor=<it>`; alarms raised meanwhile do not
        shift the pages (an alarm whose state or severity changes meanwhile moves in the order).

        Example: `?area=2&state=all&from=2026-12-07T08:00:00&to=2026-12-07T20:00:00`."""
        storage = storage_of(request)
        if area is not None:
            await check_area(storage, p, area)
        elif p.user.area_id is not None:
            area = p.user.area_id  # a scoped user's list starts at their area
        after = alarm_cursor(cursor) if cursor else None
        from_ms, to_ms = time_range(from_, to)
        rows = await alarms.list_alarms(storage, area_id=area, limit=limit + 1, gw=gw, ack=ack,
                                        state=None if state == "all" else state, after=after,
                                        from_ms=from_ms, to_ms=to_ms)
        if len(rows) > limit:
            rows = rows[:limit]
            set_next(request, response, next_alarm_cursor(rows[-1]))
        visible = await gateway_scope(storage, p)
        return [_alarm_out(a) for a in rows if visible(a.gw)]

    @app.get("/api/alarms/{alarm_id}", response_model=AlarmDetail, responses=_PROBLEMS,
             tags=["alarms"])
    async def get_alarm(request: Request, alarm_id: IdPath,
                        p: Reader) -> AlarmDetail:
        storage = storage_of(request)
        a = await _acting_on(request, p, alarm_id)
        history = await alarms.alarm_history(storage, alarm_id)
        return AlarmDetail(**alarm_fields(a), history=list(history))

    @app.post("/api/alarms/{alarm_id}/ack", response_model=AlarmOut, responses=_PROBLEMS,
              tags=["alarms"])
    async def ack(request: Request, alarm_id: IdPath, body: ActionIn, p: Operator) -> AlarmOut:
        """Acknowledge (确认) as the logged-in user; 409 if it is acknowledged already."""
        return await _act(request, p, alarm_id, "ack", body.comment, alarms.ack_program)

    @app.post("/api/alarms/{alarm_id}/clear", response_model=AlarmOut, responses=_PROBLEMS,
              tags=["alarms"])
    async def clear(request: Request, alarm_id: IdPath, body: ActionIn,
                    p: Operator) -> AlarmOut:
        """Clear by hand (清除), also while the edge still reports the condition (recorded)."""
        return await _act(request, p, alarm_id, "clear", body.comment, alarms.clear_program)

    @app.post("/api/alarms/{alarm_id}/comment", response_model=AlarmOut, responses=_PROBLEMS,
              tags=["alarms"])
    async def comment(request: Request, alarm_id: IdPath, body: CommentIn,
                      p: Operator) -> AlarmOut:
        """Add a comment (备注) to the alarm's history, in any state."""
        return await _act(request, p, alarm_id, "comment", body.comment, alarms.comment_program)
