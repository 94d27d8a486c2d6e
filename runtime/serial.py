"""A serial port under asyncio: opened without blocking the loop or leaking the port, and read
from the event loop.

pyserial's open is a blocking call (it can wait on a USB adapter), so `open_serial` runs it in
a thread. If the caller is cancelled meanwhile, the thread still finishes opening: the port is
closed as soon as it does, instead of staying open with nobody reading it (and, being
`exclusive`, locking the next attempt out).

`PortReader` reads the open port's non-blocking fd with `loop.add_reader`, so nothing blocks
the loop either: each chunk goes to `on_data`, and a port that fails (EIO: the USB adapter
went away, the pty's far end closed) or ends is reported once to `on_lost` with the reason,
after which it is no longer read. `LineReader` is the same for a session loop that awaits
`read()`, which raises `PortLostError` instead. `write_all` writes the same non-blocking fd
from the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import serial

from protocols.errors import DetailedError

READ_SIZE = 4096


class SerialPortError(DetailedError):
    """A serial port that cannot be opened or was lost: `port` names it, `reason` says why. A
    package's port error inherits from its own base and from this."""

    template = "{port}: {reason}"
    port: str
    reason: str


class PortLostError(DetailedError):
    """The open port failed or ended; `reason` says how (`read failed: …`, `end of file`)."""

    template = "{reason}"
    reason: str


@dataclass(frozen=True, slots=True)
class LineSettings:
    """A serial line's speed and character framing: the four settings pyserial and pymodbus
    take, by these names (`kwargs()`)."""

    baudrate: int = 9600
    bytesize: int = serial.EIGHTBITS
    parity: str = serial.PARITY_NONE
    stopbits: int = serial.STOPBITS_ONE

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def open_serial(path: str, error: Callable[[str, str], Exception], *,
                      baudrate: int = 9600, bytesize: int = serial.EIGHTBITS,
                      parity: str = serial.PARITY_NONE,
                      stopbits: float = serial.STOPBITS_ONE) -> serial.Serial:
    """`serial.Serial(path, timeout=0, exclusive=True, …)`, opened in a thread; a failure is
    raised as `error(path, reason)`."""
    def open_port() -> serial.Serial:
        try:
            return serial.Serial(path, baudrate=baudrate, bytesize=bytesize, parity=parity,
                                 stopbits=stopbits, timeout=0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise error(path, str(exc)) from exc

    task = asyncio.ensure_future(asyncio.to_thread(open_port))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_when_opened)
        raise


def _close_when_opened(task: asyncio.Future[serial.Serial]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class PortReader:
    """Reads an open port from the event loop until `stop()` or until it is lost (see the
    module doc); a context manager that stops on exit. The fd is made non-blocking."""

    def __init__(self, port: serial.Serial, *, on_data: Callable[[bytes], None],
                 on_lost: Callable[[str], None]) -> None:
        self.fd: int = port.fileno()
        self._on_data = on_data
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self.fd, False)
        self._reading = True
        self._loop.add_reader(self.fd, self._readable)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop reading (idempotent)."""
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.fd)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: the USB adapter went away, the pty's far end closed
            self._lost(f"read failed: {exc}")
            return
        if not data:
            self._lost("end of file")
            return
        self._on_data(data)

    def _lost(self, reason: str) -> None:
        self.stop()
        self._on_lost(reason)


class LineReader(PortReader):
    """A `PortReader` whose chunks are awaited: `read()` returns the next one, or raises
    `PortLostError` once the port is lost."""

    def __init__(self, port: serial.Serial) -> None:
        self._queue: asyncio.Queue[bytes | PortLostError] = asyncio.Queue()
        super().__init__(port, on_data=self._queue.put_nowait,
                         on_lost=lambda reason: self._queue.put_nowait(PortLostError(reason)))

    async def read(self) -> bytes:
        item = await self._queue.get()
        if isinstance(item, PortLostError):
            raise item
        return item


async def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the non-blocking `fd` from the event loop, waiting for
    `add_writer` while the driver's buffer is full; a failed write raises its `OSError`."""
    view = memoryview(data)
    loop = asyncio.get_running_loop()
    while view:
        try:
            view = view[os.write(fd, view):]
        except (BlockingIOError, InterruptedError):
            pass
        if view:  # the line is full: wait until the driver takes more
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _wake, writable)
            try:
                await writable
            finally:
                loop.remove_writer(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


__all__ = ["READ_SIZE", "LineReader", "LineSettings", "PortLostError", "PortReader", "open_serial",
           "write_all"]
