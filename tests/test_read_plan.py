"""Read planner: exact tables and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.modbus_points import DataType, PointDecodeError, PointSpec, register_count
from protocols.read_plan import ReadPlanError, plan_reads


def p(key: str, address: int, dtype: str = "u16", fc: int = 3, **kw: object) -> PointSpec:
    return PointSpec(key, fc, address, DataType(dtype), **kw)  # type: ignore[arg-type]


def shape(blocks):
    return [(b.function, b.start, b.count, [s.key for s in b.points]) for b in blocks]


def test_contiguous_points_make_one_read():
    """Adjacent points of one function code are read together."""
    points = [p("b", 2, "f32"), p("a", 0, "u32"), p("c", 4)]
    assert shape(plan_reads(points)) == [(3, 0, 5, ["a", "b", "c"])]


def test_function_codes_are_separate():
    """Points of different function codes never share a read; output sorted by function."""
    points = [p("h", 0), p("i", 0, fc=4), p("c", 0, "bool", fc=1), p("d", 5, "bool", fc=1)]
    assert shape(plan_reads(points)) == [
        (1, 0, 6, ["c", "d"]),
        (3, 0, 1, ["h"]),
        (4, 0, 1, ["i"]),
    ]


def test_gap_limit():
    """A gap of max_gap is bridged; one more splits the read."""
    assert shape(plan_reads([p("a", 0), p("b", 17)], max_gap=16)) == [(3, 0, 18, ["a", "b"])]
    assert shape(plan_reads([p("a", 0), p("b", 18)], max_gap=16)) == [
        (3, 0, 1, ["a"]),
        (3, 18, 1, ["b"]),
    ]
    assert len(plan_reads([p("a", 0), p("b", 2)], max_gap=0)) == 2


def test_register_limit_never_straddles():
    """A point that would cross the limit starts a new read instead of straddling it."""
    points = [p("a", 0, "string", length=124), p("b", 124, "u32")]
    assert shape(plan_reads(points)) == [(3, 0, 124, ["a"]), (3, 124, 2, ["b"])]
    small = [p("x", 0, "u32"), p("y", 2, "u32"), p("z", 4, "u32")]
    assert shape(plan_reads(small, max_registers=5)) == [(3, 0, 4, ["x", "y"]), (3, 4, 2, ["z"])]


def test_shared_register_bits():
    """Points on bits of one register share one read of that register."""
    points = [p("fault", 2, "bool", bit=8), p("status", 2, "bitfield", bit=0, bit_count=4)]
    (block,) = plan_reads(points)
    assert (block.start, block.count) == (2, 1)
    assert block.decode([0x0103]) == {"status": 3, "fault": True}


def test_block_decode_isolates_bad_points():
    """A point that fails to decode yields its error; the others still decode."""
    points = [p("good", 0), p("nan", 1, "f32"), p("short", 3, "u32")]
    (block,) = plan_reads(points)
    result = block.decode([7, 0x7FC0, 0, 1])  # response one register short
    assert result["good"] == 7
    assert isinstance(result["nan"], PointDecodeError)
    assert isinstance(result["short"], PointDecodeError)


def test_errors():
    """Duplicate keys, oversized points and bad limits raise ReadPlanError."""
    with pytest.raises(ReadPlanError):
        plan_reads([p("a", 0), p("a", 1)])
    with pytest.raises(ReadPlanError):
        plan_reads([p("a", 0, "string", length=126)])
    with pytest.raises(ReadPlanError):
        plan_reads([], max_registers=126)


@st.composite
def point_lists(draw):
    n = draw(st.integers(0, 60))
    out = []
    for i in range(n):
        fc = draw(st.sampled_from([1, 2, 3, 4]))
        addr = draw(st.integers(0, 700))
        dtype = "bool" if fc in (1, 2) else draw(st.sampled_from(["u16", "u32", "f64", "string"]))
        extra = {"length": draw(st.integers(1, 40))} if dtype == "string" else {}
        out.append(p(f"k{i}", addr, dtype, fc=fc, **extra))
    return out


@given(point_lists(), st.integers(1, 125), st.integers(1, 2000), st.integers(0, 40))
def test_plan_properties(points, max_registers, max_bits, max_gap):
    """Every point is in exactly one block that holds it whole; limits and gaps hold."""
    if any(register_count(s) > max_registers for s in points if s.function in (3, 4)):
        with pytest.raises(ReadPlanError):
            plan_reads(points, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap)
        return
    blocks = plan_reads(points, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap)
    keys = [s.key for b in blocks for s in b.points]
    assert sorted(keys) == sorted(s.key for s in points)
    for b in blocks:
        limit = max_bits if b.function in (1, 2) else max_registers
        assert 1 <= b.count <= limit
        spans = sorted((s.address, s.address + register_count(s)) for s in b.points)
        assert spans[0][0] == b.start and max(e for _, e in spans) == b.end
        covered_to = b.start
        for start, end in spans:
            assert b.function == next(s.function for s in b.points)
            assert start - covered_to <= max_gap
            covered_to = max(covered_to, end)
    order = [(b.function, b.start) for b in blocks]
    assert order == sorted(order)
    assert shape(plan_reads(list(reversed(points)), max_registers=max_registers,
                            max_bits=max_bits, max_gap=max_gap)) == shape(blocks)
