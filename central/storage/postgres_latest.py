"""Each point's latest value on PostgreSQL (DESIGN.md §4.3, §9), written after its readings.

Moving ~8,000 latest values forward in every ingest transaction was a third of the
transaction's server time (measured with `bench/ingest.py --backend postgres`: 0.42 s of
1.6 s, most of it this UPDATE); the readings themselves are what an ack promises. So, unless
`latest_interval_s` is 0, a worker keeps the latest values of its committed writes in memory
(`PendingLatest`, newest per point) and writes them in a transaction of their own every
`latest_interval_s` and before any read of latest values in this worker (`settle_latest`):
a reader of this worker sees every value it has committed; a reader of another worker sees
them at most `latest_interval_s` late.

A write that only keeps its latest values records, beside its gateways' last contact, that
the worker owes them (`latest_owed`: gateway, the worker's token, the write's stamp: its
time, made strictly increasing per worker, so two writes in one millisecond differ); the
flush deletes what it has written. Each worker holds a session advisory lock on its token
(`token_lock`, taken whenever its writer connects), so an owed row whose token nobody holds
is a dead worker's: killed between a commit and a flush, it lost what it held in memory but
not the rows. Every worker, when it opens the database and every `REPAIR_EVERY_S` after,
moves the latest values of such gateways forward from their stored readings (`repair`), so
the `latest` table never stays behind the readings for long. The rows are per worker because
workers sharing a subscription share each gateway's batches: a live worker's flush must not
discharge what a dead one owed.

Locks: the flush and the repair lock their gateways' rows (in gw order, like an ingest
transaction) before any latest row and any `latest_owed` row, so the rule `postgres_write`
states holds here too: only the holder of a gateway's row writes its points' latest values,
which need no order of their own. The flush runs on a connection of its own, beside the
worker's next batch write (`central.storage.postgres`): the two meet only on the gateways'
rows, which the write locks at its end (its last contact and what it owes), so one waits for
the other's commit, never for a lock the other waits for. The flush takes only values of
committed writes; a write that commits while the flush waits keeps its `latest_owed` row,
whose time is newer than the flush discharges (`_WRITTEN`), and its values stay pending.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from central.storage.postgres_binary import Float8Array, Int8Array, TextArray
from central.storage.postgres_schema import Conn
from central.storage.timecheck import CENTRAL_TS_SUSPECT

LatestColumns = tuple["array[int]", "array[int]", list[float | None], list[str | None]]

# Only a newer sample replaces the latest value, so backlog never hides fresher data.
# A plain UPDATE writes one row version per point; an upsert locks the row first, a second
# WAL record each. Points with no latest value yet (the UPDATE found fewer rows than it was
# given) are inserted after it.
_LATEST = "unnest(%b::int8[], %b::int8[], %b::float8[], %b::text[])"
_UPDATE_LATEST = ("UPDATE latest SET ts_ms = s.ts_ms, value = s.value, text = s.text"
                  f" FROM {_LATEST} AS s(point_id, ts_ms, value, text)"
                  " WHERE latest.point_id = s.point_id AND s.ts_ms > latest.ts_ms")
_INSERT_LATEST = (f"INSERT INTO latest (point_id, ts_ms, value, text) SELECT * FROM {_LATEST}"
                  " ON CONFLICT (point_id) DO NOTHING")
_LOCK_GATEWAYS = "SELECT gw FROM gateways WHERE gw = ANY(%s) ORDER BY gw FOR UPDATE"
_WRITTEN = ("DELETE FROM latest_owed o USING unnest(%b::text[], %b::int8[]) AS d(gw, ms)"
            " WHERE o.gw = d.gw AND o.token = %s AND o.ms <= d.ms")
# Advisory locks (LOCK_SPACE, token): one per live worker, on its writer's session.
LOCK_SPACE = 0x46_4C_4C_56  # "FLLV"
REPAIR_EVERY_S = 60.0
# The tokens of live workers: advisory locks (LOCK_SPACE, token) held in this database.
_LIVE = ("(SELECT objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
         " AND objsubid = 2 AND granted"
         " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))")
_DEAD = f"SELECT DISTINCT gw FROM latest_owed WHERE token NOT IN {_LIVE}"
_DISCHARGED = f"DELETE FROM latest_owed WHERE gw = ANY(%s) AND token NOT IN {_LIVE}"
# Each point's newest reading whose time central trusts (what a write stages as latest);
# on a tie the one stored first.
_NEWEST = ("SELECT p.id, r.ts_ms, r.value, r.text FROM points p CROSS JOIN LATERAL"
           " (SELECT ts_ms, value, text FROM readings WHERE point_id = p.id"
           f" AND flags & {CENTRAL_TS_SUSPECT} = 0 ORDER BY ts_ms DESC, received_ms, seq"
           " LIMIT 1) AS r WHERE p.gw = ANY(%s)")


LatestArgs = tuple[Int8Array, Int8Array, Float8Array, TextArray]


def latest_args(columns: LatestColumns) -> LatestArgs:
    """`columns` encoded as the parameters of `write_latest_args`."""
    pids, tss, nums, texts = columns
    return (Int8Array.of(pids), Int8Array.of(tss), Float8Array.nullable(nums),
            TextArray.of(texts))


async def write_latest(conn: Conn, columns: LatestColumns) -> None:
    """Move each point's latest value forward where the given one is newer (the caller holds
    the points' gateways' rows)."""
    if len(columns[0]):
        await write_latest_args(conn, latest_args(columns), len(columns[0]))


async def write_latest_args(conn: Conn, args: LatestArgs, n: int) -> None:
    """`write_latest` of `n` values already encoded (`latest_args`)."""
    updated = await conn.execute(_UPDATE_LATEST, args)
    if updated.rowcount < n:
        await conn.execute(_INSERT_LATEST, args)  # new points, or older values than held


class PendingLatest:
    """Latest values a worker has committed readings for but not written yet: the newest per
    point (the first one kept on a tie, as a write keeps it), and per gateway the time of its
    newest write they include."""

    __slots__ = ("values", "due")

    def __init__(self) -> None:
        self.values: dict[int, tuple[int, float | None, str | None]] = {}
        self.due: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.values)

    def add(self, columns: LatestColumns, gws: Iterable[str], now: int) -> None:
        """A committed write's latest values (`columns`) of gateways `gws`, written at `now`."""
        pids, tss, nums, texts = columns
        values = self.values
        if not values:
            values.update(zip(pids, zip(tss, nums, texts, strict=True), strict=True))
        else:
            for pid, ts, num, text in zip(pids, tss, nums, texts, strict=True):
                held = values.get(pid)
                if held is None or ts > held[0]:
                    values[pid] = (ts, num, text)
        self._owe(((gw, now) for gw in gws))

    def take(self) -> PendingLatest:
        """Everything pending, leaving this empty."""
        taken = PendingLatest()
        taken.values, self.values = self.values, {}
        taken.due, self.due = self.due, {}
        return taken

    def put_back(self, taken: PendingLatest) -> None:
        """What a failed flush took: older than anything added since, so it wins a tie."""
        values = self.values
        for pid, held in taken.values.items():
            mine = values.get(pid)
            if mine is None or held[0] >= mine[0]:
                values[pid] = held
        self._owe(taken.due.items())

    def _owe(self, items: Iterable[tuple[str, int]]) -> None:
        due = self.due
        for gw, now in items:
            if due.get(gw, -1) < now:
                due[gw] = now

    def columns(self) -> LatestColumns:
        return _columns([(pid, *v) for pid, v in self.values.items()])


def _columns(rows: Sequence[tuple[Any, ...]]) -> LatestColumns:
    """(point id, ts, number, text) rows as the four columns `write_latest` takes."""
    return (array("q", [r[0] for r in rows]), array("q", [r[1] for r in rows]),
            [r[2] for r in rows], [r[3] for r in rows])


def new_token() -> int:
    """A worker's token: a random positive int4 (an advisory lock's second key)."""
    return secrets.randbelow(2**31 - 1) + 1


def token_lock(token: int) -> str:
    """The statement a worker's writer runs on connecting: its session holds the token."""
    return f"SELECT pg_advisory_lock({LOCK_SPACE}, {int(token)})"


@dataclass(frozen=True, slots=True)
class Flush:
    """What a flush of `pending` writes, encoded before its transaction: the writer's
    connection is not held while Python builds ~10,000 values (`flush_of`)."""

    gws: list[str]
    due: Int8Array  # per gateway in `gws`, the time of its newest write included
    latest: LatestArgs
    n: int


def flush_of(pending: PendingLatest) -> Flush:
    gws = sorted(pending.due)
    columns = pending.columns()
    return Flush(gws, Int8Array.of(array("q", map(pending.due.__getitem__, gws))),
                 latest_args(columns), len(columns[0]))


async def flush(conn: Conn, prepared: Flush, token: int) -> None:
    """Write a flush's values and discharge what the worker owed for gateways whose newest
    write it holds, in the caller's transaction."""
    await conn.execute(_LOCK_GATEWAYS, (prepared.gws,))
    if prepared.n:
        await write_latest_args(conn, prepared.latest, prepared.n)
    await conn.execute(_WRITTEN, (prepared.gws, prepared.due, token))


async def repair(conn: Conn) -> list[str]:
    """Move the latest values of every gateway a dead worker owed forward from its stored
    readings, in the caller's transaction; returns the gateways repaired."""
    cur = await conn.execute(_DEAD, (LOCK_SPACE,))
    gws = sorted(r[0] for r in await cur.fetchall())
    if not gws:
        return []
    await conn.execute(_LOCK_GATEWAYS, (gws,))  # then read: every committed reading counts
    cur = await conn.execute(_NEWEST, (gws,))
    rows: list[tuple[Any, ...]] = await cur.fetchall()
    await write_latest(conn, _columns(rows))
    await conn.execute(_DISCHARGED, (gws, LOCK_SPACE))
    return gws
