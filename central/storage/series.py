"""A point's raw readings one page at a time (`GET /api/points/…/series`, DESIGN.md §4).

Readings are ordered by `(ts_ms, stream, seq)`, which names each of a point's readings once
(two readings may share a time), so a page that ends at a key continues exactly after it:

    page = await storage.run(lambda: raw_page_program("gw-1:tank-3:gas", 0, now, 1000, None),
                             write=False)
    if page.last is not None:  # more readings lie in the window
        ...raw_page_program(ref, 0, now, 1000, page.last)
"""

from __future__ import annotations

from dataclasses import dataclass

from central.storage.aggregates import point_id_program
from central.storage.base import Sample, parse_point_ref
from central.storage.errors import UnknownPointError
from central.storage.program import Program, Sql

RawKey = tuple[int, str, int]  # (ts_ms, stream, seq) of a reading


@dataclass(frozen=True, slots=True)
class RawPage:
    samples: list[Sample]
    last: RawKey | None  # the last sample's key when more follow in the window, else None


def raw_page_program(point_ref: str, from_ms: int, to_ms: int, limit: int,
                     after: RawKey | None) -> Program[RawPage]:
    """At most `limit` readings with from_ms <= ts < to_ms after the key `after` (if any),
    oldest first; raises `UnknownPointError`."""
    pid = yield from point_id_program(*parse_point_ref(point_ref))
    if pid is None:
        raise UnknownPointError(point_ref)
    where = ""
    args_after: tuple[int | str, ...] = ()
    if after is not None:
        where, args_after = " AND (ts_ms, stream, seq) > (?, ?, ?)", after
    rows = yield Sql("SELECT ts_ms, value, text, flags, stream, seq FROM readings"
                     " WHERE point_id = ? AND ts_ms >= ? AND ts_ms < ?" + where
                     + " ORDER BY ts_ms, stream, seq LIMIT ?",
                     (pid, from_ms, to_ms, *args_after, limit + 1))
    samples = [Sample(ts_ms=t, value=v, text=x, flags=f) for t, v, x, f, _, _ in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return RawPage(samples, None if last is None else (last[0], last[4], last[5]))
