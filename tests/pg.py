"""The PostgreSQL the tests use (127.0.0.1:5432; CI starts it) and a fresh schema per test.

A test marked `postgres` FAILS when the server is not reachable: a silent skip would let CI
pass without ever running the PostgreSQL backend.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from central.storage import Storage, open_storage

PG_URL = os.environ.get("FIELDLINK_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def url_with_schema(url: str, schema: str) -> str:
    """`url` with `search_path` set to `schema` through libpq's `options` parameter."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


def admin_connect(url: str = PG_URL) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {url} ({exc}). Tests marked `postgres` need "
                    "it: start it (CI's .ci/run does) or point FIELDLINK_TEST_PG_URL at one, "
                    "or deselect them with -m 'not postgres'.", pytrace=False)


@contextmanager
def pg_schema(prefix: str = "fl_test") -> Iterator[str]:
    """Create a uniquely named schema, yield a URL whose search_path is it, drop it after."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin_connect() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield url_with_schema(PG_URL, schema)
    finally:
        with admin_connect() as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def database_url(kind: str, tmp_path: Path, prefix: str = "fl_test") -> Iterator[str]:
    """The URL of a new central database of `kind` (one of BACKENDS): a SQLite file under
    `tmp_path`, or a fresh PostgreSQL schema (named from `prefix`), dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/central.db"
    else:
        with pg_schema(prefix) as url:
            yield url


@contextlib.asynccontextmanager
async def backend(kind: str, tmp_path: Path, n: int = 1,
                  latest_interval_s: float | None = None) -> AsyncIterator[list[Storage]]:
    """`n` storage instances (separate connections) on one new database of `kind`;
    `latest_interval_s` as `open_storage` takes it."""
    async with contextlib.AsyncExitStack() as stack:
        url = stack.enter_context(database_url(kind, tmp_path))
        yield [await stack.enter_async_context(
            open_storage(url, latest_interval_s=latest_interval_s)) for _ in range(n)]
