"""The duty console's read endpoints and live feed (issue 12), and positions for the map.

- `GET /api/console/overview`: the 一张图 map's data in one request (`central.console.geo`).
- `GET /api/console/desk`: the alarm desk — every alarm still active or not yet
  acknowledged (a level-2 alarm that clears before anyone looks stays), each with the point's
  current value beside the value at raise time.
- `GET /api/console/board`: the 叫应 board (`central.console.board`).
- `GET /api/console/events`: server-sent events behind the same login as everything else:
  `overview`, `desk` and `board` carry the new state whenever it changed, `ping` every few
  seconds so the page can tell a dead link from a quiet one. With `gw`, also `commands`: that
  gateway's newest commands, the list `GET /api/commands?gw=…&limit=10` returns for this user
  (the same query), so an approval or a gateway's result shows at once, and as soon as the
  stream opens. One producer per view (the user's area and the chosen area) checks the
  database every 0.5 s and fans out to all its clients (`central.console.live`); for the
  command lists it reads one change marker for all the gateways on screen
  (`CommandStore.changes`) and lists a gateway's commands again only when it moved. The
  browser never polls per gateway. While the list cannot be read (the command store down),
  `commands` comes as `{now_ms, gw, error: {type, title}}` instead (`central.console.live`),
  and as the list again once a read works.
- Every read takes `area`: the map, its counts, the desk and the board of that area only.
- `PUT /api/gateways/{gw}/position`, `PUT /api/areas/{id}/position` (admins, audited).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from central.commands.api import CommandOut, command_changes, visible_commands
from central.console import geo
from central.console.board import BoardOut, build_board
from central.console.live import Broadcaster
from central.console.views import (
    DeskOut,
    OverviewOut,
    PositionIn,
    PositionOut,
    View,
    build_desk,
    build_overview,
)
from central.identity.authz import (
    Admin,
    OutOfScopeError,
    Principal,
    Reader,
    check_area,
    gateway_path_program,
)
from central.storage.program import Program
from central.web.bounds import ID_MAX, IdPath
from central.web.routing import StrictModel, run_audited, storage_of
from runtime.clock import now_ms

# Module level, so the routes' string annotations resolve.
AreaQuery = Annotated[int | None, Query(ge=1, le=ID_MAX, description="this area and all under it")]
CHECK_S = 0.5  # how often each view's feed looks for changes (one feed per view, not client)
PING_S = 5.0  # the page calls central unreachable after 3 missed pings
REFRESH_S = 15.0  # an unchanged overview or desk is sent again this often (fresh ages)
COMMANDS_SHOWN = 10  # the gateway page's command list (console-commands.js shows as many)
GwQuery = Annotated[str | None, Query(min_length=1, max_length=64,
                                      description="also this gateway's commands")]


class GatewayCommandsOut(StrictModel):
    """The `commands` event: whose list it is (a page that moved on ignores it), newest first,
    and central's clock when it was built (the page reckons ages from it, not its own)."""

    now_ms: int
    gw: str
    commands: list[CommandOut]


async def build_commands(app: FastAPI, view: View, gw: str) -> GatewayCommandsOut:
    """`gw`'s newest commands as `GET /api/commands` lists them for a user of this view: the
    scope is the user's area alone (the area chosen on the page does not hide a command of the
    gateway on screen), and a gateway outside it has none."""
    sees = None if view.user_area_path is None else view.sees
    commands = await visible_commands(app, sees, gw=gw, limit=COMMANDS_SHOWN)
    return GatewayCommandsOut(now_ms=now_ms(), gw=gw, commands=commands)


async def commands_marks(app: FastAPI, view: View,
                         gws: Sequence[str]) -> Mapping[str, Hashable]:
    """What `build_commands` depends on for each of `gws`, in one query: its commands' change
    counter, and its listed area path for a user scoped to an area (a city-wide user sees
    every gateway's commands, wherever it stands)."""
    changes = await command_changes(app, gws)
    if view.user_area_path is None:
        return {gw: c.count for gw, c in changes.items()}
    return changes


async def _set_position(request: Request, p: Principal, action: str, target: str,
                        body: PositionIn,
                        step: Callable[[geo.Position], Program[None]]) -> PositionOut:
    """Run `step` at the body's position with its audit row; the position as stored."""
    pos = geo.Position(body.lat, body.lon)
    await run_audited(request, p.name, action, target, lambda: step(pos),
                      lambda _: {"lat": body.lat, "lon": body.lon})
    return PositionOut(lat=body.lat, lon=body.lon)


async def _view(request: Request, p: Principal, area: int | None) -> View:
    """The user's view of `area` (403 if it lies outside their own)."""
    if area is not None:
        await check_area(storage_of(request), p, area)
    return View.of(p, area)


def _broadcaster(app: FastAPI) -> Broadcaster:
    return app.state.console_live


def install(app: FastAPI) -> None:
    """Add the console's routes to `app`."""

    app.state.console_live = Broadcaster(
        (("overview", lambda v: build_overview(app, v)), ("desk", lambda v: build_desk(app, v)),
         ("board", lambda v: build_board(app, v))),
        gateway_builders=(("commands", lambda v, gw: build_commands(app, v, gw)),),
        gateway_marks=lambda v, gws: commands_marks(app, v, gws),
        check_s=CHECK_S, ping_s=PING_S, refresh_s=REFRESH_S)

    @app.get("/api/console/overview", response_model=OverviewOut, tags=["console"])
    async def overview(request: Request, p: Reader, area: AreaQuery = None) -> OverviewOut:
        """Every gateway the user may see (in `area`, if given) with its map state and
        position, each district's worst active alarm, 叫应 terminals, and the counts by state."""
        return await build_overview(request.app, await _view(request, p, area))

    @app.get("/api/console/desk", response_model=DeskOut, tags=["console"])
    async def desk(request: Request, p: Reader, area: AreaQuery = None) -> DeskOut:
        """Active alarms and cleared ones not yet acknowledged, active first, then
        unacknowledged, by severity, newest first; each with the point's current value."""
        return await build_desk(request.app, await _view(request, p, area))

    @app.get("/api/console/board", response_model=BoardOut, tags=["console"])
    async def board(request: Request, p: Reader, area: AreaQuery = None) -> BoardOut:
        """The 叫应 board: open warnings of the last day (and those closed within the hour),
        each target's state, re-sends, escalations and current deadline."""
        return await build_board(request.app, await _view(request, p, area))

    @app.get("/api/console/events", tags=["console"],
             response_class=StreamingResponse)
    async def events(request: Request, p: Reader, area: AreaQuery = None,
                     gw: GwQuery = None) -> StreamingResponse:
        """Server-sent events: `overview`, `desk` and `board` (the same bodies as the
        endpoints above) whenever they changed, `ping` every 5 s; with `gw`, `commands`
        (`{gw, commands}`, the list of `GET /api/commands?gw=…&limit=10`) whenever it changed,
        or `{gw, error: {type, title}}` while it cannot be read (retried every check).
        One producer per view (user's area and `area`) serves every client of that view.
        Example: `curl -N -b session=… '/api/console/events?area=2&gw=gw-1'`."""
        view = await _view(request, p, area)
        live = _broadcaster(request.app)

        async def stream() -> AsyncIterator[bytes]:
            # `app.state.stopping` (central.health.service): a stream ends when central
            # stops, or an open console would hold the stop for ever.
            stopping = getattr(request.app.state, "stopping", None) or asyncio.Event()
            stop = asyncio.ensure_future(stopping.wait())
            events: asyncio.Future[list[bytes]] | None = None
            try:
                async with live.subscribe(view, gw) as sub:
                    while not await request.is_disconnected():
                        events = asyncio.ensure_future(sub.next())
                        await asyncio.wait({events, stop}, return_when=asyncio.FIRST_COMPLETED)
                        if stop.done():
                            return
                        for chunk in events.result():
                            yield chunk
            finally:  # stopped, or the client went: what is pending stays with the subscriber
                stop.cancel()
                if events is not None:
                    events.cancel()

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
            raise OutOfScopeError.of(p.name, "gateway", gw)
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
