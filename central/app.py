"""Central's HTTP API and console (DESIGN.md §1): `create_app(settings)` builds the server.

The lifespan opens storage and runs the MQTT ingest task; both live on `app.state`. Errors are
problem JSON (RFC 9457): 404 for an unknown gateway, device or point, 422 for bad parameters.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import structlog
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from central import tasks
from central import __version__
from central.alarms.rules import start_alarm_rules  # alarms wiring (§7)
from central.alarms.api import install as install_alarm_api  # alarms wiring (§7)
from central.callresp.api import install as install_callresp  # 叫应 wiring (§7)
from central.web.bounds import TIME_MAX_MS, TIME_MIN_MS
from central.commands.dispatch import start_commands
from central.commands.api import install as install_command_api
from central.console.api import install as install_console_api  # duty console (issue 12)
from central import CentralError
from central.identity.enrolment_api import install as install_enrolment_api  # identity (§8)
from central.identity.enrolment_api import identity_audit, start_identity  # identity (§8)
from central.storage.history import keep_days, start_history
from central.identity.accounts import Accounts
from central.identity.audit import AuditLog
from central.identity.authz import (
    AuthCounters,
    AuthMiddleware,
    Reader,
    check_gateway,
    gateway_scope,
)
from central.identity.sessions import LoginThrottle
from central.web.docs import install as install_docs
from central.identity.api import install as install_identity_api
from central.ingest.subscriber import Ingest
from central.health.metrics import Metrics
from central.narrowband.receiver import NarrowbandReceiver
from central.settings import Settings
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
from central.storage.aggregates import Resolution, choose_resolution, coarser

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
PROBLEM = "application/problem+json"
DAY_MS = 86_400_000


class TimeParamError(CentralError):
    def __init__(self, name: str, value: str) -> None:
        super().__init__(f"{name}={value[:64]!r}: expected epoch milliseconds or ISO-8601"
                         f" within {TIME_MIN_MS}..{TIME_MAX_MS}")
        self.name = name
        self.value = value


# --- response models --------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(_Out):
    status: str
    db: bool
    mqtt_connected: bool
    version: str


class GatewayOut(_Out):
    gw: str
    online: bool  # effective: its state says online AND it was heard within offline_after_s
    state_online: bool
    stream: str | None
    boot_id: str | None
    version: str | None
    bearer: str | None
    backlog: int | None
    last_seen_ms: int | None
    state_ts_ms: int | None
    # delivery, summed over the gateway's streams (detail: /api/gateways/{gw}/delivery)
    held: int = 0  # records central holds (ever received; retention does not lower it)
    missing: int = 0  # seqs up to the highest received that central does not hold
    reported_lost: int = 0  # of the missing, those the edge reported evicted


class StreamDeliveryOut(_Out):
    stream: str
    current: bool
    held: int
    max_seq: int
    missing: int
    gaps: list[tuple[int, int]]  # the first 100 missing [first, last] ranges
    gap_count: int
    reported_lost: int
    pending: int  # missing and not reported lost: not arrived yet (or lost silently)
    lost_records_reported: int
    lost_ranges: list[tuple[int, int]]
    first_ms: int | None
    last_ms: int | None


class DeliveryOut(_Out):
    gw: str
    stream: str | None
    last_seen_ms: int | None
    backlog: int | None  # as the gateway's last state reported it
    streams: list[StreamDeliveryOut]


class LatestOut(_Out):
    ts_ms: int
    value: float | None
    text: str | None


class PointOut(_Out):
    ref: str
    device: str
    point: str
    name_zh: str
    unit: str
    latest: LatestOut | None


class DeviceOut(_Out):
    ref: str
    device: str
    profile: str
    points: list[PointOut]


class GatewayDetail(GatewayOut):
    devices: list[DeviceOut]


class SampleOut(_Out):
    ts_ms: int
    value: float | None
    text: str | None
    flags: int


class BucketOut(_Out):
    ts_ms: int  # bucket start
    value: float  # average
    min: float
    max: float
    count: int


class SeriesOut(_Out):
    point: str
    from_ms: int
    to_ms: int
    resolution: Literal["raw", "1m", "1h"]
    limit: int
    truncated: bool  # more samples exist in the window: ask again from the last ts + 1
    samples: list[SampleOut] | list[BucketOut]


class Problem(_Out):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, object]] | None = None


# --- helpers ----------------------------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_time(name: str, value: str | None, default: int) -> int:
    """Epoch milliseconds or ISO-8601 (naive means UTC) → epoch milliseconds."""
    if value is None or value == "":
        return default
    v = value.strip()
    if v.lstrip("-").isdigit():
        # Bounded before int(): a database BIGINT, and int() of 4,300+ digits raises.
        ms = int(v) if len(v) <= 20 else None
        if ms is None or not TIME_MIN_MS <= ms <= TIME_MAX_MS:
            raise TimeParamError(name, value)
        return ms
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise TimeParamError(name, value) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


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


# --- the app ----------------------------------------------------------------------------------


def create_app(settings: Settings, *, run_ingest: bool = True) -> FastAPI:
    """Build central's FastAPI app; `run_ingest=False` serves the API without MQTT."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = open_storage(settings.db_url)
        metrics = Metrics()
        await storage.open()
        ingest = Ingest(settings, storage, metrics)
        app.state.settings = settings
        app.state.storage = storage
        app.state.metrics = metrics
        app.state.ingest = ingest
        # --- identity wiring (DESIGN.md §8): the audit log, users and sessions.
        audit = AuditLog(storage)
        app.state.audit = audit
        app.state.accounts = Accounts(
            storage, audit, counters=counters, idle_s=settings.session_idle_s,
            throttle=LoginThrottle(max_failures=settings.login_max_failures,
                                   window_s=settings.login_window_s))
        # --- commands wiring (DESIGN.md §6): signing key, command tables, dispatcher task.
        app.state.commands = await start_commands(settings, storage, audit=audit,
                                                  dispatch=run_ingest)
        ingest.command_hooks = app.state.commands.service
        # --- identity wiring (DESIGN.md §8): the gateway CA, enrolment, CRL, audited.
        try:
            app.state.identity = await start_identity(
                settings, app.state.commands.service.public_key_b64,
                audit=identity_audit(audit))
        except BaseException:  # e.g. a CA key others may read: central refuses to start
            await app.state.commands.stop()
            await storage.close()
            raise
        # --- alarms wiring (DESIGN.md §7): alarm policy on storage, central's rules task.
        app.state.alarm_rules = start_alarm_rules(settings, storage, run=run_ingest)
        # --- history: time policy on storage, aggregate flush and retention task.
        app.state.history = start_history(settings, storage, metrics, run=run_ingest)
        task = (tasks.start("ingest.mqtt", ingest.run) if run_ingest
                else None)
        app.state.ingest_task = task
        # --- narrowband wiring (DESIGN.md §5): central's own BeiDou terminal or PDT radio.
        receiver = (NarrowbandReceiver(settings, storage, metrics)
                    if settings.narrowband_port is not None else None)
        app.state.narrowband = receiver
        nb_task = (tasks.start(f"narrowband.{settings.narrowband_bearer}", receiver.run)
                   if receiver else None)
        log.info("central_started", version=__version__, db=safe_db_url(settings.db_url),
                 http_port=settings.http_port, ingest=run_ingest)
        try:
            yield
        finally:
            await tasks.stop(nb_task)  # narrowband wiring (§5)
            await tasks.stop(task)
            await app.state.commands.stop()  # commands wiring (§6)
            await app.state.identity.stop()  # identity wiring (§8)
            await app.state.alarm_rules.stop()  # alarms wiring (§7)
            await app.state.history.stop()
            await storage.close()
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

    def storage_of(request: Request) -> Storage:
        return request.app.state.storage  # type: ignore[no-any-return]

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return _problem(404, f"Unknown {exc.kind}", str(exc))

    @app.exception_handler(BadRefError)
    async def bad_ref(_: Request, exc: BadRefError) -> JSONResponse:
        return _problem(422, "Bad reference", str(exc))

    @app.exception_handler(TimeParamError)
    async def bad_time(_: Request, exc: TimeParamError) -> JSONResponse:
        return _problem(422, "Bad time parameter", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))}
                  for e in exc.errors()]
        return _problem(422, "Invalid request", "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors), errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, "HTTP error", str(exc.detail))

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
        now = _now_ms()
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
        base = _gateway_out(g, settings.offline_after_s, _now_ms(), delivery.get(gw))
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
                                           description="epoch ms or ISO-8601")] = None,
        to: Annotated[str | None, Query(description="epoch ms or ISO-8601; default now")] = None,
        resolution: Annotated[Literal["auto", "raw", "1m", "1h"], Query(
            description="auto: raw up to 6 h, 1m up to 7 days, 1h beyond")] = "auto",
        limit: Annotated[int | None, Query(ge=1, le=100_000, description="default 1000 raw "
                                           "samples, 10080 buckets")] = None,
    ) -> SeriesOut:
        now = _now_ms()
        to_ms = parse_time("to", to, now)
        from_ms = parse_time("from", from_, to_ms - DAY_MS)
        if from_ms > to_ms:
            raise TimeParamError("from", f"{from_} (after to)")
        await check_gateway(storage_of(request), p, point.split(":", 1)[0])
        res: Resolution = (choose_resolution(from_ms, to_ms) if resolution == "auto"
                           else resolution)
        storage = storage_of(request)
        while True:
            if res == "raw":
                n = limit or 1000
                rows = await storage.series(point, from_ms, to_ms, n + 1)
                samples: list[SampleOut] | list[BucketOut] = [
                    SampleOut(ts_ms=s.ts_ms, value=s.value, text=s.text, flags=s.flags)
                    for s in rows[:n]]
            else:
                n = limit or 10_080  # a week of minutes
                buckets = await storage.buckets(point, res, from_ms, to_ms, n + 1)
                rows = buckets  # type: ignore[assignment]
                samples = [BucketOut(ts_ms=b.ts_ms, value=b.avg, min=b.min, max=b.max,
                                     count=b.count) for b in buckets[:n]]
            # auto, and retention has purged this window at this resolution: go coarser.
            nxt = (coarser(res, from_ms, now, keep_days(settings))
                   if resolution == "auto" and not rows else None)
            if nxt is None:
                break
            res = nxt
        return SeriesOut(point=point, from_ms=from_ms, to_ms=to_ms, resolution=res, limit=n,
                         truncated=len(rows) > n, samples=samples)

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
    install_alarm_api(app)  # alarms wiring (§7)
    install_callresp(app)  # 叫应 wiring (§7): routes, and the service in the lifespan
    install_console_api(app)  # duty console: overview, desk, live events, positions
    _document_bearer(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
