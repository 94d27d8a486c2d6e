"""Central's background tasks (STYLE.md §3): each long-running loop is started under the
runtime's supervisor (`runtime.tasks.supervise`: restart with jittered, capped back-off, the
only place that catches `Exception`), so a bug in one loop never takes the server down.
`every` (a periodic step whose errors are an outage) and `stop` (cancel one and wait for it)
come from the runtime too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from runtime.tasks import every, stop, supervise


def start(name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """A named, supervised task."""
    return asyncio.create_task(supervise(name, run), name=name)


__all__ = ["every", "start", "stop"]
