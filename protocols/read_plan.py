"""Read planning: group Modbus points into as few read requests as the protocol allows. Pure.

Modbus Application Protocol V1.1b3 §6.3/§6.4: one read of holding or input registers returns
at most 125 registers; §6.1/§6.2: one read of coils or discrete inputs at most 2000 bits. Many
devices accept less, so the limits are parameters (a profile may lower them). Bridging a small
gap of unused registers costs a few bytes and saves a round trip, but a device may refuse to
return registers it does not implement, so `max_gap` bounds it (0 = never bridge).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocols.errors import ProtocolError
from protocols.modbus_points import (
    BIT_FUNCTIONS,
    PointDecodeError,
    PointSpec,
    PointValue,
    decode_point,
    register_count,
)

MAX_READ_REGISTERS = 125  # §6.3, §6.4
MAX_READ_BITS = 2000  # §6.1, §6.2


class ReadPlanError(ProtocolError):
    """The points cannot be planned (duplicate keys, a point larger than one read, bad limits)."""


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: `count` registers (or bits) of `function` starting at `start`."""

    function: int
    start: int
    count: int
    points: tuple[PointSpec, ...]

    @property
    def end(self) -> int:
        """First address after the block."""
        return self.start + self.count

    def decode(self, words: Sequence[int]) -> dict[str, PointValue | PointDecodeError]:
        """Decode every point of the block from the words (or bits) a read returned.

        Returns one entry per point key: its value, or the `PointDecodeError` that explains why
        that one point could not be decoded (a NaN, a short response...). One bad point never
        hides the good ones beside it. Extra trailing words (a bit read padded to a byte) are
        ignored; missing ones make the points that needed them errors.
        """
        out: dict[str, PointValue | PointDecodeError] = {}
        for spec in self.points:
            offset = spec.address - self.start
            try:
                out[spec.key] = decode_point(spec, words[offset : offset + register_count(spec)])
            except PointDecodeError as exc:
                out[spec.key] = exc
        return out


def plan_reads(
    points: Iterable[PointSpec],
    *,
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
    max_gap: int = 16,
) -> list[ReadBlock]:
    """Group points into the fewest reads within the per-read limit and the gap limit.

    Points are grouped by function code, sorted by address and packed greedily: a block grows
    while the next point neither makes it longer than the limit nor leaves more than `max_gap`
    unread addresses before it. Points may overlap (bits of one status register). A point is
    in exactly one block. Output is sorted by (function, start); equal input gives equal output.
    """
    if not 1 <= max_registers <= MAX_READ_REGISTERS:
        raise ReadPlanError(f"max_registers {max_registers} is outside 1..{MAX_READ_REGISTERS}")
    if not 1 <= max_bits <= MAX_READ_BITS:
        raise ReadPlanError(f"max_bits {max_bits} is outside 1..{MAX_READ_BITS}")
    if max_gap < 0:
        raise ReadPlanError(f"max_gap {max_gap} is negative")

    by_function: dict[int, list[PointSpec]] = {}
    seen: set[str] = set()
    for spec in points:
        if spec.key in seen:
            raise ReadPlanError(f"duplicate point key {spec.key!r}")
        seen.add(spec.key)
        by_function.setdefault(spec.function, []).append(spec)

    blocks: list[ReadBlock] = []
    for function in sorted(by_function):
        limit = max_bits if function in BIT_FUNCTIONS else max_registers
        specs = sorted(
            by_function[function], key=lambda s: (s.address, register_count(s), s.key)
        )
        current: list[PointSpec] = []
        start = end = 0
        for spec in specs:
            size = register_count(spec)
            if size > limit:
                raise ReadPlanError(
                    f"point {spec.key!r} needs {size} registers, more than one read ({limit})"
                )
            spec_end = spec.address + size
            if current:
                new_end = max(end, spec_end)
                if spec.address - end <= max_gap and new_end - start <= limit:
                    current.append(spec)
                    end = new_end
                    continue
                blocks.append(ReadBlock(function, start, end - start, tuple(current)))
            current, start, end = [spec], spec.address, spec_end
        if current:
            blocks.append(ReadBlock(function, start, end - start, tuple(current)))
    return blocks
