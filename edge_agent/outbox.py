"""The edge outbox: every record is committed here before it may travel (DESIGN.md §4).

One SQLite file in WAL mode. The file gets a random `stream` id when it is created, and each
record a `seq` from `INTEGER PRIMARY KEY AUTOINCREMENT`, so `(gw, stream, seq)` names a record
for ever: AUTOINCREMENT never hands out a seq again, not even after the row is pruned.

Threading: one thread owns the connection (a single-worker executor); every public method is
a coroutine that awaits it, so the event loop never blocks on the disk.

Durability window: a commit that holds an alarm, event or command result runs with
`synchronous=FULL` (fsync of the WAL before COMMIT returns). Telemetry-only commits and
delivery marks run with `synchronous=NORMAL`: in WAL mode that never corrupts the file, and
a killed *process* loses nothing, but a *power cut* may lose the last telemetry commits made
since the last checkpoint sync (typically well under a second of readings) and some delivery
marks (those records are then simply sent again; central deduplicates).

Records are delivered only on central's `down/ack` (`mark_delivered`); the column `delivered`
holds the wall-clock ms of that ack (0 = not yet). A background task prunes delivered rows
older than `keep_delivered_s` (default 0: as soon as it runs). The newest telemetry value per
point is kept in the `latest` table, also after its record is pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import cbor2
import structlog

from edge_agent.errors import EdgeError
from protocols.envelope import Flag, Lane, Record, RecordKind, Value, ranges_from_seqs

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


# --- errors --------------------------------------------------------------------------------


class OutboxError(EdgeError):
    """Base of every outbox error; wraps the sqlite3 error it came from (`__cause__`)."""


class OutboxCorruptError(OutboxError):
    """The file is not an SQLite database or is damaged."""


class OutboxFullError(OutboxError):
    """The disk or the configured size cap (`max_bytes`) is full; nothing was committed."""


class OutboxVersionError(OutboxError):
    """The file was made by a newer agent (its schema version is unknown here)."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"outbox schema version {found} is newer than this agent's {known}")
        self.found = found
        self.known = known


class OutboxRecordError(OutboxError):
    """A record handed to `append` cannot be stored; nothing of that call was committed."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"record {index}: {reason}")
        self.index = index
        self.reason = reason


def _translate(exc: BaseException) -> OutboxError:
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return OutboxFullError(str(exc))
        return OutboxError(str(exc))
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == sqlite3.SQLITE_FULL:
        return OutboxFullError(str(exc))
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return OutboxCorruptError(str(exc))
    return OutboxError(str(exc))


# --- records and lanes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewRecord:
    """What producers hand in; the outbox assigns `seq`."""

    kind: RecordKind
    ts_ms: int
    point: str | None
    value: Value
    flags: Flag = Flag.NONE
    attrs: Mapping[str, Any] | None = None


def lane_of(kind: RecordKind) -> Lane:
    """The lane a record is stored in; backlog is a view of the live lane by age."""
    if kind is RecordKind.ALARM:
        return Lane.ALARM
    if kind is RecordKind.TELEMETRY:
        return Lane.LIVE
    return Lane.EVENT  # events and command results


# Send order, highest priority first. Lane.BACKLOG is not stored: telemetry older than the live
# window is flagged HISTORICAL when read. A later issue may split LIVE/BACKLOG with rate control.
SEND_ORDER: tuple[Lane, ...] = (Lane.ALARM, Lane.EVENT, Lane.LIVE)
_DURABLE_KINDS = frozenset({RecordKind.ALARM, RecordKind.EVENT, RecordKind.CMD_RESULT})
_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class OutboxStats:
    stream: str
    backlog: int  # undelivered records
    backlog_by_kind: Mapping[RecordKind, int]
    oldest_undelivered_ts_ms: int | None  # device timestamp of the oldest undelivered record
    last_seq: int  # highest seq ever handed out (0 for a new outbox)
    delivered_total: int
    schema_version: int
    db_bytes: int  # main file plus WAL
    meta: Mapping[str, str] = field(default_factory=dict)  # e.g. uplink_state, last_ack_ms

    def to_jsonable(self) -> dict[str, Any]:
        return {"stream": self.stream, "backlog": self.backlog,
                "backlog_by_kind": {k.name.lower(): n for k, n in self.backlog_by_kind.items()},
                "oldest_undelivered_ts_ms": self.oldest_undelivered_ts_ms,
                "last_seq": self.last_seq, "delivered_total": self.delivered_total,
                "schema_version": self.schema_version, "db_bytes": self.db_bytes,
                "meta": dict(self.meta)}


# --- schema --------------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]
_MIGRATIONS: dict[int, Migration] = {}


def _migration(version: int) -> Callable[[Migration], Migration]:
    """Register a schema step; each runs once, in order, in its own transaction."""
    def register(fn: Migration) -> Migration:
        assert version not in _MIGRATIONS, f"duplicate migration {version}"
        _MIGRATIONS[version] = fn
        return fn
    return register


@_migration(1)
def _m001_initial(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    conn.execute("""
        CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind INTEGER NOT NULL,
            lane INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            point TEXT,
            value,
            value_is_bool INTEGER NOT NULL DEFAULT 0,  -- SQLite has no bool; keep it for the wire
            flags INTEGER NOT NULL DEFAULT 0,
            attrs BLOB,
            created_ms INTEGER NOT NULL,
            delivered INTEGER NOT NULL DEFAULT 0  -- ms of the ack, 0 = undelivered
        )""")
    # kind rides along so that backlog-by-kind is answered from the index alone.
    conn.execute("CREATE INDEX records_undelivered ON records (lane, seq, kind) WHERE delivered = 0")
    conn.execute("CREATE INDEX records_delivered ON records (delivered) WHERE delivered != 0")
    conn.execute("""
        CREATE TABLE latest (
            point TEXT PRIMARY KEY, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
            value, value_is_bool INTEGER NOT NULL DEFAULT 0, flags INTEGER NOT NULL DEFAULT 0
        )""")
    conn.execute("INSERT INTO meta VALUES ('stream', ?), ('created_ms', ?)",
                 (uuid.uuid4().hex, str(_now_ms())))
    conn.execute("INSERT INTO counters VALUES ('delivered_total', 0)")


SCHEMA_VERSION = max(_MIGRATIONS)


def _migrate(conn: sqlite3.Connection) -> int:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise OutboxVersionError(current, SCHEMA_VERSION)
    for version in sorted(v for v in _MIGRATIONS if v > current):
        conn.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("outbox_migrated", version=version)
    return SCHEMA_VERSION


# --- SQL shared by the daemon and `read_status` ---------------------------------------------

_INSERT = ("INSERT INTO records (kind, lane, ts_ms, point, value, value_is_bool, flags, attrs,"
           " created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT_LATEST = """
    INSERT INTO latest (point, seq, ts_ms, value, value_is_bool, flags) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (point) DO UPDATE SET seq = excluded.seq, ts_ms = excluded.ts_ms,
        value = excluded.value, value_is_bool = excluded.value_is_bool, flags = excluded.flags
    WHERE excluded.ts_ms >= latest.ts_ms"""
_SELECT_LANE = ("SELECT seq, kind, ts_ms, point, value, value_is_bool, flags, attrs, created_ms"
                " FROM records WHERE delivered = 0 AND lane = ? AND seq > ? AND seq < ?"
                " ORDER BY seq LIMIT ?")


def _stats(conn: sqlite3.Connection, path: Path) -> OutboxStats:
    # One read transaction: every number comes from the same snapshot of the WAL.
    conn.execute("BEGIN")
    try:
        return _stats_in_snapshot(conn, path)
    finally:
        conn.execute("COMMIT")


def _stats_in_snapshot(conn: sqlite3.Connection, path: Path) -> OutboxStats:
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    by_kind = {RecordKind(k): n for k, n in conn.execute(
        "SELECT kind, count(*) FROM records WHERE delivered = 0 GROUP BY kind")}
    oldest: tuple[int, int] | None = None
    for lane in SEND_ORDER:
        row = conn.execute("SELECT seq, ts_ms FROM records WHERE delivered = 0 AND lane = ?"
                           " ORDER BY seq LIMIT 1", (int(lane),)).fetchone()
        if row and (oldest is None or row[0] < oldest[0]):
            oldest = row
    seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    delivered = conn.execute(
        "SELECT value FROM counters WHERE name = 'delivered_total'").fetchone()
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    return OutboxStats(
        stream=meta.pop("stream", ""), backlog=sum(by_kind.values()), backlog_by_kind=by_kind,
        oldest_undelivered_ts_ms=oldest[1] if oldest else None,
        last_seq=seq_row[0] if seq_row else 0, delivered_total=delivered[0] if delivered else 0,
        schema_version=conn.execute("PRAGMA user_version").fetchone()[0], db_bytes=size,
        meta=meta)


def read_status(path: Path) -> OutboxStats:
    """Stats of an outbox file, read-only, safe while the daemon writes (for `edge-agent status`)."""
    path = Path(path)
    if not path.exists():
        raise OutboxError(f"no outbox at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0,
                               isolation_level=None)
        try:
            return _stats(conn, path)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _translate(exc) from exc


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the outbox ----------------------------------------------------------------------------


class Outbox:
    """The durable queue of records waiting for central's acknowledgement.

    Example::

        async with Outbox.open(Path("/var/lib/fieldlink/outbox.db")) as ob:
            seqs = await ob.append([NewRecord(RecordKind.TELEMETRY, ts, "d1/gas", 12.5)])
    """

    def __init__(self, path: Path, *, live_window_s: float, keep_delivered_s: float,
                 prune_interval_s: float, max_bytes: int | None) -> None:
        # Use `Outbox.open()`; the constructor does no I/O.
        self.path = Path(path)
        self.stream = ""
        self.live_window_ms = int(live_window_s * 1000)
        self.keep_delivered_ms = int(keep_delivered_s * 1000)
        self.prune_interval_s = prune_interval_s
        self.max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._conn: sqlite3.Connection | None = None  # touched only on the executor thread
        self._sync_full: bool | None = None
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, *, live_window_s: float = 300.0,
                   keep_delivered_s: float = 0.0, prune_interval_s: float = 5.0,
                   max_bytes: int | None = None) -> AsyncIterator[Outbox]:
        """Open (creating if needed) the outbox file; prunes delivered rows in the background.

        `live_window_s`: telemetry older than this is sent flagged HISTORICAL (backlog).
        `keep_delivered_s`: how long delivered rows stay before pruning.
        `max_bytes`: hard cap on the file (SQLite `max_page_count`); past it `append` raises
        `OutboxFullError`.
        """
        ob = cls(path, live_window_s=live_window_s, keep_delivered_s=keep_delivered_s,
                 prune_interval_s=prune_interval_s, max_bytes=max_bytes)
        try:
            await ob._call(ob._open_sync)
            pruner = asyncio.create_task(ob._prune_loop(), name="outbox.prune")
            try:
                yield ob
            finally:
                pruner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruner
        finally:
            with contextlib.suppress(OutboxError):
                await ob._call(ob._close_sync)
            ob._executor.shutdown(wait=True)

    # --- public API --------------------------------------------------------------------

    async def append(self, records: Sequence[NewRecord]) -> list[int]:
        """Commit `records` in one transaction and return their seqs, in order."""
        if not records:
            return []
        now = _now_ms()
        rows = [self._row(i, r, now) for i, r in enumerate(records)]
        durable = any(r.kind in _DURABLE_KINDS for r in records)
        first = await self._call(self._append_sync, rows, durable)
        for notify in list(self._listeners):
            notify()
        return list(range(first, first + len(rows)))

    async def next_batch(self, limit: int, exclude: Collection[int] = ()) -> list[Record]:
        """Up to `limit` undelivered records, lane by lane (alarm, event, telemetry), oldest
        first within a lane, leaving out the seqs in `exclude` (those in flight)."""
        if limit <= 0:
            return []
        # Snapshot on the loop thread: the caller's set may change while the thread reads.
        skip = ranges_from_seqs(exclude)
        return await self._call(self._next_batch_sync, limit, skip, _now_ms())

    async def mark_delivered(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Mark the seqs in inclusive `ranges` delivered; idempotent; returns rows newly marked."""
        clean = [(int(a), int(b)) for a, b in ranges if a <= b]
        return await self._call(self._mark_sync, clean, _now_ms())

    async def set_meta(self, key: str, value: str) -> None:
        await self._call(self._set_meta_sync, key, value)

    async def get_meta(self, key: str) -> str | None:
        return await self._call(self._get_meta_sync, key)

    async def stats(self) -> OutboxStats:
        return await self._call(lambda: _stats(self._db(), self.path))

    async def latest(self) -> dict[str, Record]:
        """The newest telemetry record per point (kept after its row is pruned)."""
        return await self._call(self._latest_sync)

    async def prune(self) -> int:
        """Delete delivered rows older than `keep_delivered_s` now; returns rows deleted."""
        return await self._call(self._prune_sync, _now_ms())

    def add_append_listener(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn()` (on the event loop) after every committed append; returns a remover."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    # --- plumbing ----------------------------------------------------------------------

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._guarded, fn, *args, **kwargs))

    @staticmethod
    def _guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc) from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError("outbox is closed")
        return self._conn

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval_s)
            try:
                await self.prune()
            except OutboxError as exc:
                log.warning("outbox_prune_failed", error=str(exc))

    def _row(self, i: int, r: NewRecord, now: int) -> tuple[Any, ...]:
        value, flags = r.value, r.flags
        if isinstance(value, float) and not math.isfinite(value):
            # The envelope refuses NaN/inf; keep the reading's place and say it is bad.
            value, flags = None, flags | Flag.BAD_QUALITY
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise OutboxRecordError(i, f"unsupported value type {type(value).__name__}")
        try:
            attrs = cbor2.dumps(dict(r.attrs)) if r.attrs else None
        except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
            raise OutboxRecordError(i, f"attrs not encodable: {exc}") from exc
        return (int(r.kind), int(lane_of(r.kind)), int(r.ts_ms), r.point, value,
                int(isinstance(value, bool)), int(flags), attrs, now)

    @staticmethod
    def _record(row: tuple[Any, ...], flags: int) -> Record:
        seq, kind, ts_ms, point, value, is_bool, _, attrs = row[:8]
        return Record(seq=seq, kind=RecordKind(kind), ts_ms=ts_ms, point=point,
                      value=bool(value) if is_bool else value, flags=Flag(flags),
                      attrs=cbor2.loads(attrs) if attrs else None)

    # --- executor-thread bodies ----------------------------------------------------------

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise OutboxError(f"cannot use WAL on {self.path} (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA temp_store = MEMORY")
            _migrate(conn)
            if self.max_bytes is not None:
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(1, int(self.max_bytes) // page)}")
            self.stream = conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._sync_full = False
        log.info("outbox_opened", path=str(self.path), stream=self.stream)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _set_sync(self, full: bool) -> None:
        if self._sync_full is not full:  # a pragma per commit is cheap, but skip it when unchanged
            self._db().execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
            self._sync_full = full

    def _write(self, full: bool, body: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        self._set_sync(full)
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _append_sync(self, rows: list[tuple[Any, ...]], durable: bool) -> int:
        def body(conn: sqlite3.Connection) -> int:
            conn.executemany(_INSERT, rows)
            # One writer inside BEGIN IMMEDIATE: AUTOINCREMENT hands out consecutive seqs.
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            first = last - len(rows) + 1
            newest: dict[str, tuple[Any, ...]] = {}
            for i, (kind, _, ts, point, value, is_bool, flags, _, _) in enumerate(rows):
                if kind == RecordKind.TELEMETRY and point is not None:
                    prev = newest.get(point)
                    if prev is None or ts >= prev[2]:
                        newest[point] = (point, first + i, ts, value, is_bool, flags)
            if newest:
                conn.executemany(_UPSERT_LATEST, newest.values())
            return first
        return self._write(durable, body)

    def _next_batch_sync(self, limit: int, skip: tuple[tuple[int, int], ...],
                         now: int) -> list[Record]:
        conn = self._db()
        out: list[Record] = []
        horizon = now - self.live_window_ms
        for lane in SEND_ORDER:
            need = limit - len(out)
            if need <= 0:
                break
            # Walk the lane in seq windows between excluded ranges, so that thousands of
            # in-flight seqs cost a few index seeks instead of a huge NOT IN list.
            cursor, i = 0, 0
            while need > 0:
                while i < len(skip) and skip[i][0] <= cursor + 1:
                    cursor = max(cursor, skip[i][1])
                    i += 1
                upper = skip[i][0] if i < len(skip) else _MAX_SEQ
                rows = conn.execute(_SELECT_LANE, (int(lane), cursor, upper, need)).fetchall()
                for row in rows:
                    flags = row[6]
                    if lane is Lane.LIVE and row[8] < horizon:
                        flags |= Flag.HISTORICAL
                    out.append(self._record(row, flags))
                need -= len(rows)
                if i >= len(skip):
                    break
                cursor = upper - 1
        return out

    def _mark_sync(self, ranges: list[tuple[int, int]], now: int) -> int:
        def body(conn: sqlite3.Connection) -> int:
            cur = conn.executemany("UPDATE records SET delivered = ? WHERE seq BETWEEN ? AND ?"
                                   " AND delivered = 0", [(now, a, b) for a, b in ranges])
            marked = max(cur.rowcount, 0)
            if marked:
                conn.execute("UPDATE counters SET value = value + ? WHERE name = 'delivered_total'",
                             (marked,))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_ack_ms', ?)", (str(now),))
            return marked
        return self._write(False, body)

    def _prune_sync(self, now: int, chunk: int = 5000) -> int:
        # Small transactions so that appends never wait long behind a big delete. With no
        # retention every delivered row goes, even if the wall clock has stepped back since.
        cutoff = now - self.keep_delivered_ms if self.keep_delivered_ms else _MAX_SEQ
        total = 0
        while True:
            n = self._write(False, lambda conn: conn.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE delivered != 0"
                " AND delivered <= ? LIMIT ?)", (cutoff, chunk)).rowcount)
            total += n
            if n < chunk:
                return total

    def _set_meta_sync(self, key: str, value: str) -> None:
        self._write(False, lambda conn: conn.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))

    def _get_meta_sync(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _latest_sync(self) -> dict[str, Record]:
        rows = self._db().execute(
            "SELECT seq, ts_ms, point, value, value_is_bool, flags FROM latest ORDER BY point")
        return {p: Record(seq=s, kind=RecordKind.TELEMETRY, ts_ms=ts, point=p,
                          value=bool(v) if b else v, flags=Flag(f))
                for s, ts, p, v, b, f in rows}


__all__ = ["NewRecord", "Outbox", "OutboxCorruptError", "OutboxError", "OutboxFullError",
           "OutboxRecordError", "OutboxStats", "OutboxVersionError", "SCHEMA_VERSION",
           "SEND_ORDER", "lane_of", "read_status"]
