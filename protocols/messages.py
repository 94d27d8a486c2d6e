"""The messages of the uplink envelope (DESIGN.md §4) as frozen classes; `protocols.envelope`
encodes and decodes them (and re-exports them: import them from there)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

from protocols.columnar import Columns
from protocols.limits import EnvelopeError

Value: TypeAlias = float | int | bool | str | None

# The pseudo point of device-level alarms (device offline): `<device>/_device`.
DEVICE_POINT = "_device"


class RecordKind(enum.IntEnum):
    TELEMETRY = 0
    ALARM = 1
    EVENT = 2
    CMD_RESULT = 3


class Lane(enum.IntEnum):
    """Send priority, lowest value first (DESIGN.md §4.2)."""

    ALARM = 0
    EVENT = 1
    LIVE = 2
    BACKLOG = 3


class Flag(enum.IntFlag):
    NONE = 0
    HISTORICAL = 1  # sent from backlog, not live
    CLOCK_SUSPECT = 2  # wall clock was not trusted when the record was made (§4.7)
    BAD_QUALITY = 4  # the device reported a fault for this value


class Record(NamedTuple):
    """One outbox record. A named tuple, not a dataclass: both sides make hundreds of
    thousands of these per second while a backlog drains, and a tuple is built 3x faster."""

    seq: int
    kind: RecordKind
    ts_ms: int
    point: str | None
    value: Value
    flags: Flag = Flag.NONE
    attrs: Mapping[str, Any] | None = None

    @property
    def historical(self) -> bool:
        return bool(self.flags & Flag.HISTORICAL)


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A record of a valid batch that breaks a rule (`protocols.limits`): its position in
    the batch's `r` (or, for one central's database refused, in `records`), its seq when that
    is one an edge could have made (central may then acknowledge it), and why."""

    index: int
    seq: int | None
    error: EnvelopeError


@dataclass(frozen=True, slots=True)
class DataBatch:
    """`rejected` is filled only by `decode`: the records refused one by one, while the
    batch's own fields and its other records are good; `encode` ignores it."""

    gw: str
    stream: str
    records: Sequence[Record]
    sent_ms: int = 0
    rejected: tuple[RejectedRecord, ...] = ()
    # Filled by `decode` of a version 2 batch: the good records as columns, for a consumer
    # that works column by column (central's telemetry insert); `records` holds the same,
    # made only when read (`protocols.columnar.ColumnRecords`).
    columns: Columns | None = field(default=None, compare=False, repr=False)

    def non_telemetry(self) -> Sequence[Record]:
        """The records that are not readings (events, alarms, command results), in order:
        none for a version 2 batch of readings, without making its records."""
        if self.columns is not None and self.columns.kinds is None:
            return ()
        return [r for r in self.records if r.kind is not RecordKind.TELEMETRY]


@dataclass(frozen=True, slots=True)
class Ack:
    stream: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class State:
    online: bool
    boot_id: str
    version: str
    bearer: str
    backlog: int
    ts_ms: int = 0
    stream: str = ""
    # The highest envelope version this side decodes (central announces 2 in its state; an
    # older central sends no `env`, read as 1). Sent only when above 1.
    envelope: int = 1


@dataclass(frozen=True, slots=True)
class PointInfo:
    ordinal: int
    key: str  # device/point
    name_zh: str = ""
    unit: str = ""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    profile: str
    profile_hash: str
    points: tuple[PointInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class Birth:
    gw: str
    stream: str
    boot_id: str
    version: str
    devices: tuple[DeviceInfo, ...] = field(default_factory=tuple)


Message: TypeAlias = DataBatch | Ack | State | Birth


__all__ = ["DEVICE_POINT", "Ack", "Birth", "DataBatch", "DeviceInfo", "Flag", "Lane", "Message",
           "PointInfo", "Record", "RecordKind", "RejectedRecord", "State", "Value"]
