"""HTTP API of people and the audit log (DESIGN.md §8).

    GET  /login                                   -> the console's login page (public)
    POST /api/login   {name, password, kind}      -> bearer token, or a session cookie (public)
    POST /api/logout                              -> 204; the session or token is gone
    GET  /api/me                                  -> who is logged in, role, area, CSRF token
    GET  /api/users                               -> users in the admin's area       (admin)
    POST /api/users   {name, role, area, password} -> 201, the user                   (admin)
    POST /api/users/{name}/password {password}    -> new password; ends its sessions  (admin)
    POST /api/me/password {password}              -> one's own new password           (any user)
    POST /api/users/{name}/disable, /enable       -> the user                         (admin)
    GET  /api/audit?after=&limit=&actor=&action=  -> audit rows, newest first         (auditor)
    GET  /api/audit/verify                        -> whether the hash chain is intact (auditor)

`kind: "cookie"` (the console) sets `fl_session` (HttpOnly, SameSite=Strict, Path=/) and
returns the CSRF token the console sends back in `X-CSRF-Token`; `kind: "bearer"` (API
clients, the default) returns a token for `Authorization: Bearer …`. Both end after
`session_idle_s` unused. Failed logins answer 401, too many of them 429 with `Retry-After`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import Field

from central.config.settings import Settings
from central.identity.accounts import Accounts, LoginFailedError, LoginThrottledError
from central.identity.audit import AuditEntry
from central.identity.authz import (
    COOKIE,
    Admin,
    Auditor,
    AuthError,
    LoggedIn,
    OutOfScopeError,
    Principal,
    check_area,
)
from central.identity.users import (
    NAME_PATTERN,
    Role,
    User,
    WeakPasswordError,
    area_id_program,
)
from central.web.problems import error_problem, install_problems
from central.web.routing import StrictModel, audit_of


class LoginIn(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024, repr=False)
    kind: Literal["bearer", "cookie"] = Field(default="bearer",
                                              description="bearer: a token for API "
                                              "clients; cookie: the console's session")


class UserOut(StrictModel):
    name: str
    role: Role
    area: str | None = Field(description="the code of the user's area; null: the whole tree")
    disabled: bool
    permissions: list[str]
    created_ms: int
    updated_ms: int


class LoginOut(StrictModel):
    user: UserOut
    token: str | None = Field(default=None, description="for Authorization: Bearer (kind=bearer)")
    token_type: str | None = None
    csrf: str | None = Field(default=None, description="send as X-CSRF-Token (kind=cookie)")
    idle_timeout_s: float


class MeOut(StrictModel):
    user: UserOut
    kind: str
    csrf: str | None
    idle_timeout_s: float


class UserIn(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: Role
    area: str | None = Field(default=None, max_length=64, description="area code; null: whole tree")
    password: str = Field(min_length=1, max_length=1024, repr=False)


class PasswordIn(StrictModel):
    password: str = Field(min_length=1, max_length=1024, repr=False)


class AuditOut(StrictModel):
    seq: int
    ts_ms: int
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    hash: str


class VerifyOut(StrictModel):
    ok: bool
    rows: int
    head_seq: int
    bad_seq: int | None
    reason: str | None


def user_out(u: User) -> UserOut:
    return UserOut(name=u.name, role=u.role, area=u.area_code, disabled=u.disabled,
                   permissions=sorted(str(p) for p in u.permissions), created_ms=u.created_ms,
                   updated_ms=u.updated_ms)


def _audit_out(e: AuditEntry) -> AuditOut:
    return AuditOut(seq=e.seq, ts_ms=e.ts_ms, actor=e.actor, action=e.action, target=e.target,
                    detail=dict(e.detail), hash=e.hash)


def _accounts(request: Request) -> Accounts:
    return request.app.state.accounts


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _check_user_scope(request: Request, admin: Principal, name: str) -> User:
    target = await _accounts(request).get_user(name)
    if not admin.sees(target.area_path):
        raise OutOfScopeError.of(admin.name, "user", name)
    return target


_AUTH_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Login required"}, 403: {"description": "Role or area refused"}}


def install(app: FastAPI, settings: Settings, static: Any) -> None:
    """Add the login, user and audit routes and the 401/403/429 problem responses."""
    _install_errors(app)
    _install_session_routes(app, settings, static)
    _install_user_routes(app)
    _install_audit_routes(app)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(AuthError)
    async def refused(_: Request, exc: AuthError) -> JSONResponse:
        title = "Login required" if exc.status == 401 else "Forbidden"
        return error_problem(exc.status, title, exc)

    @app.exception_handler(LoginThrottledError)
    async def throttled(_: Request, exc: LoginThrottledError) -> JSONResponse:
        return error_problem(429, "Too many failed logins", exc,
                             {"Retry-After": str(exc.retry_after)})

    install_problems(app, {
        LoginFailedError: (401, "Login failed"),
        WeakPasswordError: (422, "Password refused")})


def _install_session_routes(app: FastAPI, settings: Settings, static: Any) -> None:
    """Log in and out, and who am I."""

    @app.get("/login", include_in_schema=False)
    async def login_page() -> FileResponse:
        return FileResponse(static / "login.html", media_type="text/html; charset=utf-8")

    @app.post("/api/login", response_model=LoginOut, tags=["identity"],
              responses={401: {"description": "Wrong name or password"},
                         429: {"description": "Too many failed logins"}})
    async def login(request: Request, body: LoginIn, response: Response) -> LoginOut:
        """Log in. Example: `{"name": "duty-01", "password": "…", "kind": "bearer"}`, then send
        `Authorization: Bearer <token>` with every request."""
        user, token, csrf = await _accounts(request).login(
            body.name, body.password, kind=body.kind, client=client_of(request))
        if body.kind == "cookie":
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/",
                                secure=settings.cookie_secure)
            return LoginOut(user=user_out(user), token=None, csrf=csrf,
                            idle_timeout_s=settings.session_idle_s)
        return LoginOut(user=user_out(user), token=token, token_type="bearer", csrf=None,
                        idle_timeout_s=settings.session_idle_s)

    @app.post("/api/logout", status_code=204, responses=_AUTH_PROBLEMS, tags=["identity"])
    async def logout(request: Request, p: LoggedIn) -> Response:
        await _accounts(request).logout(p)
        out = Response(status_code=204)
        out.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return out

    @app.get("/api/me", response_model=MeOut, responses=_AUTH_PROBLEMS, tags=["identity"])
    async def me(p: LoggedIn) -> MeOut:
        return MeOut(user=user_out(p.user), kind=p.kind,
                     csrf=p.csrf if p.kind == "cookie" else None,
                     idle_timeout_s=settings.session_idle_s)


def _install_user_routes(app: FastAPI) -> None:
    @app.get("/api/users", response_model=list[UserOut], responses=_AUTH_PROBLEMS,
             tags=["identity"])
    async def list_users(request: Request,
                         p: Admin) -> list[UserOut]:
        return [user_out(u) for u in await _accounts(request).list_users(p.user.area_path)]

    @app.post("/api/users", response_model=UserOut, status_code=201, tags=["identity"],
              responses={**_AUTH_PROBLEMS, 409: {"description": "Duplicate user"},
                         422: {"description": "Bad role, area or password"}})
    async def add_user(request: Request, body: UserIn,
                       p: Admin) -> UserOut:
        """Example: `{"name": "hongshan-duty", "role": "operator", "area": "420111",
        "password": "…"}`. An admin with an area can only add users inside it."""
        if p.user.area_path is not None and body.area is None:
            raise OutOfScopeError(p.name, "the whole tree")
        accounts = _accounts(request)
        if body.area is not None and p.user.area_path is not None:
            area_id = await accounts.storage.run(lambda: area_id_program(body.area or ""),
                                                 write=False)
            await check_area(accounts.storage, p, area_id)
        user = await accounts.add_user(p.name, body.name, body.role, body.password,
                                       area_code=body.area)
        return user_out(user)

    @app.post("/api/users/{name}/password", response_model=UserOut, tags=["identity"],
              responses={**_AUTH_PROBLEMS, 404: {"description": "Unknown user"},
                         422: {"description": "Password refused"}})
    async def set_password(request: Request, name: str, body: PasswordIn, p: Admin) -> UserOut:
        """An admin sets the password of a user in their area; the user's sessions end."""
        await _check_user_scope(request, p, name)
        return user_out(await _accounts(request).set_password(p.name, name, body.password))

    @app.post("/api/me/password", response_model=UserOut, tags=["identity"],
              responses={**_AUTH_PROBLEMS, 422: {"description": "Password refused"}})
    async def set_own_password(request: Request, body: PasswordIn, p: LoggedIn) -> UserOut:
        """Every user may set their own password; their sessions end (log in again)."""
        return user_out(await _accounts(request).set_password(p.name, p.name, body.password))

    @app.post("/api/users/{name}/disable", response_model=UserOut, tags=["identity"],
              responses={**_AUTH_PROBLEMS, 404: {"description": "Unknown user"}})
    async def disable(request: Request, name: str, p: Admin) -> UserOut:
        await _check_user_scope(request, p, name)
        return user_out(await _accounts(request).set_disabled(p.name, name, True))

    @app.post("/api/users/{name}/enable", response_model=UserOut, tags=["identity"],
              responses={**_AUTH_PROBLEMS, 404: {"description": "Unknown user"}})
    async def enable(request: Request, name: str, p: Admin) -> UserOut:
        await _check_user_scope(request, p, name)
        return user_out(await _accounts(request).set_disabled(p.name, name, False))


def _install_audit_routes(app: FastAPI) -> None:
    @app.get("/api/audit", response_model=list[AuditOut], responses=_AUTH_PROBLEMS,
             tags=["audit"])
    async def audit_rows(
        request: Request, _: Auditor,
        after: Annotated[int, Query(ge=0, le=2**62, description="rows after this seq")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        actor: Annotated[str | None, Query(max_length=64)] = None,
        action: Annotated[str | None, Query(max_length=64)] = None,
        order: Annotated[Literal["newest", "oldest"], Query()] = "newest",
    ) -> list[AuditOut]:
        """Example: `?action=login.failed&limit=50`."""
        rows = await audit_of(request).entries(after_seq=after, limit=limit, actor=actor,
                                             action=action, newest_first=order == "newest")
        return [_audit_out(e) for e in rows]

    @app.get("/api/audit/verify", response_model=VerifyOut, responses=_AUTH_PROBLEMS,
             tags=["audit"])
    async def audit_verify(request: Request, _: Auditor) -> VerifyOut:
        v = await audit_of(request).verify()
        return VerifyOut(ok=v.ok, rows=v.rows, head_seq=v.head_seq, bad_seq=v.bad_seq,
                         reason=v.reason)
