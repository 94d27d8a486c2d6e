"""Checks of central's derived state, where a doubled record would really show (issue 13).

Counting seqs in `readings` and `events` proves nothing about doubling: their primary key is
(gw, stream, seq), so a second copy can never be stored there. What a duplicate that slipped
past deduplication would change is the state central derives from each new record:
- the aggregates: every numeric reading with a trusted time is folded once into `agg_1m`
  and `agg_1h` (or still waits in `agg_pending`), so their sample counts sum to the readings;
- the alarm history: one `alarm_events` row per ALARM record held, never two, never none;
- the delivery view: `stream_ranges` and `streams.held` say which seqs are held, and must be
  exactly the seqs stored.
`derived_problems` lists every disagreement, in words, for an assertion message.

And since deduplication is only exercised when records really arrive twice, the end-to-end
tests also read central's duplicate counter (`CentralDuplicates`), summed over every life
of every central process in the run.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from central.storage.timecheck import CLOCK_SUSPECT
from protocols.envelope import RecordKind
from protocols.seq_ranges import ranges_from_seqs

Query = Callable[[str, Sequence[object]], list[tuple[Any, ...]]]

_DUPLICATES = re.compile(r"^fieldlink_central_records_duplicate_total (\S+)$", re.M)


def derived_problems(query: Query, gw: str, stream: str, *, param: str = "?") -> list[str]:
    """What central's derived state says that its stored records do not (empty: agreement).

    `query(sql, params)` reads the central database (SQLite or PostgreSQL alike; `param` is
    the driver's placeholder). The aggregate check counts the whole database, so it holds for
    runs with several gateways; the others are for (gw, stream)."""
    def q(sql: str, *args: object) -> list[tuple[Any, ...]]:
        return query(sql.replace("?", param), args)

    problems: list[str] = []

    # One statement, so one snapshot: a flush folding `agg_pending` meanwhile cannot skew it.
    readings, pending, minute, hour = q(
        "SELECT (SELECT count(*) FROM readings WHERE value IS NOT NULL AND point_id IS NOT NULL"
        f" AND (flags & {CLOCK_SUSPECT}) = 0), (SELECT coalesce(sum(n), 0) FROM agg_pending),"
        " (SELECT coalesce(sum(count), 0) FROM agg_1m), (SELECT coalesce(sum(count), 0) FROM agg_1h)"
    )[0]
    for table, folded in (("agg_1m", minute), ("agg_1h", hour)):
        if folded + pending != readings:
            problems.append(f"{table}: {folded} samples folded + {pending} pending, but "
                            f"{readings} numeric readings stored")

    alarms = {s for (s,) in q("SELECT seq FROM events WHERE gw = ? AND stream = ? AND kind = ?",
                              gw, stream, int(RecordKind.ALARM))}
    history: dict[int, int] = dict(q(
        "SELECT seq, count(*) FROM alarm_events WHERE gw = ? AND stream = ? AND seq IS NOT NULL"
        " GROUP BY seq", gw, stream))
    twice = sorted(s for s, n in history.items() if n > 1)
    if twice:
        problems.append(f"alarm history: seqs {twice[:10]} have more than one transition row")
    if set(history) != alarms:
        problems.append(f"alarm history: rows for seqs {sorted(set(history) - alarms)[:10]} "
                        f"that are no alarm held; no row for alarms {sorted(alarms - set(history))[:10]}")

    stored = sorted(s for (s,) in q("SELECT seq FROM readings WHERE gw = ? AND stream = ?"
                                    " UNION SELECT seq FROM events WHERE gw = ? AND stream = ?",
                                    gw, stream, gw, stream))
    ranges = [(int(a), int(b)) for a, b in q(
        "SELECT first_seq, last_seq FROM stream_ranges WHERE gw = ? AND stream = ?"
        " ORDER BY first_seq", gw, stream)]
    if tuple(ranges) != ranges_from_seqs(stored):
        problems.append(f"held ranges {ranges[:6]} are not the stored seqs "
                        f"{ranges_from_seqs(stored)[:6]}")
    held = q("SELECT held FROM streams WHERE gw = ? AND stream = ?", gw, stream)
    if not held or held[0][0] != len(stored):
        problems.append(f"streams.held is {held[0][0] if held else None}, "
                        f"but {len(stored)} seqs are stored")
    return problems


def scrape_duplicates(base_url: str, headers: dict[str, str]) -> float | None:
    """Central's `records_duplicate_total` now, or None when it does not answer."""
    req = urllib.request.Request(f"{base_url}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            m = _DUPLICATES.search(resp.read().decode())
    except (OSError, urllib.error.URLError):
        return None
    return float(m.group(1)) if m else None
