"""The outbox's reports about itself, carried as EVENT records (DESIGN.md §4.6).

The edge writes them in the transaction that removes or skips records
(`edge_agent.outbox.budget`, `.ring`, `.seqs`); central reads the loss reports into its
delivery view (`central.storage.delivery.loss_report`), so a seq that never comes is
`reported lost`, not `pending` for ever.

Version 1, the maps every agent so far sends (no `v`, see `protocols.record_attrs`):

- `LossReport`, event `outbox_thinned` or `outbox_dropped`:
  `{"event", "records", "first_seq", "last_seq", "points", "points_more"?, "keep_every"?,
  "reason"?, "telemetry"?, "held_lost"?, "reserved_by_boot"?}`. `records` records were
  removed from `first_seq..last_seq` (thinning keeps some inside the range, so `records` may
  be fewer than the range holds, never more). `points` names at most `MAX_POINTS_LISTED`
  points, `points_more` how many more. `reason` says why a drop happened outside the budget:
  `disk_full` (a full disk burned the seqs of the telemetry it could not write, and of held
  records it gave up: `telemetry`, `held_lost`) or `power_cut` (seqs reserved before a power
  cut and skipped at the next open: `reserved_by_boot`; some may have reached central).
- `DiskFullEpisode`, event `outbox_disk_full`: one full-disk episode, after it ended
  (`since_ms`, `until_ms`, `held`, `telemetry_dropped`, `held_lost`, `marks_retried`,
  `error`).

`parse_outbox_event` reads any of them; any other EVENT record is not an outbox event.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from protocols.limits import INT64_MAX, SEQ_MAX
from protocols.record_attrs import FieldReader

CONTRACT: Final = "outbox_event"
VERSION: Final = 1
MAX_POINTS_LISTED: Final = 200  # a report names at most this many points (and how many more)
_MAX_ERROR_CHARS: Final = 200


class OutboxEvent(enum.StrEnum):
    """The `event` of the outbox's own EVENT records."""

    THINNED = "outbox_thinned"
    DROPPED = "outbox_dropped"
    DISK_FULL = "outbox_disk_full"


class LossReason(enum.StrEnum):
    """Why an `outbox_dropped` report dropped records outside the disk budget."""

    DISK_FULL = "disk_full"
    POWER_CUT = "power_cut"


LOSS_EVENTS: Final = frozenset({OutboxEvent.THINNED, OutboxEvent.DROPPED})


@dataclass(frozen=True, slots=True)
class LossReport:
    """An `outbox_thinned` / `outbox_dropped` report; see the module doc."""

    event: OutboxEvent
    records: int
    first_seq: int
    last_seq: int
    points: tuple[str, ...] = ()
    points_more: int = 0
    keep_every: int | None = None  # thinning: every k-th sample per point was kept
    reason: LossReason | None = None
    telemetry: int | None = None  # disk_full: telemetry records among `records`
    held_lost: int | None = None  # disk_full: held records given up among `records`
    reserved_by_boot: str | None = None  # power_cut: the boot that reserved the range

    @classmethod
    def naming(cls, event: OutboxEvent, records: int, first_seq: int, last_seq: int,
               points: Iterable[str], **more: Any) -> LossReport:
        """A report naming the first `MAX_POINTS_LISTED` of `points` (sorted) and counting
        the rest in `points_more`."""
        names = sorted(points)
        return cls(event, records, first_seq, last_seq, tuple(names[:MAX_POINTS_LISTED]),
                   max(0, len(names) - MAX_POINTS_LISTED), **more)

    @property
    def kind(self) -> str:
        """`thinned`, `dropped` or, for the seqs skipped after a power cut, `power_cut`."""
        if self.reason is LossReason.POWER_CUT:
            return str(LossReason.POWER_CUT)
        return "thinned" if self.event is OutboxEvent.THINNED else "dropped"

    def to_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": str(self.event), "records": self.records,
                               "first_seq": self.first_seq, "last_seq": self.last_seq,
                               "points": list(self.points)}
        if self.points_more:
            out["points_more"] = self.points_more
        optional = (("keep_every", self.keep_every),
                    ("reason", None if self.reason is None else str(self.reason)),
                    ("telemetry", self.telemetry), ("held_lost", self.held_lost),
                    ("reserved_by_boot", self.reserved_by_boot))
        out.update((k, v) for k, v in optional if v is not None)
        return out

    @classmethod
    def from_attrs(cls, attrs: object) -> LossReport:
        """Raises `AttrsError` (a subclass) when `attrs` are not a valid loss report: a range
        no edge has, or more records lost than the range holds."""
        f = FieldReader(CONTRACT, attrs, VERSION)
        event = _event(f)
        if event not in LOSS_EVENTS:
            raise f.error("event", f"{event} is not a loss report")
        first = f.req_int("first_seq", 1, SEQ_MAX)
        last = f.req_int("last_seq", first, SEQ_MAX)
        records = f.req_int("records", 0, last - first + 1)
        reason = f.opt_choice("reason", LossReason)
        return cls(event=event, records=records, first_seq=first, last_seq=last,
                   points=f.str_list("points"),
                   points_more=f.opt_int("points_more", 0, INT64_MAX) or 0,
                   keep_every=f.opt_int("keep_every", 1, INT64_MAX), reason=reason,
                   telemetry=f.opt_int("telemetry", 0, INT64_MAX),
                   held_lost=f.opt_int("held_lost", 0, INT64_MAX),
                   reserved_by_boot=f.opt_str("reserved_by_boot"))


@dataclass(frozen=True, slots=True)
class DiskFullEpisode:
    """An `outbox_disk_full` report: one episode of a full disk, written when it ended."""

    since_ms: int | None
    until_ms: int
    held: int
    telemetry_dropped: int
    held_lost: int
    marks_retried: int
    error: str = ""

    def to_attrs(self) -> dict[str, Any]:
        return {"event": str(OutboxEvent.DISK_FULL), "since_ms": self.since_ms,
                "until_ms": self.until_ms, "held": self.held,
                "telemetry_dropped": self.telemetry_dropped, "held_lost": self.held_lost,
                "marks_retried": self.marks_retried, "error": self.error[:_MAX_ERROR_CHARS]}

    @classmethod
    def from_attrs(cls, attrs: object) -> DiskFullEpisode:
        f = FieldReader(CONTRACT, attrs, VERSION)
        if _event(f) is not OutboxEvent.DISK_FULL:
            raise f.error("event", f"expected {OutboxEvent.DISK_FULL}")
        counts = {k: f.req_int(k, 0, INT64_MAX)
                  for k in ("held", "telemetry_dropped", "held_lost", "marks_retried")}
        return cls(since_ms=f.opt_int("since_ms", 0, INT64_MAX),
                   until_ms=f.req_int("until_ms", 0, INT64_MAX),
                   error=f.opt_str("error") or "", **counts)


OutboxReport: TypeAlias = LossReport | DiskFullEpisode


def _event(f: FieldReader) -> OutboxEvent:
    event = f.opt_choice("event", OutboxEvent)
    if event is None:
        raise f.error("event", "missing")
    return event


_EVENT_NAMES: Final = frozenset(str(e) for e in OutboxEvent)


def is_outbox_event(attrs: Mapping[str, Any] | None) -> bool:
    """Whether an EVENT record's attrs claim to be one of the outbox's reports."""
    if not isinstance(attrs, Mapping):
        return False
    event = attrs.get("event")
    return type(event) is str and event in _EVENT_NAMES


def parse_outbox_event(attrs: Mapping[str, Any] | None) -> OutboxReport | None:
    """The outbox report in an EVENT record's attrs; None if they are not one
    (`is_outbox_event`); raises `AttrsError` if they claim to be one and do not fit."""
    if attrs is None or not is_outbox_event(attrs):
        return None
    if attrs["event"] == OutboxEvent.DISK_FULL:
        return DiskFullEpisode.from_attrs(attrs)
    return LossReport.from_attrs(attrs)


__all__ = ["CONTRACT", "LOSS_EVENTS", "MAX_POINTS_LISTED", "VERSION", "DiskFullEpisode",
           "LossReason", "LossReport", "OutboxEvent", "OutboxReport", "is_outbox_event",
           "parse_outbox_event"]
