"""Problem responses (RFC 9457 `application/problem+json`) that every API module sends, and one
table-driven way to answer an error class with one.

An error answered with `error_problem` carries, beside the English `detail` (which the CLI and
people read), what a program needs without parsing that text (RFC 9457 §3.2 extension members):

- `type`: `urn:fieldlink:problem:<name>`, the error class's name without `Error`, kebab-cased
  (`TargetsRetiredError` -> `urn:fieldlink:problem:targets-retired`); renaming a class is an
  API change, so tests pin the types clients use;
- the error's fields (a `DetailedError`'s declared fields, tuples as JSON arrays) and its
  `kind` when it has one (what sort of object a `NotFoundError` or `DuplicateError` names).

The error class declares its fields once; its message, its problem body and the OpenAPI schema
(`documented`) all come from that declaration."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, create_model

from protocols.errors import DetailedError

PROBLEM = "application/problem+json"
TYPE_PREFIX = "urn:fieldlink:problem:"
# RFC 9457's own members and ours: an error field by one of these names would hide it
RESERVED = frozenset({"type", "title", "status", "detail", "instance", "errors"})


def problem(status: int, title: str, detail: str,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem response with the given status, title and detail."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status,
                         "detail": detail}, status_code=status, media_type=PROBLEM,
                        headers=headers)


def error_problem(status: int, title: str, exc: BaseException,
                  headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem response for `exc`: its message as `detail`, its type and fields beside."""
    body: dict[str, object] = {"type": problem_type(type(exc)), "title": title,
                               "status": status, "detail": str(exc)}
    body.update(problem_fields(exc))
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def problem_type(cls: type[BaseException]) -> str:
    """`urn:fieldlink:problem:targets-retired` for `TargetsRetiredError`."""
    name = cls.__name__.removesuffix("Error") or cls.__name__
    return TYPE_PREFIX + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def problem_fields(exc: BaseException) -> dict[str, object]:
    """The error's declared fields (and `kind`), as JSON values; none for an undeclared one."""
    if not isinstance(exc, DetailedError):
        return {}
    out: dict[str, object] = {}
    if isinstance(getattr(exc, "kind", None), str):
        out["kind"] = exc.kind  # type: ignore[attr-defined]
    for f in _declared(type(exc)):
        out[f.name] = jsonable_encoder(getattr(exc, f.name))
    return out


def _declared(cls: type[DetailedError]) -> tuple[dataclasses.Field[Any], ...]:
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # a dataclass: __init_subclass__
    clash = RESERVED.intersection(f.name for f in fields)
    if clash:  # a programming error, caught by the first test that raises it
        raise TypeError(f"{cls.__name__}: field(s) {sorted(clash)} would hide problem members")
    return fields


def install_problems(app: FastAPI, table: Mapping[type[Exception], tuple[int, str]]) -> None:
    """Answer each error class in `table` with its (status, title), the error's message, type
    and fields.

    Example: `install_problems(app, {WeakPasswordError: (422, "Password refused")})`."""
    for exc_type, (status, title) in table.items():
        app.add_exception_handler(exc_type, _handler(status, title))


def _handler(status: int, title: str) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(_: Request, exc: Exception) -> Response:
        return error_problem(status, title, exc)

    return handle


# --- OpenAPI --------------------------------------------------------------------------------


class _ProblemBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    status: int
    detail: str


def problem_model(cls: type[Exception]) -> type[BaseModel]:
    """The schema of `cls`'s problem body: its `type` constant and its fields."""
    hints = typing.get_type_hints(cls) if issubclass(cls, DetailedError) else {}
    members: dict[str, Any] = {"type": (Literal[problem_type(cls)], ...)}
    if issubclass(cls, DetailedError):
        if isinstance(getattr(cls, "kind", None), str):
            members["kind"] = (str, ...)
        for f in _declared(cls):
            members[f.name] = (hints[f.name], ... if f.default is dataclasses.MISSING
                               else f.default)
    return create_model(f"{cls.__name__.removesuffix('Error')}Problem", __base__=_ProblemBase,
                        __doc__=(cls.__doc__ or "").strip() or None, **members)


def documented(table: Mapping[int, tuple[str, tuple[type[Exception], ...]]],
               ) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: per status its description and the problem schema of each
    error class that answers with it (several: one of them).

    Example: `documented({409: ("Every target's gateway retired", (TargetsRetiredError,))})`."""
    out: dict[int | str, dict[str, Any]] = {}
    for status, (description, classes) in table.items():
        models = [problem_model(c) for c in classes]
        model: Any = models[0] if len(models) == 1 else typing.Union[tuple(models)]  # noqa: UP007
        out[status] = {"model": model, "description": description}
    return out
