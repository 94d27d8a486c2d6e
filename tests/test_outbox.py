"""The edge outbox on real SQLite files: seqs, lanes, acks, status, crash safety, full disk."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.outbox.store import (
    NewRecord,
    Outbox,
    OutboxCorruptError,
    OutboxError,
    OutboxFullError,
    read_status,
)
from protocols.envelope import Flag, RecordKind
from tests.helpers import python_env

TEL, ALARM, EVENT, CMD = (RecordKind.TELEMETRY, RecordKind.ALARM, RecordKind.EVENT,
                          RecordKind.CMD_RESULT)


def tel(i: int, point: str = "d1/gas") -> NewRecord:
    return NewRecord(TEL, 1_700_000_000_000 + i, point, float(i))


async def test_stream_persists_across_reopen(tmp_path: Path) -> None:
    """The stream id is made once, when the file is created, and survives reopening."""
    db = tmp_path / "outbox.db"
    async with Outbox.open(db) as ob:
        first = ob.stream
    async with Outbox.open(db) as ob:
        assert ob.stream == first
    assert len(first) == 32
    async with Outbox.open(tmp_path / "other.db") as ob:
        assert ob.stream != first


async def test_seqs_are_never_reused_after_delete(tmp_path: Path) -> None:
    """After records are delivered and pruned, a reopened outbox continues above the old seqs."""
    db = tmp_path / "outbox.db"
    async with Outbox.open(db) as ob:
        assert await ob.append([tel(i) for i in range(3)]) == [1, 2, 3]
        assert await ob.mark_delivered([(1, 3)]) == 3  # no retention: deleted on the ack
        assert await ob.prune() == 0
        assert (await ob.stats()).backlog == 0
    async with Outbox.open(db) as ob:
        assert await ob.append([tel(9)]) == [4]
        assert (await ob.stats()).last_seq == 4


async def test_next_batch_serves_lanes_in_priority_order(tmp_path: Path) -> None:
    """Alarms come first, then events and command results, then telemetry, oldest first."""
    async with Outbox.open(tmp_path / "o.db") as ob:
        await ob.append([tel(1), NewRecord(EVENT, 2, None, "door"), tel(3)])
        await ob.append([NewRecord(ALARM, 4, "d1/gas", 30.0), NewRecord(CMD, 5, None, "ok"), tel(6)])
        batch = await ob.next_batch(10)
        assert [r.seq for r in batch] == [4, 2, 5, 1, 3, 6]
        assert [r.seq for r in await ob.next_batch(3)] == [4, 2, 5]


async def test_next_batch_skips_excluded_seqs(tmp_path: Path) -> None:
    """In-flight seqs are left out, also when they are many and interleaved across lanes."""
    async with Outbox.open(tmp_path / "o.db") as ob:
        recs = [NewRecord(ALARM, i, "d/a", 1.0) if i % 100 == 0 else tel(i) for i in range(1, 3001)]
        await ob.append(recs)
        in_flight = set(range(1, 2001)) | {2500}
        batch = await ob.next_batch(50, exclude=in_flight)
        alarms = [s for s in range(2100, 3001, 100) if s != 2500]
        assert [r.seq for r in batch[:9]] == alarms
        assert [r.seq for r in batch[9:]] == list(range(2001, 2042))
        rest = await ob.next_batch(5000, exclude=in_flight)
        assert {r.seq for r in rest} == set(range(2001, 3001)) - {2500}


async def test_old_telemetry_is_flagged_historical(tmp_path: Path) -> None:
    """Telemetry older than the live window is sent as backlog; alarms never are."""
    async with Outbox.open(tmp_path / "o.db", live_window_s=0.05) as ob:
        await ob.append([tel(1), NewRecord(ALARM, 2, "d1/gas", 1.0, flags=Flag.CLOCK_SUSPECT)])
        await asyncio.sleep(0.1)
        await ob.append([tel(3)])
        by_seq = {r.seq: r for r in await ob.next_batch(10)}
        assert by_seq[1].flags == Flag.HISTORICAL
        assert by_seq[2].flags == Flag.CLOCK_SUSPECT
        assert not by_seq[3].historical


async def test_values_and_attrs_round_trip(tmp_path: Path) -> None:
    """Bools stay bools, attrs come back, and a NaN reading is kept as bad quality, not lost."""
    async with Outbox.open(tmp_path / "o.db") as ob:
        await ob.append([NewRecord(TEL, 1, "d/coil", True), NewRecord(TEL, 2, "d/n", 1),
                         NewRecord(EVENT, 3, None, "x", attrs={"by": "op", "n": [1, 2]}),
                         NewRecord(TEL, 4, "d/f", float("nan"))])
        got = {r.seq: r for r in await ob.next_batch(10)}
        assert got[1].value is True and got[2].value == 1 and got[2].value is not True
        assert got[3].attrs == {"by": "op", "n": [1, 2]}
        assert got[4].value is None and got[4].flags == Flag.BAD_QUALITY


async def test_mark_delivered_is_idempotent(tmp_path: Path) -> None:
    """A repeated or overlapping ack marks nothing twice and counts each record once."""
    async with Outbox.open(tmp_path / "o.db", prune_interval_s=3600) as ob:
        await ob.append([tel(i) for i in range(10)])
        assert await ob.mark_delivered([(1, 4), (7, 7)]) == 5
        assert await ob.mark_delivered([(1, 4), (7, 7)]) == 0
        assert await ob.mark_delivered([(3, 8), (100, 200)]) == 3
        stats = await ob.stats()
        assert (stats.backlog, stats.delivered_total) == (2, 8)
        assert stats.backlog_by_kind == {TEL: 2}
        assert stats.oldest_undelivered_ts_ms == 1_700_000_000_008
        assert [r.seq for r in await ob.next_batch(10)] == [9, 10]
        assert stats.meta["last_ack_ms"]


async def test_latest_value_per_point_outlives_pruning(tmp_path: Path) -> None:
    """The newest telemetry value of each point is kept after its record is pruned."""
    async with Outbox.open(tmp_path / "o.db") as ob:
        await ob.append([tel(1, "a"), tel(5, "a"), tel(2, "b")])
        await ob.append([tel(3, "a")])  # older device time: does not replace seq 2
        await ob.mark_delivered([(1, 4)])
        await ob.prune()
        latest = await ob.latest()
        assert {p: (r.seq, r.value) for p, r in latest.items()} == {"a": (2, 5.0), "b": (3, 2.0)}


async def test_append_notifies_listeners(tmp_path: Path) -> None:
    """Listeners hear about every committed append and stop hearing once removed."""
    calls: list[int] = []
    async with Outbox.open(tmp_path / "o.db") as ob:
        remove = ob.add_append_listener(lambda: calls.append(1))
        await ob.append([tel(1)])
        remove()
        await ob.append([tel(2)])
    assert calls == [1]


async def test_read_status_while_daemon_writes(tmp_path: Path) -> None:
    """`read_status` reads a consistent view while the outbox keeps committing."""
    db = tmp_path / "o.db"
    async with Outbox.open(db) as ob:
        await ob.set_meta("uplink_state", "connected")
        stop = asyncio.Event()

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                await ob.append([tel(i + k) for k in range(20)])
                i += 20

        task = asyncio.create_task(writer())
        seen = []
        try:
            for _ in range(20):
                st = await asyncio.to_thread(read_status, db)
                assert st.backlog == st.last_seq and st.stream == ob.stream
                seen.append(st.last_seq)
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task
        assert seen == sorted(seen) and seen[-1] > seen[0]
        assert st.meta["uplink_state"] == "connected"
    assert read_status(db).backlog == (await asyncio.to_thread(read_status, db)).last_seq


def test_readers_wait_for_a_store_the_daemon_is_still_creating(tmp_path: Path) -> None:
    """The CLI readers meet a file whose first migration has not committed (the agent is
    starting): the outbox reader says there is no outbox yet, the alarm reader sees no alarms;
    neither trips over the missing tables."""
    from edge_agent.alarms.store import read_alarms

    for name in ("o.db", "alarms.db"):
        sqlite3.connect(tmp_path / name).execute("PRAGMA journal_mode=WAL").fetchone()
    with pytest.raises(OutboxError, match="no outbox"):
        read_status(tmp_path / "o.db")
    assert read_alarms(tmp_path / "alarms.db") == []
    assert read_alarms(tmp_path / "absent.db") == []


_APPENDER = """
import asyncio, sys
from pathlib import Path
from edge_agent.outbox.store import NewRecord, Outbox
from protocols.envelope import RecordKind

async def main():
    async with Outbox.open(Path(sys.argv[1])) as ob:
        i = 0
        while True:
            kind = RecordKind.ALARM if i % 7 == 0 else RecordKind.TELEMETRY
            seqs = await ob.append([NewRecord(kind, i, "d/p", float(i)) for _ in range(25)])
            print(seqs[-1], file=sys.stderr, flush=True)  # stdout has the logs
            i += 1

asyncio.run(main())
"""


async def test_kill_9_leaves_a_consistent_outbox(tmp_path: Path) -> None:
    """A SIGKILLed writer leaves an intact file whose committed seqs are contiguous."""
    db = tmp_path / "o.db"
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(db)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=python_env())
    try:
        assert proc.stderr is not None
        last_printed = 0
        deadline = time.monotonic() + 15
        while last_printed < 2000 and time.monotonic() < deadline:
            last_printed = int(await asyncio.to_thread(proc.stderr.readline) or 0)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    assert last_printed >= 2000
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        seqs = [s for (s,) in conn.execute("SELECT seq FROM records ORDER BY seq")]
    conn.close()
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= last_printed and len(seqs) % 25 == 0
    async with Outbox.open(db) as ob:
        assert await ob.append([tel(1)]) == [len(seqs) + 1]


async def test_full_disk_is_a_typed_error_and_recoverable(tmp_path: Path) -> None:
    """Hitting the size cap raises OutboxFullError, commits nothing, and the outbox lives on;
    the refused telemetry's seqs are burned and reported once there is room again."""
    async with Outbox.open(tmp_path / "o.db", max_bytes=256 * 1024) as ob:
        with pytest.raises(OutboxFullError) as refused:
            for i in range(1000):
                await ob.append([NewRecord(TEL, i, "d/p", "x" * 1000) for _ in range(10)])
        assert refused.value.dropped == 10  # type: ignore[attr-defined]
        stats = await ob.stats()
        assert stats.backlog == stats.last_seq  # the failed batch left no rows behind
        await ob.mark_delivered([(1, stats.last_seq)])
        await ob.prune()
        # 10 seqs burned for the refused batch, then its outbox_dropped and outbox_disk_full
        assert await ob.append([tel(1)]) == [stats.last_seq + 10 + 2 + 1]


async def test_garbage_file_is_reported_corrupt(tmp_path: Path) -> None:
    """A file that is not SQLite raises OutboxCorruptError instead of an sqlite3 error."""
    db = tmp_path / "o.db"
    db.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(OutboxCorruptError):
        async with Outbox.open(db):
            pass


async def test_delivered_records_are_kept_only_with_retention(tmp_path: Path) -> None:
    """Without retention an ack deletes the records at once; with `keep_delivered_s` they stay
    (marked with the ack time) until a prune after that long. Either way they are not sent
    again and the backlog drops."""
    def left(db: Path) -> list[tuple[int, bool]]:
        with contextlib.closing(sqlite3.connect(db)) as c:
            return [(s, d != 0) for s, d in c.execute("SELECT seq, delivered FROM records")]

    async with Outbox.open(tmp_path / "a.db") as ob:
        await ob.append([tel(i) for i in range(4)])
        assert await ob.mark_delivered([(1, 2)]) == 2
        assert await ob.mark_delivered([(1, 2)]) == 0  # idempotent
        assert left(tmp_path / "a.db") == [(3, False), (4, False)]
        assert [r.seq for r in await ob.next_batch(10)] == [3, 4]
    async with Outbox.open(tmp_path / "b.db", keep_delivered_s=3600) as ob:
        await ob.append([tel(i) for i in range(4)])
        assert await ob.mark_delivered([(1, 2)]) == 2
        assert left(tmp_path / "b.db") == [(1, True), (2, True), (3, False), (4, False)]
        assert await ob.prune() == 0  # not an hour old yet
        assert [r.seq for r in await ob.next_batch(10)] == [3, 4]
        assert (await ob.stats()).backlog == 2
