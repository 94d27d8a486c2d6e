"""`POST /api/gateways/enroll` and `POST /api/gateways/renew` (DESIGN.md §8), and the wiring
of the identity service into central's app (`start_identity`, `install`).

Both endpoints authenticate the gateway by what it shows (a one-time token, or its current
certificate and a signature by its key), never by a console user: they must stay reachable
without a login. Errors are problem JSON: 403 for a refused token or certificate, 422 for a
bad CSR or gateway id, 503 when the database is unavailable.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from central.config.settings import Settings
from central.identity.audit import AuditLog
from central.identity.ca import CsrError, PkiError, load_or_create_ca
from central.identity.enrolment import (
    AuditHook,
    BadGatewayIdError,
    Enrolment,
    IdentityEvent,
    Issued,
    RenewalRefusedError,
    no_audit,
)
from central.identity.enrolment_store import (
    EnrolmentStore,
    EnrolmentStoreError,
    TokenRefusedError,
)
from central.web.problems import problem
from runtime.counters import Counters

log = structlog.get_logger(__name__)
_PEM_MAX = 16_384


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnrolIn(_In):
    gateway: str = Field(min_length=1, max_length=64)
    token: str = Field(min_length=1, max_length=200, repr=False)
    csr_pem: str = Field(min_length=1, max_length=_PEM_MAX)


class RenewIn(_In):
    gateway: str = Field(min_length=1, max_length=64)
    certificate_pem: str = Field(min_length=1, max_length=_PEM_MAX)
    csr_pem: str = Field(min_length=1, max_length=_PEM_MAX)
    signature: str = Field(min_length=1, max_length=2048,
                           description="base64 signature by the current key over "
                                       "'fieldlink-renew\\n' + gateway + '\\n' + csr_pem")


class IssuedOut(_In):
    gateway: str
    certificate_pem: str
    ca_pem: str
    central_public_key: str = Field(description="central's Ed25519 command key (base64); the "
                                                "gateway pins it")
    serial: str
    not_after_ms: int


@dataclass(slots=True)
class IdentityCounters(Counters):
    enrolled: int = 0
    renewed: int = 0
    refused: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Identity:
    """What lives on `app.state.identity`."""

    service: Enrolment
    store: EnrolmentStore
    counters: IdentityCounters = field(default_factory=IdentityCounters)

    async def stop(self) -> None:
        await self.store.close()

    def render_metrics(self) -> str:
        """Prometheus lines appended to `GET /metrics`."""
        p = "fieldlink_central"
        c = self.counters
        lines = [f"# HELP {p}_gateways_enrolled_total Gateway certificates issued by enrolment.",
                 f"# TYPE {p}_gateways_enrolled_total counter",
                 f"{p}_gateways_enrolled_total {c.enrolled}",
                 f"# HELP {p}_gateways_renewed_total Gateway certificates renewed.",
                 f"# TYPE {p}_gateways_renewed_total counter",
                 f"{p}_gateways_renewed_total {c.renewed}",
                 f"# HELP {p}_enrolment_refused_total Enrolment and renewal requests refused, "
                 "by reason.",
                 f"# TYPE {p}_enrolment_refused_total counter"]
        lines += [f'{p}_enrolment_refused_total{{reason="{k}"}} {n}'
                  for k, n in sorted(c.refused.items())]
        return "\n".join(lines) + "\n"


def pki_dir_for(settings: Settings) -> Path:
    """`pki_dir`, else `pki/` next to the SQLite file; a throwaway folder for an in-memory
    database (its CA lives as long as the process). With PostgreSQL `pki_dir` must be set and
    absolute (`Settings.beside_database` raises `SettingsError`)."""
    path = settings.beside_database("pki_dir", "pki")
    return Path(tempfile.mkdtemp(prefix="fieldlink-pki-")) if path is None else path


def check_ca(settings: Settings) -> None:
    """Load the CA when it exists (raises `CaKeyPermissionError` on a loose key, `CaFileError`
    on a broken one); `central serve` calls it before starting."""
    from central.identity.ca import CA_KEY, load_ca

    if settings.pki_dir is None and settings.db_url == "sqlite:///:memory:":
        return
    d = pki_dir_for(settings)
    if (d / CA_KEY).exists():
        load_ca(d)


def identity_audit(audit: AuditLog, actor: str | None = None) -> AuditHook:
    """THE call point of the audit log for enrolment, renewal, token issue and revocation
    (DESIGN.md §8): both the server (`start_identity`) and the CLI (`central gateway …`) take
    their hook from here. Each `IdentityEvent` becomes one row `gateway.<action>` on the
    gateway; its actor is `actor` (the CLI's `cli:<login>`) or, for what a gateway does itself
    with its token or certificate, `gateway:<id>`."""

    async def hook(event: IdentityEvent) -> None:
        await audit.append(actor or f"gateway:{event.gw}", f"gateway.{event.action}", event.gw,
                           dict(event.detail))

    return hook


async def start_identity(settings: Settings, central_public_key: str, *,
                         audit: AuditHook = no_audit) -> Identity:
    """Load (or make) the CA, open the identity tables and rewrite the CRL.

    Raises `CaKeyPermissionError` when the CA key is readable by others: central refuses to
    start on it.
    """
    import asyncio

    ca = await asyncio.to_thread(load_or_create_ca, pki_dir_for(settings))
    store = EnrolmentStore(settings.db_url)
    await store.open()
    try:
        service = Enrolment(ca=ca, store=store, central_public_key=central_public_key,
                            cert_days=settings.gateway_cert_days,
                            token_ttl_s=settings.enrol_token_ttl_s,
                            audit=audit)
        await service.write_crl()
    except BaseException:
        await store.close()
        raise
    log.info("identity_ready", pki_dir=str(ca.dir))
    return Identity(service, store)


def _out(i: Issued) -> IssuedOut:
    return IssuedOut(gateway=i.gw, certificate_pem=i.certificate_pem, ca_pem=i.ca_pem,
                     central_public_key=i.central_public_key, serial=i.serial,
                     not_after_ms=i.not_after_ms)


def _refusal(identity: Identity, exc: Exception) -> JSONResponse:
    if isinstance(exc, TokenRefusedError):
        key, status, title = f"token_{exc.reason}", 403, "Enrolment refused"
    elif isinstance(exc, RenewalRefusedError):
        key, status, title = "renewal", 403, "Renewal refused"
    elif isinstance(exc, CsrError | BadGatewayIdError):
        key, status, title = "bad_request", 422, "Bad certificate request"
    elif isinstance(exc, EnrolmentStoreError):
        key, status, title = "storage", 503, "Database unavailable"
    else:
        key, status, title = "pki", 403, "Refused"
    identity.counters.refused[key] = identity.counters.refused.get(key, 0) + 1
    return problem(status, title, str(exc))


def install(app: FastAPI) -> None:
    """Add the two gateway endpoints (they need `app.state.identity`)."""
    problems: dict[int | str, dict[str, object]] = {
        403: {"description": "Token or certificate refused"},
        422: {"description": "Bad CSR or gateway id"},
        503: {"description": "Database unavailable"}}

    @app.post("/api/gateways/enroll", response_model=IssuedOut, responses=problems,
              tags=["gateways"])
    async def enroll(request: Request, body: EnrolIn) -> IssuedOut | JSONResponse:
        """Enrol a gateway: a one-time token and a CSR (CN = the gateway id) give its
        certificate, the CA certificate and central's command key."""
        identity: Identity = request.app.state.identity
        try:
            issued = await identity.service.enrol(body.gateway, body.token, body.csr_pem)
        except (PkiError, EnrolmentStoreError) as exc:
            return _refusal(identity, exc)
        identity.counters.enrolled += 1
        return _out(issued)

    @app.post("/api/gateways/renew", response_model=IssuedOut, responses=problems,
              tags=["gateways"])
    async def renew(request: Request, body: RenewIn) -> IssuedOut | JSONResponse:
        """Renew before expiry, without a token: the current certificate and a signature by
        its key over the new CSR."""
        identity: Identity = request.app.state.identity
        try:
            issued = await identity.service.renew(body.gateway, body.certificate_pem,
                                                  body.csr_pem, body.signature)
        except (PkiError, EnrolmentStoreError) as exc:
            return _refusal(identity, exc)
        identity.counters.renewed += 1
        return _out(issued)
