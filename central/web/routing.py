"""What the API modules' routes share: the strict body model, the app's storage and audit log,
and running a storage step together with its audit row."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from central.identity.audit import AuditLog
from central.storage import Storage
from central.storage.program import Program

T = TypeVar("T")


class StrictModel(BaseModel):
    """A request or response body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


def storage_of(request: Request) -> Storage:
    return request.app.state.storage


def audit_of(request: Request) -> AuditLog:
    return request.app.state.audit


async def run_audited(request: Request, actor: str, action: str, target: str,
                      step: Callable[[], Program[T]],
                      detail: Callable[[T], Mapping[str, Any]]) -> T:
    """Run `step` and append its audit row (`detail` of the step's result) in one transaction."""
    audit = audit_of(request)

    def program() -> Program[T]:
        result = yield from step()
        yield from audit.program(actor, action, target, detail(result))
        return result

    return await storage_of(request).run(program)
