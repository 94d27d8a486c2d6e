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

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent import EdgeError, SchemaTooNewError
from edge_agent.alarms.rules import AlarmSnapshot
from runtime.sqlite import Migrations, SqliteStore, open_reader


class AlarmStoreError(EdgeError):
    """The alarm state file cannot be opened, read or written (wraps the sqlite3 error)."""


class AlarmStoreVersionError(AlarmStoreError, SchemaTooNewError):
    store = "alarm store"


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
_MIGRATIONS = Migrations(AlarmStoreVersionError)
_MIGRATIONS.sql(1, _SCHEMA)


SCHEMA_VERSION = _MIGRATIONS.latest
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
    try:
        conn = open_reader(path)
        if conn is None:
            return []
        try:
            return _select(conn, active_only)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise AlarmStoreError(str(exc)) from exc


class AlarmStore(SqliteStore):
    """Persisted alarm states.

    Example::

        async with AlarmStore.open(data_dir / "alarms.db") as store:
            active = await store.load_active()
            await store.save(evaluation.snapshots())
    """

    name = "alarm store"
    error = AlarmStoreError
    migrations = _MIGRATIONS

    async def load_active(self) -> list[AlarmSnapshot]:
        """Every alarm whose last saved level is above 0."""
        return await self._sqlite.call(lambda: _select(self._sqlite.conn, True))

    async def load_all(self) -> list[AlarmSnapshot]:
        return await self._sqlite.call(lambda: _select(self._sqlite.conn, False))

    async def save(self, snapshots: Sequence[AlarmSnapshot]) -> None:
        """Upsert the given alarms in one durable transaction."""
        if not snapshots:
            return
        now = time.time_ns() // 1_000_000
        rows = [(s.alarm_id, s.device, s.point, s.rule, s.level, s.since_ms, s.changed_ms,
                 s.value, int(isinstance(s.value, bool)), s.threshold, now) for s in snapshots]
        await self._sqlite.call(self._sqlite.transaction,
                                lambda conn: conn.executemany(_UPSERT, rows))


__all__ = ["AlarmStore", "AlarmStoreError", "AlarmStoreVersionError", "SCHEMA_VERSION",
           "read_alarms"]
