"""The serial port under a narrowband driver (`BeidouTerminal`, `PdtRadio`), and the steps
that wait on it.

`SerialBearer` owns the port: pyserial opens it in a thread (`exclusive=True`, an flock, so a
second owner fails to open it), then the event loop reads the non-blocking fd
(`runtime.serial.PortReader`) and writes it (`runtime.serial.write_all`, which waits for
`add_writer` when the line is full); nothing blocks the loop. What was read goes to the
subclass's `_on_bytes`, which feeds its pure codec and hands what it decodes to `_offer`; a
step registers with `_expect` before it writes, since the answer may come at once.

A port that fails (EIO, the USB adapter unplugged) is closed off the loop, counted and logged
once, and every waiting step fails with `BearerPortError`; the next `open()` opens it again.
A subclass implements `_on_bytes` and may implement the other `_on_*` hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

import serial

from edge_agent.bearers import BearerError, BearerPortError, BearerTimeoutError, SendResult
from runtime.counters import Counters
from runtime.serial import PortReader, open_serial, write_all

E = TypeVar("E")


@dataclass(slots=True)
class BearerCounters(Counters):
    """What every serial bearer counts; each driver's counters add what its device reports."""

    sent: int = 0
    refused: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    port_opens: int = 0
    port_lost: int = 0


C = TypeVar("C", bound=BearerCounters)


@dataclass(slots=True)
class Waiter(Generic[E]):
    wants: Callable[[E], bool]
    future: asyncio.Future[E]


class SerialBearer(Generic[E, C]):
    """A driver's serial port and the steps waiting for events `E` decoded from it, counted in
    the driver's `counters` (`C`); an async context manager. Subclasses set the two log event
    names."""

    EVENT_PORT_OPEN: ClassVar[str]
    EVENT_PORT_LOST: ClassVar[str]

    def __init__(self, port: str, *, baudrate: int, step_timeout_s: float, log: Any,
                 counters: C) -> None:
        self.port = port
        self.counters = counters
        self.baudrate = baudrate
        self.step_timeout_s = step_timeout_s
        self._log = log
        self._serial: serial.Serial | None = None
        self._reader: PortReader | None = None
        self._fd: int | None = None
        self._waiters: list[Waiter[E]] = []
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()  # one write on the line at a time

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    async def open(self) -> None:
        """Open the port if it is not open, then `_on_open()`; raises `BearerPortError`."""
        async with self._open_lock:
            if self._serial is None:
                port = await self._open_serial()
                self._serial = port
                self._on_port_open()
                self._reader = PortReader(port, on_data=self._on_bytes, on_lost=self._lost)
                self._fd = self._reader.fd
                self.counters.port_opens += 1
                self._log.info(self.EVENT_PORT_OPEN, baudrate=self.baudrate)
            await self._on_open()

    async def close(self) -> None:
        self._on_close()
        port = self._detach(BearerPortError(self.port, "closed"))
        if port is not None:
            with contextlib.suppress(OSError, serial.SerialException):
                await asyncio.to_thread(port.close)

    async def _open_serial(self) -> serial.Serial:
        return await open_serial(self.port, BearerPortError, baudrate=self.baudrate)

    def _detach(self, error: BearerError) -> serial.Serial | None:
        """Stop reading the port and fail every waiting step; returns the port to close."""
        port, reader = self._serial, self._reader
        self._serial = self._reader = self._fd = None
        if reader is not None:
            reader.stop()
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self._waiters.clear()
        self._on_detach()
        return port

    def _lost(self, reason: str) -> None:
        port = self._detach(BearerPortError(self.port, reason))
        if port is None:
            return
        self.counters.port_lost += 1
        self._log.warning(self.EVENT_PORT_LOST, error=reason)
        # Closing a tty may wait on the driver: not on the event loop.
        asyncio.get_running_loop().run_in_executor(None, _close_quietly, port)

    def _on_port_open(self) -> None:
        """The port was just opened: start a fresh decoder."""

    async def _on_open(self) -> None:
        """After every `open()`, the port open: connect if the protocol needs it."""

    def _on_detach(self) -> None:
        """The port is closed or lost: forget what belonged to the link."""

    def _on_close(self) -> None:
        """A deliberate close, the port still open if `_fd` is set: say goodbye."""

    # --- reading and writing ---------------------------------------------------------------

    def _on_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._fd is None:
                raise BearerPortError(self.port, "lost while writing")
            try:
                await write_all(self._fd, data)
            except OSError as exc:
                self._lost(f"write failed: {exc}")
                raise BearerPortError(self.port, f"write failed: {exc}") from exc

    # --- waiting steps ---------------------------------------------------------------------

    def _expect(self, wants: Callable[[E], bool]) -> Waiter[E]:
        """Wait for an event; registered before writing, since the answer may come at once."""
        waiter: Waiter[E] = Waiter(wants, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        return waiter

    def _forget(self, waiter: Waiter[E]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _offer(self, event: E, *, first_only: bool = False) -> bool:
        """Hand `event` to every step waiting for it (or the first only); False if none."""
        taken = False
        for waiter in self._waiters:
            if not waiter.future.done() and waiter.wants(event):
                waiter.future.set_result(event)
                taken = True
                if first_only:
                    break
        return taken

    async def _step(self, waiter: Waiter[E], step: str, data: bytes | None = None,
                    timeout_s: float | None = None) -> E:
        """Write `data` (if any) and wait for `waiter`, `step_timeout_s` unless `timeout_s`;
        raises `BearerTimeoutError` naming `step`."""
        timeout = self.step_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                if data is not None:
                    await self._write(data)
                return await waiter.future
        except TimeoutError:
            raise BearerTimeoutError(self.port, step, timeout) from None

    def _counted(self, result: SendResult) -> SendResult:
        """Count the terminal's answer to a send, accepted or refused by reason."""
        if result.accepted:
            self.counters.sent += 1
        else:
            assert result.reason is not None
            self.counters.refused += 1
            by_reason = self.counters.refused_by_reason
            by_reason[result.reason] = by_reason.get(result.reason, 0) + 1
        return result


def _close_quietly(port: serial.Serial) -> None:
    with contextlib.suppress(OSError, serial.SerialException):
        port.close()


__all__ = ["BearerCounters", "SerialBearer", "Waiter"]
