"""What ingest does with input it refuses (DESIGN.md §8: counted, never a crashed loop).

- `RejectLog`: a refusal is logged once per (gateway, reason) per minute, with the number held
  back since the last line; a burst of poison from one gateway is one line a minute.
- `write_isolating`: a batch whose write the database refuses for a value in it
  (`UnstorableValueError`, a rule `protocols.limits` lacks) is written in halves until each
  failing record is alone; those records are refused like any other bad record, the rest are
  stored, so the good records beside a bad one are neither lost nor held back.
- `count_bad_attrs`: a stored record whose attrs break their contract (an ALARM record that is
  no `protocols.alarm_attrs.AlarmAttrs`, an EVENT claiming to be one of the outbox's reports,
  `protocols.outbox_events`) is counted in `attrs_rejected_total{reason}` and logged like a
  refusal; it stays in history, acked, but moves no alarm and no loss count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from central.health.metrics import Metrics
from central.storage import Storage, UnstorableValueError, WriteResult
from protocols.alarm_attrs import AlarmAttrs
from protocols.envelope import DataBatch, Record, RecordKind, RejectedRecord
from protocols.limits import UnstorableRecordError
from protocols.outbox_events import parse_outbox_event
from protocols.record_attrs import AttrsError

log = structlog.get_logger(__name__)

LOG_INTERVAL_S = 60.0
_MAX_KEYS = 10_000  # (gateway, reason) pairs remembered; gateway ids come from topics


class RejectLog:
    """Logs each event (`message_rejected`, `records_rejected`, ...) at most once per
    (gateway, reason) per `interval_s`; the next line says how many were `suppressed` in
    between."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        # (event, gw, reason) -> (logged at, lines held back since)
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def __call__(self, event: str, gw: str, reason: str, **fields: Any) -> bool:
        """Log `event` unless this (gw, reason) was logged within the interval; True if
        logged."""
        now = self._clock()
        key = (event, gw, reason)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is None and len(self._last) >= _MAX_KEYS:
            self._forget(now)
        self._last[key] = (now, 0)
        log.warning(event, gw=gw, reason=reason, suppressed=last[1] if last else 0, **fields)
        return True

    def _forget(self, now: float) -> None:
        self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval_s}
        if len(self._last) >= _MAX_KEYS:  # a flood of distinct gateways: start over
            self._last.clear()


def merge_results(batch: DataBatch, results: Sequence[WriteResult]) -> WriteResult:
    """One `WriteResult` for a batch written in several transactions."""
    return WriteResult(gw=batch.gw, stream=batch.stream, received=len(batch.records),
                       inserted=sum(r.inserted for r in results),
                       clock_suspect=sum(r.clock_suspect for r in results),
                       corrected=sum(r.corrected for r in results),
                       merged=sum(r.merged for r in results))


async def write_isolating(storage: Storage, batch: DataBatch
                          ) -> tuple[WriteResult, tuple[RejectedRecord, ...]]:
    """Write `batch`, whose write as a whole raised `UnstorableValueError`, in halves; returns
    the merged result and the records refused alone (their seqs are then recorded as refused,
    with the batch's own refusals). Raises `DatabaseWriteError` for anything else (the batch
    is then not acked, and the gateway sends it again)."""
    results: list[WriteResult] = []
    refused: list[RejectedRecord] = []
    position = {id(r): i for i, r in enumerate(batch.records)}

    async def write(records: Sequence[Record]) -> None:
        try:
            results.extend(await storage.write_batches(
                [dataclasses.replace(batch, records=records, rejected=(), columns=None)]))
        except UnstorableValueError as exc:
            if len(records) > 1:
                mid = len(records) // 2
                await write(records[:mid])
                await write(records[mid:])
                return
            r = records[0]
            refused.append(RejectedRecord(position[id(r)], r.seq, UnstorableRecordError(
                f"seq {r.seq}", f"the database refused it: {str(exc)[:200]}")))

    if batch.records:
        await write(batch.records)
    rejected = (*batch.rejected, *refused)
    if any(rj.seq is not None for rj in rejected):
        # The refusals on their own: the delivery view then counts them as reported lost.
        await storage.write_batches(
            [dataclasses.replace(batch, records=(), rejected=rejected, columns=None)])
    return merge_results(batch, results), tuple(refused)


def attrs_error(record: Record) -> AttrsError | None:
    """What is wrong with `record`'s attrs under the contract its kind (and for an EVENT, its
    `event`) names; None when they fit or name no contract checked here."""
    try:
        if record.kind is RecordKind.ALARM:
            AlarmAttrs.from_attrs(record.attrs or {})
        elif record.kind is RecordKind.EVENT:
            parse_outbox_event(record.attrs)
    except AttrsError as exc:
        return exc
    return None


def count_bad_attrs(batch: DataBatch, metrics: Metrics, reject_log: RejectLog) -> int:
    """Count and log (per gateway and reason) the records of `batch` whose attrs break their
    contract; returns how many."""
    bad = 0
    for r in batch.non_telemetry():
        if (exc := attrs_error(r)) is None:
            continue
        bad += 1
        metrics.attrs_rejected[exc.reason] += 1
        reject_log("attrs_rejected", batch.gw, exc.reason, stream=batch.stream[:64], seq=r.seq,
                   contract=exc.contract, field=exc.field, error=str(exc)[:300])
    return bad
