"""Portable SQL programs: logic written once, run by either backend inside its transaction.

A program is a generator that yields `Sql` statements and is sent back each statement's rows
(a list of tuples; empty when the statement returns none); it ends with `return result`. The
SQLite backend runs it on its database thread (`run_sync`), the PostgreSQL backend on its
async connection (`run_async`), in whatever transaction the caller opened — so alarm
transitions commit in the same transaction as the batch that carried them. The same design
as a sans-I/O protocol state machine: the logic never touches a driver.

Statements use `?` placeholders and SQL both databases accept (`ON CONFLICT`, `RETURNING`,
partial indexes, `CASE`, `coalesce`); no `%` in the text (psycopg's placeholder character).
`lock=True` asks PostgreSQL for `FOR UPDATE`; SQLite needs none, since its write transactions
(`BEGIN IMMEDIATE`) already hold the database.

    def count_open(gw: str) -> Program[int]:
        rows = yield Sql("SELECT count(*) FROM alarms WHERE gw = ? AND state = 'active'", (gw,))
        return rows[0][0]

    n = await storage.run(lambda: count_open("gw-1"), write=False)
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Rows = list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Sql:
    text: str
    params: tuple[Any, ...] = ()
    lock: bool = False  # PostgreSQL: FOR UPDATE


Program = Generator[Sql, Rows, T]
ProgramFactory = Callable[[], Program[T]]


def placeholders(n: int) -> str:
    """`?, ?, ?` for an IN list of `n` values (n >= 1)."""
    return ", ".join("?" * n)


@dataclass(frozen=True, slots=True)
class _Returned(Generic[T]):
    value: T


def _advance(program: Program[T], rows: Rows | None) -> Sql | _Returned[T]:
    """The program's next statement, sent the rows of its last one (None to start it), or
    what it returned: the one place that speaks the generator protocol for both drivers."""
    try:
        return next(program) if rows is None else program.send(rows)
    except StopIteration as stop:
        return _Returned(stop.value)


def run_sync(conn: sqlite3.Connection, program: Program[T]) -> T:
    """Run `program` on a sqlite3 connection, in the caller's transaction."""
    with contextlib.closing(program):
        step = _advance(program, None)
        while isinstance(step, Sql):
            step = _advance(program, conn.execute(step.text, step.params).fetchall())
        return step.value


@functools.lru_cache(maxsize=512)
def pg_text(text: str, lock: bool) -> str:
    if "%" in text:
        raise ValueError(f"'%' in portable SQL: {text!r}")
    return text.replace("?", "%s") + (" FOR UPDATE" if lock else "")


async def run_async(conn: Any, program: Program[T]) -> T:
    """Run `program` on a psycopg AsyncConnection, in the caller's transaction."""
    with contextlib.closing(program):
        step = _advance(program, None)
        while isinstance(step, Sql):
            cur = await conn.execute(pg_text(step.text, step.lock), step.params)
            step = _advance(program, await cur.fetchall() if cur.description is not None else [])
        return step.value
