"""The value model shared by the simulators: how a point's `sim:` spec becomes a moving value.

`PointValues` holds one device's points and the pins on them (`pin()` / `unpin()`), and
turns a point's spec into a value at a time since the simulator started:

- `wave`: a sine between min and max, shifted by a per-device random phase;
- `random_walk`: one step of at most `step` per 0.1 s tick, bounded, at most `max_walk_steps`
  steps per call (a long pause does not cost an unbounded loop);
- `constant`: the value;
- `counter`: whole seconds since start, modulo 2**bits when the point has a width.

The simulators differ only in what they do with a value (encode it into registers, round it
into a frame) and in which clock they sample, so both stay with them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from device_profiles import ConstantSim, CounterSim, Profile, ProfilePoint, RandomWalkSim, WaveSim
from firmware_stubs.errors import BadValueError
from protocols.modbus_points import DataType, PointEncodeError, PointValue, encode_point

TICK_S = 0.1  # a random walk takes one step per tick; the Modbus tables refresh once per tick
_INT_BITS = {DataType.U16: 16, DataType.U32: 32, DataType.U64: 64}

Shape = Callable[[ProfilePoint, float | int | bool | str], PointValue]


def modbus_counter_bits(point: ProfilePoint) -> int | None:
    """A Modbus counter wraps at the width of its unsigned register type (else never)."""
    return _INT_BITS.get(point.spec.dtype)


def check_modbus_value(point: ProfilePoint, value: PointValue) -> None:
    """Raise BadValueError unless the point's Modbus type can hold `value`: what a Modbus
    simulator checks before it pins a point to a value."""
    try:
        encode_point(point.spec, value)
    except PointEncodeError as exc:
        raise BadValueError(str(exc)) from exc


def modbus_shape(point: ProfilePoint, value: float | int | bool | str) -> PointValue:
    """A moving value as the point's Modbus type holds it (bits and bit fields are whole)."""
    if point.spec.dtype is DataType.BOOL:
        return bool(value)
    if point.spec.dtype is DataType.BITFIELD:
        return int(value)
    return value


@dataclass(slots=True)
class MovingPoint:
    """One point's spec and the state it moves with."""

    point: ProfilePoint
    phase: float  # wave phase of this device, so that devices differ
    walk: float  # random walk position
    counter_bits: int | None
    walk_tick: int = 0

    def sample(self, rng: random.Random, *, at: float, tick: int, counted: float,
               max_walk_steps: int, shape: Shape) -> PointValue:
        """The value at `at` seconds (walk: at `tick`; counter: `counted` seconds) since start."""
        sim = self.point.sim
        value: float | int | bool | str
        if isinstance(sim, CounterSim):
            count = int(counted)
            return count % (1 << self.counter_bits) if self.counter_bits else count
        if isinstance(sim, WaveSim):
            angle = 2 * math.pi * (at + sim.phase_s + self.phase) / sim.period_s
            value = sim.min + (sim.max - sim.min) * (0.5 + 0.5 * math.sin(angle))
        elif isinstance(sim, RandomWalkSim):
            for _ in range(max(min(tick - self.walk_tick, max_walk_steps), 0)):
                self.walk = min(max(self.walk + rng.uniform(-sim.step, sim.step), sim.min),
                                sim.max)
            self.walk_tick = max(tick, self.walk_tick)
            value = self.walk
        else:
            assert isinstance(sim, ConstantSim)
            value = sim.value
        return shape(self.point, value)


def _walk_start(point: ProfilePoint) -> float:
    sim = point.sim
    if isinstance(sim, RandomWalkSim):
        return sim.start if sim.start is not None else (sim.min + sim.max) / 2
    return 0.0


class PointValues:
    """One device's moving points (in the order given) and the values pinned on some of them.

    `rng` draws the wave phases here and the walk steps later; it may be shared by devices.
    `phase_every_point`: draw a phase for every point, not only waves (the Modbus simulators
    always did, and a seed must keep giving the same values).
    """

    def __init__(self, points: Iterable[ProfilePoint], rng: random.Random, *,
                 max_walk_steps: int, shape: Shape,
                 counter_bits: Callable[[ProfilePoint], int | None],
                 phase_every_point: bool) -> None:
        self._rng = rng
        self._max_walk_steps = max_walk_steps
        self._shape = shape
        self.points: dict[str, MovingPoint] = {}
        for p in points:
            phase = 0.0
            if isinstance(p.sim, WaveSim):
                phase = rng.uniform(0, p.sim.period_s)
            elif phase_every_point:
                phase = rng.uniform(0, 1.0)
            self.points[p.key] = MovingPoint(p, phase, _walk_start(p), counter_bits(p))
        self.pins: dict[str, PointValue] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.points

    def pin(self, key: str, value: PointValue) -> None:
        self.pins[key] = value

    def unpin(self, key: str) -> None:
        self.pins.pop(key, None)

    def restart(self) -> None:
        """The simulator's clock starts again at 0: so do the walks' ticks."""
        for mp in self.points.values():
            mp.walk_tick = 0

    def value(self, key: str, *, at: float, tick: int | None = None,
              counted: float | None = None) -> PointValue:
        """The pinned value, else the spec's value at `at` seconds since start."""
        if key in self.pins:
            return self.pins[key]
        return self.points[key].sample(
            self._rng, at=at, tick=int(at / TICK_S) if tick is None else tick,
            counted=at if counted is None else counted,
            max_walk_steps=self._max_walk_steps, shape=self._shape)


def modbus_values(profile: Profile, rng: random.Random
                  ) -> tuple[dict[int, list[ProfilePoint]], PointValues]:
    """A Modbus device's points per table (function 1..4) and their moving values."""
    by_function = {f: [p for p in profile.points if p.spec.function == f] for f in (1, 2, 3, 4)}
    # Phases are drawn table by table, as the first version did: a seed keeps its values.
    values = PointValues([p for f in (1, 2, 3, 4) for p in by_function[f]], rng,
                         max_walk_steps=50, shape=modbus_shape,
                         counter_bits=modbus_counter_bits, phase_every_point=True)
    return by_function, values


__all__ = ["TICK_S", "MovingPoint", "PointValues", "check_modbus_value", "modbus_counter_bits",
           "modbus_shape", "modbus_values"]
