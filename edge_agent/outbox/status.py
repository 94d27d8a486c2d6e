"""The outbox's read-only status view: lane counts, counters, clock and ack rate.

`stats` runs on the daemon's connection (`Outbox.stats()`); `read_status` opens the file
read-only from another process (the technician's CLI) while the daemon writes, and
`request_clock_ok` leaves the daemon a request to trust the clock.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.outbox.db import (
    TELEMETRY_LANE,
    OutboxError,
    translate,
    used_bytes,
)
from protocols.envelope import Lane, RecordKind
from runtime.sqlite import open_reader


@dataclass(frozen=True, slots=True)
class LaneStats:
    count: int
    oldest_seq: int | None = None
    oldest_ts_ms: int | None = None  # device timestamp of the lane's oldest unsent record

    def to_jsonable(self) -> dict[str, int | None]:
        return {"count": self.count, "oldest_seq": self.oldest_seq,
                "oldest_ts_ms": self.oldest_ts_ms}


@dataclass(frozen=True, slots=True)
class OutboxStats:
    stream: str
    backlog: int  # undelivered records
    backlog_by_kind: Mapping[RecordKind, int]
    oldest_undelivered_ts_ms: int | None  # device timestamp of the oldest undelivered record
    last_seq: int  # highest seq ever handed out (0 for a new outbox)
    delivered_total: int
    schema_version: int
    db_bytes: int  # main file plus WAL and shared memory
    meta: Mapping[str, str] = field(default_factory=dict)  # e.g. uplink_state, last_ack_ms
    lanes: Mapping[str, LaneStats] = field(default_factory=dict)  # alarm, event, live, backlog
    counters: Mapping[str, int] = field(default_factory=dict)  # thinned_total, dropped_total, …
    used_bytes: int = 0  # pages in use (file minus freelist), what the budget counts
    max_bytes: int | None = None  # the budget the daemon runs with (None: none or unknown)
    ack_rate_per_s: float | None = None  # records acknowledged per second, lately
    drain_eta_s: float | None = None  # backlog / ack rate; None while nothing is acked
    clock: Mapping[str, Any] = field(default_factory=dict)

    def to_jsonable(self) -> dict[str, Any]:
        return {"stream": self.stream, "backlog": self.backlog,
                "backlog_by_kind": {k.name.lower(): n for k, n in self.backlog_by_kind.items()},
                "oldest_undelivered_ts_ms": self.oldest_undelivered_ts_ms,
                "last_seq": self.last_seq, "delivered_total": self.delivered_total,
                "schema_version": self.schema_version, "db_bytes": self.db_bytes,
                "meta": dict(self.meta),
                "lanes": {k: v.to_jsonable() for k, v in self.lanes.items()},
                "counters": dict(self.counters), "used_bytes": self.used_bytes,
                "max_bytes": self.max_bytes, "ack_rate_per_s": self.ack_rate_per_s,
                "drain_eta_s": self.drain_eta_s, "clock": dict(self.clock)}


_ACK_RATE_FRESH_MS = 120_000
# Meta keys the daemon writes for itself; `stats().meta` leaves them out (they are rendered).
INTERNAL_META = frozenset({"stream", "ack_rate", "clock_state", "thin_state", "live_window_s",
                           "max_bytes", "clock_ok_request"})


def stats(conn: sqlite3.Connection, path: Path, *, live_window_ms: int | None = None,
          now_ms: int | None = None) -> OutboxStats:
    """Every number from one read transaction (one snapshot of the WAL)."""
    conn.execute("BEGIN")
    try:
        return _stats_in_snapshot(conn, path, live_window_ms,
                                  time.time_ns() // 1_000_000 if now_ms is None else now_ms)
    finally:
        conn.execute("COMMIT")


def _stats_in_snapshot(conn: sqlite3.Connection, path: Path, live_window_ms: int | None,
                       now: int) -> OutboxStats:
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if live_window_ms is None:
        live_window_ms = int(float(meta.get("live_window_s", "300")) * 1000)
    by_kind: dict[RecordKind, int] = {}
    lane_count: dict[int, int] = {}
    lane_min: dict[int, int] = {}
    # One pass over the undelivered index answers both the kinds and the lanes.
    for lane, kind, n, first in conn.execute(
            "SELECT lane, kind, count(*), min(seq) FROM records WHERE delivered = 0"
            " GROUP BY lane, kind"):
        by_kind[RecordKind(kind)] = by_kind.get(RecordKind(kind), 0) + n
        lane_count[lane] = lane_count.get(lane, 0) + n
        lane_min[lane] = min(first, lane_min.get(lane, first))
    seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    last_seq = seq_row[0] if seq_row else 0
    lanes = {name: _lane(conn, lane_count.get(int(lane), 0), lane_min.get(int(lane)))
             for name, lane in (("alarm", Lane.ALARM), ("event", Lane.EVENT))}
    tel_total, tel_first = lane_count.get(TELEMETRY_LANE, 0), lane_min.get(TELEMETRY_LANE)
    if tel_first is None:
        lanes["live"] = lanes["backlog"] = LaneStats(0)
    else:
        boundary = _first_seq_created_since(conn, tel_first, last_seq, now - live_window_ms)
        old = conn.execute("SELECT count(*) FROM records WHERE delivered = 0 AND lane = ?"
                           " AND seq < ?", (TELEMETRY_LANE, boundary)).fetchone()[0]
        live_first = conn.execute("SELECT min(seq) FROM records WHERE delivered = 0 AND lane = ?"
                                  " AND seq >= ?", (TELEMETRY_LANE, boundary)).fetchone()[0]
        lanes["backlog"] = _lane(conn, old, tel_first if old else None)
        lanes["live"] = _lane(conn, tel_total - old, live_first)
    firsts = [v for v in lane_min.values()]
    oldest = _lane(conn, 1, min(firsts)).oldest_ts_ms if firsts else None
    counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
               if p.exists())
    backlog = sum(by_kind.values())
    rate, eta = _ack_rate(meta.get("ack_rate"), now, backlog)
    max_bytes = meta.get("max_bytes", "")
    clock_raw = _json(meta.get("clock_state"))
    clock = {"suspect": bool(clock_raw.get("reason")), "reason": clock_raw.get("reason"),
             "trusted_source": clock_raw.get("trusted_source"),
             "high_water_ms": clock_raw.get("high_water_ms")} if clock_raw else {}
    return OutboxStats(
        stream=meta.get("stream", ""), backlog=backlog, backlog_by_kind=by_kind,
        oldest_undelivered_ts_ms=oldest, last_seq=last_seq,
        delivered_total=counters.pop("delivered_total", 0),
        schema_version=conn.execute("PRAGMA user_version").fetchone()[0], db_bytes=size,
        meta={k: v for k, v in meta.items() if k not in INTERNAL_META}, lanes=lanes,
        counters=counters, used_bytes=used_bytes(conn)[0],
        max_bytes=int(max_bytes) if max_bytes.isdigit() else None,
        ack_rate_per_s=rate, drain_eta_s=eta, clock=clock)


def _lane(conn: sqlite3.Connection, count: int, first: int | None) -> LaneStats:
    if not count or first is None:
        return LaneStats(0)
    row = conn.execute("SELECT ts_ms FROM records WHERE seq = ?", (first,)).fetchone()
    return LaneStats(count, first, row[0] if row else None)


def _first_seq_created_since(conn: sqlite3.Connection, lo: int, last: int, cutoff_ms: int) -> int:
    """The first seq (>= lo) appended at or after `cutoff_ms`, by bisection on seq.

    Appends are in seq order, so `created_ms` rises with seq except across a wall-clock step;
    for a status display that is close enough, and it costs ~log2(rows) index look-ups
    instead of a scan of millions of rows.
    """
    hi = last + 1
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute("SELECT created_ms FROM records WHERE seq >= ? ORDER BY seq LIMIT 1",
                           (mid,)).fetchone()
        if row is None or row[0] >= cutoff_ms:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _ack_rate(text: str | None, now: int, backlog: int) -> tuple[float | None, float | None]:
    raw = _json(text)
    rate, at = raw.get("per_s"), raw.get("at_ms")
    if not isinstance(rate, (int, float)) or not isinstance(at, int):
        return None, (0.0 if backlog == 0 else None)
    if now - at > _ACK_RATE_FRESH_MS:
        rate = 0.0  # nothing acknowledged lately: the link is down or central is silent
    if backlog == 0:
        return float(rate), 0.0
    return float(rate), (round(backlog / rate, 1) if rate > 0 else None)


def read_status(path: Path, *, live_window_s: float | None = None) -> OutboxStats:
    """Stats of an outbox file, read-only, safe while the daemon writes (for `edge-agent status`).

    `live_window_s` splits telemetry into live and backlog; by default the daemon's own
    setting (kept in the file's meta) or 300 s.
    """
    path = Path(path)
    try:
        conn = open_reader(path, autocommit=True)
        if conn is None:
            raise OutboxError(f"no outbox at {path} (yet: the agent creates it on start)")
        try:
            window = None if live_window_s is None else int(live_window_s * 1000)
            return stats(conn, path, live_window_ms=window)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise translate(exc) from exc


def request_clock_ok(path: Path, *, wall_ms: int, mono_ms: int, boot_id: str,
                     source: str = "manual") -> None:
    """Ask the running agent to trust the wall clock as of this reading (`edge-agent clock ok`).

    A second writer on the WAL file is safe; the agent applies the request within one
    maintenance interval, or when it next starts (only for records of the same boot).
    """
    path = Path(path)
    if not path.exists():
        raise OutboxError(f"no outbox at {path}")
    request = json.dumps({"wall_ms": wall_ms, "mono_ms": mono_ms, "boot_id": boot_id,
                          "source": source})
    try:
        conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        try:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('clock_ok_request', ?)", (request,))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise translate(exc) from exc
