"""Which CLI commands may create central's database, and the check the others make first.

`central serve` (on first start) and `central init` create the database. Every other command
that works on it (`central user …`, `central audit …`, `central gateway …`) refuses one that
does not exist: a mistyped `--db`, or none given in another folder, would otherwise make a new
empty database and act on it (a user added where central never looks, an audit log that
"verifies" with 0 rows).

A database exists when central has made its tables there: the SQLite file has central's
`schema_version` table, or the PostgreSQL schema in the URL's search_path has it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from central import CentralError
from central.config.settings import sqlite_path
from protocols.errors import DetailedError

CENTRAL_TABLE = "schema_version"  # made by central's first migration on either backend


class DatabaseMissingError(CentralError, DetailedError):
    """A command that works on an existing database was pointed at none (or not central's)."""

    template = ("no database at {where}: {reason}. Create it with `central init` and the same "
                "--db or --config (or start `central serve` on it once), or give the right one")
    where: str  # the path or the URL without a password
    reason: str


def describe(url: str) -> str:
    """Where `url` points, for people: a SQLite file as an absolute path (a relative one is
    relative to the working directory), a PostgreSQL URL without its password."""
    from central.storage import safe_db_url

    path = sqlite_path(url)
    if path is None or path == ":memory:":
        return safe_db_url(url)
    return str(Path(path).expanduser().resolve())


def require_existing_database(url: str) -> None:
    """Raise `DatabaseMissingError` unless `url` names a database central has already made.

    Reads only: a SQLite file is opened read-only (it is never created), PostgreSQL is asked
    whether the table exists in the URL's schema.
    """
    path = sqlite_path(url)
    if path == ":memory:":
        raise DatabaseMissingError(url, "an in-memory database is new every time")
    if path is not None:
        _require_sqlite(Path(path).expanduser(), describe(url))
    elif url.startswith(("postgresql://", "postgres://")):
        _require_postgres(url)
    # another scheme: open_storage says it is unsupported


def _require_sqlite(path: Path, where: str) -> None:
    if not path.is_file():
        raise DatabaseMissingError(where, "no such database file")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as conn:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (CENTRAL_TABLE,)).fetchone()
    except sqlite3.Error as exc:
        raise DatabaseMissingError(where, f"not a readable SQLite database ({exc})") from exc
    if found is None:
        raise DatabaseMissingError(where, "not a central database (it has no tables of "
                                          "central's)")


def _require_postgres(url: str) -> None:
    import psycopg

    where = describe(url)
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("SELECT current_schema(), to_regclass(%s) IS NOT NULL",
                               (CENTRAL_TABLE,)).fetchone()
    except psycopg.Error as exc:
        raise DatabaseMissingError(where, f"cannot open it ({str(exc).strip()})") from exc
    schema, found = row if row else (None, False)
    if schema is None:
        raise DatabaseMissingError(where, "its search_path names no existing schema")
    if not found:
        raise DatabaseMissingError(where, f"schema {schema} has no tables of central's")
