"""HTTP API of retiring gateways (central.identity.retire), admin only:

    POST /api/gateways/{gw}/retire    {reason, force}  -> the retirement, what it revoked
    POST /api/gateways/{gw}/unretire  {reason}         -> the retirement it undid
    GET  /api/retired-gateways                         -> every retired gateway, refusals

Errors: 403 without the admin role or outside the admin's area, 404 for a gateway central
never heard of nor placed, 409 for a gateway retired already (or not retired, to unretire)
and for open alarms without `force`, 422 for a missing reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import structlog
from fastapi import FastAPI, Request
from pydantic import Field

from central.identity.authz import Admin, check_gateway, gateway_scope
from central.identity.enrolment_api import identity_audit
from central.identity.retire import (
    RetiredGate,
    RetireError,
    retire,
    retirements_program,
    unretire,
)
from central.web.problems import install_problems
from central.web.routing import StrictModel, audit_of, storage_of
from runtime import clock

log = structlog.get_logger(__name__)


class RetireIn(StrictModel):
    reason: str = Field(min_length=3, max_length=500, description="why, for the record")
    force: bool = Field(default=False, description="clear and acknowledge its open alarms "
                                                   "with the reason (else 409 if any)")


class UnretireIn(StrictModel):
    reason: str = Field(min_length=3, max_length=500)


class RetirementOut(StrictModel):
    gw: str
    retired_ms: int
    retired_by: str
    reason: str
    alarms_cleared: int
    refused: int  # messages it sent while retired, refused
    last_refused_ms: int | None


class RetiredOut(RetirementOut):
    certificates_revoked: list[str]  # serials
    tokens_voided: int
    commands_cancelled: list[str]  # cmd_ids


def _gate(request: Request) -> RetiredGate | None:
    return getattr(request.app.state, "retired", None)


def _forget(request: Request) -> None:
    if (gate := _gate(request)) is not None:
        gate.forget()  # this process's ingest sees it with its next message


async def _flush(request: Request) -> None:
    """Write the refusals this process still counts in memory, before they are read."""
    if (gate := _gate(request)) is not None:
        await gate.flush()


def install(app: FastAPI) -> None:
    install_problems(app, {RetireError: (409, "Gateway state refuses")})
    problems: dict[int | str, dict[str, Any]] = {
        401: {"description": "Login required"}, 403: {"description": "Role or area refused"},
        404: {"description": "Unknown gateway"},
        409: {"description": "Retired already, not retired, or open alarms"}}

    @app.post("/api/gateways/{gw}/retire", response_model=RetiredOut, responses=problems,
              tags=["gateways"], summary="Retire (decommission) a gateway, keeping its history")
    async def retire_gateway(request: Request, gw: str, body: RetireIn, p: Admin) -> RetiredOut:
        """Off the map, the lists and the offline counts; its data refused and counted; its
        certificates revoked and tokens voided; its pending commands cancelled. Audited.

        Example: `{"reason": "replaced by wh-qingshan-05 after the flood", "force": false}`.
        """
        storage = storage_of(request)
        await check_gateway(storage, p, gw)
        done = await retire(storage, audit_of(request), gw, user=p.name, reason=body.reason,
                            force=body.force)
        _forget(request)
        # Revoked in the admin's name (the service's own hook names the gateway as actor).
        service = dataclasses.replace(request.app.state.identity.service,
                                      audit=identity_audit(audit_of(request), p.name))
        revoked = await service.revoke(gw)
        detail = f"cancelled: gateway retired by {p.name}: {body.reason}"[:300]
        commands = request.app.state.commands
        cancelled = ([] if commands is None else
                     await commands.service.store.cancel_open(gw, detail, now_ms=clock.now_ms()))
        return RetiredOut(**dataclasses.asdict(done), certificates_revoked=list(revoked.serials),
                          tokens_voided=revoked.tokens_voided,
                          commands_cancelled=[c.cmd_id for c in cancelled])

    @app.post("/api/gateways/{gw}/unretire", response_model=RetirementOut, responses=problems,
              tags=["gateways"], summary="Bring a retired gateway back into service")
    async def unretire_gateway(request: Request, gw: str, body: UnretireIn,
                               p: Admin) -> RetirementOut:
        """Its data is stored again; it needs a new enrolment token to reconnect through the
        production broker (its certificates stay revoked). Audited.

        Example: `{"reason": "repaired, back at 420107-site-02"}`.
        """
        storage = storage_of(request)
        await check_gateway(storage, p, gw)
        await _flush(request)  # the audit entry says how many it sent while retired
        was = await unretire(storage, audit_of(request), gw, user=p.name, reason=body.reason)
        _forget(request)
        return RetirementOut(**dataclasses.asdict(was))

    @app.get("/api/retired-gateways", response_model=list[RetirementOut], responses=problems,
             tags=["gateways"])
    async def retired_gateways(request: Request, p: Admin) -> list[RetirementOut]:
        """Every retired gateway in the admin's area, with what it sent since, refused."""
        storage = storage_of(request)
        visible = await gateway_scope(storage, p)
        await _flush(request)
        rows = await storage.run(retirements_program, write=False)
        return [RetirementOut(**dataclasses.asdict(r)) for r in rows if visible(r.gw)]
