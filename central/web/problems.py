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
(`documented`) all come from that declaration. A field named as a problem member (`detail`,
`status`, ...) would hide that member: `install_problems` refuses such a class, or a subclass
of it, at startup (`ReservedFieldError`), and a class answered otherwise is checked at its
first response; each class is checked once."""

from __future__ import annotations

import dataclasses
import re
import typing
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
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
# Each error class's fields, checked against RESERVED once (weak: a class that goes goes too)
_FIELDS: weakref.WeakKeyDictionary[type, tuple[dataclasses.Field[Any], ...]] = (
    weakref.WeakKeyDictionary())


class ReservedFieldError(TypeError, DetailedError):
    """An error class declares a field by the name of a problem member, which it would hide
    (a programming error: rename the field)."""

    template = "{cls}: field(s) {names} would hide the problem members of the same name"
    cls: str
    names: str  # comma-separated


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None, *,
            type_: str = "about:blank", members: Mapping[str, object] | None = None,
            ) -> JSONResponse:
    """A problem response with the given status, title and detail; an error's `type_` and
    extension `members` (`error_problem`) beside."""
    body: dict[str, object] = {"type": type_, "title": title, "status": status,
                               "detail": detail}
    if members:
        body.update(members)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def error_problem(status: int, title: str, exc: BaseException,
                  headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem response for `exc`: its message as `detail`, its type and fields beside."""
    return problem(status, title, str(exc), headers, type_=problem_type(type(exc)),
                   members=problem_fields(exc))


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
    """`cls`'s fields; raises `ReservedFieldError` if one would hide a problem member."""
    fields = _FIELDS.get(cls)
    if fields is None:  # a class's fields are fixed once it is defined: checked once
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # a dataclass (__init_subclass__)
        clash = RESERVED.intersection(f.name for f in fields)
        if clash:
            raise ReservedFieldError(f"{cls.__module__}.{cls.__qualname__}",
                                     ", ".join(sorted(clash)))
        _FIELDS[cls] = fields
    return fields


def check_problem_fields(cls: type[BaseException]) -> None:
    """Raise `ReservedFieldError` if `cls` or a subclass of it defined so far declares a field
    that would hide a problem member (a subclass defined later is checked at its first
    response)."""
    for c in _with_subclasses(cls):
        if issubclass(c, DetailedError):
            _declared(c)


def _with_subclasses(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _with_subclasses(sub)


def install_problems(app: FastAPI, table: Mapping[type[Exception], tuple[int, str]]) -> None:
    """Answer each error class in `table` with its (status, title), the error's message, type
    and fields. Raises `ReservedFieldError` for a class (or a subclass) whose fields would hide
    a problem member.

    Example: `install_problems(app, {WeakPasswordError: (422, "Password refused")})`."""
    for exc_type in table:
        check_problem_fields(exc_type)
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
