"""Central's background tasks: one supervisor loop and one way to stop a task (STYLE.md §3).

`supervise` is the only place in central that catches `Exception`: it logs the crash and
restarts the loop after a pause, so a bug in one loop never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


async def supervise(name: str, run: Callable[[], Awaitable[None]], *,
                    restart_after_s: float = 1.0) -> None:
    """Run `run()` for ever; on a crash, log `task_crashed` and start it again."""
    while True:
        try:
            await run()
        except Exception:
            log.exception("task_crashed", task=name)
            await asyncio.sleep(restart_after_s)


def start(name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """A named, supervised task."""
    return asyncio.create_task(supervise(name, run), name=name)


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (if any) and wait until it has finished."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def every(interval_s: float, step: Callable[[], Awaitable[object]], *, name: str,
                errors: type[BaseException] | tuple[type[BaseException], ...]) -> None:
    """Run `step()` every `interval_s` for ever. One of `errors` is an outage of the step,
    logged once when it starts (`{name}_failed`) and once when it ends (`{name}_recovered`)."""
    failing = False
    while True:
        try:
            await step()
            if failing:
                log.info(f"{name}_recovered")
            failing = False
        except errors as exc:
            if not failing:
                log.error(f"{name}_failed", error=str(exc))
            failing = True
        await asyncio.sleep(interval_s)
