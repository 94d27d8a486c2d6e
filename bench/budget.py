"""A long outage at full scale against the outbox's disk budget (DESIGN.md §4.6).

Appends what a gateway cut off for `--hours` would write at `--rate` points/s (round robin
over `--points` points, an alarm every `--alarm-every-s` of device time) into an outbox capped
at `--budget-mib`, as the agent would: in one-second commits, with the budget enforced by the
outbox itself. Then checks what the issue asks of it: the file stays within the budget, every
alarm is still there, the thinned and dropped counts account for every missing seq, and the
newest hour is complete (the oldest telemetry goes first). The test suite runs the same at
1/100 scale (`tests/test_budget.py`); this is the real size.

    python bench/budget.py --hours 72 --rate 100 --budget-mib 1024

Prints one JSON line: records, used_bytes, budget_bytes, fits, alarms, alarms_kept, thinned,
dropped, accounted, newest_hour_complete, points_per_s (append rate with the budget at work).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import emit

from edge_agent.outbox.store import NewRecord, Outbox
from protocols.envelope import RecordKind


def rows(db: Path, sql: str, *args: object) -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


async def fill(db: Path, *, hours: float, rate: int, points: int, alarm_every_s: int,
               budget: int, t0_ms: int) -> tuple[int, list[int], float]:
    """Append the outage; returns (telemetry records, alarm seqs, seconds)."""
    seconds = int(hours * 3600)
    step_ms = 1000 / rate
    alarms: list[int] = []
    n = 0
    started = time.perf_counter()
    async with Outbox.open(db, max_bytes=budget, live_window_s=0.001) as ob:
        for s in range(seconds):
            recs = [NewRecord(RecordKind.TELEMETRY, t0_ms + int((n + i) * step_ms),
                              f"dev-{(n + i) % points}/gas",
                              round(20 + 5 * math.sin((n + i) / 30_000), 2))
                    for i in range(rate)]
            n += rate
            alarm = alarm_every_s and s % alarm_every_s == 0
            if alarm:
                recs.append(NewRecord(RecordKind.ALARM, t0_ms + s * 1000, "dev-1/gas", 30.0,
                                      attrs={"alarm_id": f"a{s}", "level": 1}))
            seqs = await ob.append(recs)
            if alarm:
                alarms.append(seqs[-1])
            if s % 3600 == 0:
                print(f"hour {s // 3600}/{seconds // 3600}: {n:,} records,"
                      f" {await ob.used_bytes() / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
        await ob.reclaim()
    return n, alarms, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=72.0)
    ap.add_argument("--rate", type=int, default=100, help="points per second")
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--alarm-every-s", type=int, default=600, help="one alarm per this many seconds")
    ap.add_argument("--budget-mib", type=int, default=1024)
    ap.add_argument("--dir", type=Path, default=None, help="where the outbox file goes (default: a temp dir)")
    args = ap.parse_args()

    budget = args.budget_mib * 2**20
    with tempfile.TemporaryDirectory(prefix="fieldlink-budget-", dir=args.dir) as tmp:
        db = Path(tmp) / "outbox.db"
        t0_ms = int(time.time() * 1000) - int(args.hours * 3600_000)
        n, alarms, secs = asyncio.run(fill(db, hours=args.hours, rate=args.rate, points=args.points,
                                           alarm_every_s=args.alarm_every_s, budget=budget,
                                           t0_ms=t0_ms))
        size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
        counters = dict(rows(db, "SELECT name, value FROM counters"))
        (last,) = rows(db, "SELECT seq FROM sqlite_sequence WHERE name = 'records'")[0]
        (count,) = rows(db, "SELECT count(*) FROM records")[0]
        kept = {s for (s,) in rows(db, "SELECT seq FROM records WHERE kind = ?", int(RecordKind.ALARM))}
        newest_start = t0_ms + int((n - 3600 * args.rate) * 1000 / args.rate)
        (newest,) = rows(db, "SELECT count(*) FROM records WHERE kind = 0 AND ts_ms >= ?", newest_start)[0]
        thinned, dropped = counters.get("thinned_total", 0), counters.get("dropped_total", 0)
    emit(bench="budget", hours=args.hours, rate_points_per_s=args.rate, records=n,
         budget_bytes=budget, file_bytes=size, fits=size <= budget,
         alarms=len(alarms), alarms_kept=len(kept & set(alarms)),
         thinned=thinned, dropped=dropped, accounted=thinned + dropped == last - count,
         newest_hour_complete=newest == 3600 * args.rate,
         points_per_s=round(n / secs), seconds=round(secs, 1))


if __name__ == "__main__":
    main()
