"""Central's storage (DESIGN.md §4.3, §9): `open_storage(url)` and the interface it returns.

A backend keeps gateways, points, readings, events and the latest value per point, what it holds
of each gateway's stream (`delivery`), 1-minute / 1-hour aggregates (`aggregates`) and flags
implausible record times (`timecheck`). Every method is async; a backend runs its blocking
driver calls off the event loop. SQL stays portable
(`INSERT ... ON CONFLICT ... DO NOTHING / DO UPDATE`) so the PostgreSQL backend can share it.
The interface, its errors and value types live in `central.storage.base`, re-exported here.

Use it as an async context manager::

    async with open_storage("sqlite:///./central.db") as storage:
        results = await storage.write_batches([batch])
"""

from __future__ import annotations

from central.storage.aggregates import Bucket, RetentionPolicy
from central.storage.base import (
    BadRefError,
    DatabaseWriteError,
    Device,
    Gateway,
    Latest,
    NotFoundError,
    Point,
    PurgeResult,
    RecordCounts,
    Sample,
    Storage,
    StorageError,
    UnknownDeviceError,
    UnknownGatewayError,
    UnknownPointError,
    UnstorableValueError,
    UnsupportedDatabaseError,
    WriteResult,
    device_ref,
    parse_device_ref,
    parse_point_ref,
    point_ref,
    split_key,
)
from central.storage.delivery import DeliverySummary, GatewayDelivery
from central.storage.timecheck import TimePolicy

__all__ = [
    "BadRefError", "Bucket", "DatabaseWriteError", "DeliverySummary", "Device", "Gateway",
    "GatewayDelivery", "Latest", "NotFoundError", "Point", "PurgeResult", "RecordCounts",
    "RetentionPolicy", "Sample", "Storage", "StorageError", "TimePolicy", "UnknownDeviceError",
    "UnknownGatewayError", "UnknownPointError", "UnstorableValueError",
    "UnsupportedDatabaseError", "WriteResult",
    "device_ref", "open_storage", "parse_device_ref", "parse_point_ref", "point_ref",
    "safe_db_url", "split_key",
]


def open_storage(url: str) -> Storage:
    """A backend for `url` (not yet open: use `async with` or `await storage.open()`).

    `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, `sqlite:///:memory:`;
    `postgresql://user@host:port/db` (or `postgres://`), schema via `?options=-csearch_path%3DS`.
    """
    if url.startswith("sqlite:///"):
        from central.storage.sqlite import SqliteStorage

        return SqliteStorage(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from central.storage.postgres import PostgresStorage

        return PostgresStorage(url)
    raise UnsupportedDatabaseError(url)


def safe_db_url(url: str) -> str:
    """The database URL for logs: a PostgreSQL password is never shown."""
    if url.startswith(("postgresql://", "postgres://")):
        from central.storage.postgres import describe_url

        return describe_url(url)
    return url
