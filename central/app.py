"""Central's HTTP API and console (DESIGN.md §1): `create_app(settings)` builds the server.

The lifespan opens storage and starts central's parts on one `AsyncExitStack` (`_start`); they
live on `app.state`. Errors are problem JSON (RFC 9457): 404 for an unknown gateway, device or
point, 422 for bad parameters. The response bodies are `central.web.models`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Literal

import structlog
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from central import DuplicateError, __version__
from central.alarms.api import install as install_alarm_api  # alarms wiring (§7)
from central.alarms.engine import policy_from  # alarms wiring (§7)
from central.alarms.rules import start_alarm_rules  # alarms wiring (§7)
from central.callresp.api import install as install_callresp  # 叫应 wiring (§7)
from central.callresp.service import CallRespService, running  # 叫应 wiring (§7)
from central.commands.api import install as install_command_api
from central.commands.dispatch import start_commands
from central.config.settings import Settings
from central.console.api import install as install_console_api  # duty console (issue 12)
from central.health.metrics import Metrics
from central.identity.accounts import Accounts
from central.identity.api import install as install_identity_api
from central.identity.audit import AuditLog
from central.identity.authz import (
    AuthCounters,
    AuthMiddleware,
    Reader,
    check_gateway,
    gateway_scope,
)
from central.identity.enrolment_api import identity_audit, start_identity  # identity (§8)
from central.identity.enrolment_api import install as install_enrolment_api  # identity (§8)
from central.identity.retire import RetiredGate  # retiring gateways
from central.identity.retire_api import install as install_retire_api  # retiring gateways
from central.identity.sessions import LoginThrottle
from central.ingest.subscriber import Ingest
from central.narrowband.downlink import RadioRoute
from central.narrowband.receiver import NarrowbandReceiver
from central.storage import (
    BadRefError,
    DeliverySummary,
    Gateway,
    NotFoundError,
    Point,
    Storage,
    open_storage,
    safe_db_url,
)
from central.storage.history import keep_days, start_history, time_policy_from
from central.web.cursor import MAX_CURSOR_CHARS, CursorError
from central.web.docs import install as install_docs
from central.web.models import (
    DeliveryOut,
    DeviceOut,
    GatewayDetail,
    GatewayOut,
    Health,
    LatestOut,
    PointOut,
    Problem,
    SeriesOut,
    StreamDeliveryOut,
)
from central.web.problems import PROBLEM, error_problem
from central.web.series import series_page
from central.web.times import TIME_DOC, TimeParamError, parse_time
from runtime import clock, tasks

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
DAY_MS = 86_400_000


# --- helpers ----------------------------------------------------------------------------------


def _gateway_out(g: Gateway, offline_after_s: float, now_ms: int,
                 d: DeliverySummary | None) -> GatewayOut:
    heard = g.last_seen_ms if g.last_seen_ms is not None else g.state_ts_ms
    fresh = heard is not None and now_ms - heard <= offline_after_s * 1000
    return GatewayOut(gw=g.gw, online=g.online and fresh, state_online=g.online, stream=g.stream,
                      boot_id=g.boot_id, version=g.version, bearer=g.bearer, backlog=g.backlog,
                      last_seen_ms=g.last_seen_ms, state_ts_ms=g.state_ts_ms,
                      held=d.held if d else 0, missing=d.missing if d else 0,
                      reported_lost=d.reported_lost if d else 0)


def _point_out(p: Point) -> PointOut:
    latest = None if p.latest is None else LatestOut(ts_ms=p.latest.ts_ms, value=p.latest.value,
                                                     text=p.latest.text)
    return PointOut(ref=p.ref, device=p.device, point=p.point, name_zh=p.name_zh, unit=p.unit,
                    latest=latest)


def _problem(status: int, title: str, detail: str,
             errors: list[dict[str, object]] | None = None) -> JSONResponse:
    body = Problem(title=title, status=status, detail=detail, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM)


def _document_bearer(app: FastAPI) -> None:
    """Say in the OpenAPI description that every operation but the public ones needs a
    bearer token (the middleware enforces it; this lets /docs and clients send one)."""
    from fastapi.openapi.utils import get_openapi

    from central.identity.authz import is_public

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    op["security"] = [] if is_public(path) else [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- the lifespan -----------------------------------------------------------------------------


async def _start(app: FastAPI, stack: contextlib.AsyncExitStack, settings: Settings,
                 counters: AuthCounters, run: bool) -> None:
    """Open and start central's parts in the order they need each other, each entered on
    `stack` the moment it exists: a failure half-way closes what was opened and stops what
    was started (STYLE.md §13). Each part gets its collaborators in its constructor."""
    s = app.state
    s.settings, s.metrics = settings, Metrics()
    s.storage = storage = await stack.enter_async_context(open_storage(
        settings.db_url, alarm_policy=policy_from(settings),  # alarms wiring (§7)
        time_policy=time_policy_from(settings),
        latest_interval_s=settings.pg_latest_interval_s))
    # --- identity wiring (DESIGN.md §8): the audit log, users and sessions.
    s.audit = audit = AuditLog(storage)
    s.accounts = Accounts(storage, audit, counters=counters, idle_s=settings.session_idle_s,
                          throttle=LoginThrottle(max_failures=settings.login_max_failures,
                                                 window_s=settings.login_window_s))
    # --- narrowband downlink (§5): warnings to gateways off IP, by central's own radio.
    s.radio_route = (RadioRoute.from_settings(settings)
                     if settings.narrowband_port is not None else None)
    # --- commands wiring (DESIGN.md §6): signing key, command tables, dispatcher task.
    s.commands = await start_commands(settings, storage, audit=audit, dispatch=run,
                                      radio=s.radio_route)
    stack.push_async_callback(s.commands.stop)
    # --- identity wiring (DESIGN.md §8): the gateway CA, enrolment, CRL, audited. Raises
    # e.g. for a CA key others may read: central refuses to start.
    s.identity = await start_identity(settings, s.commands.service.public_key_b64,
                                      audit=identity_audit(audit))
    stack.push_async_callback(s.identity.stop)
    # --- alarms wiring (DESIGN.md §7): central's rules task.
    s.alarm_rules = start_alarm_rules(settings, storage, run=run)
    stack.push_async_callback(s.alarm_rules.stop)
    # --- history: aggregate flush and retention task.
    s.history = start_history(settings, storage, s.metrics, run=run)
    stack.push_async_callback(s.history.stop)
    # --- the retired gateways, one cached list for 叫应, ingest and the radio: a retired
    # gateway's messages are refused and counted (the counts written at shutdown too).
    s.retired = RetiredGate(storage, metrics=s.metrics)
    stack.push_async_callback(s.retired.flush)
    # --- 叫应 wiring (DESIGN.md §7): the service and its scheduler.
    s.callresp = await stack.enter_async_context(running(CallRespService(
        settings.callresp, storage, audit, s.commands.service, retired=s.retired,
        postgres=not settings.db_url.startswith("sqlite")), run=run))
    # --- MQTT ingest: command results and 叫应 receipts are applied after each commit.
    s.ingest = Ingest(settings, storage, s.metrics, command_hooks=s.commands.service,
                      batch_hooks=(s.callresp,), gate=s.retired)
    s.ingest_task = _start_task(stack, "ingest.mqtt", s.ingest.run) if run else None
    # --- narrowband wiring (DESIGN.md §5): central's own BeiDou terminal or PDT radio.
    s.narrowband = (NarrowbandReceiver(settings, storage, s.metrics, route=s.radio_route,
                                       batch_hooks=(s.callresp,), retired=s.retired)
                    if settings.narrowband_port is not None else None)
    if s.narrowband is not None:
        _start_task(stack, f"narrowband.{settings.narrowband_bearer}", s.narrowband.run)


def _start_task(stack: contextlib.AsyncExitStack, name: str,
                run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    task = tasks.start(name, run)
    stack.push_async_callback(tasks.stop, task)
    return task


def _install_problems(app: FastAPI) -> None:
    """Errors as problem JSON (RFC 9457)."""

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return error_problem(404, f"Unknown {exc.kind}", exc)

    @app.exception_handler(DuplicateError)
    async def duplicate(_: Request, exc: DuplicateError) -> JSONResponse:
        return error_problem(409, f"Duplicate {exc.kind}", exc)

    @app.exception_handler(BadRefError)
    async def bad_ref(_: Request, exc: BadRefError) -> JSONResponse:
        return error_problem(422, "Bad reference", exc)

    @app.exception_handler(CursorError)
    async def bad_cursor(_: Request, exc: CursorError) -> JSONResponse:
        return error_problem(422, "Bad cursor", exc)

    @app.exception_handler(TimeParamError)
    async def bad_time(_: Request, exc: TimeParamError) -> JSONResponse:
        return error_problem(422, "Bad time parameter", exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        raw = exc.errors()
        errors: list[dict[str, object]] = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in raw]
        return _problem(422, "Invalid request", "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in raw),
            errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, "HTTP error", str(exc.detail))


# --- the app ----------------------------------------------------------------------------------


def create_app(settings: Settings, *, run_ingest: bool = True) -> FastAPI:
    """Build central's FastAPI app; `run_ingest=False` serves the API without MQTT."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await _start(app, stack, settings, counters, run_ingest)
            log.info("central_started", version=__version__, db=safe_db_url(settings.db_url),
                     http_port=settings.http_port, ingest=run_ingest)
            yield
        log.info("central_stopped")

    # /docs and /redoc come from local files (central.web.docs): duty networks are often
    # cut off from the internet (§8).
    app = FastAPI(title="Fieldlink central", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Gateways, devices, latest values and series (DESIGN.md §4). Log "
                              "in with `POST /api/login` and send the token as "
                              "`Authorization: Bearer …` (§8).")
    counters = AuthCounters()
    app.state.auth_counters = counters
    app.add_middleware(AuthMiddleware, idle_s=lambda: settings.session_idle_s, counters=counters)
    _install_problems(app)

    def storage_of(request: Request) -> Storage:
        return request.app.state.storage

    problems: dict[int | str, dict[str, object]] = {
        404: {"model": Problem, "description": "Unknown gateway, device or point"},
        422: {"model": Problem, "description": "Bad parameter"}}

    @app.get("/api/health", response_model=Health, tags=["ops"],
             responses={503: {"model": Health, "description": "degraded: database or ingest"}})
    async def health(request: Request) -> JSONResponse:
        """503 with the same body when the database or, if this process ingests, MQTT is
        down: a load balancer and the console both read the status code."""
        db_ok = await storage_of(request).ping()
        mqtt = request.app.state.ingest.connected
        ingest_ok = mqtt or request.app.state.ingest_task is None
        body = Health(status="ok" if db_ok and ingest_ok else "degraded", db=db_ok,
                      mqtt_connected=mqtt, version=__version__)
        return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)

    @app.get("/api/gateways", response_model=list[GatewayOut], tags=["gateways"])
    async def gateways(request: Request, p: Reader) -> list[GatewayOut]:
        """The gateways within the user's area."""
        now = clock.now_ms()
        storage = storage_of(request)
        visible = await gateway_scope(storage, p)
        delivery = await storage.delivery_summary()
        return [_gateway_out(g, settings.offline_after_s, now, delivery.get(g.gw))
                for g in await storage.list_gateways() if visible(g.gw)]

    @app.get("/api/gateways/{gw}", response_model=GatewayDetail, responses=problems,
             tags=["gateways"])
    async def gateway(request: Request, gw: str, p: Reader) -> GatewayDetail:
        storage = storage_of(request)
        await check_gateway(storage, p, gw)
        g = await storage.get_gateway(gw)
        devices = await storage.list_devices(gw)
        points = await storage.latest_values(gw)
        by_device: dict[str, list[PointOut]] = {}
        for pt in points:
            by_device.setdefault(pt.device, []).append(_point_out(pt))
        delivery = await storage.delivery_summary(gw)
        base = _gateway_out(g, settings.offline_after_s, clock.now_ms(), delivery.get(gw))
        return GatewayDetail(**base.model_dump(), devices=[
            DeviceOut(ref=d.ref, device=d.device, profile=d.profile,
                      points=by_device.get(d.device, [])) for d in devices])

    @app.get("/api/devices/{device}/points", response_model=list[PointOut], responses=problems,
             tags=["devices"])
    async def device_points(request: Request, device: str,
                            p: Reader) -> list[PointOut]:
        await check_gateway(storage_of(request), p, device.split(":", 1)[0])
        return [_point_out(p) for p in await storage_of(request).device_points(device)]

    @app.get("/api/gateways/{gw}/delivery", response_model=DeliveryOut, responses=problems,
             tags=["gateways"])
    async def delivery(request: Request, gw: str, p: Reader) -> DeliveryOut:
        """What central holds of each of the gateway's streams and what it knows is missing:
        gaps, split into reported lost (the edge's outbox evicted them) and pending."""
        await check_gateway(storage_of(request), p, gw)
        d = await storage_of(request).delivery(gw)
        return DeliveryOut(gw=d.gw, stream=d.stream, last_seen_ms=d.last_seen_ms,
                           backlog=d.backlog, streams=[
                               StreamDeliveryOut(**{f: getattr(s, f) for f in
                                                    StreamDeliveryOut.model_fields})
                               for s in d.streams])

    @app.get("/api/points/{point:path}/series", response_model=SeriesOut, responses=problems,
             tags=["points"])
    async def series(
        request: Request, point: str, p: Reader,
        from_: Annotated[str | None, Query(alias="from",
                                           description=f"{TIME_DOC}; default to - 24 h")] = None,
        to: Annotated[str | None, Query(description=f"{TIME_DOC}; default now")] = None,
        resolution: Annotated[Literal["auto", "raw", "1m", "1h"], Query(
            description="auto: raw up to 6 h, 1m up to 7 days, 1h beyond")] = "auto",
        limit: Annotated[int | None, Query(ge=1, le=100_000, description="default 1000 raw "
                                           "samples, 10080 buckets")] = None,
        cursor: Annotated[str | None, Query(max_length=MAX_CURSOR_CHARS, description=(
            "the `next` of the previous page, to continue it"))] = None,
    ) -> SeriesOut:
        """Example: `?from=2026-12-07T08:00:00&to=2026-12-07T09:00:00` (Asia/Shanghai); while
        `next` is set, ask again with `&cursor=<next>` for the rest of the window."""
        now = clock.now_ms()
        to_ms = parse_time("to", to, now)
        from_ms = parse_time("from", from_, to_ms - DAY_MS)
        if from_ms > to_ms:
            raise TimeParamError("from", f"{from_} (after to)")
        await check_gateway(storage_of(request), p, point.split(":", 1)[0])
        return await series_page(storage_of(request), point, from_ms, to_ms, resolution, limit,
                                 cursor, now=now, keep=keep_days(settings))

    @app.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
    async def metrics(request: Request, _: Reader) -> PlainTextResponse:
        await request.app.state.metrics.refresh(request.app.state.storage)  # per-gateway lag
        text = (request.app.state.metrics.render() + counters.render()
                + request.app.state.identity.render_metrics())  # identity (§8)
        return PlainTextResponse(text,
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    install_identity_api(app, settings, STATIC)  # identity wiring (§8)
    install_docs(app)  # offline /docs and /redoc (§8)
    install_command_api(app)  # commands wiring (§6)
    install_enrolment_api(app)  # identity wiring (§8): reachable without a login
    install_retire_api(app)  # retiring (decommissioning) gateways, admin only
    install_alarm_api(app)  # alarms wiring (§7)
    install_callresp(app)  # 叫应 wiring (§7): routes (the service is started in `_start`)
    install_console_api(app)  # duty console: overview, desk, live events, positions
    _document_bearer(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
