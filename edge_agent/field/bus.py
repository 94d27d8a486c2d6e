"""One owner per serial port: the Modbus RTU bus that takes turns between its slaves.

An RS-485 line carries one request/response at a time for every slave on it. `SerialBus`
owns the port through pymodbus's `AsyncModbusSerialClient` (`FramerType.RTU`, no pymodbus
retries or reconnect loop: the agent owns both) and serialises every request behind one FIFO
lock, so devices are served in the order they asked. Before each request the line must have
been silent for the inter-frame gap (t3.5, Modbus over Serial Line V1.02 §2.5.1.1). Each
request waits at most its device's `timeout_s`; pymodbus's own timeout is only a backstop.

Why the healthy devices keep their rate when one slave goes silent: a silent slave costs the
bus one `timeout_s` per *probe*, and the `DevicePoller` of that slave backs off after a failed
cycle (doubling from the poll interval up to `backoff_max_s`) before it probes again, so a dead
slave takes one timeout per back-off period instead of one per cycle. Between probes the FIFO
lock hands the line to the others at once. The bus does not add a second back-off of its own:
two back-offs would compound and the poller's counters would count requests never sent.

What pymodbus does not report, the bus sees through its `trace_packet` hook, which is handed
the receive buffer on every read: the bytes are checked with the pure RTU codec
(`protocols.modbus_rtu`). A whole frame from the addressed slave with a bad CRC ends the wait
at once (pymodbus would drop it silently and wait for its timeout) and is retried
`crc_retries` times; bytes that make no frame count as a framing error. Per-device counters:
requests, responses, timeouts, CRC errors, framing errors and exception codes.

pymodbus drives the port with non-blocking reads and writes from the event loop
(`add_reader`/`add_writer` on the pyserial fd), so nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from edge_agent.config.site import RtuTransportConfig
from edge_agent.field.errors import (
    ModbusExceptionError,
    TransportConnectError,
    TransportCrcError,
    TransportError,
    TransportFramingError,
    TransportTimeoutError,
)
from edge_agent.field.pymodbus_link import WRITE_FUNCTIONS, PymodbusLink, Request, answer_values
from protocols.modbus_rtu import (
    CrcMismatchError,
    Direction,
    FrameError,
    RtuDecoder,
    crc16,
    inter_frame_gap_s,
)
from protocols.stream import NeedData
from runtime.serial import LineSettings

log = structlog.get_logger(__name__)

# pymodbus's own response timeout: never reached, the bus cancels at the device's timeout_s
# (config allows up to 60 s). It also bounds opening the port.
_BACKSTOP_TIMEOUT_S = 61.0


@dataclass(slots=True)
class DeviceBusStats:
    """Counters of one slave address on a bus; the bus counts in its own and hands out copies."""

    device_id: int
    requests: int = 0  # frames sent, retries included
    responses: int = 0  # normal or exception responses received
    timeouts: int = 0
    crc_errors: int = 0
    framing_errors: int = 0  # requests answered by bytes that are no right answer
    exceptions: Counter[int] = field(default_factory=Counter)  # exception code -> count
    consecutive_failures: int = 0
    last_error: str | None = None
    framing_reasons: Counter[str] = field(default_factory=Counter)  # see FRAMING_REASONS

    def copy(self) -> DeviceBusStats:
        return dataclasses.replace(self, exceptions=Counter(self.exceptions),
                                   framing_reasons=Counter(self.framing_reasons))

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "requests": self.requests,
                "responses": self.responses, "timeouts": self.timeouts,
                "crc_errors": self.crc_errors, "framing_errors": self.framing_errors,
                "framing_reasons": dict(sorted(self.framing_reasons.items())),
                "exceptions": {str(k): v for k, v in sorted(self.exceptions.items())},
                "consecutive_failures": self.consecutive_failures,
                "last_error": self.last_error}


@dataclass(slots=True)
class _Exchange:
    """The request on the line now, and what the trace hook saw of its answer."""

    device_id: int
    function: int
    corrupt: asyncio.Future[None]  # set when the addressed slave's answer has a bad CRC
    crc_error: CrcMismatchError | None = None
    noise: bool = False  # bytes that make no frame
    stray: bool = False  # a whole frame answering the previous request (a late answer)
    wrong: TransportFramingError | None = None  # a whole frame for another unit or function
    partial: TransportFramingError | None = None  # the addressed slave's frame, unfinished


class _CorruptAnswer(Exception):
    """Internal: the answer arrived with a bad CRC."""


class SerialBus(PymodbusLink[AsyncModbusSerialClient]):
    """Modbus RTU master on one serial port, shared by every slave on it; async context manager.

    It is itself a `ModbusTransport` (`read`/`write` take `device_id`, and an optional
    `timeout_s`); `view(timeout_s=...)` gives a device its own transport with its timeout.
    The port opens lazily on the first request and reopens after it was lost.
    """

    _open_timeout_s = 5.0
    _open_failed = "cannot open"
    _open_refused = "cannot open the serial port"

    def __init__(self, port: str, *, baudrate: int = 9600, bytesize: int = 8,
                 parity: str = "N", stopbits: int = 1, inter_frame_gap_s: float | None = None,
                 timeout_s: float = 1.0, crc_retries: int = 1) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if crc_retries < 0:
            raise ValueError("crc_retries must not be negative")
        self.port = port
        self.line = LineSettings(baudrate, bytesize, parity, stopbits)
        self.gap_s = (inter_frame_gap_s if inter_frame_gap_s is not None
                      else _default_gap(self.line))
        self.timeout_s = timeout_s
        self.crc_retries = crc_retries
        self._lock = asyncio.Lock()  # FIFO: slaves are served in the order they asked
        self._counters: dict[int, DeviceBusStats] = {}
        self._current: _Exchange | None = None
        self._quiet_since = 0.0  # monotonic time the line last fell silent
        self.stray_frames = 0  # whole frames from a slave nobody was asking (late answers)
        self._previous: tuple[int, int] | None = None  # (unit, function) asked before this one
        self._log = log.bind(endpoint=self.endpoint)

    @classmethod
    def from_config(cls, cfg: RtuTransportConfig, *, timeout_s: float = 1.0) -> SerialBus:
        return cls(cfg.port, baudrate=cfg.baudrate, bytesize=cfg.bytesize, parity=cfg.parity,
                   stopbits=cfg.stopbits, inter_frame_gap_s=cfg.gap_s, timeout_s=timeout_s)

    # --- state ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"rtu://{self.port}"

    def view(self, *, timeout_s: float | None = None) -> BusDevice:
        """A `ModbusTransport` on this bus whose requests wait at most `timeout_s`."""
        return BusDevice(self, timeout_s if timeout_s is not None else self.timeout_s)

    def stats(self, device_id: int) -> DeviceBusStats:
        c = self._counters.get(device_id)
        return c.copy() if c else DeviceBusStats(device_id)

    def all_stats(self) -> dict[int, DeviceBusStats]:
        return {i: c.copy() for i, c in sorted(self._counters.items())}

    # --- lifecycle ------------------------------------------------------------------------

    def _new_client(self) -> AsyncModbusSerialClient:
        return AsyncModbusSerialClient(
            self.port, framer=FramerType.RTU, **self.line.kwargs(), name=self.endpoint,
            reconnect_delay=0, timeout=_BACKSTOP_TIMEOUT_S, retries=0,
            trace_packet=self._trace_packet)

    def _opened(self) -> None:
        self._quiet_since = time.monotonic()
        self._log.info("rtu_bus_opened", baudrate=self.line.baudrate,
                       gap_ms=round(self.gap_s * 1e3, 3))

    async def close(self) -> None:
        async with self._lock:
            if self._client is not None:
                self._drop()
                self._log.info("rtu_bus_closed")

    async def __aenter__(self) -> SerialBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- requests -------------------------------------------------------------------------

    async def read(self, function: int, start: int, count: int, *, device_id: int,
                   timeout_s: float | None = None) -> list[int]:
        """Registers (function 3/4) or bits as 0/1 (function 1/2), exactly `count` of them."""
        call = self._read_call(function, start, count, device_id=device_id)
        rsp = await self._transact(device_id, function, call, timeout_s)
        values, short = answer_values(rsp, function, count)
        if short is not None:
            raise self._framing(self._counters[device_id], TransportFramingError(
                self.endpoint, f"device {device_id}: {short} in the answer",
                reason="too_few_registers"))
        return values

    async def write(self, function: int, address: int, values: Sequence[int], *,
                    device_id: int, timeout_s: float | None = None) -> None:
        """Write coils (function 1: 0/1 values) or holding registers (function 3)."""
        call = self._write_call(function, address, values, device_id=device_id,
                                no_response_expected=device_id == 0)  # broadcast (§2.1)
        await self._transact(device_id, WRITE_FUNCTIONS[function], call, timeout_s)

    async def _transact(self, device_id: int, function: int,
                        call: Request,
                        timeout_s: float | None) -> ModbusPDU:
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        c = self._counters.setdefault(device_id, DeviceBusStats(device_id))
        error: TransportError = TransportCrcError(self.endpoint, "bad CRC")
        async with self._lock:
            for attempt in range(1 + self.crc_retries):
                try:
                    await self._connect_locked()
                except TransportConnectError as exc:
                    raise self._failed(c, exc) from exc.__cause__
                assert self._client is not None
                await self._quiet()
                loop = asyncio.get_running_loop()
                ex = _Exchange(device_id, function, loop.create_future())
                self._current = ex
                c.requests += 1
                try:
                    rsp = await self._await(call(self._client), ex, timeout)
                except _CorruptAnswer:
                    c.crc_errors += 1
                    error = TransportCrcError(self.endpoint, f"device {device_id}: {ex.crc_error}")
                    self._log.debug("rtu_crc_error", device_id=device_id, attempt=attempt,
                                    error=str(ex.crc_error))
                    continue
                except TimeoutError as exc:
                    wrong = ex.wrong or ex.partial or (TransportFramingError(
                        self.endpoint, f"device {device_id}: garbage instead of an answer "
                        f"within {timeout} s") if ex.noise else None)
                    if wrong is not None:
                        raise self._framing(c, wrong) from exc
                    c.timeouts += 1
                    raise self._failed(c, TransportTimeoutError(
                        self.endpoint, f"device {device_id}: no answer within {timeout} s")
                    ) from exc
                except (ModbusException, OSError) as exc:
                    failure = self._translate(exc, lost="port lost",
                                              no_answer=f"device {device_id}: {exc}")
                    if isinstance(failure, TransportTimeoutError):
                        c.timeouts += 1  # the port is fine: keep it open
                    else:
                        self._drop()
                    raise self._failed(c, failure) from exc
                finally:
                    self._current = None
                    self._previous = (device_id, function)
                    self._quiet_since = time.monotonic()
                    if ex.stray:
                        self.stray_frames += 1
                if ex.noise:
                    c.framing_errors += 1  # pymodbus hunted past the garbage to the answer
                    c.framing_reasons["garbage"] += 1
                if device_id == 0:  # broadcast (§2.1): nobody answers
                    return rsp
                c.responses += 1
                if rsp.function_code & 0x7F != function:  # pymodbus takes any function's PDU
                    raise self._framing(c, TransportFramingError(
                        self.endpoint, f"device {device_id}: answer for function "
                        f"{rsp.function_code & 0x7F}, asked {function}", reason="wrong_function"))
                if rsp.isError():
                    code = rsp.exception_code
                    c.exceptions[code] += 1
                    c.consecutive_failures = 0  # the slave is there and talking
                    c.last_error = f"exception code {code}"
                    raise ModbusExceptionError(self.endpoint, function, code)
                c.consecutive_failures = 0
                return rsp
            raise self._failed(c, error)  # every attempt came back corrupted

    def _failed(self, c: DeviceBusStats, error: TransportError) -> TransportError:
        c.consecutive_failures += 1
        c.last_error = error.message
        return error

    def _framing(self, c: DeviceBusStats, error: TransportFramingError) -> TransportError:
        c.framing_errors += 1
        c.framing_reasons[error.reason] += 1
        return self._failed(c, error)

    async def _quiet(self) -> None:
        """Wait until the line has been silent for the inter-frame gap (§2.5.1.1)."""
        wait = self._quiet_since + self.gap_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _await(self, request: Awaitable[ModbusPDU], ex: _Exchange,
                     timeout_s: float) -> ModbusPDU:
        """The answer, or TimeoutError / _CorruptAnswer; never leaves the request running."""
        task = asyncio.ensure_future(request)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait((task, ex.corrupt), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            if not task.done():
                # Cancelling releases pymodbus's own lock and drops its pending future.
                task.cancel()
                await asyncio.wait((task,))
        if not task.cancelled():
            return task.result()  # pymodbus errors propagate from here
        if ex.corrupt.done():
            raise _CorruptAnswer
        raise TimeoutError

    # --- what pymodbus does not tell ------------------------------------------------------

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """pymodbus hook: sees the whole receive buffer on every read; returns it unchanged."""
        ex = self._current
        if sending or ex is None:
            return data
        decoder = RtuDecoder(Direction.RESPONSE)
        decoder.feed(data)
        while True:
            try:
                frame = decoder.next_frame()
            except CrcMismatchError as exc:
                if exc.frame[0] == ex.device_id and exc.frame[1] & 0x7F == ex.function:
                    ex.crc_error = exc
                    if not ex.corrupt.done():
                        ex.corrupt.set_result(None)
                else:
                    ex.noise = True
                continue
            except FrameError:
                ex.noise = True
                continue
            if isinstance(frame, NeedData):  # NEED_DATA, the one instance
                break
            if frame.address != ex.device_id or frame.function & 0x7F != ex.function:
                self._other_frame(ex, frame.address, frame.function & 0x7F)
        ex.partial = self._unfinished(ex, decoder.flush())
        return data

    def _other_frame(self, ex: _Exchange, unit: int, function: int) -> None:
        """A whole, CRC-valid frame that is not the answer: late, or wrong."""
        if (unit, function) == self._previous and unit != ex.device_id:
            ex.stray = True  # the previous request's answer, arriving after its timeout
        elif ex.wrong is None:
            reason, what = (("wrong_unit", f"answer from unit {unit}") if unit != ex.device_id
                            else ("wrong_function", f"answer for function {function}"))
            ex.wrong = TransportFramingError(
                self.endpoint, f"device {ex.device_id}: {what}, asked function {ex.function}",
                reason=reason)

    def _unfinished(self, ex: _Exchange, rest: bytes) -> TransportFramingError | None:
        """What the bytes left in the buffer say, if they start the addressed slave's answer."""
        if len(rest) < 2 or rest[0] != ex.device_id or rest[1] & 0x7F != ex.function:
            return None
        if len(rest) >= 5 and crc16(rest[:-2]) == int.from_bytes(rest[-2:], "little"):
            return TransportFramingError(
                self.endpoint, f"device {ex.device_id}: byte count {rest[2]} but "
                f"{len(rest) - 5} data bytes", reason="lying_byte_count")
        return TransportFramingError(
            self.endpoint, f"device {ex.device_id}: answer cut off after {len(rest)} bytes",
            reason="short_frame")


class BusDevice:
    """A `ModbusTransport` for the devices of one poller on a shared `SerialBus`.

    Requests go through the bus (its turn-taking, gap and counters) with this view's
    timeout. `close()` leaves the bus open: it belongs to whoever opened it (the pool).
    """

    def __init__(self, bus: SerialBus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    @property
    def endpoint(self) -> str:
        return self.bus.endpoint

    @property
    def connected(self) -> bool:
        return self.bus.connected

    async def connect(self) -> None:
        await self.bus.connect()

    async def read(self, function: int, start: int, count: int, *, device_id: int) -> list[int]:
        return await self.bus.read(function, start, count, device_id=device_id,
                                   timeout_s=self.timeout_s)

    async def write(self, function: int, address: int, values: Sequence[int], *,
                    device_id: int) -> None:
        await self.bus.write(function, address, values, device_id=device_id,
                             timeout_s=self.timeout_s)

    async def close(self) -> None:
        """Nothing to do: the bus stays open for the other devices on it."""


def _default_gap(line: LineSettings) -> float:
    return inter_frame_gap_s(**line.kwargs())
