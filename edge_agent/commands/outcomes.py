"""How a command's handler ends a command other than with `succeeded` (DESIGN.md §6).

The executor (`edge_agent.commands.executor`) turns these into reports: `CommandRejected` from a
handler's checks into `rejected`, `CommandFailed` from its action into `failed`, each with its
reason, detail and data. `CommandDeferred` from an action leaves the command `executing`: the
handler reports the final state later itself (`CommandExecutor.settle`), as `apply_config`
does after the agent restarts with the new config (`KindHandler.resumes` keeps the executor's
crash recovery from calling it interrupted).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from edge_agent import EdgeError
from protocols.command_results import Reason
from protocols.commands import Command

Action = Callable[[], Awaitable[dict[str, Any]]]


class CommandOutcome(EdgeError):
    """A command that ends in a report other than `succeeded`, with its reason, detail and
    the report's data."""

    def __init__(self, reason: Reason, detail: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.data = dict(data or {})


class CommandRejected(CommandOutcome):
    """A kind-specific check refused the command (becomes a `rejected` report)."""


class CommandFailed(CommandOutcome):
    """Execution failed (becomes a `failed` report)."""


class CommandDeferred(EdgeError):
    """The action has started something whose outcome its handler reports later."""


class KindHandler(Protocol):
    """A command kind handled outside the executor."""

    def prepare(self, cmd: Command) -> Action:
        """Check `cmd` against this gateway (raise `CommandRejected`); return its action."""
        ...

    def resumes(self, cmd_id: str) -> bool:
        """Whether an unfinished `cmd_id` found after a restart is this handler's to finish."""
        ...
