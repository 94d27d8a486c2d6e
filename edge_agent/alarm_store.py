"""Alarm state on disk: one row per alarm id in its own SQLite file, `alarms.db`, next to the
outbox (DESIGN.md §7: alarm state survives reboot).

Why a separate file rather than a table in the outbox:

- The two could not share a transaction anyway: the outbox's connection belongs to its own
  thread and API, and a second connection to the same file commits separately.
- So what matters is the order, and it is: the alarm records go into the outbox first
  (together with the telemetry that caused them, in one append), then the new state is saved
  here. A crash between the two loses no alarm; at worst the alarm is raised once more after
  restart, and central keeps one active alarm per (point, rule) and merges it by `alarm_id`.
  The other order could lose a raise for good.
- The outbox is a queue with a disk budget, pruning and (§4.6) eviction, and may be replaced
  after a corrupt disk; alarm state is a tiny table written only on transitions. Separate
  files keep their schemas, migrations and failure modes apart.

Commits run with `synchronous=FULL`: they are rare and each one is an alarm. Like the outbox,
one thread (a single-worker executor) owns the connection and callers await it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import structlog

from edge_agent.errors import EdgeError
from edge_agent.rules import AlarmSnapshot

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
SCHEMA_VERSION = 1


class AlarmStoreError(EdgeError):
    """The alarm state file cannot be opened, read or written (wraps the sqlite3 error)."""


class AlarmStoreVersionError(AlarmStoreError):
    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"alarm store schema version {found} is newer than this agent's {known}")
        self.found = found
        self.known = known


_SCHEMA = """
CREATE TABLE alarms (
    alarm_id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    point TEXT NOT NULL,
    rule TEXT NOT NULL,
    level INTEGER NOT NULL,  -- 0 = cleared (the row stays, for status and audit)
    since_ms INTEGER,
    changed_ms INTEGER NOT NULL,
    value,
    value_is_bool INTEGER NOT NULL DEFAULT 0,
    threshold REAL,
    updated_ms INTEGER NOT NULL
)"""
_UPSERT = """
INSERT INTO alarms (alarm_id, device, point, rule, level, since_ms, changed_ms, value,
                    value_is_bool, threshold, updated_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (alarm_id) DO UPDATE SET device = excluded.device, point = excluded.point,
    rule = excluded.rule, level = excluded.level, since_ms = excluded.since_ms,
    changed_ms = excluded.changed_ms, value = excluded.value,
    value_is_bool = excluded.value_is_bool, threshold = excluded.threshold,
    updated_ms = excluded.updated_ms"""
_SELECT = ("SELECT alarm_id, device, point, rule, level, since_ms, changed_ms, value,"
           " value_is_bool, threshold FROM alarms")


def _snapshot(row: tuple[Any, ...]) -> AlarmSnapshot:
    alarm_id, device, point, rule, level, since, changed, value, is_bool, threshold = row
    return AlarmSnapshot(alarm_id=alarm_id, device=device, point=point, rule=rule, level=level,
                         since_ms=since, changed_ms=changed,
                         value=bool(value) if is_bool else value, threshold=threshold)


def _select(conn: sqlite3.Connection, active_only: bool) -> list[AlarmSnapshot]:
    where = " WHERE level > 0" if active_only else ""
    return [_snapshot(r) for r in conn.execute(_SELECT + where + " ORDER BY alarm_id")]


def read_alarms(path: Path, *, active_only: bool = True) -> list[AlarmSnapshot]:
    """The alarms in a store file, read-only, safe while the daemon writes (for the CLI)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            return _select(conn, active_only)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise AlarmStoreError(str(exc)) from exc


class AlarmStore:
    """Persisted alarm states.

    Example::

        async with AlarmStore.open(data_dir / "alarms.db") as store:
            active = await store.load_active()
            await store.save(evaluation.snapshots())
    """

    def __init__(self, path: Path) -> None:
        # Use `AlarmStore.open()`; the constructor does no I/O.
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alarm-store")
        self._conn: sqlite3.Connection | None = None  # touched only on the executor thread

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[AlarmStore]:
        store = cls(path)
        try:
            await store._call(store._open_sync)
            yield store
        finally:
            with contextlib.suppress(AlarmStoreError):
                await store._call(store._close_sync)
            store._executor.shutdown(wait=True)

    async def load_active(self) -> list[AlarmSnapshot]:
        """Every alarm whose last saved level is above 0."""
        return await self._call(lambda: _select(self._db(), True))

    async def load_all(self) -> list[AlarmSnapshot]:
        return await self._call(lambda: _select(self._db(), False))

    async def save(self, snapshots: Sequence[AlarmSnapshot]) -> None:
        """Upsert the given alarms in one durable transaction."""
        if not snapshots:
            return
        now = time.time_ns() // 1_000_000
        rows = [(s.alarm_id, s.device, s.point, s.rule, s.level, s.since_ms, s.changed_ms,
                 s.value, int(isinstance(s.value, bool)), s.threshold, now) for s in snapshots]
        await self._call(self._save_sync, rows)

    # --- plumbing ------------------------------------------------------------------------

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._guarded, fn, *args, **kwargs))

    @staticmethod
    def _guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise AlarmStoreError(str(exc)) from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AlarmStoreError("alarm store is closed")
        return self._conn

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise AlarmStoreVersionError(version, SCHEMA_VERSION)
            if version < 1:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(_SCHEMA)
                    conn.execute("PRAGMA user_version = 1")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        log.info("alarm_store_opened", path=str(self.path))

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _save_sync(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


__all__ = ["AlarmStore", "AlarmStoreError", "AlarmStoreVersionError", "SCHEMA_VERSION",
           "read_alarms"]
