"""HTTP API of commands (DESIGN.md §6): issue, list, follow; and the key gateways pin.

    POST /api/commands                {gw, kind, args, ttl_s} -> 201, the stored command
    POST /api/commands/{cmd_id}/approve                       -> the approved command
    POST /api/gateways/{gw}/config    {site_toml, profiles?, ttl_s} -> 201, an apply_config
    GET  /api/commands?gw=&state=&limit=                      -> newest first
    GET  /api/commands/{cmd_id}                               -> the command and its history
    GET  /api/keys/commands                                   -> central's public key

`install(app)` adds the routes and the problem responses for command errors: 422 for a bad
kind, bad args, an unknown point, or a write the device profile refuses (not writable, value
out of range; nothing is signed); 404 for an unknown gateway (the app's handler) or command;
409 for an approval that is not possible (the issuer's own, or nothing to approve) and for a
command to a retired gateway; 503 while the command service is not running.

Issuing checks a request in one order, the caller's own mistakes first: login, role and the
body's shape (FastAPI: 401, 403, 422), the gateway's area (403), the gateway (404), the kind's
args and the device profile (422); only then the gateway's state. A retired gateway is refused
by the store, in the transaction that would insert the command (`CommandStore.insert`:
`GatewayRetiredError`, 409 `urn:fieldlink:problem:gateway-retired` with `gw`). That is the one
check: an earlier look would answer 409 to a request that is wrong anyway, and could not close
the race with a retire.

Issuing and approving need the `operate` permission, and the gateway must lie in the user's
area (403 otherwise); a write to a safety-critical point waits (`approval: "required"`) until
a different operator approves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from pydantic import Field

from central import CentralError
from central.commands.check import ConfigRefusedError, WriteRefusedError
from central.commands.dispatch import CommandRequestError, CommandService
from central.commands.store import (
    LISTED_PATHS,
    ApprovalError,
    Change,
    CommandEvent,
    CommandStoreError,
    StoredCommand,
    UnknownCommandError,
)
from central.identity.authz import Operator, Reader, check_gateway, gateway_paths_program
from central.identity.retire import GatewayRetiredError
from central.storage.program import Program, Sql
from central.web.problems import documented, install_problems
from central.web.routing import StrictModel
from protocols.command_results import CommandState
from protocols.commands import MAX_TTL_MS, CommandError, CommandKind


class CommandsUnavailableError(CentralError):
    def __init__(self) -> None:
        super().__init__("the command service is not running")


class IssueIn(StrictModel):
    gw: str = Field(min_length=1, max_length=64)
    kind: CommandKind
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: float = Field(default=3600.0, gt=0, le=MAX_TTL_MS / 1000,
                         description="seconds until the command expires if not executed")


class ConfigIn(StrictModel):
    site_toml: str = Field(min_length=1, description="the whole new site.toml")
    profiles: dict[str, str] = Field(default_factory=dict,
                                     description="device profiles to go with it: file → YAML")
    ttl_s: float = Field(default=3600.0, gt=0, le=MAX_TTL_MS / 1000)


class CommandOut(StrictModel):
    cmd_id: str
    gw: str
    kind: str
    target: str
    args: dict[str, Any]
    issued_at_ms: int | None
    expires_at_ms: int | None
    state: str
    state_source: str  # who set the state: central or gateway
    reason: str | None
    detail: str | None
    result: dict[str, Any] | None  # attrs of the gateway's report that set the state
    origin: str  # central: issued here; gateway: only known from a gateway's report
    created_ms: int
    updated_ms: int
    sent_count: int
    last_sent_ms: int | None
    issued_by: str | None
    approval: str | None  # null: not needed; required: waits for a second operator; approved
    approved_by: str | None


class CommandEventOut(StrictModel):
    ts_ms: int
    state: str
    source: str
    reason: str | None
    detail: str | None
    attrs: dict[str, Any] | None
    applied: bool  # whether this event moved the command's state
    received_ms: int


class CommandDetail(CommandOut):
    history: list[CommandEventOut]


class KeyOut(StrictModel):
    algorithm: str
    public_key: str  # base64 of the 32 raw bytes: `[commands] central_public_key`
    pem: str


def _out(c: StoredCommand) -> CommandOut:
    return CommandOut(cmd_id=c.cmd_id, gw=c.gw, kind=c.kind, target=c.target, args=dict(c.args),
                      issued_at_ms=c.issued_at_ms, expires_at_ms=c.expires_at_ms,
                      state=str(c.state), state_source=c.state_source, reason=c.reason,
                      detail=c.detail, result=dict(c.result) if c.result else None,
                      origin=c.origin, created_ms=c.created_ms, updated_ms=c.updated_ms,
                      sent_count=c.sent_count, last_sent_ms=c.last_sent_ms,
                      issued_by=c.issued_by, approval=c.approval, approved_by=c.approved_by)


def _event_out(e: CommandEvent) -> CommandEventOut:
    return CommandEventOut(ts_ms=e.ts_ms, state=e.state, source=e.source, reason=e.reason,
                           detail=e.detail, attrs=dict(e.attrs) if e.attrs else None,
                           applied=e.applied, received_ms=e.received_ms)


def _service(app: FastAPI) -> CommandService:
    runtime = getattr(app.state, "commands", None)
    if runtime is None:
        raise CommandsUnavailableError()
    return runtime.service


def _listed_path_program(gw: str) -> Program[str | None]:
    """`gw`'s area path if `list_gateways` lists it (heard of, in service); None if it is at
    no site or not listed, which a user scoped to an area sees neither way."""
    rows = yield Sql(f"{LISTED_PATHS} = ?", (gw,))
    return str(rows[0][2]) if rows else None


async def visible_commands(app: FastAPI, sees: Callable[[str | None], bool] | None, *,
                           gw: str | None = None, state: str | None = None,
                           limit: int = 100) -> list[CommandOut]:
    """Newest first, only of the gateways whose area path `sees` accepts (None: a user of the
    whole city sees every command, also of gateways central has no row for). One query for
    `GET /api/commands` and the console's live `commands` event, so the page shows the same
    list whichever brought it."""
    store = _service(app).store
    gw_in = None
    if sees is not None and gw is not None:  # one gateway (the console's feed): its path only
        path = await app.state.storage.run(lambda: _listed_path_program(gw), write=False)
        gw_in = [gw] if sees(path) else []
    elif sees is not None:
        storage = app.state.storage
        paths = await storage.run(gateway_paths_program, write=False)
        gw_in = [g.gw for g in await storage.list_gateways() if sees(paths.get(g.gw))]
    return [_out(c) for c in await store.list(gw=gw, state=state, limit=limit, gw_in=gw_in)]


async def command_changes(app: FastAPI, gws: Sequence[str]) -> dict[str, Change]:
    """What the list of each of `gws` depends on (`CommandStore.changes`), in one query."""
    return await _service(app).store.changes(gws)


def install(app: FastAPI) -> None:
    """Add the command routes and their error responses to `app`."""
    install_problems(app, {
        CommandError: (422, "Invalid command"),
        CommandRequestError: (422, "Invalid command"),
        WriteRefusedError: (422, "Write refused by the device profile"),
        ConfigRefusedError: (422, "Config refused"),
        ApprovalError: (409, "Approval not possible"),
        GatewayRetiredError: (409, "Gateway retired"),
        UnknownCommandError: (404, "Unknown command"),
        CommandStoreError: (503, "Command store unavailable"),
        CommandsUnavailableError: (503, "Commands unavailable")})

    problems: dict[int | str, dict[str, Any]] = {
        401: {"description": "Login required"}, 403: {"description": "Role or area refused"},
        404: {"description": "Unknown gateway or command"},
        422: {"description": "Invalid command"}, 503: {"description": "Commands unavailable"}}
    issuing = {**problems, **documented({409: ("Gateway retired", (GatewayRetiredError,))})}

    @app.post("/api/commands", response_model=CommandOut, status_code=201, responses=issuing,
              tags=["commands"], summary="Issue a signed command to a gateway")
    async def issue(request: Request, body: IssueIn,
                    p: Operator) -> CommandOut:
        """Stored `pending`; signed and sent when the gateway is online, until it reports
        `received`. A write to a safety-critical point first waits for a second operator.

        Example: `{"gw": "gw-1", "kind": "write_point", "args": {"device": "gas-1",
        "point": "sample_interval_s", "value": 30}, "ttl_s": 600}`.
        """
        service = _service(request.app)
        await check_gateway(request.app.state.storage, p, body.gw)
        cmd = await service.issue(body.gw, str(body.kind), body.args, body.ttl_s, user=p.name)
        return _out(cmd)

    @app.post("/api/gateways/{gw}/config", response_model=CommandOut, status_code=201,
              responses=issuing, tags=["commands"],
              summary="Send a new site config to a gateway (apply_config, with rollback)")
    async def send_config(request: Request, gw: str, body: ConfigIn, p: Operator) -> CommandOut:
        """The gateway checks it as at start-up, keeps the old one, applies it and rolls it
        back by itself unless it comes back healthy within `[commands]
        config_health_window_s`. Follow it at `/api/commands/{cmd_id}`: `succeeded` with
        `result.outcome` `applied`, `failed`/`rolled_back` or `rejected`/`config_invalid`,
        each with `result.diff`.

        Example: `{"site_toml": "[gateway]\nid = \"gw-1\"\n…", "ttl_s": 600}`.
        """
        service = _service(request.app)
        await check_gateway(request.app.state.storage, p, gw)
        args: dict[str, Any] = {"site_toml": body.site_toml}
        if body.profiles:
            args["profiles"] = body.profiles
        cmd = await service.issue(gw, str(CommandKind.APPLY_CONFIG), args, body.ttl_s,
                                  user=p.name)
        return _out(cmd)

    @app.post("/api/commands/{cmd_id}/approve", response_model=CommandOut,
              responses={**problems, 409: {"description": "Approval not possible"}},
              tags=["commands"], summary="Approve a safety-critical write (a second operator)")
    async def approve(request: Request, cmd_id: str,
                      p: Operator) -> CommandOut:
        """The operator who issued the command cannot approve it."""
        service = _service(request.app)
        cmd = await service.store.get(cmd_id)
        await check_gateway(request.app.state.storage, p, cmd.gw)
        return _out(await service.approve(cmd_id, p.name))

    @app.get("/api/commands", response_model=list[CommandOut], responses=problems,
             tags=["commands"])
    async def list_commands(
        request: Request, p: Reader,
        gw: Annotated[str | None, Query(description="only this gateway's")] = None,
        state: Annotated[CommandState | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[CommandOut]:
        return await visible_commands(request.app, None if p.user.area_path is None else p.sees,
                                      gw=gw, state=None if state is None else str(state),
                                      limit=limit)

    @app.get("/api/commands/{cmd_id}", response_model=CommandDetail, responses=problems,
             tags=["commands"])
    async def get_command(request: Request, cmd_id: str,
                          p: Reader) -> CommandDetail:
        store = _service(request.app).store
        cmd = await store.get(cmd_id)
        await check_gateway(request.app.state.storage, p, cmd.gw)
        history = await store.history(cmd_id)
        return CommandDetail(**_out(cmd).model_dump(), history=[_event_out(e) for e in history])

    @app.get("/api/keys/commands", response_model=KeyOut, responses=problems, tags=["commands"])
    async def command_key(request: Request, _: Reader) -> KeyOut:
        """The public key gateways pin (`[commands] central_public_key`)."""
        service = _service(request.app)
        return KeyOut(algorithm="Ed25519", public_key=service.public_key_b64,
                      pem=service.public_key_pem)
