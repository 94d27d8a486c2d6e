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

from central.alarms.lifecycle import AlarmPolicy
from central.storage.aggregates import Bucket, RetentionPolicy
from central.storage.base import (
    Device,
    Gateway,
    Latest,
    Point,
    PurgeResult,
    RecordCounts,
    Sample,
    Storage,
    WriteResult,
    device_ref,
    parse_device_ref,
    parse_point_ref,
    point_ref,
    split_key,
)
from central.storage.delivery import DeliverySummary, GatewayDelivery
from central.storage.errors import (
    BadRefError,
    DatabaseWriteError,
    NotFoundError,
    StorageError,
    UnknownDeviceError,
    UnknownGatewayError,
    UnknownPointError,
    UnstorableValueError,
    UnsupportedDatabaseError,
)
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


def open_storage(url: str, *, alarm_policy: AlarmPolicy | None = None,
                 time_policy: TimePolicy | None = None,
                 latest_interval_s: float | None = None) -> Storage:
    """A backend for `url` (not yet open: use `async with` or `await storage.open()`), applying
    `alarm_policy` and `time_policy` (defaults: `AlarmPolicy()`, `TimePolicy()`) as it writes.

    `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, `sqlite:///:memory:`;
    `postgresql://user@host:port/db` (or `postgres://`), schema via `?options=-csearch_path%3DS`;
    `latest_interval_s`: how long PostgreSQL may hold latest values back (its default if None;
    `central.storage.postgres_latest`).
    """
    if url.startswith("sqlite:///"):
        from central.storage.sqlite import SqliteStorage

        return SqliteStorage(url.removeprefix("sqlite:///"), alarm_policy=alarm_policy,
                             time_policy=time_policy)
    if url.startswith(("postgresql://", "postgres://")):
        from central.storage.postgres import LATEST_INTERVAL_S, PostgresStorage

        return PostgresStorage(url, alarm_policy=alarm_policy, time_policy=time_policy,
                               latest_interval_s=LATEST_INTERVAL_S if latest_interval_s is None
                               else latest_interval_s)
    raise UnsupportedDatabaseError(url)


def safe_db_url(url: str) -> str:
    """The database URL for logs: a PostgreSQL password is never shown."""
    if url.startswith(("postgresql://", "postgres://")):
        from central.storage.postgres import describe_url

        return describe_url(url)
    return url
