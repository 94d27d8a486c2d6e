"""Modbus transports: the thin I/O shell around pymodbus; decoding stays in `protocols/`.

A transport reads raw registers (or bits) and writes them; it knows nothing about points.
Several devices may sit behind one endpoint (unit ids behind a TCP gateway, slaves on one
RS-485 bus), so `TransportPool` hands out one transport per endpoint and each transport
serialises its requests with a lock. For Modbus RTU the pool keeps one `SerialBus` per serial
port (`edge_agent.field.bus`) and hands each device a view of it that carries the device's own
timeout. Library exceptions are translated into the `TransportError` family
(`edge_agent.field.errors`), chained with `from`.

pymodbus's own reconnect loop and retries are switched off (`reconnect_delay=0`,
`retries=0`): the poller owns the back-off so that it can log failure once and keep health.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from edge_agent.config.site import RtuTransportConfig, TcpTransportConfig, TransportConfig
from edge_agent.field.bus import SerialBus
from edge_agent.field.errors import ModbusExceptionError, TransportError, TransportTimeoutError
from edge_agent.field.pymodbus_link import PymodbusLink, Request, answer_values

__all__ = [
    "ModbusTcpTransport", "ModbusTransport", "TransportPool", "endpoint_of", "open_transport",
]


class ModbusTransport(Protocol):
    """What the poller and command executor need from a Modbus link (TCP now, RTU later)."""

    @property
    def endpoint(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def read(self, function: int, start: int, count: int, *, device_id: int) -> list[int]:
        """Registers (function 3/4) or bits as 0/1 (function 1/2), exactly `count` of them."""
        ...

    async def write(self, function: int, address: int, values: Sequence[int], *,
                    device_id: int) -> None:
        """Write coils (function 1: 0/1 values) or holding registers (function 3)."""
        ...

    async def close(self) -> None: ...


class ModbusTcpTransport(PymodbusLink[AsyncModbusTcpClient]):
    """Modbus TCP through pymodbus's `AsyncModbusTcpClient`; one connection, one request
    at a time (many devices and serial gateways handle only one)."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0) -> None:
        self._host = host
        self._port = port
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._open_timeout_s = timeout_s + 1.0

    @property
    def endpoint(self) -> str:
        return f"tcp://{self._host}:{self._port}"

    def _new_client(self) -> AsyncModbusTcpClient:
        return AsyncModbusTcpClient(self._host, port=self._port, timeout=self._timeout_s,
                                    retries=0, reconnect_delay=0, name=self.endpoint)

    async def read(self, function: int, start: int, count: int, *, device_id: int) -> list[int]:
        request = self._read_call(function, start, count, device_id=device_id)
        async with self._lock:
            rsp = await self._request(function, request)
            values, short = answer_values(rsp, function, count)
            if short is not None:
                raise TransportError(self.endpoint, f"short response: {short}")
            return values

    async def write(self, function: int, address: int, values: Sequence[int], *,
                    device_id: int) -> None:
        request = self._write_call(function, address, values, device_id=device_id)
        async with self._lock:
            await self._request(function, request)

    async def _request(self, function: int, request: Request) -> ModbusPDU:
        """The answer to `request` (connecting first); a Modbus exception response raises."""
        await self._connect_locked()
        assert self._client is not None
        no_answer = f"no answer within {self._timeout_s} s"
        # The guard timeout covers pymodbus paths that do not honour its own timeout.
        try:
            async with asyncio.timeout(self._timeout_s + 1.0):
                rsp = await request(self._client)
        except TimeoutError as exc:
            self._drop()
            raise TransportTimeoutError(self.endpoint, no_answer) from exc
        except (ModbusException, OSError) as exc:
            # A missing answer leaves the stream out of step: reconnect before the next try.
            self._drop()
            raise self._translate(exc, lost="connection lost", no_answer=no_answer) from exc
        if rsp.isError():
            raise ModbusExceptionError(self.endpoint, function, rsp.exception_code)
        return rsp

    async def close(self) -> None:
        async with self._lock:
            self._drop()


def endpoint_of(cfg: TransportConfig) -> str:
    return cfg.endpoint


def open_transport(cfg: TransportConfig, *, timeout_s: float) -> ModbusTransport:
    """A transport for one endpoint; it connects lazily on the first request.

    For RTU it is a whole `SerialBus` (its `read`/`write` take `device_id` like any transport);
    devices that share the port should share it through `TransportPool`.
    """
    if isinstance(cfg, TcpTransportConfig):
        return ModbusTcpTransport(cfg.host, cfg.port, timeout_s=timeout_s)
    if isinstance(cfg, RtuTransportConfig):
        return SerialBus.from_config(cfg, timeout_s=timeout_s)
    # An HJ 212 station is not a Modbus link: the supervisor runs an Hj212Station for it.
    raise TypeError(f"not a Modbus transport: {cfg!r}")


class TransportPool:
    """One transport per endpoint, shared by the devices behind it; closes them all.

    A serial port is one endpoint: every RTU device on it gets its own view of the one
    `SerialBus` (same bus, the device's own timeout), so the bus can take turns between them.
    """

    def __init__(self) -> None:
        self._by_endpoint: dict[str, ModbusTransport] = {}

    def get(self, cfg: TransportConfig, *, timeout_s: float) -> ModbusTransport:
        key = endpoint_of(cfg)
        if key not in self._by_endpoint:
            self._by_endpoint[key] = open_transport(cfg, timeout_s=timeout_s)
        transport = self._by_endpoint[key]
        if isinstance(cfg, RtuTransportConfig):
            assert isinstance(transport, SerialBus)
            return transport.view(timeout_s=timeout_s)
        return transport

    def serial_buses(self) -> list[SerialBus]:
        """The RTU buses opened so far (for their per-device counters)."""
        return [t for t in self._by_endpoint.values() if isinstance(t, SerialBus)]

    async def close(self) -> None:
        for transport in self._by_endpoint.values():
            await transport.close()
        self._by_endpoint.clear()
