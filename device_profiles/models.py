"""Pydantic models of the profile file format (the boundary); see loader.py for the format."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocols.modbus_points import DataType, Order


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WaveSim(_Strict):
    """A sine between min and max."""

    kind: Literal["wave"]
    min: float
    max: float
    period_s: float = Field(gt=0)
    phase_s: float = 0.0


class RandomWalkSim(_Strict):
    """A bounded random walk: each 0.1 s step moves at most `step`."""

    kind: Literal["random_walk"]
    min: float
    max: float
    step: float = Field(gt=0)
    start: float | None = None


class ConstantSim(_Strict):
    kind: Literal["constant"]
    value: float | int | bool | str = 0


class CounterSim(_Strict):
    """Whole seconds since the simulator started (loss checks count on it)."""

    kind: Literal["counter"]


SimModel = Annotated[
    WaveSim | RandomWalkSim | ConstantSim | CounterSim, Field(discriminator="kind")
]


class AlarmModel(_Strict):
    high1: float | None = None
    high2: float | None = None
    low1: float | None = None
    low2: float | None = None
    hysteresis: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> AlarmModel:
        if self.high1 is not None and self.high2 is not None and self.high2 < self.high1:
            raise ValueError("high2 must not be below high1")
        if self.low1 is not None and self.low2 is not None and self.low2 > self.low1:
            raise ValueError("low2 must not be above low1")
        if all(v is None for v in (self.high1, self.high2, self.low1, self.low2)):
            raise ValueError("an alarm needs at least one threshold")
        return self


class PointModel(_Strict):
    key: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)
    name: str = Field(min_length=1)
    name_zh: str = Field(min_length=1)
    unit: str = ""
    description: str = ""
    # Modbus points: where the value lives (required there; the loader checks, since the
    # point model does not know the profile's protocol).
    function: Literal[1, 2, 3, 4] | None = None
    address: int | None = Field(default=None, ge=0, le=65535)
    type: DataType | None = None
    # HJ 212 points: the monitoring factor code (a01001) that names the value in a frame's CP
    # area; it replaces function/address/type. Codes of the 2005 edition (B02, 011) also fit.
    factor: str | None = Field(default=None, pattern=r"^[A-Za-z0-9]{1,16}$")
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = Field(default=None, ge=0, le=15)
    bit_count: int = Field(default=1, ge=1, le=16)
    length: int = Field(default=1, ge=1, le=125)
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

    @model_validator(mode="after")
    def _write_fields(self) -> PointModel:
        if not self.writable and (self.safety_critical or self.write_min is not None
                                  or self.write_max is not None):
            raise ValueError("write_min, write_max and safety_critical apply to writable points")
        if (self.write_min is not None and self.write_max is not None
                and self.write_min > self.write_max):
            raise ValueError("write_min must not be above write_max")
        return self

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class ReadLimits(_Strict):
    """Per-device read limits for the planner (Modbus allows 125 registers / 2000 bits)."""

    max_registers: int = Field(default=125, ge=1, le=125)
    max_bits: int = Field(default=2000, ge=1, le=2000)
    max_gap: int = Field(default=16, ge=0, le=125)


class ProfileModel(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)
    model: str = Field(min_length=1)
    name_zh: str = Field(min_length=1)
    description: str = ""
    protocol: Literal["modbus", "hj212"] = "modbus"
    byte_order: Order = Order.BIG
    word_order: Order = Order.BIG
    reads: ReadLimits = ReadLimits()
    points: list[PointModel] = Field(min_length=1)
