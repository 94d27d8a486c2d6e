"""The profile file format's models (the boundary), as msgspec Structs decoded by
`device_profiles.decoding`; see loader.py for the format."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from device_profiles.decoding import FieldCheckError
from protocols.modbus_points import DataType, Order

Positive = Annotated[float, Meta(gt=0)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class _Sim(_Strict, tag_field="kind", frozen=True):
    pass


class WaveSim(_Sim, tag="wave", frozen=True):
    """A sine between min and max."""

    kind: ClassVar[str] = "wave"
    min: float
    max: float
    period_s: Positive
    phase_s: float = 0.0


class RandomWalkSim(_Sim, tag="random_walk", frozen=True):
    """A bounded random walk: each 0.1 s step moves at most `step`."""

    kind: ClassVar[str] = "random_walk"
    min: float
    max: float
    step: Positive
    start: float | None = None


class ConstantSim(_Sim, tag="constant", frozen=True):
    kind: ClassVar[str] = "constant"
    value: float | int | bool | str = 0


class CounterSim(_Sim, tag="counter", frozen=True):
    """Whole seconds since the simulator started (loss checks count on it)."""

    kind: ClassVar[str] = "counter"


SimModel = WaveSim | RandomWalkSim | ConstantSim | CounterSim


class AlarmModel(_Strict, frozen=True):
    high1: float | None = None
    high2: float | None = None
    low1: float | None = None
    low2: float | None = None
    hysteresis: Annotated[float, Meta(ge=0)] = 0.0

    def __post_init__(self) -> None:
        if self.high1 is not None and self.high2 is not None and self.high2 < self.high1:
            raise ValueError("high2 must not be below high1")
        if self.low1 is not None and self.low2 is not None and self.low2 > self.low1:
            raise ValueError("low2 must not be above low1")
        if all(v is None for v in (self.high1, self.high2, self.low1, self.low2)):
            raise ValueError("an alarm needs at least one threshold")


class PointModel(_Strict, frozen=True):
    key: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
    name: Annotated[str, Meta(min_length=1)]
    name_zh: Annotated[str, Meta(min_length=1)]
    unit: str = ""
    description: str = ""
    # Modbus points: where the value lives (required there; the loader checks, since the
    # point model does not know the profile's protocol).
    function: Literal[1, 2, 3, 4] | None = None
    address: Annotated[int, Meta(ge=0, le=65535)] | None = None
    type: DataType | None = None
    # HJ 212 points: the monitoring factor code (a01001) that names the value in a frame's CP
    # area; it replaces function/address/type. Codes of the 2005 edition (B02, 011) also fit.
    factor: Annotated[str, Meta(pattern=r"^[A-Za-z0-9]{1,16}$")] | None = None
    scale: float = 1.0
    offset: float = 0.0
    bit: Annotated[int, Meta(ge=0, le=15)] | None = None
    bit_count: Annotated[int, Meta(ge=1, le=16)] = 1
    length: Annotated[int, Meta(ge=1, le=125)] = 1
    byte_order: Order | None = None
    word_order: Order | None = None
    poll: Literal["fast", "normal", "slow"] = "normal"
    writable: bool = False
    # Writes (DESIGN.md §8): central refuses a write outside [write_min, write_max] before it
    # signs, and a write to a safety-critical point (a relay, a valve) waits for a second
    # operator's approval.
    write_min: float | None = None
    write_max: float | None = None
    safety_critical: bool = False
    sim: SimModel | None = None
    alarm: AlarmModel | None = None

    def __post_init__(self) -> None:
        for name in ("scale", "offset"):
            if not math.isfinite(getattr(self, name)):
                raise FieldCheckError(name, "must be a finite number")
        if not self.writable and (self.safety_critical or self.write_min is not None
                                  or self.write_max is not None):
            raise ValueError("write_min, write_max and safety_critical apply to writable points")
        if (self.write_min is not None and self.write_max is not None
                and self.write_min > self.write_max):
            raise ValueError("write_min must not be above write_max")


class ReadLimits(_Strict, frozen=True):
    """Per-device read limits for the planner (Modbus allows 125 registers / 2000 bits)."""

    max_registers: Annotated[int, Meta(ge=1, le=125)] = 125
    max_bits: Annotated[int, Meta(ge=1, le=2000)] = 2000
    max_gap: Annotated[int, Meta(ge=0, le=125)] = 16


class ProfileModel(_Strict, frozen=True):
    id: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]
    model: Annotated[str, Meta(min_length=1)]
    name_zh: Annotated[str, Meta(min_length=1)]
    points: Annotated[list[PointModel], Meta(min_length=1)]
    description: str = ""
    protocol: Literal["modbus", "hj212"] = "modbus"
    byte_order: Order = Order.BIG
    word_order: Order = Order.BIG
    reads: ReadLimits = msgspec.field(default_factory=ReadLimits)
