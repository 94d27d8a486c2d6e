"""Modbus TCP simulator of profiled devices on loopback, for tests, the demo and benches.

Built on the pymodbus 3.16 server with the `SimDevice`/`SimData` datastore (the
`ModbusDeviceContext`/`ModbusSequentialDataBlock`/`ModbusServerContext` classes log that they
are deprecated and go away in pymodbus 4). Each device id gets a `SimDevice` with four
separate tables (coils, discrete inputs, holding, input registers) laid out from its profile,
and one `action` coroutine that pymodbus calls on every request.

That action is where values move, and it stays cheap: the simulator keeps its own copy of
each table, recomputes a table's points at most once per 0.1 s tick (or at once after a
scripted change) and then copies the table into pymodbus's registers, so a burst of polls
costs a list copy each. Values follow the point's `sim` spec (wave, random walk, constant);
`counter` points read whole seconds since the simulator started (monotonic clock).

Scripting: `set_value()` pins a point (to raise an alarm), `clear_override()` lets it move
again. A client write to a writable point stores the value (and drops any pin on it); writes
anywhere else get Modbus exception 2 (illegal data address).

Run as a process: ``python -m firmware_stubs.modbus_sim --profile gas-detector-v1 --port 0``
prints `READY port=N` (plus ` control_port=M` with a control port) and, if asked, writes each
port alone on one line to a ready file (atomically); it serves until SIGTERM or SIGINT and
exits 0, or 1 with `error: ...` on stderr for a bad profile or a port it cannot bind. A
JSON-lines control port (`firmware_stubs.control`) lets another process script values.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimDataType
from pymodbus.simulator import SimData, SimDevice

from device_profiles import DeviceProfileError, Profile, ProfilePoint, find_profile
from firmware_stubs import sim_process
from firmware_stubs.control import (
    ControlRequest,
    ProfiledDevices,
    close_control,
    handle_control,
    open_control,
)
from firmware_stubs.errors import BadValueError, SimulatorError, UnknownPointError
from firmware_stubs.lifecycle import StartStop
from firmware_stubs.values import TICK_S, PointValues, check_modbus_value, modbus_values
from protocols import modbus_points as mp

log = structlog.get_logger(__name__)

# Request function code -> the table it addresses (Modbus Application Protocol V1.1b3 §6).
_TABLE_OF = {1: 1, 5: 1, 15: 1, 2: 2, 3: 3, 6: 3, 16: 3, 22: 3, 23: 3, 4: 4}


@dataclass(slots=True)
class _SimPoint:
    point: ProfilePoint
    index: int  # register index in the table (bit index for coils/discrete inputs)


@dataclass(slots=True)
class _Table:
    """One of a device's four tables, mirrored into pymodbus's registers on every request."""

    function: int
    start: int  # first register in pymodbus's terms (for bits: first bit address // 16)
    words: list[int]
    points: list[_SimPoint]
    writable: frozenset[int]  # addresses a client may write
    tick: int = -1

    @property
    def bits(self) -> bool:
        return self.function in mp.BIT_FUNCTIONS


@dataclass(slots=True)
class _Device:
    device_id: int
    profile: Profile
    tables: dict[int, _Table]
    points: dict[str, tuple[_Table, _SimPoint]]
    values: PointValues
    warned: set[str] = field(default_factory=set)


class ModbusTcpSimulator(StartStop, ProfiledDevices[_Device]):
    """Serve profiled devices over Modbus TCP; an async context manager.

    `profiles` maps device id -> profile, or is one profile served as device id 1. `port=0`
    picks a free port (read `.port` once started). `control_port` (None: none, 0: free port)
    opens the JSON-lines control channel on `host`.
    """

    def __init__(
        self,
        profiles: Mapping[int, Profile] | Profile,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        control_port: int | None = None,
    ) -> None:
        mapping = {1: profiles} if isinstance(profiles, Profile) else dict(profiles)
        if not mapping:
            raise SimulatorError("no device to simulate")
        for device_id in mapping:
            if not 1 <= device_id <= 247:  # §4.1 (serial line spec): unit ids 1..247
                raise SimulatorError(f"device id {device_id} is outside 1..247")
        self.host = host
        self._requested_port = port
        self._requested_control_port = control_port
        self._rng = random.Random(seed)
        self._t0 = time.monotonic()
        self._devices = {
            device_id: self._build_device(device_id, profile)
            for device_id, profile in sorted(mapping.items())
        }
        self._server: ModbusTcpServer | None = None
        self._control: asyncio.Server | None = None
        self.port = 0
        self.control_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._t0 = time.monotonic()
        for device in self._devices.values():
            device.values.restart()
            for table in device.tables.values():
                self._refresh(device, table, force=True)
        sim_devices = [
            SimDevice(
                id=device.device_id,
                simdata=tuple(  # type: ignore[arg-type]
                    self._simdata(device.tables.get(fc)) for fc in (1, 2, 3, 4)
                ),
                action=partial(self._action, device),
            )
            for device in self._devices.values()
        ]
        server = ModbusTcpServer(sim_devices, address=(self.host, self._requested_port))
        await server.serve_forever(background=True)
        if not server.transport:
            raise SimulatorError(f"cannot listen on {self.host}:{self._requested_port}")
        self._server = server
        self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._control, self.control_port = await open_control(
            self, self.host, self._requested_control_port)
        log.info("modbus_sim_started", host=self.host, port=self.port,
                 control_port=self.control_port,
                 devices=self.profile_ids)

    async def stop(self) -> None:
        await close_control(self._control)
        self._control = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
            log.info("modbus_sim_stopped", port=self.port)

    # ------------------------------------------------------------------ scripting

    def set_value(self, point_key: str, value: mp.PointValue, device_id: int = 1) -> None:
        """Pin a point to `value` until `clear_override()` (or a client write to it)."""
        device, (table, sp) = self._lookup(device_id, point_key)
        check_modbus_value(sp.point, value)
        device.values.pin(point_key, value)
        table.tick = -1  # show it on the next read

    def clear_override(self, point_key: str, device_id: int = 1) -> None:
        """Let a pinned point move with its sim spec again."""
        device, (table, _) = self._lookup(device_id, point_key)
        device.values.unpin(point_key)
        table.tick = -1

    def get_value(self, point_key: str, device_id: int = 1) -> mp.PointValue:
        """The value a read would return now."""
        device, (table, sp) = self._lookup(device_id, point_key)
        self._refresh(device, table)
        return mp.decode_point(sp.point.spec, self._point_words(table, sp))

    def _lookup(self, device_id: int, point_key: str) -> tuple[_Device, tuple[_Table, _SimPoint]]:
        device = self._devices.get(device_id)
        if device is None or point_key not in device.points:
            raise UnknownPointError(device_id, point_key)
        return device, device.points[point_key]

    # ------------------------------------------------------------------ layout

    def _build_device(self, device_id: int, profile: Profile) -> _Device:
        tables: dict[int, _Table] = {}
        points: dict[str, tuple[_Table, _SimPoint]] = {}
        by_function, values = modbus_values(profile, self._rng)
        for function, members in by_function.items():
            if not members:
                continue
            first = min(p.spec.address for p in members)
            end = max(p.spec.address + mp.register_count(p.spec) for p in members)
            if function in mp.BIT_FUNCTIONS:
                # pymodbus packs bits 16 to a register, bit 0 first, from an aligned start
                start, base = first // 16, (first // 16) * 16
                words = [0] * ((end - base + 15) // 16)
            else:
                start, base = first, first
                words = [0] * (end - first)
            writable = frozenset(
                addr
                for p in members
                if p.writable
                for addr in range(p.spec.address, p.spec.address + mp.register_count(p.spec))
            )
            table = _Table(function, start, words, [], writable)
            for p in members:
                sp = _SimPoint(p, p.spec.address - base)
                table.points.append(sp)
                points[p.key] = (table, sp)
            tables[function] = table
        return _Device(device_id, profile, tables, points, values)

    @staticmethod
    def _simdata(table: _Table | None) -> list[SimData]:
        if table is None:
            # pymodbus needs one entry per table; requests to it are refused in _action
            return [SimData(0, values=[False] * 16, datatype=SimDataType.BITS)]
        if table.bits:
            return [SimData(table.start * 16, values=[False] * (16 * len(table.words)),
                            datatype=SimDataType.BITS)]
        return [SimData(table.start, values=list(table.words), datatype=SimDataType.REGISTERS)]

    # ------------------------------------------------------------------ values

    def _refresh(self, device: _Device, table: _Table, *, force: bool = False) -> None:
        """Recompute the table's points once per tick; `force` also resets writable points."""
        tick = int((time.monotonic() - self._t0) / TICK_S)
        if tick == table.tick and not force:
            return
        table.tick = tick
        for sp in table.points:
            point = sp.point
            key = point.key
            if key not in device.values.pins and point.writable and not force:
                continue  # holds what a client wrote
            value = device.values.value(key, at=tick * TICK_S, tick=tick,
                                        counted=time.monotonic() - self._t0)
            try:
                self._store(table, sp, value)
            except mp.PointEncodeError as exc:
                if key not in device.warned:
                    device.warned.add(key)
                    log.warning("modbus_sim_value_unencodable", device_id=device.device_id,
                                point=key, error=str(exc))

    def _store(self, table: _Table, sp: _SimPoint, value: mp.PointValue) -> None:
        spec = sp.point.spec
        if table.bits:
            _set_bit(table.words, sp.index, bool(value))
            return
        n = mp.register_count(spec)
        current = table.words[sp.index : sp.index + 1] if spec.bit is not None else None
        table.words[sp.index : sp.index + n] = mp.encode_point(spec, value, current=current)

    def _point_words(self, table: _Table, sp: _SimPoint) -> list[int]:
        if table.bits:
            reg, bit = divmod(sp.index, 16)
            return [(table.words[reg] >> bit) & 1]
        return table.words[sp.index : sp.index + mp.register_count(sp.point.spec)]

    async def _action(
        self,
        device: _Device,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this before every read or write of the device's tables."""
        table = device.tables.get(_TABLE_OF.get(function_code, 0))
        if table is None:
            return ExcCodes.ILLEGAL_ADDRESS
        if set_values is not None:
            if any(address + i not in table.writable for i in range(len(set_values))):
                return ExcCodes.ILLEGAL_ADDRESS
            self._refresh(device, table)
            self._apply_write(device, table, address, set_values)
        else:
            self._refresh(device, table)
        registers[: len(table.words)] = table.words
        return None

    def _apply_write(
        self, device: _Device, table: _Table, address: int, values: Sequence[int] | Sequence[bool]
    ) -> None:
        base = table.start * 16 if table.bits else table.start
        for i, value in enumerate(values):
            index = address + i - base
            if table.bits:
                _set_bit(table.words, index, bool(value))
            else:
                table.words[index] = int(value)
        end = address + len(values)
        for sp in table.points:
            spec = sp.point.spec
            if spec.address < end and address < spec.address + mp.register_count(spec):
                device.values.unpin(sp.point.key)  # the client's write wins
                log.info("modbus_sim_write", device_id=device.device_id, point=sp.point.key)

    # ------------------------------------------------------------------ control channel

    def handle_control(self, line: bytes | str) -> dict[str, Any]:
        """Handle one control request line (see `firmware_stubs.control`); never raises."""
        return handle_control(self, line)


def _set_bit(words: list[int], index: int, value: bool) -> None:
    reg, bit = divmod(index, 16)
    words[reg] = (words[reg] | (1 << bit)) if value else (words[reg] & ~(1 << bit))


# --- process entry --------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = sim_process.simulator_parser(
        "modbus_sim", "Simulate profiled Modbus TCP devices on loopback.",
        "--profile gas-detector-v1 --profile storage-tank-v1 --port 0 --control-port 0 "
        "--ready-file /tmp/sim.ready", profiles="devices on consecutive ids")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--device-id", type=int, default=1, help="id of the first device")
    sim_process.add_control_port(parser, where="--host")
    sim_process.add_seed(parser)
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="once listening, write the Modbus port (one line) to this file")
    parser.add_argument("--control-ready-file", type=Path, default=None,
                        help="once listening, write the control port (one line) to this file")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    profiles = {
        args.device_id + i: find_profile(name, extra_dirs=args.profile_dir)
        for i, name in enumerate(args.profile)
    }

    def announce(sim: ModbusTcpSimulator) -> str:
        if args.control_ready_file is not None and sim.control_port is not None:
            sim_process.write_atomic(args.control_ready_file, f"{sim.control_port}\n")
        if args.ready_file is not None:
            sim_process.write_atomic(args.ready_file, f"{sim.port}\n")
        return sim_process.ready_line(f"port={sim.port}", sim.control_port)

    await sim_process.serve_until_signal(
        ModbusTcpSimulator(profiles, host=args.host, port=args.port, seed=args.seed,
                           control_port=args.control_port), announce)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on a bad profile/port."""
    args = _parse_args(argv)
    return sim_process.run(_serve(args), (SimulatorError, DeviceProfileError, OSError))


__all__ = [
    "BadValueError", "ControlRequest", "ModbusTcpSimulator", "SimulatorError",
    "UnknownPointError", "main",
]

if __name__ == "__main__":
    sys.exit(main())
