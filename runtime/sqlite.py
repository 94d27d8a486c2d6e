"""One SQLite connection owned by one thread, and schema migrations by `PRAGMA user_version`.

Both programs keep their SQLite files this way (STYLE.md §4): the edge's outbox, alarm state
and command ledger, central's SQLite storage and the stores beside it (`SideStore`, which
opens a PostgreSQL connection on the same thread when the URL names one). One single-worker
executor touches the connection; coroutines await `SqliteOwner.call(fn)`, which runs `fn` on
that thread and turns `sqlite3.Error`/`OSError` into the store's own error class. Commits go
through `transaction(body)` (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception).

`Migrations` registers schema steps by version (`@migrations.step(2)`, or `migrations.sql(2,
script)` for a step that is plain SQL); `migrate(conn)` runs the missing ones in order, each in
its own transaction, and refuses a file that a newer program wrote (its version is higher than
any step known here). `SqliteStore` is the base of the edge's small stores (alarm state,
command and terminal ledgers): one file, one owner thread, `async with Store.open(path)`.

Example::

    owner = SqliteOwner(thread_name="outbox", error=OutboxError, closed_message="closed")
    async with owner.running(lambda: connect(path, ["journal_mode = WAL"], MIGRATIONS)):
        rows = await owner.call(lambda: owner.conn.execute("SELECT 1").fetchall())
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, ParamSpec, Self, TypeVar

import structlog

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
Migration = Callable[[sqlite3.Connection], None]


class Migrations:
    """Schema steps by version; `too_new(found, known)` is the error for a newer file."""

    def __init__(self, too_new: Callable[[int, int], BaseException], *,
                 event: str | None = None) -> None:
        self._steps: dict[int, Migration] = {}
        self._too_new = too_new
        self._event = event  # logged after each step, with its version

    def step(self, version: int) -> Callable[[Migration], Migration]:
        """Register a schema step; each runs once, in order, in its own transaction."""
        def register(fn: Migration) -> Migration:
            assert version not in self._steps, f"duplicate migration {version}"
            self._steps[version] = fn
            return fn
        return register

    def sql(self, version: int, script: str) -> None:
        """Register a step that runs the `;`-separated statements of `script` one by one
        (`executescript` would commit first, outside the step's transaction)."""
        @self.step(version)
        def run(conn: sqlite3.Connection) -> None:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)

    @property
    def latest(self) -> int:
        return max(self._steps)

    def migrate(self, conn: sqlite3.Connection) -> int:
        """Bring the file up to `latest`; returns it."""
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > self.latest:
            raise self._too_new(current, self.latest)
        for version in sorted(v for v in self._steps if v > current):
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._steps[version](conn)
                conn.execute(f"PRAGMA user_version = {int(version)}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLITE_FULL may have rolled it back already
                    conn.execute("ROLLBACK")
                raise
            if self._event is not None:
                log.info(self._event, version=version)
        return self.latest


def connect(path: Path, pragmas: Sequence[str], migrations: Migrations) -> sqlite3.Connection:
    """Open (creating if needed) `path` in autocommit mode, run `pragmas`, then migrate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        migrations.migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def open_reader(path: Path, *, autocommit: bool = False) -> sqlite3.Connection | None:
    """A read-only connection to a store file another process writes (for the CLI), or None
    while there is nothing to read: no file yet, or one whose first migration has not committed
    (the daemon is creating it right now; its tables are not there yet). `autocommit`: no
    implicit transactions (`isolation_level=None`)."""
    path = Path(path)
    if not path.exists():
        return None
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = (sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None) if autocommit
            else sqlite3.connect(uri, uri=True, timeout=5.0))
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.close()
            return None
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteOwner:
    """A connection that only one worker thread touches; callers await `call()`.

    `error` is the store's base error: `call()` raises it (from `wrap(exc)`, by default
    `error(str(exc))`) for an exception of the `translate` classes (`sqlite3.Error`, `OSError`;
    `()` leaves the caller's errors as they are), and `error(closed_message)` while the owner
    is closed or `conn` has no connection. `open()` starts the thread; `close()` stops it, and
    `open()` may start it again.
    """

    def __init__(self, *, thread_name: str, error: type[Exception], closed_message: str,
                 wrap: Callable[[BaseException], Exception] | None = None,
                 translate: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)) -> None:
        self.thread_name = thread_name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the executor thread
        self._error = error
        self._wrap = wrap or (lambda exc: error(str(exc)))
        self._translate = translate
        self._closed_message = closed_message

    @property
    def is_open(self) -> bool:
        return self._executor is not None

    async def open(self, open_sync: Callable[[], sqlite3.Connection | None]) -> None:
        """Start the thread and run `open_sync()` on it; the connection it returns (if any)
        becomes `conn`. A no-op when open; when `open_sync` fails, the thread stops again."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        try:
            await self.call(self._adopt, open_sync)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self, close_sync: Callable[[], object] | None = None) -> None:
        """Run `close_sync()` (by default: close `conn`) on the thread, then stop it; a no-op
        when closed."""
        if self._executor is None:
            return
        try:
            await self.call(close_sync or self._close_sync)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    @contextlib.asynccontextmanager
    async def running(self, open_sync: Callable[[], sqlite3.Connection | None]
                      ) -> AsyncIterator[None]:
        """`open(open_sync)`; on exit `close()`, an error closing swallowed."""
        await self.open(open_sync)
        try:
            yield
        finally:
            with contextlib.suppress(self._error):
                await self.close()

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(*args, **kwargs)` on the worker thread."""
        if self._executor is None:
            raise self._error(self._closed_message)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          partial(self._guarded, fn, *args, **kwargs))

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection (worker thread only)."""
        if self._conn is None:
            raise self._error(self._closed_message)
        return self._conn

    def transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """`body(conn)` in one write transaction (worker thread only)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL among them); a second
            # ROLLBACK would fail with "cannot rollback - no transaction is active".
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _guarded(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except self._translate as exc:
            raise self._wrap(exc) from exc

    def _adopt(self, open_sync: Callable[[], sqlite3.Connection | None]) -> None:
        conn = open_sync()
        if conn is not None:
            self._conn = conn

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SqliteStore:
    """A store in one SQLite file (WAL, synchronous FULL) that its own thread owns; open it
    with `async with Store.open(path)`, the constructor does no I/O.

    A subclass names itself (`name`: the thread, the `<name>_opened` log event and the closed
    error's message derive from it), its base `error` and its `migrations`, and calls
    `self._run(fn, ...)` to run `fn` on the thread (`self._sqlite.conn` there)."""

    name: ClassVar[str]
    error: ClassVar[type[Exception]]
    migrations: ClassVar[Migrations]

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._sqlite = SqliteOwner(thread_name=self.name.replace(" ", "-"), error=self.error,
                                   closed_message=f"{self.name} is closed")
        self._run = self._sqlite.call

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Self]:
        store = cls(path)
        async with store._sqlite.running(store._open_sync):
            yield store

    def _open_sync(self) -> sqlite3.Connection:
        conn = connect(self.path, ("journal_mode = WAL", "synchronous = FULL"), self.migrations)
        log.info(f"{self.name.replace(' ', '_')}_opened", path=str(self.path))
        return conn

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        """One statement in its own transaction (worker thread only); the rows it changed."""
        return self._sqlite.transaction(lambda conn: conn.execute(sql, params).rowcount)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The rows of one query (worker thread only)."""
        return self._sqlite.conn.execute(sql, params).fetchall()


__all__ = ["Migration", "Migrations", "SqliteOwner", "SqliteStore", "connect", "open_reader"]
