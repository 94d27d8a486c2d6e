"""Sets of record seqs as sorted, inclusive `(first, last)` ranges (the ack's `ranges`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def ranges_from_seqs(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Collapse sequence numbers into sorted inclusive `[first, last]` ranges."""
    ordered = sorted(set(seqs))
    if not ordered:
        return ()
    first, last = ordered[0], ordered[-1]
    if last - first + 1 == len(ordered):  # one run: the usual batch
        return ((first, last),)
    out: list[tuple[int, int]] = []
    start = prev = first
    for s in ordered[1:]:
        if s != prev + 1:
            out.append((start, prev))
            start = s
        prev = s
    out.append((start, prev))
    return tuple(out)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint inclusive ranges covering the same seqs (touching ranges join)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def subtract_ranges(ranges: Sequence[tuple[int, int]],
                    minus: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The seqs of `ranges` that are not in `minus`; both sorted and disjoint."""
    out: list[tuple[int, int]] = []
    j = 0
    for a, b in ranges:
        while j < len(minus) and minus[j][1] < a:
            j += 1
        k = j
        while a <= b:
            if k >= len(minus) or minus[k][0] > b:
                out.append((a, b))
                break
            ma, mb = minus[k]
            if ma > a:
                out.append((a, ma - 1))
            a = max(a, mb + 1)
            k += 1
    return tuple(out)


def count_in_ranges(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def seqs_in_ranges(ranges: Iterable[tuple[int, int]]) -> Iterable[int]:
    for a, b in ranges:
        yield from range(a, b + 1)
