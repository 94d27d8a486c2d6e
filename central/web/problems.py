"""Problem responses (RFC 9457 `application/problem+json`) that every API module sends, and one
table-driven way to answer an error class with one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem response with the given status, title and detail."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status,
                         "detail": detail}, status_code=status, media_type=PROBLEM,
                        headers=headers)


def install_problems(app: FastAPI, table: Mapping[type[Exception], tuple[int, str]]) -> None:
    """Answer each error class in `table` with its (status, title) and the error's message.

    Example: `install_problems(app, {WeakPasswordError: (422, "Password refused")})`."""
    for exc_type, (status, title) in table.items():
        app.add_exception_handler(exc_type, _handler(status, title))


def _handler(status: int, title: str) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(_: Request, exc: Exception) -> Response:
        return problem(status, title, str(exc))

    return handle
