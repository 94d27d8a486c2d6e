"""Problem responses carry the error's type and declared fields beside its `detail`
(central.web.problems): the refusals of a new 叫应 warning that the console names in Chinese,
in process on SQLite, and their schemas in the OpenAPI document; an error class whose field
would hide a problem member is refused when its handler is installed, each class checked
once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from central.app import create_app
from central.config.settings import Settings
from central.web.problems import (
    ReservedFieldError,
    check_problem_fields,
    error_problem,
    install_problems,
    problem_fields,
    problem_type,
)
from protocols.errors import DetailedError
from tests.identity import auth, token_for
from tests.test_callresp_workflow import GW1, GW2, ok, retire, serve, street

T = "urn:fieldlink:problem:"


async def refused(c: httpx.AsyncClient, status: int, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = await c.post("/api/callresp/warnings", json={"level": "red", "text": "演练", **body},
                     headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return dict(r.json())


async def test_a_warning_to_retired_gateways_names_terminals_and_gateways(
        tmp_path: Path) -> None:
    """409 when every terminal's gateway is retired: `type` targets-retired, the terminals
    and their gateways as arrays, and the detail text as before."""
    async with serve("sqlite", tmp_path) as (app, c):
        await street(app, c)
        await retire(c, GW1)
        p = await refused(c, 409, {"terminals": ["t-2", "t-1"]})
        assert p == {"type": f"{T}targets-retired", "title": "Gateway retired", "status": 409,
                     "terminals": ["t-1", "t-2"], "gateways": [GW1],
                     "detail": "所选终端所在网关均已退役，预警未发布 (all 2 terminal(s) the"
                               f" warning reaches hang on retired gateways: {GW1}; nothing"
                               " was sent)"}
        await retire(c, GW2)
        p = await refused(c, 409, {"terminals": ["t-5", "t-1"]})
        assert (p["terminals"], p["gateways"]) == (["t-1", "t-5"], [GW1, GW2])


async def test_the_other_refusals_of_a_warning_carry_their_fields(tmp_path: Path) -> None:
    """403 names the object outside the user's area (`kind`, `ref`), 404 the unknown entry,
    422 a warning that reaches nobody: each by `type`, the detail text unchanged."""
    async with serve("sqlite", tmp_path) as (app, c):
        areas = await street(app, c)
        await ok(c.post("/api/areas", json={"parent_id": areas["city"]["id"],
                                            "level": "district", "code": "d2",
                                            "name_zh": "另一区"}), 201)
        other = auth(await token_for(app, c, "op2", role="operator", area="d2"))
        p = await refused(c, 403, {"terminals": ["t-3"]}, other)
        assert p == {"type": f"{T}out-of-scope", "title": "Forbidden", "status": 403,
                     "user": "op2", "what": "terminal t-3", "kind": "terminal", "ref": "t-3",
                     "detail": "terminal t-3 is outside the area of user 'op2'"}
        p = await refused(c, 403, {"persons": ["p-dist"]}, other)
        assert (p["kind"], p["ref"]) == ("person", "p-dist")
        p = await refused(c, 403, {"areas": [areas["street"]["id"]]}, other)
        assert (p["type"], p["kind"], p["ref"]) == (f"{T}out-of-scope", "area",
                                                    str(areas["street"]["id"]))

        p = await refused(c, 404, {"terminals": ["t-1", "nope"]})
        assert p == {"type": f"{T}unknown-entry", "title": "Unknown terminal", "status": 404,
                     "kind": "terminal", "ref": "nope", "detail": "unknown terminal 'nope'"}
        p = await refused(c, 404, {"groups": ["g-none"]})
        assert (p["kind"], p["ref"]) == ("group", "g-none")

        p = await refused(c, 422, {})
        assert p["type"] == f"{T}no-target"
        assert p["detail"] == ("预警没有可叫应的终端或责任人，未发布"
                               " (the warning reaches no terminal and no person)")


async def test_the_openapi_documents_each_refusals_fields(tmp_path: Path) -> None:
    """The warning route's 403/404/409/422 answers are schemas built from the same field
    declarations: their `type` constant and their fields."""
    async with serve("sqlite", tmp_path) as (_, c):
        spec = await ok(c.get("/openapi.json"))
    responses = spec["paths"]["/api/callresp/warnings"]["post"]["responses"]
    schemas = spec["components"]["schemas"]

    def schema(status: str) -> dict[str, Any]:
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        return dict(schemas[ref.rsplit("/", 1)[1]])

    retired = schema("409")
    assert retired["properties"]["type"]["const"] == f"{T}targets-retired"
    assert retired["properties"]["gateways"] == {"type": "array", "items": {"type": "string"},
                                                 "title": "Gateways"}
    assert {"terminals", "gateways", "detail"} <= set(retired["required"])
    assert {"kind", "ref", "user"} <= set(schema("403")["properties"])
    assert schema("404")["properties"]["type"]["const"] == f"{T}unknown-entry"
    assert schema("422")["properties"]["type"]["const"] == f"{T}no-target"


def test_type_and_fields_come_from_the_class() -> None:
    """The type is the class's name kebab-cased without `Error`; tuples become lists; a field
    that would hide a problem member is refused."""

    class GatewayPairMismatchError(DetailedError):
        template = "{gws}"
        gws: tuple[str, ...]

    class ClashError(DetailedError):
        template = "{status}"
        status: int

    assert problem_type(GatewayPairMismatchError) == f"{T}gateway-pair-mismatch"
    assert problem_fields(GatewayPairMismatchError(("a", "b"))) == {"gws": ["a", "b"]}
    assert problem_fields(ValueError("x")) == {}
    with pytest.raises(ReservedFieldError, match="status"):
        problem_fields(ClashError(1))


class RefusalError(Exception):
    """A base answered by one handler, as `RetireError` is: its subclasses carry the fields."""


def test_a_class_that_would_hide_a_problem_member_is_refused_at_install() -> None:
    """`install_problems` refuses a class declaring `detail`, also when it is a subclass of the
    class installed, before it installs any handler of the table."""

    class DetailError(DetailedError):
        template = "{detail}"
        detail: str

    class ClashingRefusalError(RefusalError, DetailedError):
        template = "{gw}: {title}"
        gw: str
        title: str

    class FineError(DetailedError):
        template = "{gw}"
        gw: str

    app = FastAPI()
    with pytest.raises(ReservedFieldError, match=r"DetailError: field\(s\) detail would hide"):
        install_problems(app, {FineError: (409, "Fine"), DetailError: (422, "Refused")})
    with pytest.raises(ReservedFieldError, match=r"\.ClashingRefusalError: field\(s\) title would"):
        install_problems(app, {RefusalError: (409, "Refused")})
    assert FineError not in app.exception_handlers
    assert RefusalError not in app.exception_handlers
    install_problems(app, {FineError: (409, "Fine")})
    assert FineError in app.exception_handlers


def test_each_class_is_checked_once_and_its_responses_are_unchanged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fields of an error class are read and checked at install, not again per response;
    the body is the problem's members, then the error's kind and fields; headers pass."""

    class GatewayGoneError(DetailedError):
        template = "gateway {gw} is gone"
        kind = "gateway"
        gw: str
        ids: tuple[int, ...] = ()

    real_fields = dataclasses.fields
    read: list[object] = []

    def counted(cls: Any) -> Any:
        read.append(cls)
        return real_fields(cls)

    monkeypatch.setattr(dataclasses, "fields", counted)  # the real function, only counted
    install_problems(FastAPI(), {GatewayGoneError: (410, "Gone")})
    for _ in range(3):
        r = error_problem(410, "Gone", GatewayGoneError("gw-1", (2, 1)), {"Retry-After": "5"})
        assert r.body == (b'{"type":"urn:fieldlink:problem:gateway-gone","title":"Gone",'
                          b'"status":410,"detail":"gateway gw-1 is gone","kind":"gateway",'
                          b'"gw":"gw-1","ids":[2,1]}')
        assert (r.status_code, r.media_type, r.headers["retry-after"]) == (
            410, "application/problem+json", "5")
    assert read.count(GatewayGoneError) == 1


def test_no_error_class_the_app_answers_hides_a_problem_member(tmp_path: Path) -> None:
    """Every class central answers with a handler (those written by hand beside
    `install_problems` too), and its subclasses, passes the check."""
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/c.db",
                              command_key_path=tmp_path / "key.pem", pki_dir=tmp_path / "pki"),
                     run_ingest=False)
    classes = [c for c in app.exception_handlers if isinstance(c, type)]
    assert len(classes) >= 10
    for cls in classes:
        check_problem_fields(cls)
