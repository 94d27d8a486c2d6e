"""The outbox file: errors, schema migrations and shared SQL.

Split from `store.py` so that `read_status` (`status.py`: the technician's CLI, a second
process) and the disk budget (`budget.py`) share the schema without importing the daemon's
class.
"""

from __future__ import annotations

import errno
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog

from edge_agent import EdgeError, SchemaTooNewError
from edge_agent.outbox.seqs import create_table as seq_reserve_table
from protocols.envelope import Lane
from protocols.errors import DetailedError

log = structlog.get_logger(__name__)


# --- errors --------------------------------------------------------------------------------


class OutboxError(EdgeError):
    """Base of every outbox error; wraps the sqlite3 error it came from (`__cause__`)."""


class OutboxCorruptError(OutboxError):
    """The file is not an SQLite database or is damaged."""


class OutboxFullError(OutboxError):
    """The disk or the size cap (`max_bytes`) is full even after thinning and evicting
    telemetry (what is left is alarms, events and the newest value of each point); nothing
    of the failed call was committed."""


class OutboxDiskFullError(OutboxFullError):
    """The disk is full (the budget could not prevent it): of the failed call, telemetry was
    dropped and counted, and alarm, event and command-result records are held in memory
    until the disk has room (`outbox_ring.py`). `lost`: held records given up so far because
    the ring overflowed."""

    def __init__(self, message: str, *, held: int, dropped: int, lost: int) -> None:
        super().__init__(message)
        self.held = held
        self.dropped = dropped
        self.lost = lost


class OutboxVersionError(OutboxError, SchemaTooNewError):
    """The file was made by a newer agent (its schema version is unknown here)."""

    store = "outbox"


class OutboxRecordError(OutboxError, DetailedError):
    """A record handed to `append` cannot be stored; nothing of that call was committed."""

    template = "record {index}: {reason}"
    index: int
    reason: str


_IOERR_SHMSIZE = 4874  # SQLITE_IOERR_SHMSIZE: no room for the `-shm` file (a full disk)


def is_full(exc: BaseException) -> bool:
    """ENOSPC from the OS, SQLITE_FULL (also `max_page_count` reached), or no room for the
    shared-memory file when a WAL database is opened on a full disk."""
    if isinstance(exc, OutboxFullError):
        return True
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF == sqlite3.SQLITE_FULL
                                      or code == _IOERR_SHMSIZE)


def translate(exc: BaseException) -> OutboxError:
    if is_full(exc):
        return OutboxFullError(str(exc))
    if isinstance(exc, OSError):
        return OutboxError(str(exc))
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return OutboxCorruptError(str(exc))
    return OutboxError(str(exc))


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
    conn.execute("CREATE INDEX records_undelivered ON records (lane, seq, kind) "
                 "WHERE delivered = 0")
    conn.execute("CREATE INDEX records_delivered ON records (delivered) WHERE delivered != 0")
    conn.execute("""
        CREATE TABLE latest (
            point TEXT PRIMARY KEY, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
            value, value_is_bool INTEGER NOT NULL DEFAULT 0, flags INTEGER NOT NULL DEFAULT 0
        )""")
    conn.execute("INSERT INTO meta VALUES ('stream', ?), ('created_ms', ?)",
                 (uuid.uuid4().hex, str(time.time_ns() // 1_000_000)))
    conn.execute("INSERT INTO counters VALUES ('delivered_total', 0)")


@_migration(2)
def _m002_clock_and_budget(conn: sqlite3.Connection) -> None:
    # Both clocks per record (§4.7): `mono_ms` is CLOCK_BOOTTIME of boot `boot`, so that a
    # wall-clock step can be undone for records of the same boot. NULL in rows from v1.
    conn.execute("ALTER TABLE records ADD COLUMN mono_ms INTEGER")
    conn.execute("ALTER TABLE records ADD COLUMN boot INTEGER")
    conn.execute("""
        CREATE TABLE boots (
            id INTEGER PRIMARY KEY, boot_id TEXT NOT NULL UNIQUE,
            first_seq INTEGER NOT NULL, first_wall_ms INTEGER NOT NULL
        )""")
    conn.executemany("INSERT OR IGNORE INTO counters VALUES (?, 0)",
                     [(n,) for n in COUNTERS])


@_migration(3)
def _m003_disk_full_counters(conn: sqlite3.Connection) -> None:
    conn.executemany("INSERT OR IGNORE INTO counters VALUES (?, 0)",
                     [(n,) for n in DISK_FULL_COUNTERS])


@_migration(4)
def _m004_seq_reserve(conn: sqlite3.Connection) -> None:
    seq_reserve_table(conn)  # seqs reserved on disk ahead of use (`outbox_seqs.py`)


COUNTERS = ("thinned_total", "dropped_total", "budget_events", "clock_corrected_total",
            "full_retries")
# Full-disk episodes (`outbox_ring.py`): how many, and what each held, dropped or gave up.
DISK_FULL_COUNTERS = ("disk_full_episodes", "disk_full_telemetry_dropped", "disk_full_held",
                      "disk_full_held_lost")
SCHEMA_VERSION = max(_MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
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
            rollback(conn)
            raise
        log.info("outbox_migrated", version=version)
    return SCHEMA_VERSION


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so itself (it does on
    SQLITE_FULL, and a second ROLLBACK fails with "no transaction is active")."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def connect(path: Path, max_bytes: int | None) -> sqlite3.Connection:
    """Open (creating if needed) the outbox file for the daemon: WAL, migrated, capped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        if not conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            # Only a new file can choose: freed pages can then go back to the disk.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise OutboxError(f"cannot use WAL on {path} (journal_mode={mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA temp_store = MEMORY")
        journal_limit = 64 * 2**20
        if max_bytes is not None:
            journal_limit = min(journal_limit, max(2**18, max_bytes // 16))
        conn.execute(f"PRAGMA journal_size_limit = {journal_limit}")
        # The budget counts the WAL too: checkpoint often enough that it stays a small part.
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        checkpoint_pages = (
            1000 if max_bytes is None else max(16, min(1000, max_bytes // page // 32))
        )
        conn.execute(f"PRAGMA wal_autocheckpoint = {checkpoint_pages}")
        migrate(conn)
        apply_cap(conn, max_bytes)
    except BaseException:
        conn.close()
        raise
    return conn


def apply_cap(conn: sqlite3.Connection, max_bytes: int | None) -> None:
    """The budget as a hard cap: past it SQLite fails with SQLITE_FULL (`max_page_count`).
    SQLite keeps the current size if that is larger; call again after a vacuum."""
    if max_bytes is not None:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {max(1, int(max_bytes) // page)}")


# --- SQL shared by the daemon, the budget and `read_status` ----------------------------------

COLUMNS = ("kind, lane, ts_ms, point, value, value_is_bool, flags, attrs, created_ms, mono_ms,"
           " boot")
INSERT = f"INSERT INTO records ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
UPSERT_LATEST = """
    INSERT INTO latest (point, seq, ts_ms, value, value_is_bool, flags) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (point) DO UPDATE SET seq = excluded.seq, ts_ms = excluded.ts_ms,
        value = excluded.value, value_is_bool = excluded.value_is_bool, flags = excluded.flags
    WHERE excluded.ts_ms >= latest.ts_ms
        OR excluded.flags & 2 != 0  -- CLOCK_SUSPECT: its ts cannot be compared, seq order wins
"""
ROW = "seq, kind, ts_ms, point, value, value_is_bool, flags, attrs, created_ms, mono_ms, boot"
SELECT_LANE = (f"SELECT {ROW} FROM records WHERE delivered = 0 AND lane = ? AND seq > ?"
               " AND seq < ? ORDER BY seq LIMIT ?")
TELEMETRY_LANE = int(Lane.LIVE)  # stored lane of all telemetry; backlog is a view by age
MAX_SEQ = 2**63 - 1
LANE_NAMES = ("alarm", "event", "live", "backlog")


def add_counter(conn: sqlite3.Connection, name: str, n: int) -> None:
    if n:
        conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (n, name))


def used_bytes(conn: sqlite3.Connection) -> tuple[int, int]:
    """(bytes in use, bytes on the freelist) of the main database file."""
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    count = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return (count - free) * page, free * page


def backlog_from_counters(conn: sqlite3.Connection) -> int:
    """Undelivered records in O(1): every seq handed out is undelivered, delivered, thinned
    or dropped, and the last three are counted in the same transactions that do them."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    (gone,) = conn.execute("SELECT coalesce(sum(value), 0) FROM counters WHERE name IN"
                           " ('delivered_total', 'thinned_total', 'dropped_total')").fetchone()
    return (row[0] if row else 0) - gone


def correct_clock(conn: sqlite3.Connection, boot_id: str, good_offset_ms: int,
                  tolerance_ms: int) -> int:
    """Re-time the undelivered records of boot `boot_id` to a confirmed wall-minus-boot-time
    offset (§4.7), clear their CLOCK_SUSPECT, and return how many changed. Records stamped
    with an offset within `tolerance_ms` keep their time. Runs inside the caller's
    transaction."""
    row = conn.execute("SELECT id, first_seq FROM boots WHERE boot_id = ?", (boot_id,)).fetchone()
    if row is None:
        return 0
    boot, first = row
    suspect = 2  # Flag.CLOCK_SUSPECT
    n = conn.execute(
        "UPDATE records SET ts_ms = ts_ms + (:good - (created_ms - mono_ms)),"
        " created_ms = mono_ms + :good, flags = flags & ~:suspect"
        " WHERE seq >= :first AND boot = :boot AND delivered = 0"
        " AND mono_ms IS NOT NULL AND abs(created_ms - mono_ms - :good) > :tol",
        {"good": good_offset_ms, "suspect": suspect, "first": first, "boot": boot,
         "tol": tolerance_ms}).rowcount
    n += conn.execute("UPDATE records SET flags = flags & ~? WHERE seq >= ? AND boot = ?"
                      " AND delivered = 0 AND flags & ? != 0",
                      (suspect, first, boot, suspect)).rowcount
    conn.execute("UPDATE latest SET ts_ms = r.ts_ms, flags = r.flags FROM records r"
                 " WHERE r.seq = latest.seq AND r.seq >= ? AND r.boot = ?", (first, boot))
    add_counter(conn, "clock_corrected_total", n)
    return n


__all__ = ["COUNTERS", "OutboxCorruptError", "OutboxDiskFullError", "OutboxError",
           "OutboxFullError", "OutboxRecordError", "OutboxVersionError", "SCHEMA_VERSION"]
