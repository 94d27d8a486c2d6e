"""What the Modbus TCP transport and the RTU bus do alike around one pymodbus client.

Both own one client that opens lazily under a deadline and is dropped when lost, pick the
pymodbus request for a Modbus function code, read the values out of an answer and translate
pymodbus's exceptions into the `TransportError` family (`edge_agent.field.errors`), chained
with `from` by the caller. What differs (the bus's turn-taking, gap, CRC retries and
counters; the TCP guard timeout) stays in `bus.py` and `transports.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from pymodbus.client import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from edge_agent.field.errors import TransportConnectError, TransportError, TransportTimeoutError

ClientT = TypeVar("ClientT", bound=ModbusBaseClient)
Request = Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]

BIT_FUNCTIONS = (1, 2)  # coils, discrete inputs
REGISTER_FUNCTIONS = (3, 4)  # holding, input registers
WRITE_FUNCTIONS = {1: 15, 3: 16}  # table -> the wire function that writes many of it


class PymodbusLink(Generic[ClientT]):
    """Owns one pymodbus client behind a lock: opened on demand within `_open_timeout_s`,
    dropped when lost. A subclass makes the client (`_new_client`) and may act once it opened
    (`_opened`)."""

    _client: ClientT | None = None
    _lock: asyncio.Lock
    _open_timeout_s: float
    _open_failed = "cannot connect"  # the message's head when opening raised
    _open_refused = "cannot connect"  # the message when pymodbus said no

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def _new_client(self) -> ClientT:
        raise NotImplementedError

    def _opened(self) -> None:
        """Called with the lock held once a new client is open."""

    async def connect(self) -> None:
        async with self._lock:
            await self._connect_locked()

    async def _connect_locked(self) -> None:
        """Open a client unless one is open, else `TransportConnectError`."""
        if self.connected:
            return
        self._drop()
        client = self._new_client()
        try:
            async with asyncio.timeout(self._open_timeout_s):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            raise TransportConnectError(self.endpoint, f"{self._open_failed}: {exc}") from exc
        if not ok:
            client.close()
            raise TransportConnectError(self.endpoint, self._open_refused)
        self._client = client
        self._opened()

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @staticmethod
    def _read_call(function: int, start: int, count: int, *, device_id: int) -> Request:
        """The pymodbus call that reads `count` items of table `function` (1-4) from `start`."""
        if function not in BIT_FUNCTIONS + REGISTER_FUNCTIONS:
            raise ValueError(f"not a read function: {function}")

        def call(client: ModbusBaseClient) -> Awaitable[ModbusPDU]:
            method = {1: client.read_coils, 2: client.read_discrete_inputs,
                      3: client.read_holding_registers, 4: client.read_input_registers}[function]
            return method(start, count=count, device_id=device_id)
        return call

    @staticmethod
    def _write_call(function: int, address: int, values: Sequence[int], *, device_id: int,
                    no_response_expected: bool = False) -> Request:
        """The pymodbus call that writes coils (function 1: 0/1 values) or holding registers
        (function 3)."""
        if function == 1:
            bits = [bool(v) for v in values]

            def call(client: ModbusBaseClient) -> Awaitable[ModbusPDU]:
                return client.write_coils(address, bits, device_id=device_id,
                                          no_response_expected=no_response_expected)
            return call
        if function == 3:
            regs = list(values)

            def call_regs(client: ModbusBaseClient) -> Awaitable[ModbusPDU]:
                return client.write_registers(address, regs, device_id=device_id,
                                              no_response_expected=no_response_expected)
            return call_regs
        raise ValueError(f"function {function} is not writable")

    def _translate(self, exc: ModbusException | OSError, *, lost: str,
                   no_answer: str) -> TransportError:
        """A pymodbus (or OS) failure as a `TransportError`: `lost` names a lost link,
        `no_answer` a missing answer (`ModbusIOException`)."""
        if isinstance(exc, ConnectionException):
            return TransportConnectError(self.endpoint, f"{lost}: {exc}")
        if isinstance(exc, ModbusIOException):
            return TransportTimeoutError(self.endpoint, no_answer)
        return TransportError(self.endpoint, str(exc))


def answer_values(rsp: ModbusPDU, function: int, count: int) -> tuple[list[int], str | None]:
    """The first `count` bits (as 0/1) or registers of a read answer, and `"2 of 4 registers"`
    when it holds too few (else None).

    Bits come padded to whole bytes (§6.1: "remaining bits ... padded with zeros"), registers
    exactly (§6.3).
    """
    bits = function in BIT_FUNCTIONS
    items = [int(b) for b in rsp.bits] if bits else list(rsp.registers)
    if len(items) >= count and (bits or len(items) == count):
        return items[:count], None
    return items, f"{len(items)} of {count} {'bits' if bits else 'registers'}"


__all__ = ["WRITE_FUNCTIONS", "PymodbusLink", "Request", "answer_values"]
