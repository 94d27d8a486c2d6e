"""Find the Modbus RTU slaves on a serial bus (`edge-agent scan`).

Each address gets the smallest request there is: read one holding register at address 0
(function 3). Any answer means a slave is there, an exception response too (many devices have
nothing at register 0, or no holding registers: they answer exception 1 or 2). A slave that
answered with an exception is asked function 4 as well, so the report says which table it
serves. Silence within the timeout means no slave; a garbled answer (bad CRC, bytes that make
no frame) is reported apart: something is there, usually at another baud rate or parity.

The scan is a Modbus master on the line, so it must be the only one: `port_holders` and
`probe_lock` tell whether another process (the agent) has the port, and the CLI refuses then.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import serial

from edge_agent import EdgeError
from edge_agent.field import errors
from edge_agent.field.bus import SerialBus

MAX_ID = 247  # Modbus over Serial Line §2.2: 1..247 are slave addresses


class ScanError(EdgeError):
    """The scan cannot run (bad id list, port missing or busy)."""


class PortBusyError(ScanError):
    def __init__(self, port: str, holders: list[str]) -> None:
        who = f" by {', '.join(holders)}" if holders else " by another process"
        super().__init__(f"{port} is in use{who}: stop the edge agent first "
                         "(sudo systemctl stop fieldlink-edge) or use `edge-agent devices`")
        self.port = port
        self.holders = holders


@dataclass(frozen=True, slots=True)
class ProbeResult:
    device_id: int
    present: bool
    answer: str  # "data", "exception", "garbled", "silent"
    function: int | None = None  # the function that answered with data, if one did
    exception: int | None = None  # function 3's exception code, if it answered with one
    detail: str | None = None

    def describe(self) -> str:
        parts = []
        if self.function is not None:
            parts.append(f"function {self.function}: data")
        if self.exception is not None:
            parts.append(f"function 3: exception {self.exception}")
        if self.detail and not parts:
            parts.append(self.detail)
        return "; ".join(parts) or self.answer

    def to_dict(self) -> dict[str, object]:
        return {"id": self.device_id, "present": self.present, "answer": self.answer,
                "function": self.function, "exception": self.exception,
                "detail": self.detail}


def parse_ids(text: str) -> list[int]:
    """`"1-10,15,20-22"` → the addresses, in order, each once (1..247)."""
    ids: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ScanError(f"not an id or range: {part!r} (e.g. 1-247 or 1,2,5-9)") from None
        if not (1 <= first <= last <= MAX_ID):
            raise ScanError(f"ids must be within 1-{MAX_ID}, low to high: {part!r}")
        ids.extend(i for i in range(first, last + 1) if i not in ids)
    if not ids:
        raise ScanError("no id to scan")
    return ids


def port_holders(port: str) -> list[str]:
    """`"edge-agent (pid 123)"` for every process this user can see with the port open."""
    try:
        target = os.stat(port)
    except OSError:
        return []
    found: list[str] = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # another user's process, or gone
        for fd in fds:
            try:
                st = os.stat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino, st.st_rdev) == (target.st_dev, target.st_ino,
                                                       target.st_rdev):
                try:
                    name = (proc / "comm").read_text().strip()
                except OSError:
                    name = "?"
                found.append(f"{name} (pid {proc.name})")
                break
    return found


def probe_lock(port: str) -> None:
    """Raise if the port is missing or locked by another master (the agent opens its ports
    with an exclusive flock, as pymodbus and the HJ 212 source do)."""
    try:
        s = serial.Serial(port, exclusive=True, timeout=0)
    except serial.SerialException as exc:
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else None
        if cause is not None and cause.errno in (errno.EAGAIN, errno.EWOULDBLOCK) \
                or "exclusively lock" in str(exc):
            raise PortBusyError(port, port_holders(port)) from exc
        raise ScanError(f"cannot open {port}: {exc}") from exc
    s.close()


async def probe(bus: SerialBus, device_id: int) -> ProbeResult:
    """Ask one address; see the module doc for what counts as present."""
    try:
        await bus.read(3, 0, 1, device_id=device_id)
        return ProbeResult(device_id, True, "data", function=3)
    except errors.ModbusExceptionError as exc:
        code = exc.code
    except (errors.TransportCrcError, errors.TransportFramingError) as exc:
        return ProbeResult(device_id, False, "garbled", detail=exc.message)
    except errors.TransportTimeoutError:
        return ProbeResult(device_id, False, "silent")
    try:
        await bus.read(4, 0, 1, device_id=device_id)
        return ProbeResult(device_id, True, "data", function=4, exception=code)
    except errors.TransportConnectError:
        raise
    except errors.TransportError:
        pass  # it answered function 3, so it is there whatever function 4 does
    return ProbeResult(device_id, True, "exception", exception=code)


async def scan_bus(bus: SerialBus, ids: Iterable[int],
                   on_result: Callable[[ProbeResult], object] | None = None) -> list[ProbeResult]:
    """Probe each id in turn; `TransportConnectError` (the port failed) ends the scan."""
    results = []
    for device_id in ids:
        result = await probe(bus, device_id)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


__all__ = ["MAX_ID", "PortBusyError", "ProbeResult", "ScanError", "parse_ids", "port_holders",
           "probe", "probe_lock", "scan_bus"]
