"""One database connection owned by one thread (STYLE.md §4), for central's blocking drivers.

`DbThread` runs every call on a single-worker executor, so a connection opened there is only
ever touched by that thread and writes are serialised without locks. `open(fn)` starts the
thread and runs `fn` on it (stopping the thread again if `fn` fails), `close(fn)` runs `fn`
and stops it, `call(fn, *args)` runs `fn` there and raises `not_open()` while closed. The
SQLite storage and the command store each own one.

Example::

    thread = DbThread("central-sqlite", lambda: StorageError("storage is not open"))
    await thread.open(open_connection)
    rows = await thread.call(query, "gw-1")
    await thread.close(close_connection)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class DbThread:
    def __init__(self, name: str, not_open: Callable[[], BaseException]) -> None:
        self.name = name
        self._not_open = not_open
        self._executor: ThreadPoolExecutor | None = None

    async def open(self, fn: Callable[[], Any]) -> None:
        """Start the thread and run `fn` on it; a no-op when already open."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        try:
            await self.call(fn)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the thread, then stop it; a no-op when closed."""
        if self._executor is None:
            return
        try:
            await self.call(fn)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise self._not_open()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
