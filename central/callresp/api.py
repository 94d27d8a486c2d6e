"""HTTP API of 叫应 (DESIGN.md §7). `install(app)` adds the routes and runs the service in
the app's lifespan (after storage, audit log, commands and ingest are up; stopped first).

    POST /api/callresp/warnings            {level, text, repeat?, areas, groups, persons,
                                            terminals} -> 201, the warning with its targets
                                            and `skipped`: the terminals left out (on a
                                            retired gateway); 409 if that is all of them
    GET  /api/callresp/warnings?from=&to=&limit=        -> newest first, targets' states
    GET  /api/callresp/warnings/{id}                    -> targets, states, every step timed
    GET  /api/callresp/stats?from=&to=                  -> answer rate, time to answer per
                                                           warning, area and person
    PUT  /api/callresp/terminals/{id} | groups/{id} | persons/{id}   (the directory; admin)
    GET  /api/callresp/terminals | groups | persons

Operators issue warnings; every target must lie within the user's area (403 otherwise), and
reads show only targets within it (DESIGN.md §8).

The terminals of a retired gateway are out of service, as the gateway is out of the gateway
lists: `GET terminals` leaves them out, and `GET groups` and `GET persons` list the terminals
in service under `terminals` and the others under `retired_terminals` (so a group that would
now call fewer terminals says so). An unretire lists them again. These lists only show, so
they read the process's shared retired list (`CallRespService.retired`: at once after a
retire or unretire in this process, within its refresh on another worker); what a warning
calls is decided against the table in the warning's own transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from pydantic import Field

from central.callresp.directory import (
    AreaRef,
    Group,
    Person,
    PersonRole,
    Terminal,
    TerminalKind,
    UnknownEntryError,
    areas_program,
    groups_program,
    persons_program,
    terminals_program,
    upsert_group_program,
    upsert_person_program,
    upsert_terminal_program,
)
from central.callresp.service import CallRespService
from central.callresp.views import stats, warning_program, warnings_program
from central.callresp.workflow import NoTargetError, TargetsRetiredError, WarningRequestError
from central.identity.authz import Admin, Operator, OutOfScopeError, Principal, Reader
from central.storage.program import Program
from central.web.bounds import IdField
from central.web.problems import documented, install_problems
from central.web.routing import StrictModel
from protocols.callresp import MAX_REPEAT, MAX_TEXT_CHARS, Level
from runtime.clock import now_ms

DAY_MS = 86_400_000
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class WarningIn(StrictModel):
    level: Level
    # at least one character that is not a blank: a blank warning plays nothing
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=r"\S")
    repeat: int | None = Field(default=None, ge=1, le=MAX_REPEAT)
    areas: list[IdField] = Field(default_factory=list, max_length=100)
    groups: list[Annotated[str, Field(pattern=_ID)]] = Field(default_factory=list, max_length=100)
    persons: list[Annotated[str, Field(pattern=_ID)]] = Field(default_factory=list, max_length=1000)
    terminals: list[Annotated[str, Field(pattern=_ID)]] = Field(default_factory=list,
                                                                max_length=5000)


class TerminalIn(StrictModel):
    gw: str = Field(pattern=_ID)
    area_id: IdField | None = None
    kind: TerminalKind = TerminalKind.AUDIO
    name: str = Field(default="", max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90, description="degrees north")
    lon: float | None = Field(default=None, ge=-180, le=180, description="degrees east")


class GroupIn(StrictModel):
    name: str = Field(min_length=1, max_length=200)
    terminals: list[Annotated[str, Field(pattern=_ID)]] = Field(default_factory=list,
                                                                max_length=5000)


class PersonIn(StrictModel):
    name: str = Field(min_length=1, max_length=200)
    area_id: IdField | None = None
    role: PersonRole = PersonRole.MEMBER
    phone: str = Field(default="", max_length=32)
    terminals: list[Annotated[str, Field(pattern=_ID)]] = Field(default_factory=list,
                                                                max_length=100)


def _service(request: Request) -> CallRespService:
    return request.app.state.callresp


def _window(from_: int | None, to: int | None) -> tuple[int, int]:
    """The asked span, by default the 30 days up to now."""
    to_ms = to if to is not None else now_ms() + 1
    return (from_ if from_ is not None else to_ms - 30 * DAY_MS), to_ms


async def _put(request: Request, p: Principal, action: str, target: str, item: Any,
               upsert: Callable[[Any, int], Program[None]]) -> dict[str, Any]:
    """Store a directory entry, then audit it; the entry as stored."""
    svc = _service(request)
    await svc.storage.run(lambda: upsert(item, now_ms()))
    await svc.audit.append(p.name, action, target, asdict(item))
    return asdict(item)


async def _check_scope(svc: CallRespService, p: Principal, body: WarningIn) -> None:
    """403 unless every area, terminal (also in groups) and person lies in the user's area."""
    if p.user.area_path is None:
        return
    st = svc.storage
    areas = await st.run(areas_program, write=False)

    def check(area_id: int | None, kind: str, ref: object) -> None:
        if not p.sees(_area_path(areas, area_id)):
            raise OutOfScopeError.of(p.name, kind, ref)

    for a in body.areas:
        check(a, "area", a)
    ids = set(body.terminals)
    for g in await st.run(groups_program, write=False):
        if g.id in body.groups:
            ids.update(g.terminals)
    for t in await st.run(lambda: terminals_program(sorted(ids)), write=False):
        check(t.area_id, "terminal", t.id)
    for person in await st.run(lambda: persons_program(sorted(set(body.persons))), write=False):
        check(person.area_id, "person", person.id)


def _area_path(areas: Mapping[int, AreaRef], area_id: int | None) -> str | None:
    return areas[area_id].path if area_id is not None and area_id in areas else None


async def _visible_entries(request: Request, p: Principal,
                           entries: Callable[[], Program[Sequence[Terminal | Person]]],
                           ) -> list[dict[str, Any]]:
    """The directory entries that lie in the user's area (or in none), as JSON objects."""
    svc = _service(request)
    areas = await svc.storage.run(areas_program, write=False)
    return [asdict(e) for e in await svc.storage.run(entries, write=False)
            if p.sees(_area_path(areas, e.area_id))]


async def _retired_apart(request: Request,
                         entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups or persons as JSON objects, the terminals on retired gateways moved from
    `terminals` to `retired_terminals` (a warning calls only the first)."""
    svc = _service(request)
    retired = await svc.retired.retired()
    gw_of = {t.id: t.gw for t in await svc.storage.run(terminals_program, write=False)}
    return [{**e, "terminals": [t for t in e["terminals"] if gw_of.get(t) not in retired],
             "retired_terminals": [t for t in e["terminals"] if gw_of.get(t) in retired]}
            for e in entries]


def _visible(p: Principal) -> Callable[[str | None], bool]:
    return p.sees


# The refusals of a new warning, their fields as the console reads them (central.web.problems).
_WARNING_PROBLEMS = documented({
    403: ("A target outside the user's area", (OutOfScopeError,)),
    404: ("An unknown area, group, person or terminal", (UnknownEntryError,)),
    409: ("Every terminal on a retired gateway, and no person", (TargetsRetiredError,)),
    422: ("The warning reaches no terminal and no person", (NoTargetError,))})


def install(app: FastAPI) -> None:
    """Add the 叫应 routes (the app's lifespan starts the service: `central.app._start`)."""

    install_problems(app, {WarningRequestError: (422, "Invalid warning"),
                           TargetsRetiredError: (409, "Gateway retired")})

    tags: list[str | enum.Enum] = ["callresp"]

    @app.post("/api/callresp/warnings", status_code=201, tags=tags,
              summary="Issue a 叫应 warning to areas, groups, persons and terminals",
              responses=_WARNING_PROBLEMS)
    async def create(request: Request, body: WarningIn, p: Operator) -> dict[str, Any]:
        svc = _service(request)
        await _check_scope(svc, p, body)
        issued = await svc.create(level=body.level, text=body.text, user=p.name,
                                  repeat=body.repeat, areas=body.areas, groups=body.groups,
                                  persons=body.persons, terminals=body.terminals)
        view = await svc.storage.run(lambda: warning_program(issued.warning_id, _visible(p)),
                                     write=False)
        return {**asdict(view), "skipped": [asdict(s) for s in issued.skipped]}

    @app.get("/api/callresp/warnings", tags=tags)
    async def list_warnings(
        request: Request, p: Reader,
        from_: Annotated[int | None, Query(alias="from", ge=0, le=2**53)] = None,
        to: Annotated[int | None, Query(ge=0, le=2**53)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        from_ms, to_ms = _window(from_, to)
        ws = await _service(request).storage.run(
            lambda: warnings_program(from_ms, to_ms, limit, _visible(p)), write=False)
        return [asdict(w) for w in ws]

    @app.get("/api/callresp/warnings/{wid}", tags=tags)
    async def show(request: Request, wid: str, p: Reader) -> dict[str, Any]:
        return asdict(await _service(request).storage.run(
            lambda: warning_program(wid, _visible(p)), write=False))

    @app.get("/api/callresp/stats", tags=tags)
    async def get_stats(
        request: Request, p: Reader,
        from_: Annotated[int | None, Query(alias="from", ge=0, le=2**53)] = None,
        to: Annotated[int | None, Query(ge=0, le=2**53)] = None,
    ) -> dict[str, Any]:
        from_ms, to_ms = _window(from_, to)
        ws = await _service(request).storage.run(
            lambda: warnings_program(from_ms, to_ms, 10_000, _visible(p)), write=False)
        return asdict(stats(ws))

    # --- the directory ---------------------------------------------------------------------

    @app.put("/api/callresp/terminals/{tid}", tags=tags)
    async def put_terminal(request: Request, tid: Annotated[str, Path(pattern=_ID)],
                           body: TerminalIn, p: Admin) -> dict[str, Any]:
        t = Terminal(id=tid, gw=body.gw, area_id=body.area_id, kind=str(body.kind),
                     name=body.name, lat=body.lat, lon=body.lon)
        return await _put(request, p, "callresp.terminal_set", f"terminal:{tid}", t,
                          upsert_terminal_program)

    @app.put("/api/callresp/groups/{gid}", tags=tags)
    async def put_group(request: Request, gid: Annotated[str, Path(pattern=_ID)], body: GroupIn,
                        p: Admin) -> dict[str, Any]:
        g = Group(id=gid, name=body.name, terminals=tuple(sorted(set(body.terminals))))
        return await _put(request, p, "callresp.group_set", f"group:{gid}", g,
                          upsert_group_program)

    @app.put("/api/callresp/persons/{pid}", tags=tags)
    async def put_person(request: Request, pid: Annotated[str, Path(pattern=_ID)],
                         body: PersonIn, p: Admin) -> dict[str, Any]:
        person = Person(id=pid, name=body.name, area_id=body.area_id, role=str(body.role),
                        phone=body.phone, terminals=tuple(sorted(set(body.terminals))))
        return await _put(request, p, "callresp.person_set", f"person:{pid}", person,
                          upsert_person_program)

    @app.get("/api/callresp/terminals", tags=tags)
    async def list_terminals(request: Request, p: Reader) -> list[dict[str, Any]]:
        """The terminals in the user's area, but those on retired gateways."""
        retired = await _service(request).retired.retired()
        return [t for t in await _visible_entries(request, p, terminals_program)
                if t["gw"] not in retired]

    @app.get("/api/callresp/groups", tags=tags)
    async def list_groups(request: Request, p: Reader) -> list[dict[str, Any]]:
        """The groups whose every terminal lies in the user's area (those a warning may name),
        their terminals on retired gateways apart."""
        st = _service(request).storage
        visible = {t["id"] for t in await _visible_entries(request, p, terminals_program)}
        return await _retired_apart(request, [asdict(g) for g in await st.run(
            groups_program, write=False) if visible.issuperset(g.terminals)])

    @app.get("/api/callresp/persons", tags=tags)
    async def list_persons(request: Request, p: Reader) -> list[dict[str, Any]]:
        """The persons in the user's area, their terminals on retired gateways apart."""
        return await _retired_apart(request,
                                    await _visible_entries(request, p, persons_program))
