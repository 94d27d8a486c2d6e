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
from central.storage.retire_schema import retired_tables
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

# The readings, keyed by an integer stream id (SQLite only; PostgreSQL keeps its table). Keyed
# by (gw TEXT, stream TEXT, seq) every row and every entry of its (point_id, ts_ms) index held
# both strings (a stream is 32 characters): measured with the same rows, index, inserts and
# commits, an integer key halves the CPU per inserted row and the bytes per row (185 to 82).
# `readings` stays, as a view with the old columns, for every reader and for the rare writes
# that name a row by (gw, stream, seq) (a time correction, retention), through its triggers;
# central's ingest inserts into `reading_rows` itself (`central.storage.sqlite`).
_READINGS_VIEW = (
    "CREATE VIEW readings AS SELECT s.gw AS gw, s.stream AS stream, r.seq AS seq,"
    " r.point_id AS point_id, r.ts_ms AS ts_ms, r.value AS value, r.text AS text,"
    " r.flags AS flags, r.received_ms AS received_ms"
    " FROM reading_rows r JOIN reading_streams s ON s.id = r.sid")
_SID = "(SELECT id FROM reading_streams WHERE gw = {0}.gw AND stream = {0}.stream)"
_READINGS_TRIGGERS = (
    "CREATE TRIGGER readings_insert INSTEAD OF INSERT ON readings BEGIN"
    " INSERT INTO reading_streams (gw, stream) VALUES (NEW.gw, NEW.stream)"
    " ON CONFLICT (gw, stream) DO NOTHING;"
    f" INSERT INTO reading_rows VALUES ({_SID.format('NEW')}, NEW.seq, NEW.point_id,"
    " NEW.ts_ms, NEW.value, NEW.text, NEW.flags, NEW.received_ms)"
    " ON CONFLICT (sid, seq) DO NOTHING; END",
    "CREATE TRIGGER readings_update INSTEAD OF UPDATE ON readings BEGIN"
    " UPDATE reading_rows SET point_id = NEW.point_id, ts_ms = NEW.ts_ms, value = NEW.value,"
    " text = NEW.text, flags = NEW.flags, received_ms = NEW.received_ms"
    f" WHERE sid = {_SID.format('OLD')} AND seq = OLD.seq; END",
    "CREATE TRIGGER readings_delete INSTEAD OF DELETE ON readings BEGIN"
    f" DELETE FROM reading_rows WHERE sid = {_SID.format('OLD')} AND seq = OLD.seq; END",
)


@migration
def m007_reading_stream_ids(conn: sqlite3.Connection) -> None:
    conn.execute("""CREATE TABLE reading_streams (
        id INTEGER PRIMARY KEY, gw TEXT NOT NULL, stream TEXT NOT NULL, UNIQUE (gw, stream))""")
    conn.execute("""CREATE TABLE reading_rows (
        sid INTEGER NOT NULL, seq INTEGER NOT NULL, point_id INTEGER, ts_ms INTEGER NOT NULL,
        value REAL, text TEXT, flags INTEGER NOT NULL, received_ms INTEGER NOT NULL,
        PRIMARY KEY (sid, seq)) WITHOUT ROWID""")
    conn.execute("INSERT INTO reading_streams (gw, stream)"
                 " SELECT DISTINCT gw, stream FROM readings ORDER BY gw, stream")
    conn.execute("INSERT INTO reading_rows SELECT s.id, r.seq, r.point_id, r.ts_ms, r.value,"
                 " r.text, r.flags, r.received_ms FROM readings r JOIN reading_streams s"
                 " ON s.gw = r.gw AND s.stream = r.stream ORDER BY s.id, r.seq")
    conn.execute("DROP TABLE readings")
    conn.execute("CREATE INDEX readings_point_ts ON reading_rows (point_id, ts_ms)")
    conn.execute(_READINGS_VIEW)
    for sql in _READINGS_TRIGGERS:
        conn.execute(sql)


@migration
def m008_retired_gateways(conn: sqlite3.Connection) -> None:
    for sql in retired_tables("sqlite"):
        conn.execute(sql)


@migration
def m009_pending_ids_never_reused(conn: sqlite3.Connection) -> None:
    """`agg_pending` ids with AUTOINCREMENT: a flush folds the rows up to the newest id when
    it began (`central.storage.aggregates`), and a plain rowid is reused once the rows
    holding the highest ids are deleted, so a row written during a flush could get an id
    under that bound."""
    conn.execute("""CREATE TABLE agg_pending_new (id INTEGER PRIMARY KEY AUTOINCREMENT,
        samples BLOB NOT NULL, n INTEGER NOT NULL, created_ms INTEGER NOT NULL,
        part INTEGER NOT NULL DEFAULT 0)""")
    conn.execute("INSERT INTO agg_pending_new (id, samples, n, created_ms, part)"
                 " SELECT id, samples, n, created_ms, part FROM agg_pending ORDER BY id")
    conn.execute("DROP TABLE agg_pending")
    conn.execute("ALTER TABLE agg_pending_new RENAME TO agg_pending")
    conn.execute("CREATE INDEX agg_pending_part ON agg_pending (part, id)")


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
