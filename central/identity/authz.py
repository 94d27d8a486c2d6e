"""Who is asking and what they may do (DESIGN.md §8): the authentication middleware, the
role dependencies, and the area scope.

`AuthMiddleware` sits in front of every route, mount and docs page: a request without a live
session gets 401 (`application/problem+json`; a browser asking for a page is sent to
`/login`), unless its path is one of `PUBLIC_PATHS` / `PUBLIC_PREFIXES`. So a route added
later is closed until someone opens it here. A cookie session must echo its CSRF token in
`X-CSRF-Token` on every request that is not GET/HEAD/OPTIONS (403 otherwise); a bearer token
is not sent by browsers on their own, so it needs none. The principal goes on
`request.state.principal`.

Routes then ask for a permission with `Depends(require(Permission.OPERATE))` (403 when the
role lacks it) and check the area scope with `check_gateway` / `check_area` (403 outside);
lists are filtered with `gateway_scope`.
"""

from __future__ import annotations

import hmac
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from central import CentralError
from central.areas.tree import area_program
from central.identity.sessions import Session, resolve
from central.identity.users import Permission, User
from central.storage import Storage, StorageError
from central.storage.program import Program, Sql
from protocols.errors import DetailedError

log = structlog.get_logger(__name__)
PROBLEM = "application/problem+json"

PUBLIC_PATHS = frozenset({
    "/api/health", "/api/login", "/login",
    "/api/gateways/enroll", "/api/gateways/renew",  # authenticated by token / certificate
})
PUBLIC_PREFIXES = ("/static/login.",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
COOKIE = "fl_session"  # a console session's token
CSRF_HEADER = "X-CSRF-Token"  # a console session echoes its CSRF token in it


class AuthError(CentralError):
    """Base of the authentication and authorisation refusals."""

    status = 403


class NotAuthenticatedError(AuthError):
    status = 401

    def __init__(self, reason: str = "login required") -> None:
        super().__init__(reason)


class ForbiddenError(AuthError, DetailedError):
    template = "user {user!r} may not {needs}"
    user: str
    needs: str


class OutOfScopeError(AuthError, DetailedError):
    """`what` lies outside the user's area; `kind` and `ref` name it when it is one object
    (`of`): the console names it in Chinese from them."""

    template = "{what} is outside the area of user {user!r}"
    user: str
    what: str
    kind: str | None = None
    ref: str | None = None

    @classmethod
    def of(cls, user: str, kind: str, ref: object) -> OutOfScopeError:
        """Refused for one object: `of("duty-01", "terminal", "t-3")`."""
        return cls(user, f"{kind} {ref}", kind, str(ref))


@dataclass(frozen=True, slots=True)
class Principal:
    user: User
    kind: str  # cookie or bearer
    csrf: str
    token_hash: str

    @property
    def name(self) -> str:
        return self.user.name

    def can(self, permission: Permission) -> bool:
        return permission in self.user.permissions

    def sees(self, area_path: str | None) -> bool:
        """Whether something at `area_path` (None: at no site) is within the user's area."""
        scope = self.user.area_path
        if scope is None:
            return True
        return area_path is not None and area_path.startswith(scope)


@dataclass
class AuthCounters:
    """Login outcomes and refusals, for `/metrics`."""

    logins: Counter[str] = field(default_factory=Counter)  # ok, bad_password, unknown_user, …
    refused: Counter[str] = field(default_factory=Counter)  # 401 / 403 / csrf / throttled

    def render(self, prefix: str = "fieldlink_central") -> str:
        lines = [f"# HELP {prefix}_logins_total Login attempts by outcome.",
                 f"# TYPE {prefix}_logins_total counter"]
        for outcome in sorted(set(self.logins) | {"ok", "failed", "throttled"}):
            lines.append(f'{prefix}_logins_total{{outcome="{outcome}"}} {self.logins[outcome]}')
        lines += [f"# HELP {prefix}_auth_refused_total Requests refused by authentication or "
                  "authorisation, by reason.", f"# TYPE {prefix}_auth_refused_total counter"]
        for reason in sorted(set(self.refused) | {"unauthenticated", "forbidden", "csrf"}):
            lines.append(f'{prefix}_auth_refused_total{{reason="{reason}"}} '
                         f"{self.refused[reason]}")
        return "\n".join(lines) + "\n"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def bearer_or_cookie(headers: dict[str, str], cookies: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return cookies.get(COOKIE) or None


def _cookies(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in raw.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k not in out:
            out[k] = v
    return out


class AuthMiddleware:
    """Pure ASGI middleware: authenticate every request to a non-public path."""

    def __init__(self, app: ASGIApp, *, idle_s: Callable[[], float],
                 counters: AuthCounters) -> None:
        self.app = app
        self.idle_s = idle_s
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_public(scope["path"]):
            await self.app(scope, receive, send)  # lifespan, and the public paths
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        token = bearer_or_cookie(headers, _cookies(headers.get("cookie", "")))
        session: Session | None = None
        if token is not None:
            storage: Storage = scope["app"].state.storage
            now = time.time_ns() // 1_000_000
            idle_ms = int(self.idle_s() * 1000)
            try:
                session = await resolve(storage, token, now, idle_ms)
            except StorageError as exc:
                log.warning("session_lookup_failed", error=str(exc))
                await _problem(send, 503, "Storage unavailable", "cannot check the session")
                return
        if session is None:
            self.counters.refused["unauthenticated"] += 1
            if scope["type"] == "websocket":  # a websocket route would need a user too
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})
                return
            if scope["method"] == "GET" and "text/html" in headers.get("accept", "") \
                    and not scope["path"].startswith("/api/"):
                await _redirect(send, "/login")
                return
            await _problem(send, 401, "Login required",
                           "this endpoint needs a session or a bearer token (POST /api/login)",
                           extra=[(b"www-authenticate", b'Bearer realm="fieldlink"')])
            return
        if session.kind == "cookie" and scope.get("method", "GET") not in SAFE_METHODS:
            sent = headers.get(CSRF_HEADER.lower(), "")
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                self.counters.refused["csrf"] += 1
                await _problem(send, 403, "CSRF token missing or wrong",
                               f"a console request that changes state must send {CSRF_HEADER}")
                return
        scope.setdefault("state", {})["principal"] = Principal(
            user=session.user, kind=session.kind, csrf=session.csrf,
            token_hash=session.token_hash)
        await self.app(scope, receive, send)


async def _problem(send: Send, status: int, title: str, detail: str,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"type": "about:blank", "title": title, "status": status,
                       "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode()),
        *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send({"type": "http.response.start", "status": 303, "headers": [
        (b"location", location.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


# --- dependencies -------------------------------------------------------------------------


def principal(request: Request) -> Principal:
    """The logged-in user; 401 if the middleware let the request through without one."""
    p = getattr(request.state, "principal", None)
    if not isinstance(p, Principal):
        raise NotAuthenticatedError()
    return p


def require(permission: Permission) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """A dependency: the principal, if its role has `permission`; 403 otherwise."""

    async def dependency(request: Request) -> Principal:
        p = principal(request)
        if not p.can(permission):
            counters: AuthCounters | None = getattr(request.app.state, "auth_counters", None)
            if counters is not None:
                counters.refused["forbidden"] += 1
            raise ForbiddenError(p.name, str(permission))
        return p

    dependency.__name__ = f"require_{permission}"
    return dependency


# --- the area scope -----------------------------------------------------------------------


def gateway_paths_program() -> Program[dict[str, str]]:
    rows = yield Sql("SELECT gs.gw, ar.path FROM gateway_sites gs"
                     " JOIN areas ar ON ar.id = gs.area_id")
    return {str(gw): str(path) for gw, path in rows}


def gateway_path_program(gw: str) -> Program[str | None]:
    rows = yield Sql("SELECT ar.path FROM gateway_sites gs JOIN areas ar ON ar.id = gs.area_id"
                     " WHERE gs.gw = ?", (gw,))
    return str(rows[0][0]) if rows else None


async def gateway_scope(storage: Storage, p: Principal) -> Callable[[str], bool]:
    """A predicate: whether the principal may see gateway `gw` (for filtering lists)."""
    if p.user.area_path is None:
        return lambda gw: True
    paths = await storage.run(gateway_paths_program, write=False)
    return lambda gw: p.sees(paths.get(gw))


async def check_gateway(storage: Storage, p: Principal, gw: str) -> None:
    """403 if gateway `gw` stands outside the principal's area."""
    if p.user.area_path is None:
        return
    path = await storage.run(lambda: gateway_path_program(gw), write=False)
    if not p.sees(path):
        raise OutOfScopeError.of(p.name, "gateway", gw)


async def check_area(storage: Storage, p: Principal, area_id: int) -> None:
    """403 if area `area_id` lies outside the principal's area (404 if unknown)."""
    area = await storage.run(lambda: area_program(area_id), write=False)
    if not p.sees(area.path):
        raise OutOfScopeError.of(p.name, "area", area.code)


# Route parameter types (module level, so string annotations resolve): `p: Operator`.
LoggedIn = Annotated[Principal, Depends(principal)]
Reader = Annotated[Principal, Depends(require(Permission.READ))]
Operator = Annotated[Principal, Depends(require(Permission.OPERATE))]
Admin = Annotated[Principal, Depends(require(Permission.ADMINISTER))]
Auditor = Annotated[Principal, Depends(require(Permission.AUDIT))]
