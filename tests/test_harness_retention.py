"""The test harness's central keeps the fake gateways' records: they are dated 2023
(`tests.fakegw.T0_MS`), far older than central's default retention, whose first pass runs a
minute after start. A purge there would lose records an end-to-end test then looks for, and keep
their 1-hour buckets: the aggregates would count more samples than readings (tests/derived.py)."""

from __future__ import annotations

import time
from pathlib import Path

from central.config.settings import load_settings
from central.storage import open_storage
from central.storage.history import retention_from
from protocols.envelope import DataBatch, Record, RecordKind
from tests.derived import derived_problems
from tests.fakegw import expected_record
from tests.fleet import Central, sqlite_rows
from tests.helpers import free_port

GW, STREAM, POINTS, RECORDS = "gw-fake", "s1", 8, 16


async def test_harness_central_keeps_fake_gateway_records_through_a_purge(
        tmp_path: Path) -> None:
    """A retention pass with the settings of a central as tests/fleet.py starts it keeps a fake gateway's records: held seqs and aggregates still agree with the readings."""
    settings = load_settings(env=Central(tmp_path, free_port()).env)
    records = []
    for seq in range(1, RECORDS + 1):
        point, ts, value = expected_record(seq, POINTS)
        records.append(Record(seq=seq, kind=RecordKind.TELEMETRY, ts_ms=ts, point=point,
                              value=value))
    db = tmp_path / "central.db"
    async with open_storage(f"sqlite:///{db}") as storage:
        await storage.write_batches([DataBatch(gw=GW, stream=STREAM, records=tuple(records))])
        await storage.purge(retention_from(settings), time.time_ns() // 1_000_000)

    assert derived_problems(lambda sql, args: sqlite_rows(db, sql, args), GW, STREAM) == []
    seqs = [s for (s,) in sqlite_rows(db, "SELECT seq FROM readings ORDER BY seq")]
    assert seqs == list(range(1, RECORDS + 1))
