"""Pieces of the batch write that both backends share (portable SQL programs).

A batch write must know which of its records it newly inserted: only those are aggregated,
and only a held copy whose time was suspect may be replaced by a corrected one
(`central.storage.timecheck`). SQLite asks before inserting (`held_flags_program`: in the
usual case one index range probe that finds nothing); PostgreSQL learns it from its insert's
`RETURNING`. Both then run `replace_program` for the few candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from central.storage.program import Program, Sql, placeholders
from central.storage.timecheck import CLOCK_SUSPECT

_IN_CHUNK = 500


def held_flags_program(table: str, gw: str, stream: str,
                       seqs: Sequence[int]) -> Program[dict[int, int]]:
    """`{seq: stored flags}` for the sorted `seqs` already in `table`."""
    if not seqs:
        return {}
    lo, hi = seqs[0], seqs[-1]
    if hi - lo < 2 * len(seqs) + 64:  # dense: one range probe
        rows = yield Sql(f"SELECT seq, flags FROM {table} WHERE gw = ? AND stream = ?"
                         " AND seq >= ? AND seq <= ?", (gw, stream, lo, hi))
        if not rows:
            return {}
        want = set(seqs)
        return {s: f for s, f in rows if s in want}
    out: dict[int, int] = {}
    for i in range(0, len(seqs), _IN_CHUNK):
        part = seqs[i:i + _IN_CHUNK]
        rows = yield Sql(f"SELECT seq, flags FROM {table} WHERE gw = ? AND stream = ?"
                         f" AND seq IN ({placeholders(len(part))})", (gw, stream, *part))
        out.update(rows)
    return out


def replace_program(table: str, rows: Sequence[tuple[str, str, int, int, int]]
                    ) -> Program[list[tuple[str, str, int]]]:
    """The one allowed update: `(gw, stream, seq, ts_ms, flags)` replaces the held copy's
    time and flags where that copy is `CLOCK_SUSPECT` (and the caller checked the new one is
    not). Key order: the lock order on PostgreSQL. Returns the keys replaced."""
    done = []
    for gw, stream, seq, ts, flags in sorted(rows):
        hit = yield Sql(f"UPDATE {table} SET ts_ms = ?, flags = ? WHERE gw = ? AND stream = ?"
                        " AND seq = ? AND (flags & ?) <> 0 RETURNING seq",
                        (ts, flags, gw, stream, seq, CLOCK_SUSPECT))
        if hit:
            done.append((gw, stream, seq))
    return done
