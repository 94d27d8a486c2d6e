"""The SQLite backend's schema: migrations as registered functions, applied in order.

A step's version is its position in `MIGRATIONS`; each runs in its own transaction and is
recorded in `schema_version`. The tables shared with PostgreSQL come from the `*_schema`
modules (`alarm_schema`, `delivery_schema`, `identity_schema`, `geo_schema`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import structlog

from central.storage.program import run_sync
from central.storage.shared_schema import SHARED_STEPS, SharedStep

log = structlog.get_logger(__name__)

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register a schema step; its version is its position (1-based). Never reorder."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    conn.execute("""CREATE TABLE gateways (
        gw TEXT PRIMARY KEY, stream TEXT, online INTEGER NOT NULL DEFAULT 0, boot_id TEXT,
        version TEXT, bearer TEXT, backlog INTEGER, last_seen_ms INTEGER, state_ts_ms INTEGER,
        birth TEXT)""")
    conn.execute("""CREATE TABLE points (
        id INTEGER PRIMARY KEY, gw TEXT NOT NULL, device TEXT NOT NULL, point TEXT NOT NULL,
        name_zh TEXT NOT NULL DEFAULT '', unit TEXT NOT NULL DEFAULT '',
        profile TEXT NOT NULL DEFAULT '', ordinal INTEGER,
        UNIQUE (gw, device, point))""")
    # WITHOUT ROWID: the (gw, stream, seq) key is the table itself, one b-tree less per insert.
    conn.execute("""CREATE TABLE readings (
        gw TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, point_id INTEGER,
        ts_ms INTEGER NOT NULL, value REAL, text TEXT, flags INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        PRIMARY KEY (gw, stream, seq)) WITHOUT ROWID""")
    conn.execute("CREATE INDEX readings_point_ts ON readings (point_id, ts_ms)")
    conn.execute("""CREATE TABLE events (
        gw TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, kind INTEGER NOT NULL,
        point_id INTEGER, ts_ms INTEGER NOT NULL, value REAL, text TEXT, flags INTEGER NOT NULL,
        attrs TEXT, received_ms INTEGER NOT NULL,
        PRIMARY KEY (gw, stream, seq))""")
    conn.execute("CREATE INDEX events_gw_ts ON events (gw, ts_ms)")
    conn.execute("""CREATE TABLE latest (
        point_id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, value REAL, text TEXT)""")


def _shared(step: SharedStep) -> Migration:
    def apply(conn: sqlite3.Connection) -> None:
        for sql in step.ddl("sqlite"):
            conn.execute(sql)
        if step.then is not None:
            run_sync(conn, step.then())

    apply.__name__ = step.name
    return apply


MIGRATIONS.extend(_shared(step) for step in SHARED_STEPS)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every registered migration not yet applied, each in its own transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    for version, fn in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(conn)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("db_migrated", version=version, step=fn.__name__)
    return len(MIGRATIONS)
