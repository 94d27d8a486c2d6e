"""One simulated Modbus slave of the RTU bus simulator: its registers, values and faults.

A slave lays out its profile's points in four tables (coils, discrete inputs, holding and input
registers), each spanning the lowest to the highest address its points use; a read inside that
span succeeds (the gaps read 0, as the read planner may bridge them) and a read outside it gets
exception 2. Values follow the point's `sim` spec and are recomputed at most once per 0.1 s tick:
`wave` (sine), `random_walk`, `constant`, and `counter` (whole seconds since the simulator
started, +1/s). `set_value()` pins a point; a client write to a writable point stores the value
and drops the pin; a write anywhere else gets exception 2.

`answer(pdu)` is the whole slave: request PDU in, response PDU out (normal or exception). The
faults (`SlaveFaults`) are applied by the bus simulator, which owns the line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from device_profiles import Profile, ProfilePoint
from firmware_stubs.errors import BadValueError, SimulatorError, UnknownPointError
from firmware_stubs.values import TICK_S, check_modbus_value, modbus_values
from protocols import modbus_points as mp
from protocols.modbus_pdu import (
    ILLEGAL_DATA_ADDRESS,
    ILLEGAL_DATA_VALUE,
    ILLEGAL_FUNCTION,
    ReadRequest,
    WriteMultipleRequest,
    WriteSingleRequest,
    decode_request,
    encode_exception,
    encode_read_response,
    encode_write_response,
)
from protocols.modbus_rtu import PduError, UnknownFunctionError

# The ways `SlaveFaults.wrong_answer` can spoil an answer that does arrive.
WRONG_ANSWERS = ("short", "wrong_unit", "wrong_function", "lying_count", "few_registers")

# Write function code -> the table it writes (coils or holding registers).
_WRITE_TABLE = {5: 1, 15: 1, 6: 3, 16: 3}


@dataclass(frozen=True, slots=True)
class SlaveFaults:
    """What is wrong with a slave. Several may combine; `silent` wins over the rest.

    - `silent`: never answers (a dead or disconnected device);
    - `delay_s`: answers this late (past the master's timeout the answer lands on a busy line);
    - `bad_crc`: answers with a corrupted CRC;
    - `exception_code`: answers every request with this Modbus exception (§7);
    - `garbage`: sends this many random bytes before its answer (alone when silent);
    - `wrong_answer`: answers, but wrongly (one of `WRONG_ANSWERS`): `short` cuts the frame
      before its CRC, `wrong_unit` answers from the next address, `wrong_function` with the
      next function code, `lying_count` with a byte count two more than the data it sends
      (CRC valid over what it sends), `few_registers` with one register (or 8 bits) fewer
      than asked, consistent and CRC-valid.
    """

    silent: bool = False
    delay_s: float = 0.0
    bad_crc: bool = False
    exception_code: int | None = None
    garbage: int = 0
    wrong_answer: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.delay_s <= 60:
            raise BadValueError(f"delay_s {self.delay_s} is outside 0..60")
        if self.exception_code is not None and not 1 <= self.exception_code <= 255:
            raise BadValueError(f"exception_code {self.exception_code} is outside 1..255")
        if not 0 <= self.garbage <= 256:
            raise BadValueError(f"garbage {self.garbage} is outside 0..256 bytes")
        if self.wrong_answer is not None and self.wrong_answer not in WRONG_ANSWERS:
            raise BadValueError(f"wrong_answer {self.wrong_answer!r} is not one of "
                                f"{', '.join(WRONG_ANSWERS)}")

    @property
    def any(self) -> bool:
        return self != SlaveFaults()


@dataclass(slots=True)
class _Point:
    point: ProfilePoint
    held: bool = False  # holds what a client wrote


@dataclass(slots=True)
class _Table:
    function: int
    first: int  # first address of the span
    values: list[int]  # registers, or one 0/1 per bit address
    points: list[_Point]
    writable: frozenset[int]
    tick: int = -1

    def has(self, address: int, count: int) -> bool:
        return self.first <= address and address + count <= self.first + len(self.values)


class SlaveImage:
    """One slave's tables and values; `answer()` turns a request PDU into a response PDU."""

    def __init__(self, address: int, profile: Profile, *, rng: random.Random,
                 t0: float) -> None:
        if not 1 <= address <= 247:  # Modbus over Serial Line §2.2: slave addresses 1..247
            raise SimulatorError(f"slave address {address} is outside 1..247")
        if profile.protocol != "modbus":
            raise SimulatorError(f"profile {profile.id} speaks {profile.protocol}, not modbus")
        self.address = address
        self.profile = profile
        self.t0 = t0
        self._points: dict[str, tuple[_Table, _Point]] = {}
        self._tables: dict[int, _Table] = {}
        by_function, self._values = modbus_values(profile, rng)
        for function, members in by_function.items():
            if not members:
                continue
            first = min(p.spec.address for p in members)
            end = max(p.spec.address + mp.register_count(p.spec) for p in members)
            writable = frozenset(
                a for p in members if p.writable
                for a in range(p.spec.address, p.spec.address + mp.register_count(p.spec)))
            table = _Table(function, first, [0] * (end - first), [], writable)
            for p in members:
                sp = _Point(p)
                table.points.append(sp)
                self._points[p.key] = (table, sp)
            self._tables[function] = table

    # --- scripting --------------------------------------------------------------------------

    def set_value(self, key: str, value: mp.PointValue) -> None:
        table, sp = self._lookup(key)
        check_modbus_value(sp.point, value)
        self._values.pin(key, value)
        table.tick = -1  # show it on the next read

    def clear_override(self, key: str) -> None:
        table, sp = self._lookup(key)
        self._values.unpin(key)
        sp.held = False
        table.tick = -1

    def get_value(self, key: str, now: float) -> mp.PointValue:
        table, sp = self._lookup(key)
        self._refresh(table, now)
        spec = sp.point.spec
        i = spec.address - table.first
        return mp.decode_point(spec, table.values[i : i + mp.register_count(spec)])

    def restart(self, t0: float) -> None:
        """The simulator's clock starts again at `t0`."""
        self.t0 = t0
        self._values.restart()

    def _lookup(self, key: str) -> tuple[_Table, _Point]:
        if key not in self._points:
            raise UnknownPointError(self.address, key)
        return self._points[key]

    # --- the slave ----------------------------------------------------------------------------

    def answer(self, pdu: bytes, now: float) -> bytes:
        """The response PDU to a request PDU (§6), or an exception PDU (§7)."""
        try:
            request = decode_request(pdu)
        except UnknownFunctionError as exc:
            return encode_exception(exc.function & 0x7F or 1, ILLEGAL_FUNCTION)
        except PduError as exc:
            return encode_exception(exc.function & 0x7F or 1, ILLEGAL_DATA_VALUE)
        if isinstance(request, ReadRequest):
            table = self._tables.get(request.function)
            if table is None or not table.has(request.address, request.count):
                return encode_exception(request.function, ILLEGAL_DATA_ADDRESS)
            self._refresh(table, now)
            i = request.address - table.first
            return encode_read_response(request.function, table.values[i : i + request.count])
        table = self._tables.get(_WRITE_TABLE[request.function])
        values = ((request.value,) if isinstance(request, WriteSingleRequest) else request.values)
        addresses = range(request.address, request.address + len(values))
        if table is None or any(a not in table.writable for a in addresses):
            return encode_exception(request.function, ILLEGAL_DATA_ADDRESS)
        self._refresh(table, now)
        self._write(table, request.address, values)
        return encode_write_response(request)

    def broadcast(self, pdu: bytes, now: float) -> None:
        """§2.1: a broadcast write is carried out and never answered."""
        try:
            request = decode_request(pdu)
        except (UnknownFunctionError, PduError):
            return
        if isinstance(request, WriteSingleRequest | WriteMultipleRequest):
            self.answer(pdu, now)

    def _write(self, table: _Table, address: int, values: tuple[int, ...]) -> None:
        for k, value in enumerate(values):
            table.values[address + k - table.first] = value
        end = address + len(values)
        for sp in table.points:
            spec = sp.point.spec
            if spec.address < end and address < spec.address + mp.register_count(spec):
                self._values.unpin(sp.point.key)  # the client's write wins
                sp.held = True

    # --- values -----------------------------------------------------------------------------

    def _refresh(self, table: _Table, now: float) -> None:
        tick = int((now - self.t0) / TICK_S)
        if tick == table.tick:
            return
        table.tick = tick
        for sp in table.points:
            key = sp.point.key
            if sp.held and key not in self._values.pins:
                continue
            self._store(table, sp, self._values.value(key, at=now - self.t0, tick=tick))

    def _store(self, table: _Table, sp: _Point, value: mp.PointValue) -> None:
        spec = sp.point.spec
        i = spec.address - table.first
        try:
            if table.function in mp.BIT_FUNCTIONS:
                table.values[i] = int(bool(value))
                return
            n = mp.register_count(spec)
            current = table.values[i : i + 1] if spec.bit is not None else None
            table.values[i : i + n] = mp.encode_point(spec, value, current=current)
        except mp.PointEncodeError:
            pass  # a sim spec that does not fit its point keeps the last good value
