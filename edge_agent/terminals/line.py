"""The line to one terminal, TCP or serial (FLT/1 §2): `open_line(config)` gives a `Line` whose
`read()` returns the next bytes or raises `TerminalLineError` when the line fails or ends, and
whose `write()` puts a frame on it. Nothing blocks the event loop: TCP is asyncio's streams;
a serial port is opened in a thread (`runtime.serial.open_serial`, `exclusive`), read from the
loop (`LineReader`) and written with `os.write` on its non-blocking fd, waiting for
`add_writer` when the driver's buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import serial

from edge_agent.terminals.config import TerminalConfig
from edge_agent.terminals.errors import TerminalLineError
from runtime.serial import LineReader, PortLostError, open_serial, write_all

READ_SIZE = 4096


class Line(Protocol):
    endpoint: str

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class TcpLine:
    def __init__(self, endpoint: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.endpoint = endpoint
        self._reader, self._writer = reader, writer

    async def read(self) -> bytes:
        try:
            data = await self._reader.read(READ_SIZE)
        except OSError as exc:
            raise TerminalLineError(self.endpoint, f"read failed: {exc}") from exc
        if not data:
            raise TerminalLineError(self.endpoint, "closed by the terminal")
        return data

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as exc:
            raise TerminalLineError(self.endpoint, f"write failed: {exc}") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class SerialLine:
    def __init__(self, endpoint: str, port: serial.Serial) -> None:
        self.endpoint = endpoint
        self._port = port
        self._reader = LineReader(port)
        self._fd: int | None = self._reader.fd

    async def read(self) -> bytes:
        try:
            return await self._reader.read()
        except PortLostError as exc:
            self._fd = None
            raise TerminalLineError(self.endpoint, exc.reason) from exc

    async def write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise TerminalLineError(self.endpoint, "lost")
        try:
            await write_all(fd, data)
        except OSError as exc:
            raise TerminalLineError(self.endpoint, f"write failed: {exc}") from exc

    async def close(self) -> None:
        self._reader.stop()
        self._fd = None
        with contextlib.suppress(OSError, serial.SerialException):
            await asyncio.to_thread(self._port.close)


async def open_line(config: TerminalConfig) -> Line:
    """Connect to the terminal of `config`; raises `TerminalLineError`."""
    endpoint = config.endpoint
    if config.serial is not None:
        port = await open_serial(config.serial, lambda path, why: TerminalLineError(endpoint, why),
                                 baudrate=config.baudrate)
        return SerialLine(endpoint, port)
    host, port_no = config.host_port
    try:
        async with asyncio.timeout(config.connect_timeout_s):
            reader, writer = await asyncio.open_connection(host, port_no)
    except TimeoutError:
        raise TerminalLineError(endpoint, f"no connection in {config.connect_timeout_s} s") \
            from None
    except OSError as exc:
        raise TerminalLineError(endpoint, f"connect failed: {exc}") from exc
    return TcpLine(endpoint, reader, writer)


__all__ = ["Line", "SerialLine", "TcpLine", "open_line"]
