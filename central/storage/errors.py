"""Central storage's errors (DESIGN.md §4.3): what every backend and reader raises."""

from __future__ import annotations

from central import CentralError
from protocols.errors import DetailedError


class StorageError(CentralError):
    """Base of every storage error."""


class UnsupportedDatabaseError(StorageError, DetailedError):
    template = "unsupported database URL {url!r} (expected sqlite:///PATH or postgresql://...)"
    url: str


class DatabaseWriteError(StorageError):
    """A write transaction failed and was rolled back; nothing of it is stored."""


class UnstorableValueError(DatabaseWriteError):
    """The write was rolled back because of a value in it (a number or text the database
    refuses), not because of the database: the same write fails again."""


class NotFoundError(StorageError, DetailedError):
    """A gateway, device or point that storage does not hold."""

    kind = "object"

    template = "unknown {kind} {ref!r}"
    ref: str


class UnknownGatewayError(NotFoundError):
    kind = "gateway"


class UnknownDeviceError(NotFoundError):
    kind = "device"


class UnknownPointError(NotFoundError):
    kind = "point"


class BadRefError(StorageError, DetailedError):
    template = "bad reference {ref!r}: expected {expected}"
    ref: str
    expected: str
