"""Opening a serial port from asyncio without blocking the loop or leaking the port.

pyserial's open is a blocking call (it can wait on a USB adapter), so it runs in a thread. If
the caller is cancelled meanwhile, the thread still finishes opening: the port is closed as
soon as it does, instead of staying open with nobody reading it (and, being `exclusive`,
locking the next attempt out).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import serial


async def open_serial(path: str, error: Callable[[str, str], Exception],
                      **settings: Any) -> serial.Serial:
    """`serial.Serial(path, timeout=0, exclusive=True, **settings)`, opened in a thread; a
    failure is raised as `error(path, reason)`."""
    def open_port() -> serial.Serial:
        try:
            return serial.Serial(path, timeout=0, exclusive=True, **settings)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise error(path, str(exc)) from exc

    task = asyncio.ensure_future(asyncio.to_thread(open_port))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(
            lambda t: t.cancelled() or t.exception() is not None or t.result().close())
        raise


__all__ = ["open_serial"]
