"""Storage's side of issue 10 on SQLite and PostgreSQL: refused records are recorded as
reported lost, loss reports cannot overflow the counters, and a value the database refuses is
a typed error that `write_isolating` narrows down to its record."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from central.ingest.rejects import RejectLog, write_isolating
from central.storage import Storage, UnstorableValueError, open_storage
from protocols.envelope import DataBatch, Record, RecordKind, RejectedRecord
from protocols.limits import INT64_MAX, SEQ_MAX, IntRangeError, Reason
from tests.hostile import T0
from tests.pg import pg_schema

GW = "gw-r"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def storage(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Storage]:
    if request.param == "sqlite":
        async with open_storage(f"sqlite:///{tmp_path}/central.db") as st:
            yield st
    else:
        with pg_schema() as url:
            async with open_storage(url) as st:
                yield st


def reading(seq: int, ts: int = T0) -> Record:
    return Record(seq, RecordKind.TELEMETRY, ts, "d1/gas", float(seq))


def refusal(seq: int | None) -> RejectedRecord:
    return RejectedRecord(0, seq, IntRangeError("r[0].ts", "outside the range"))


async def test_refused_records_count_as_reported_lost_once(storage: Storage) -> None:
    """A refused record's seq is reported lost (not pending), also when the batch comes again
    or has no good record at all; a refusal without a seq records nothing."""
    batch = DataBatch(GW, "s1", (reading(1), reading(3)), rejected=(refusal(2), refusal(None)))
    for _ in range(2):
        (res,) = await storage.write_batches([batch])
    assert res.inserted == 0 and res.received == 2
    await storage.write_batches([DataBatch(GW, "s1", (), rejected=(refusal(4),))])
    (s,) = (await storage.delivery(GW)).streams
    assert (s.held, s.max_seq, s.missing, s.lost_records_reported, s.reported_lost) == \
        (2, 3, 1, 2, 1)


async def test_loss_reports_cannot_overflow_the_counters(storage: Storage) -> None:
    """Loss reports naming more records than their range are ignored; valid but enormous ones
    saturate `lost_reported` at 2**63-1 instead of failing the write."""
    def report(seq: int, first: int, last: int, n: int) -> Record:
        return Record(seq, RecordKind.EVENT, T0, None, None, attrs={
            "event": "outbox_dropped", "first_seq": first, "last_seq": last, "records": n})
    await storage.write_batches([DataBatch(GW, "s1", (report(1, 2, 3, 5),))])
    (s,) = (await storage.delivery(GW)).streams
    assert s.lost_records_reported == 0
    huge = [report(seq, 1, SEQ_MAX, SEQ_MAX) for seq in (10, 11, 12)]
    await storage.write_batches([DataBatch(GW, "s1", tuple(huge[:2]))])
    await storage.write_batches([DataBatch(GW, "s1", (huge[2],))])
    (s,) = (await storage.delivery(GW)).streams
    assert s.lost_records_reported == INT64_MAX


async def test_a_value_the_database_refuses_is_isolated(storage: Storage) -> None:
    """A time past BIGINT (it bypassed decode) fails the write with `UnstorableValueError`;
    `write_isolating` stores the records beside it and refuses that one with its seq."""
    batch = DataBatch(GW, "s1", tuple(reading(s, ts=2**64 if s == 6 else T0)
                                      for s in range(1, 10)))
    with pytest.raises(UnstorableValueError):
        await storage.write_batches([batch])
    result, refused = await write_isolating(storage, batch)
    assert result.inserted == 8
    assert [(r.seq, r.index, r.error.reason) for r in refused] == [(6, 5, Reason.UNSTORABLE)]
    assert (await storage.count_records(GW)).readings == 8
    (s,) = (await storage.delivery(GW)).streams
    assert (s.held, s.lost_records_reported) == (8, 1)


def test_reject_log_says_it_once_a_minute_per_gateway_and_reason(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A burst of one refusal from one gateway is one line a minute, with the count held back;
    another gateway or reason has its own line."""
    now = [0.0]
    rl = RejectLog(clock=lambda: now[0])
    assert [rl("records_rejected", "gw-1", "int_range") for _ in range(5)] == \
        [True, False, False, False, False]
    assert rl("records_rejected", "gw-2", "int_range")
    assert rl("records_rejected", "gw-1", "not_finite")
    now[0] = 61.0
    assert rl("records_rejected", "gw-1", "int_range")
    assert "suppressed=4" in capsys.readouterr().out
