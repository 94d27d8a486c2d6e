"""Supervised tasks with restart back-off, for both programs (STYLE.md §3).

`supervise` is the one place of each program that catches `Exception`: a task that crashes is
logged (`task_crashed`, with the traceback), one that returns although it should run for ever
is logged (`task_exited`), and either is started again after a delay. The delay doubles from
`Backoff.first_s` up to `Backoff.max_s`, each wait jittered so that tasks failing together do
not restart in step, and starts over from `first_s` once a run lasted `healthy_after_s`: a
task that fails at once is not restarted in a tight loop, one that failed after a day of work
comes back quickly.

A task that cannot run for a reason outside the program, which one line says (a port in use,
a device not there), raises `TaskUnavailableError`: that is logged as one WARNING
(`task_unavailable`, no traceback) when the reason is new, at DEBUG while it stays the same,
and retried with the same back-off.

Example::

    async with asyncio.TaskGroup() as tg:
        tg.create_task(supervise("uplink.mqtt", uplink.run, on_restart=count), name="uplink.mqtt")
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


class TaskUnavailableError(Exception):
    """The task cannot run now for a reason outside the program, said in its message (see the
    module doc); a package's such error inherits from its own base and from this."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long `supervise` waits before a restart (see the module doc). `jitter` is the
    fraction a wait may be shortened by at random (0: exact delays)."""

    first_s: float = 1.0
    max_s: float = 60.0
    healthy_after_s: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError("need 0 < first_s <= max_s")
        if not 0 <= self.jitter < 1:
            raise ValueError("need 0 <= jitter < 1")

    def next_delay(self, delay: float) -> float:
        """The delay after `delay`: doubled, at most `max_s`."""
        return min(delay * 2, self.max_s)

    def wait_s(self, delay: float) -> float:
        """The wait for `delay`, jittered."""
        return delay * random.uniform(1 - self.jitter, 1)


async def supervise(name: str, run: Callable[[], Awaitable[None]], *,
                    backoff: Backoff = Backoff(),
                    on_restart: Callable[[str], None] | None = None) -> None:
    """Run `run()` for ever under `name`; restart it with back-off when it crashes or returns,
    calling `on_restart(name)` each time (to count restarts). Cancelling stops it."""
    delay = backoff.first_s
    said: str | None = None  # the reason of the last `task_unavailable` line
    while True:
        started = time.monotonic()
        error: Exception | None = None
        try:
            await run()
        except Exception as exc:  # the one catch-all of the program (module doc)
            error = exc
        if time.monotonic() - started >= backoff.healthy_after_s:
            delay, said = backoff.first_s, None
        wait = backoff.wait_s(delay)
        said = _log_restart(name, error, round(wait, 3), said)
        error = None  # no reference cycle through the traceback while waiting
        if on_restart is not None:
            on_restart(name)
        await asyncio.sleep(wait)
        delay = backoff.next_delay(delay)


def _log_restart(name: str, error: Exception | None, wait: float, said: str | None) -> str | None:
    """Log why `name` restarts (see the module doc); returns the unavailable reason said."""
    if isinstance(error, TaskUnavailableError):
        reason = str(error)
        level = log.debug if reason == said else log.warning
        level("task_unavailable", task=name, reason=reason, restart_in_s=wait)
        return reason
    if error is not None:
        log.error("task_crashed", task=name, restart_in_s=wait, exc_info=error)
    else:
        log.error("task_exited", task=name, restart_in_s=wait)
    return None


def start(name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """A named task running `run` under `supervise` with the default back-off."""
    return asyncio.create_task(supervise(name, run), name=name)


async def every(interval_s: float, step: Callable[[], Awaitable[object]], *, name: str,
                errors: type[BaseException] | tuple[type[BaseException], ...],
                on_error: Callable[[BaseException], None] | None = None) -> None:
    """Run `step()` every `interval_s` for ever. One of `errors` is an outage of the step,
    logged once when it starts (`{name}_failed`) and once when it ends (`{name}_recovered`),
    and handed to `on_error` every time (to count it); any other error ends the loop, for its
    supervisor."""
    failing = False
    while True:
        try:
            await step()
            if failing:
                log.info(f"{name}_recovered")
            failing = False
        except errors as exc:
            if on_error is not None:
                on_error(exc)
            if not failing:
                log.error(f"{name}_failed", error=str(exc))
            failing = True
        await asyncio.sleep(interval_s)


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (if any) and wait until it has finished."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


__all__ = ["Backoff", "TaskUnavailableError", "every", "start", "stop", "supervise"]
